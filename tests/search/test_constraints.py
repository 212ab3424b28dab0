"""Constraints: the parser (examples, errors, a property round trip), checks that report the
achieved value next to the limit, cheap rejection without measuring, and latency through a
pluggable predictor only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.search import (
    Constraint,
    ConstraintError,
    Constraints,
    Costs,
    Evaluator,
    Policy,
    SearchSpace,
)


@pytest.mark.parametrize(
    ("text", "cost", "limit", "relative"),
    [
        ("macs<=0.5x", "macs", 0.5, True),
        ("size <= 0.25x", "size", 0.25, True),
        ("bops<=10%", "bops", 0.1, True),
        ("memory<=2MB", "memory", 2e6, False),
        ("memory<=1.5MiB", "memory", 1.5 * 1024**2, False),
        ("size<=512", "size", 512.0, False),
        ("macs<=20M", "macs", 20e6, False),
        ("bops<=1e9", "bops", 1e9, False),
        ("latency<=0.6x", "latency", 0.6, True),
        ("latency<=5ms", "latency", 5.0, False),
        ("latency<=250us", "latency", 0.25, False),
        ("drop<=1", "drop", 1.0, False),
        ("MAX_DROP<=0.5", "drop", 0.5, False),
    ],
)
def test_parses_the_documented_syntax(text: str, cost: str, limit: float, relative: bool) -> None:
    c = Constraint.parse(text)
    assert (c.cost, c.relative) == (cost, relative)
    assert c.limit == pytest.approx(limit)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("speed<=2x", ["unknown cost 'speed'", "macs, bops, size, memory, latency, drop"]),
        ("size<0.5x", ["COST<=VALUE", "size<=0.25x"]),
        ("size<=big", ["non-negative number", "kB", "MiB"]),
        ("size<=-1x", ["non-negative number"]),
        ("latency<=5", ["unit '' not allowed", "ms, us, s"]),
        ("macs<=5MB", ["unit 'MB' not allowed", "K, k, M, G, T"]),
        ("size<=0x", ["must be > 0"]),
        ("drop<=1x", ["unit 'x' not allowed", "points"]),
    ],
)
def test_bad_constraints_say_what_is_allowed(text: str, words: list[str]) -> None:
    with pytest.raises(ConstraintError) as err:
        Constraint.parse(text)
    for w in words:
        assert w in str(err.value)


limits = st.floats(min_value=1e-6, max_value=1e12, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sampled_from(["macs", "bops", "size", "memory", "latency"]), limits, st.booleans())
def test_canonical_text_parses_back_exactly(cost: str, limit: float, relative: bool) -> None:
    c = Constraint(cost, limit, relative)
    assert Constraint.parse(str(c)) == c


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.integers(1, 10**9), st.integers(1, 10**9), limits, st.booleans(),
    st.sampled_from(["macs", "bops", "size", "memory"]),
)  # fmt: skip
def test_a_check_holds_exactly_when_the_achieved_value_is_within_the_limit(
    value: int, base: int, limit: float, relative: bool, cost: str
) -> None:
    costs = Costs(value, value, value, value)
    baseline = Costs(base, base, base, base)
    check = Constraint(cost, limit, relative).check(costs, baseline)
    achieved = value / base if relative else value
    assert check.achieved == pytest.approx(achieved) and check.value == value
    assert check.ok == (achieved <= limit * (1 + 1e-12))
    assert (check.excess == 0) == check.ok and check.excess >= 0


def test_constraints_collect_drop_and_refuse_two_values() -> None:
    cons = Constraints.parse(["size<=0.25x", "drop<=1", "macs<=0.5x"])
    assert cons.max_drop == 1.0 and cons.costs == ("size", "macs")
    assert cons.to_list() == ["size<=0.25x", "macs<=0.5x", "drop<=1"]
    assert Constraints.parse(cons.to_list()) == cons
    assert Constraints.parse("bops<=0.1x", max_drop=2).max_drop == 2
    as_int = Constraints.parse("bops<=0.1x", max_drop=2)  # an int from Python: a float
    assert isinstance(as_int.max_drop, float) and as_int.to_list() == ["bops<=0.1x", "drop<=2"]
    for bad in (-1, float("nan"), "one"):
        with pytest.raises(ConstraintError, match="max_drop must be a number"):
            Constraints.parse("bops<=0.1x", max_drop=bad)  # type: ignore[arg-type]
    with pytest.raises(ConstraintError, match="max_drop given twice"):
        Constraints.parse(["drop<=1"], max_drop=2.0)
    drop = cons.check_drop(99.0, 97.5)
    assert drop is not None and not drop.ok and drop.achieved == 1.5 and drop.limit == 1.0


def test_analytic_checks_report_achieved_and_limit_without_measuring(space: SearchSpace) -> None:
    measured: list[nn.Module] = []

    def metric(model: nn.Module) -> float:
        measured.append(model)
        return 1.0

    ev = Evaluator(space, ["size<=0.2x", "bops<=0.07x"], metric=metric)
    rejected = ev.screen(space.uniform(8))
    assert rejected is not None and not rejected.evaluated and rejected.metric is None
    size, bops = rejected.checks
    assert size.constraint == "size<=0.2x" and not size.ok
    assert size.achieved == pytest.approx(rejected.costs.size / ev.baseline_costs.size)
    assert size.achieved > 0.2 == size.limit
    assert bops.ok and bops.achieved == pytest.approx(8 * 8 / (32 * 32))
    assert rejected.violation == pytest.approx(size.achieved / 0.2 - 1)
    assert ev.screen(space.uniform(4)) is None  # within both: it needs a measurement
    assert measured == [space.model]  # only the uncompressed model, for the baseline


class BopsLatency:
    """A stand-in for the per-layer latency table to come: ms proportional to BOPs."""

    unit = "ms"

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def predict(self, policy: Policy | None) -> float:
        bops = self.space.baseline_costs().bops if policy is None else self.space.costs(policy).bops
        return 0.2 + bops * 1e-9


def test_latency_needs_a_predictor_and_is_checked_through_it(space: SearchSpace) -> None:
    with pytest.raises(ConstraintError, match="needs a latency predictor"):
        Evaluator(space, ["latency<=0.6x"])
    predictor = BopsLatency(space)
    ev = Evaluator(space, ["latency<=0.6x", "latency<=0.3ms"], latency=predictor)
    (rel, absolute) = ev.checks(space.uniform(4))
    expected = predictor.predict(space.uniform(4))
    assert absolute.value == pytest.approx(expected) and absolute.achieved == absolute.value
    assert rel.achieved == pytest.approx(expected / predictor.predict(None))
    assert rel.ok and absolute.ok == (expected <= 0.3)

    class Relative:
        unit = "x"

        def predict(self, policy: Policy | None) -> float:
            return 1.0 if policy is None else 0.5

    with pytest.raises(ConstraintError, match="relative"):
        Evaluator(space, ["latency<=5ms"], latency=Relative())
    assert Evaluator(space, ["latency<=0.6x"], latency=Relative()).checks(space.uniform(8))[0].ok
