"""Feature-pyramid necks: nearest upsampling and concatenation run on integers.

Nearest upsampling copies values, so one quantizer serves on both sides of it and ONNX
Runtime runs the ``Resize`` on uint8; a concatenation gets every operand quantized so that it
runs as ``QLinearConcat``. Bilinear upsampling averages: it stays a float ``Resize``
between quantizers, and the result still matches the torch simulation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class _Neck(nn.Module):
    """A coarse branch upsampled and concatenated with a fine one, then a conv."""

    def __init__(self, mode: str, module: bool) -> None:
        super().__init__()
        self.coarse = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fine = nn.Conv2d(3, 8, 3, padding=1)
        self.fuse = nn.Conv2d(16, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode=mode) if module else None
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.relu(self.coarse(x))
        c = self.up(c) if self.up is not None else F.interpolate(c, scale_factor=2, mode=self.mode)
        return self.fuse(torch.cat([c, torch.relu(self.fine(x))], dim=1))


@pytest.mark.parametrize("module", [False, True], ids=["F.interpolate", "nn.Upsample"])
def test_nearest_upsample_and_concat_run_on_integers(
    module: bool, int8: Any, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    data = torch.randn(32, 3, 12, 12)
    _, ops = int8.export(int8.quantize(_Neck("nearest", module), data), data, tmp_path)
    assert "QLinearConcat" in ops and ops.count("Resize") == 1, ops
    assert ops.count("DequantizeLinear") == 1, ops  # the output's alone: Resize runs on uint8


def test_bilinear_upsample_stays_float_and_agrees(int8: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = torch.randn(32, 3, 12, 12)
    _, ops = int8.export(int8.quantize(_Neck("bilinear", True), data), data, tmp_path)
    assert "QLinearConcat" in ops and ops.count("QLinearConv") == 3, ops
    assert ops.count("DequantizeLinear") == 2, ops  # before the float Resize, and the output
