"""DCCD (Liu, Chen & Liu, "DCCD: Reducing Neural Network Redundancy via Distillation",
IEEE TNNLS 2023): channel contrastive knowledge at the features plus dynamic difference
knowledge at the outputs. [derived]: built from the paper's description (METHODS.md), not
from its equations.

- **Channel contrast**: a learned projection (1x1 conv, or linear) maps the student's
  feature at each tap to the teacher's channels. Each channel is represented by its spatial
  map in one sample (``(N, C, H, W)``; positions for ``(N, T, C)``; for ``(N, C)`` features
  by its values across the batch), L2-normalised. For student channel ``i`` the same teacher
  channel is the positive and the teacher's other channels the negatives:
  ``-log softmax_j(<z^s_i, z^t_j> / tau)[i]`` (InfoNCE), averaged over channels and samples.
- **Dynamic difference**: a second view ``x2`` of each batch (an augmentation of the
  batch the loop gave, ``x1``); the student's output difference regresses the teacher's:
  ``MSE(S(x1) - S(x2), T(x1) - T(x2))`` on the first outputs (logits), so the student
  learns how the teacher's answer moves under small changes of the input.

The teacher sees both views in one forward (stacked on the batch); the student runs the
second view inside the loss (one extra student forward per batch, with gradients).
Combine with :class:`~edgeslim.distill.KDConfig` in the same loss for the paper's setting
(DCCD adds to response distillation, it does not replace it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgeslim.data.batching import Inputs, crop_flip
from edgeslim.distill.adapters import Adapter, make_adapter
from edgeslim.distill.config import DCCDConfig, DistillConfigError, tap_pairs
from edgeslim.distill.loss import DistillBatch, DistillTerm, ViewFn, register_term
from edgeslim.registry import Registry
from edgeslim.train.loop import class_logits

VIEWS: Registry[Callable[[DCCDConfig, torch.Generator], ViewFn]] = Registry("DCCD view")
"""How DCCD makes the second view: ``builder(config, generator) -> view(inputs)``."""


def _crop_flip_view(config: DCCDConfig, gen: torch.Generator) -> ViewFn:
    transform = crop_flip(config.pad)

    def view(inputs: Inputs) -> Inputs:
        if inputs[0].dim() != 4:
            raise DistillConfigError(
                f"DCCD view 'crop_flip' needs image inputs (N, C, H, W); the first input has "
                f"shape {list(inputs[0].shape)}: use view='noise'"
            )
        return transform(inputs, gen)

    return view


def _noise_view(config: DCCDConfig, gen: torch.Generator) -> ViewFn:
    def view(inputs: Inputs) -> Inputs:
        out = []
        for x in inputs:
            if x.is_floating_point():
                noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
                x = x + config.noise * x.detach().std() * noise
            out.append(x)
        return tuple(out)

    return view


VIEWS.register("crop_flip", _crop_flip_view)
VIEWS.register("noise", _noise_view)


def channel_vectors(feature: torch.Tensor) -> torch.Tensor:
    """``(groups, C, length)``: each channel's L2-normalised vector per sample (its spatial
    map, or its sequence), or across the batch for ``(N, C)`` features."""
    if feature.dim() == 4:
        v = feature.flatten(2)
    elif feature.dim() == 3:
        v = feature.transpose(1, 2)
    elif feature.dim() == 2:
        v = feature.t().unsqueeze(0)
    else:
        raise DistillConfigError(f"DCCD cannot contrast channels of shape {list(feature.shape)}")
    return nn.functional.normalize(v.float(), dim=2)


def channel_contrastive(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """InfoNCE over channels: student channel ``i`` against teacher channels ``j``, the
    positive ``j = i``; features of the same shape (the student's already projected)."""
    zs, zt = channel_vectors(student), channel_vectors(teacher)
    logits = zs @ zt.transpose(1, 2) / temperature  # (groups, C, C)
    c = logits.shape[-1]
    labels = torch.arange(c, device=logits.device).repeat(logits.shape[0])
    return nn.functional.cross_entropy(logits.reshape(-1, c), labels)


def dynamic_difference(
    student: torch.Tensor,
    student_view: torch.Tensor,
    teacher: torch.Tensor,
    teacher_view: torch.Tensor,
) -> torch.Tensor:
    """``MSE(S(x1) - S(x2), T(x1) - T(x2))`` of ``(samples, classes)`` logits."""
    return nn.functional.mse_loss(student - student_view, teacher - teacher_view)


class DCCDTerm(DistillTerm):
    """Channel contrast at every tap plus dynamic difference on the outputs."""

    name = "dccd"
    needs_shapes = True

    def __init__(self, config: DCCDConfig) -> None:
        super().__init__(tap_pairs(config.taps))
        self.config = config
        self.needs_view = config.difference_weight > 0
        self.projections = nn.ModuleDict()  # by tap index
        builder = VIEWS.get(config.view)  # unknown names fail here, listing the known ones
        self._view = builder(config, torch.Generator().manual_seed(config.seed))

    def setup(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> None:
        for i, (s, t) in enumerate(self.pairs):
            adapter: Adapter = make_adapter(student[s], teacher[t], f"DCCD tap {s!r} -> {t!r}")
            self.projections[str(i)] = adapter

    def view(self, inputs: Inputs) -> Inputs:
        return self._view(inputs)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        parts: dict[str, torch.Tensor] = {}
        if cfg.contrast_weight > 0:
            losses = [
                channel_contrastive(
                    self.projections[str(i)](batch.student_features[s]),
                    batch.teacher_features[t],
                    cfg.temperature,
                )
                for i, (s, t) in enumerate(self.pairs)
            ]
            parts["dccd_contrast"] = cfg.contrast_weight * torch.stack(losses).sum()
        if self.needs_view:
            assert batch.student_out_view is not None and batch.teacher_out_view is not None
            diff = dynamic_difference(
                class_logits(batch.student_out),
                class_logits(batch.student_out_view),
                class_logits(batch.teacher_out),
                class_logits(batch.teacher_out_view),
            )
            parts["dccd_difference"] = cfg.difference_weight * diff
        return parts


@register_term(DCCDConfig)
def _dccd(config: DCCDConfig) -> DistillTerm:
    return DCCDTerm(config)
