"""What a search may choose, as one value: the bits, keep ratios and how channels are cut.

``edgeslim search``, the recipe stage ``kind: search`` and the benchmark all describe their
space with a :class:`SpaceChoices` and build it with :meth:`SpaceChoices.build`, so a new
choice is added in one place. Decision: ``round_to`` defaults to
:data:`~edgeslim.runtime.machine.KERNEL_BLOCK` here, as the surfaces (and the prune stage)
prefer, where :meth:`SearchSpace.build` keeps free widths (1) for Python callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeslim.runtime.machine import KERNEL_BLOCK

if TYPE_CHECKING:
    from torch import nn

    from edgeslim.search.space import SearchSpace
    from edgeslim.task import Task


@dataclass(frozen=True)
class SpaceChoices:
    """Per-layer bit choices and per-group keep choices, and how pruning is carried out
    (see :meth:`~edgeslim.search.space.SearchSpace.build` for each field)."""

    w_bits: tuple[int, ...] = (4, 6, 8)
    a_bits: tuple[int | None, ...] = (8,)
    keep: tuple[float, ...] = (0.5, 0.75, 1.0)
    criterion: str = "l1"
    round_to: int = KERNEL_BLOCK
    skip: tuple[str, ...] = ()  # layers (FQNs or globs) whose groups are never pruned
    exclude: tuple[str, ...] = ()  # layers kept float and not searched
    depth: bool = False
    reconstruct: bool | None = None
    calibration: int = 256  # calibration samples PTQ calibrates each policy on

    def build(self, model: nn.Module, task: Task, seed: int = 0) -> SearchSpace:
        from edgeslim.search.space import SearchSpace

        return SearchSpace.build(
            model, task, w_bits=self.w_bits, a_bits=self.a_bits, keep=self.keep,
            criterion=self.criterion, round_to=self.round_to, skip=self.skip,
            exclude=self.exclude, calibration=self.calibration, seed=seed, depth=self.depth,
            reconstruct=self.reconstruct,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
