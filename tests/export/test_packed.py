"""Packed low-bit weights: exact round trip through safetensors + JSON, real size on disk."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslim.data import load_fashion_mnist
from edgeslim.errors import CheckpointError
from edgeslim.export.packed import load_packed, pack_codes, save_packed, unpack_codes
from edgeslim.quant import QuantConfig, QuantSpec, quantize_
from edgeslim.zoo import load_zoo_model
from edgeslim.zoo.resnet import resnet20


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(bits: int, n: int, seed: int) -> None:
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, n), codes)


CASES = [
    ("uniform", 4, "channel"), ("uniform", 2, "group"), ("uniform", 8, "tensor"),
    ("pow2", 3, "channel"), ("binary", 1, "channel"), ("ternary", 2, "channel"),
    ("codebook", 3, "channel"),
]  # fmt: skip


@pytest.mark.parametrize(("quantizer", "bits", "granularity"), CASES)
def test_save_load_is_bit_exact(
    quantizer: str, bits: int, granularity: str, tmp_path: Path
) -> None:
    model = load_zoo_model("resnet20")
    spec = QuantSpec(quantizer=quantizer, bits=bits, granularity=granularity, group_size=32)  # type: ignore[arg-type]
    quantize_(model, QuantConfig(spec), select={"fc": None})
    x = load_fashion_mnist("test", limit=16).images
    with torch.no_grad():
        ref = model(x)
    st_path, _ = save_packed(model, tmp_path / "m")
    fresh = load_packed(resnet20().eval(), tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    layers = [m for m in model.modules() if getattr(m, "weight_quantizer", None) is not None]
    codes = sum((m.weight.numel() * bits + 7) // 8 for m in layers)
    tables = sum(m.weight_quantizer.levels().numel() * 4 for m in layers)
    packed = {n + ".weight" for n, m in model.named_modules() if m in layers}
    floats = sum(
        t.numel() * t.element_size()
        for k, t in model.state_dict().items()
        if k not in packed and "quant" not in k
    )
    # codes at `bits` bits each, one float32 level table per group, the rest in float32
    assert st_path.stat().st_size <= codes + tables + floats + 16_384
    assert codes < 4 * sum(m.weight.numel() for m in layers) * bits / 32 + len(layers)


def test_mismatched_or_corrupt_packed_file_is_refused(tmp_path: Path) -> None:
    model = copy.deepcopy(load_zoo_model("resnet20"))
    quantize_(model, QuantConfig(QuantSpec(bits=4)))
    save_packed(model, tmp_path / "m")
    from edgeslim.zoo.vgg import vgg_small

    other = vgg_small()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(CheckpointError, match="nothing was loaded"):
        load_packed(other, tmp_path / "m")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    (tmp_path / "m.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_packed(resnet20(), tmp_path / "m")


def test_integer_grids_store_one_code_row_and_version_1_files_still_load(tmp_path: Path) -> None:
    """A symmetric 4-bit grid stores one int8 row of codes and a scale per channel, not a
    float32 table per channel; a version-1 file (tables only) of the same model loads to the
    same weights."""
    import json

    from safetensors.torch import load_file, save_file

    from edgeslim.export.packed import stored_levels

    model = load_zoo_model("resnet20")
    quantize_(model, QuantConfig(QuantSpec(bits=4)), select={"fc": None})
    st_path, json_path = save_packed(model, tmp_path / "m")
    tensors = load_file(str(st_path))
    meta = json.loads(json_path.read_text())
    assert meta["format"] == "edgeslim-packed/2"
    assert not any(k.endswith(".levels") for k in tensors)
    assert tensors["conv1.weight.table"].dtype == torch.int8
    old = {k: v for k, v in tensors.items() if not k.endswith((".table", ".scale"))}
    old |= {f"{fqn}.weight.levels": stored_levels(tensors, fqn) for fqn in meta["layers"]}
    save_file(old, str(tmp_path / "v1.safetensors"))
    (tmp_path / "v1.json").write_text(json.dumps({**meta, "format": "edgeslim-packed/1"}))
    x = load_fashion_mnist("test", limit=8).images
    with torch.no_grad():
        new = load_packed(resnet20().eval(), tmp_path / "m")(x)
        assert torch.equal(load_packed(resnet20().eval(), tmp_path / "v1")(x), new)
        assert torch.equal(new, model(x))
