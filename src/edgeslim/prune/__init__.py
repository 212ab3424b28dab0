"""Structured pruning: importance criteria, surgery on coupled channel groups, prune plans,
the planner (global ranking under a MACs target), learned gates and fine-tuning."""

from edgeslim.graph.attention import SplitMultiheadAttention, split_attention
from edgeslim.prune.config import GateConfig, PruneConfig
from edgeslim.prune.finetune import finetune_pruned
from edgeslim.prune.gates import GateResult, GateSet, attach_gates, train_gates
from edgeslim.prune.importance import IMPORTANCE, Importance, get_importance
from edgeslim.prune.plan import (
    PlanError,
    PrunePlan,
    apply_plan,
    load_pruned,
    match_plan,
    plan_kept_positions,
    pruned_paths,
    save_pruned,
)
from edgeslim.prune.planner import (
    PlanStats,
    PruneWarning,
    apply_keep,
    build_importance,
    plan_keep,
    plan_pruning,
    prune_,
)
from edgeslim.prune.reconstruct import LayerFit, ReconstructReport, reconstruct_
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
    "GateConfig",
    "GateResult",
    "GateSet",
    "Importance",
    "LayerFit",
    "PlanError",
    "PlanStats",
    "PruneConfig",
    "PruneError",
    "PrunePlan",
    "PruneWarning",
    "ReconstructReport",
    "SplitMultiheadAttention",
    "Surgery",
    "apply_keep",
    "apply_plan",
    "attach_gates",
    "build_importance",
    "check_kept",
    "describe_group",
    "finetune_pruned",
    "get_importance",
    "group_key",
    "load_pruned",
    "match_plan",
    "plan_keep",
    "plan_kept_positions",
    "plan_pruning",
    "prepare_surgery",
    "prune_",
    "prune_groups",
    "pruned_paths",
    "reconstruct_",
    "round_keep",
    "save_pruned",
    "split_attention",
    "train_gates",
]
