"""Which channels an op that only moves values leaves on axis 1, for the statistics walk.

A channel split (ShuffleNet's ``x.chunk(2, dim=1)``, a Ghost module's ``y[:, :out]``) and a
channel shuffle (``view(n, g, c // g, h, w) -> transpose(1, 2) -> view(n, c, h, w)``)
select or permute channels; per-channel statistics follow them exactly. Rather than one
rule per op, the op runs on a tensor of channel ids (each element holds the index of the
channel it came from): where every axis-1 slice of the result holds one id, the result's
channels are those ids, in order. Intermediate layouts (the shuffle's 5-D view) keep their
id tensor until a later op makes them channels again.

Measured (2026-12-04, helpers' ShuffleNet-style model, DF-MPC): the convs after each split
and shuffle had no input statistics, so their activations stayed float and ONNX Runtime ran
70% of the MACs on integer kernels.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

# ops whose output's values are some of its input's, moved: run on the ids as they are
_FUNCTIONS = {operator.getitem, torch.chunk, torch.split, torch.transpose, torch.permute,
              torch.reshape, torch.flatten, torch.unflatten, torch.narrow}  # fmt: skip
_METHODS = {"chunk", "split", "transpose", "permute", "view", "reshape", "contiguous",
            "flatten", "unflatten", "narrow", "__getitem__"}  # fmt: skip
# methods whose size arguments may be read off the graph (x.size(0)): taken from the
# output's recorded shape instead
_RESHAPES = {"view", "reshape"}

Ids = torch.Tensor | tuple[torch.Tensor, ...]


def moves_values(node: fx.Node) -> bool:
    """Whether ``node`` is an op this module can run on channel ids."""
    if node.op == "call_function":
        return node.target in _FUNCTIONS
    return node.op == "call_method" and node.target in _METHODS


def channel_ids(node: fx.Node) -> torch.Tensor | None:
    """The id tensor of ``node``'s output when its channels are on axis 1 (shape from the
    traced metadata): element ``[n, c, ...]`` holds ``c``."""
    shape = node_shape(node)
    if shape is None or len(shape) < 2:
        return None
    ids = torch.arange(shape[1]).reshape(1, -1, *([1] * (len(shape) - 2)))
    return ids.expand(shape).contiguous()


def run_on_ids(node: fx.Node, ids: Ids) -> Ids | None:
    """``node``'s op applied to ``ids`` (its first argument's ids), or None when an argument
    cannot be known here (a size computed from another tensor, a tensor index)."""
    out_shape = node_shape(node)
    if node.op == "call_method" and node.target in _RESHAPES:
        if out_shape is None or not isinstance(ids, torch.Tensor):
            return None
        return ids.reshape(out_shape)
    args = []
    for a in node.args[1:]:
        if _has_node(a):
            return None
        args.append(a)
    if _has_node(node.kwargs):
        return None
    try:
        if node.op == "call_method":
            if not isinstance(ids, torch.Tensor):
                return None
            if node.target == "__getitem__":
                index: Any = args[0]
                return ids[index]
            out = getattr(ids, str(node.target))(*args, **node.kwargs)
        else:
            fn: Any = node.target
            out = fn(ids, *args, **node.kwargs)
    except (TypeError, RuntimeError, IndexError, ValueError):
        return None
    if isinstance(out, (tuple, list)):
        return tuple(out) if all(isinstance(t, torch.Tensor) for t in out) else None
    return out if isinstance(out, torch.Tensor) else None


def as_channels(ids: Ids) -> torch.Tensor | None:
    """The source channels on axis 1 of ``ids``, in order, when each axis-1 slice holds one
    id; None while the layout is not channels on axis 1 (the shuffle's 5-D view)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2 or ids.shape[1] == 0:
        return None
    per = ids.transpose(0, 1).reshape(ids.shape[1], -1)
    if per.shape[1] == 0 or not bool((per == per[:, :1]).all()):
        return None
    return per[:, 0].clone()


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The traced shape of ``node``'s output (ShapeProp's metadata), None if unknown."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _has_node(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_node(v) for v in value)
    if isinstance(value, dict):
        return any(_has_node(v) for v in value.values())
    if isinstance(value, slice):
        return any(_has_node(v) for v in (value.start, value.stop, value.step))
    return False
