"""Choosing a fine-tune's epoch on training samples it does not train on.

A short fine-tune on a few hundred samples can overfit, and a model that already agrees
with its reference (a pruned model refitted by least squares) can come out of it worse.
Only samples the fine-tune never sees show that, and the task's validation data is what
the result is measured on, so it must not choose. :func:`hold_out` sets every n-th training
sample aside; ``train_classifier(..., val=held, keep_best=True)`` then ends on the best
epoch, the model before training included.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgeslim.data.batching import TensorBatches, as_batch
from edgeslim.errors import TaskError
from edgeslim.train.loop import first_output, top1_predictions

if TYPE_CHECKING:
    from edgeslim.task import Task


def hold_out(
    train: Iterable[Any],
    every: int,
    teacher: nn.Module | None = None,
    class_axis: int | None = None,
) -> tuple[TensorBatches, TensorBatches]:
    """``(batches to train on, held batches)``: every ``every``-th sample of in-memory
    ``train`` held out (:meth:`TensorBatches.split`) with its label, or, when the data has
    none, labelled by ``teacher``'s top-1 (over ``class_axis`` when given: a conv's
    per-frame ``(N, C, T)`` scores give ``(N, T)`` labels, which top-1 reads per frame), so
    that top-1 on them is agreement with it."""
    if not isinstance(train, TensorBatches):
        raise TaskError(
            f"holding every {every}-th training sample out needs the training data in memory "
            f"({type(train).__name__} given: a DataLoader or a generator cannot be split); "
            "build the task from tensors, a folder or an .npz, or do without the selection"
        )
    kept, held = train.split(every)
    if held.target is not None:
        return kept, held
    if teacher is None:
        raise TaskError(
            "the held-out training samples have no labels: choosing the epoch on them scores "
            "agreement with the reference model, which is then needed as teacher"
        )
    batches = [as_batch(item)[0] for item in held]
    with torch.no_grad():
        outs = [teacher.eval()(*x) for x in batches]
        labels = torch.cat([top1_predictions(o) if class_axis is None
                            else first_output(o).argmax(class_axis) for o in outs])  # fmt: skip
    inputs = tuple(torch.cat([b[i] for b in batches], dim=d) for i, d in enumerate(held.batch_dims))
    return kept, TensorBatches(inputs, labels, held.batch_size, batch_dims=held.batch_dims)


def held_out_for_stage(
    train: Iterable[Any], every: int, teacher: nn.Module | None, task: Task
) -> tuple[TensorBatches, TensorBatches]:
    """:func:`hold_out` for a recipe stage's ``select_every`` (on the task's class axis),
    refusing a task whose outputs are values (the epoch is chosen by top-1)."""
    if task.headline == "cosine":
        raise TaskError(
            f"select_every chooses the epoch by top-1, but task {task.name!r} has value "
            "outputs (its metric is cosine); set select_every: 0"
        )
    return hold_out(train, every, teacher, task.chosen_class_axis)


def held_score_name(train: Iterable[Any]) -> str:
    """What top-1 on :func:`hold_out`'s held batches is: ``val_top1`` when ``train`` has
    labels, else ``val_agreement`` (the held samples are labelled by the teacher)."""
    labelled = isinstance(train, TensorBatches) and train.target is not None
    return "val_top1" if labelled else "val_agreement"


def kept_note(
    history: list[dict[str, float]], held: TensorBatches | None, name: str = "val_top1"
) -> str:
    """``"; kept epoch 3 (...)"`` for a stage's note, or ``""`` without a selection;
    ``name`` from :func:`held_score_name`."""
    if held is None or not history:
        return ""
    last = history[-1]
    best = int(last["best_epoch"])
    score = max([last["val_top1_start"], *(h["val_top1"] for h in history)])
    what = "the model before training" if best == 0 else f"epoch {best}"
    return (
        f"; kept {what} ({score:.2f}% {'agreement' if name == 'val_agreement' else 'top-1'} "
        f"on {held.num_samples} held-out training samples, "
        f"{last['val_top1_start']:.2f}% before training)"
    )
