"""Shape handling shared by the feature-level terms: where the channels are, and the learned
1x1 conv / linear that maps a student's channels onto a teacher's."""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.distill.config import DistillConfigError


def channel_dim(t: torch.Tensor) -> int:
    """Channels of a tapped feature: dim 1 of ``(N, C, H, W)`` and ``(N, C)``, the last of
    ``(N, T, C)`` (token sequences)."""
    if t.dim() in (2, 4):
        return 1
    if t.dim() == 3:
        return 2
    raise DistillConfigError(
        f"a tapped feature of shape {list(t.shape)} is not (N, C), (N, T, C) or (N, C, H, W)"
    )


def other_dims(t: torch.Tensor) -> tuple[int, ...]:
    """The shape without batch and channels (spatial or sequence positions)."""
    c = channel_dim(t)
    return tuple(int(s) for i, s in enumerate(t.shape) if i not in (0, c))


class Adapter(nn.Module):
    """A bias-free 1x1 conv (``(N, C, H, W)``) or linear (on the channel dim otherwise) from
    ``c_in`` to ``c_out`` channels; identity-initialised when they are equal."""

    def __init__(self, c_in: int, c_out: int, spatial: bool) -> None:
        super().__init__()
        self.map: nn.Module = (
            nn.Conv2d(c_in, c_out, 1, bias=False) if spatial else nn.Linear(c_in, c_out, bias=False)
        )
        if c_in == c_out:
            with torch.no_grad():
                w = self.map.weight
                assert isinstance(w, torch.Tensor)
                w.copy_(torch.eye(c_in).reshape(w.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.map(x)
        return out


def make_adapter(student: torch.Tensor, teacher: torch.Tensor, where: str) -> Adapter:
    """An adapter from the student's feature to the teacher's; their other dims must agree."""
    if student.dim() != teacher.dim() or other_dims(student) != other_dims(teacher):
        raise DistillConfigError(
            f"{where}: student feature {list(student.shape)} and teacher feature "
            f"{list(teacher.shape)} differ beyond the channels; tap layers at the same "
            "resolution"
        )
    return Adapter(
        student.shape[channel_dim(student)], teacher.shape[channel_dim(teacher)], student.dim() == 4
    )
