"""Search strategies behind one ask/tell interface, registered by name (:data:`STRATEGIES`).

- ``random``: uniform sampling, the baseline.
- ``evolutionary``: (mu + lambda) genetic algorithm, tournament selection.
- ``abc``: artificial bee colony (ABCPruner).
- ``reinforce``: REINFORCE controller with a moving-average baseline (DNQ).
- ``greedy`` / ``dp``: allocation from per-layer sensitivity, greedy or knapsack (GBA).
- ``accuracy_aware``: most compressed first, precision given back until ``max_drop`` holds.
"""

from edgeslim.search.strategies import (  # noqa: F401  (each module registers itself)
    accuracy_aware,
    bee_colony,
    bit_allocation,
    evolutionary,
    random_search,
    reinforce,
)
from edgeslim.search.strategies.base import (
    STRATEGIES,
    Context,
    GeneStrategy,
    Strategy,
    make_strategy,
    register,
    reward,
    sensitivity,
)

__all__ = [
    "STRATEGIES",
    "Context",
    "GeneStrategy",
    "Strategy",
    "make_strategy",
    "register",
    "reward",
    "sensitivity",
]
