from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from edgeslim.data import fashion_mnist as fm
from edgeslim.data import load_digits_split, load_fashion_mnist, load_sentences
from edgeslim.errors import DataCorruptError, DataNotFoundError


def test_splits_have_official_sizes_and_val_is_disjoint() -> None:
    train, val, test = (load_fashion_mnist(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.float32
    full = load_fashion_mnist("train_full")
    assert len(full) == 60000
    # train and val partition the official training set: their pixel sums add up exactly
    total = train.images.double().sum() + val.images.double().sum()
    assert torch.isclose(total, full.images.double().sum(), rtol=1e-9)
    # class balance of the val split is roughly uniform (fixed permutation, not the tail)
    counts = val.labels.bincount(minlength=10)
    assert counts.min() > 400 and counts.max() < 600


def test_normalisation_matches_published_statistics() -> None:
    train = load_fashion_mnist("train")
    assert abs(float(train.images.mean())) < 0.01
    assert abs(float(train.images.std()) - 1.0) < 0.01


def test_split_is_deterministic() -> None:
    a = load_fashion_mnist("val", limit=50)
    b = load_fashion_mnist("val", limit=50)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


def _write_idx(path: Path, data: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(data)


def test_missing_data_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("EDGESLIM_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError) as err:
        load_fashion_mnist("test")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "EDGESLIM_DATA" in msg


def test_env_dir_is_used_and_truncated_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = fm.fashion_mnist_dir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / f"{name}.gz").write_bytes((src / f"{name}.gz").read_bytes())
    with gzip.open(src / "t10k-images-idx3-ubyte.gz") as f:
        good = f.read()
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", good[: len(good) // 2])
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("EDGESLIM_DATA", str(tmp_path))
    assert fm.fashion_mnist_dir() == tmp_path
    fm._raw.cache_clear()
    with pytest.raises(DataNotFoundError, match="truncated or corrupt"):
        load_fashion_mnist("test")
    fm._raw.cache_clear()


def test_digits_and_sentences_are_real_and_fixed() -> None:
    tr, te = load_digits_split("train"), load_digits_split("test")
    assert len(tr) + len(te) == 1797 and tr.images.shape[1:] == (1, 8, 8)
    assert float(tr.images.min()) >= 0.0 and float(tr.images.max()) <= 1.0
    s = load_sentences(20)
    assert len(s) == 20 and all(len(x) >= 20 for x in s)
    assert load_sentences(20) == s
    shipped = load_sentences(source="shipped")
    assert len(shipped) >= 60
    with pytest.raises(ValueError, match="source must be"):
        load_sentences(source="web")


def _real_labels_gz() -> bytes:
    return (fm.fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").read_bytes()


def test_a_cut_gzip_file_names_the_file_and_how_to_reinstall(tmp_path: Path) -> None:
    good = _real_labels_gz()
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(good[: len(good) // 2])  # the download or copy stopped half-way
    with pytest.raises(DataCorruptError) as err:
        fm._read_idx(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} is truncated or corrupt (the gzip stream ends early)")
    assert "apt-get install --reinstall dataset-fashion-mnist" in msg and "EDGESLIM_DATA" in msg
    assert isinstance(err.value, DataNotFoundError)  # callers that catch the old type still do


def test_a_bad_crc_is_a_corrupt_file_error_not_a_traceback(tmp_path: Path) -> None:
    data = bytearray(_real_labels_gz())
    data[-6] ^= 0xFF  # inside the CRC-32 trailer: the payload decompresses, the check fails
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataCorruptError, match=r"truncated or corrupt .*CRC"):
        fm._read_idx(path)
    data = bytearray(_real_labels_gz())
    data[len(data) // 2] ^= 0x55  # inside the deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(DataCorruptError, match="truncated or corrupt"):
        fm._read_idx(path)


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_edgeslim_data_that_is_unusable_is_an_error_not_ignored(
    kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("EDGESLIM_DATA", raising=False)
    assert fm.fashion_mnist_dir() == fm.DEBIAN_DIR  # the system copy exists: no fallback to it
    target = tmp_path / "data"
    if kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("x")
    monkeypatch.setenv("EDGESLIM_DATA", str(target))
    with pytest.raises(DataNotFoundError) as err:
        fm.fashion_mnist_dir()
    msg = str(err.value)
    assert f"EDGESLIM_DATA={target}" in msg and "to use the system copy" in msg
    if kind == "empty":
        assert "lacks train-images-idx3-ubyte[.gz]" in msg
