"""Knowledge distillation (Hinton et al. 2015): learn a teacher's softened outputs.

One loss for every trainer that distils (QAT, fine-tuning after pruning, learned gates):
the KL divergence of temperature-softened first outputs, mixed with a hard loss on the
labels when the batch has them. Without labels (``target`` None) the soft term alone
trains, so unlabelled data is enough to distil.

A model with several outputs (a classifier beside a regression head, a recurrent state)
also learns every other output's values, each by :func:`relative_mse` (part ``kd_outputs``,
weighted as the soft term), when the student's outputs match the teacher's in number and
shape (a compressed copy's do; otherwise the first alone, with a warning): the first output
is the class scores by the project's convention, and a softmax over the others would mean
nothing. Without it a second head
took no gradient from distillation and drifted under a hard loss on the first.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgeslim.distill.config import KDConfig
from edgeslim.distill.loss import DistillBatch, DistillLoss, DistillTerm, register_term
from edgeslim.task.agreement import flat_outputs
from edgeslim.train.loop import LossFn, class_logits, decision_threshold


def _two_class(scores: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """One score per sample as the logits of two classes, ``[0, s]`` (their softmax is
    ``[1 - sigmoid(s), sigmoid(s)]``); a probability is turned back into its logit."""
    s = scores.reshape(-1, 1)
    s = torch.logit(s.clamp(1e-6, 1 - 1e-6)) if probabilities else s
    return torch.cat([torch.zeros_like(s), s], -1)


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean over rows of ``(samples,
    classes)`` logits; the ``T^2`` keeps its gradients on a hard loss's scale whatever T.

    One score per sample (a binary classifier) is two classes, ``[0, s]``: a softmax over
    one value is 1, so the divergence was 0 and distillation taught nothing. Probabilities
    (every teacher score in [0, 1], :func:`~edgeslim.train.loop.decision_threshold`) are
    read back as logits first."""
    if teacher.dim() == 1 or teacher.shape[-1] == 1:
        probabilities = decision_threshold(teacher) == 0.5
        student, teacher = _two_class(student, probabilities), _two_class(teacher, probabilities)
    kl = nn.functional.kl_div(
        nn.functional.log_softmax(student / temperature, -1),
        nn.functional.softmax(teacher / temperature, -1),
        reduction="batchmean",
    )
    return temperature**2 * kl


class KDTerm(DistillTerm):
    """``alpha * soft`` with labels, ``soft`` alone without (the hard part is the loss's)."""

    name = "kd"

    def __init__(self, config: KDConfig) -> None:
        super().__init__()
        self.config = config
        self.warned = False

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        weight = self.config.alpha if batch.labelled else 1.0
        soft = soft_kl(
            class_logits(batch.student_out),
            class_logits(batch.teacher_out),
            self.config.temperature,
        )
        parts = {"kd": weight * soft}
        if not batch.teacher_rest:
            return parts
        rest = flat_outputs(batch.student_out)[1:]
        same = len(rest) == len(batch.teacher_rest) and all(
            s.shape == t.shape for s, t in zip(rest, batch.teacher_rest, strict=False)
        )
        if same:
            terms = [relative_mse(s, t) for s, t in zip(rest, batch.teacher_rest, strict=True)]
            parts["kd_outputs"] = weight * torch.stack(terms).mean()
        elif not self.warned:
            self.warned = True
            warnings.warn(
                f"kd: the student's {len(rest) + 1} outputs do not match the teacher's "
                f"{len(batch.teacher_rest) + 1} in number or shape: only the first output "
                "is distilled",
                stacklevel=2,
            )
        return parts


@register_term(KDConfig)
def _kd(config: KDConfig) -> DistillTerm:
    return KDTerm(config)


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
    With ``target`` None the loss is ``soft`` alone. The same as
    ``DistillLoss(teacher, None, [KDConfig(alpha, temperature)], hard_loss=hard_loss)``.
    """
    return DistillLoss(teacher, None, [KDConfig(alpha, temperature)], hard_loss=hard_loss)


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((s - t)^2) / mean(t^2)``: an output's error at its own scale, so no output
    dominates a sum by its units. Shapes must match (the same output of both models)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"an output of shape {tuple(student.shape)} against the teacher's "
            f"{tuple(teacher.shape)}: distillation matches each output to the same output"
        )
    t = teacher.float()
    return torch.mean((student.float() - t) ** 2) / t.pow(2).mean().clamp_min(1e-12)


def output_match_loss(teacher: nn.Module) -> LossFn:
    """``loss(outputs, target, inputs)``: the mean over every output tensor of
    ``mean((s - t)^2) / mean(t^2)``, ``t`` from a frozen copy of ``teacher`` run once per
    batch; ``target`` is ignored.

    Why: for outputs that are values, not class scores (an embedding, an image, a state),
    a softmax over the last dimension means nothing. A pruned 32x32 U-Net fine-tuned 3
    epochs on unlabelled samples kept 0.02 cosine to its original with softmax KD and 0.59
    with this loss (ad hoc, 2026-12-01). Each output is scaled by its own energy so no
    output dominates by its units."""
    frozen = copy.deepcopy(teacher).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)

    def loss(outputs: Any, target: Any, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            ref = flat_outputs(frozen(*inputs))
        got = flat_outputs(outputs)
        if len(got) != len(ref):
            raise ValueError(f"output_match_loss: {len(got)} outputs against {len(ref)}")
        return torch.stack([relative_mse(s, t) for s, t in zip(got, ref, strict=True)]).mean()

    return loss


def labels_or_teacher(
    hard_loss: Callable[[Any, Any], torch.Tensor],
    teacher: nn.Module,
    temperature: float = 4.0,
    values: bool = False,
) -> LossFn:
    """``loss(outputs, target, inputs)``: ``hard_loss`` on a labelled batch, and on a batch
    whose target is None the teacher's outputs: KD (:func:`kd_loss`'s soft term alone), or
    with ``values`` (outputs that are not class scores) :func:`output_match_loss`.

    Why: a task whose training data has no labels (an unlabelled ``.npz``, a flat image
    folder) can still fine-tune, towards the uncompressed model's outputs; labelled data
    keeps the task's own loss unchanged. The teacher is copied on the first unlabelled
    batch only."""
    soft: list[LossFn] = []

    def loss(outputs: Any, target: Any, inputs: Any) -> torch.Tensor:
        if target is not None:
            return hard_loss(outputs, target)
        if not soft:
            soft.append(
                output_match_loss(teacher)
                if values
                else kd_loss(teacher, 1.0, temperature, hard_loss=hard_loss)
            )
        return soft[0](outputs, None, inputs)

    return loss


def teacher_loss(
    hard_loss: Callable[[Any, Any], torch.Tensor],
    teacher: nn.Module,
    alpha: float,
    values: bool = False,
) -> LossFn:
    """The distillation a compression stage fine-tunes with: :func:`kd_loss` (``alpha`` of
    the teacher's softened scores, the rest ``hard_loss``), or for outputs that are values
    :func:`labels_or_teacher` matching them (a softmax would read them as class scores)."""
    if values:
        return labels_or_teacher(hard_loss, teacher, values=True)
    return kd_loss(teacher, alpha, hard_loss=hard_loss)
