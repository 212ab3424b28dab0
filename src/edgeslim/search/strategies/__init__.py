"""Search strategies behind one ask/tell interface, registered by name (:data:`STRATEGIES`).

- ``random``: uniform sampling, the baseline.
- ``evolutionary``: (mu + lambda) genetic algorithm, tournament selection.
- ``abc``: artificial bee colony (ABCPruner).
- ``reinforce``: REINFORCE controller with a moving-average baseline (DNQ).
- ``envelope_ddpg``: multi-objective DDPG with a preference over the metric and each limit
  (MCMC's envelope agent).
- ``greedy`` / ``dp``: allocation from per-layer sensitivity, greedy or knapsack (GBA).
- ``accuracy_aware``: most compressed first, precision given back until ``max_drop`` holds.

Peers (registered only when optuna is installed, ``pip install 'edgeslim[peers]'``):
``optuna-tpe`` and ``optuna-nsga2``, Optuna's samplers as off-the-shelf baselines
(:mod:`edgeslim.search.optuna_peer`).
"""

import importlib.util

from edgeslim.search.strategies import (  # noqa: F401  (each module registers itself)
    accuracy_aware,
    bee_colony,
    bit_allocation,
    envelope_ddpg,
    evolutionary,
    random_search,
    reinforce,
)
from edgeslim.search.strategies.base import (
    STRATEGIES,
    Context,
    GeneStrategy,
    Strategy,
    check_options,
    make_strategy,
    register,
    reward,
    sensitivity,
    strategy_options,
)

if importlib.util.find_spec("optuna") is not None:  # found without importing it
    from edgeslim.search.optuna_peer import PEERS

    for _name, _cls in PEERS.items():
        STRATEGIES.register(_name, _cls)

__all__ = [
    "STRATEGIES",
    "Context",
    "GeneStrategy",
    "Strategy",
    "check_options",
    "make_strategy",
    "register",
    "reward",
    "sensitivity",
    "strategy_options",
]
