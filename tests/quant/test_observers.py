"""Observers: the bounded sample stays a fair draw of every batch, and the percentile
from the top values equals torch's quantile."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslim.quant.observers import Observer, upper_quantile


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    rows=st.integers(1, 3),
    q=st.sampled_from([0.5, 0.9, 0.99, 0.9999, 0.999999]),
    seed=st.integers(0, 10_000),
)
def test_upper_quantile_is_torch_quantile(n: int, rows: int, q: float, seed: int) -> None:
    s = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(upper_quantile(s, q), torch.quantile(s, q, dim=1))
    torch.testing.assert_close(-upper_quantile(-s, q), torch.quantile(s, 1 - q, dim=1))


def test_small_streams_are_kept_whole() -> None:
    obs = Observer(sample_size=100)
    a, b = torch.arange(30.0).reshape(1, 30), torch.arange(30.0, 60.0).reshape(1, 30)
    obs.update(a)
    obs.update(b)
    assert obs.exact and obs.sample is not None
    torch.testing.assert_close(obs.sample, torch.cat([a, b], 1))


@settings(max_examples=20, deadline=None)
@given(batches=st.lists(st.integers(50, 400), min_size=2, max_size=6), cap=st.integers(64, 256))
def test_the_sample_is_bounded_and_weighs_batches_by_their_size(
    batches: list[int], cap: int
) -> None:
    """Batch i holds only the value i: the share of each value in the sample follows the
    batch's share of all values seen (within sampling noise), however late it came."""
    obs = Observer(sample_size=cap, seed=1)
    for i, n in enumerate(batches):
        obs.update(torch.full((2, n), float(i)))
    assert obs.sample is not None and obs.sample.shape == (2, min(cap // 2, sum(batches)))
    assert obs.values == sum(batches) and obs.seen == len(batches)
    size = obs.sample.shape[1]
    for i, n in enumerate(batches):
        share = float((obs.sample[0] == i).float().mean())
        expected = n / sum(batches)
        # the first batches pass through several merges: allow the binomial spread of each
        assert abs(share - expected) < 0.05 + 4 * (expected * (1 - expected) / size) ** 0.5 * len(
            batches
        )
    torch.testing.assert_close(obs.lo, torch.zeros(2))
    torch.testing.assert_close(obs.hi, torch.full((2,), float(len(batches) - 1)))


def test_infinities_take_the_ends_of_the_finite_range() -> None:
    """An ``-inf`` mask value or ``log(0)`` in a calibration batch: the range stays finite
    (before, the scale became NaN and the export raised), per group."""
    from edgeslim.quant.modules import make_quantizer
    from edgeslim.quant.observers import MSEObserver, PercentileObserver
    from edgeslim.quant.spec import QuantSpec

    g = torch.tensor([[-float("inf"), -2.0, 1.0, 3.0], [float("nan"), 0.5, float("inf"), 1.5]])
    obs = Observer()
    obs.update(g)
    torch.testing.assert_close(obs.lo, torch.tensor([-2.0, 0.5]))
    torch.testing.assert_close(obs.hi, torch.tensor([3.0, 1.5]))
    assert obs.sample is not None and torch.isfinite(obs.sample).all()
    assert float(obs.sample[1, 0]) == 0.5  # NaN at 0, inside the group's range
    for cls in (Observer, PercentileObserver, MSEObserver):
        q = make_quantizer(QuantSpec(bits=8), False)
        o = cls()
        o.update(torch.cat([torch.randn(1, 500), torch.full((1, 4), -float("inf"))], 1))
        o.apply(q)
        assert torch.isfinite(q.scale).all() and float(q.scale.min()) > 0
