"""Data-free ranges for the quantizers the edge pass adds (residual adds, pools, outputs).

:func:`edgeslim.quant.edges.quantize_edges` puts a quantizer on every edge ONNX Runtime
needs quantized to fuse its integer kernels: the operands and output of a residual add, a
pool's input, a conv's output before an op without an integer kernel. PTQ calibrates those
on data. Without data, their ranges come from what the BN statistics already give, carried
through the graph as intervals: a layer's input range (:func:`~edgeslim.datafree.
quantized_model`'s statistics ranges), a conv's or a GroupNorm's output (its statistics,
mean +- ``RANGE_STDS`` std, twice that where estimated), and per op: ReLU/ReLU6/clamps
clip, pools, flattens, folded BatchNorm and upsampling (nearest or (bi)linear) pass, an add
sums its operands' bounds, a concat takes their union; hardswish, SiLU, GELU and tanh map
the interval through their curve, a sigmoid gate is [0, 1], a product multiplies its
operands' intervals, and a layer whose output has no statistics is bounded by its weights
(:func:`_layer_interval`). A
quantizer whose input interval stays unknown is removed (that edge stays float, and the
export's integer-coverage check says so).

Measured (``edgeslim bench operators``, benchmarks/README.md): mobilenetv3-small after RTN
W8A8 ran 48% of its MACs on integer kernels, 0.36x the fp32 speed in ONNX Runtime, while
statistics stopped at each hardswish and squeeze-excite product (a run at commit 376f89b,
its files not kept); 100% and 1.25x with the intervals carried on (the committed run).

Measured through ``compress`` (DFQ W8A8, ad hoc): resnet20 ran 47% of its MACs on integer
kernels with input quantizers alone (0.78x the fp32 speed in ONNX Runtime).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from edgeslim.datafree.chain import convex_upsample, other_act
from edgeslim.graph.ops import (
    ADDS,
    AVERAGES,
    MOVES_VALUES,
    OpSet,
    is_spatial_mean,
    upsample_mode,
)
from edgeslim.quant.edges import CATS, MULS
from edgeslim.quant.integer_gates import IntegerHardsigmoid, IntegerHardswish, IntegerSiLU
from edgeslim.quant.modules import ActQuant, QuantMixin

Interval = tuple[float, float]
# ops whose output stays inside its input's interval: the shared sets of ops that move or
# average values, and these, which select or reshape values but which the other passes
# (edge placement, channel statistics) treat apart
_ALSO_IN_RANGE = OpSet(
    modules=(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
    functions=frozenset({torch.reshape, nn.functional.adaptive_max_pool1d,
                         nn.functional.adaptive_max_pool2d, nn.functional.adaptive_max_pool3d}),
    methods=frozenset({"mean", "squeeze", "unsqueeze"}),
)  # fmt: skip
_IN_RANGE = MOVES_VALUES | AVERAGES | _ALSO_IN_RANGE
_RELU_FUNCS = {torch.relu, nn.functional.relu}
_DIVS = {operator.truediv, operator.itruediv, torch.div}

# elementwise activations whose output interval follows from their input's: each is
# increasing but for at most one dip (its minimum, where it turns), so the ends of the
# input interval and the dip bound it. Sigmoid gates are in [0, 1] whatever their input.
_Dip = tuple[float, float] | None
_CURVES: dict[str, tuple[Any, _Dip]] = {
    "hardswish": (nn.functional.hardswish, (-1.5, -0.375)),
    "silu": (nn.functional.silu, (-1.2784645, -0.2784645)),
    "gelu": (nn.functional.gelu, (-0.7517916, -0.1699712)),
    "tanh": (torch.tanh, None),
}
_GATES = {"sigmoid", "hardsigmoid"}
# the edge pass's integer forms of those activations (the float ones are named by
# :func:`~edgeslim.datafree.chain.other_act`)
_INTEGER_GATES: dict[type[nn.Module], str] = {
    IntegerHardswish: "hardswish", IntegerSiLU: "silu", IntegerHardsigmoid: "hardsigmoid",
}  # fmt: skip


def _act_name(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The name of the non-homogeneous activation at ``node`` (float or integer form)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        found = next((n for t, n in _INTEGER_GATES.items() if isinstance(mod, t)), None)
        if found is not None:
            return found
    return other_act(gm, node)


def _act_interval(name: str, src: Interval | None) -> Interval | None:
    """The output interval of activation ``name`` over ``src`` (gates: [0, 1] always);
    None for one whose curve is not modelled (ELU, Mish, softplus) or an unknown input."""
    if name in _GATES:
        return (0.0, 1.0)
    if name not in _CURVES:
        return None
    if src is None:
        return (-1.0, 1.0) if name == "tanh" else None
    f, dip = _CURVES[name]
    ends = [float(f(torch.tensor(v, dtype=torch.float64))) for v in src]
    if dip is not None and src[0] < dip[0] < src[1]:
        ends.append(dip[1])
    return min(ends), max(ends)


def _product(a: Interval, b: Interval) -> Interval:
    corners = [x * y for x in a for y in b]
    return min(corners), max(corners)


def _layer_interval(mod: nn.Module, src: Interval | None) -> Interval | None:
    """Bounds of a conv's or linear's output over inputs in ``src``: each output channel's
    positive weights meet the input's top, its negative ones its bottom. Loose (every
    input at an end at once), so used only where no statistics give the output's range (a
    squeeze-excite block's linears after a hardswish). Zero is taken into the input
    interval: a conv's padding reads zeros."""
    if not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) or getattr(
        mod, "transposed", False
    ):  # a transposed conv's weight is (in, out, k...): its rows are not output channels
        return None
    weight, bias = mod.weight, mod.bias
    if src is None or weight.dim() < 2:
        return None
    lo, hi = min(src[0], 0.0), max(src[1], 0.0)
    w = weight.detach().double().reshape(weight.shape[0], -1)
    pos, neg = w.clamp_min(0).sum(1), w.clamp_max(0).sum(1)
    b = bias.detach().double() if isinstance(bias, torch.Tensor) else torch.zeros_like(pos)
    return float((b + pos * lo + neg * hi).min()), float((b + pos * hi + neg * lo).max())


# an average's output range is its input's, widened by this share of the width at each
# nonzero end (see _averaged)
AVERAGE_WIDEN = 1 / 512


def _averaged(src: Interval | None) -> Interval | None:
    """The range of an average (pool, mean, (bi)linear upsampling) of values in ``src``.

    ``src`` bounds it, but on the input's own grid an average of ``2^a`` codes lands on
    exact half steps, where the file (integer sum, rounded half to even) and torch (ties
    down, or a float sum off the tie by its own rounding) round apart: a DenseNet-style
    transition's data-free int8 file differed from torch by 4% of its output norm (random
    weights, 2026-12-05). Widened by ``1/512`` of the width at one end, the step is
    ``513/512`` of the input's, and an average of ``k < 2^10`` codes, ``m / k`` input steps,
    has no exact tie on it (one would need ``1024 m = 513 k (2j + 1)``); widened at both
    ends, ``257/256`` and ``k < 2^9``. A zero end stays (a ReLU's output keeps its zero
    point).
    """
    if src is None:
        return None
    lo, hi = src
    pad = (hi - lo) * AVERAGE_WIDEN
    return (lo - pad if lo < 0 else lo), (hi + pad if hi > 0 else hi)


def _clip(iv: Interval | None, lo: float, hi: float) -> Interval | None:
    return None if iv is None else (min(max(iv[0], lo), hi), max(min(iv[1], hi), lo))


def _bounds(q: ActQuant) -> Interval:
    """The range a calibrated per-tensor quantizer represents."""
    qz: Any = q.quantizer  # a uniform quantizer (activation specs are uniform)
    scale, zp = qz.scale, qz.zero_point
    assert isinstance(scale, torch.Tensor) and isinstance(zp, torch.Tensor)
    s, z = float(scale.flatten()[0]), float(zp.flatten()[0])
    return (qz.qmin - z) * s, (qz.qmax - z) * s


def _module_interval(
    gm: fx.GraphModule, node: fx.Node, mod: nn.Module, src: Interval | None
) -> Interval | None:
    if isinstance(mod, nn.ReLU):
        return _clip(src, 0.0, float("inf"))
    if isinstance(mod, nn.Hardtanh):  # ReLU6 too: bounded whatever its input
        lo, hi = float(mod.min_val), float(mod.max_val)
        return (lo, hi) if src is None else _clip(src, lo, hi)
    name = _act_name(gm, node)
    if name is not None:
        return _act_interval(name, src)
    if _averages(gm, node):
        return _averaged(src)
    return src if _IN_RANGE.matches(gm, node) or convex_upsample(gm, node) else None


def _averages(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An average pool, a mean, or (bi)linear upsampling: outputs averaged from inputs."""
    mode = upsample_mode(gm, node)
    if mode is not None:
        return mode != "nearest" and convex_upsample(gm, node)
    return (
        AVERAGES.matches(gm, node) or is_spatial_mean(node) or node.target in ("mean", torch.mean)
    )


def _function_interval(
    gm: fx.GraphModule, node: fx.Node, iv: Mapping[fx.Node, Interval | None]
) -> Interval | None:
    ins = [iv.get(a) for a in node.all_input_nodes]
    src = ins[0] if ins else None
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return _clip(src, 0.0, float("inf"))
        if (name := _act_name(gm, node)) is not None:
            return _act_interval(name, src)
        if _averages(gm, node):
            return _averaged(src)
        return src if _IN_RANGE.matches(gm, node) else None
    if node.target in ADDS and len(ins) == 2:
        a, b = ins
        return None if a is None or b is None else (a[0] + b[0], a[1] + b[1])
    const = _constant_operand(node)
    if const is not None and src is not None and len(ins) == 1:
        if node.target in ADDS:
            return src[0] + const, src[1] + const
        if node.target in MULS:
            return _product(src, (const, const))
        if node.target in _DIVS and node.args[0] is node.all_input_nodes[0] and const != 0:
            return _product(src, (1.0 / const, 1.0 / const))
    if node.target in MULS and len(ins) == 2:
        a, b = ins
        return None if a is None or b is None else _product(a, b)
    if node.target is nn.functional.relu6:
        return (0.0, 6.0) if src is None else _clip(src, 0.0, 6.0)
    if (name := _act_name(gm, node)) is not None:
        return _act_interval(name, src)
    if node.target in CATS:
        known = [i for i in ins if i is not None]
        if len(known) != len(ins) or not known:
            return None
        return min(i[0] for i in known), max(i[1] for i in known)
    if node.target in _RELU_FUNCS:
        return _clip(src, 0.0, float("inf"))
    if _averages(gm, node):
        return _averaged(src)
    return src if _IN_RANGE.matches(gm, node) or convex_upsample(gm, node) else None


def _constant_operand(node: fx.Node) -> float | None:
    """The number in a binary op of a tensor and a number (``x + 3``, ``x / 6``)."""
    nums = [a for a in node.args[:2] if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return float(nums[0]) if len(nums) == 1 else None


def _concat_reader_range(gm: fx.GraphModule, node: fx.Node) -> Interval | None:
    """For a quantizer whose only reader is a concat: the range of the calibrated quantizer
    the concat's output reaches through value-moving ops (pools, flattens), else None.

    A BN-free net (SqueezeNet's fire modules) has no statistics for the convs it
    concatenates, but the next layer's input quantizer has a range (from the statistics
    carried to it); the concat and the ops after it only move values, so quantizing each
    operand on that grid clips nothing the reader does not clip, and the convs before the
    concat run on integers instead of in float."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_function" or users[0].target not in CATS:
        return None
    cur = users[0]
    for _ in range(8):  # a short chain of value-moving ops
        nxt = list(cur.users)
        if len(nxt) != 1:
            return None
        cur = nxt[0]
        if cur.op == "call_module":
            mod = gm.get_submodule(str(cur.target))
            if isinstance(mod, ActQuant):
                return _bounds(mod) if bool(mod.quantizer.calibrated) else None
        if not (_IN_RANGE.matches(gm, cur) or convex_upsample(gm, cur)):
            return None
    return None


def fill_edge_ranges(gm: fx.GraphModule, outputs: Mapping[str, Interval]) -> list[str]:
    """Give every uncalibrated edge quantizer of ``gm`` a range carried from the known ones
    and from ``outputs`` (layer or GroupNorm FQN -> its output's range); remove those left
    unknown.
    Returns the names of the quantizers removed."""
    iv: dict[fx.Node, Interval | None] = {}
    removed: list[str] = []
    for node in list(gm.graph.nodes):
        r: Interval | None = None
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            src = iv.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if isinstance(mod, ActQuant):
                if src is None:  # a concat operand without statistics: its reader's grid
                    src = _concat_reader_range(gm, node)
                if bool(mod.quantizer.calibrated):
                    r = _bounds(mod)
                elif src is not None and src[1] > src[0]:
                    quantizer: Any = mod.quantizer
                    quantizer.set_range(*src)
                    r = _bounds(mod)
                else:
                    node.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(node)
                    removed.append(str(node.target))
                    continue
            elif isinstance(mod, QuantMixin) or str(node.target) in outputs:
                r = outputs.get(str(node.target))  # a layer's, a GroupNorm's output
                if r is None and isinstance(mod, QuantMixin):
                    r = _layer_interval(mod, src)  # no statistics: bounds from its weights
            else:
                r = _module_interval(gm, node, mod, src)
        elif node.op in ("call_function", "call_method"):
            r = _function_interval(gm, node, iv)
        iv[node] = r
    used = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for name in dict.fromkeys(removed):
        if name not in used:  # one quantizer may serve several nodes (a split's halves)
            gm.delete_submodule(name)
    gm.graph.lint()
    gm.recompile()
    return removed
