"""Data-free methods on 1-D convs (audio, sensor signals): a ``Conv1d`` network is checked
against its ``Conv2d`` twin, whose kernels are one row ``(1, k)`` on ``(N, C, 1, L)``
inputs. The two compute the same function, so every method must rewrite both the same
way, weight for weight; and on the 1-D network it must act (not skip the layers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.datafree import DataFreeSpec, compress_datafree, quantized_model


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


def _twins() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    one = _net(False)
    for m in one.modules():
        if isinstance(m, nn.BatchNorm1d):  # trained-looking statistics, not the defaults
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.2, 2.0)
            nn.init.uniform_(m.weight, 0.3, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.5)
    two = _net(True)
    state = {k: v.unsqueeze(2) if v.dim() == 3 else v for k, v in one.state_dict().items()}
    two.load_state_dict(state)
    return one.eval(), two.eval()


def test_twins_compute_the_same() -> None:
    one, two = _twins()
    x = torch.randn(3, 2, 64)
    torch.testing.assert_close(one(x), two(x.unsqueeze(2)))


@pytest.mark.parametrize(("method", "low", "high"), [("dfq", 4, 4), ("dfmpc", 3, 8)])
def test_a_1d_network_is_rewritten_as_its_2d_twin(method: str, low: int, high: int) -> None:
    one, two = _twins()
    x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(1))
    spec = DataFreeSpec(low_bits=low, high_bits=high)
    r1 = compress_datafree(one, method, spec, x[:1])
    r2 = compress_datafree(two, method, spec, x[:1].unsqueeze(2))
    assert r1.weight_bits == r2.weight_bits
    assert min(r1.weight_bits.values()) == low  # the 1-D convs take the low bits
    assert {"4", "7"} <= set(r1.report.changed)  # the methods acted on the 1-D convs
    s1, s2 = r1.model.state_dict(), r2.model.state_dict()
    assert s1.keys() == s2.keys()
    for key, v in s1.items():
        w = s2[key].squeeze(2) if v.dim() == 3 else s2[key]
        torch.testing.assert_close(v, w, atol=1e-5, rtol=1e-5, msg=key)
    q1 = quantized_model(r1, act_bits=8, act_ranges="statistics")
    q2 = quantized_model(r2, act_bits=8, act_ranges="statistics")
    with torch.no_grad():
        torch.testing.assert_close(q1(x), q2(x.unsqueeze(2)), atol=1e-4, rtol=1e-4)
