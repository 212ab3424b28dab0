"""Fine-tuning after pruning, optionally distilled from the unpruned model.

Pruning removes whole channels, so the next layers see inputs they were not trained on;
a short fine-tune repairs most of that. Distillation helps most when the fine-tune is short
and the data small: the unpruned model's soft targets carry the dark knowledge a few
thousand labels cannot (Hinton et al. 2015; Torch-Pruning's and NNCF's recipes do the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import Batch
from edgeslim.train.distill import kd_loss
from edgeslim.train.loop import LossFn, TrainConfig, train_classifier


def finetune_pruned(
    model: nn.Module,
    train: Iterable[Batch],
    config: TrainConfig,
    teacher: nn.Module | None = None,
    alpha: float = 0.9,
    temperature: float = 4.0,
    val: Iterable[Batch] | None = None,
    description: str = "finetune",
    hard_loss: Callable[[Any, Any], torch.Tensor] | None = None,
    loss_fn: LossFn | None = None,
    keep_best: bool = False,
    val_name: str = "val_top1",
) -> list[dict[str, float]]:
    """Train the pruned ``model`` in place on ``(inputs, target)`` batches (SGD, OneCycle,
    progress bar; see :func:`~edgeslim.train.loop.train_classifier`); returns the history.

    With ``teacher`` (the unpruned model) the loss is ``kd_loss(teacher, alpha,
    temperature)``: ``alpha`` of the temperature-softened KL to the teacher plus
    ``1 - alpha`` of cross-entropy on the labels (the KL alone where ``target`` is None);
    without, plain cross-entropy. The default leans on the teacher (resnet20 at -50% MACs,
    10k images: 92.61% at 0.9, 92.53% at 0.5). ``hard_loss(outputs, target)`` replaces
    cross-entropy (a task's own loss). ``loss_fn(outputs, target, inputs)`` replaces all of
    this (e.g. :func:`edgeslim.distill.labels_or_teacher` for outputs that are values).
    ``keep_best`` with ``val`` (held-out batches): keep the epoch ``val`` scores best, the
    pruned model before any training included (see ``train_classifier``;
    :func:`edgeslim.train.selection.hold_out` makes such batches from the training data).
    """
    if loss_fn is None:
        if teacher is not None:
            loss_fn = kd_loss(teacher, alpha, temperature, hard_loss=hard_loss)
        elif hard_loss is not None:
            hard = hard_loss
            loss_fn = lambda outputs, target, _inputs: hard(outputs, target)  # noqa: E731
    history = train_classifier(
        model,
        train,
        config,
        val=val,
        loss_fn=loss_fn,
        description=description,
        keep_best=keep_best,
        val_name=val_name,
    )
    model.eval()
    return history
