"""Activation quantizers on graph edges: one quantizer per tensor, shared by its consumers.

Layer-input quantizers leave two gaps that integer runtimes cannot bridge: a tensor read by
several quantized layers gets several (different) quantizers, and the operands and result
of a residual add stay in float. ``quantize_edges`` traces the prepared model with torch.fx
and places exactly one :class:`ActQuant` on every edge that feeds a quantized layer or an
add, taking over the layers' own input quantizers. The simulation then quantizes the same
tensors that ONNX Runtime's integer kernels (QLinearConv, QLinearAdd) do.

Returns a new ``fx.GraphModule`` (with the same submodule FQNs), like PT2E's ``prepare``.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from edgeslim.graph.ops import ADDS, MOVES_VALUES
from edgeslim.graph.trace import trace
from edgeslim.quant.modules import ActQuant, QuantMixin
from edgeslim.quant.spec import QuantSpec

# integer kernels exist for these too (QLinearGlobalAveragePool): quantize their inputs
POOLS_FUNCS = {nn.functional.adaptive_avg_pool2d}
POOL_MODULES = (nn.AdaptiveAvgPool2d,)
# Ops that only move or select values (MOVES_VALUES): the edge before them shares the
# quantizer of the edge after them, so ONNX Runtime can run them on integers (DQ -> MaxPool
# -> Q).


def _act_spec(model: nn.Module) -> QuantSpec | None:
    for m in model.modules():
        if isinstance(m, QuantMixin) and m.input_quant is not None:
            return m.input_quant.spec
    return None


def quantize_edges(model: nn.Module, spec: QuantSpec | None = None) -> fx.GraphModule:
    """Move activation quantization from layer inputs onto graph edges (see module doc)."""
    spec = spec or _act_spec(model)
    if spec is None:
        raise ValueError("quantize_edges needs activation quantization (a_bits) on some layer")
    gm = trace(model, leaf_types=(QuantMixin, ActQuant))
    graph = gm.graph
    consumers: dict[fx.Node, list[fx.Node]] = {}
    takeover: dict[fx.Node, ActQuant] = {}
    for node in graph.nodes:
        layer = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        is_add = node.op == "call_function" and node.target in ADDS | POOLS_FUNCS
        is_add = is_add or isinstance(layer, POOL_MODULES)
        quant_layer = isinstance(layer, QuantMixin) and layer.input_quant is not None
        if not (is_add or quant_layer):
            continue
        for src in node.all_input_nodes:
            if "tensor_meta" in src.meta or src.op != "get_attr":
                consumers.setdefault(src, []).append(node)
        if quant_layer:
            assert isinstance(layer, QuantMixin) and layer.input_quant is not None
            src = node.all_input_nodes[0]
            takeover.setdefault(src, layer.input_quant)
            layer.input_quant = None
    edges: list[tuple[fx.Node, list[fx.Node], str]] = []
    for i, (src, users) in enumerate(consumers.items()):
        name = f"edge_quant_{i}"
        gm.add_submodule(name, takeover.get(src) or ActQuant(spec))
        edges.append((src, users, name))
        node = src
        while MOVES_VALUES.matches(gm, node) and node.all_input_nodes:  # share through pool/flatten
            prev = node.all_input_nodes[0]
            edges.append((prev, [node], name))
            node = prev
    for src, users, name in edges:
        with graph.inserting_after(src):
            q = graph.call_module(name, (src,))
        for user in dict.fromkeys(users):
            user.replace_input_with(src, q)
    graph.lint()
    gm.recompile()
    return gm
