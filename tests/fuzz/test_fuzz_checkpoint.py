"""Fuzz the checkpoint loader with safetensors bytes: a loaded model or a ``CheckpointError``,
and a refused file leaves every parameter and buffer as it was (all or nothing)."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from fuzzing import FUZZ, no_hang
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save

from edgeslim.checkpoint import load_state
from edgeslim.errors import CheckpointError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


GOOD = save({k: v.contiguous() for k, v in _model().state_dict().items()})
KEYS = list(_model().state_dict())
DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
          "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8, "U64": 8, "XX": 4}  # fmt: skip


@st.composite
def safetensors_bytes(draw: st.DrawFn) -> bytes:
    """A header of random entries (right or wrong dtypes, shapes, offsets) and random data."""
    header: dict[str, object] = {}
    offset = 0
    for key in draw(st.lists(st.sampled_from([*KEYS, "extra.weight"]), max_size=6, unique=True)):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        n = DTYPES[dtype]
        for d in shape:
            n *= d
        if draw(st.integers(0, 9)) == 0:
            n += draw(st.integers(-2, 2))
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += max(n, 0)
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3)))
    head = json.dumps(header).encode()
    data = draw(st.binary(min_size=offset, max_size=offset + 4))
    return struct.pack("<Q", len(head) + draw(st.sampled_from([0, 0, 0, 1, -1]))) + head + data


@st.composite
def damaged_good_file(draw: st.DrawFn) -> bytes:
    data = bytearray(GOOD)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@FUZZ
@given(data=st.binary(max_size=200) | safetensors_bytes() | damaged_good_file())
def test_checkpoint_bytes_load_whole_or_not_at_all(data: bytes) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        path.write_bytes(data)
        with no_hang():
            try:
                load_state(model, path)
            except CheckpointError as exc:
                assert str(path) in str(exc)
                after = model.state_dict()
                assert all(torch.equal(before[k], after[k]) for k in before)
                return
    assert all(p.isfinite().all() for p in model.parameters())
    assert model.eval()(torch.ones(2, 3)).shape == (2, 2)


def test_a_folder_is_named_as_a_folder(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(GOOD)
    try:
        load_state(_model(), tmp_path)
    except CheckpointError as exc:
        msg = str(exc)
    else:
        raise AssertionError("a folder was accepted as a checkpoint")
    assert "is a folder, not a safetensors file" in msg and "model.safetensors" in msg
    assert "does not exist" not in msg
