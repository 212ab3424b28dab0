"""Feature transfer (Romero et al. 2015, FitNets' hint loss): the student's feature at each
tap, mapped by a learned adapter where its channel count differs from the teacher's (a
pruned student), regresses the teacher's feature at the matching tap (mean squared error).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.distill.adapters import channel_dim, make_adapter
from edgeslim.distill.config import FeatureConfig, tap_pairs
from edgeslim.distill.loss import DistillBatch, DistillTerm, register_term


class FeatureTerm(DistillTerm):
    """``weight * sum over taps of MSE(adapter(S), T)``; adapters are built by ``setup``."""

    name = "feature"
    needs_shapes = True

    def __init__(self, config: FeatureConfig) -> None:
        super().__init__(tap_pairs(config.taps))
        self.config = config
        self.adapters = nn.ModuleDict()  # by tap index: FQNs contain dots

    def setup(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> None:
        for i, (s, t) in enumerate(self.pairs):
            fs, ft = student[s], teacher[t]
            adapter = make_adapter(fs, ft, f"feature tap {s!r} -> {t!r}")
            differ = fs.shape[channel_dim(fs)] != ft.shape[channel_dim(ft)]
            if differ or self.config.adapter == "always":
                self.adapters[str(i)] = adapter

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        losses = []
        for i, (s, t) in enumerate(self.pairs):
            fs = batch.student_features[s]
            if str(i) in self.adapters:
                fs = self.adapters[str(i)](fs)
            losses.append(nn.functional.mse_loss(fs, batch.teacher_features[t]))
        return {"feature": self.config.weight * torch.stack(losses).sum()}


@register_term(FeatureConfig)
def _feature(config: FeatureConfig) -> DistillTerm:
    return FeatureTerm(config)
