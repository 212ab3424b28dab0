"""Attention transfer (Zagoruyko & Komodakis 2017): the student learns *where* the teacher's
features are active. A feature ``F`` (N, C, H, W) gives the map ``Q = mean_c |F_c|^p``
flattened and L2-normalised per sample; the loss is the squared distance between the
student's and the teacher's maps, batch mean, summed over taps.

The paper writes the distance as a p-norm; the squared distance used here is smooth at the
optimum (the norm's gradient does not vanish there). Channel counts may differ; spatial
sizes too (the larger map is average-pooled to the smaller), so no adapter is needed.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.distill.config import AttentionConfig, DistillConfigError, tap_pairs
from edgeslim.distill.loss import DistillBatch, DistillTerm, register_term


def attention_map(
    feature: torch.Tensor, p: float = 2.0, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """The normalised spatial attention map ``(N, positions)`` of an ``(N, C, H, W)`` (or
    ``(N, T, C)``) feature, average-pooled to ``size`` (H, W) first when given."""
    if feature.dim() == 4:
        q = feature.abs().pow(p).mean(1)
        if size is not None and tuple(q.shape[1:]) != tuple(size):
            q = nn.functional.adaptive_avg_pool2d(q.unsqueeze(1), size).squeeze(1)
    elif feature.dim() == 3:
        q = feature.abs().pow(p).mean(2)
    else:
        raise DistillConfigError(
            f"attention transfer needs a feature with positions, (N, C, H, W) or (N, T, C); "
            f"got shape {list(feature.shape)}"
        )
    return nn.functional.normalize(q.flatten(1), dim=1)


def attention_distance(
    student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0
) -> torch.Tensor:
    """Batch mean of ``||Q_s - Q_t||^2`` between the two features' attention maps."""
    size: tuple[int, int] | None = None
    if student.dim() == 4 and teacher.dim() == 4:
        size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
    elif student.shape[1:-1] != teacher.shape[1:-1] or student.dim() != teacher.dim():
        raise DistillConfigError(
            f"attention maps of shapes {list(student.shape)} and {list(teacher.shape)} "
            "cannot be compared: tap layers with the same positions"
        )
    qs, qt = attention_map(student, p, size), attention_map(teacher, p, size)
    return (qs - qt).square().sum(1).mean()


class AttentionTerm(DistillTerm):
    """``weight * sum over taps of attention_distance(S, T)``."""

    name = "attention"

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(tap_pairs(config.taps))
        self.config = config

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        losses = [
            attention_distance(batch.student_features[s], batch.teacher_features[t], self.config.p)
            for s, t in self.pairs
        ]
        return {"attention": self.config.weight * torch.stack(losses).sum()}


@register_term(AttentionConfig)
def _attention(config: AttentionConfig) -> DistillTerm:
    return AttentionTerm(config)
