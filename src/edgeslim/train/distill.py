"""Knowledge distillation (Hinton et al. 2015): learn a teacher's softened outputs.

One loss for every trainer that distils (QAT, fine-tuning after pruning, learned gates):
the KL divergence of temperature-softened first outputs, mixed with a hard loss on the
labels when the batch has them. Without labels (``target`` None) the soft term alone
trains, so unlabelled data is enough to distil.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import Inputs
from edgeslim.train.loop import LossFn, class_logits, cross_entropy


def kd_loss(
    teacher: nn.Module,
    alpha: float = 0.5,
    temperature: float = 4.0,
    hard_loss: Callable[[Any, Any], torch.Tensor] | None = None,
) -> LossFn:
    """``loss(outputs, target, inputs)``: ``alpha * soft + (1 - alpha) * hard_loss``.

    ``soft = T^2 * KL(softmax(t/T) || softmax(s/T))`` of the first outputs (batch mean; the
    ``T^2`` keeps its gradients on a hard loss's scale whatever the temperature), ``t`` from
    a frozen copy of ``teacher`` run once per batch as ``teacher(*inputs)`` without
    gradients. ``hard_loss(outputs, target)`` defaults to cross-entropy on the first output.
    With ``target`` None the loss is ``soft`` alone.
    """
    teacher = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    hard = hard_loss if hard_loss is not None else cross_entropy

    def loss(outputs: Any, target: Any, inputs: Inputs) -> torch.Tensor:
        with torch.no_grad():  # contiguous: the student's inputs may be channels_last
            t = teacher(*(x.contiguous() for x in inputs))
        kl = nn.functional.kl_div(
            nn.functional.log_softmax(class_logits(outputs) / temperature, -1),
            nn.functional.softmax(class_logits(t) / temperature, -1),
            reduction="batchmean",
        )
        if target is None:
            return temperature**2 * kl
        return alpha * temperature**2 * kl + (1 - alpha) * hard(outputs, target)

    return loss
