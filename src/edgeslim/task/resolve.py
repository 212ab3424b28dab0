"""The task a command runs on: ``--data`` / ``--metric`` / ``--input-shape``, or the zoo's own.

Without ``--data``, a zoo model uses its own task (Fashion-MNIST for the zoo CNNs, sentence
embeddings for ``minilm``, natural-photo crops for ``mobilenetv2-imagenet``); a user's model
gets a :class:`~edgeslim.errors.TaskError` saying to pass ``--data``, never Fashion-MNIST by
accident.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from edgeslim.errors import TaskError
from edgeslim.task.core import Task, same_but_batch

BUILTIN_DATA = ("fashion-mnist", "digits", "minilm", "photos")
AGREEMENT_METRICS = ("agreement", "agreement_all", "top5_agreement", "cosine")


def builtin_task(name: str, quick: bool = False) -> Task:
    from edgeslim.task import builtin

    if name == "fashion-mnist":
        return builtin.fashion_mnist_task(test_limit=2000 if quick else None)
    if name == "digits":
        return builtin.digits_task()
    if name == "minilm":
        return builtin.minilm_task(n_sentences=64 if quick else 256)
    if name == "photos":
        return builtin.photos_task()
    raise TaskError(f"unknown built-in data {name!r}; allowed: {', '.join(BUILTIN_DATA)}")


def zoo_data(model_name: str) -> str | None:
    """The built-in data a zoo model is measured on (None for a user's model)."""
    from edgeslim.zoo import ZOO
    from edgeslim.zoo.pruned import is_pruned_name

    if model_name in ZOO or is_pruned_name(model_name):
        return "fashion-mnist"
    if model_name == "minilm":
        return "minilm"
    if model_name == "mobilenetv2-imagenet":
        return "photos"
    return None


def image_crop(path: Path, input_shapes: Sequence[tuple[int, ...]]) -> tuple[int, int] | None:
    """The crop side and channels an image folder is read at: ``--input-shape 1,C,S,S``
    when given (the model's input states it; C 3 for RGB, 1 for grayscale), else None
    (RGB at ImageNet's 224 after a resize to 256)."""
    if not input_shapes:
        return None
    shapes = [tuple(s) for s in input_shapes]
    if (
        len(shapes) != 1 or len(shapes[0]) != 4 or shapes[0][1] not in (1, 3)
        or shapes[0][2] != shapes[0][3]
    ):  # fmt: skip
        given = " ".join(f"--input-shape {','.join(map(str, s))}" for s in shapes)
        raise TaskError(
            f"--data {path} is a folder of images, read as square RGB or grayscale crops; "
            f"{given} is not one such input. Give --input-shape 1,3,S,S (RGB) or 1,1,S,S "
            "(grayscale), S the crop side, or an .npz holding the inputs the model takes"
        )
    return int(shapes[0][2]), int(shapes[0][1])


def load_data(spec: str, quick: bool = False, input_shapes: Sequence[tuple[int, ...]] = ()) -> Task:
    """``--data``: a built-in name, an ``.npz`` file, an image folder (read at the crop
    ``input_shapes`` give, :func:`image_crop`) or ``module:function``."""
    from edgeslim.task.sources import image_folder_task, npz_task, task_from_function

    if spec in BUILTIN_DATA:
        return builtin_task(spec, quick)
    path = Path(spec)
    if path.suffix == ".npz":
        return npz_task(path)
    if path.is_dir():
        crop = image_crop(path, input_shapes)
        if crop is None:
            return image_folder_task(path)
        side, channels = crop
        # ImageNet's evaluation ratio: shorter side to 256/224 of the crop, then the crop
        return image_folder_task(path, size=side, resize=round(side * 256 / 224), channels=channels)
    if ":" in spec and not path.exists():
        return task_from_function(spec)
    raise TaskError(
        f"--data {spec!r} is neither a built-in ({', '.join(BUILTIN_DATA)}), an .npz file, "
        "a folder of images nor `module:function` returning an edgeslim.Task"
    )


def _with_metric(task: Task, metric: str) -> Task:
    if ":" in metric:
        from edgeslim.imports import load_callable

        fn = load_callable(metric, "function(model) returns a float or a dict of floats", TaskError)
        # the user's function reads the data it chooses: not known to be the validation
        return replace(
            task, evaluate=fn, metric=metric.partition(":")[2], primary=None,
            evaluate_on_validation=False, metric_rows=None,
        )  # fmt: skip
    allowed = AGREEMENT_METRICS if task.evaluate is None else (task.metric,)
    if task.evaluate is None and metric not in AGREEMENT_METRICS:
        raise TaskError(
            f"--metric {metric!r}: this task measures agreement with the uncompressed model; "
            f"allowed names: {', '.join(allowed)} (or module:function)"
        )
    return replace(task, primary=metric)


def check_shapes(task: Task, shapes: Sequence[tuple[int, ...]]) -> None:
    """``--input-shape`` given with ``--data``: the data must have those shapes."""
    got = [tuple(t.shape) for t in task.example_inputs]
    want = [tuple(s) for s in shapes]
    if len(got) != len(want) or not all(
        same_but_batch(g, w, d) for g, w, d in zip(got, want, task.dims, strict=False)
    ):
        raise TaskError(
            f"--input-shape {[list(w) for w in want]} does not match the data's inputs "
            f"{[list(g) for g in got]} (batch dimensions aside); drop --input-shape or fix it"
        )


def resolve_task(
    model_name: str,
    data: str | None = None,
    metric: str | None = None,
    input_shapes: Sequence[tuple[int, ...]] = (),
    quick: bool = False,
    dynamic_dims: Sequence[tuple[int, ...]] = (),
) -> Task:
    """The task for a command line: ``--data`` or the zoo model's own, ``--metric`` and
    ``--dynamic-dims`` (:attr:`Task.dynamic_dims`, one per input in order) applied."""
    if data is None:
        data = zoo_data(model_name)
        if data is None:
            shapes = " ".join(f"--input-shape {','.join(map(str, s))}" for s in input_shapes)
            hint = f"; {shapes} alone only describes the inputs" if shapes else ""
            raise TaskError(
                f"{model_name} is not a zoo model, so edgeslim has no data to calibrate and "
                "measure it on. Pass --data: an .npz file (arrays x or x0, x1, ... and an "
                "optional y), a folder of images (one sub-folder per class, or flat), a "
                "built-in (" + ", ".join(BUILTIN_DATA) + ") or module:function returning an "
                f"edgeslim.Task{hint}."
            )
    task = load_data(data, quick, input_shapes)
    if input_shapes:
        check_shapes(task, input_shapes)
    task = _with_metric(task, metric) if metric else task
    return replace(task, dynamic_dims=tuple(dynamic_dims)) if dynamic_dims else task
