"""Residual branches: the ``f`` of ``y = x + f(x)`` that a model can lose whole.

Depth pruning removes a residual block's branch and keeps its shortcut. Where per-layer
overhead, not MACs, sets latency (small models on ONNX Runtime's int8 kernels), dropping a
branch removes every node it ran; narrowing channels does not (a resnet20 on Fashion-MNIST:
all-int8 0.63x the fp32 file, one branch of nine dropped 0.58x, three 0.48x).

A branch is found on the fx graph (leaves: torch's own layers). For an ``add`` of two
tensors of the same shape, one operand ``b`` is a branch when the nodes it depends on and
the other operand does not (its *body*):

- are read by nothing outside the body but the ``add``;
- call each module with weights only there (a shared one keeps the branch whole; a
  shared activation is fine, it stays and runs on what reaches it);
- depend on the body's last parametrised layer ``last`` only through it: everything after
  ``last`` is computed from ``last``'s output alone (an activation, a layer scale), so
  replacing ``last`` by a constant makes every other layer of the body dead;
- end in a layer whose channel axis is known: 1 for convolutions and batch/group/instance
  norms, the last axis for linears and layer norms.

What replaces it is decided in :mod:`edgeslim.prune.depth`.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from edgeslim.errors import TraceError, first_line
from edgeslim.graph.trace import trace

_ADDS = {operator.add, operator.iadd, torch.add}
_CHANNEL_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm)


@dataclass(frozen=True)
class ResidualBranch:
    """One removable branch, by the FQNs of its modules.

    ``name``: the modules' common parent (``layer1.2``), or ``last`` when they have none or
    share it with another branch (a pre-norm block's two: ``blocks.0.attn.proj``);
    ``last``: the layer replaced by the branch's mean output; ``body``: the other modules
    with weights the branch calls before it (replaced by pass-throughs; modules without
    weights stay, and what follows ``last`` then acts on the constant);
    ``channel_dim``/``rank``: the axis of ``last``'s output the mean keeps, and its rank.
    """

    name: str
    last: str
    body: tuple[str, ...]
    channel_dim: int
    rank: int

    @property
    def modules(self) -> tuple[str, ...]:
        """Every module the branch loses: its body and its last layer."""
        return (*self.body, self.last)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return True
    return node.op == "call_method" and node.target in ("add", "add_")


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it depends on."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _common_parent(fqns: Sequence[str]) -> str:
    parts = [f.split(".")[:-1] for f in fqns]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _channel_dim(module: nn.Module) -> int | None:
    if isinstance(module, _CHANNEL_FIRST):
        return 1
    if isinstance(module, _CHANNEL_LAST):
        return -1
    return None


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _branch(
    gm: fx.GraphModule, add: fx.Node, out: fx.Node, other: fx.Node, calls: Mapping[str, int]
) -> ResidualBranch | None:
    """The branch ending at ``out`` (the other operand of ``add`` being ``other``), or None
    when it is not one (see the module doc)."""
    shape_out, shape_other = _shape(out), _shape(other)
    if shape_out is None or shape_out != shape_other:
        return None
    body = _ancestors(out) - _ancestors(other)
    if not body or any(n.op == "placeholder" for n in body):
        return None
    if any(u not in body and u is not add for n in body for u in n.users):
        return None
    modules = [n for n in gm.graph.nodes if n in body and n.op == "call_module"]
    stateful = [n for n in modules if _has_state(gm.get_submodule(str(n.target)))]
    if not stateful or any(calls[str(n.target)] != 1 for n in stateful):
        return None
    last = stateful[-1]
    last_module = gm.get_submodule(str(last.target))
    channel_dim = _channel_dim(last_module)
    shape_last = _shape(last)
    if channel_dim is None or shape_last is None:
        return None
    before = _ancestors(last)
    tail = [n for n in body if n not in before]
    derived = {last, *tail}
    for n in tail:  # computed from last's output alone (and constants)
        if any(i not in derived and i.op != "get_attr" for i in n.all_input_nodes):
            return None
    body_modules = tuple(str(n.target) for n in stateful if n is not last)
    fqns = [*body_modules, str(last.target)]
    name = _common_parent(fqns) if len(fqns) > 1 else ""
    return ResidualBranch(
        name or str(last.target), str(last.target), body_modules, channel_dim, len(shape_last)
    )


def residual_branches(
    model: nn.Module, example_inputs: Sequence[Any], traced: fx.GraphModule | None = None
) -> list[ResidualBranch]:
    """Every removable residual branch of ``model`` (see the module doc), in graph order.

    ``traced``: the model's fx graph when the caller has it. A model that does not trace
    raises :class:`~edgeslim.errors.TraceError` (naming the op and the layer), one whose
    graph does not run on ``example_inputs`` a ``TraceError`` saying so."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = (
        traced
        if traced is not None
        else trace(model, inputs=len(example_inputs), examples=example_inputs)
    )
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise TraceError(
            f"residual branches: the traced graph of {type(model).__name__} does not run on "
            f"the example inputs ({first_line(exc)})"
        ) from None
    finally:
        model.train(was)
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    found: list[ResidualBranch] = []
    taken: set[str] = set()
    for node in gm.graph.nodes:
        if not _is_add(node) or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            continue
        # both operands may qualify (a conv shortcut beside the block's convs): the one
        # with more layers is the branch, the other the shortcut that stays
        pair = [_branch(gm, node, b, a, calls), _branch(gm, node, a, b, calls)]
        branches = [br for br in pair if br is not None and not taken & set(br.modules)]
        if branches:
            branch = max(branches, key=lambda br: len(br.modules))
            found.append(branch)
            taken.update(branch.modules)
    return _unique_names(found)


def _unique_names(found: list[ResidualBranch]) -> list[ResidualBranch]:
    """Branches sharing a parent's name (a pre-norm block's ``x = x + attn(x); x = x +
    mlp(x)``: both are ``blocks.0``) are named by their last layer instead, which one
    branch alone holds. Why: plans and search keys are by name, and a shared one made the
    prune stage remove the small branch where the large one was chosen, and search remove
    both under one key."""
    from collections import Counter
    from dataclasses import replace

    count = Counter(b.name for b in found)
    return [replace(b, name=b.last) if count[b.name] > 1 else b for b in found]
