"""Tasks from files and code: an ``.npz``, an image folder, ``module:function``; and the
resolution of the command line's ``--data`` / ``--metric`` / ``--input-shape``.

Decisions:
- **.npz**: arrays ``x`` (one input) or ``x0, x1, ...`` (several), samples along each
  input's batch dimension (array ``batch_dims``, default 0 for all), optional ``y``. The
  last 20% of the samples (at least one) are held out: with integer ``y`` the metric is
  top-1 on them, otherwise agreement with the uncompressed model on them; the rest
  calibrate and train (float ``y``: mean-squared-error loss).
- **Image folder**: ``DIR/<class>/*.jpg|png`` is labelled (class index = the folder name
  when every folder name is an integer, e.g. ImageNet's ``285/``, else the position in the
  sorted names); a flat folder of images is unlabelled (agreement). Images are resized
  (shorter side), center-cropped and normalised, ImageNet defaults. Every fifth image is
  held out for the metric.
- ``module:function`` returns a :class:`Task`; the current directory is importable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeslim.data.batching import TensorBatches
from edgeslim.data.photos import IMAGENET_MEAN, IMAGENET_STD
from edgeslim.errors import TaskError
from edgeslim.task.core import Task, normalised_range
from edgeslim.train.loop import evaluate as evaluate_top1
from edgeslim.train.loop import first_output

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _held_mask(n: int, every: int | None = None, fraction: float = 0.2) -> torch.Tensor:
    held = torch.zeros(n, dtype=torch.bool)
    if every is not None:
        held[::every] = True
    else:
        held[n - max(1, round(n * fraction)) :] = True
    if n > 1 and bool(held.all()):
        held[0] = False
    return held


def _split_task(
    name: str,
    inputs: tuple[torch.Tensor, ...],
    dims: tuple[int, ...],
    target: torch.Tensor | None,
    held: torch.Tensor,
    batch_size: int,
    description: str,
    input_ranges: tuple[tuple[float, float] | None, ...] | None = None,
) -> Task:
    """Calibration/training on the kept samples, the metric on the held ones."""
    if len(held) < 2:
        raise TaskError(f"{name}: need at least 2 samples (one to calibrate, one to measure)")
    moved = [t.movedim(d, 0) for t, d in zip(inputs, dims, strict=True)]

    def pick(mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[mask].movedim(0, d) for t, d in zip(moved, dims, strict=True))

    keep = ~held
    example = tuple(t.narrow(d, 0, 1).contiguous() for t, d in zip(inputs, dims, strict=True))
    common: dict[str, Any] = {"batch_dims": dims}
    calib = TensorBatches(pick(keep), batch_size=batch_size, **common)
    valid = TensorBatches(pick(held), batch_size=batch_size, **common)
    labelled = target is not None and not torch.is_floating_point(target)
    train = None
    loss = None
    if target is not None:
        train = TensorBatches(pick(keep), target[keep], batch_size, shuffle=True, **common)
        if not labelled:
            loss = _mse
    else:
        train = TensorBatches(pick(keep), None, batch_size, shuffle=True, pairs=True, **common)
    evaluate = None
    if labelled:
        assert target is not None
        test = TensorBatches(pick(held), target[held], batch_size, **common)
        evaluate = lambda m: evaluate_top1(m, test)  # noqa: E731
    return Task(
        example_inputs=example, batch_dims=dims, calibration=calib, train=train, loss=loss,
        evaluate=evaluate, metric="top1", validation=valid, name=name,
        description=description, input_ranges=input_ranges,
        evaluate_on_validation=evaluate is not None,  # the held samples are both
        metric_rows=int(held.sum()) if labelled else None,
    )  # fmt: skip


def _mse(outputs: Any, target: Any) -> torch.Tensor:
    return torch.nn.functional.mse_loss(first_output(outputs), target)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``; any failure to parse the user's bytes (a bad zip, a bad
    CRC, a truncated member, an .npy instead of an .npz) is a :class:`TaskError`."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile, zlib, numpy header errors: all mean a bad file
        raise TaskError(
            f"{path} is not a readable .npz file ({type(exc).__name__}: {exc}); write it with "
            "numpy.savez(path, x=inputs, y=targets)"
        ) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise TaskError(
            f"{path} holds a single array (.npy format), not an .npz archive; write it with "
            "numpy.savez(path, x=inputs, y=targets)"
        )
    try:
        with loaded as f:
            return {k: f[k] for k in f.files}
    except Exception as exc:
        raise TaskError(
            f"{path} is a damaged .npz file ({type(exc).__name__}: {exc}); write it again "
            "with numpy.savez(path, x=inputs, y=targets)"
        ) from None


def _numeric_tensor(a: np.ndarray, name: str, path: Path) -> torch.Tensor:
    """A tensor of a bool/int/float array (native byte order); other dtypes are refused."""
    if a.dtype.kind not in "biuf":
        raise TaskError(
            f"{path}: array {name!r} has dtype {a.dtype}; give numbers (float for inputs, "
            "integer class labels or float targets for y)"
        )
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise TaskError(
            f"{path}: array {name!r} holds {bad} NaN or infinite value(s) of {a.size}; "
            "inputs and targets must be finite numbers"
        )
    try:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")))
    except TypeError as exc:  # a numeric dtype torch lacks
        raise TaskError(f"{path}: array {name!r}: dtype {a.dtype} is unsupported ({exc})") from None


def _class_indices(y: torch.Tensor) -> torch.Tensor:
    """Labels as one class index per sample: a column of integers ``(N, 1)`` (a pandas or
    scikit-learn column) loses its trailing axis, and one-hot rows ``(N, C)`` of 0/1 become
    their index. Why: compared with the model's ``(N,)`` predictions a ``(N, 1)`` target
    broadcast to ``(N, N)`` and top-1 counted nonsense; one-hot float targets were taken as
    regression targets and measured by agreement. Other shapes (per-token labels) stay."""
    if y.dim() == 2 and y.shape[1] == 1 and not torch.is_floating_point(y):
        return y[:, 0]
    binary = y.dim() == 2 and y.shape[1] > 1 and bool(((y == 0) | (y == 1)).all())
    if binary and bool((y.sum(1) == 1).all()):
        return y.argmax(1)
    return y


def npz_task(path: Path, batch_size: int = 32) -> Task:
    """A task from an ``.npz`` file (see the module docstring for its layout)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not an .npz file" if path.is_dir() else "no such file"
        raise TaskError(f"--data {path}: {what}")
    arrays = _read_npz(path)
    if "x" in arrays:
        names = ["x"]
    else:
        names = []
        while f"x{len(names)}" in arrays:
            names.append(f"x{len(names)}")
    if not names:
        raise TaskError(
            f"{path} holds arrays {sorted(arrays)} but no input: name the model's input "
            "array `x` (one input) or `x0`, `x1`, ... (several inputs), samples along the "
            "batch dimension; an optional `y` holds targets"
        )
    inputs = tuple(_numeric_tensor(arrays[n], n, path) for n in names)
    inputs = tuple(t.float() if torch.is_floating_point(t) else t for t in inputs)
    raw_dims = arrays.get("batch_dims", np.zeros(len(names), dtype=int))
    if raw_dims.ndim != 1 or raw_dims.dtype.kind not in "iu" or (raw_dims < 0).any():
        raise TaskError(
            f"{path}: batch_dims must be a 1-D array of non-negative integers (one batch "
            f"dimension per input); got dtype {raw_dims.dtype} shape {list(raw_dims.shape)}"
        )
    dims = tuple(int(d) for d in raw_dims)
    if len(dims) != len(names):
        raise TaskError(f"{path}: batch_dims has {len(dims)} entries for {len(names)} inputs")
    sizes = {int(t.shape[d]) for t, d in zip(inputs, dims, strict=True) if d < t.dim()}
    if len(sizes) != 1 or any(d >= t.dim() for t, d in zip(inputs, dims, strict=True)):
        shapes = {n: list(t.shape) for n, t in zip(names, inputs, strict=True)}
        raise TaskError(
            f"{path}: the inputs {shapes} do not hold the same number of samples along their "
            f"batch dimensions {list(dims)}"
        )
    n = sizes.pop()
    if n < 2:
        raise TaskError(
            f"{path}: {n} sample(s); need at least 2 samples (one to calibrate, one to measure)"
        )
    target = None
    if "y" in arrays:
        target = _numeric_tensor(arrays["y"], "y", path)
        if target.dim() == 0:
            raise TaskError(f"{path}: y is a single value; give one target per sample")
        target = _class_indices(
            target.long() if not torch.is_floating_point(target) else target.float()
        )
        if len(target) != n:
            raise TaskError(f"{path}: y has {len(target)} samples but the inputs have {n}")
    held = _held_mask(n)
    kind = "top-1" if target is not None and not torch.is_floating_point(target) else "agreement"
    return _split_task(
        path.stem, inputs, dims, target, held, batch_size,
        f"{path.name}: {n} samples, {len(names)} input(s); {kind} on the last "
        f"{int(held.sum())}",
    )  # fmt: skip


GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)
"""A grayscale image's default normalisation: the average of ImageNet's channel statistics."""


def _visible(folder: Path) -> list[Path]:
    """Entries of ``folder`` without the hidden ones: ``.ipynb_checkpoints`` (Jupyter),
    ``._name.jpg`` (macOS), ``__MACOSX`` (a zip made on a Mac). A hidden folder taken as a
    class would shift every label after it."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX")))


def _images(folder: Path) -> list[Path]:
    return [f for f in _visible(folder) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]


def image_folder_task(
    directory: Path,
    size: int = 224,
    resize: int = 256,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 32,
    channels: int = 3,
) -> Task:
    """A task from a folder of images (labelled by sub-folder, or flat for agreement).

    ``channels`` 3 reads RGB, 1 grayscale; ``mean``/``std`` (one value per channel)
    default to ImageNet's (:data:`GRAY_MEAN`/:data:`GRAY_STD` for grayscale). A model
    trained with another normalisation needs its own: pass them here, from a
    ``module:function`` task on the command line; the task's description states the ones
    used.
    """
    from edgeslim.data.photos import image_preprocess

    root = Path(directory)
    if not root.is_dir():
        raise TaskError(f"--data {root}: no such folder")
    if channels not in (1, 3):
        raise TaskError(f"--data {root}: images are read with 1 or 3 channels; got {channels}")
    mean = tuple(mean) if mean is not None else (IMAGENET_MEAN if channels == 3 else GRAY_MEAN)
    std = tuple(std) if std is not None else (IMAGENET_STD if channels == 3 else GRAY_STD)
    if len(mean) != channels or len(std) != channels:
        raise TaskError(
            f"--data {root}: mean {list(mean)} and std {list(std)} need one value per "
            f"channel ({channels})"
        )
    classes = sorted(p for p in _visible(root) if p.is_dir())
    files: list[tuple[Path, int]] = []
    if classes:
        numeric = all(p.name.isdigit() for p in classes)
        for i, c in enumerate(classes):
            label = int(c.name) if numeric else i
            files += [(f, label) for f in _images(c)]
    else:
        files = [(f, -1) for f in _images(root)]
    if len(files) < 2:
        raise TaskError(
            f"--data {root}: found {len(files)} image(s); give a folder of at least 2 images "
            f"({', '.join(IMAGE_SUFFIXES)}), flat or in one sub-folder per class"
        )
    from PIL import Image, UnidentifiedImageError

    images = []
    for f, _ in files:
        try:
            with Image.open(f) as img:
                images.append(image_preprocess(img, size, resize, mean, std, channels))
        except (OSError, UnidentifiedImageError) as exc:
            raise TaskError(f"{f} is not a readable image: {exc}") from None
        except Exception as exc:  # Pillow decoders raise SyntaxError, ValueError, ... on bad bytes
            raise TaskError(
                f"{f} is not a readable image ({type(exc).__name__}: {exc}); remove or replace it"
            ) from None
    x = torch.stack(images)
    target = torch.tensor([lab for _, lab in files]) if classes else None
    held = _held_mask(len(files), every=5)
    kind = f"top-1 over {len(classes)} classes" if classes else "agreement"
    return _split_task(
        root.name, (x,), (0,), target, held, batch_size,
        f"{root}: {len(files)} {'grayscale ' if channels == 1 else ''}images at "
        f"{size}x{size}, normalised with mean {list(mean)} std {list(std)}; {kind} on "
        f"{int(held.sum())} held",
        (normalised_range(mean, std),),
    )  # fmt: skip


def task_from_function(spec: str) -> Task:
    """``package.module:function`` returning a :class:`Task` (the current dir importable)."""
    from edgeslim.imports import load_callable

    fn = load_callable(spec, "function() returns an edgeslim.Task", TaskError)
    try:
        task = fn()
    except Exception as exc:
        raise TaskError(f"the task function {spec} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(task, Task):
        raise TaskError(f"{spec} returned {type(task).__name__}, not an edgeslim.Task")
    return task
