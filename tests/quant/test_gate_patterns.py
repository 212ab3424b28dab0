"""Hardswish / hardsigmoid / SiLU written by hand are recognised, and only those."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx as fx
from torch import nn

from edgeslim.quant.gate_patterns import normalize_gates

F = nn.functional
relu6 = nn.ReLU6()

SPELLINGS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], object]] = {
    "x*relu6(x+3)/6": (lambda x: x * F.relu6(x + 3) / 6, F.hardswish),
    "x*(relu6(x+3)/6)": (lambda x: x * (F.relu6(x + 3.0) / 6.0), F.hardswish),
    "relu6(3+x)*x*(1/6)": (lambda x: (F.relu6(3 + x) * x) * (1 / 6), F.hardswish),
    "x*clamp(x+3,0,6)/6": (lambda x: x * torch.clamp(x + 3, 0, 6) / 6, F.hardswish),
    "x*hardtanh(x+3,0,6)/6": (lambda x: x * F.hardtanh(x + 3, 0.0, 6.0) / 6, F.hardswish),
    "x*F.hardsigmoid(x)": (lambda x: x * F.hardsigmoid(x), F.hardswish),
    "relu6(x+3)/6": (lambda x: F.relu6(x + 3) / 6, F.hardsigmoid),
    "x*torch.sigmoid(x)": (lambda x: x * torch.sigmoid(x), F.silu),
    "x.sigmoid()*x": (lambda x: x.sigmoid() * x, F.silu),
    "(x+3).clamp(min=0,max=6)/6": (lambda x: (x + 3).clamp(min=0, max=6) / 6, F.hardsigmoid),
}


class _Wrap(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.conv, self.fn = nn.Conv2d(3, 8, 3, padding=1), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.conv(x) * 4)


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_each_spelling_becomes_the_function_and_computes_the_same(name: str) -> None:
    fn, target = SPELLINGS[name]
    torch.manual_seed(0)
    model = _Wrap(fn).eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        before = gm(x)
    assert normalize_gates(gm) == 1
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert target in calls and F.relu6 not in calls and torch.clamp not in calls, calls
    assert torch.sigmoid not in calls, calls
    with torch.no_grad():
        torch.testing.assert_close(gm(x), before)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x * F.relu6(x + 3) / 5,  # not 6
        lambda x: x * F.relu6(x + 2) / 6,  # not 3
        lambda x: x * torch.clamp(x + 3, 0, 5) / 6,
        lambda x: x.flip(1) * F.relu6(x + 3) / 6,  # a different tensor
        lambda x: x * torch.sigmoid(x * 2),  # a gate of another tensor (squeeze-excite)
    ],
    ids=["div5", "plus2", "clamp5", "other-tensor", "sigmoid-of-other"],
)
def test_near_misses_are_left_alone(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    gm = fx.symbolic_trace(_Wrap(fn).eval())
    assert normalize_gates(gm) == 0


def test_a_hand_written_mobilenetv3_block_runs_on_integers(int8: Any, tmp_path: Path) -> None:
    """Older MobileNetV3 code (``h_swish`` classes): the same integer graph as nn.Hardswish."""

    class HSwish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU6(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.relu(x + 3) / 6

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), HSwish(), nn.Conv2d(16, 8, 3, padding=1), HSwish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    torch.manual_seed(0)
    data = torch.randn(32, 3, 10, 10) * 3
    _, ops = int8.export(int8.quantize(model, data), data, tmp_path)
    assert not {"Mul", "Div", "Add", "HardSwish"} & set(ops), ops
    assert ops.count("QLinearMul") == 2 and ops.count("DequantizeLinear") <= 1, ops
