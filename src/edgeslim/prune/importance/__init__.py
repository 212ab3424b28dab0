"""Pruning importance criteria: score every unit of a coupling group (higher = keep).

``get_importance(name, **kwargs)`` builds one of the registered criteria (``IMPORTANCE``):
``l1``, ``l2``, ``fpgm``, ``taylor``, ``nisp``, ``filtersketch``, ``epruner``, ``random``,
``fluctuation`` (FLAP, with bias compensation).
``criterion.scores(model, groups)`` returns ``{group.id: group.size scores}`` for every
prunable group; see :mod:`edgeslim.prune.importance.base` for how members are combined.
"""

from edgeslim.prune.importance.base import (
    IMPORTANCE,
    Importance,
    MemberImportance,
    UnknownImportanceError,
    check_criterion,
    get_importance,
    member_span,
    unit_matrix,
    unit_view,
)
from edgeslim.prune.importance.epruner import EPruner, epruner_width
from edgeslim.prune.importance.fluctuation import Fluctuation
from edgeslim.prune.importance.magnitude import FPGM, L1Norm, L2Norm, RandomImportance
from edgeslim.prune.importance.nisp import NISP
from edgeslim.prune.importance.sketch import FilterSketch, frequent_directions, ridge_leverage
from edgeslim.prune.importance.taylor import Taylor

__all__ = [
    "FPGM",
    "IMPORTANCE",
    "NISP",
    "EPruner",
    "FilterSketch",
    "Fluctuation",
    "Importance",
    "L1Norm",
    "L2Norm",
    "MemberImportance",
    "RandomImportance",
    "Taylor",
    "UnknownImportanceError",
    "check_criterion",
    "epruner_width",
    "frequent_directions",
    "get_importance",
    "member_span",
    "ridge_leverage",
    "unit_matrix",
    "unit_view",
]
