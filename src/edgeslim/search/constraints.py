"""Constraints as data: ``macs<=0.5x``, ``size<=0.25x``, ``bops<=0.1x``, ``memory<=2MB``,
``latency<=0.6x``, ``drop<=1``.

Syntax: ``COST<=VALUE[UNIT]``, one constraint per string, any combination at once.

=========  ==========================================  ==================================
cost       absolute units                              meaning
=========  ==========================================  ==================================
macs       none, K, M, G, T                            multiply-accumulates per forward
bops       none, K, M, G, T                            MACs x weight bits x act. bits
size       B, kB/KB, MB, GB, KiB, MiB, GiB (none: B)   bytes of parameters at their bits
memory     same as size                                peak activation bytes
latency    ms, us, s (needs a LatencyPredictor)        predicted latency
drop       none (points of the task's metric)          max drop of the metric (accuracy)
=========  ==========================================  ==================================

``x`` (or ``%``) makes a limit relative to the uncompressed float model: ``size<=0.25x``
is a quarter of its fp32 bytes. Analytic limits (macs, bops, size, memory, and latency
through a predictor) are checked from the policy alone, before any accuracy is measured, so
a policy that breaks one is rejected for the cost of a layer-table pass. Every check
reports the achieved value next to the limit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from edgeslim.search.errors import ConstraintError
from edgeslim.search.policy import Policy
from edgeslim.search.space import Costs

ANALYTIC = ("macs", "bops", "size", "memory", "latency")
NAMES = (*ANALYTIC, "drop")
_COUNT = {"": 1.0, "K": 1e3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BYTES = {
    "": 1.0, "B": 1.0, "kB": 1e3, "KB": 1e3, "K": 1e3, "k": 1e3, "MB": 1e6, "M": 1e6,
    "GB": 1e9, "G": 1e9, "KiB": 1024.0, "MiB": 1024.0**2, "GiB": 1024.0**3,
}  # fmt: skip
_TIME = {"ms": 1.0, "us": 1e-3, "s": 1e3}
_UNITS: dict[str, dict[str, float]] = {
    "macs": _COUNT, "bops": _COUNT, "size": _BYTES, "memory": _BYTES, "latency": _TIME,
    "drop": {"": 1.0},
}  # fmt: skip
_NUMBER = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(?:[eE]([-+]?\d+))?\s*([A-Za-z%]*)$")
_EPS = 1e-12


@runtime_checkable
class LatencyPredictor(Protocol):
    """Predicts a policy's latency; ``predict(None)`` is the uncompressed float model.

    ``unit`` is ``"ms"`` (absolute, so both ``latency<=5ms`` and ``latency<=0.6x`` work) or
    ``"x"`` (already relative to the float model: only ``x`` limits work).
    """

    unit: str

    def predict(self, policy: Policy | None) -> float: ...


def _num(v: float) -> str:
    """Shortest text that parses back to exactly ``v`` (an int too)."""
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


@dataclass(frozen=True)
class Constraint:
    """``cost <= limit``; relative limits are fractions of the uncompressed model's cost.

    Absolute limits are stored in base units: MACs, BOPs, bytes, milliseconds, metric points.
    """

    cost: str
    limit: float
    relative: bool = False

    def __post_init__(self) -> None:
        if self.cost not in NAMES:
            raise ConstraintError(f"unknown cost {self.cost!r}; allowed: {', '.join(NAMES)}")
        if not math.isfinite(self.limit) or self.limit < 0:
            raise ConstraintError(f"constraint {self.cost}: the limit must be a number >= 0")
        if self.cost == "drop" and self.relative:
            raise ConstraintError("drop is in points of the task's metric: write drop<=1")
        if self.cost != "drop" and self.limit <= 0:
            raise ConstraintError(f"constraint {self.cost}: the limit must be > 0")

    def __str__(self) -> str:
        if self.relative:
            return f"{self.cost}<={_num(self.limit)}x"
        unit = {"size": "B", "memory": "B", "latency": "ms"}.get(self.cost, "")
        return f"{self.cost}<={_num(self.limit)}{unit}"

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """Parse ``COST<=VALUE[UNIT]`` (see the module doc); errors list what is allowed."""
        if not isinstance(text, str) or "<=" not in text:
            raise ConstraintError(
                f"constraint {text!r}: write COST<=VALUE, e.g. size<=0.25x or macs<=0.5x "
                f"(costs: {', '.join(NAMES)})"
            )
        name, _, value = text.partition("<=")
        cost = name.strip().lower()
        cost = "drop" if cost == "max_drop" else cost
        if cost not in NAMES:
            raise ConstraintError(
                f"constraint {text!r}: unknown cost {name.strip()!r}; allowed: {', '.join(NAMES)}"
            )
        m = _NUMBER.match(value.strip())
        if m is None:
            raise ConstraintError(
                f"constraint {text!r}: the limit must be a non-negative number with an optional "
                f"unit; {_allowed(cost)}"
            )
        number = float(m.group(1) + (f"e{m.group(2)}" if m.group(2) else ""))
        unit = m.group(3)
        if unit in ("x", "%") and cost != "drop":
            return cls(cost, number / (100.0 if unit == "%" else 1.0), relative=True)
        scale = _UNITS[cost].get(unit)
        if scale is None or (cost == "latency" and not unit):
            raise ConstraintError(
                f"constraint {text!r}: unit {unit!r} not allowed; {_allowed(cost)}"
            )
        try:
            return cls(cost, number * scale)
        except ConstraintError as exc:
            raise ConstraintError(f"constraint {text!r}: {exc}") from None

    def check(self, costs: Costs, baseline: Costs) -> Check:
        """Achieved vs limit for ``costs``; relative limits divide by ``baseline``."""
        if self.cost == "drop":
            raise ConstraintError("drop is checked on a measured metric: Constraints.check_drop")
        value = costs.get(self.cost)
        if value is None:
            raise ConstraintError(
                f"constraint {self}: no {self.cost} was predicted; give the search a latency "
                "predictor (a LatencyPredictor with predict(policy))"
            )
        achieved = value
        if self.relative:
            base = baseline.get(self.cost)
            if not base:
                raise ConstraintError(
                    f"constraint {self}: the uncompressed model's {self.cost} is 0"
                )
            achieved = value / base
        ok = achieved <= self.limit * (1 + _EPS)
        excess = 0.0 if ok else achieved / self.limit - 1.0
        return Check(str(self), self.cost, achieved, self.limit, ok, value, excess)


def _allowed(cost: str) -> str:
    units = [u for u in _UNITS[cost] if u]
    rel = " or x/% (relative to the float model)" if cost != "drop" else ""
    listed = ", ".join(units) if units else "none (points of the metric)"
    return f"units of {cost}: {listed}{rel}"


@dataclass(frozen=True)
class Check:
    """One constraint checked: ``achieved`` in the limit's terms (a ratio for ``x`` limits),
    ``value`` in base units, ``excess`` how far past the limit (0 when ``ok``)."""

    constraint: str
    cost: str
    achieved: float
    limit: float
    ok: bool
    value: float
    excess: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "constraint": self.constraint, "cost": self.cost, "achieved": self.achieved,
            "limit": self.limit, "ok": self.ok, "value": self.value, "excess": self.excess,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Check:
        return cls(
            str(data["constraint"]), str(data["cost"]), float(data["achieved"]),
            float(data["limit"]), bool(data["ok"]), float(data["value"]), float(data["excess"]),
        )  # fmt: skip

    def __str__(self) -> str:
        mark = "ok" if self.ok else "VIOLATED"
        return f"{self.constraint}: {self.achieved:.4g} (limit {self.limit:.4g}) {mark}"


@dataclass(frozen=True)
class Constraints:
    """Analytic limits plus an optional ``max_drop`` (points of the task's headline metric,
    measured against the uncompressed model on the validation data)."""

    limits: tuple[Constraint, ...] = ()
    max_drop: float | None = None

    def __post_init__(self) -> None:
        if any(c.cost == "drop" for c in self.limits):
            raise ConstraintError("give drop as max_drop, not among the analytic limits")
        if self.max_drop is None:
            return
        try:  # an int from Python (max_drop=1) is a float here, as the command line's is
            drop = float(self.max_drop)
        except (TypeError, ValueError):
            drop = math.nan
        if not math.isfinite(drop) or drop < 0:
            raise ConstraintError(f"max_drop must be a number >= 0; got {self.max_drop!r}")
        object.__setattr__(self, "max_drop", drop)

    @classmethod
    def parse(
        cls,
        items: Constraints | str | Iterable[str | Constraint] | None = None,
        max_drop: float | None = None,
    ) -> Constraints:
        """From strings (``"size<=0.25x"``; ``"drop<=1"`` sets ``max_drop``) or constraints."""
        if isinstance(items, Constraints):
            if max_drop is not None and items.max_drop not in (None, max_drop):
                raise ConstraintError(f"max_drop given twice: {items.max_drop} and {max_drop}")
            return cls(items.limits, max_drop if max_drop is not None else items.max_drop)
        texts: Iterable[str | Constraint] = [items] if isinstance(items, str) else items or []
        limits: list[Constraint] = []
        drop = max_drop
        for item in texts:
            c = item if isinstance(item, Constraint) else Constraint.parse(item)
            if c.cost == "drop":
                if drop is not None and drop != c.limit:
                    raise ConstraintError(f"max_drop given twice: {drop} and {c.limit}")
                drop = c.limit
            else:
                limits.append(c)
        return cls(tuple(limits), drop)

    @property
    def needs_latency(self) -> bool:
        return any(c.cost == "latency" for c in self.limits)

    @property
    def costs(self) -> tuple[str, ...]:
        """The constrained costs, in order, each once."""
        return tuple(dict.fromkeys(c.cost for c in self.limits))

    def require(self, latency: LatencyPredictor | None) -> None:
        """Refuse up front what could not be checked: a latency limit with no predictor, or
        an absolute latency limit with a relative predictor."""
        if not self.needs_latency:
            return
        if latency is None:
            raise ConstraintError(
                "a latency constraint needs a latency predictor: pass latency=<an object with "
                "predict(policy) -> float and unit 'ms' or 'x'> (e.g. a per-layer ONNX Runtime "
                "lookup table), or drop the latency constraint"
            )
        if latency.unit not in ("ms", "x"):
            raise ConstraintError(
                f"latency predictor unit must be 'ms' or 'x'; got {latency.unit!r}"
            )
        absolute = [str(c) for c in self.limits if c.cost == "latency" and not c.relative]
        if absolute and latency.unit == "x":
            raise ConstraintError(
                f"constraint {absolute[0]}: the latency predictor is relative (unit x); give the "
                "limit relative to the float model, e.g. latency<=0.6x"
            )

    def check_costs(self, costs: Costs, baseline: Costs) -> tuple[Check, ...]:
        return tuple(c.check(costs, baseline) for c in self.limits)

    def check_drop(self, baseline_metric: float, metric: float) -> Check | None:
        """``baseline - metric`` against ``max_drop`` (None when there is no such limit);
        the excess is in fractions of the baseline so it adds up with the cost excesses."""
        if self.max_drop is None:
            return None
        drop = baseline_metric - metric
        ok = drop <= self.max_drop + _EPS
        excess = 0.0 if ok else (drop - self.max_drop) / max(abs(baseline_metric), 1e-9)
        text = f"drop<={_num(self.max_drop)}"
        return Check(text, "drop", drop, self.max_drop, ok, drop, excess)

    def to_list(self) -> list[str]:
        drop = [] if self.max_drop is None else [f"drop<={_num(self.max_drop)}"]
        return [str(c) for c in self.limits] + drop

    def __str__(self) -> str:
        return ", ".join(self.to_list()) or "no constraint"
