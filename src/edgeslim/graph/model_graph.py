"""``analyze``: trace once, build the layer table and the coupling groups of a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from edgeslim.graph.attention import SplitMultiheadAttention
from edgeslim.graph.coupling import CouplingGroup, graph_coupling_groups
from edgeslim.graph.layers import LayerInfo, layer_table
from edgeslim.graph.trace import trace
from edgeslim.graph.tracer import eval_mode
from edgeslim.graph.transformer import is_transformer, transformer_groups


@dataclass
class ModelGraph:
    """What edgeslim knows of a model's structure, keyed by fully-qualified names."""

    model: nn.Module
    layers: dict[str, LayerInfo]
    groups: list[CouplingGroup]
    traced: fx.GraphModule | None

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.layers.values())

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def groups_of(self, fqn: str) -> list[CouplingGroup]:
        return [g for g in self.groups if any(m.fqn == fqn for m in g.members)]

    @property
    def prunable_groups(self) -> list[CouplingGroup]:
        return [g for g in self.groups if g.prunable]


def analyze(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> ModelGraph:
    """Analyze ``model`` on example inputs.

    Transformers (modules exposing ``num_attention_heads``) get structural head/FFN groups
    and are not fx-traced; every other model is traced with torch.fx, and a model that
    cannot be traced raises :class:`~edgeslim.errors.TraceError` naming the op and module.
    """
    layers = layer_table(model, *example_args, **example_kwargs)
    if is_transformer(model):
        return ModelGraph(model, layers, transformer_groups(model), None)
    # a split attention is analysed whole, as its heads (quantization traces into it); the
    # structure is the deployed one (eval mode: training-only Python code is not traced)
    with eval_mode(model):  # (the graph's modules are the model's: restored after both)
        gm = trace(
            model, (SplitMultiheadAttention,), inputs=len(example_args), examples=example_args
        )
        groups = graph_coupling_groups(gm, *example_args)
    return ModelGraph(model, layers, groups, gm)
