"""Zero padding before a conv ("same" padding written by hand, as EfficientNet ports do)
becomes the conv's own padding in the int8 export; other paddings stay, and agree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

PADS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "F.pad symmetric": (lambda x: F.pad(x, (1, 1, 1, 1)), True),
    "F.pad asymmetric (TF same)": (lambda x: F.pad(x, (0, 1, 0, 1)), True),
    "nn.ZeroPad2d": (nn.ZeroPad2d((2, 1, 0, 1)), True),
    "F.pad value 0.5": (lambda x: F.pad(x, (1, 1, 1, 1), value=0.5), False),
    "F.pad reflect": (lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"), False),
}


class _Net(nn.Module):
    def __init__(self, pad: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, stride=2)  # padding 0: the pad before it is its own
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.pad(torch.relu(self.a(x))))


@pytest.mark.parametrize("name", list(PADS))
def test_zero_padding_folds_into_the_conv(name: str, int8: Any, tmp_path: Path) -> None:
    pad, folds = PADS[name]
    torch.manual_seed(0)
    data = torch.randn(32, 3, 11, 11)
    written, ops = int8.export(int8.quantize(_Net(pad), data), data, tmp_path)
    assert ops.count("QLinearConv") == 2, ops
    if folds:
        assert "Pad" not in written, written
        assert ops.count("DequantizeLinear") == 1 and ops.count("QuantizeLinear") == 1, ops
    else:
        assert "Pad" in ops, ops


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_conv_with_its_own_reflect_padding_runs_on_integers(
    mode: str, int8: Any, tmp_path: Path
) -> None:
    """``Conv2d(padding_mode="reflect")`` exports as ``Pad`` + ``Conv`` (``circular`` as
    ``Slice`` + ``Concat``): the float ops between the quantizer and the conv left the
    conv in float (super-resolution nets)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1, padding_mode=mode),
    )  # fmt: skip
    data = torch.randn(32, 3, 11, 11)
    written, ops = int8.export(int8.quantize(net, data), data, tmp_path)
    moves = written.count("Concat") if mode == "circular" else written.count("Pad")
    assert moves >= 2 and ops.count("QLinearConv") == 2, ops
    assert "Conv" not in ops, ops
