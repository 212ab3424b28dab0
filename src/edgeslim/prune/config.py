"""``PruneConfig`` and ``GateConfig``: the planner's and the learned gates' choices, each
one frozen value.

:func:`~edgeslim.prune.planner.plan_keep`, :func:`~edgeslim.prune.planner.plan_pruning` and
:func:`~edgeslim.prune.planner.prune_` read their budget and ranking options from a
:class:`PruneConfig`, :func:`~edgeslim.prune.gates.train_gates` from a :class:`GateConfig`,
so the options are declared and checked in one place, and a search or a recipe can hold,
compare and save them as data (``to_dict()`` is JSON).

Decision — keyword options stay: ``prune_(model, x, "l1", macs_reduction=0.3)`` builds the
config from the keywords (``build``), as Torch-Pruning's keywords do; an unknown keyword is
refused naming the allowed ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from edgeslim.errors import PruneError

GateMode = Literal["hard", "soft"]

MACS_TOLERANCE = 0.02
"""Largest gap, either way, between a requested and an achieved MACs reduction (2 points):
the prune and datafree stages fail beyond it, and learned gates that switched off more
than this beyond the target bring the best of those channels back."""


def check_ratios(ratio: float | Mapping[str, float] | None) -> None:
    """Every pruning ratio (one, or one per group key / glob) is in [0, 1)."""
    ratios = list(ratio.values()) if isinstance(ratio, Mapping) else [ratio]
    bad = [r for r in ratios if r is not None and not 0.0 <= r < 1.0]
    if bad:
        raise PruneError(f"a pruning ratio must be in [0, 1); got {bad[0]}")


def _check_round_to(round_to: object) -> None:
    if isinstance(round_to, bool) or not isinstance(round_to, int):
        raise PruneError(f"round_to must be an integer >= 1; got {round_to!r}")
    if round_to < 1:
        raise PruneError(f"round_to must be >= 1; got {round_to}")


class _Options:
    """Keyword building and JSON for the frozen option dataclasses below."""

    KIND = "pruning"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names (what :meth:`build` accepts as keywords)."""
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def build(cls, config: Any = None, **options: Any) -> Any:
        """``config`` with ``options`` replaced, or a new config from ``options`` alone."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise PruneError(
                f"unknown {cls.KIND} option(s) {', '.join(unknown)}; allowed: "
                f"{', '.join(cls.names())}"
            )
        if config is None:
            missing = [
                f.name
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.name not in options
            ]
            if missing:
                raise PruneError(f"{cls.__name__} needs {', '.join(missing)} (no default)")
            return cls(**options)
        return dataclasses.replace(config, **options) if options else config

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        out = {name: getattr(self, name) for name in self.names()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class PruneConfig(_Options):
    """How much to prune and how to choose the channels (see :mod:`edgeslim.prune.planner`).

    Exactly one budget: ``macs_reduction`` (a fraction of the model's MACs, in (0, 1)) or
    ``ratio`` (one fraction for every group, or ``{group key or glob: fraction}``).
    ``global_ranking``: rank every channel against every other under a MACs target (else
    one uniform ratio, found by bisection). ``round_to``: kept widths are multiples of it.
    ``skip``: layers (FQNs or globs) whose shapes must not change. ``max_group_ratio``: no
    group loses more than this fraction. ``latency_weight``: tilt the global ranking
    towards the MACs that are slow on this machine (needs ``macs_reduction`` and
    ``global_ranking``; see :mod:`edgeslim.prune.latency_rank`). ``allow_target_miss``: a
    plan whose measured reduction is more than :data:`MACS_TOLERANCE` from
    ``macs_reduction`` (a model whose smallest step is coarser) is kept instead of refused.
    """

    macs_reduction: float | None = None
    ratio: float | Mapping[str, float] | None = None
    global_ranking: bool = True
    round_to: int = 1
    skip: tuple[str, ...] = ()
    max_group_ratio: float = 0.9
    latency_weight: float = 0.0
    allow_target_miss: bool = False

    def __post_init__(self) -> None:
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)  # one glob
        object.__setattr__(self, "skip", skip)
        if isinstance(self.ratio, Mapping):
            object.__setattr__(self, "ratio", dict(self.ratio))
        if (self.macs_reduction is None) == (self.ratio is None):
            raise PruneError("give exactly one of macs_reduction (a MACs target) or ratio")
        if self.macs_reduction is not None and not 0.0 < self.macs_reduction < 1.0:
            raise PruneError(f"macs_reduction must be in (0, 1); got {self.macs_reduction}")
        check_ratios(self.ratio)
        _check_round_to(self.round_to)
        if not 0.0 < self.max_group_ratio < 1.0:
            raise PruneError(f"max_group_ratio must be in (0, 1); got {self.max_group_ratio}")
        if not self.latency_weight >= 0.0:
            raise PruneError(f"latency_weight must be >= 0; got {self.latency_weight}")
        if self.latency_weight and not (self.global_ranking and self.macs_reduction is not None):
            raise PruneError(
                "latency_weight tilts the global ranking under a MACs target: it needs "
                "macs_reduction and global_ranking=True (a ratio or a uniform plan has no "
                "ranking to tilt)"
            )

    @classmethod
    def build(cls, config: PruneConfig | None = None, **options: Any) -> PruneConfig:
        """``config`` with ``options`` replaced, or a new config from ``options`` alone."""
        out: PruneConfig = super().build(config, **options)
        return out


@dataclass(frozen=True)
class GateConfig(_Options):
    """Learned gates (:func:`~edgeslim.prune.gates.train_gates`): the budget and how the
    gates learn it.

    ``macs_reduction``: the fraction of the MACs to remove, in [0, 1). ``lam``: weight of
    the MACs penalty. ``gate_lr``/``gate_momentum``: the gates' own SGD (their gradients
    are ~1e-3). ``enforce_at``: training progress from which the budget is a hard
    projection (None: the penalty alone). ``mode``: ``hard`` (straight-through 0/1) or
    ``soft`` gates; ``k0``/``k_max``: the surrogate's sharpness schedule (``k0`` None: the
    gate set's default). ``round_to``: kept widths are multiples of it. ``max_overshoot``:
    when the trained gates removed more than this fraction of the MACs beyond
    ``macs_reduction``, the switched-off channels with the highest gates come back until
    the reduction is within it, landing anywhere within ``max_overshoot`` of the target
    either way (a model whose smallest step is coarser cannot land closer); None (the
    default): the gates' structure as trained, however far past the target. The prune
    stage sets it to :data:`MACS_TOLERANCE`, the gap it accepts.
    """

    KIND = "gate"

    macs_reduction: float
    lam: float = 1.0
    gate_lr: float = 10.0
    gate_momentum: float = 0.9
    enforce_at: float | None = 0.5
    mode: GateMode = "hard"
    k0: float | None = None
    k_max: float = 200.0
    round_to: int = 1
    max_overshoot: float | None = None

    def __post_init__(self) -> None:
        if self.max_overshoot is not None and not 0.0 <= self.max_overshoot < 1.0:
            raise PruneError(f"max_overshoot must be in [0, 1) or None; got {self.max_overshoot}")
        if not 0.0 <= self.macs_reduction < 1.0:
            raise PruneError(f"macs_reduction must be in [0, 1); got {self.macs_reduction}")
        if self.mode not in ("hard", "soft"):
            raise PruneError(f"mode must be hard or soft; got {self.mode!r}")
        if self.enforce_at is not None and not 0.0 <= self.enforce_at <= 1.0:
            raise PruneError(f"enforce_at must be in [0, 1] or None; got {self.enforce_at}")
        if not (self.lam >= 0.0 and self.gate_lr > 0.0 and 0.0 <= self.gate_momentum < 1.0):
            raise PruneError(
                "lam must be >= 0, gate_lr > 0 and gate_momentum in [0, 1); got "
                f"{self.lam}, {self.gate_lr}, {self.gate_momentum}"
            )
        _check_round_to(self.round_to)

    @classmethod
    def build(cls, config: GateConfig | None = None, **options: Any) -> GateConfig:
        """``config`` with ``options`` replaced, or a new config from ``options`` alone."""
        out: GateConfig = super().build(config, **options)
        return out
