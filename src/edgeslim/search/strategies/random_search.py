"""``random``: random sampling of the space, the baseline every other strategy must beat.

Decision (2026-12-06): by default each draw first picks how much to compress, a level
``u`` uniform in [0, 1], then sends each coordinate, with probability ``u``, to one of its
compressed choices (uniformly) and leaves it at its least compressed choice otherwise
(``sampler="levels"``). Drawing every coordinate uniformly (``sampler="uniform"``) puts
nearly every policy of a space with many coordinates at the same overall compression (the
share of compressed coordinates concentrates around its mean as their number grows): on
mobilenetv2-imagenet's 74 coordinates none of the 28 policies measured in the committed
``bench search`` run held the 10-point agreement limit (the closest lost 18 points), while
each of the other strategies found one. Drawing the level first spreads the draws from
barely to fully compressed, and every coordinate is still equally likely to move.
"""

from __future__ import annotations

from edgeslim.search.errors import SearchError
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy
from edgeslim.search.strategies.base import Context, GeneStrategy, register

SAMPLERS = ("levels", "uniform")


@register("random")
class RandomSearch(GeneStrategy):
    """Each ask draws a random policy (see the module doc for ``sampler``), never repeating
    an asked one."""

    name = "random"

    def __init__(self, ctx: Context, sampler: str = "levels") -> None:
        super().__init__(ctx)
        if sampler not in SAMPLERS:
            raise SearchError(f"random: sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
        self.sampler = sampler

    def level_genes(self) -> list[int]:
        """A level ``u`` uniform in [0, 1], then each coordinate compressed with
        probability ``u`` (a uniform compressed choice) or left at its top choice."""
        u = self.rng.random()
        return [
            self.rng.randrange(n - 1) if n > 1 and self.rng.random() < u else n - 1
            for n in self.sizes
        ]

    def ask(self) -> Policy | None:
        genes = self.unseen(self.level_genes if self.sampler == "levels" else self.random_genes)
        if genes is None:
            self._finished = True  # every policy of a small space was asked
            return None
        return self.mark(genes)

    def tell(self, policy: Policy, result: EvalResult) -> None:
        return None
