"""Analytic costs predicted from the model's structure (no timing).

Conventions (stated so that numbers compare across tools):
- MACs count conv, linear and recurrent layers (plus BERT attention matmuls), per forward
  pass of the example input, batch included; an RNN/LSTM/GRU layer or cell counts each
  gate's input and hidden matmul per time step and sequence (``G*H*(I+H)`` for one layer,
  see :func:`edgeslim.graph.layers.recurrent_macs`); normalisation, activations, pooling
  and the element-wise gate arithmetic count 0.
- BOPs = sum over layers of MACs * weight bits * activation bits (fp32 = 32 x 32).
- size counts parameters only (BatchNorm running statistics fold into the convs at
  deployment): each layer's weights (``weight``, a recurrent layer's ``weight_ih_l0``...,
  an attention's ``in_proj_weight``) at its bit-width, packed and rounded up to whole
  bytes per tensor, every other parameter at 32 bits.
- peak activation memory walks the fx graph in execution order and keeps each tensor alive
  until its last user has run; for models that do not trace, the largest input + output of
  any single layer is used instead (a lower bound).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from edgeslim.errors import TraceError
from edgeslim.graph.layers import LayerInfo, layer_table
from edgeslim.graph.trace import trace

Bits = Mapping[str, int] | int | None


def _bits_of(bits: Bits, fqn: str, default: int = 32) -> int:
    """``fqn``'s bits, or its nearest listed ancestor's: a layer quantized whole holds
    sublayers (an ``nn.MultiheadAttention``'s ``out_proj``, its split ``q``/``k``/``v``
    linears) that its bits cover too. Why: search costed an attention's projections at 32
    bits under a W4 policy (size 0.548x fp32 instead of 0.241x: none feasible)."""
    if bits is None:
        return default
    if isinstance(bits, int):
        return bits
    name = fqn
    while True:
        if name in bits:
            return int(bits[name])
        if not name:
            return default
        name = name.rpartition(".")[0]


def bops(table: Mapping[str, LayerInfo], w_bits: Bits = None, a_bits: Bits = None) -> int:
    """Bit-operations: MACs x weight bits x activation bits, per layer (default 32/32)."""
    return sum(r.macs * _bits_of(w_bits, f) * _bits_of(a_bits, f) for f, r in table.items())


def is_weight_name(name: str) -> bool:
    """Whether a parameter of a layer is one of its weight matrices, stored at the layer's
    bits: ``weight``, a recurrent layer's ``weight_ih_l0``/``weight_hh_l1_reverse`` and an
    attention's ``in_proj_weight``/``q_proj_weight`` (their biases stay 32-bit)."""
    return name == "weight" or name.startswith("weight_") or name.endswith("_weight")


def size_bytes(model: nn.Module, w_bits: Bits = None) -> int:
    """Bytes of the parameters with each layer's weights stored at its bit-width; a
    parameter two modules share (a language model's head tied to its embedding) counts once,
    at its first owner's width."""
    total = 0
    seen: set[int] = set()
    for fqn, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            b = _bits_of(w_bits, fqn) if is_weight_name(pname) else 32
            total += math.ceil(p.numel() * b / 8)
    return total


def _nbytes(meta: Any) -> int:
    shape = getattr(meta, "shape", None)
    dtype = getattr(meta, "dtype", None)
    if shape is None or dtype is None:
        if isinstance(meta, (list, tuple)):
            return sum(_nbytes(m) for m in meta)
        return 0
    return math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()


def _graph_peak(gm: fx.GraphModule) -> int:
    nodes = list(gm.graph.nodes)
    last_use = {n: i for i, n in enumerate(nodes)}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = max(last_use[a], i)
    live: dict[fx.Node, int] = {}
    peak = 0
    for i, n in enumerate(nodes):
        live[n] = _nbytes(n.meta.get("tensor_meta"))
        peak = max(peak, sum(live.values()))
        for a in [a for a in live if last_use[a] <= i]:
            del live[a]
    return peak


def peak_activation_bytes(
    model: nn.Module, *example_args: Any, traced: fx.GraphModule | None = None
) -> int:
    """Peak bytes of simultaneously live activations for one forward pass (see module doc).

    ``traced`` reuses a graph already traced from ``model`` (e.g. ``ModelGraph.traced``).
    """
    try:
        gm = traced if traced is not None else trace(model)
    except TraceError:
        table = layer_table(model, *example_args)
        return max(
            (4 * (math.prod(r.in_shape) + math.prod(r.out_shape)) for r in table.values()),
            default=0,
        )
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_args)
    return _graph_peak(gm)


@dataclass(frozen=True)
class CostReport:
    """The analytic costs of one model (for given per-layer bits)."""

    params: int
    macs: int
    bops: int
    size_bytes: int
    peak_activation_bytes: int


def cost_report(
    model: nn.Module, *example_args: Any, w_bits: Bits = None, a_bits: Bits = None
) -> CostReport:
    table = layer_table(model, *example_args)
    return CostReport(
        params=sum(p.numel() for p in model.parameters()),
        macs=sum(r.macs for r in table.values()),
        bops=bops(table, w_bits, a_bits),
        size_bytes=size_bytes(model, w_bits),
        peak_activation_bytes=peak_activation_bytes(model, *example_args),
    )
