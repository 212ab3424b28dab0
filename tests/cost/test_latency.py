"""Behaviour of the latency harness (not a timing benchmark: those live in benchmarks/)."""

from __future__ import annotations

import math
import time

import pytest

from edgeslim.cost import (
    LatencyStats,
    Windows,
    compare_in_windows,
    compare_latency,
    measure_latency,
    ratio_over_rounds,
    torch_runner,
)
from edgeslim.cost.latency import until_agreement
from edgeslim.graph import example_input
from edgeslim.zoo.resnet import resnet20


def test_compare_latency_orders_and_counts() -> None:
    calls = {"a": 0, "b": 0}

    def fast() -> None:
        calls["a"] += 1

    def slow() -> None:
        calls["b"] += 1
        time.sleep(0.004)

    stats = compare_latency({"fast": fast, "slow": slow}, warmup=2, repeats=5, threads=1, settle=1)
    # 2 warm-up + two rounds (one in each order) of 1 settling + 5 timed
    assert calls == {"a": 14, "b": 14}
    assert stats["slow"].median_ms >= 4.0 > stats["fast"].median_ms
    assert stats["slow"].p10_ms <= stats["slow"].median_ms <= stats["slow"].p90_ms


def test_torch_runner_runs_the_model_in_eval_mode() -> None:
    model = resnet20().train()
    run = torch_runner(model, example_input())
    assert not model.training
    assert run().shape == (1, 10)
    assert measure_latency(run, warmup=1, repeats=3).repeats == 3  # one runner: one round


def test_runners_alternate_in_blocks() -> None:
    order: list[str] = []
    runners = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    compare_latency(runners, warmup=1, repeats=6, threads=1, block=3, settle=0)
    # after one warm-up call each; every other round in reverse order
    assert order[2:] == list("aaabbbbbbaaa")


def test_ratio_over_rounds_pairs_blocks_of_the_same_round() -> None:
    state = {"slow_phase": False}

    def base() -> None:
        time.sleep(0.002 * (3 if state["slow_phase"] else 1))

    def half() -> None:  # the machine's phase changes after each of its blocks
        time.sleep(0.001 * (3 if state["slow_phase"] else 1))

    def flip() -> None:
        state["slow_phase"] = not state["slow_phase"]

    runners = {"base": base, "half": half, "flip": flip}
    stats = compare_latency(runners, warmup=0, repeats=12, threads=1, block=3, settle=0)
    r = ratio_over_rounds(stats["half"], stats["base"])
    assert r.rounds == len(stats["base"].blocks) == 4
    assert 0.35 < r.median < 0.7  # 0.5 in every round, whatever the phase
    assert r.p10 <= r.median <= r.p90


def test_ratio_over_rounds_refuses_unpaired_stats() -> None:
    lone = LatencyStats(1.0, 1.0, 1.0, 3)
    with pytest.raises(ValueError, match="one compare_latency run"):
        ratio_over_rounds(lone, lone)


def test_latency_spread_gives_percentiles_and_the_speedups_spread() -> None:
    """Compress records gave a median alone: 1.1x could be a gain or the machine's noise."""
    from edgeslim.cost.latency import latency_spread

    fast = LatencyStats(1.0, 0.9, 1.4, 20, (1.0, 1.1))
    base = LatencyStats(2.0, 1.8, 2.6, 20, (2.0, 2.0))
    s = latency_spread(fast, base)
    assert (s["p10_ms"], s["p90_ms"], s["baseline_p90_ms"], s["repeats"]) == (0.9, 1.4, 2.6, 20)
    assert s["speedup_p10"] <= s["speedup_median"] <= s["speedup_p90"]
    assert s["speedup_p90"] == pytest.approx(2.0)
    assert "speedup_median" not in latency_spread(LatencyStats(1, 1, 1, 3), base)


def test_a_transient_in_one_window_is_outvoted_by_the_next_two() -> None:
    """The bench's re-run was calibrated in a window where int8 ran 35% slow; over three
    windows the figure is their median, not the transient's. (When windows stop is
    :func:`until_agreement`'s, tested below without timing: sleeps stretch on a busy
    machine, so ``agree`` is set here to never hold and three windows are always taken.)"""
    calls = {"n": 0}

    def base() -> None:
        time.sleep(0.002)

    def half() -> None:  # three times slower during the first window's calls only
        calls["n"] += 1
        time.sleep(0.006 if calls["n"] <= 6 else 0.001)

    kw = {"warmup": 0, "repeats": 6, "threads": 1, "block": 3, "settle": 0}
    stats, ratios = compare_in_windows(
        {"base": base, "half": half}, "base", Windows(most=3, gap=0.0, agree=1e-12), **kw
    )
    r = ratios["half"]
    assert len(r.windows) == 3 and r.windows[0] > 1.5  # the transient window
    assert r.median < 1.5 and r.median in r.windows[1:] and r.rounds == 3 * 2
    assert stats["half"].repeats == stats["base"].repeats == 3 * 6
    assert len(stats["base"].blocks) == 3 * 2  # rounds kept in order: still pairable
    assert math.isclose(ratio_over_rounds(stats["half"], stats["base"]).rounds, 6)


def test_windows_wait_the_gap_between_them() -> None:
    runners = {"a": lambda: time.sleep(0.001), "b": lambda: time.sleep(0.001)}
    kw = {"warmup": 0, "repeats": 4, "threads": 1, "block": 2, "settle": 0}
    t0 = time.perf_counter()
    _, ratios = compare_in_windows(runners, "a", Windows(most=2, gap=0.2, agree=1e-12), **kw)
    assert len(ratios["b"].windows) == 2
    assert time.perf_counter() - t0 >= 0.2  # one gap between the two windows
    stats, none = compare_in_windows({"a": runners["a"]}, "a", Windows(most=1), **kw)
    assert none == {} and stats["a"].repeats == 4  # one window, one runner


def test_windows_refuse_what_cannot_be_timed() -> None:
    with pytest.raises(ValueError, match="most"):
        Windows(most=0)
    with pytest.raises(ValueError, match="gap"):
        Windows(gap=-1.0)
    with pytest.raises(ValueError, match="reference"):
        compare_in_windows({"a": lambda: None}, "b")


def test_until_agreement_takes_a_third_window_only_when_the_first_two_disagree() -> None:
    def windows_of(values: list[float], most: int = 3) -> list[float]:
        it = iter(values)
        return until_agreement(lambda: next(it), lambda v: {"v": v}, Windows(most=most, agree=0.1))

    assert windows_of([1.0, 1.05, 9.0]) == [1.0, 1.05]  # agreed: no third
    assert windows_of([1.5, 1.0, 1.02]) == [1.5, 1.0, 1.02]  # the odd one outvoted
    assert windows_of([1.0, 2.0, 4.0]) == [1.0, 2.0, 4.0]  # never agreed: at most three
    assert windows_of([3.0], most=1) == [3.0]
