"""Op tables shared by the graph passes: which traced ops only move values, which average.

A pass that follows a tensor through the graph needs to know what an op does to it. Two
families matter beyond the layers themselves: ops that move or select values without
changing them (a quantizer before them serves after them too; per-channel statistics pass
through) and averaging pools (an integer kernel exists; per-channel means pass through).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn


@dataclass(frozen=True)
class OpSet:
    """Traced ops of one kind: module types, functions, and tensor method names."""

    modules: tuple[type[nn.Module], ...] = ()
    functions: frozenset[Any] = frozenset()
    methods: frozenset[str] = frozenset()

    def __or__(self, other: OpSet) -> OpSet:
        return OpSet(
            self.modules + other.modules,
            self.functions | other.functions,
            self.methods | other.methods,
        )

    def matches(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Whether ``node`` of ``gm`` is one of these ops."""
        if node.op == "call_module":
            return isinstance(gm.get_submodule(str(node.target)), self.modules)
        if node.op == "call_function":
            return node.target in self.functions
        return node.op == "call_method" and node.target in self.methods


MOVES_VALUES = OpSet(
    modules=(nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity),
    functions=frozenset({torch.flatten, nn.functional.max_pool2d, nn.functional.dropout}),
    methods=frozenset({"flatten", "view", "reshape", "contiguous"}),
)
AVERAGES = OpSet(
    modules=(nn.AdaptiveAvgPool2d, nn.AvgPool2d),
    functions=frozenset({nn.functional.adaptive_avg_pool2d, nn.functional.avg_pool2d}),
)
ADDS = frozenset({operator.add, operator.iadd, torch.add})
