"""ONNX Runtime integer kernels for quantized linear layers of transformers.

Sequence models are quantized the way ONNX Runtime runs them fastest on a CPU:

- **W8A8, dynamic activations**: ``DynamicQuantizeLinear`` (uint8, range of each tensor) ->
  ``MatMulInteger`` with int8 per-column weights -> ``Cast`` -> ``Mul`` by both scales.
  ONNX Runtime fuses this pattern into its ``DynamicQuantizeMatMul`` kernel, the same kernel
  ``onnxruntime.quantization.quantize_dynamic`` produces, so the weights and the smoothing
  edgeslim chose run at the peer's speed.
- **W4 weight-only**: ``com.microsoft.MatMulNBits`` with the layer's per-group scales and
  4-bit codes packed two per byte (low nibble first), zero point 8 (ORT's default).

The model is exported in float mode, then each ``MatMul`` whose weight initializer equals a
quantized layer's (transposed) weight is rewritten with that layer's own codes and scales,
so ONNX Runtime computes exactly the torch fake-quant model. Per-token activations have no
fused ONNX Runtime kernel; they are refused here (measure them in torch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeslim.errors import EdgeslimError
from edgeslim.quant.modules import ActQuant, QuantLinear
from edgeslim.quant.quantizers import UniformQuantizer

NBITS_BLOCKS = (16, 32, 64, 128, 256)


def _kind(fqn: str, layer: QuantLinear) -> str:
    """``w8a8_dynamic`` or ``w4_weight_only``; anything else is refused with the reason."""
    wq, aq = layer.weight_quantizer, layer.input_quant
    if not isinstance(wq, UniformQuantizer) or not wq.symmetric:
        raise EdgeslimError(f"{fqn}: integer export needs symmetric uniform weights")
    spec = wq.spec
    if aq is None:
        if spec.bits != 4 or spec.granularity != "group" or spec.group_size not in NBITS_BLOCKS:
            raise EdgeslimError(
                f"{fqn}: weight-only export runs 4-bit per-group weights in MatMulNBits "
                f"(group_size in {NBITS_BLOCKS}); got {spec.bits}-bit {spec.granularity}"
            )
        return "w4_weight_only"
    a = aq.spec
    if a.observer != "dynamic" or a.granularity != "tensor" or a.bits != 8 or a.symmetric:
        raise EdgeslimError(
            f"{fqn}: W8A8 export needs dynamic per-tensor asymmetric 8-bit activations "
            f"(ONNX Runtime's DynamicQuantizeLinear); got observer={a.observer!r}, "
            f"granularity={a.granularity!r}, bits={a.bits}, symmetric={a.symmetric}. "
            "Per-token activations have no fused ONNX Runtime kernel."
        )
    if spec.bits not in (7, 8) or spec.granularity not in ("channel", "tensor"):  # 7: reduce_range
        raise EdgeslimError(
            f"{fqn}: W8A8 export needs 8-bit (or 7-bit, reduce_range) per-channel or per-tensor "
            f"weights; got {spec.bits}-bit {spec.granularity}"
        )
    return "w8a8_dynamic"


def _codes(layer: QuantLinear) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes ``(N, K)`` and scales ``(G,)`` of the layer's quantized weight."""
    wq = layer.weight_quantizer
    assert isinstance(wq, UniformQuantizer)
    w = layer.weight.detach().float()
    groups = wq.to_groups(w)
    scale = wq.scale.detach().float().reshape(-1, 1)
    codes = torch.clamp(torch.round(groups / scale), wq.qmin, wq.qmax)
    codes = wq.from_groups(codes, w) if wq.spec.granularity != "group" else codes
    return codes.to(torch.int8).numpy(), scale.reshape(-1).numpy()


def _digest(a: np.ndarray) -> tuple[tuple[int, ...], str]:
    return tuple(a.shape), hashlib.sha1(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


@contextmanager
def _float_mode(model: nn.Module) -> Iterator[None]:
    saved = [(m, m.mode) for m in model.modules() if isinstance(m, (QuantLinear, ActQuant))]
    for m, _ in saved:
        m.mode = "float"
    try:
        yield
    finally:
        for m, mode in saved:
            m.mode = mode


def export_integer_linear(
    model: nn.Module,
    example_args: tuple[torch.Tensor, ...],
    path: Path,
    **export_kwargs: Any,
) -> tuple[Path, dict[str, str]]:
    """Export ``model`` with every ``QuantLinear`` as an ONNX Runtime integer kernel.

    Returns the path and ``{fqn: kind}`` of the rewritten layers. A quantized layer whose
    weight is not found as a MatMul initializer (e.g. exported as Gemm) is an error, so no
    layer silently stays float.
    """
    from edgeslim.export.onnx import export_onnx

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    kinds = {n: _kind(n, m) for n, m in layers.items()}
    path = Path(path)
    with _float_mode(model):
        export_onnx(model, example_args, path, **export_kwargs)
    proto = onnx.load(str(path))
    by_value = {
        _digest(layer.weight.detach().float().T.contiguous().numpy()): n
        for n, layer in layers.items()
    }
    inits = {i.name: i for i in proto.graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    dql: dict[str, tuple[str, str, str]] = {}
    done: dict[str, str] = {}
    for node in proto.graph.node:
        b = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        fqn = by_value.get(_digest(numpy_helper.to_array(inits[b]))) if b in inits else None
        if fqn is None or fqn in done:
            new_nodes.append(node)
            continue
        layer, a, y = layers[fqn], node.input[0], node.output[0]
        tag = fqn.replace(".", "_")
        codes, scales = _codes(layer)
        if kinds[fqn] == "w8a8_dynamic":
            if a not in dql:
                dql[a] = (f"{a}_q", f"{a}_scale", f"{a}_zp")
                new_nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(dql[a])))
            aq, a_scale, a_zp = dql[a]
            n_out = codes.shape[0]
            w_scale = np.broadcast_to(scales, (n_out,)).astype(np.float32)
            proto.graph.initializer.extend([
                numpy_helper.from_array(np.ascontiguousarray(codes.T), f"{tag}_wq"),
                numpy_helper.from_array(np.zeros(n_out, np.int8), f"{tag}_wzp"),
                numpy_helper.from_array(w_scale, f"{tag}_wscale"),
            ])  # fmt: skip
            new_nodes += [
                helper.make_node(
                    "MatMulInteger", [aq, f"{tag}_wq", a_zp, f"{tag}_wzp"], [f"{tag}_i32"]
                ),
                helper.make_node("Cast", [f"{tag}_i32"], [f"{tag}_f"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [a_scale, f"{tag}_wscale"], [f"{tag}_s"]),
                helper.make_node("Mul", [f"{tag}_f", f"{tag}_s"], [y]),
            ]
        else:
            new_nodes.append(_matmul_nbits(proto, layer, codes, scales, a, y, tag))
        done[fqn] = kinds[fqn]
    missing = sorted(set(layers) - set(done))
    if missing:
        raise EdgeslimError(
            f"integer export found no MatMul weight for {', '.join(missing[:5])}; these "
            "layers are not exported as MatMul with a constant weight"
        )
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    used = {i for n in proto.graph.node for i in n.input}
    keep = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    if any(k == "w4_weight_only" for k in done.values()):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path, done


def _matmul_nbits(
    proto: onnx.ModelProto,
    layer: QuantLinear,
    codes: np.ndarray,
    scales: np.ndarray,
    a: str,
    y: str,
    tag: str,
) -> onnx.NodeProto:
    """``MatMulNBits`` (4 bits): codes ``(N*blocks, block)`` -> packed ``(N, blocks, block/2)``."""
    assert layer.weight_quantizer is not None
    block = layer.weight_quantizer.spec.group_size
    n, k = layer.out_features, layer.in_features
    blocks = -(-k // block)
    unsigned = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(n, blocks, block)
    packed = (unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)).astype(np.uint8)
    proto.graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(packed), f"{tag}_w4"),
        numpy_helper.from_array(scales.astype(np.float32).reshape(n, blocks), f"{tag}_w4scale"),
    ])  # fmt: skip
    return helper.make_node(
        "MatMulNBits", [a, f"{tag}_w4", f"{tag}_w4scale"], [y], domain="com.microsoft",
        K=k, N=n, bits=4, block_size=block, accuracy_level=0,
    )  # fmt: skip
