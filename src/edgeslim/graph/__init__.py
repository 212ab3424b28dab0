"""Model graph: tracing, the layer table and channel-coupling groups, keyed by FQN."""

from edgeslim.graph.coupling import CouplingGroup, GroupMember, fx_coupling_groups
from edgeslim.graph.layers import LayerInfo, layer_table, total_macs
from edgeslim.graph.model_graph import ModelGraph, analyze
from edgeslim.graph.trace import example_input, example_like, trace
from edgeslim.graph.transformer import transformer_groups

__all__ = [
    "CouplingGroup",
    "GroupMember",
    "LayerInfo",
    "ModelGraph",
    "analyze",
    "example_input",
    "example_like",
    "fx_coupling_groups",
    "layer_table",
    "total_macs",
    "trace",
    "transformer_groups",
]
