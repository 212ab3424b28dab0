"""Low-rank factorization: post-hoc SVD and Trained Rank Pruning, both ending in a model of
two plain layers per factorized conv/linear (fx-traceable, exportable to ONNX)."""

from edgeslim.lowrank.modules import (
    LowRankConv1d,
    LowRankConv2d,
    LowRankConv3d,
    LowRankError,
    LowRankLinear,
    factorize_layer,
    why_not_factorizable,
)
from edgeslim.lowrank.report import LayerRank, LowRankReport
from edgeslim.lowrank.svd import SVDConfig, factorize_
from edgeslim.lowrank.trp import (
    TrainedRankPruning,
    TRPConfig,
    TRPResult,
    energy_rank,
    nuclear_norm,
    trp_train,
)

__all__ = [
    "LayerRank",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankConv3d",
    "LowRankError",
    "LowRankLinear",
    "LowRankReport",
    "SVDConfig",
    "TRPConfig",
    "TRPResult",
    "TrainedRankPruning",
    "energy_rank",
    "factorize_",
    "factorize_layer",
    "nuclear_norm",
    "trp_train",
    "why_not_factorizable",
]
