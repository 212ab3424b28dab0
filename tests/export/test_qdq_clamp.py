"""A clamp at 0 after a conv folds into the quantizer like a ReLU: no float pass left."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx as fx
from torch import nn

from edgeslim.graph.ops import clamp_bounds

F = nn.functional
ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "x.clamp(0, 6)": lambda x: x.clamp(0, 6),
    "x.clamp(min=0)": lambda x: x.clamp(min=0),
    "torch.clamp(x, 0.0, 6.0)": lambda x: torch.clamp(x, 0.0, 6.0),
    "F.hardtanh(x, 0, 6)": lambda x: F.hardtanh(x, 0.0, 6.0),
    "nn.Hardtanh(0, 6)": nn.Hardtanh(0.0, 6.0),
}


class _Net(nn.Module):
    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


def test_clamp_bounds_reads_every_spelling() -> None:
    gm = fx.symbolic_trace(_Net(ACTS["x.clamp(min=0)"]))
    found = [clamp_bounds(gm, n) for n in gm.graph.nodes if n.op != "placeholder"]
    assert (0.0, None) in found and found.count(None) == 3  # the convs and the output
    gm = fx.symbolic_trace(_Net(ACTS["nn.Hardtanh(0, 6)"]))
    assert (0.0, 6.0) in [clamp_bounds(gm, n) for n in gm.graph.nodes]


@pytest.mark.parametrize("name", list(ACTS))
def test_a_clamp_at_zero_after_a_conv_leaves_no_float_op(
    name: str, int8: Any, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    data = torch.randn(32, 3, 10, 10) * 2
    _, ops = int8.export(int8.quantize(_Net(ACTS[name]), data), data, tmp_path)
    assert ops.count("QLinearConv") == 2 and "Clip" not in ops, ops
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops
