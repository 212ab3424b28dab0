"""Data-free methods on convs of every dimension, checked against twins.

A network's *lift* has one more spatial axis, of size 1, with kernels ``(1, *k)``: a 1-D
network (audio, sensor signals) lifted is a 2-D one on ``(N, C, 1, L)``, a 2-D network
lifted a 3-D (video) one on ``(N, C, 1, H, W)``. The two compute the same function, so
every method must rewrite both the same way, weight for weight, and act on both (not skip
the layers of either dimension)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.datafree import DataFreeSpec, compress_datafree, quantized_model

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
GLOBAL_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
SIZE = {1: (64,), 2: (16, 16)}  # input spatial size of each network's dimension


def _net(dims: int, lifted: bool) -> nn.Sequential:
    n = dims + lifted
    conv, bn = CONV[n], BN[n]

    def k(size: int) -> tuple[int, ...]:  # a kernel (or padding, pooling) on every axis
        return (1,) * lifted + (size,) * dims

    def p(size: int) -> tuple[int, ...]:
        return (0,) * lifted + (size,) * dims

    return nn.Sequential(
        conv(2, 8, k(3), padding=p(1)), bn(8), nn.ReLU(), MAX_POOL[n](k(2)),
        conv(8, 16, k(3), padding=p(1)), bn(16), nn.ReLU(),
        conv(16, 16, k(3), padding=p(1), groups=16), bn(16), nn.ReLU(),
        conv(16, 24, k(1)), bn(24), nn.ReLU(),
        GLOBAL_POOL[n](1), nn.Flatten(), nn.Linear(24, 4),
    )  # fmt: skip


def _lift(v: torch.Tensor) -> torch.Tensor:  # a conv weight as its lift's (others unchanged)
    return v.unsqueeze(2) if v.dim() >= 3 else v


def _twins(dims: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = _net(dims, lifted=False)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # trained-looking statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.2, 2.0)
            nn.init.uniform_(m.weight, 0.3, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.5)
    lift = _net(dims, lifted=True)
    lift.load_state_dict({k: _lift(v) for k, v in net.state_dict().items()})
    return net.eval(), lift.eval()


@pytest.mark.parametrize("dims", [1, 2])
def test_twins_compute_the_same(dims: int) -> None:
    net, lift = _twins(dims)
    x = torch.randn(3, 2, *SIZE[dims])
    torch.testing.assert_close(net(x), lift(x.unsqueeze(2)))


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize(("method", "low", "high"), [("dfq", 4, 4), ("dfmpc", 3, 8)])
def test_a_network_and_its_lift_are_rewritten_alike(
    dims: int, method: str, low: int, high: int
) -> None:
    net, lift = _twins(dims)
    x = torch.randn(16, 2, *SIZE[dims], generator=torch.Generator().manual_seed(1))
    spec = DataFreeSpec(low_bits=low, high_bits=high)
    r1 = compress_datafree(net, method, spec, x[:1])
    r2 = compress_datafree(lift, method, spec, x[:1].unsqueeze(2))
    assert r1.weight_bits == r2.weight_bits
    assert min(r1.weight_bits.values()) == low  # the convs take the low bits
    for r in (r1, r2):  # the method acted on the convs of both dimensions
        assert {"4", "7"} <= set(r.report.changed)
    s1, s2 = r1.model.state_dict(), r2.model.state_dict()
    assert s1.keys() == s2.keys()
    for key, v in s1.items():
        torch.testing.assert_close(_lift(v), s2[key], atol=1e-5, rtol=1e-5, msg=key)
    q1 = quantized_model(r1, act_bits=8, act_ranges="statistics")
    q2 = quantized_model(r2, act_bits=8, act_ranges="statistics")
    with torch.no_grad():
        torch.testing.assert_close(q1(x), q2(x.unsqueeze(2)), atol=1e-4, rtol=1e-4)
