"""Quantization-aware training: fine-tune a prepared model through its estimators.

The estimators' schedules follow training progress (AQE/tanh sharpen from k=1 to k=100,
the n-BQ blend goes from latent to quantized weights), so the model ends training already
quantized. Optional knowledge distillation from the float model
(:func:`edgeslim.train.distill.kd_loss`).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from edgeslim.data.batching import Batch
from edgeslim.quant.api import set_progress
from edgeslim.train.distill import kd_loss
from edgeslim.train.loop import TrainConfig, train_classifier


def qat_train(
    model: nn.Module,
    train: Iterable[Batch],
    config: TrainConfig,
    teacher: nn.Module | None = None,
    val: Iterable[Batch] | None = None,
) -> list[dict[str, float]]:
    """Train a ``quantize_``-prepared (and calibrated) model in place on ``(inputs, target)``
    batches (see :func:`~edgeslim.train.loop.train_classifier`); returns the history.

    With ``teacher`` the loss is ``kd_loss(teacher)``, so ``target`` may be None. Ends with
    every estimator at progress 1, so evaluation sees the hard quantizer.
    """
    loss_fn = kd_loss(teacher) if teacher is not None else None
    history = train_classifier(
        model, train, config, val=val, loss_fn=loss_fn, description="qat",
        on_step=lambda p: set_progress(model, p),
    )  # fmt: skip
    set_progress(model, 1.0)
    return history
