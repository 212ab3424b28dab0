"""Fashion-MNIST from local IDX files (Debian ``dataset-fashion-mnist`` or ``$EDGESLIM_DATA``).

Decision: edgeslim never downloads data at run time. The files come from the Debian
package (installed by ``make`` where ``apt-get`` is usable) or from a directory the user
names in ``EDGESLIM_DATA``. The validation split is carved from the training set with a
fixed permutation so that search and tuning never see the test split.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

from edgeslim.errors import DataNotFoundError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "EDGESLIM_DATA"
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
VAL_SIZE = 5000
SPLIT_SEED = 0
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

SplitName = Literal["train", "val", "test", "train_full"]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
INSTALL_HINT = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
    "`make demo` and `make test` do this for you when apt-get is usable), or put the four "
    "files train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] in a directory and set "
    f"{ENV_VAR}=that/directory."
)


@dataclass(frozen=True)
class Split:
    """Normalised images ``(N, 1, 28, 28)`` float32 and labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int) -> Split:
        """The first ``n`` samples (deterministic, for quick runs)."""
        return Split(self.images[:n], self.labels[:n])


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def fashion_mnist_dir() -> Path:
    """The directory that holds the four IDX files, or a :class:`DataNotFoundError`."""
    candidates: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        candidates += [Path(env), Path(env) / "fashion-mnist"]
    candidates.append(DEBIAN_DIR)
    stems = [s for pair in _FILES.values() for s in pair]
    for directory in candidates:
        if all(_find(directory, s) is not None for s in stems):
            return directory
    looked = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(f"Fashion-MNIST was not found (looked in: {looked}). {INSTALL_HINT}")


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise DataNotFoundError(f"{path} is truncated (only {len(data)} bytes). {INSTALL_HINT}")
    magic, count = struct.unpack(">II", data[:8])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise DataNotFoundError(f"{path} is not an unsigned-byte IDX file. {INSTALL_HINT}")
    dims = [count, *struct.unpack(f">{ndim - 1}I", data[8 : 4 + 4 * ndim])]
    offset = 4 + 4 * ndim
    expected = 1
    for d in dims:
        expected *= d
    if len(data) - offset != expected:
        raise DataNotFoundError(f"{path} is truncated or corrupt. {INSTALL_HINT}")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(dims)


@lru_cache(maxsize=4)
def _raw(part: Literal["train", "test"], directory: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_stem, lbl_stem = _FILES[part]
    d = Path(directory)
    img_path, lbl_path = _find(d, img_stem), _find(d, lbl_stem)
    assert img_path is not None and lbl_path is not None
    images, labels = _read_idx(img_path), _read_idx(lbl_path)
    if images.shape[0] != labels.shape[0]:
        raise DataNotFoundError(f"Fashion-MNIST {part} images and labels differ in count in {d}.")
    return images, labels.long()


def _val_indices(n_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[VAL_SIZE:].sort().values, perm[:VAL_SIZE].sort().values


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> normalised float32 ``(N, 1, 28, 28)``."""
    x = images_u8.float().div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return x.unsqueeze(1)


def load_fashion_mnist(split: SplitName = "test", limit: int | None = None) -> Split:
    """Load one split.

    ``train`` (55k) and ``val`` (5k) partition the official 60k training set with a fixed
    permutation; ``train_full`` is all 60k; ``test`` is the official 10k. ``limit`` keeps
    the first ``limit`` samples of the split.
    """
    if split not in ("train", "val", "test", "train_full"):
        raise ValueError(f"split must be one of train, val, test, train_full; got {split!r}")
    directory = str(fashion_mnist_dir())
    part: Literal["train", "test"] = "test" if split == "test" else "train"
    images, labels = _raw(part, directory)
    if split in ("train", "val"):
        train_idx, val_idx = _val_indices(images.shape[0])
        idx = train_idx if split == "train" else val_idx
        images, labels = images[idx], labels[idx]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return Split(normalize(images), labels.clone())
