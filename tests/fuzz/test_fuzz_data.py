"""Fuzz the data readers (IDX, .npz, image folder) with random and damaged files: a result
or the project's own error (``DataNotFoundError`` family, ``TaskError``), never another."""

from __future__ import annotations

import gzip
import io
import struct
import tempfile
from pathlib import Path

import numpy as np
from fuzzing import FUZZ, no_hang
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from edgeslim.data.fashion_mnist import _read_idx
from edgeslim.errors import DataNotFoundError, TaskError
from edgeslim.task import Task
from edgeslim.task.sources import image_folder_task, npz_task


def _idx(n: int, rows: int = 2, cols: int = 2) -> bytes:
    return struct.pack(">IIII", 0x0803, n, rows, cols) + bytes(range(n * rows * cols))


@st.composite
def damaged(draw: st.DrawFn, good: bytes) -> bytes:
    """``good`` with a few bytes overwritten and/or cut short."""
    data = bytearray(good)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@FUZZ
@given(
    data=st.binary(max_size=80)
    | st.builds(lambda n, tail: _idx(n)[: 16 + tail], st.integers(0, 5), st.integers(-16, 30)),
    gz=st.booleans(),
)
def test_idx_bytes_give_a_tensor_or_a_data_error(data: bytes, gz: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("x-idx3-ubyte.gz" if gz else "x-idx3-ubyte")
        path.write_bytes(gzip.compress(data) if gz else data)
        with no_hang():
            try:
                t = _read_idx(path)
            except DataNotFoundError as exc:
                assert str(path) in str(exc)
                return
    assert t.numel() > 0 and t.shape[0] == struct.unpack(">I", data[4:8])[0]


@FUZZ
@given(data=damaged(gzip.compress(_idx(4))))
def test_damaged_gzip_idx_is_a_corrupt_file_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t10k-images-idx3-ubyte.gz"
        path.write_bytes(data)
        with no_hang():
            try:
                _read_idx(path)
            except DataNotFoundError as exc:
                assert "truncated or corrupt" in str(exc)


DTYPES = st.sampled_from(
    ["<f4", "<f8", ">f4", "<f2", "<i8", "<i4", "|u1", "<u2", "|b1", "<c8", "<U2", "|S2", "<M8[s]"]
)
ARRAYS = hnp.arrays(
    dtype=DTYPES.map(np.dtype),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


GOOD_NPZ = _npz_bytes({"x": np.ones((6, 3), np.float32), "y": np.arange(6)})


@FUZZ
@given(
    data=st.binary(max_size=120)
    | st.dictionaries(
        st.sampled_from(["x", "x0", "x1", "y", "batch_dims", "z"]), ARRAYS, max_size=4
    ).map(_npz_bytes)
    | damaged(GOOD_NPZ)
)
def test_npz_bytes_give_a_task_or_a_task_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        path.write_bytes(data)
        with no_hang():
            try:
                task = npz_task(path, batch_size=4)
            except TaskError as exc:
                assert "d.npz" in str(exc)
                return
            assert isinstance(task, Task)
            for _ in task.calibration:  # the batches it promises can be drawn
                pass


def _image_bytes(kind: str, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, format=kind)
    return buf.getvalue()


@st.composite
def image_files(draw: st.DrawFn) -> bytes:
    mode = draw(st.sampled_from(["noise", "good", "damaged"]))
    if mode == "noise":
        return draw(st.binary(max_size=100))
    kind = draw(st.sampled_from(["PNG", "JPEG", "BMP", "WEBP"]))
    good = _image_bytes(kind, draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    return good if mode == "good" else draw(damaged(good))


@FUZZ
@given(
    files=st.lists(
        st.tuples(
            st.sampled_from(["", "a/", "b/", "1/"]),
            st.sampled_from([".png", ".jpg", ".bmp", ".webp", ".txt"]),
            image_files(),
        ),
        max_size=5,
    )
)
def test_image_folder_gives_a_task_or_a_task_error(files: list[tuple[str, str, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imgs"
        root.mkdir()
        for i, (sub, suffix, data) in enumerate(files):
            path = root / f"{sub}{i}{suffix}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
        with no_hang():
            try:
                task = image_folder_task(root, size=8, resize=10, batch_size=2)
            except TaskError as exc:
                assert str(root) in str(exc)
                return
        assert isinstance(task, Task) and task.example_inputs[0].shape == (1, 3, 8, 8)
