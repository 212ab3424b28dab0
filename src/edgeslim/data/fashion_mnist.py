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
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

from edgeslim.errors import DataCorruptError, DataNotFoundError

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


def _env_dir(env: str, stems: list[str]) -> Path:
    """The folder ``$EDGESLIM_DATA`` names; an error (never a silent fallback to the system
    copy) when it is missing or lacks the files, since the user asked for that copy."""
    base = Path(env).expanduser()
    if not base.is_dir():
        what = "is a file, not a folder" if base.exists() else "does not exist"
        raise DataNotFoundError(
            f"{ENV_VAR}={env} {what}. Point {ENV_VAR} at the folder holding the Fashion-MNIST "
            f"files, or unset it to use the system copy. {INSTALL_HINT}"
        )
    for directory in (base, base / "fashion-mnist"):
        if all(_find(directory, s) is not None for s in stems):
            return directory
    missing = [s for s in stems if _find(base, s) is None]
    raise DataNotFoundError(
        f"{ENV_VAR}={env} is set but the folder {base} (or {base / 'fashion-mnist'}) lacks "
        f"{', '.join(m + '[.gz]' for m in missing)}. Put the four files there, or unset "
        f"{ENV_VAR} to use the system copy. {INSTALL_HINT}"
    )


def fashion_mnist_dir() -> Path:
    """The directory that holds the four IDX files, or a :class:`DataNotFoundError`."""
    stems = [s for pair in _FILES.values() for s in pair]
    env = os.environ.get(ENV_VAR)
    if env:
        return _env_dir(env, stems)
    if all(_find(DEBIAN_DIR, s) is not None for s in stems):
        return DEBIAN_DIR
    raise DataNotFoundError(
        f"Fashion-MNIST was not found (looked in: {DEBIAN_DIR}; {ENV_VAR} is not set). "
        f"{INSTALL_HINT}"
    )


def _corrupt(path: Path, why: str) -> DataCorruptError:
    return DataCorruptError(
        f"{path} is truncated or corrupt ({why}). Reinstall it: `sudo apt-get install "
        f"--reinstall dataset-fashion-mnist` for the system copy, or copy the file again into "
        f"the folder {ENV_VAR} names. {INSTALL_HINT}"
    )


def _read_bytes(path: Path) -> bytes:
    """The file's (decompressed) bytes; a truncated or damaged gzip stream is a
    :class:`DataCorruptError` naming the file, not an ``EOFError`` (which the command line
    would show as "Aborted.") or a zlib traceback."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except EOFError:
        raise _corrupt(path, "the gzip stream ends early") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise _corrupt(path, f"gzip: {exc}") from None
    except OSError as exc:
        raise _corrupt(path, f"cannot be read: {exc.strerror or exc}") from None


def _read_idx(path: Path) -> torch.Tensor:
    data = _read_bytes(path)
    if len(data) < 8:
        raise _corrupt(path, f"only {len(data)} bytes")
    magic, count = struct.unpack(">II", data[:8])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise _corrupt(path, "not an unsigned-byte IDX file of 1 or 3 dimensions")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise _corrupt(path, f"the header needs {offset} bytes, the file has {len(data)}")
    dims = [count, *struct.unpack(f">{ndim - 1}I", data[8:offset])]
    expected = 1
    for d in dims:
        expected *= d
    if len(data) - offset != expected:
        raise _corrupt(path, f"{len(data) - offset} data bytes where the header says {expected}")
    if expected == 0:  # torch.frombuffer refuses an empty buffer
        raise _corrupt(path, f"the header says {dims}: no samples")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(dims)


@lru_cache(maxsize=4)
def _raw(part: Literal["train", "test"], directory: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_stem, lbl_stem = _FILES[part]
    d = Path(directory)
    img_path, lbl_path = _find(d, img_stem), _find(d, lbl_stem)
    assert img_path is not None and lbl_path is not None
    images, labels = _read_idx(img_path), _read_idx(lbl_path)
    if images.shape[0] != labels.shape[0]:
        raise DataCorruptError(
            f"Fashion-MNIST {part} images ({images.shape[0]}) and labels ({labels.shape[0]}) "
            f"differ in count in {d}; a file was replaced or is damaged. {INSTALL_HINT}"
        )
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
