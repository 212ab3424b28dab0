"""Quantization-aware training: fine-tune a prepared model through its estimators.

The estimators' schedules follow training progress (AQE/tanh sharpen from k=1 to k=100,
the n-BQ blend goes from latent to quantized weights), so the model ends training already
quantized. Optional knowledge distillation from the float model (Hinton KD: KL divergence
of temperature-softened logits, mixed with cross-entropy).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from edgeslim.data.fashion_mnist import Split
from edgeslim.quant.api import set_progress
from edgeslim.train.loop import TrainConfig, train_classifier


def kd_loss(
    teacher: nn.Module, alpha: float = 0.5, temperature: float = 4.0
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``."""
    teacher = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(images.contiguous())
        soft = nn.functional.kl_div(
            nn.functional.log_softmax(logits / temperature, 1),
            nn.functional.softmax(t / temperature, 1),
            reduction="batchmean",
        )
        hard = nn.functional.cross_entropy(logits, labels)
        return alpha * temperature**2 * soft + (1 - alpha) * hard

    return loss


def qat_train(
    model: nn.Module,
    train: Split,
    config: TrainConfig,
    teacher: nn.Module | None = None,
    val: Split | None = None,
) -> list[dict[str, float]]:
    """Train a ``quantize_``-prepared (and calibrated) model in place; returns the history.

    Ends with every estimator at progress 1, so evaluation sees the hard quantizer.
    """
    loss_fn = kd_loss(teacher) if teacher is not None else None
    history = train_classifier(
        model, train, config, val=val, loss_fn=loss_fn, description="qat",
        on_step=lambda p: set_progress(model, p),
    )  # fmt: skip
    set_progress(model, 1.0)
    return history
