"""SmoothQuant and dynamic (per-tensor / per-token) activation quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.quant import QuantConfig, QuantConfigError, QuantSpec, quantize_, w8a8_dynamic
from edgeslim.quant.modules import QuantLinear
from edgeslim.quant.smooth import smooth_


class Block(nn.Module):
    """Two linears reading one tensor (like query/key/value) and one reading another."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.q = nn.Linear(16, 8)
        self.k = nn.Linear(16, 8)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.out(torch.cat([self.q(h), self.k(h)], -1))


def _data(outlier: float = 40.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 10, 16, generator=g) for _ in range(3)]
    return batches


def _model(outlier: float = 40.0) -> Block:
    torch.manual_seed(0)
    m = Block().eval()
    with torch.no_grad():  # an outlier channel, as BERT LayerNorm outputs have
        m.norm.weight[3] = outlier
    return m


def test_smoothing_preserves_float_output_and_groups_shared_inputs() -> None:
    m = _model()
    quantize_(m, w8a8_dynamic())
    x = _data()[0]
    for layer in m.modules():
        if isinstance(layer, QuantLinear):
            layer.mode = "float"
            assert layer.input_quant is not None
            layer.input_quant.mode = "float"
    before = m(x)
    scales = smooth_(m, _data(), alpha=0.5)
    assert torch.allclose(m(x), before, atol=1e-4, rtol=1e-4)
    assert torch.equal(scales["q"], scales["k"])  # one divisor for a shared input
    assert not torch.equal(scales["q"][:8], scales["out"][:8])
    assert scales["q"][3] > 2 * scales["q"].median()  # the outlier channel is divided most
    with pytest.raises(ValueError, match="already smoothed"):
        smooth_(m, _data())


class _Recycled(nn.Module):
    """Two linears fed two different temporaries of one shape: the first is freed before
    the second exists, so the allocator may hand the second the first one's address."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(torch.relu(x))  # relu(x) is freed once `a` has read it
        return y + self.b(torch.tanh(x))


def test_layers_fed_different_tensors_never_share_a_divisor() -> None:
    """Grouping by address alone merged them whenever the address was recycled (the
    MiniLM W8A8 result then depended on the process)."""
    from edgeslim.quant.smooth import input_absmax

    torch.manual_seed(0)
    m = _Recycled().eval()
    quantize_(m, w8a8_dynamic())
    layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    for _ in range(5):  # each call a new chance (before the fix, 4 of 5 merged them)
        _, groups = input_absmax(m, [torch.randn(32, 64)], layers)
        assert sorted(groups) == [["a"], ["b"]]


def test_smoothing_lowers_w8a8_error_with_an_outlier_channel() -> None:
    x = torch.cat(_data())
    ref = _model()(x)
    plain, smooth = _model(), _model()
    quantize_(plain, w8a8_dynamic())
    quantize_(smooth, w8a8_dynamic())
    smooth_(smooth, _data(), alpha=0.6)
    err_plain = (plain(x) - ref).pow(2).mean()
    err_smooth = (smooth(x) - ref).pow(2).mean()
    assert err_smooth < 0.5 * err_plain


def test_dynamic_ranges_follow_each_tensor() -> None:
    m = _model(outlier=1.0)
    quantize_(m, QuantConfig(None, w8a8_dynamic(per_token=True).activation))
    x = _data()[0]
    x[0, 0] *= 100  # one loud token must not coarsen the others' grid
    layer = m.q
    assert isinstance(layer, QuantLinear) and layer.input_quant is not None
    xq = layer.input_quant(x)
    q = layer.input_quant.quantizer
    assert q.scale.numel() == 40  # one range per token
    quiet = (xq[1:] - x[1:]).abs().max()
    assert quiet <= x[1:].abs().amax(-1).max() / 127 / 2 + 1e-6
    per_tensor = QuantConfig(None, w8a8_dynamic().activation)
    m2 = _model(outlier=1.0)
    quantize_(m2, per_tensor)
    assert isinstance(m2.q, QuantLinear) and m2.q.input_quant is not None
    coarse = (m2.q.input_quant(x)[1:] - x[1:]).abs().max()
    assert coarse > 5 * quiet


def test_dynamic_observer_refuses_learned_ranges() -> None:
    with pytest.raises(QuantConfigError, match="dynamic"):
        QuantSpec(bits=8, observer="dynamic", estimator="lsq")
