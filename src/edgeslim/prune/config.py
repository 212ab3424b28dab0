"""``PruneConfig``: the planner's choices as one frozen value.

:func:`~edgeslim.prune.planner.plan_keep`, :func:`~edgeslim.prune.planner.plan_pruning` and
:func:`~edgeslim.prune.planner.prune_` read their budget and ranking options from it, so the
options are declared and checked in one place, and a search or a recipe can hold, compare
and save them as data (:meth:`PruneConfig.to_dict` is JSON).

Decision — keyword options stay: ``prune_(model, x, "l1", macs_reduction=0.3)`` builds the
config from the keywords (:meth:`PruneConfig.build`), as Torch-Pruning's keywords do; an
unknown keyword is refused naming the allowed ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeslim.errors import PruneError


@dataclass(frozen=True)
class PruneConfig:
    """How much to prune and how to choose the channels (see :mod:`edgeslim.prune.planner`).

    Exactly one budget: ``macs_reduction`` (a fraction of the model's MACs, in (0, 1)) or
    ``ratio`` (one fraction for every group, or ``{group key or glob: fraction}``).
    ``global_ranking``: rank every channel against every other under a MACs target (else
    one uniform ratio, found by bisection). ``round_to``: kept widths are multiples of it.
    ``skip``: layers (FQNs or globs) whose shapes must not change. ``max_group_ratio``: no
    group loses more than this fraction. ``latency_weight``: tilt the global ranking
    towards the MACs that are slow on this machine (needs ``macs_reduction`` and
    ``global_ranking``; see :mod:`edgeslim.prune.latency_rank`).
    """

    macs_reduction: float | None = None
    ratio: float | Mapping[str, float] | None = None
    global_ranking: bool = True
    round_to: int = 1
    skip: tuple[str, ...] = ()
    max_group_ratio: float = 0.9
    latency_weight: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", tuple(self.skip))
        if isinstance(self.ratio, Mapping):
            object.__setattr__(self, "ratio", dict(self.ratio))
        if (self.macs_reduction is None) == (self.ratio is None):
            raise PruneError("give exactly one of macs_reduction (a MACs target) or ratio")
        if self.macs_reduction is not None and not 0.0 < self.macs_reduction < 1.0:
            raise PruneError(f"macs_reduction must be in (0, 1); got {self.macs_reduction}")
        ratio = self.ratio
        ratios = list(ratio.values()) if isinstance(ratio, Mapping) else [ratio]
        bad = [r for r in ratios if r is not None and not 0.0 <= r < 1.0]
        if bad:
            raise PruneError(f"a pruning ratio must be in [0, 1); got {bad[0]}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int):
            raise PruneError(f"round_to must be an integer >= 1; got {self.round_to!r}")
        if self.round_to < 1:
            raise PruneError(f"round_to must be >= 1; got {self.round_to}")
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
    def names(cls) -> tuple[str, ...]:
        """The option names (what :meth:`build` accepts as keywords)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, config: PruneConfig | None = None, **options: Any) -> PruneConfig:
        """``config`` with ``options`` replaced, or a new config from ``options`` alone."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise PruneError(
                f"unknown pruning option(s) {', '.join(unknown)}; allowed: {', '.join(cls.names())}"
            )
        if config is None:
            return cls(**options)
        return dataclasses.replace(config, **options) if options else config

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``skip`` as a list)."""
        out = {name: getattr(self, name) for name in self.names()}
        out["skip"] = list(self.skip)
        return out
