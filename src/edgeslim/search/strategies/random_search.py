"""``random``: uniform sampling of the space, the baseline every other strategy must beat."""

from __future__ import annotations

from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy
from edgeslim.search.strategies.base import Context, GeneStrategy, register


@register("random")
class RandomSearch(GeneStrategy):
    """Each ask draws every coordinate uniformly, never repeating an asked policy."""

    name = "random"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)

    def ask(self) -> Policy | None:
        genes = self.unseen(self.random_genes)
        if genes is None:
            self._finished = True  # every policy of a small space was asked
            return None
        return self.mark(genes)

    def tell(self, policy: Policy, result: EvalResult) -> None:
        return None
