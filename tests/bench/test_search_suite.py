"""The search suite's Ray accounting: the figures it records explain the speed-up exactly."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeslim.bench.records import Record
from edgeslim.bench.search import ray_accounting

seconds = st.floats(min_value=0.5, max_value=5.0, allow_nan=False)


@given(
    st.lists(st.tuples(seconds, seconds), min_size=1, max_size=30),
    st.floats(min_value=1.0, max_value=3.0),
    st.floats(min_value=1.0, max_value=3.0),
    st.integers(min_value=1, max_value=8),
)
def test_speedup_is_bound_times_busy_shares(
    pairs: list[tuple[float, float]], slack_in: float, slack_on: float, workers: int
) -> None:
    t_in = [a for a, _ in pairs]
    t_on = [b for _, b in pairs]
    local_s = sum(t_in) * slack_in  # the in-process run: its measurements and the rest
    remote_s = sum(t_on) / workers * slack_on  # the workers: idle for part of the run
    acc = ray_accounting(t_in, t_on, local_s, remote_s, workers)
    # the recorded figures (rounded to 3 places) explain the measured speed-up
    explained = acc["throughput_bound"] * acc["workers_busy_share"] / acc["in_process_busy_share"]
    assert math.isclose(explained, local_s / remote_s, rel_tol=0.01)
    assert math.isclose(acc["throughput_bound"], workers * sum(t_in) / sum(t_on), abs_tol=6e-4)
    assert 0 < acc["workers_busy_share"] <= 1.0005
    assert 0 < acc["in_process_busy_share"] <= 1.0005


def test_the_figures_of_an_ad_hoc_run() -> None:
    """2 workers, each measurement 1.65x slower on a one-thread worker than in-process and
    the workers busy 88% of the time: 1.07x, as measured ad hoc on 2 cores."""
    acc = ray_accounting([2.2] * 24, [3.7] * 24, 54.0, 50.5, 2)
    assert acc["throughput_bound"] == round(2 * 2.2 / 3.7, 3)
    assert acc["workers_busy_share"] == round(24 * 3.7 / (2 * 50.5), 3)
    assert acc["in_process_busy_share"] == round(24 * 2.2 / 54.0, 3)


def test_nothing_measured_gives_no_accounting() -> None:
    assert ray_accounting([], [1.0], 1.0, 1.0, 2) == {}
    assert ray_accounting([1.0], [], 1.0, 1.0, 2) == {}


def test_chosen_strategies_refuse_unknown_names_and_keep_order() -> None:
    from edgeslim.bench.search import STRATEGIES, chosen_strategies
    from edgeslim.errors import EdgeslimError

    assert chosen_strategies(["dp", "random", "dp"]) == ("dp", "random")
    with pytest.raises(EdgeslimError, match="unknown search strategy 'bogus'") as err:
        chosen_strategies(["random", "bogus"])
    assert all(name in str(err.value) for name in STRATEGIES)  # the allowed names


def test_a_strategy_run_resumes_from_its_own_progress_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of another strategy list (or of a whole run) are never replayed into it."""
    from edgeslim.bench import search

    calls: list[tuple[str, tuple[str, ...] | None]] = []

    def fake(name: str, out: Path, quick: bool, only: tuple[str, ...] | None) -> list[Record]:
        calls.append((name, only))
        search.journal_dir(out).mkdir()  # what a search measuring in-process leaves
        (search.journal_dir(out) / f"{name}-dp.jsonl").write_text("{}\n")
        return []

    (tmp_path / "progress.json").write_text(json.dumps({"steps": {"resnet20": []}}))
    monkeypatch.setattr(search, "search_model", fake)
    search.search_suite(tmp_path, False, ["resnet20"], ["dp"])
    assert calls == [("resnet20", ("dp",))]  # the whole run's file was not read
    assert not search.journal_dir(tmp_path).exists()  # finished: the next run starts afresh


def _digits_net() -> tuple[Any, Any]:
    """A small conv net on 8x8 digits and a task with calibration images only."""
    from torch import nn

    from edgeslim.data import TensorBatches, load_digits_split
    from edgeslim.task import Task

    digits = load_digits_split("train")
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
    ).eval()
    task = Task(example_inputs=(digits.images[:1],),
                calibration=TensorBatches(digits.images[:64], batch_size=32))  # fmt: skip
    return model, task


def test_a_rows_policy_is_saved_beside_the_results_and_loads_back(tmp_path: Path) -> None:
    """results.json keeps a policy's id only and a finished suite removes its journals:
    the row names a JSON file under out/policies that loads as the very policy."""
    from edgeslim.bench.search import SearchBench, Sizes
    from edgeslim.search import SearchSpace
    from edgeslim.search.policy import Policy

    model, task = _digits_net()
    space = SearchSpace.build(model, task, w_bits=(4, 8), keep=(0.5, 1.0))
    sizes = Sizes(1, 1, None, ("random",), 1, 0.1, 1)
    bench = SearchBench("net", tmp_path, sizes, model, space, None,  # type: ignore[arg-type]
                        lambda m: 0.0, 0, 0.0, 1.0)  # fmt: skip
    policy = space.uniform(w_bits=4, a_bits=8, keep=0.5)
    row = bench.record("edgeslim:test", policy, 0.0, {}, space=space)
    name = row.extra["policy_file"]
    assert name == f"policies/net-{policy.id}.json"
    assert Policy.load(tmp_path / name) == policy
    assert "policy_file" not in bench.record("edgeslim:none", None, 0.0, {}, space=space).extra


def test_a_timed_row_keeps_each_windows_ratio(tmp_path: Path) -> None:
    """A row timed in ONNX Runtime reports its ratio to fp32 as the median over windows
    and each window's ratio beside it, so a slow phase during the row's timing shows."""
    from edgeslim.bench.search import SearchBench, Sizes
    from edgeslim.cost.lut import LatencyTable
    from edgeslim.search import SearchSpace
    from edgeslim.search.latency import LutLatency

    model, task = _digits_net()
    space = SearchSpace.build(model, task, w_bits=(8,), keep=(1.0,))
    latency = LutLatency(space, LatencyTable(repeats=5, cache_dir=tmp_path), repeats=10,
                         seconds=0.05)  # fmt: skip
    sizes = Sizes(1, 1, None, ("random",), 1, 0.05, 1)
    bench = SearchBench("net", tmp_path, sizes, model, space, latency, lambda m: 0.0, 0, 0.0, 1.0)
    row = bench.record("edgeslim:test", space.uniform(w_bits=8, a_bits=8), 0.0, {})
    windows = row.extra["measured_latency_windows"]
    assert 2 <= len(windows) <= 3 and min(windows) > 0
    assert row.latency_ms is not None and row.baseline_latency_ms is not None
    # the row's milliseconds are rounded to 4 decimals: on this 0.03 ms model, 0.3% of a ratio
    tol = 1e-4 / row.baseline_latency_ms + 1e-3
    assert abs(row.extra["measured_latency_ratio"] - statistics.median(windows)) < tol
    assert bench.record("edgeslim:none", None, 0.0, {}).extra["measured_latency_windows"] is None
