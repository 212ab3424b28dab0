"""Structured pruning: importance criteria, surgery on coupled channel groups, prune plans."""

from edgeslim.prune.importance import IMPORTANCE, Importance, get_importance
from edgeslim.prune.plan import (
    PlanError,
    PrunePlan,
    apply_plan,
    load_pruned,
    match_plan,
    pruned_paths,
    save_pruned,
)
from edgeslim.prune.surgery import (
    PruneError,
    Surgery,
    check_kept,
    describe_group,
    group_key,
    prepare_surgery,
    prune_groups,
    round_keep,
)

__all__ = [
    "IMPORTANCE",
    "Importance",
    "PlanError",
    "PruneError",
    "PrunePlan",
    "Surgery",
    "apply_plan",
    "check_kept",
    "describe_group",
    "get_importance",
    "group_key",
    "load_pruned",
    "match_plan",
    "prepare_surgery",
    "prune_groups",
    "pruned_paths",
    "round_keep",
    "save_pruned",
]
