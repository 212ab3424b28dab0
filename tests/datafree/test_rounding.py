"""Rounding against an input covariance: on the quantizer's grid, and a smaller output
error than nearest rounding where the inputs are correlated."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.datafree import DataFreeSpec, compress_datafree
from edgeslim.datafree.covariance import Moments
from edgeslim.datafree.ops import mse_clip, quantize_weight
from edgeslim.datafree.rounding import round_with_covariance, row_gram


def _correlated(d: int, seed: int, n: int = 4000, draw: int = 0) -> torch.Tensor:
    """Samples (``draw``: which) of ``d`` inputs driven by 3 shared factors (``seed``)
    plus a little noise each."""
    mix = torch.randn(3, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = torch.Generator().manual_seed(10_000 + draw)
    factors = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return factors @ mix + 0.2 * torch.randn(n, d, generator=g, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(2, 4),
    seed=st.integers(0, 10_000),
    granularity=st.sampled_from(["channel", "tensor"]),
)
def test_the_rounded_weights_are_on_the_grid_of_the_later_quantizer(
    bits: int, seed: int, granularity: str
) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 16, generator=g)
    x = _correlated(16, seed)
    clipped = mse_clip(w, bits)
    q, _ = round_with_covariance(w, clipped, x.T @ x / len(x), bits, granularity)  # type: ignore[arg-type]
    again = quantize_weight(q, bits, granularity)  # type: ignore[arg-type]
    assert torch.allclose(again, q, rtol=0, atol=1e-6 * float(q.abs().max()))
    if granularity == "channel":  # each row keeps the grid its clipped weights set
        assert torch.allclose(q.abs().amax(1), clipped.abs().amax(1), rtol=1e-5)


def test_with_uncorrelated_inputs_it_is_nearest_rounding() -> None:
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    clipped = mse_clip(w, 3)
    q, short = round_with_covariance(clipped, clipped, torch.eye(12, dtype=torch.float64), 3)
    assert short == 0
    assert torch.equal(q, quantize_weight(clipped, 3))


def test_correlated_inputs_give_a_smaller_output_error_than_nearest_rounding() -> None:
    """Measured on held samples (not those the covariance came from), at 3 bits."""
    for seed in range(3):
        w = torch.randn(8, 24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        fit, held = _correlated(24, seed), _correlated(24, seed, draw=1)
        clipped = mse_clip(w, 3)
        q, _ = round_with_covariance(w, clipped, fit.T @ fit / len(fit), 3)
        nearest = quantize_weight(clipped, 3)
        err_cov = ((held @ (q - w).T) ** 2).mean()
        err_near = ((held @ (nearest - w).T) ** 2).mean()
        assert err_cov < 0.7 * err_near, (seed, float(err_cov), float(err_near))


def test_row_gram_of_a_conv_is_channel_covariance_times_the_spatial_prior() -> None:
    cov = torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
    x = Moments(torch.tensor([1.0, -1.0], dtype=torch.float64), cov)
    conv = nn.Conv2d(2, 3, 3)
    gram = row_gram(conv, x)
    centred = row_gram(conv, x, centred=True)
    assert gram is not None and centred is not None and gram.shape == (18, 18)
    # weight rows are ordered (channel, kh, kw): entry (c, p) against (d, q)
    assert torch.isclose(centred[0, 9], cov[0, 1])  # same position, the two channels
    assert torch.isclose(gram[0, 9] - centred[0, 9], torch.tensor(-1.0, dtype=torch.float64))
    assert row_gram(nn.Conv2d(2, 2, 3, groups=2), x) is None


class _Expand(nn.Module):
    """A projection (correlated outputs) feeding an expansion, as in an inverted residual."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.project = nn.Conv2d(32, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 48, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(48)
        self.mix = nn.Conv2d(48, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            for bn in (self.bn0, self.bn1, self.bn2, self.bn3):
                bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=g))
                bn.bias.copy_(0.2 * torch.randn(bn.num_features, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn0(self.stem(x)))
        y = self.bn1(self.project(y))
        y = torch.relu(self.bn2(self.expand(y)))
        return self.head(torch.relu(self.bn3(self.mix(y))))


def test_dfmpc_says_which_layers_it_rounded_against_their_covariance() -> None:
    model = _Expand().eval()
    example = torch.randn(1, 3, 8, 8)
    spec = DataFreeSpec(low_bits=3, high_bits=8)
    result = compress_datafree(model, "dfmpc", spec, example)
    low = [f for f, b in result.weight_bits.items() if b == 3]
    assert low
    for fqn in low:
        assert "rounded against its input covariance" in result.report.layers[fqn]
    tensor = compress_datafree(model, "dfmpc", DataFreeSpec(3, 8, granularity="tensor"), example)
    for fqn in low:
        assert "one weight scale per layer" in tensor.report.layers[fqn]


class _DepthwiseBlock(nn.Module):
    """conv -> BN -> ReLU -> depthwise 3x3 -> BN -> ReLU -> 1x1 conv, BN statistics set."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 8, 1)
        for bn in (self.bn0, self.bn1):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn0(self.stem(x)))
        return self.head(torch.relu(self.bn1(self.dw(y))))


def test_dfq_rounds_depthwise_convs_against_their_spatial_correlation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The depthwise conv's 4-bit rows stay on their grid and carry a smaller modelled output
    error ``e^T S e`` (S: the spatial prior of its 3x3 window) than nearest rounding of the
    same weights; the report says so for it and for no other layer."""
    from edgeslim.datafree.compensate import spatial_kernel

    model = _DepthwiseBlock().eval()
    spec = DataFreeSpec(low_bits=4, high_bits=4, edge_bits=4)
    rounded = compress_datafree(model, "dfq", spec, torch.randn(1, 3, 8, 8))
    said = {f: t for f, t in rounded.report.layers.items() if "spatial correlation" in t}
    assert list(said) == ["dw"]
    w = rounded.model.get_submodule("dw").weight.detach().to(torch.float64)
    # on the grid: the later quantizer's rounding changes nothing (to float32's precision)
    torch.testing.assert_close(quantize_weight(w, 4, "channel"), w, rtol=0, atol=1e-6)

    # the same method without the rounding step gives the weights it rounded
    import edgeslim.datafree.methods as methods

    monkeypatch.setattr(methods, "round_depthwise", lambda chain, bits, low: {})
    plain = compress_datafree(model, "dfq", spec, torch.randn(1, 3, 8, 8))
    before = plain.model.get_submodule("dw").weight.detach().to(torch.float64)
    nearest = quantize_weight(before, 4, "channel")
    s = spatial_kernel(3, 3)

    def error(q: torch.Tensor) -> float:
        e = (q - before).reshape(16, 9)
        return float(torch.einsum("ri,ij,rj->", e, s, e))

    assert error(w) < 0.8 * error(nearest)


def test_a_depthwise_conv_with_a_channel_multiplier_is_rounded_too() -> None:
    """A 1-D depthwise conv with two filters per channel (groups = in_channels, each row
    reads one channel) gets the spatial rounding; a grouped conv reading two does not."""

    class OneD(nn.Module):
        def __init__(self, groups: int) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.bn0 = nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8)
            self.dw, self.bn1 = nn.Conv1d(8, 16, 5, padding=2, groups=groups), nn.BatchNorm1d(16)
            self.c = nn.Conv1d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn0(self.a(x)))
            return self.c(torch.relu(self.bn1(self.dw(y))))

    spec = DataFreeSpec(low_bits=4, high_bits=4, edge_bits=4)
    for groups, rounded in ((8, True), (4, False)):
        result = compress_datafree(OneD(groups).eval(), "dfq", spec, torch.randn(1, 4, 32))
        said = "spatial correlation" in result.report.layers["dw"]
        assert said == rounded, (groups, result.report.layers["dw"])
