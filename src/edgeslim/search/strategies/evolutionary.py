"""``evolutionary``: a (mu + lambda) genetic algorithm with tournament selection.

Each generation is ``population`` children; parents are the best ``population`` policies
seen so far (feasibility first, then the metric: :func:`~.base.reward`), picked by
``tournament``-way tournaments; a child takes each coordinate from either parent (uniform
crossover, probability ``crossover``) and then each coordinate mutates to another choice
with probability ``mutation`` (default one coordinate per child on average; a child equal
to a parent always gets one mutation). The first generation is drawn uniformly, after the
uniform policies that pass the analytic constraints (``warm_start``, default on; see
:meth:`~.base.GeneStrategy.warm_start`).
"""

from __future__ import annotations

from collections.abc import Callable

from edgeslim.search.errors import SearchError
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy
from edgeslim.search.strategies.base import Context, GeneStrategy, register, reward


@register("evolutionary")
class Evolutionary(GeneStrategy):
    """Generational GA over the space's choice indices (see the module doc)."""

    name = "evolutionary"

    def __init__(
        self,
        ctx: Context,
        population: int = 8,
        tournament: int = 2,
        crossover: float = 0.9,
        mutation: float | None = None,
        warm_start: bool = True,
    ) -> None:
        super().__init__(ctx)
        if population < 2 or tournament < 1:
            raise SearchError("evolutionary: population must be >= 2 and tournament >= 1")
        self.population = population
        self.tournament = tournament
        self.crossover = crossover
        self.mutation = mutation if mutation is not None else 1.0 / max(len(self.sizes), 1)
        self.parents: list[tuple[float, int, list[int]]] = []  # (reward, order, genes)
        self.queue: list[list[int]] = []
        self.waiting = 0
        self.told: list[tuple[float, int, list[int]]] = []
        self.generation = 0
        self._order = 0
        if warm_start:
            self.queue = self.warm_start(population)
        self._fill(self.random_genes, population - len(self.queue))

    def _fill(self, make: Callable[[], list[int]], count: int | None = None) -> None:
        for _ in range(self.population if count is None else count):
            genes = self.unseen(make)
            if genes is None:
                break
            self.mark(genes)
            self.queue.append(genes)
        if not self.queue:
            self._finished = True

    def ask(self) -> Policy | None:
        if not self.queue:
            return None
        genes = self.queue.pop(0)
        self.waiting += 1
        return self.policy(genes)

    def tell(self, policy: Policy, result: EvalResult) -> None:
        self.told.append((reward(result), self._order, list(self.space.encode(policy))))
        self._order += 1
        self.waiting -= 1
        if self.waiting == 0 and not self.queue:
            self._breed()

    def _breed(self) -> None:
        pool = sorted(self.parents + self.told, key=lambda t: (-t[0], t[1]))
        self.parents, self.told = pool[: self.population], []
        self.generation += 1
        best = self.parents[0]
        self.notes.update(generations=self.generation, best_reward=best[0])
        self._fill(self._child)

    def _pick(self) -> list[int]:
        entrants = [self.rng.randrange(len(self.parents)) for _ in range(self.tournament)]
        return self.parents[min(entrants)][2]  # parents are sorted: lowest index wins

    def _child(self) -> list[int]:
        a, b = self._pick(), self._pick()
        if self.rng.random() < self.crossover:
            child = [x if self.rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)]
        else:
            child = list(a)
        mutated = False
        for i, n in enumerate(self.sizes):
            if self.rng.random() < self.mutation:
                child[i] = self._other(child[i], n)
                mutated = True
        if not mutated and child in (a, b) and self.sizes:
            i = self.rng.randrange(len(self.sizes))
            child[i] = self._other(child[i], self.sizes[i])
        return child

    def _other(self, value: int, n: int) -> int:
        """A different choice index: half the time a neighbour, else any other."""
        if self.rng.random() < 0.5:
            d = self.rng.choice((-1, 1))
            return value + d if 0 <= value + d < n else value - d
        return (value + 1 + self.rng.randrange(n - 1)) % n
