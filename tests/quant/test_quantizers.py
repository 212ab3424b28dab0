"""Quantizers: levels, nearest-level projection, ranges, learnability and error ordering.

The invariants (values are levels of their group, at most 2^b distinct values, idempotence,
closed form == the base class's levels-based search) run on every quantizer x valid bits x
granularity with a fixed weight, and under hypothesis on random shapes and values. Error
orderings use a ridge-regression weight fitted on sklearn digits (real data) and Gaussian
weights.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.data import load_digits_split
from edgeslim.quant.base import Quantizer
from edgeslim.quant.quantizers import EPS, Pow2Quantizer, RangeQuantizer, UniformQuantizer
from edgeslim.quant.registries import OBSERVERS, QUANTIZERS
from edgeslim.quant.spec import QuantConfigError, QuantSpec

# (quantizer, bits, symmetric) for every valid bit-width
CONFIGS: list[tuple[str, int, bool]] = [
    *[("uniform", b, sym) for b in range(1, 9) for sym in (True, False)],
    *[("pow2", b, True) for b in range(2, 9)],
    ("binary", 1, True),
    ("ternary", 2, True),
    *[("codebook", b, True) for b in range(1, 9)],
]
GRANULARITIES = ("tensor", "channel", "group")


def make(
    name: str,
    bits: int,
    granularity: str = "channel",
    symmetric: bool = True,
    group_size: int = 8,
    is_weight: bool = True,
) -> RangeQuantizer:
    spec = QuantSpec(
        quantizer=name,
        bits=bits,
        granularity=granularity,  # type: ignore[arg-type]
        symmetric=symmetric,
        group_size=group_size,
    )
    q = QUANTIZERS.get(name)(spec, is_weight=is_weight)
    assert isinstance(q, RangeQuantizer)
    return q


def max_levels(name: str, bits: int, symmetric: bool) -> int:
    if name == "pow2" or (name == "uniform" and symmetric and bits > 1):
        return 2**bits - 1
    return 2**bits


def check_invariants(q: RangeQuantizer, x: torch.Tensor, max_l: int) -> None:
    """Everything a quantizer promises about ``quantize(x)`` for one tensor."""
    y = q.quantize(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    lv = q.levels()
    assert lv.shape == (q.num_groups(x) if q.is_weight else 1, lv.shape[1])
    assert lv.shape[1] <= max_l
    assert (lv[:, 1:] >= lv[:, :-1]).all(), "levels must be sorted"
    valid = q.to_groups(torch.ones_like(x)) > 0  # False on group padding
    yg, xg = q.to_groups(y), q.to_groups(x)
    is_level = (yg[..., None] == lv[:, None, :]).any(-1)
    assert is_level[valid].all(), "every output is exactly one of its group's levels"
    for row, ok in zip(yg, valid, strict=True):
        assert row[ok].unique().numel() <= max_l
    # nearest level (up to float error at exact ties), and same as the base class search
    dist = (xg[..., None] - lv[:, None, :]).abs()
    tol = 1e-5 * (xg.abs().amax() + lv.abs().amax()).item()
    assert ((yg - xg).abs() <= dist.amin(-1) + tol)[valid].all()
    base = Quantizer.quantize(q, x)
    tie = ((x - y).abs() - (x - base).abs()).abs() <= tol
    assert ((y == base) | tie).all(), "closed form disagrees with the levels-based search"
    assert torch.equal(q.quantize(y), y), "quantize must be idempotent"


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize(("name", "bits", "sym"), CONFIGS)
def test_invariants_every_quantizer_bits_granularity(
    name: str, bits: int, sym: bool, granularity: str
) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 3, 3, 3, generator=gen) * torch.linspace(0.1, 2, 6)[:, None, None, None]
    q = make(name, bits, granularity, sym, group_size=10)  # 27 per channel: padded groups
    q.init_range(w)
    assert bool(q.calibrated)
    check_invariants(q, w, max_levels(name, bits, sym))
    check_invariants(q, 1.7 * torch.randn(w.shape, generator=gen), max_levels(name, bits, sym))


@st.composite
def weight_tensors(draw: st.DrawFn) -> torch.Tensor:
    c_out = draw(st.integers(1, 5))
    rest = draw(st.sampled_from([(1,), (7,), (16,), (2, 3, 3), (3, 1, 1)]))
    shape = (c_out, *rest)
    n = math.prod(shape)
    floats = st.floats(-50, 50, width=32, allow_subnormal=False)
    vals = draw(st.lists(floats | st.sampled_from([0.0, 0.5, -1.0]), min_size=n, max_size=n))
    return torch.tensor(vals, dtype=torch.float32).reshape(shape)


@settings(max_examples=250, deadline=None, database=None)
@given(
    cfg=st.sampled_from(CONFIGS),
    granularity=st.sampled_from(GRANULARITIES),
    group_size=st.sampled_from([1, 3, 8]),
    w=weight_tensors(),
    factor=st.floats(0.1, 3.0),
)
def test_invariants_hypothesis(
    cfg: tuple[str, int, bool], granularity: str, group_size: int, w: torch.Tensor, factor: float
) -> None:
    name, bits, sym = cfg
    q = make(name, bits, granularity, sym, group_size)
    q.init_range(w)
    check_invariants(q, w, max_levels(name, bits, sym))
    check_invariants(q, w.flip(0) * factor, max_levels(name, bits, sym))  # out of range too


@settings(max_examples=200, deadline=None, database=None)
@given(
    bits=st.integers(1, 8),
    sym=st.booleans(),
    granularity=st.sampled_from(GRANULARITIES),
    w=weight_tensors(),
    factor=st.floats(0.1, 3.0),
)
def test_uniform_quantize_without_autograd_is_bit_equal(
    bits: int, sym: bool, granularity: str, w: torch.Tensor, factor: float
) -> None:
    """The in-place path (nothing to differentiate) and the autograd path give the same
    bits, the sign of zero included, in range and beyond it."""
    q = make("uniform", bits, granularity, sym, 3)
    q.init_range(w)
    for x in (w, w.flip(0) * factor):
        before = x.clone()
        with torch.no_grad():
            fast = q.quantize(x)
        slow = q.quantize(x.clone().requires_grad_()).detach()
        assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))
        assert torch.equal(x.view(torch.int32), before.view(torch.int32))  # input untouched


@pytest.fixture(scope="module")
def digits_weight() -> torch.Tensor:
    """Ridge regression of one-hot digit labels on pixels: a real (10, 64) weight."""
    train = load_digits_split("train")
    x = train.images.reshape(len(train), -1)
    x = x - x.mean(0)
    y = nn.functional.one_hot(train.labels, 10).float()
    w = torch.linalg.solve(x.T @ x + 1.0 * torch.eye(64), x.T @ y)
    return w.T.contiguous()


def mse(q: RangeQuantizer, w: torch.Tensor) -> float:
    q.init_range(w)
    return float((q.quantize(w) - w).pow(2).mean())


@pytest.mark.parametrize("sym", [True, False])
def test_uniform_error_decreases_with_bits(digits_weight: torch.Tensor, sym: bool) -> None:
    errs = [mse(make("uniform", b, "channel", sym), digits_weight) for b in range(1, 9)]
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 1e-4 * float(digits_weight.pow(2).mean())


@pytest.mark.parametrize(
    ("name", "bits"),
    [("uniform", 2), ("uniform", 4), ("pow2", 3), ("binary", 1), ("ternary", 2), ("codebook", 2)],
)
def test_per_channel_error_at_most_per_tensor(
    digits_weight: torch.Tensor, name: str, bits: int
) -> None:
    gauss = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    gauss = gauss * torch.logspace(-1, 0.5, 32)[:, None]  # channels of different scale
    for w in (digits_weight, gauss):
        per_tensor = mse(make(name, bits, "tensor"), w)
        per_channel = mse(make(name, bits, "channel"), w)
        assert per_channel <= per_tensor * (1 + 1e-6), (per_channel, per_tensor)
        if name in ("uniform", "pow2", "binary"):  # finer groups of one channel: no worse
            assert mse(make(name, bits, "group", group_size=16), w) <= per_channel * (1 + 1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
def test_codebook_beats_uniform_on_gaussian(bits: int) -> None:
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(bits))
    for granularity in ("tensor", "channel"):
        cb = mse(make("codebook", bits, granularity), w)
        un = mse(make("uniform", bits, granularity), w)
        assert cb <= un, (granularity, cb, un)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pow2_levels_are_signed_powers_of_two(bits: int) -> None:
    q = make("pow2", bits, "channel")
    assert isinstance(q, Pow2Quantizer)
    w = torch.randn(4, 30, generator=torch.Generator().manual_seed(bits))
    q.init_range(w)
    s = w.abs().amax(1)
    assert torch.equal(q.scale, s)
    kmin = -(2 ** (bits - 1) - 2)
    pows = torch.tensor([2.0**k for k in range(kmin, 1)])
    for row, sc in zip(q.levels(), s, strict=True):
        expected = torch.cat([-(sc * pows).flip(0), torch.zeros(1), sc * pows])
        assert torch.equal(row, expected)
        unit = row / sc
        mant, exp = torch.frexp(unit[unit != 0])
        assert torch.all(mant.abs() == 0.5) and exp.min() - 1 == kmin and exp.max() - 1 == 0
    assert q.levels().shape[1] == 2**bits - 1


def test_pow2_thresholds_are_arithmetic_midpoints() -> None:
    """bits=3, s=1: levels 0, ±1/4, ±1/2, ±1. Threshold to 0 is 1/8 (half the smallest
    level); between 2^(e-1) and 2^e it is 0.75·2^e (not the log-domain √2·2^(e-1))."""
    q = make("pow2", 3, "tensor")
    assert isinstance(q, Pow2Quantizer)
    q.set_range(torch.tensor([-1.0]), torch.tensor([1.0]))
    x = torch.tensor([0.12, 0.13, 0.36, 0.374, 0.376, 0.74, 0.76, 5.0])
    expected = torch.tensor([0.0, 0.25, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0])
    assert torch.equal(q.quantize(x[None]), expected[None])
    assert torch.equal(q.quantize(-x[None]), -expected[None])


def test_uniform_symmetric_grid_is_restricted_range() -> None:
    w = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    q8 = make("uniform", 8, "channel")
    assert isinstance(q8, UniformQuantizer)
    q8.init_range(w)
    assert (q8.qmin, q8.qmax) == (-127, 127)
    assert torch.equal(q8.zero_point, torch.zeros(5))
    assert torch.allclose(q8.scale, w.abs().amax(1) / 127)
    assert torch.equal(q8.levels()[:, 0], -q8.levels()[:, -1])
    q1 = make("uniform", 1, "channel")
    assert isinstance(q1, UniformQuantizer)
    q1.init_range(w)
    assert torch.equal(q1.levels(), torch.stack([-q1.scale, q1.scale], 1))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0])
def test_asymmetric_range_includes_zero(bits: int, shift: float) -> None:
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(bits)) + shift
    q = make("uniform", bits, "channel", symmetric=False)
    assert isinstance(q, UniformQuantizer)
    q.init_range(x)
    zp = q.zero_point
    assert torch.equal(zp, zp.round()) and (zp >= q.qmin).all() and (zp <= q.qmax).all()
    assert (q.qmin, q.qmax) == (0, 2**bits - 1)
    assert ((q.levels() == 0).sum(1) == 1).all(), "0 is exactly one level of every group"
    assert torch.equal(q.quantize(torch.zeros(3, 4)), torch.zeros(3, 4))
    if bits == 8:  # fine enough that the range visibly covers the data
        assert (q.levels()[:, 0] <= x.amin(1).clamp(max=0) + q.scale).all()
        assert (q.levels()[:, -1] >= x.amax(1).clamp(min=0) - q.scale).all()


def test_activations_are_one_group_and_set_range_works_with_observers() -> None:
    acts = torch.relu(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)))
    errs = {}
    for obs_name in ("minmax", "percentile", "mse"):
        q = make("uniform", 4, "channel", symmetric=False, is_weight=False)
        obs = OBSERVERS.get(obs_name)()
        obs.update(q.to_groups(acts))
        obs.apply(q)
        assert bool(q.calibrated) and q.levels().shape == (1, 16)
        errs[obs_name] = float((q.quantize(acts) - acts).pow(2).mean())
    assert errs["mse"] <= errs["minmax"]
    q = make("codebook", 2, "group", is_weight=False)
    q.init_range(acts)
    assert q.levels().shape == (1, 4)


def test_one_bit_activations_get_a_low_threshold_from_the_wide_mse_search() -> None:
    """ReLU outputs of real data (digits pixels through a random layer): at 1 bit the
    percentile range zeroes nearly everything; ``mse_wide`` keeps a useful share of ones."""
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(
        load_digits_split("train").images.flatten(1)[:256] @ torch.randn(64, 32, generator=g)
    )
    ones, errs = {}, {}
    for obs_name in ("percentile", "mse", "mse_wide"):
        q = make("uniform", 1, "tensor", symmetric=False, is_weight=False)
        obs = OBSERVERS.get(obs_name)()
        obs.update(q.to_groups(acts))
        obs.apply(q)
        out = q.quantize(acts)
        ones[obs_name] = float((out > 0).float().mean())
        errs[obs_name] = float((out - acts).pow(2).mean())
    assert errs["mse_wide"] <= errs["mse"] <= errs["percentile"]
    assert ones["mse_wide"] > 2 * ones["percentile"]


def test_binary_and_ternary_ranges_follow_xnor_and_twn() -> None:
    w = torch.randn(4, 40, generator=torch.Generator().manual_seed(0))
    b = make("binary", 1, "channel")
    b.init_range(w)
    assert torch.allclose(b.levels()[:, 1], w.abs().mean(1))
    t = make("ternary", 2, "channel")
    t.init_range(w)
    a = w.abs()
    big = a > 0.7 * a.mean(1, keepdim=True)
    alpha = (a * big).sum(1) / big.sum(1)
    assert torch.allclose(t.levels(), torch.stack([-alpha, torch.zeros(4), alpha], 1))


def test_group_padding_does_not_bias_ranges() -> None:
    w = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))  # groups of 4: 4, 4, 2
    q = make("binary", 1, "group", group_size=4)
    q.init_range(w)
    tail = w[:, 8:].abs().mean(1)
    assert torch.allclose(q.levels()[2::3, 1], tail)


@pytest.mark.parametrize(("name", "bits"), [(n, b) for n, b, _ in CONFIGS if b <= 2])
def test_make_learnable_gives_parameter_of_equal_value(name: str, bits: int) -> None:
    w = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    q = make(name, bits, "channel")
    q.init_range(w)
    before, y = q.range_param.clone(), q.quantize(w)
    p = q.make_learnable()
    assert isinstance(p, nn.Parameter) and p.requires_grad
    assert torch.equal(p, before) and q.range_param is p and q.make_learnable() is p
    assert q.range_name in dict(q.named_parameters())
    assert q.range_name not in dict(q.named_buffers())
    assert torch.equal(q.quantize(w), y)
    q.init_range(2 * w)  # re-calibration updates the same Parameter in place
    assert q.range_param is p and not torch.equal(p, before)


@pytest.mark.parametrize("name", ["uniform", "pow2", "binary", "ternary", "codebook"])
def test_state_dict_loads_into_a_fresh_quantizer(name: str) -> None:
    bits = {"binary": 1, "ternary": 2}.get(name, 3)
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    q = make(name, bits, "group", symmetric=False)
    q.init_range(w)
    fresh = make(name, bits, "group", symmetric=False)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.levels(), q.levels())
    assert torch.equal(fresh.quantize(w), q.quantize(w))


def test_invalid_bits_and_uncalibrated_use_fail_clearly() -> None:
    with pytest.raises(QuantConfigError, match="binary"):
        make("pow2", 1)
    with pytest.raises(QuantConfigError, match="bits=1"):
        make("binary", 2)
    with pytest.raises(QuantConfigError, match="bits=2"):
        make("ternary", 3)
    with pytest.raises(RuntimeError, match="init_range"):
        make("uniform", 4).quantize(torch.ones(2, 2))


def test_all_zero_group_keeps_positive_scale() -> None:
    w = torch.zeros(3, 8)
    w[0] = torch.arange(8.0)
    for name, bits in (("uniform", 4), ("pow2", 3), ("binary", 1), ("ternary", 2)):
        q = make(name, bits, "channel")
        q.init_range(w)
        assert (q.range_param >= EPS).all()
        assert torch.isfinite(q.quantize(w)).all()
    assert isinstance(make("pow2", 3), Pow2Quantizer)


def test_uniform_quantize_traces_with_torch_fx() -> None:
    """Under torch.fx tracing the input is a Proxy whose autograd flags cannot be read:
    quantize takes the differentiable path there, and the traced graph computes the same."""
    import torch.fx as fx

    q = make("uniform", 8, "tensor", True, 1)
    q.init_range(torch.linspace(-2.0, 2.0, 50))

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = q

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q.quantize(x) * 2

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    traced = fx.symbolic_trace(Twice())
    with torch.no_grad():
        assert torch.equal(traced(x), Twice()(x))
