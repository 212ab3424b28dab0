"""``abc``: artificial bee colony, as ABCPruner searches per-layer channel counts.

``sources`` food sources (policies) are kept with their fitness and a trial counter. One
cycle has three phases, each asked as one batch:

- **employed bees**: every source ``x_i`` is perturbed on ``moves`` random coordinates,
  ``v_j = x_ij + U(-1, 1) (x_ij - x_kj)`` with another source ``k`` (rounded to a choice
  index); the better of ``x_i`` and ``v`` stays (a loss adds one to the trial counter);
- **onlooker bees**: as many perturbations again, each source chosen with probability
  ``p_i = 0.9 f_i / f_max + 0.1`` (fitness shifted to be non-negative);
- **scouts**: a source that failed to improve more than ``limit`` times is replaced by a
  uniformly drawn one.

ABCPruner searches keep ratios only; here every coordinate of the space (keep ratios and
bit-widths alike, all ordered from most to least compressed) is searched the same way.
Fitness is :func:`~.base.reward` (feasibility first, then the metric). The first sources
are the uniform policies that pass the analytic constraints (``warm_start``, default on;
see :meth:`~.base.GeneStrategy.warm_start`), the rest drawn uniformly.
"""

from __future__ import annotations

from edgeslim.search.errors import SearchError
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy
from edgeslim.search.strategies.base import Context, GeneStrategy, register, reward


@register("abc")
class BeeColony(GeneStrategy):
    """Artificial bee colony over choice indices (see the module doc)."""

    name = "abc"

    def __init__(
        self, ctx: Context, sources: int = 4, limit: int = 5, moves: int = 2,
        warm_start: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(ctx)
        if sources < 2 or limit < 1 or moves < 1:
            raise SearchError("abc: sources must be >= 2, limit >= 1 and moves >= 1")
        self.n_sources = sources
        self.limit = limit
        self.moves = moves
        self.sources: list[list[int]] = []
        self.fitness: list[float] = []
        self.trials: list[int] = []
        self.phase = "init"
        self.queue: list[tuple[int, list[int]]] = []  # (source index, candidate genes)
        self.asked: list[tuple[int, list[int]]] = []
        self.results: list[float] = []
        self.cycles = 0
        seeds = self.warm_start(sources) if warm_start else []
        for i in range(sources):
            genes = seeds[i] if i < len(seeds) else self.unseen(self.random_genes)
            genes = genes or self.random_genes()
            self.mark(genes)
            self.queue.append((i, genes))

    def ask(self) -> Policy | None:
        if not self.queue:
            return None
        i, genes = self.queue.pop(0)
        self.asked.append((i, genes))
        return self.policy(genes)

    def tell(self, policy: Policy, result: EvalResult) -> None:
        self.results.append(reward(result))
        if self.queue or len(self.results) < len(self.asked):
            return
        batch, fits = self.asked, self.results
        self.asked, self.results = [], []
        if self.phase == "init":
            self.sources = [g for _, g in batch]
            self.fitness = list(fits)
            self.trials = [0] * len(batch)
        elif self.phase == "scout":
            for (i, genes), f in zip(batch, fits, strict=True):
                self.sources[i], self.fitness[i], self.trials[i] = genes, f, 0
        else:
            for (i, genes), f in zip(batch, fits, strict=True):
                if f > self.fitness[i]:
                    self.sources[i], self.fitness[i], self.trials[i] = genes, f, 0
                else:
                    self.trials[i] += 1
        self._next_phase()

    def _next_phase(self) -> None:
        order = {"init": "employed", "employed": "onlooker", "onlooker": "scout"}
        self.phase = order.get(self.phase, "employed")
        if self.phase == "employed":
            self.cycles += 1
            self.queue = [(i, self._neighbour(i)) for i in range(len(self.sources))]
        elif self.phase == "onlooker":
            self.queue = [(i, self._neighbour(i)) for i in self._onlookers()]
        else:
            stale = [i for i, t in enumerate(self.trials) if t > self.limit]
            self.queue = [(i, self.unseen(self.random_genes) or self.random_genes()) for i in stale]
            if not self.queue:
                self._next_phase()  # no scout this cycle: straight to the employed bees
                return
        for _, genes in self.queue:
            self.mark(genes)
        best = max(range(len(self.fitness)), key=lambda i: self.fitness[i])
        self.notes.update(cycles=self.cycles, best_reward=self.fitness[best])

    def _onlookers(self) -> list[int]:
        low = min(self.fitness)
        f = [v - low for v in self.fitness]
        top = max(f)
        p = [0.9 * v / top + 0.1 if top > 0 else 1.0 for v in f]
        chosen: list[int] = []
        i = 0
        while len(chosen) < len(self.sources):
            if self.rng.random() < p[i]:
                chosen.append(i)
            i = (i + 1) % len(self.sources)
        return chosen

    def _neighbour(self, i: int) -> list[int]:
        """``x_i`` moved on ``moves`` coordinates towards/away from another source."""
        x = self.sources[i]
        if not self.sizes:
            return list(x)
        for _ in range(10):
            k = self.rng.choice([j for j in range(len(self.sources)) if j != i])
            v = list(x)
            dims = self.rng.sample(range(len(self.sizes)), min(self.moves, len(self.sizes)))
            for j in dims:
                phi = self.rng.uniform(-1.0, 1.0)
                v[j] = min(
                    max(round(x[j] + phi * (x[j] - self.sources[k][j])), 0), self.sizes[j] - 1
                )
            if v == x:  # both sources agree there: step to a neighbouring choice instead
                j = dims[0]
                d = self.rng.choice((-1, 1))
                v[j] = x[j] + d if 0 <= x[j] + d < self.sizes[j] else x[j] - d
            if self.policy(v).id not in self.seen:
                return v
        return v
