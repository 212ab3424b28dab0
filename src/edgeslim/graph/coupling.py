"""Channel-coupling groups: channels that must be removed together.

A *space* is the channel axis produced by one op (a conv's output channels, a linear's
output features, the model input). Ops that pass channels through (BatchNorm,
activations, pooling, depthwise convs and grouped convs whose groups keep their width)
keep the space; a residual add unites the spaces of
its operands; a concatenation lays spaces side by side; a flatten spreads each channel
over ``H*W`` consecutive features. A group is a union of spaces; every module that reads
or writes those channels is a member with its role and offset, keyed by FQN.

A value's channel axis is tracked through transposes, permutes, indexing and reshapes that
only add or drop size-1 dims, so ``(batch, C, T) -> (batch, T, C)`` feeds a recurrent layer
or a linear on its feature axis. A gate broadcast over the other dims (squeeze-excite's
``x * gate`` with ``gate`` shaped ``(N, C, 1, 1)``) couples the gate's producer with ``x``.
PReLU slopes are members (``channelwise``). A recurrent layer (RNN/LSTM/GRU of any depth,
either direction, without a projection, and their cells) consumes its input features
(``in``: columns of ``weight_ih``) and produces its own hidden-unit space (``out``: the
gate-strided rows of ``weight_ih``/``weight_hh``, the columns of ``weight_hh``, the
biases), one for all its layers and directions; a state created
inside ``forward`` (``x.new_zeros(n, self.rnn.hidden_size)``) is free, a state passed in by
the caller or returned to it fixes the hidden units (the model's interface would change).

A linear reads the last axis: an axis it does not mix (a sequence's tokens) is fixed, and
its output features are a new space, so a transformer's feed-forward units form a group.
LayerNorm fixes the channels it normalises together; a GroupNorm module makes its channels
prunable in whole groups (the group's ``unit`` is ``C / G`` channels: removing a whole
group leaves the others' statistics exact); so does a grouped conv (ResNeXt, RegNet) whose
``G`` groups each map ``C / G`` channels to as many (removing a whole conv group leaves the
others' outputs exact). torch's own transformer layers (leaves to
torch.fx) contribute one feed-forward group per layer by structure.

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

from edgeslim.graph.attention import SplitMultiheadAttention
from edgeslim.graph.layers import recurrent_gates
from edgeslim.graph.ops import PAD_MODULES, indexed_dim, padding
from edgeslim.graph.trace import trace
from edgeslim.graph.tracer import eval_mode

Role = Literal["out", "in", "bn", "depthwise", "channelwise"]


@dataclass(frozen=True)
class GroupMember:
    """One module touched by a group.

    ``out``: weight dim 0 (and bias) of a conv/linear; ``in``: weight dim 1 of a conv or
    linear, each group index spanning ``repeat`` consecutive input features (``H*W`` after
    a flatten); ``bn``: every per-channel tensor of a norm layer; ``depthwise``: dim 0 of a
    depthwise conv, or of a grouped conv whose groups keep their width, pruned in whole
    groups (its ``groups`` shrink with it); ``channelwise``: the per-channel parameters
    of an element-wise layer (PReLU slopes). On a recurrent layer, ``out`` is its hidden
    units (gate-strided rows of ``weight_ih``/``weight_hh``, columns of ``weight_hh``) and
    ``in`` its input features (columns of ``weight_ih``). ``offset`` is where the group's
    channel 0 sits in the member's channel axis (non-zero after a concatenation).
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
    rnn: str = ""  # "`fqn` (LSTM)" when this is a recurrent layer's hidden-unit space
    kind: str = "channel"  # "head": attention heads, ``unit`` rows each
    unit: int = 1
    # the layers that split this space into groups (GroupNorms, grouped convs), as
    # ``(channels per group, "`fqn` (GroupNorm, G groups)")``: it is pruned in whole groups
    # when they all agree (see ``groups``)
    blocks: set[tuple[int, str]] = field(default_factory=set)


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
            # reaching the model's output decides alone (its interface): an earlier reason
            # (a final softmax) would only make a warning of the natural boundary
            if not sp.fixed or reason == "model output":
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


F = nn.functional

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Softsign,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
)
"""Modules that act on each value alone: channels pass through on any axis."""
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,  # UpsamplingNearest2d / UpsamplingBilinear2d too: resizing, per channel
)
"""Modules that pool (or resize) the dims after axis 1: channels pass only on axis 1."""
PASS_MODULES = ELEMENTWISE_MODULES + POOL_MODULES
NORM_MODULES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FFN_LAYERS: tuple[type[nn.Module], ...] = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
TRANSFORMER_MODULES: tuple[type[nn.Module], ...] = (
    *FFN_LAYERS,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)
"""torch's transformer modules, leaves to torch.fx (see :meth:`_Analyzer.transformer`)."""
JOINT_NORM_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm)
"""Norms whose statistics span the channels (see :meth:`_Analyzer.joint_norm`)."""
ELEMENTWISE_FUNCS: set[Any] = {
    torch.relu,
    torch.relu_,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.mish,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.softplus,
    F.softsign,
    F.dropout,
    torch.clamp,
    torch.abs,
    operator.neg,
    # activations written out (GPT-2's and Funnel's tanh GELU reads ``torch.pow(x, 3)``;
    # erf GELU; Swish/Mish by hand)
    torch.erf,
    torch.exp,
    torch.sqrt,
    torch.rsqrt,
    torch.square,
    torch.log,
}
POOL_FUNCS: set[Any] = {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.interpolate,  # a feature pyramid's or a decoder's upsampling
}
PASS_FUNCS = ELEMENTWISE_FUNCS | POOL_FUNCS
PASS_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "clamp",
    "clamp_",
    "abs",
    "contiguous",
    "clone",
    "float",
    "neg",
    "to",
    "erf",
    "exp",
    "sqrt",
    "rsqrt",
    "square",
}
SOFTMAX_FUNCS: set[Any] = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
CREATE_FUNCS: set[Any] = {torch.zeros, torch.ones, torch.full, torch.empty}
CREATE_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty"}
"""Ops that make a tensor from sizes alone: it carries no channels of its own (a recurrent
state built in ``forward`` from ``self.rnn.hidden_size`` follows the pruned width)."""
LIKE_FUNCS: set[Any] = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like}
MOVE_FUNCS: set[Any] = {torch.transpose, torch.permute, torch.movedim, torch.swapaxes}
MOVE_METHODS = {"transpose", "permute", "movedim", "swapaxes"}
RESHAPE_FUNCS: set[Any] = {torch.unsqueeze, torch.squeeze, torch.reshape}
REDUCE_FUNCS: set[Any] = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
# reductions over a dim returning (values, indices): each has the reduced input's axes
VALUES_INDICES_FUNCS: set[Any] = {torch.max, torch.min, torch.median}
VALUES_INDICES_METHODS = {"max", "min", "median"}
_PAIR_FIELDS = {"values": 0, "indices": 1}
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
    operator.pow,
    torch.pow,
}
BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div", "pow"}
FLATTEN_METHODS = {"flatten", "view", "reshape", "unsqueeze", "squeeze"}


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _moved_dim(name: str, args: tuple[Any, ...], ndim: int, dim: int) -> int | None:
    """Where axis ``dim`` lands after ``transpose``/``swapaxes``/``permute``/``movedim``."""
    rest = list(args[1:])
    try:
        if name in ("transpose", "swapaxes"):
            a, b = int(rest[0]) % ndim, int(rest[1]) % ndim
            return b if dim == a else a if dim == b else dim
        if name == "permute":
            perm = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            return [int(o) % ndim for o in perm].index(dim)
        if name == "movedim":
            src = [rest[0]] if isinstance(rest[0], int) else list(rest[0])
            dst = [rest[1]] if isinstance(rest[1], int) else list(rest[1])
            src, dst = [int(d) % ndim for d in src], [int(d) % ndim for d in dst]
            order: list[int | None] = [None] * ndim
            for a, b in zip(src, dst, strict=True):
                order[b] = a
            others = iter(d for d in range(ndim) if d not in src)
            return [o if o is not None else next(others) for o in order].index(dim)
    except (TypeError, ValueError, IndexError):
        return None
    return None


def _reshaped_dim(in_shape: tuple[int, ...], out_shape: tuple[int, ...], dim: int) -> int | None:
    """Where axis ``dim`` lands after a reshape that only adds or drops size-1 dims."""
    ins = [i for i, n in enumerate(in_shape) if n != 1]
    outs = [i for i, n in enumerate(out_shape) if n != 1]
    if in_shape[dim] == 1 or [in_shape[i] for i in ins] != [out_shape[i] for i in outs]:
        return None
    return outs[ins.index(dim)]


def _merged_size(in_shape: tuple[int, ...], out_shape: tuple[int, ...], dim: int) -> int | None:
    """The values per channel when a reshape merges axis ``dim`` with the axes after it into
    one axis at ``dim`` (every other axis unchanged), else None. ``(N, C, H, W) -> (N, C*H*W)``
    before a classifier, or ``(N, W, C, H) -> (N, W, C*H)`` before a recurrent layer reading a
    text line: in row-major order each channel keeps its own contiguous block."""
    if tuple(in_shape[:dim]) != tuple(out_shape[:dim]) or len(out_shape) <= dim:
        return None
    size = 1
    for end in range(dim, len(in_shape)):
        size *= in_shape[end]
        if size == out_shape[dim] and end > dim:
            if tuple(in_shape[end + 1 :]) == tuple(out_shape[dim + 1 :]):
                return size // in_shape[dim]
            return None
        if size > out_shape[dim]:
            return None
    return None


def _reduced_dims(node: fx.Node, ndim: int) -> tuple[set[int], bool] | None:
    """``(reduced axes, keepdim)`` of a mean/sum/amax call; None for a full reduction."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None:
        return None
    seq = dims if isinstance(dims, (list, tuple)) else [dims]
    ints = [d for d in seq if isinstance(d, int)]
    if len(ints) != len(seq) or not isinstance(keepdim, bool):
        return None
    return {d % ndim for d in ints}, keepdim


def _recurrent_unsupported(m: nn.Module) -> str:
    """Why edgeslim cannot slice this recurrent layer's hidden units ("" if it can)."""
    if not isinstance(m, nn.RNNBase):
        return ""
    return f"proj_size={m.proj_size}" if getattr(m, "proj_size", 0) else ""


# ops returning pieces of their input along one dim (default 0), with the position of that
# dim among the node's args (the same for ``x.chunk(2, 1)`` and ``torch.chunk(x, 2, 1)``)
SPLIT_METHODS = {"chunk": 2, "split": 2, "tensor_split": 2, "unbind": 1}
SPLIT_FUNCS: dict[Any, str] = {
    torch.chunk: "chunk", torch.split: "split", torch.tensor_split: "tensor_split",
    torch.unbind: "unbind",
}  # fmt: skip


def _returns_tuple(node: fx.Node) -> bool:
    """Whether ``node`` returns several tensors (its metadata is a tuple of tensor metas)."""
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None) is None and isinstance(meta, (tuple, list))


_MOVE_NAMES = {
    torch.transpose: "transpose",
    torch.swapaxes: "swapaxes",
    torch.permute: "permute",
    torch.movedim: "movedim",
}


class _Analyzer:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.b = _Builder()
        self.vals: dict[fx.Node, _Val | None] = {}
        # nodes whose value is a (nested) tuple of tensors, e.g. an LSTM's (out, (h, c))
        self.struct: dict[fx.Node, tuple[Any, ...]] = {}
        self.created: set[fx.Node] = set()  # tensors made from sizes alone (zeros, new_zeros)
        self.rnn_space: dict[str, int] = {}  # recurrent layer FQN -> its hidden-unit space
        # conv/linear FQN -> (input, output) of its first call (see ``same_layer``)
        self.layer_calls: dict[str, tuple[_Val | None, _Val | None]] = {}

    def val(self, a: Any) -> _Val | None:
        return self.vals.get(a) if isinstance(a, fx.Node) else None

    def struct_vals(self, a: Any) -> list[_Val]:
        """Every tracked value inside a tuple-valued node (empty for a plain tensor)."""
        out: list[_Val] = []

        def walk(t: Any) -> None:
            if isinstance(t, _Val):
                out.append(t)
            elif isinstance(t, tuple):
                for u in t:
                    walk(u)

        if isinstance(a, fx.Node) and a in self.struct:
            walk(self.struct[a])
        return out

    def fix_node(self, a: Any, reason: str) -> None:
        """Fix the channels of ``a``, a tensor or a tuple-valued node."""
        self.b.fix(self.val(a), reason)
        for v in self.struct_vals(a):
            self.b.fix(v, reason)

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
            repeat = s.repeat if role == "channelwise" else 1
            self.b.spaces[s.space].members.append(GroupMember(fqn, role, offset, repeat))
            offset += s.length * s.repeat

    def opaque(self, node: fx.Node, what: str) -> _Val | None:
        for a in node.all_input_nodes:
            self.fix_node(a, f"feeds {what}, which edgeslim cannot prune through")
        return self.produce(node, 1, f"produced by {what}")

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.vals[node] = self.visit(node)

    def visit(self, node: fx.Node) -> _Val | None:
        if node.op == "placeholder":
            return self.produce(node, 1, "model input")
        if node.op == "output":
            for a in node.all_input_nodes:
                self.fix_node(a, "model output")
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

    def on_axis1(self, node: fx.Node, x: _Val | None, what: str) -> bool:
        """Whether ``x``'s channels are on axis 1, where convs, norms and pools read them;
        if not, ``node`` is made opaque (its input channels were moved by a transpose,
        permute or index, and the layer would read another axis as channels)."""
        if x is None or x.dim == 1:
            return True
        self.opaque(node, f"{what} reading axis 1 while the channels sit on axis {x.dim} "
                    "(moved by a transpose/permute/index)")  # fmt: skip
        return False

    def module(self, node: fx.Node, fqn: str, x: _Val | None) -> _Val | None:
        m = self.gm.get_submodule(fqn)
        what = f"`{fqn}` ({type(m).__name__})"
        if recurrent_gates(m):
            return self.recurrent(node, fqn, m, x)
        if isinstance(m, nn.modules.conv._ConvNd):
            if not self.on_axis1(node, x, f"conv {what}"):
                return self.produce(node, 1, f"produced by conv {what} on a moved axis")
            if m.groups == 1:
                self.consume(fqn, x)
                out = self.produce(node, 1)
                self.member(fqn, out, "out")
                return self.same_layer(fqn, x, out)
            return self.grouped_conv(node, fqn, m, x)
        if isinstance(m, nn.Linear):
            shape = _shape(node.args[0])
            if x is not None and shape is not None and x.dim != len(shape) - 1:
                # the tracked axis (e.g. a sequence's positions) is not what the linear
                # mixes: fix it, and the linear's own output features are a new space
                self.b.fix(x, f"reaches linear `{fqn}` on an axis other than its features")
                x = None
            self.consume(fqn, x)
            out = self.produce(node, -1)
            self.member(fqn, out, "out")
            return self.same_layer(fqn, x, out)
        if isinstance(m, nn.PReLU):
            return self.prelu(node, fqn, int(m.num_parameters), x)
        if isinstance(m, nn.GroupNorm):
            return self.group_norm(node, fqn, m.num_groups, m.num_channels, x)
        if isinstance(m, JOINT_NORM_MODULES):
            trailing = len(m.normalized_shape) if isinstance(m, nn.LayerNorm) else None
            return self.joint_norm(node, what, trailing, x)
        if isinstance(m, TRANSFORMER_MODULES):
            return self.transformer(node, fqn, m)
        if isinstance(m, SplitMultiheadAttention):
            return self.attention(node, fqn, m)
        if isinstance(m, nn.MultiheadAttention):
            return self.opaque(
                node,
                f"{what}: its heads are packed in one projection; "
                "edgeslim.prune.split_attention(model) makes them prunable",
            )
        if isinstance(m, NORM_MODULES):
            if not self.on_axis1(node, x, f"norm {what}"):
                return None
            self.member(fqn, x, "bn")
            return x
        if isinstance(m, ELEMENTWISE_MODULES):
            return x
        if isinstance(m, POOL_MODULES):
            return x if self.on_axis1(node, x, f"pool {what}") else None
        if isinstance(m, PAD_MODULES):
            return self.pad(node, x, f"padding {what}")
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, f"`{fqn}`")
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            # its features are on the last axis ((N, T, E)); a space there, fixed (its width
            # is not sliced), lets a transpose carry them to a conv that reads axis 1
            return self.produce(node, -1, f"produced by module {what}")
        return self.opaque(node, f"module {what}")

    def same_layer(self, fqn: str, x: _Val | None, out: _Val | None) -> _Val | None:
        """A layer called more than once (a shared MLP on two pooled inputs, a siamese
        encoder, a block applied repeatedly) has one weight: every call's output channels
        are the same channels, and so are the input columns each call reads."""
        first = self.layer_calls.setdefault(fqn, (x, out))
        if first != (x, out):
            for a, b in zip(first, (x, out), strict=True):
                if a is not None and b is not None and a.dim == b.dim:
                    self.b.unite(a, b, f"`{fqn}` called again")
                elif a is not None or b is not None:  # one call's channels are untracked
                    self.b.fix(a, f"`{fqn}` is called on inputs edgeslim cannot match")
                    self.b.fix(b, f"`{fqn}` is called on inputs edgeslim cannot match")
        return out

    def softmax(self, node: fx.Node, x: _Val | None) -> _Val | None:
        """A softmax over another axis keeps each channel apart (it passes); over the
        channel axis it normalises them jointly, like a LayerNorm (they stay whole)."""
        shape = _shape(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if x is None or shape is None or not isinstance(dim, int):
            return self.opaque(node, f"softmax `{node.name}`")
        if dim % len(shape) == x.dim:
            self.b.fix(x, f"normalised jointly by softmax `{node.name}`: removing channels "
                          "would change the others' values")  # fmt: skip
        return x

    def pad(self, node: fx.Node, x: _Val | None, what: str) -> _Val | None:
        """Padding of the dims after the channel axis keeps every channel (any mode and
        fill value: a kept channel is padded as before)."""
        p = padding(self.gm, node)
        if p is None or not p.spatial:
            return self.opaque(node, f"{what} (it may pad the channel axis)")
        return x if self.on_axis1(node, x, what) else None

    def transformer(self, node: fx.Node, fqn: str, m: nn.Module) -> _Val | None:
        """torch's own transformer layers (leaves to torch.fx: their forward branches on
        tensor properties): the feed-forward hidden units of each layer are a group of their
        own (``linear1`` rows, ``linear2`` columns); the residual width is fixed, and so is
        everything read or produced by the attention, which torch computes from the packed
        ``in_proj_weight`` where no slice of edgeslim's reaches."""
        what = f"`{fqn}` ({type(m).__name__})"
        for a in node.all_input_nodes:
            self.fix_node(a, f"feeds the residual stream of {what}")
        for name, sub in m.named_modules():
            if isinstance(sub, SplitMultiheadAttention):
                self.heads(f"{fqn}.{name}" if name else fqn, sub)
            if isinstance(sub, FFN_LAYERS):
                prefix = f"{fqn}.{name}." if name else f"{fqn}."
                linear1 = sub.get_submodule("linear1")
                assert isinstance(linear1, nn.Linear)
                space = self.b.new(linear1.out_features)
                self.b.spaces[space].members.extend(
                    [GroupMember(prefix + "linear1", "out"), GroupMember(prefix + "linear2", "in")]
                )
        return self.produce(node, -1, f"produced by {what}")

    def heads(self, fqn: str, m: SplitMultiheadAttention) -> None:
        """One group of ``m``'s heads: q/k/v rows and ``out_proj`` columns, ``head_dim``
        at a time (surgery updates ``num_attention_heads``)."""
        space = self.b.new(m.num_attention_heads)
        sp = self.b.spaces[space]
        sp.kind, sp.unit = "head", m.head_dim
        sp.members.extend(GroupMember(f"{fqn}.{p}", "out") for p in ("q_proj", "k_proj", "v_proj"))
        sp.members.append(GroupMember(f"{fqn}.out_proj", "in"))

    def attention(self, node: fx.Node, fqn: str, m: SplitMultiheadAttention) -> _Val | None:
        """An attention called on its own: its heads are a group; what it reads (the q/k/v
        projections' input features) and what it returns (``embed_dim`` wide, usually a
        residual stream) keep their widths."""
        what = f"attention `{fqn}`"
        for a in node.all_input_nodes:
            self.fix_node(a, f"feeds {what} (its input width is fixed; prune its heads)")
        self.heads(fqn, m)
        reason = f"produced by {what} (its output width is fixed; prune its heads)"
        return self.outputs(node, lambda d, n: _Val(d, (_Seg(self.b.new(n, reason), n),)))

    def joint_norm(
        self, node: fx.Node, what: str, trailing: int | None, x: _Val | None
    ) -> _Val | None:
        """LayerNorm/GroupNorm (``trailing``: how many last axes are normalised together;
        None: axis 1 and all after, GroupNorm): statistics shared across channels. Channels
        on a normalised axis are fixed (removing some would change the others' mean and
        variance); on any other axis they pass through untouched."""
        shape = _shape(node.args[0])
        if x is None or shape is None:
            return x
        first = 1 if trailing is None else len(shape) - trailing
        if x.dim >= first:
            self.b.fix(x, f"normalised jointly by {what}: removing channels would change the "
                       "statistics of the others")  # fmt: skip
        return x

    def group_norm(
        self, node: fx.Node, fqn: str, groups: int, channels: int, x: _Val | None
    ) -> _Val | None:
        """A GroupNorm module: each of its groups of ``C / G`` channels has its own mean and
        variance, so removing whole groups leaves the others exact. The channels it reads are
        pruned a group at a time (the space's ``blocks``; surgery lowers ``num_groups``).
        Fixed instead when one group holds every channel, or a group would straddle
        concatenated inputs, or the channels are not on axis 1."""
        what = f"`{fqn}` (GroupNorm, {groups} group{'s' if groups > 1 else ''})"
        if x is None:
            return x
        per = channels // groups
        plain = x.dim == 1 and x.length == channels and all(s.repeat == 1 for s in x.segs)
        if not plain:
            return self.joint_norm(node, what, None, x)
        if groups == 1:
            self.b.fix(x, f"normalised jointly by {what}: its one group holds every channel")
            return x
        if self.in_blocks(x, per, what, "normalised by"):
            self.member(fqn, x, "bn")
        return x

    def in_blocks(self, x: _Val, per: int, what: str, how: str) -> bool:
        """Mark ``x``'s channels as pruned ``per`` at a time, the groups ``what`` splits
        them into (the spaces' ``blocks``); or fix them, saying ``how`` ``what`` reads
        them, when a group would straddle concatenated tensors. Whether they were marked."""
        if any(s.length % per for s in x.segs):
            self.b.fix(x, f"{how} {what}, whose groups of {per} channels straddle the "
                       "concatenated tensors it reads")  # fmt: skip
            return False
        for seg in x.segs:
            self.b.spaces[seg.space].blocks.add((per, what))
        return True

    def grouped_conv(
        self, node: fx.Node, fqn: str, m: nn.modules.conv._ConvNd, x: _Val | None
    ) -> _Val | None:
        """A conv with ``groups > 1``. Each group maps its own ``C / G`` channels: when the
        groups keep their width (``in = out`` channels, as in ResNeXt's and RegNet's 3x3
        convs), group ``k`` reads and writes the same channel range, so input and output
        are one space, pruned a whole conv group at a time (the space's ``blocks``; surgery
        lowers ``groups``). A depthwise conv is the case of one channel per group. A group
        that widens or narrows its channels is opaque."""
        what = f"`{fqn}` (grouped conv, {m.groups} groups)"
        if getattr(m, "transposed", False):  # weight (in, out / G, ...): not sliced by group
            return self.opaque(node, f"grouped transposed conv `{fqn}` (groups={m.groups}: "
                               "edgeslim prunes ConvTranspose with groups=1)")  # fmt: skip
        if m.in_channels != m.out_channels:
            return self.opaque(node, f"grouped conv `{fqn}` (groups={m.groups}, "
                               f"{m.in_channels} -> {m.out_channels} channels: edgeslim "
                               "prunes grouped convs whose groups keep their width)")  # fmt: skip
        if x is None:
            return self.opaque(node, f"{what} on untracked channels")
        per = m.in_channels // m.groups
        if per > 1:
            plain = x.length == m.in_channels and all(s.repeat == 1 for s in x.segs)
            if not plain:
                return self.opaque(node, f"{what} on channels spread over positions")
            if not self.in_blocks(x, per, what, "read by"):
                return x
        self.member(fqn, x, "depthwise")
        return x

    def norm_owner(self, node: fx.Node) -> tuple[str, int, int] | None:
        """``(fqn, groups, channels)`` of the module whose ``weight``
        ``F.group_norm(x, self.num_groups, self.weight, ...)`` reads: a GroupNorm subclass
        with a forward of its own (Hugging Face's BiT, an activation after the norm),
        pruned as that module, a group at a time. (Its module is not in the traced graph,
        which keeps only its parameters; a module that is no GroupNorm fails the check
        after surgery, which names it.)"""
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        groups = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups")
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            return None
        fqn, _, leaf = str(weight.target).rpartition(".")
        if leaf != "weight" or not isinstance(groups, int) or groups < 1:
            return None
        channels = int(self.gm.get_parameter(str(weight.target)).shape[0])
        return (fqn, groups, channels) if channels % groups == 0 else None

    def prelu(self, node: fx.Node, fqn: str, n: int, x: _Val | None) -> _Val | None:
        """PReLU: one slope per channel of axis 1 (sliced with the group), or one shared."""
        if n == 1:
            return x
        if x is None or x.dim != 1 or x.length != n:
            return self.opaque(
                node, f"PReLU `{fqn}` whose {n} slopes do not run along the tracked channels"
            )
        self.member(fqn, x, "channelwise")
        return x

    # --- recurrent layers ----------------------------------------------------------------

    def recurrent(self, node: fx.Node, fqn: str, m: nn.Module, x: _Val | None) -> _Val | None:
        what = f"`{fqn}` ({type(m).__name__})"
        why = _recurrent_unsupported(m)
        if why:
            reason = (
                f"{what} with {why}: edgeslim prunes recurrent layers without a projection "
                f"only (pass `{fqn}` in skip=)"
            )
            self.consume(fqn, x)  # a member, so a forced request names this layer
            for a in node.all_input_nodes:
                self.fix_node(a, f"feeds {reason}")
            return self.outputs(node, lambda d, n: _Val(d, (_Seg(self.b.new(n, reason), n),)))
        shape = _shape(node.args[0])
        if x is not None:
            if shape is None or x.dim != len(shape) - 1:
                self.b.fix(x, f"reaches {what} on an axis other than its input features")
            else:
                self.consume(fqn, x)
        hidden = m.hidden_size
        assert isinstance(hidden, int)
        space = self.rnn_space.get(fqn)
        if space is None:
            space = self.b.new(hidden)
            self.b.spaces[space].rnn = what
            self.b.spaces[space].members.append(GroupMember(fqn, "out"))
            self.rnn_space[fqn] = space
        hx = node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")
        for state in hx if isinstance(hx, (tuple, list)) else [hx]:
            self.state_in(state, space, hidden, what, fqn)
        # every layer and direction keeps the same hidden units (one hidden_size): one space;
        # a bidirectional output is [forward | backward], the space twice
        sides = 2 if getattr(m, "bidirectional", False) else 1

        def hidden_val(d: int, n: int) -> _Val | None:
            if n not in (hidden, sides * hidden):
                return None
            return _Val(d, tuple(_Seg(space, hidden) for _ in range(n // hidden)))

        return self.outputs(node, hidden_val)

    def outputs(self, node: fx.Node, make: Any) -> _Val | None:
        """The node's value from its (possibly nested tuple) metadata: ``make(dim, size)``
        per tensor, on its last axis; tuples are kept in :attr:`struct` for ``getitem``."""

        def convert(meta: Any) -> Any:
            shape = getattr(meta, "shape", None)  # TensorMetadata is itself a NamedTuple
            if shape is not None:
                return make(len(shape) - 1, int(shape[-1])) if len(shape) >= 1 else None
            if isinstance(meta, (tuple, list)):
                return tuple(convert(t) for t in meta)
            return None

        out = convert(node.meta.get("tensor_meta"))
        if isinstance(out, tuple):
            self.struct[node] = out
            return None
        return out if isinstance(out, _Val) else None

    def state_in(self, s: Any, space: int, hidden: int, what: str, fqn: str) -> None:
        """Couple an initial state with the layer's hidden units, or fix them if it is
        passed in by the caller or made by an op edgeslim cannot slice."""
        if not isinstance(s, fx.Node) or s in self.created:
            return  # no state, or zeros sized in forward (they follow hidden_size)
        sp = self.b.spaces[space]
        if s.op == "placeholder":
            sp.fixed = sp.fixed or "model input"
            return
        shape = _shape(s)
        v = self.val(s)
        vals = self.struct_vals(s) if s in self.struct else [v] if v is not None else []
        if not vals or (v is not None and (shape is None or v.dim != len(shape) - 1)):
            sp.fixed = sp.fixed or (
                f"the initial state of {what} comes from `{s.name}`, which edgeslim cannot "
                f"slice with it (build it in forward from `{fqn}.hidden_size`, or pass "
                f"`{fqn}` in skip=)"
            )
            return
        for val in vals:
            self.b.unite(val, _Val(val.dim, (_Seg(space, hidden),)), f"state of {what}")

    # --- functions and methods -----------------------------------------------------------

    def binary(self, node: fx.Node) -> _Val | None:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) is not None]
        out_shape = _shape(node)
        full = [a for a in tensors if _shape(a) == out_shape]
        if not full or out_shape is None:
            return self.opaque(node, f"`{node.name}`")
        lead = next((a for a in full if self.val(a) is not None), full[0])
        first = self.val(lead)
        for a in tensors:
            if a is lead or a in self.created:
                continue
            va, sa = self.val(a), _shape(a)
            assert sa is not None
            if first is None:
                self.b.fix(va, f"broadcast op `{node.name}` with an untracked operand")
                continue
            pos = first.dim - (len(out_shape) - len(sa))  # broadcasting aligns from the right
            if pos < 0 or sa[pos] == 1:
                # broadcast along the channel axis: channels stay independent, but an
                # operand's own channels must not sit on a non-channel axis of the result
                if va is not None and va.length > 1:
                    self.b.fix(va, f"broadcast op `{node.name}` on a non-channel axis")
                continue
            if va is not None and va.dim == pos and sa[pos] == out_shape[first.dim]:
                # same shape, or a gate broadcast over the other axes (squeeze-excite)
                self.b.unite(first, _Val(first.dim, va.segs), f"`{node.name}`")
                continue
            self.b.fix(first, f"broadcast op `{node.name}`")
            self.b.fix(va, f"broadcast op `{node.name}`")
        return first

    def flatten(self, node: fx.Node, x: _Val | None, what: str) -> _Val | None:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if x is None or in_shape is None or out_shape is None:
            return self.opaque(node, what)
        if out_shape == in_shape:
            return x
        inner = _merged_size(tuple(in_shape), tuple(out_shape), x.dim)
        if inner is not None:
            return _Val(x.dim, tuple(_Seg(s.space, s.length, s.repeat * inner) for s in x.segs))
        keep = x.dim + 1
        if len(out_shape) >= keep and tuple(out_shape[:keep]) == tuple(in_shape[:keep]):
            # only axes after the channel axis merge or split (``x.flatten(2)``, ``x.view(b,
            # c, -1)``): in row-major order each channel keeps its own block of values
            return x
        moved = _reshaped_dim(in_shape, out_shape, x.dim)
        if moved is not None:
            return _Val(moved, x.segs)
        if x.dim == len(in_shape) - 1 and out_shape[-1] == in_shape[-1]:
            return _Val(len(out_shape) - 1, x.segs)  # leading axes merged, features stay last
        return self.opaque(node, f"reshape {what} {in_shape}->{out_shape}")

    def reshape_as(self, node: fx.Node, x: _Val | None) -> _Val | None:
        """``x.reshape_as(other)``: a reshape to ``other``'s shape, so the result's channels
        are ``other``'s too (LeViT's ``bn(h.flatten(0, 1)).reshape_as(h)``): the two are
        coupled; when ``other``'s channels are not tracked, the result's are fixed (a cut
        would no longer fit the shape read from it)."""
        out = self.flatten(node, x, "`.reshape_as`")
        other = self.val(node.args[1]) if len(node.args) > 1 else None
        if out is not None and other is not None:
            self.b.unite(out, other, f"`.reshape_as` `{node.name}`")
        elif out is not None:
            self.b.fix(out, f"`.reshape_as` `{node.name}` reads the shape of an untracked tensor")
        return out

    def move(self, node: fx.Node, name: str, x: _Val | None) -> _Val | None:
        shape = _shape(node.args[0])
        if x is None or shape is None or node.kwargs:
            return self.opaque(node, f"`.{name}`")
        d = _moved_dim(name, tuple(node.args), len(shape), x.dim)
        return _Val(d, x.segs) if d is not None else self.opaque(node, f"`.{name}`")

    def index(self, node: fx.Node, x: _Val | None) -> _Val | None:
        shape = _shape(node.args[0])
        d = None if x is None or shape is None else indexed_dim(node.args[1], shape, x.dim)
        if x is None or d is None:
            return self.opaque(node, f"indexing `{node.name}` along the channel axis")
        return _Val(d, x.segs)

    def reduce(self, node: fx.Node, x: _Val | None, what: str) -> _Val | None:
        shape = _shape(node.args[0])
        red = None if x is None or shape is None else _reduced_dims(node, len(shape))
        if x is None or red is None or x.dim in red[0]:
            return self.opaque(node, what)
        dims, keepdim = red
        return x if keepdim else _Val(x.dim - sum(d < x.dim for d in dims), x.segs)

    def values_indices(self, node: fx.Node, x: _Val | None, what: str) -> None:
        """``torch.max(x, dim)`` and kin: a reduction returning ``(values, indices)``, both
        shaped as the reduced input (PointNet's ``torch.max(x, 2)[0]`` over the points)."""
        out = self.reduce(node, x, what)
        self.struct[node] = (out, out)

    def expand(self, node: fx.Node, x: _Val | None) -> _Val | None:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if (
            x is not None
            and in_shape is not None
            and out_shape is not None
            and len(in_shape) == len(out_shape)
            and in_shape[x.dim] == out_shape[x.dim]
        ):
            return x
        return self.opaque(node, f"`{node.name}`")

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

    def split(self, node: fx.Node, name: str, dim_pos: int, x: _Val | None) -> _Val | None:
        """``chunk``/``split``/``tensor_split``/``unbind``: pieces along another axis carry the
        channels on; pieces along the channel axis fix them, since forward() sets the
        pieces' sizes (pruning would move the cut and hand each consumer other channels)."""
        meta = node.meta.get("tensor_meta")
        shape = _shape(node.args[0])
        pieces = len(meta) if isinstance(meta, (tuple, list)) else 0
        dim = node.args[dim_pos] if len(node.args) > dim_pos else node.kwargs.get("dim", 0)
        if x is None or shape is None or not isinstance(dim, int) or not pieces:
            self.fix_node(node.args[0], f"feeds `{name}` `{node.name}`, which edgeslim "
                          "cannot prune through")  # fmt: skip
            return None
        d = dim % len(shape)
        if d == x.dim:
            self.b.fix(x, f"cut into pieces along the channel axis by `{name}` `{node.name}`, "
                       "whose sizes forward() sets")  # fmt: skip
            self.struct[node] = (None,) * pieces
            return None
        out = x if name != "unbind" or d > x.dim else _Val(x.dim - 1, x.segs)
        self.struct[node] = (out,) * pieces
        return None

    def function(self, node: fx.Node, fn: Any, x: _Val | None) -> _Val | None:
        if fn in SPLIT_FUNCS:
            name = SPLIT_FUNCS[fn]
            return self.split(node, name, SPLIT_METHODS[name], x)
        if fn in ELEMENTWISE_FUNCS or fn in LIKE_FUNCS:
            return x
        if fn in POOL_FUNCS:
            return x if self.on_axis1(node, x, f"pool `{node.name}`") else None
        if fn in SOFTMAX_FUNCS:
            return self.softmax(node, x)
        if fn is F.pad:
            return self.pad(node, x, f"padding `{node.name}`")
        if fn is F.group_norm and (owner := self.norm_owner(node)) is not None:
            return self.group_norm(node, *owner, x)  # a GroupNorm subclass's own forward
        if fn is F.layer_norm or fn is F.group_norm:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            trailing = len(size) if isinstance(size, (list, tuple)) else 1
            return self.joint_norm(
                node, f"`{node.name}`", None if fn is F.group_norm else trailing, x
            )
        if fn in BINARY:
            return self.binary(node)
        if fn is torch.flatten or fn in RESHAPE_FUNCS:
            return self.flatten(node, x, f"`{getattr(fn, '__name__', fn)}`")
        if fn is torch.cat:
            return self.cat(node)
        if fn in _MOVE_NAMES:
            return self.move(node, _MOVE_NAMES[fn], x)
        if fn in CREATE_FUNCS:
            self.created.add(node)
            return None
        if fn is torch.prelu:  # F.prelu is torch.prelu
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            ws = _shape(w)
            if ws is not None and all(n == 1 for n in ws):
                return x
            return self.opaque(
                node,
                f"functional prelu `{node.name}` with a per-channel weight (edgeslim slices "
                "the slopes of nn.PReLU modules only: use nn.PReLU)",
            )
        if fn is operator.getitem:
            src = node.args[0]
            key = node.args[1]
            if isinstance(src, fx.Node) and src in self.struct and isinstance(key, int):
                item = self.struct[src][key]
                if isinstance(item, tuple):
                    self.struct[node] = item
                    return None
                return item if isinstance(item, _Val) else None
            if _shape(node) is None:
                return None
            return self.index(node, x)
        pair, field = (*node.args, None, None)[:2]
        if (
            fn is getattr
            and isinstance(pair, fx.Node)
            and pair in self.struct
            and isinstance(field, str)
            and field in _PAIR_FIELDS  # `.values`, `.indices`
        ):
            item = self.struct[pair][_PAIR_FIELDS[field]]
            return item if isinstance(item, _Val) else None
        if fn is getattr and _shape(node) is None:
            return None
        if fn in VALUES_INDICES_FUNCS and _returns_tuple(node):
            self.values_indices(node, x, getattr(fn, "__name__", str(fn)))
            return None
        if _returns_tuple(node):
            return self.opaque(node, f"function `{getattr(fn, '__name__', fn)}`")
        if fn in REDUCE_FUNCS:
            return self.reduce(node, x, getattr(fn, "__name__", str(fn)))
        return self.opaque(node, f"function `{getattr(fn, '__name__', fn)}`")

    def method(self, node: fx.Node, name: str, x: _Val | None) -> _Val | None:
        if name in SPLIT_METHODS:
            return self.split(node, name, SPLIT_METHODS[name], x)
        if name in VALUES_INDICES_METHODS and _returns_tuple(node):
            self.values_indices(node, x, f"`.{name}`")
            return None
        if _returns_tuple(node):
            return self.opaque(node, f"method `.{name}`")
        if name in PASS_METHODS:
            return x
        if name in BINARY_METHODS:
            return self.binary(node)
        if name in FLATTEN_METHODS:
            return self.flatten(node, x, f"`.{name}`")
        if name == "reshape_as":
            return self.reshape_as(node, x)
        if name in MOVE_METHODS:
            return self.move(node, name, x)
        if name in CREATE_METHODS:
            self.created.add(node)
            return None
        if name in ("expand", "expand_as"):
            return self.expand(node, x)
        if name == "size" or _shape(node) is None:
            return None
        if name in REDUCE_METHODS:
            return self.reduce(node, x, f"`.{name}`")
        if name in ("softmax", "log_softmax"):
            return self.softmax(node, x)
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
            rnn = next((s.rnn for s in spaces if s.rnn), "")
            if rnn and reasons and reasons[0] in ("model input", "model output"):
                # not a natural boundary: the caller passes or receives this state
                reasons[0] = (
                    f"hidden units of {rnn} reach the {reasons[0]} (a state passed in or "
                    "returned): pruning them would change the model's interface"
                )
            sizes = {s.size for s in spaces}
            if len(sizes) > 1:
                reasons.append(f"coupled spaces differ in size {sorted(sizes)}")
            has_out = any(m.role == "out" for m in members)
            if not has_out and not reasons:
                reasons.append("no producing layer")
            heads = next((sp for sp in spaces if sp.kind == "head"), None)
            size, unit = spaces[0].size, heads.unit if heads is not None else 1
            blocks = sorted(set().union(*(sp.blocks for sp in spaces)))
            if blocks:
                per = blocks[0][0]
                if len({u for u, _ in blocks}) > 1:
                    reasons.append("split by layers whose groups differ: " + ", ".join(
                        f"{w} ({u} channels each)" for u, w in blocks))  # fmt: skip
                elif heads is not None or size % per:
                    reasons.append(f"split by {blocks[0][1]}, whose groups of {per} "
                                   f"channels do not divide these {size}")  # fmt: skip
                else:
                    size, unit = size // per, per  # pruned in whole groups
            out.append(
                CouplingGroup(
                    id=len(out),
                    size=size,
                    members=members,
                    prunable=not reasons,
                    reason=reasons[0] if reasons else "",
                    kind="head" if heads is not None else "channel",
                    unit=unit,
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
    """Coupling groups of a traceable model, from its fx graph with propagated shapes
    (traced in eval mode: the structure deployed, without training-only code)."""
    with eval_mode(model):  # (the graph's modules are the model's: restored after both)
        gm = trace(
            model, (SplitMultiheadAttention,), inputs=len(example_args), examples=example_args
        )
        return graph_coupling_groups(gm, *example_args)
