"""What a data-free method did, as data: the layers it changed, the bits per layer, the MACs
it removed, and per layer or pair what it did or why not. A method that silently does
nothing looks like one that works; this record (and the notes made from it) is the proof.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeslim.cost.change import MacsChange


@dataclass
class DataFreeReport(MacsChange):
    """Filled by the method (``pairs``, ``layers``, pruning fields) and by
    :func:`edgeslim.datafree.compress_datafree` (``changed``, ``weight_bits``, MACs)."""

    method: str = ""
    changed: list[str] = field(default_factory=list)  # weights or bias differ from the fold
    weight_bits: dict[str, int] = field(default_factory=dict)
    # "producer -> consumer": what the method did with the pair, or why it could not
    pairs: dict[str, str] = field(default_factory=dict)
    # layer FQN: what the method did to it, or why not (e.g. why it stayed at high bits)
    layers: dict[str, str] = field(default_factory=dict)
    prune_ratio: float = 0.0  # requested fraction of the MACs (cost_report) to remove
    predicted_reduction: float | None = None  # what the channel choice aimed at
    channels_removed: dict[str, int] = field(default_factory=dict)  # by producer
    macs_before: int = 0
    macs_after: int = 0
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: what changed, the bits, and (pruning) requested vs achieved MACs."""
        bits: dict[int, int] = {}
        for b in self.weight_bits.values():
            bits[b] = bits.get(b, 0) + 1
        hist = ", ".join(f"{n} at {b}" for b, n in sorted(bits.items()))
        text = (f"{self.method}: {len(self.changed)}/{len(self.weight_bits)} layers changed; "
                f"weight bits: {hist}")  # fmt: skip
        if self.prune_ratio > 0 or self.channels_removed:
            removed, groups = sum(self.channels_removed.values()), len(self.channels_removed)
            text += (f"; MACs -{self.macs_reduction:.1%} (requested -{self.prune_ratio:.1%}), "
                     f"{removed} channels removed in {groups} groups")  # fmt: skip
        return text

    def lines(self) -> list[str]:
        """The notes: summary, warnings, then every pair and layer entry."""
        out = [self.summary()]
        out += [f"WARNING: {w}" for w in self.warnings]
        out += [f"{k}: {v}" for k, v in self.pairs.items()]
        out += [f"{k}: {v}" for k, v in self.layers.items()]
        return out
