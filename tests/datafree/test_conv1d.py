"""Data-free methods on 1-D convs (audio, sensor signals): a ``Conv1d`` network is checked
against its ``Conv2d`` twin, whose kernels are one row ``(1, k)`` on ``(N, C, 1, L)``
inputs. The two compute the same function, so every method must rewrite both the same
way, weight for weight; and on the 1-D network it must act (not skip the layers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from twin_helpers import assert_rewritten_alike, load_twin, trained_looking


def _net(two_d: bool) -> nn.Sequential:
    conv = nn.Conv2d if two_d else nn.Conv1d
    bn = nn.BatchNorm2d if two_d else nn.BatchNorm1d

    def k(n: int) -> int | tuple[int, int]:  # a kernel size
        return (1, n) if two_d else n

    def p(n: int) -> int | tuple[int, int]:  # a padding
        return (0, n) if two_d else n

    return nn.Sequential(
        conv(2, 8, k(5), padding=p(2)), bn(8), nn.ReLU(),
        nn.MaxPool2d((1, 2)) if two_d else nn.MaxPool1d(2),
        conv(8, 16, k(3), padding=p(1)), bn(16), nn.ReLU(),
        conv(16, 16, k(3), padding=p(1), groups=16), bn(16), nn.ReLU(),
        conv(16, 24, k(1)), bn(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1) if two_d else nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        nn.Linear(24, 4),
    )  # fmt: skip


def _up(v: torch.Tensor) -> torch.Tensor:  # a 1-D conv's weight as its 2-D twin's
    return v.unsqueeze(2) if v.dim() == 3 else v


def _twins() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    one = trained_looking(_net(False))
    two = _net(True)
    load_twin(one, two, _up)
    return one.eval(), two.eval()


def test_twins_compute_the_same() -> None:
    one, two = _twins()
    x = torch.randn(3, 2, 64)
    torch.testing.assert_close(one(x), two(x.unsqueeze(2)))


@pytest.mark.parametrize(("method", "low", "high"), [("dfq", 4, 4), ("dfmpc", 3, 8)])
def test_a_1d_network_is_rewritten_as_its_2d_twin(method: str, low: int, high: int) -> None:
    one, two = _twins()
    x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(1))
    assert_rewritten_alike(one, two, x, x.unsqueeze(2), _up, method, low, high, {"4", "7"})
