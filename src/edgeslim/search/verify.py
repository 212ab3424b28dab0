"""A search's latency limits checked on the exported models, not only on the table.

The per-layer table (:mod:`edgeslim.cost.lut`) lets a search screen thousands of policies
for the cost of a sum, but a user deploys a whole ONNX file, and on a shared machine the
int8/float ratio itself moves by more than the table's error (measured on a 2-core VM:
resnet20's all-int8 model between 0.66x and 0.87x of fp32 from one second to the next on
2 threads;
see :func:`~edgeslim.cost.latency.ratio_over_rounds`). So a search with a latency limit
ends by timing candidates whole: its best feasible policy, then the next best feasible
ones by the metric, up to ``candidates``, interleaved with the float model in one timing
(in windows a gap apart: :class:`~edgeslim.cost.latency.Windows`).

The result keeps the first candidate, in that order, whose measurement meets every latency
limit: for an ``x`` limit, the median of its round-by-round ratio to the float model; for an
absolute one, its median milliseconds. When none does, the search has no feasible policy,
and its message gives the table's figure, the measured one and the spread of the rounds.

Decisions: the measurement decides, not the table. It is not repeated until it passes: a
miss within the spread of the rounds is still reported as a miss, with the spread, so the
user sees how close it was; the windows stop when two agree, whatever the limit says.
Absolute limits (``latency<=5ms``) compare milliseconds timed in this process; relative
ones compare ratios, which carry less of the machine's drift.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgeslim.cost.latency import LatencyStats, RatioStats
from edgeslim.search.constraints import Check, Constraint
from edgeslim.search.run import Evaluation, SearchResult
from edgeslim.search.space import Costs

CANDIDATES = 4  # feasible policies timed whole, at most, after a search with a latency limit


@dataclass(frozen=True)
class MeasuredLatency:
    """One candidate timed whole: the table's ratio to fp32 beside the measured one."""

    policy_id: str
    metric: float | None
    predicted_ratio: float | None
    measured_ms: float
    ratio: RatioStats
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def table_error(self) -> float | None:
        """How far the table's ratio is from the measured one, relative to the measured."""
        if self.predicted_ratio is None or self.ratio.median <= 0:
            return None
        return round(abs(self.predicted_ratio - self.ratio.median) / self.ratio.median, 4)

    def describe(self) -> str:
        table = "" if self.predicted_ratio is None else f"table {self.predicted_ratio:.3f}x, "
        return (
            f"{self.policy_id}: {table}measured {self.ratio.median:.3f}x fp32 (rounds "
            f"p10-p90 {self.ratio.p10:.3f}-{self.ratio.p90:.3f}, {self.ratio.rounds} rounds"
            f"{_windows(self.ratio.windows)}), " + "; ".join(str(c) for c in self.checks)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy_id, "metric": self.metric,
            "predicted_ratio": self.predicted_ratio, "measured_ms": round(self.measured_ms, 4),
            "measured_ratio": round(self.ratio.median, 4), "table_error": self.table_error,
            "ratio_p10": round(self.ratio.p10, 4), "ratio_p90": round(self.ratio.p90, 4),
            "rounds": self.ratio.rounds, "window_ratios": [round(w, 4) for w in self.ratio.windows],
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
        }  # fmt: skip


def _windows(medians: tuple[float, ...]) -> str:
    if len(medians) < 2:
        return ""
    return ", windows " + " ".join(f"{m:.3f}x" for m in medians)


@dataclass(frozen=True)
class LatencyVerdict:
    """The candidates timed whole and the one kept (None: none met the limits)."""

    fp32_ms: float
    candidates: tuple[MeasuredLatency, ...]
    chosen: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"fp32_ms": round(self.fp32_ms, 4), "chosen": self.chosen,
                "candidates": [c.to_dict() for c in self.candidates]}  # fmt: skip


def _measured_checks(
    limits: tuple[Constraint, ...], stats: LatencyStats, ratio: RatioStats, fp32: LatencyStats
) -> tuple[Check, ...]:
    """Each latency limit checked on the measurement (ratio for ``x``, ms otherwise)."""
    checks = []
    for c in limits:
        if c.relative:  # the per-round median ratio, expressed against the float median
            costs = Costs(0, 0, 0, 0, latency=ratio.median * fp32.median_ms)
        else:
            costs = Costs(0, 0, 0, 0, latency=stats.median_ms)
        checks.append(c.check(costs, Costs(0, 0, 0, 0, latency=fp32.median_ms)))
    return tuple(checks)


def _candidates(result: SearchResult, n: int) -> list[Evaluation]:
    """The search's best, then the other feasible measured policies by metric (best first)."""
    assert result.best is not None
    seen = {result.best.policy.id}
    out = [result.best]
    others = [e for e in result.evaluations if e.result.feasible and e.result.metric is not None]
    for e in sorted(others, key=lambda e: -(e.result.metric or 0.0)):
        if len(out) >= n:
            break
        if e.policy.id not in seen:
            seen.add(e.policy.id)
            out.append(e)
    return out


def measure_candidates(
    candidates: Sequence[Evaluation], limits: Sequence[Constraint], latency: Any
) -> tuple[LatencyVerdict, Evaluation | None]:
    """Time ``candidates`` whole, interleaved with the float model in one run, check each
    on ``limits`` (the latency ones), and keep the first, in the order given, that meets
    them all (None: none did)."""
    lat = tuple(c for c in limits if c.cost == "latency")
    fp32, timed = latency.measure_against_float([e.policy for e in candidates])
    rows = tuple(
        MeasuredLatency(
            e.policy.id, e.result.metric, e.result.relative.get("latency"), stats.median_ms,
            ratio, _measured_checks(lat, stats, ratio, fp32),
        )
        for e, (stats, ratio) in zip(candidates, timed, strict=True)
    )  # fmt: skip
    kept = next((e for e, row in zip(candidates, rows, strict=True) if row.ok), None)
    return LatencyVerdict(fp32.median_ms, rows, None if kept is None else kept.policy.id), kept


def verify_latency(
    result: SearchResult, latency: Any, candidates: int = CANDIDATES
) -> SearchResult:
    """``result`` with its latency limits checked on the exported models (see module doc).

    ``latency`` is the search's :class:`~edgeslim.search.latency.LutLatency` (anything with
    ``measure_against_float(policies)``). A result without a latency limit, or without a
    feasible policy, is returned as it is.
    """
    limits = tuple(c for c in result.constraints.limits if c.cost == "latency")
    if not limits or result.best is None:
        return result
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1; got {candidates}")
    verdict, kept = measure_candidates(_candidates(result, candidates), limits, latency)
    rows = verdict.candidates
    notes = {**result.notes, "latency_measured": verdict.to_dict()}
    first = rows[0].describe()
    if kept is result.best:
        message = f"{result.message}\nlatency measured whole: {first}"
        return dataclasses.replace(result, notes=notes, message=message)
    if kept is not None:
        r = kept.result
        metric = "?" if r.metric is None else f"{r.metric:.4g}"
        message = (
            f"best feasible policy by the table missed its latency limit when measured "
            f"({first}); kept the next best that meets it as measured: {kept.policy.id} "
            f"({kept.policy.describe()}): {result.metric} {metric}; "
            + next(row for row in rows if row.policy_id == kept.policy.id).describe()
        )
        return dataclasses.replace(result, best=kept, notes=notes, message=message)
    measured = "\n  ".join(row.describe() for row in rows)
    message = (
        f"NO FEASIBLE POLICY AS MEASURED: the {len(rows)} best policies that met every "
        f"constraint by the latency table missed a latency limit when exported and timed "
        f"whole against the float model:\n  {measured}\nClosest (not a solution): "
        f"{result.best.policy.id} ({result.best.policy.describe()})"
    )
    return dataclasses.replace(result, best=None, closest=result.best, notes=notes, message=message)
