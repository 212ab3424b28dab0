"""The search's latency limits checked on whole exported models (:mod:`edgeslim.search.verify`)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from torch import nn

from edgeslim.cost.latency import LatencyStats, RatioStats
from edgeslim.cost.lut import LatencyTable
from edgeslim.search import Policy, SearchResult, SearchSpace, search
from edgeslim.search.choices import SpaceChoices
from edgeslim.search.command import search_task
from edgeslim.search.constraints import Constraints
from edgeslim.search.latency import LutLatency
from edgeslim.search.verify import verify_latency
from edgeslim.task import Task


class BopsShare:
    """A relative latency predictor for the search itself: the policy's share of BOPs."""

    unit = "x"

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def predict(self, policy: Policy | None) -> float:
        base = self.space.baseline_costs().bops
        return 1.0 if policy is None else self.space.costs(policy).bops / base


class ScriptedMachine:
    """Whole-model timings given by the test, policy by policy (a stand-in for the runtime,
    so the decision logic is checked exactly; the real timing is checked below)."""

    def __init__(self, ratios: Sequence[float]) -> None:
        self.ratios = list(ratios)
        self.asked: list[str] = []

    def measure_against_float(
        self, policies: Sequence[Policy]
    ) -> tuple[LatencyStats, list[tuple[LatencyStats, RatioStats]]]:
        self.asked += [p.id for p in policies]
        fp32 = LatencyStats(2.0, 1.9, 2.2, 30)
        rows = []
        for r in self.ratios[: len(policies)]:
            rows.append(
                (LatencyStats(2.0 * r, 1.9 * r, 2.2 * r, 30), RatioStats(r, r - 0.05, r + 0.05, 3))
            )
        return fp32, rows


@pytest.fixture(scope="module")
def found(digits_model: nn.Module, digits_task: Task) -> SearchResult:
    sp = SearchSpace.build(
        digits_model, digits_task, w_bits=(4, 6, 8), keep=(1.0,), calibration=128
    )
    result = search(
        sp.model, sp.task, sp, ["latency<=0.9x"], "random", budget=8, seed=0,
        latency=BopsShare(sp), max_drop=5.0, progress=False,
    )  # fmt: skip
    assert result.best is not None
    feasible = {e.policy.id for e in result.evaluations if e.result.feasible}
    assert len(feasible) >= 3, "the fixture needs several feasible policies"
    return result


def test_a_best_policy_that_meets_the_limit_as_measured_is_kept(found: SearchResult) -> None:
    machine = ScriptedMachine([0.8, 0.85, 0.7, 0.6])
    checked = verify_latency(found, machine)
    assert checked.best is found.best
    assert machine.asked[0] == found.best.policy.id and len(set(machine.asked)) == len(
        machine.asked
    )
    verdict = checked.notes["latency_measured"]
    assert verdict["chosen"] == found.best.policy.id
    assert verdict["candidates"][0]["measured_ratio"] == 0.8
    assert "measured 0.800x fp32" in checked.message
    json.dumps(checked.to_dict())


def test_a_best_that_misses_when_measured_gives_way_to_the_next_that_meets_it(
    found: SearchResult,
) -> None:
    machine = ScriptedMachine([0.95, 0.93, 0.88, 0.5])
    checked = verify_latency(found, machine)
    assert checked.best is not None and checked.best is not found.best
    assert checked.best.policy.id == machine.asked[2]  # the first candidate that meets it
    second_metric = checked.best.result.metric
    third = next(e for e in found.evaluations if e.policy.id == machine.asked[3])
    assert second_metric is not None and third.result.metric is not None
    assert second_metric >= third.result.metric  # candidates go best metric first
    assert "missed its latency limit when measured" in checked.message
    assert checked.notes["latency_measured"]["candidates"][0]["ok"] is False


def test_no_candidate_meeting_the_limit_as_measured_means_no_feasible_policy(
    found: SearchResult,
) -> None:
    checked = verify_latency(found, ScriptedMachine([0.95, 0.92, 1.1, 0.91]), candidates=4)
    assert not checked.feasible and checked.policy is None
    assert checked.closest is found.best
    assert checked.message.startswith("NO FEASIBLE POLICY AS MEASURED")
    assert "latency<=0.9x: 0.95 (limit 0.9) VIOLATED" in checked.message
    assert checked.notes["latency_measured"]["chosen"] is None


def test_results_without_a_latency_limit_are_left_alone(sp_free: SearchResult) -> None:
    assert verify_latency(sp_free, ScriptedMachine([2.0])) is sp_free


@pytest.fixture(scope="module")
def sp_free(digits_model: nn.Module, digits_task: Task) -> SearchResult:
    sp = SearchSpace.build(digits_model, digits_task, w_bits=(4, 8), keep=(1.0,), calibration=64)
    return search(sp.model, sp.task, sp, ["size<=0.5x"], "random", budget=2, progress=False)


def test_the_search_command_times_its_candidates_whole(
    digits_model: nn.Module, digits_task: Task, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real timings: whatever they say on this machine, the policy kept is one measured to
    meet the limit, and feasibility follows the measurement."""
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path))
    _, _, latency, result = search_task(
        digits_model, digits_task, Constraints.parse(["latency<=0.95x"], 5.0),
        strategy="random", budget=4, seed=0,
        choices=SpaceChoices(w_bits=(8,), a_bits=(8,), keep=(0.5, 1.0)), quick=True,
    )  # fmt: skip
    assert isinstance(latency, LutLatency) and isinstance(latency.table, LatencyTable)
    verdict = result.notes.get("latency_measured")
    if verdict is None:  # nothing met the limit even by the table
        assert not result.feasible
        return
    rows = verdict["candidates"]
    assert rows and all(r["measured_ratio"] > 0 and r["rounds"] >= 2 for r in rows)
    assert all(r["ok"] == (r["measured_ratio"] <= 0.95) for r in rows)
    if verdict["chosen"] is None:
        assert not result.feasible
    else:
        assert result.best is not None and result.best.policy.id == verdict["chosen"]
        assert next(r for r in rows if r["policy"] == verdict["chosen"])["ok"]
