"""``MacsChange``: the MACs a compression achieved, for the reports that state it.

The data-free and low-rank reports both record the MACs before and after (counted on the
models by the layer table, never taken from the request) and derive the fraction removed;
this mixin holds that derivation once.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


class MacsChange:
    """Mixin for a dataclass with ``macs_before`` and ``macs_after`` fields."""

    macs_before: int
    macs_after: int

    @property
    def macs_reduction(self) -> float:
        """Achieved fraction of the whole model's MACs removed (0 when nothing was counted)."""
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The dataclass's fields, plus the achieved ``macs_reduction``."""
        out = asdict(self)  # type: ignore[call-overload]
        out["macs_reduction"] = round(self.macs_reduction, 6)
        return dict(out)
