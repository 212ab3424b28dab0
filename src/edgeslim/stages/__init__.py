"""The recipe's stage kinds, registered from above the algorithm packages.

Each module here binds one algorithm package to the recipe layer: a frozen schema (the
stage's fields) and a handler that reads its data from the run's :class:`~edgeslim.Task`.
The recipe layer imports this package only, never ``quant``/``prune``/``datafree``/``train``.
"""

import edgeslim.stages.datafree
import edgeslim.stages.finetune
import edgeslim.stages.lowrank
import edgeslim.stages.prune
import edgeslim.stages.quantize
import edgeslim.stages.search  # noqa: F401  (each module registers its stage kind)
