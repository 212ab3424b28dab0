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


# (1-D and 3-D pools too: audio and sensor CNNs pool over time, video and volumetric CNNs
# over time and space, the way image CNNs pool over space; ONNX Runtime's selectors fuse
# DQ -> pool -> Q at any rank: 3-D max pools run on uint8, 3-D average pools as
# QLinearAveragePool / QLinearGlobalAveragePool, checked in tests/export/test_qdq_volume.py)
MOVES_VALUES = OpSet(
    modules=(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Dropout, nn.Identity),
    functions=frozenset({torch.flatten, nn.functional.max_pool1d, nn.functional.max_pool2d,
                         nn.functional.max_pool3d, nn.functional.dropout}),
    methods=frozenset({"flatten", "view", "reshape", "contiguous"}),
)  # fmt: skip
AVERAGES = OpSet(
    modules=(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
    functions=frozenset({nn.functional.adaptive_avg_pool1d, nn.functional.adaptive_avg_pool2d,
                         nn.functional.adaptive_avg_pool3d, nn.functional.avg_pool1d,
                         nn.functional.avg_pool2d, nn.functional.avg_pool3d}),
)  # fmt: skip
ADDS = frozenset({operator.add, operator.iadd, torch.add})


def upsample_mode(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The interpolation mode of an ``nn.Upsample`` (``UpsamplingNearest2d`` and
    ``UpsamplingBilinear2d`` included) or ``F.interpolate`` node; None for any other."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return str(m.mode) if isinstance(m, nn.Upsample) else None
    if node.op == "call_function" and node.target is nn.functional.interpolate:
        return str(node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest"))
    return None


def is_spatial_mean(node: fx.Node) -> bool:
    """``x.mean((2, 3))`` / ``torch.mean(x, dim=(-2, -1), keepdim=True)`` /
    ``x.mean((2, 3, 4))``: the global average pool written by hand (squeeze-excite blocks,
    classifier heads, video heads). The edge pass quantizes it like an average pool; export
    turns it into ``GlobalAveragePool`` where it averages every axis after the channels
    (:func:`edgeslim.export.qdq.mean_as_global_pool`), run on uint8.

    Decision: without the input's rank, a mean counts when it averages at least two axes
    that are all >= 2 (never the batch or channel axis of an ``(N, C, ...)`` tensor), or the
    last two or three axes. A single axis does not count: ``x.mean(-1)`` is as often a
    hand-written layer norm over features as a 1-D pool, and quantizing around it would
    leave a float ``ReduceMean`` between quantizers."""
    if node.op == "call_method" and node.target == "mean":
        pass
    elif node.op != "call_function" or node.target is not torch.mean:
        return False
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if isinstance(dims, int) or not isinstance(dims, (tuple, list)):
        return False
    if len(dims) < 2 or len(set(dims)) != len(dims) or not all(isinstance(d, int) for d in dims):
        return False
    if all(d >= 2 for d in dims):
        return True
    return len(dims) <= 3 and set(dims) == set(range(-len(dims), 0))


def clamp_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float | None, float | None] | None:
    """``(lo, hi)`` when ``node`` clamps its first input to constant bounds (None: that
    side open): ``nn.ReLU6``/``nn.Hardtanh``, ``F.relu6``/``F.hardtanh``, ``torch.clamp``
    and ``x.clamp``; None for anything else."""
    rest, kw = node.args[1:], node.kwargs
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.ReLU6):
            return 0.0, 6.0
        if isinstance(m, nn.Hardtanh):
            return float(m.min_val), float(m.max_val)
        return None
    if node.op == "call_function" and node.target is nn.functional.relu6:
        return 0.0, 6.0
    if node.op == "call_function" and node.target is nn.functional.hardtanh:
        lo, hi = (*rest, None, None)[:2]
        lo = kw.get("min_val", -1.0) if lo is None else lo
        hi = kw.get("max_val", 1.0) if hi is None else hi
    elif (node.op == "call_function" and node.target is torch.clamp) or (
        node.op == "call_method" and node.target == "clamp"
    ):
        lo, hi = (*rest, None, None)[:2]
        lo = kw.get("min") if lo is None else lo
        hi = kw.get("max") if hi is None else hi
    else:
        return None
    out: list[float | None] = []
    for b in (lo, hi):
        if b is not None and not isinstance(b, (int, float)):
            return None  # a tensor bound
        out.append(None if b is None else float(b))
    return out[0], out[1]


_PAD_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "constant": (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d),  # ZeroPadNd too
    "reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
    "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
    "circular": (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d),
}
PAD_MODULES: tuple[type[nn.Module], ...] = sum(_PAD_KINDS.values(), ())


@dataclass(frozen=True)
class Pad:
    """What a padding op does: its mode, fill value and how many trailing dims it pads."""

    mode: str  # constant, reflect, replicate or circular
    value: float
    dims: int
    spatial: bool  # the channel axis (1) is not among the padded dims

    @property
    def zero(self) -> bool:
        return self.mode == "constant" and self.value == 0.0

    @property
    def homogeneous(self) -> bool:
        """Commutes with a per-channel positive scale (zeros, or copies of the values)."""
        return self.zero or self.mode != "constant"


def padding(gm: fx.GraphModule, node: fx.Node) -> Pad | None:
    """The :class:`Pad` of an ``nn.*Pad*d`` module or ``F.pad`` node; None for any other op.

    ``spatial`` needs the input's rank: from the traced shapes when the graph has them,
    else a module is taken to get the batched input its class is for (``ZeroPad2d``: 4-D)
    and ``F.pad`` is not trusted (its pad list may reach the channel axis)."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if not isinstance(m, PAD_MODULES):
            return None
        kind = next(k for k, types in _PAD_KINDS.items() if isinstance(m, types))
        dims = len(tuple(m.padding)) // 2  # type: ignore[arg-type]
        value = float(getattr(m, "value", 0.0))
        default_rank: int | None = dims + 2
    elif node.op == "call_function" and node.target is nn.functional.pad:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        if not isinstance(pad, (tuple, list)):
            return None
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        fill = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        if not isinstance(mode, str) or not isinstance(fill, (int, float, type(None))):
            return None
        kind = mode
        dims, value, default_rank = len(pad) // 2, float(fill or 0.0), None
    else:
        return None
    src = node.args[0] if node.args else None
    meta = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
    rank = len(meta.shape) if meta is not None and hasattr(meta, "shape") else default_rank
    return Pad(kind, value, dims, rank is not None and rank - dims >= 2)


def _full_slice(i: slice, length: int) -> bool:
    start, stop, step = i.start, i.stop, i.step
    return (
        start in (None, 0)
        and step in (None, 1)
        and (stop is None or (isinstance(stop, int) and stop >= length))
    )


def indexed_dim(index: Any, shape: tuple[int, ...], dim: int) -> int | None:
    """Where axis ``dim`` lands after ``tensor[index]``; None if the index selects along it
    (or is one edgeslim does not follow: a tensor or a symbolic bound)."""
    idx = index if isinstance(index, tuple) else (index,)
    consuming = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if sum(1 for i in idx if i is Ellipsis) > 1:
        return None
    in_d = out_d = 0
    for i in idx:
        if i is Ellipsis:
            n = len(shape) - consuming
            if in_d <= dim < in_d + n:
                return out_d + dim - in_d
            in_d, out_d = in_d + n, out_d + n
        elif i is None:
            out_d += 1
        elif isinstance(i, slice):
            if in_d == dim:
                return out_d if _full_slice(i, shape[dim]) else None
            in_d, out_d = in_d + 1, out_d + 1
        elif isinstance(i, int) and not isinstance(i, bool):
            if in_d == dim:
                return None
            in_d += 1
        else:
            return None
    return out_d + dim - in_d


# a tensor's shape and fixed properties, read without its values
SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
SHAPE_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_floating_point"}
)


def reads_shape(node: fx.Node) -> bool:
    """``x.shape``, ``x.ndim``, ``x.size()``, ``x.dtype`` and the like: reads a tensor's shape
    or fixed properties, not its values (Funnel's ``[slice(None)] * (1 % x.ndim)`` had been
    given a quantizer; ``x.view(x.size(0), -1)`` counted as a second reader of ``x``).

    Exported, a shape read is a ``Shape`` node; left on the float tensor before a
    quantizer, it is a second reader that keeps ONNX Runtime from fusing the op that
    wrote the tensor (a concat in a channel shuffle stayed float)."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in SHAPE_ATTRS
    return node.op == "call_method" and node.target in SHAPE_METHODS
