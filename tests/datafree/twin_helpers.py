"""Twin networks for the data-free tests: a network whose convs have a size-1 axis (a 2-D
net on ``(N, C, 1, L)``, a 3-D one on ``(N, C, 1, H, W)`` with ``(1, kh, kw)`` kernels)
computes what its twin of other dimension computes, so every method must rewrite both
the same way, weight for weight."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgeslim.datafree import DataFreeSpec, compress_datafree, quantized_model

Tensor = torch.Tensor


def trained_looking(net: nn.Module) -> nn.Module:
    """``net`` with BatchNorm statistics and affines drawn away from the defaults."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.2, 2.0)
            nn.init.uniform_(m.weight, 0.3, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.5)
    return net


def load_twin(net: nn.Module, twin: nn.Module, to_twin: Callable[[Tensor], Tensor]) -> None:
    """``twin`` takes ``net``'s state, each tensor mapped by ``to_twin``."""
    twin.load_state_dict({k: to_twin(v) for k, v in net.state_dict().items()})


def assert_rewritten_alike(
    net: nn.Module, twin: nn.Module, x: Tensor, x_twin: Tensor,
    to_twin: Callable[[Tensor], Tensor], method: str, low: int, high: int,
    changed: set[str],
) -> None:  # fmt: skip
    """``method`` at ``low``/``high`` bits gives ``net`` and ``twin`` the same bits and the
    same weights (through ``to_twin``), acts on the layers ``changed``, and their int8
    models compute the same on ``x`` and ``x_twin``."""
    spec = DataFreeSpec(low_bits=low, high_bits=high)
    r1 = compress_datafree(net, method, spec, x[:1])
    r2 = compress_datafree(twin, method, spec, x_twin[:1])
    assert r1.weight_bits == r2.weight_bits
    assert min(r1.weight_bits.values()) == low  # the convs take the low bits
    assert changed <= set(r1.report.changed)  # the method acted on them
    s1, s2 = r1.model.state_dict(), r2.model.state_dict()
    assert s1.keys() == s2.keys()
    for key, v in s1.items():
        torch.testing.assert_close(to_twin(v), s2[key], atol=1e-5, rtol=1e-5, msg=key)
    q1 = quantized_model(r1, act_bits=8, act_ranges="statistics")
    q2 = quantized_model(r2, act_bits=8, act_ranges="statistics")
    with torch.no_grad():
        torch.testing.assert_close(q1(x), q2(x_twin), atol=1e-4, rtol=1e-4)
