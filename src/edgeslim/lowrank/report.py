"""What a factorization did, as data: per layer its FQN, ranks and MACs, and why any layer
was left dense. MACs come from the layer table of the model before and after, never from
the request, so the report shows what was achieved."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeslim.cost.change import MacsChange


@dataclass(frozen=True)
class LayerRank:
    """One factorized layer. ``shape`` is the factorized matrix ``out x in`` (a conv's
    ``N x C k k``); ``max_rank = min(shape)``; ``original_rank`` the numerical rank of the
    weight before (below ``max_rank`` after TRP); ``energy`` the fraction of the squared
    singular values kept; MACs for one pass over the example inputs."""

    fqn: str
    type: str
    shape: tuple[int, int]
    max_rank: int
    original_rank: int
    kept_rank: int
    energy: float
    macs_before: int
    macs_after: int


@dataclass
class LowRankReport(MacsChange):
    """Filled by :func:`edgeslim.lowrank.factorize_` (``method`` "svd") and by TRP ("trp")."""

    method: str
    layers: list[LayerRank] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # FQN: why it was left dense
    macs_before: int = 0
    macs_after: int = 0
    requested_macs_reduction: float | None = None
    energy: float | None = None  # the per-layer energy threshold, if that was the rule

    def summary(self) -> str:
        """One line: layers factorized, the rule and the MACs achieved."""
        if self.requested_macs_reduction is not None:
            rule = f"-{self.requested_macs_reduction:.1%} MACs requested"
        elif self.energy is not None:
            rule = f"energy {self.energy}"
        else:
            rule = "given ranks"
        return (
            f"{self.method}: {len(self.layers)} layers factorized ({rule}), "
            f"{len(self.skipped)} left dense; MACs {self.macs_before:,} -> {self.macs_after:,} "
            f"(-{self.macs_reduction:.1%})"
        )

    def lines(self) -> list[str]:
        """The notes: summary, every factorized layer, then every layer left dense and why."""
        out = [self.summary()]
        out += [
            f"{r.fqn}: rank {r.original_rank}/{r.max_rank} -> {r.kept_rank} "
            f"(energy {r.energy:.3f}), MACs {r.macs_before:,} -> {r.macs_after:,}"
            for r in self.layers
        ]
        out += [f"{k}: {v}" for k, v in self.skipped.items()]
        return out
