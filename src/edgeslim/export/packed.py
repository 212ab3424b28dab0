"""Packed low-bit weights: b-bit codes stored b bits each, saved without pickle.

A packed checkpoint is two files: ``NAME.safetensors`` (for each quantized layer its codes
packed into uint8 and its levels; every other tensor as is) and ``NAME.json`` (format
version, per layer: shape, bits, quantizer spec, group count, code count). Loading rebuilds
each weight as ``levels[group, code]``, bit-exact with the fake-quant weight the model
computed with, and refuses a file that does not match the model before changing anything.

Levels: a grid whose levels are one row of integers times a scale per group (symmetric
uniform, binary, ternary, pow2 up to 4 bits: :meth:`~edgeslim.quant.base.Quantizer.int8_scale`)
stores that row once (int8, ``.table``) and one float32 scale per group (``.scale``);
any other (a codebook, an asymmetric grid) a float32 table per group (``.levels``). Why:
per-channel tables of 16 or 256 float32 levels outweighed the 4- and 8-bit codes (a W4
resnet20 with 8-bit first and last layers: 217 KB where its codes and floats take 139 KB).
Version 1 files (tables only) still load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.checkpoint import load_checked
from edgeslim.errors import CheckpointError
from edgeslim.quant.modules import QuantMixin

FORMAT = "edgeslim-packed/2"
READABLE = ("edgeslim-packed/1", FORMAT)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` into uint8, little-endian within each byte."""
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack at {bits} bits")
    n = flat.numel()
    bit_idx = torch.arange(bits, dtype=torch.int64)
    stream = ((flat[:, None] >> bit_idx) & 1).reshape(-1)  # bits of each code, LSB first
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    packed = (stream << torch.arange(8, dtype=torch.int64)).sum(1).to(torch.uint8)
    assert packed.numel() == math.ceil(n * bits / 8)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` for ``n`` codes."""
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)
    stream = stream[: n * bits].reshape(n, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(1)


def save_packed(model: nn.Module, path: Path) -> tuple[Path, Path]:
    """Save ``model`` (with quantized layers) as packed safetensors + JSON; returns both paths."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)  # as export_onnx does
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    packed_weights = set()
    for fqn, m in model.named_modules():
        q = getattr(m, "weight_quantizer", None)
        if not isinstance(m, QuantMixin) or q is None:
            continue
        w = m._weight.detach()
        codes = q.codes(w)  # (G, M) in group layout
        levels = q.levels().detach().float()
        if levels.shape[0] == 1 and codes.shape[0] != 1:
            levels = levels.expand(codes.shape[0], -1)
        bits = max(1, math.ceil(math.log2(levels.shape[1])))
        tensors[f"{fqn}.weight.codes"] = pack_codes(codes, bits)
        tensors.update(_level_tensors(fqn, q, levels))
        layers[fqn] = {
            "shape": list(w.shape), "bits": bits, "groups": list(codes.shape),
            "spec": q.spec.to_dict(),
        }  # fmt: skip
        packed_weights.add(f"{fqn}.weight")
    for name, t in model.state_dict().items():
        if name not in packed_weights and "quantizer" not in name and "input_quant" not in name:
            tensors[name] = t.detach().contiguous().clone()
    st_path, json_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    save_file(tensors, str(st_path))
    json_path.write_text(json.dumps({"format": FORMAT, "layers": layers}, indent=1) + "\n")
    return st_path, json_path


def _level_tensors(fqn: str, q: Any, levels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``.table`` + ``.scale`` when every group's levels are one integer row times its
    scale, exactly (so decoding is bit-exact); else the float32 ``.levels`` per group."""
    scale = q.int8_scale()
    if scale is not None:
        s = scale.detach().float().reshape(-1).expand(levels.shape[0]).contiguous()
        ints = torch.round(levels / s[:, None])
        row = ints[:1]
        if bool((ints == row).all()) and float(row.abs().max()) <= 127:
            table = row[0].to(torch.int8)
            if torch.equal(_decode_table(table, s), levels):
                return {f"{fqn}.weight.table": table, f"{fqn}.weight.scale": s}
    return {f"{fqn}.weight.levels": levels.contiguous()}


def _decode_table(table: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return table.float()[None, :] * scale[:, None]


def stored_levels(tensors: dict[str, torch.Tensor], fqn: str) -> torch.Tensor:
    """The level table of layer ``fqn`` in a packed file's tensors, ``(groups, levels)``."""
    if f"{fqn}.weight.table" in tensors:
        return _decode_table(tensors[f"{fqn}.weight.table"], tensors[f"{fqn}.weight.scale"])
    return tensors[f"{fqn}.weight.levels"]


def load_packed(model: nn.Module, path: Path) -> nn.Module:
    """Load a packed checkpoint into a float model of the same architecture (all or nothing).

    Quantized layers get their dequantized weights ``levels[group, code]``; the returned
    model is an ordinary float ``nn.Module`` computing what the quantized model computed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).with_suffix("")
    meta_path, st_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(st_path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read packed checkpoint {path}: {exc}") from exc
    if meta.get("format") not in READABLE:
        raise CheckpointError(
            f"{meta_path} is not an {FORMAT} file (format {meta.get('format')!r})"
        )
    state: dict[str, torch.Tensor] = {}
    for fqn, info in meta["layers"].items():
        g, m_per = info["groups"]
        codes = unpack_codes(tensors[f"{fqn}.weight.codes"], info["bits"], g * m_per)
        try:
            levels = stored_levels(tensors, fqn)
        except KeyError as exc:
            raise CheckpointError(f"{path}: layer {fqn} has no levels ({exc}; corrupt)") from exc
        if int(codes.max()) >= levels.shape[1]:
            raise CheckpointError(f"{path}: layer {fqn} has codes beyond its levels (corrupt)")
        values = levels.gather(1, codes.reshape(g, m_per))
        shape = info["shape"]
        per = math.prod(shape[1:])
        state[f"{fqn}.weight"] = values.reshape(shape[0], -1)[:, :per].reshape(shape)
    parts = (".codes", ".levels", ".table", ".scale")
    state |= {k: v for k, v in tensors.items()
              if not (k.endswith(parts) and k.rsplit(".", 2)[0] in meta["layers"])}  # fmt: skip
    return load_checked(model, state, str(st_path))  # all-or-nothing key/shape check
