"""Channel-coupling groups: channels that must be removed together.

A *space* is the channel axis produced by one op (a conv's output channels, a linear's
output features, the model input). Ops that pass channels through (BatchNorm,
activations, pooling, depthwise convs) keep the space; a residual add unites the spaces of
its operands; a concatenation lays spaces side by side; a flatten spreads each channel
over ``H*W`` consecutive features. A group is a union of spaces; every module that reads
or writes those channels is a member with its role and offset, keyed by FQN.

Spaces that reach the model input or output, an op edgeslim does not understand, or a
misaligned coupling are marked not prunable, with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from edgeslim.graph.trace import trace

Role = Literal["out", "in", "bn", "depthwise"]


@dataclass(frozen=True)
class GroupMember:
    """One module touched by a group.

    ``out``: weight dim 0 (and bias) of a conv/linear; ``in``: weight dim 1 of a conv or
    linear, each group index spanning ``repeat`` consecutive input features (``H*W`` after
    a flatten); ``bn``: every per-channel tensor of a norm layer; ``depthwise``: dim 0 of a
    depthwise conv (its groups shrink with it). ``offset`` is where the group's channel 0
    sits in the member's channel axis (non-zero after a concatenation).
    """

    fqn: str
    role: Role
    offset: int = 0
    repeat: int = 1


@dataclass(frozen=True)
class CouplingGroup:
    """Channels coupled across modules: ``size`` units, each ``unit`` rows wide."""

    id: int
    size: int
    members: tuple[GroupMember, ...]
    prunable: bool
    reason: str = ""
    kind: Literal["channel", "head", "ffn", "hidden"] = "channel"
    unit: int = 1

    @property
    def producers(self) -> list[str]:
        return [m.fqn for m in self.members if m.role == "out"]

    @property
    def consumers(self) -> list[str]:
        return [m.fqn for m in self.members if m.role == "in"]

    def describe(self) -> str:
        roles: dict[str, list[str]] = {}
        for m in self.members:
            roles.setdefault(m.role, []).append(m.fqn)
        text = "; ".join(f"{r}: {', '.join(v)}" for r, v in roles.items())
        return text if self.prunable else f"{text} [fixed: {self.reason}]"


# --- spaces and union-find -------------------------------------------------------------


@dataclass
class _Space:
    size: int
    members: list[GroupMember] = field(default_factory=list)
    fixed: str = ""


@dataclass(frozen=True)
class _Seg:
    space: int
    length: int
    repeat: int = 1


@dataclass(frozen=True)
class _Val:
    """A tensor value's channel axis ``dim`` as a list of segments."""

    dim: int
    segs: tuple[_Seg, ...]

    @property
    def length(self) -> int:
        return sum(s.length * s.repeat for s in self.segs)


class _Builder:
    def __init__(self) -> None:
        self.spaces: list[_Space] = []
        self.parent: list[int] = []

    def new(self, size: int, fixed: str = "") -> int:
        self.spaces.append(_Space(size, fixed=fixed))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def fix(self, val: _Val | None, reason: str) -> None:
        if val is None:
            return
        for s in val.segs:
            sp = self.spaces[s.space]
            if not sp.fixed:
                sp.fixed = reason

    def unite(self, a: _Val, b: _Val, where: str) -> None:
        """Couple two equally-shaped channel axes (residual add, mul, cat on other dims)."""
        aligned = (
            a.dim == b.dim
            and len(a.segs) == len(b.segs)
            and all(
                x.length == y.length
                and x.repeat == y.repeat
                and self.spaces[x.space].size == x.length
                and self.spaces[y.space].size == y.length
                for x, y in zip(a.segs, b.segs, strict=True)
            )
        )
        if not aligned:
            self.fix(a, f"misaligned channel coupling at {where}")
            self.fix(b, f"misaligned channel coupling at {where}")
            return
        for x, y in zip(a.segs, b.segs, strict=True):
            self.union(x.space, y.space)


PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
NORM_MODULES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PASS_FUNCS: set[Any] = {
    torch.relu,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.hardswish,
    torch.nn.functional.dropout,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool2d,
    operator.neg,
    torch.nn.functional.leaky_relu,
}
PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "neg", "to"}
BINARY = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    operator.iadd,
    operator.imul,
}
BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}
FLATTEN_METHODS = {"flatten", "view", "reshape"}


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


class _Analyzer:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.b = _Builder()
        self.vals: dict[fx.Node, _Val | None] = {}

    def val(self, a: Any) -> _Val | None:
        return self.vals.get(a) if isinstance(a, fx.Node) else None

    def produce(self, node: fx.Node, dim: int, fixed: str = "") -> _Val | None:
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        d = dim % len(shape)
        space = self.b.new(shape[d], fixed)
        return _Val(d, (_Seg(space, shape[d]),))

    def consume(self, fqn: str, v: _Val | None) -> None:
        if v is None:
            return
        offset = 0
        for s in v.segs:
            self.b.spaces[s.space].members.append(GroupMember(fqn, "in", offset, s.repeat))
            offset += s.length * s.repeat

    def member(self, fqn: str, v: _Val | None, role: Role) -> None:
        if v is None:
            return
        offset = 0
        for s in v.segs:
            self.b.spaces[s.space].members.append(GroupMember(fqn, role, offset))
            offset += s.length * s.repeat

    def opaque(self, node: fx.Node, what: str) -> _Val | None:
        for a in node.all_input_nodes:
            self.b.fix(self.val(a), f"feeds {what}, which edgeslim cannot prune through")
        return self.produce(node, 1, f"produced by {what}")

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.vals[node] = self.visit(node)

    def visit(self, node: fx.Node) -> _Val | None:
        if node.op == "placeholder":
            return self.produce(node, 1, "model input")
        if node.op == "output":
            for a in node.all_input_nodes:
                self.b.fix(self.val(a), "model output")
            return None
        if node.op == "get_attr":
            return None
        x = self.val(node.args[0]) if node.args else None
        if node.op == "call_module":
            return self.module(node, str(node.target), x)
        if node.op == "call_function":
            return self.function(node, node.target, x)
        if node.op == "call_method":
            return self.method(node, str(node.target), x)
        return self.opaque(node, f"`{node.name}`")

    def module(self, node: fx.Node, fqn: str, x: _Val | None) -> _Val | None:
        m = self.gm.get_submodule(fqn)
        if isinstance(m, nn.modules.conv._ConvNd):
            if m.groups == 1:
                self.consume(fqn, x)
                out = self.produce(node, 1)
                self.member(fqn, out, "out")
                return out
            if m.groups == m.in_channels == m.out_channels and x is not None:
                self.member(fqn, x, "depthwise")
                return x
            return self.opaque(node, f"grouped conv `{fqn}` (groups={m.groups})")
        if isinstance(m, nn.Linear):
            shape = _shape(node.args[0])
            if x is not None and shape is not None and x.dim != len(shape) - 1:
                return self.opaque(node, f"linear `{fqn}` on a non-feature axis")
            self.consume(fqn, x)
            out = self.produce(node, -1)
            self.member(fqn, out, "out")
            return out
        if isinstance(m, NORM_MODULES):
            self.member(fqn, x, "bn")
            return x
        if isinstance(m, PASS_MODULES):
            return x
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, f"`{fqn}`")
        return self.opaque(node, f"module `{fqn}` ({type(m).__name__})")

    def binary(self, node: fx.Node) -> _Val | None:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) is not None]
        out_shape = _shape(node)
        full = [a for a in tensors if _shape(a) == out_shape]
        if not full:
            return self.opaque(node, f"`{node.name}`")
        first = self.val(full[0])
        for a in tensors[1:] if tensors[0] is full[0] else tensors:
            if a is full[0]:
                continue
            va = self.val(a)
            sa = _shape(a)
            if a in full and first is not None and va is not None:
                self.b.unite(first, va, f"`{node.name}`")
            elif (
                sa is not None and first is not None and len(sa) > first.dim and sa[first.dim] == 1
            ):
                continue  # broadcast along the channel axis: channels stay independent
            else:
                self.b.fix(first, f"broadcast op `{node.name}`")
                self.b.fix(va, f"broadcast op `{node.name}`")
        return first

    def flatten(self, node: fx.Node, x: _Val | None, what: str) -> _Val | None:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if x is None or in_shape is None or out_shape is None:
            return self.opaque(node, what)
        if x.dim == 1 and len(out_shape) == 2 and out_shape[0] == in_shape[0]:
            spatial = 1
            for s in in_shape[2:]:
                spatial *= s
            return _Val(1, tuple(_Seg(s.space, s.length, s.repeat * spatial) for s in x.segs))
        if out_shape == in_shape:
            return x
        return self.opaque(node, f"reshape {what} {in_shape}->{out_shape}")

    def cat(self, node: fx.Node) -> _Val | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        assert isinstance(tensors, (list, tuple))
        vals = [self.val(t) for t in tensors]
        out_shape = _shape(node)
        if out_shape is None or any(v is None for v in vals) or not isinstance(dim, int):
            return self.opaque(node, f"`{node.name}`")
        d = dim % len(out_shape)
        known = [v for v in vals if v is not None]
        if all(v.dim == d for v in known):
            return _Val(d, tuple(s for v in known for s in v.segs))
        for v in known[1:]:
            self.b.unite(known[0], v, f"`{node.name}`")
        return known[0]

    def function(self, node: fx.Node, fn: Any, x: _Val | None) -> _Val | None:
        if fn in PASS_FUNCS:
            return x
        if fn in BINARY:
            return self.binary(node)
        if fn is torch.flatten:
            return self.flatten(node, x, "`torch.flatten`")
        if fn is torch.cat:
            return self.cat(node)
        if fn in (getattr, operator.getitem) and _shape(node) is None:
            return None
        if fn is torch.mean:
            return (
                x
                if _shape(node) is not None and x is not None and self._keeps(node, x)
                else self.opaque(node, "mean")
            )
        return self.opaque(node, f"function `{getattr(fn, '__name__', fn)}`")

    def _keeps(self, node: fx.Node, x: _Val) -> bool:
        out = _shape(node)
        return out is not None and len(out) > x.dim and out[x.dim] == x.length

    def method(self, node: fx.Node, name: str, x: _Val | None) -> _Val | None:
        if name in PASS_METHODS:
            return x
        if name in BINARY_METHODS:
            return self.binary(node)
        if name in FLATTEN_METHODS:
            return self.flatten(node, x, f"`.{name}`")
        if name == "size" or _shape(node) is None:
            return None
        if name == "mean" and x is not None and self._keeps(node, x):
            return x
        return self.opaque(node, f"method `.{name}`")

    def groups(self) -> list[CouplingGroup]:
        classes: dict[int, list[int]] = {}
        for i in range(len(self.b.spaces)):
            classes.setdefault(self.b.find(i), []).append(i)
        out: list[CouplingGroup] = []
        for members_idx in classes.values():
            spaces = [self.b.spaces[i] for i in members_idx]
            members = tuple(dict.fromkeys(m for s in spaces for m in s.members))
            if not members:
                continue
            reasons = [s.fixed for s in spaces if s.fixed]
            sizes = {s.size for s in spaces}
            if len(sizes) > 1:
                reasons.append(f"coupled spaces differ in size {sorted(sizes)}")
            has_out = any(m.role == "out" for m in members)
            if not has_out and not reasons:
                reasons.append("no producing layer")
            out.append(
                CouplingGroup(
                    id=len(out),
                    size=spaces[0].size,
                    members=members,
                    prunable=not reasons,
                    reason=reasons[0] if reasons else "",
                )
            )
        return out


def graph_coupling_groups(gm: fx.GraphModule, *example_args: Any) -> list[CouplingGroup]:
    """Coupling groups from an already-traced graph, propagating shapes on ``example_args``."""
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_args)
    gm.train(was_training)
    analyzer = _Analyzer(gm)
    analyzer.run()
    return analyzer.groups()


def fx_coupling_groups(model: nn.Module, *example_args: Any) -> list[CouplingGroup]:
    """Coupling groups of a traceable model, from its fx graph with propagated shapes."""
    return graph_coupling_groups(trace(model), *example_args)
