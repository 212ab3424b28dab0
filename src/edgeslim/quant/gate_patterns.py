"""Hardswish, hardsigmoid and SiLU written by hand, recognised so they run on integers too.

Many MobileNetV3 implementations predate ``nn.Hardswish`` and write the functions out::

    h_sigmoid(x) = relu6(x + 3) / 6             h_swish(x) = x * relu6(x + 3) / 6

(``relu6`` as ``nn.ReLU6``, ``F.relu6``, ``clamp(0, 6)`` or ``hardtanh(0, 6)``; ``/ 6`` or
``* (1/6)``; ``x * h_sigmoid(x)``), and EfficientNet code writes swish as
``x * torch.sigmoid(x)``. Traced, that is four float ops between two integer
convs. :func:`normalize_gates` rewrites each match into ``F.hardsigmoid``/``F.hardswish``/
``F.silu`` of the same input (exactly the same function), which the edge pass then replaces by its
integer gate (:mod:`edgeslim.quant.integer_gates`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from edgeslim.graph.ops import clamp_bounds

F = nn.functional
_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)
_DIV = (operator.truediv, torch.div)


def _is(value: Any, target: float) -> bool:
    return isinstance(value, (int, float)) and abs(float(value) - target) < 1e-6


def _relu6_input(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """``x`` when ``node`` is ``relu6(x)`` in any of its spellings, else None."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    bounds = clamp_bounds(gm, node)
    x = node.args[0]
    six = bounds is not None and _is(bounds[0], 0.0) and _is(bounds[1], 6.0)
    return x if six and isinstance(x, fx.Node) else None


def _plus3_input(node: Any) -> fx.Node | None:
    """``x`` when ``node`` is ``x + 3`` (or ``3 + x``)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ADD):
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and _is(b, 3.0):
        return a
    return b if isinstance(b, fx.Node) and _is(a, 3.0) else None


def _over6_input(node: Any) -> fx.Node | None:
    """``y`` when ``node`` is ``y / 6`` or ``y * (1/6)``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function") or node.kwargs:
        return None
    if node.target in _DIV and len(node.args) == 2 and _is(node.args[1], 6.0):
        y = node.args[0]
        return y if isinstance(y, fx.Node) else None
    if node.target in _MUL and len(node.args) == 2:
        a, b = node.args
        if isinstance(a, fx.Node) and _is(b, 1.0 / 6.0):
            return a
        if isinstance(b, fx.Node) and _is(a, 1.0 / 6.0):
            return b
    return None


def _hardsigmoid_input(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """``x`` when ``node`` computes ``relu6(x + 3) / 6``."""
    inner = _over6_input(node)
    return _plus3_input(_relu6_input(gm, inner)) if inner is not None else None


def _product(node: Any) -> tuple[fx.Node, fx.Node] | None:
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in _MUL:
        a, b = node.args if len(node.args) == 2 else (None, None)
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and not node.kwargs:
            return a, b
    return None


def _hardswish_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """``x`` when ``node`` computes ``x * relu6(x + 3) / 6`` or ``x * hardsigmoid(x)``."""
    inner = _over6_input(node)
    pair = _product(inner)
    if pair is not None:  # (x * relu6(x + 3)) / 6
        for x, other in (pair, pair[::-1]):
            if _plus3_input(_relu6_input(gm, other)) is x:
                return x
    pair = _product(node)
    if pair is not None:  # x * (relu6(x + 3) / 6), x * F.hardsigmoid(x)
        for x, other in (pair, pair[::-1]):
            if _hardsigmoid_input(gm, other) is x:
                return x
            hardsigmoid = other.op == "call_function" and other.target is F.hardsigmoid
            if hardsigmoid and other.args and other.args[0] is x:
                return x
    return None


def _silu_input(node: fx.Node) -> fx.Node | None:
    """``x`` when ``node`` computes ``x * sigmoid(x)`` (swish written by hand)."""
    pair = _product(node)
    if pair is None:
        return None
    for x, other in (pair, pair[::-1]):
        sigmoid = (other.op == "call_function" and other.target in (torch.sigmoid, F.sigmoid)) or (
            other.op == "call_method" and other.target == "sigmoid"
        )
        if sigmoid and other.args and other.args[0] is x:
            return x
    return None


def _replace(gm: fx.GraphModule, node: fx.Node, fn: Any, x: fx.Node, gone: set[fx.Node]) -> None:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fn, (x,))
    node.replace_all_uses_with(new)
    _erase_unused(gm, node, gone)


def _erase_unused(gm: fx.GraphModule, node: fx.Node, gone: set[fx.Node]) -> None:
    """Erase ``node`` and, transitively, the inputs it leaves unread (the matched ops)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n in gone or n.users or n.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = list(n.all_input_nodes)
        gm.graph.erase_node(n)
        gone.add(n)
        stack.extend(inputs)


def normalize_gates(gm: fx.GraphModule) -> int:
    """Rewrite hand-written hardswish/hardsigmoid/SiLU (see module doc) into ``F.hardswish`` /
    ``F.hardsigmoid`` / ``F.silu``; returns how many. The graph is recompiled when any was found."""
    count = 0
    gone: set[fx.Node] = set()
    for node in list(gm.graph.nodes):  # the products first: they contain the sigmoid
        if node not in gone and node.op == "call_function":
            x = _hardswish_input(gm, node)
            if x is not None:
                _replace(gm, node, F.hardswish, x, gone)
                count += 1
    for node in list(gm.graph.nodes):
        if node not in gone and node.op == "call_function":
            x = _silu_input(node)
            if x is not None:
                _replace(gm, node, F.silu, x, gone)
                count += 1
    for node in list(gm.graph.nodes):
        if node not in gone and node.op == "call_function":
            x = _hardsigmoid_input(gm, node)
            if x is not None:
                _replace(gm, node, F.hardsigmoid, x, gone)
                count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
