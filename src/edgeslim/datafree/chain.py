"""What the weights and BatchNorm statistics alone say about a model: the shared analysis.

:func:`analyze` traces a copy of the model, propagates per-channel Gaussian statistics
(mean, variance) from the input through the graph, finds the *safe pairs* and folds BN:

- **Statistics.** The input is taken as standardised (mean 0, variance 1 per channel: what
  edgeslim's loaders feed). A BatchNorm's output is ``N(beta, gamma^2)`` whatever its input
  (that is what makes the methods data-free); a conv/linear maps means exactly and
  variances assuming independent inputs; ReLU/ReLU6/PReLU/LeakyReLU use the Gaussian
  moments of :mod:`edgeslim.datafree.gaussian`; an add sums both; pooling, dropout and
  flatten keep them (flatten repeats each channel over its positions); a GroupNorm's
  output is ``N(beta, gamma^2)`` per channel, estimated. Any other op gives "unknown".
  Statistics that went through a conv/linear with no BatchNorm after it are
  *estimated* (``Stats.estimated``): they rest on the independence assumption, not on
  statistics the training data left in a BN, and methods that need exact means say so and
  skip them.
- **Safe pairs** ``producer -> [BN] -> [act] -> [pool, dropout, flatten] -> consumer``,
  ``act`` one of ReLU, ReLU6, Hardtanh, PReLU, LeakyReLU or none: every tensor on the way
  has exactly one user, so a per-channel change of the producer's output can be undone in
  the consumer's input columns. A producer whose output also feeds a residual add (or
  anything else) is not a pair: its channels are shared, and compensating one consumer
  would leave the other wrong. Every other producer is recorded in ``Chain.blocked`` with
  the reason (``"hardswish is not positively homogeneous"``), for the methods' notes.
- **Fan-out pairs**: a producer whose activation is read by several plain convs/linears
  and nothing else, directly or through a branch's own pool (Fire, Inception), is blocked
  for the one-consumer methods and kept in ``Chain.fanned``: a per-channel scale is undone
  in all its consumers alike, which is all DFQ's equalization and high-bias absorption
  need.
- **Folding.** Each conv -> BN becomes one conv with a bias; the pair keeps the BN's
  statistics as the producer's pre-activation statistics.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from edgeslim.datafree.channel_moves import (
    Ids,
    as_channels,
    channel_ids,
    moves_values,
    node_shape,
    run_on_ids,
)
from edgeslim.datafree.gaussian import IDENTITY, RELU, RELU6, Act, act_mean, act_var, leaky
from edgeslim.datafree.report import DataFreeReport

if TYPE_CHECKING:
    from edgeslim.datafree.ops import WeightGranularity
from edgeslim.graph.ops import (
    ADDS,
    AVERAGES,
    MOVES_VALUES,
    indexed_dim,
    padding,
    reads_shape,
    upsample_mode,
)
from edgeslim.graph.trace import trace
from edgeslim.quant.fold import fold_batchnorm

# a conv of any dimension is a matrix over (channel, window tap) columns: the analysis only
# needs its window's shape for the spatial prior (:func:`kernel_window`)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
COMPUTE = (*CONVS, nn.Linear)
NORMS = (nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm3d)
# per-channel statistics pass unchanged through these (pooling keeps each channel's mean;
# its variance is taken as kept too: neighbouring positions are strongly correlated)
_PASSES = MOVES_VALUES | AVERAGES
_NOT_MOVED = object()  # GraphWalk._moved: not a channel move, the other rules apply
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
# upsampling that copies values or takes convex combinations of them: per channel it keeps
# the mean, stays inside the input's interval and commutes with a per-channel scale and
# shift, so statistics, ranges and equalization pass through it (bicubic can overshoot)
CONVEX_MODES = frozenset({"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"})


def convex_upsample(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``nn.Upsample`` or ``F.interpolate`` in a mode of :data:`CONVEX_MODES`."""
    return upsample_mode(gm, node) in CONVEX_MODES


def _passes(gm: fx.GraphModule, node: fx.Node) -> bool:
    if _PASSES.matches(gm, node) or convex_upsample(gm, node):
        return True
    # spatial padding with zeros or copies (TF-style "same" padding before a stride-2 conv):
    # it commutes with a per-channel scale and keeps each channel's range; the statistics
    # are taken as kept, as the conv's own zero padding already is
    pad = padding(gm, node)
    if pad is not None:
        return pad.spatial and pad.homogeneous
    return _selects_positions(node)


def _selects_positions(node: fx.Node) -> bool:
    """``y[..., :length]`` keeping every channel (a causal conv's cut, TCN's ``Chomp1d``):
    each channel's values are a subset of its own, so its statistics are taken as kept and
    a per-channel scale commutes with it; ``.contiguous()`` after it moves nothing."""
    if node.op == "call_method" and node.target == "contiguous":
        return True
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    src = node.args[0]
    meta = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return shape is not None and indexed_dim(node.args[1], tuple(shape), 1) == 1


@dataclass
class Stats:
    """Per-channel mean and variance of a tensor (float64, shape ``(C,)``)."""

    mean: torch.Tensor
    var: torch.Tensor
    estimated: bool = False  # derived through a conv/linear without a BN after it
    # the interval the values cannot leave, where known exactly (the model's input, from the
    # task's input format); only ops that move values unchanged (flatten, view) keep it
    bounds: tuple[float, float] | None = None
    # the interval the last activation clipped the values to (ReLU: 0 and up), kept by the
    # ops that pass values on unchanged or select them (pools, flatten)
    clip: tuple[float, float] | None = None

    @property
    def std(self) -> torch.Tensor:
        return self.var.clamp_min(0).sqrt()

    def repeat(self, n: int) -> Stats:
        return Stats(self.mean.repeat_interleave(n), self.var.repeat_interleave(n),
                     self.estimated, self.bounds, self.clip)  # fmt: skip


@dataclass(frozen=True)
class Pair:
    """``producer -> [BN] -> act -> consumer`` with nothing else reading the way between."""

    producer: str
    consumer: str
    act: Act
    repeat: int = 1  # consumer input features per producer channel (H*W after a flatten)
    depthwise: bool = False  # consumer is depthwise: channel k only feeds its output k
    act_name: str = "relu"  # for notes: relu, relu6, hardtanh, prelu, leaky_relu, none
    max_pool: bool = False  # a max pool on the way: only positive slopes commute with it
    # further consumers reading the same activation (a Fire or Inception block's branches):
    # such a *fan-out pair* is kept in ``Chain.fanned``, not ``Chain.pairs``; only methods
    # that change every consumer alike (CLE, high-bias absorption) use it
    others: tuple[str, ...] = ()

    @property
    def consumers(self) -> tuple[str, ...]:
        return (self.consumer, *self.others)

    @property
    def label(self) -> str:
        """``"producer -> consumer[, other, ...]"``, a report's key."""
        return f"{self.producer} -> {', '.join(self.consumers)}"


@dataclass(frozen=True)
class Blocked:
    """A producer that is not a safe pair: its consumer (if one was reached) and why."""

    consumer: str | None
    reason: str

    def describe(self, producer: str) -> str:
        return f"{producer} -> {self.consumer or '?'}: {self.reason}"


@dataclass
class Chain:
    """A BN-folded copy of the model and what is known about it (see the module doc)."""

    model: nn.Module
    order: list[str]  # conv/linear FQNs in graph order
    pre: dict[str, Stats]  # producer FQN -> statistics of its output before the activation
    inputs: dict[str, Stats | None]  # layer FQN -> input statistics per input column
    pairs: dict[str, Pair]  # by producer
    example: torch.Tensor  # an input of the right shape (for tracing the folded copy)
    notes: list[str] = field(default_factory=list)
    blocked: dict[str, Blocked] = field(default_factory=dict)  # producers that are no pair
    unmeasured: dict[str, Pair] = field(default_factory=dict)  # pairs without statistics
    report: DataFreeReport = field(default_factory=DataFreeReport)  # what the method did
    granularity: WeightGranularity = "channel"  # of the weight scales the rounding is modelled with
    # layer FQN -> statistics of its BatchNorm's output, for every layer a BN follows (pairs
    # or not: a conv before a residual add too); what the methods change is in ``pre``
    bn_outputs: dict[str, Stats] = field(default_factory=dict)
    # module FQN -> statistics of its output as propagated, for every conv/linear and
    # GroupNorm (estimated where no BatchNorm set them): the ranges of last resort
    outputs: dict[str, Stats] = field(default_factory=dict)
    # module FQN -> the statistics of its output at each of its calls, for a module called
    # more than once (a detector head shared by every pyramid level): ranges only, as the
    # union over the calls; its weights serve every call, so no method changes them
    shared_outputs: dict[str, list[Stats]] = field(default_factory=dict)
    # the model as given (unfolded, unchanged): what further analyses (the channel
    # covariances of :mod:`.covariance`) trace, with its BatchNorms in place
    source: nn.Module | None = None
    # fan-out pairs by producer (:attr:`Pair.others`): blocked for the methods that
    # compensate one consumer (their reason is in ``blocked``), equalized by DFQ; their
    # statistics are in ``pre`` like a pair's
    fanned: dict[str, Pair] = field(default_factory=dict)

    def why_not(self, producer: str) -> str:
        """Why ``producer`` is not a usable pair, in a note's words."""
        if producer in self.pairs:
            return "is a pair"
        if producer in self.unmeasured:
            p = self.unmeasured[producer]
            return (f"{producer} -> {p.consumer}: no statistics of its output are known "
                    "(no BatchNorm and an input edgeslim cannot follow)")  # fmt: skip
        blocked = self.blocked.get(producer)
        return blocked.describe(producer) if blocked else f"{producer}: not analysed"

    def pair_into(self, consumer: str) -> Pair | None:
        """The pair (or fan-out pair) whose activation ``consumer`` reads, if any."""
        for p in self.pairs.values():
            if p.consumer == consumer:
                return p
        for p in self.fanned.values():
            if consumer in p.consumers:
                return p
        return None

    def layer(self, fqn: str) -> nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear:
        m = self.model.get_submodule(fqn)
        assert isinstance(m, COMPUTE)
        return m


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONVS) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def group_inputs(m: nn.Module) -> torch.Tensor | None:
    """For a grouped conv (``groups > 1``, depthwise included), the input channel each
    weight column reads, ``(O, C / groups)``: row ``o`` reads only its group's channels.
    None for a layer whose every row reads every input channel."""
    groups = int(getattr(m, "groups", 1))
    if groups == 1:
        return None
    w = m.weight
    assert isinstance(w, torch.Tensor)
    out, per = int(w.shape[0]), int(w.shape[1])
    group = torch.arange(out) // (out // groups)
    return group[:, None] * per + torch.arange(per)[None, :]


def kernel_window(w: torch.Tensor) -> tuple[int, ...]:
    """The kernel window of a conv weight ``(out, in, *kernel)``: ``(k,)``, ``(kh, kw)`` or
    ``(kt, kh, kw)``, the shape :func:`~.compensate.spatial_kernel` puts its prior on."""
    return tuple(int(n) for n in w.shape[2:])


def _act_of(gm: fx.GraphModule, node: fx.Node) -> tuple[Act, str] | None:
    """The activation at ``node`` whose Gaussian moments are known, and its name."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.ReLU):
            return RELU, "relu"
        if isinstance(m, nn.ReLU6):
            return RELU6, "relu6"
        if isinstance(m, nn.Hardtanh):
            return Act(float(m.min_val), float(m.max_val)), "hardtanh"
        if isinstance(m, nn.PReLU):
            return leaky(tuple(m.weight.detach().flatten().tolist())), "prelu"
        if isinstance(m, nn.LeakyReLU):
            return leaky((float(m.negative_slope),)), "leaky_relu"
        return None
    if node.op == "call_function":
        if node.target in (nn.functional.relu, torch.relu):
            return RELU, "relu"
        if node.target is nn.functional.relu6:
            return RELU6, "relu6"
        if node.target is nn.functional.leaky_relu:
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return (leaky((float(slope),)), "leaky_relu") if isinstance(slope, float) else None
    if node.op == "call_method" and node.target == "relu":
        return RELU, "relu"
    return None


# elementwise activations that are not positively homogeneous (f(s z) != s f(z), s > 0)
_OTHER_MODULES: dict[type[nn.Module], str] = {
    nn.Hardswish: "hardswish", nn.SiLU: "silu", nn.GELU: "gelu", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.Hardsigmoid: "hardsigmoid", nn.ELU: "elu", nn.Mish: "mish",
    nn.Softplus: "softplus", nn.SELU: "selu", nn.CELU: "celu",
}  # fmt: skip
_OTHER_FUNCTIONS: dict[Any, str] = {
    nn.functional.hardswish: "hardswish", nn.functional.silu: "silu",
    nn.functional.gelu: "gelu", torch.sigmoid: "sigmoid", nn.functional.sigmoid: "sigmoid",
    torch.tanh: "tanh", nn.functional.hardsigmoid: "hardsigmoid", nn.functional.elu: "elu",
    nn.functional.mish: "mish", nn.functional.softplus: "softplus",
}  # fmt: skip


def other_act(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The name of a non-homogeneous elementwise activation at ``node`` (else None)."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return next((n for t, n in _OTHER_MODULES.items() if isinstance(m, t)), None)
    if node.op == "call_function":
        return _OTHER_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target in ("sigmoid", "tanh"):
        return str(node.target)
    return None


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node in a note's words: ``layer1.0.bn2 (BatchNorm2d)``, ``add``, ``the output``."""
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op == "output":
        return "the model output"
    target = node.target
    return str(getattr(target, "__name__", target))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def layer_output(m: nn.Module, x: Stats) -> Stats | None:
    """Output statistics of a conv/linear from its input statistics (independent inputs)."""
    w = _f64(m.weight)  # type: ignore[arg-type]
    bias = _f64(m.bias) if getattr(m, "bias", None) is not None else torch.zeros(w.shape[0])  # type: ignore[arg-type]
    if isinstance(m, nn.Linear):
        return Stats(w @ x.mean + bias, (w * w) @ x.var)
    assert isinstance(m, CONVS)
    if is_depthwise(m):
        flat = w.reshape(w.shape[0], -1)
        return Stats(flat.sum(1) * x.mean + bias, (flat * flat).sum(1) * x.var)
    s, s2 = w.flatten(2).sum(-1), (w * w).flatten(2).sum(-1)
    idx = group_inputs(m)
    if idx is not None:  # each row sums over its own group's channels only
        return Stats((s * x.mean[idx]).sum(1) + bias, (s2 * x.var[idx]).sum(1))
    return Stats(s @ x.mean + bias, s2 @ x.var)


V = TypeVar("V")


def _reads_tracked_channels(m: nn.Module, node: fx.Node, x: Any) -> bool:
    """Whether ``m`` reads the channels a walk value describes (those of axis 1): a conv
    always does; a linear only on a ``(batch, features)`` input (on ``(batch, tokens,
    features)`` axis 1 is the tokens). Widths must agree either way."""
    width = int(x.mean.shape[0])
    if isinstance(m, nn.Linear):
        src = node.args[0] if node.args else None
        shape = node_shape(src) if isinstance(src, fx.Node) else None
        return shape is not None and len(shape) == 2 and m.in_features == width
    return int(getattr(m, "in_channels", -1)) == width


class GraphWalk(Generic[V]):
    """A per-channel model of every tensor, carried through a traced (unfolded) graph.

    The walk is shared; what a value is and how each op maps it is the subclass's:
    :class:`_Propagator` (means and variances) here, the channel covariances of
    :mod:`.covariance`. ``inputs[fqn]``: the value at each conv/linear's input, for the
    layers in ``layers`` (all when None). ``free``: drop a node's value once its last user
    is visited (only the live tensors are held).
    """

    def __init__(
        self, gm: fx.GraphModule, layers: Collection[str] | None = None, free: bool = False
    ) -> None:
        self.gm = gm
        self.layers = None if layers is None else set(layers)
        self.free = free
        self.values: dict[fx.Node, V | None] = {}
        self.inputs: dict[str, V | None] = {}
        # nodes whose channels a move left off axis 1: (the value moved, its channel ids)
        self.layouts: dict[fx.Node, tuple[V, Ids]] = {}

    def run(self) -> dict[str, V | None]:
        last: dict[fx.Node, fx.Node] = {}
        for node in self.gm.graph.nodes:
            for arg in node.all_input_nodes:
                last[arg] = node
        for node in self.gm.graph.nodes:
            self.values[node] = self._visit(node)
            if self.free:
                for arg in node.all_input_nodes:
                    if last.get(arg) is node:
                        self.values.pop(arg, None)
                        self.layouts.pop(arg, None)
        return self.inputs

    # what subclasses define
    def source(self, channels: int) -> V | None:
        """The model's input: standardised, independent channels."""
        raise NotImplementedError

    def act(self, x: V, act: Act) -> V:
        raise NotImplementedError

    def norm(
        self, x: V | None, mean: torch.Tensor, var: torch.Tensor, estimated: bool = False
    ) -> V:
        """A norm's output: its statistics, whatever arrived (``x``, maybe unknown); exact
        for a BatchNorm, ``estimated`` for a GroupNorm (see :meth:`_visit`)."""
        raise NotImplementedError

    def layer(self, m: nn.Module, x: V) -> V | None:
        raise NotImplementedError

    def add(self, x: V, y: V) -> V | None:
        raise NotImplementedError

    def cat(self, parts: list[V]) -> V:
        raise NotImplementedError

    def positions_to_features(self, x: V, positions: int) -> V | None:
        """A flatten of ``(N, C, H, W)`` into ``(N, C * positions)`` features."""
        raise NotImplementedError

    def select(self, x: V, index: torch.Tensor) -> V | None:
        """The value of channels ``index`` of ``x``, in that order (a split, a shuffle)."""
        raise NotImplementedError

    def _moved(self, node: fx.Node, x: V | None) -> V | object | None:
        """A channel split, slice or shuffle (:mod:`.channel_moves`): the value of the
        channels it leaves on axis 1, None while its layout is not channels, or
        ``_NOT_MOVED`` for an op the other rules handle (flattens, pools, position cuts)."""
        src = node.args[0] if node.args else None
        if not moves_values(node) or not isinstance(src, fx.Node):
            return _NOT_MOVED
        held = self.layouts.get(src)
        if held is None:
            before, after = node_shape(src), node_shape(node)
            splits = before is not None and after is not None and len(after) > len(before)
            if x is None or (_passes(self.gm, node) and not splits):
                return _NOT_MOVED
            fresh = channel_ids(src)
            if fresh is None:
                return _NOT_MOVED
            held = (x, fresh)
        base, ids = held
        out = run_on_ids(node, ids)
        if out is None:
            return None
        index = as_channels(out)
        if index is None:
            self.layouts[node] = (base, out)
            return None
        return self.select(base, index)

    def _arg(self, node: fx.Node, i: int = 0) -> V | None:
        a = node.args[i] if len(node.args) > i else None
        return self.values.get(a) if isinstance(a, fx.Node) else None

    def _visit(self, node: fx.Node) -> V | None:
        shape = node_shape(node)
        if node.op == "placeholder":
            return None if shape is None or len(shape) < 2 else self.source(shape[1])
        x = self._arg(node)
        found = _act_of(self.gm, node)
        if found is not None:
            return None if x is None else self.act(x, found[0])
        if node.op == "call_module":
            m = self.gm.get_submodule(str(node.target))
            if isinstance(m, NORMS) and m.running_mean is not None:
                beta = _f64(m.bias) if m.bias is not None else torch.zeros(m.num_features)
                gamma = _f64(m.weight) if m.weight is not None else torch.ones(m.num_features)
                return self.norm(x, beta.to(torch.float64), (gamma * gamma).to(torch.float64))
            if isinstance(m, nn.GroupNorm) and shape is not None and len(shape) >= 2:
                # each sample's group is standardised, then scaled per channel: N(beta,
                # gamma^2) per channel on average over its group, estimated (a channel's own
                # mean within the group is not known)
                c = m.num_channels
                beta = _f64(m.bias) if m.bias is not None else torch.zeros(c).double()
                gamma = _f64(m.weight) if m.weight is not None else torch.ones(c).double()
                return self.norm(x, beta, gamma * gamma, estimated=True)
            if isinstance(m, COMPUTE):
                if x is not None and not _reads_tracked_channels(m, node, x):
                    x = None  # what is tracked (axis 1) is not what this layer reads
                if self.layers is None or str(node.target) in self.layers:
                    self.inputs[str(node.target)] = x
                return None if x is None else self.layer(m, x)
        if node.op == "call_function" and node.target in ADDS:
            y = self._arg(node, 1)
            return None if x is None or y is None else self.add(x, y)
        if node.op == "call_function" and node.target is torch.cat:
            parts = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim != 1 or not isinstance(parts, (list, tuple)):
                return None
            vals = [self.values.get(p) if isinstance(p, fx.Node) else None for p in parts]
            known = [v for v in vals if v is not None]
            return self.cat(known) if len(known) == len(vals) else None
        moved = self._moved(node, x)
        if moved is not _NOT_MOVED:
            return moved  # type: ignore[return-value]  # V or None here
        if _passes(self.gm, node) and x is not None:
            src = node.args[0]
            before = node_shape(src) if isinstance(src, fx.Node) else None
            if before is not None and shape is not None and len(before) == 4 and len(shape) == 2:
                positions = before[2] * before[3]
                return x if positions == 1 else self.positions_to_features(x, positions)
            return x
        return None


class _Propagator(GraphWalk[Stats]):
    """Per-channel means and variances (independent inputs assumed through a conv/linear).
    ``input_range``: the model input's known interval, carried as its ``bounds``."""

    def __init__(self, gm: fx.GraphModule, input_range: tuple[float, float] | None = None) -> None:
        super().__init__(gm)
        self.input_range = input_range

    def source(self, channels: int) -> Stats:
        return Stats(torch.zeros(channels, dtype=torch.float64),
                     torch.ones(channels, dtype=torch.float64),
                     bounds=self.input_range)  # fmt: skip

    def act(self, x: Stats, act: Act) -> Stats:
        mean, var = act_mean(x.mean, x.std, act), act_var(x.mean, x.std, act)
        return Stats(mean, var, x.estimated, clip=(act.lo, act.hi))

    def norm(
        self, x: Stats | None, mean: torch.Tensor, var: torch.Tensor, estimated: bool = False
    ) -> Stats:
        return Stats(mean, var, estimated)

    def layer(self, m: nn.Module, x: Stats) -> Stats | None:
        out = layer_output(m, x)
        if out is not None:
            out.estimated = True  # a BN after it replaces these with its own
        return out

    def add(self, x: Stats, y: Stats) -> Stats | None:
        if x.mean.shape != y.mean.shape:
            return None
        return Stats(x.mean + y.mean, x.var + y.var, x.estimated or y.estimated)

    def cat(self, parts: list[Stats]) -> Stats:
        clips = [v.clip for v in parts]
        clip = None
        if all(c is not None for c in clips):  # every part clipped: the union of their clips
            clip = (min(c[0] for c in clips if c), max(c[1] for c in clips if c))
        return Stats(torch.cat([v.mean for v in parts]), torch.cat([v.var for v in parts]),
                     any(v.estimated for v in parts), clip=clip)  # fmt: skip

    def positions_to_features(self, x: Stats, positions: int) -> Stats:
        return x.repeat(positions)

    def select(self, x: Stats, index: torch.Tensor) -> Stats:
        return Stats(x.mean[index], x.var[index], x.estimated, x.bounds, x.clip)


def _readers(cur: fx.Node) -> list[fx.Node]:
    """The ops reading ``cur``'s values: a shape read (``x.view(x.size(0), -1)``, the
    common flatten) reads none, and a per-channel scale leaves it as it was."""
    return [u for u in cur.users if not reads_shape(u)]


def _fan_out(gm: fx.GraphModule, cur: fx.Node, what: str) -> Blocked | None:
    """Why the channels at ``cur`` cannot be changed for one consumer alone (if so)."""
    readers = _readers(cur)
    if len(readers) == 1:
        return None
    users = ", ".join(_describe(gm, u) for u in readers)
    return Blocked(None, f"{what} is read by {len(readers)} ops ({users}): its channels are "
                         "shared, so no single consumer can undo a per-channel change")  # fmt: skip


def _fanned_consumers(
    gm: fx.GraphModule, cur: fx.Node, calls_of: Counter[str]
) -> tuple[list[fx.Node], bool] | None:
    """The consumers of ``cur`` when it is read by several plain convs/linears and nothing
    else, each directly or through its own pool/padding (an Inception block's pool branch;
    no flatten), each called once and ungrouped: a per-channel scale of ``cur`` is undone
    in every one of them alike. With whether a max pool is on a branch; None otherwise."""
    readers = _readers(cur)
    if len(readers) < 2:
        return None
    consumers, max_pool = [], False
    for u in readers:
        before = cur
        while _passes(gm, u):  # a branch's own pool or padding
            shapes = node_shape(before), node_shape(u)
            if shapes[0] is None or shapes[1] is None or len(shapes[0]) != len(shapes[1]):
                return None  # a flatten: its consumer's columns repeat each channel
            max_pool |= _is_max_pool(gm, u)
            more = _readers(u)
            if len(more) != 1:
                return None
            before, u = u, more[0]
        m = gm.get_submodule(str(u.target)) if u.op == "call_module" else None
        if not isinstance(m, COMPUTE) or u.args[0] is not before or calls_of[str(u.target)] > 1:
            return None
        if isinstance(m, CONVS) and m.groups != 1:
            return None
        consumers.append(u)
    return consumers, max_pool


def _is_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), _MAX_POOLS):
        return True
    fn = nn.functional
    return node.target in (fn.max_pool1d, fn.max_pool2d, fn.max_pool3d)


def module_calls(gm: fx.GraphModule) -> Counter[str]:
    """How many nodes call each module (more than one: a module reused in ``forward``)."""
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")


def _find_pair(
    gm: fx.GraphModule, node: fx.Node, calls_of: Counter[str]
) -> tuple[Pair, fx.Node] | Blocked:
    """The pair starting at compute ``node`` and the node holding its pre-activation, or
    why there is none (see the module doc); ``calls_of``: :func:`module_calls` of ``gm``."""
    producer = str(node.target)
    cur, pre_node, act, name, repeat = node, node, IDENTITY, "none", 1
    other: str | None = None
    max_pool = False
    calls = calls_of[producer]
    if calls > 1:  # one weight for several inputs: a per-channel change reaches them all
        why = (f"it is called at {calls} places in the graph (one weight for each of its "
               "inputs), so no one consumer can undo a change")  # fmt: skip
        return Blocked(None, why)

    def split(what: str) -> tuple[Pair, fx.Node] | Blocked | None:
        """At ``cur``: None when one op reads it; a fan-out pair when only convs/linears
        do (:func:`_fanned_consumers`); else why the channels are shared."""
        found = _fanned_consumers(gm, cur, calls_of)
        if found is None:
            return _fan_out(gm, cur, what)
        if other is not None:
            return Blocked(None, f"{other} is not positively homogeneous")
        names = tuple(str(u.target) for u in found[0])
        pooled = max_pool or found[1]
        return Pair(producer, names[0], act, repeat, False, name, pooled, names[1:]), pre_node

    if (fan := split("its output")) is not None:
        return fan
    nxt = _readers(cur)[0]
    sliced = False
    while _selects_positions(nxt):  # before the activation: a subset of the values
        cur, sliced = nxt, True
        if (fan := _fan_out(gm, cur, _describe(gm, nxt))) is not None:
            return fan
        nxt = _readers(cur)[0]
    if nxt.op == "call_module" and isinstance(gm.get_submodule(str(nxt.target)), NORMS):
        if sliced:  # not folded (the slice is between): a scale would be normalised away
            return Blocked(None, f"its BatchNorm {nxt.target} reads a slice of its output, "
                                 "so it was not folded into it")  # fmt: skip
        cur = pre_node = nxt
        if (fan := split(f"its BatchNorm {nxt.target}")) is not None:
            return fan
        nxt = _readers(cur)[0]
        while _selects_positions(nxt):
            cur = nxt
            if (fan := _fan_out(gm, cur, _describe(gm, nxt))) is not None:
                return fan
            nxt = _readers(cur)[0]
    found = _act_of(gm, nxt)
    other = other_act(gm, nxt) if found is None else None
    if found is not None or other is not None:
        if found is not None:
            act, name = found
        cur = nxt
        if (fan := split(f"its activation {_describe(gm, nxt)}")) is not None:
            return fan
        nxt = _readers(cur)[0]
    while _passes(gm, nxt):
        max_pool |= _is_max_pool(gm, nxt)
        before, after = node_shape(cur), node_shape(nxt)
        if before is not None and after is not None and len(before) > 2 and len(after) == 2:
            repeat *= math.prod(before[2:])  # a flatten: each channel feeds this many
        cur = nxt
        if (fan := split(_describe(gm, nxt))) is not None:
            return fan
        nxt = _readers(cur)[0]
    consumer = gm.get_submodule(str(nxt.target)) if nxt.op == "call_module" else None
    if nxt.op == "output":
        return Blocked(None, "its output is the model's output (no consumer to compensate in)")
    if not isinstance(consumer, COMPUTE) or nxt.args[0] is not cur:
        return Blocked(None, f"its output reaches {_describe(gm, nxt)} before any conv/linear")
    if other is not None:
        return Blocked(str(nxt.target), f"{other} is not positively homogeneous")
    if (calls := calls_of[str(nxt.target)]) > 1:
        return Blocked(str(nxt.target), f"the consumer is called at {calls} places in the "
                                        "graph, so a change made for this input reaches "
                                        "its others")  # fmt: skip
    if isinstance(consumer, CONVS) and consumer.groups != 1 and not is_depthwise(consumer):
        return Blocked(str(nxt.target), "the consumer is a grouped conv")
    pair = Pair(producer, str(nxt.target), act, repeat, is_depthwise(consumer), name, max_pool)
    return pair, pre_node


def analyze(
    model: nn.Module, example: torch.Tensor, input_range: tuple[float, float] | None = None
) -> Chain:
    """Statistics, safe pairs and a BN-folded copy of ``model`` (``model`` is untouched).

    ``input_range``: the interval the model's input cannot leave (from the task's input
    format); the input is otherwise modelled as standardised (mean 0, std 1 per channel).

    Raises :class:`~edgeslim.errors.TraceError` (naming the op and module) if the model
    does not trace.
    """
    folded = copy.deepcopy(model).eval()
    gm = trace(folded)
    ShapeProp(gm).propagate(example)
    prop = _Propagator(gm, input_range)
    prop.run()
    order: list[str] = []
    pairs: dict[str, Pair] = {}
    unmeasured: dict[str, Pair] = {}
    blocked: dict[str, Blocked] = {}
    fanned: dict[str, Pair] = {}
    pre: dict[str, Stats] = {}
    bn_outputs: dict[str, Stats] = {}
    calls_of = module_calls(gm)
    outputs: dict[str, Stats] = {}
    shared: dict[str, list[Stats]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        if isinstance(gm.get_submodule(str(node.target)), (*COMPUTE, nn.GroupNorm)):
            known = prop.values.get(node)
            if known is not None and calls_of[str(node.target)] == 1:
                outputs[str(node.target)] = known
            elif known is not None:
                shared.setdefault(str(node.target), []).append(known)
        if not isinstance(gm.get_submodule(str(node.target)), COMPUTE):
            continue
        order.append(str(node.target))
        readers: list[fx.Node | None] = [*_readers(node)] or [None]
        (user, *more) = readers
        if (
            user is not None
            and not more
            and user.op == "call_module"
            and isinstance(gm.get_submodule(str(user.target)), nn.modules.batchnorm._BatchNorm)
        ):
            bn = prop.values.get(user)
            if bn is not None and not bn.estimated:
                bn_outputs[str(node.target)] = bn
        found = _find_pair(gm, node, calls_of)
        if isinstance(found, Blocked):
            blocked[str(node.target)] = found
            continue
        pair, pre_node = found
        stats = prop.values.get(pre_node)
        if pair.others:  # equalized by DFQ; one-consumer methods see it blocked
            blocked[pair.producer] = Blocked(None, (
                f"its output is read by {len(pair.consumers)} layers "
                f"({', '.join(pair.consumers)}): equalized with all of them by DFQ, but no "
                "single consumer can compensate a change made for it"))  # fmt: skip
            if stats is not None:
                fanned[pair.producer], pre[pair.producer] = pair, stats
            continue
        if stats is None:
            unmeasured[pair.producer] = pair
            continue
        pairs[pair.producer], pre[pair.producer] = pair, stats
    fold_batchnorm(folded)
    chain = Chain(folded, order, pre, dict(prop.inputs), pairs, example, [], blocked, unmeasured)
    chain.bn_outputs, chain.outputs, chain.fanned = bn_outputs, outputs, fanned
    chain.shared_outputs = {k: v for k, v in shared.items() if len(v) == calls_of[k]}
    chain.source = model
    return chain


def input_stats(chain: Chain, fqn: str) -> Stats | None:
    """Input statistics of layer ``fqn`` in its column space, from the current ``pre``.

    A pair's consumer reads the producer's activation (re-derived from ``chain.pre``, which
    methods update as they rescale or quantize producers); other layers keep the
    statistics propagated at analysis time.
    """
    pair = chain.pair_into(fqn)
    if pair is None:
        return chain.inputs.get(fqn)
    s = chain.pre[pair.producer]
    out = Stats(act_mean(s.mean, s.std, pair.act), act_var(s.mean, s.std, pair.act), s.estimated)
    return out.repeat(pair.repeat) if pair.repeat > 1 else out
