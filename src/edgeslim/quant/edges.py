"""Activation quantizers on graph edges: one quantizer per tensor, shared by its consumers.

Layer-input quantizers leave gaps that integer runtimes cannot bridge: a tensor read by
several quantized layers gets several (different) quantizers, the operands and result of a
residual add stay in float, and a conv whose output feeds an op with no integer kernel
(PReLU, hardswish, a sigmoid gate) has no quantizer after it, so ONNX Runtime cannot fuse
``DQ -> Conv -> Q`` and runs it in float. ``quantize_edges`` traces the prepared model with
torch.fx and places exactly one :class:`ActQuant` on every edge that feeds a quantized
layer, an add, a tensor-by-tensor product (squeeze-excite gates, attention matmuls) or an
average pool (a ``mean`` over the two spatial axes included), and on
the output of every quantized conv (after its ReLU when a ReLU is its only reader, which
export then folds away), taking over the layers' own input quantizers. A quantized conv
(or linear) output read by a float op as well as a quantized one (a pre-activation
DenseNet's BatchNorm beside the concat, a Swin patch merging's LayerNorm beside the
residual add) is read quantized by every reader: a float reader beside the quantizer keeps
ONNX Runtime from fusing the layer. A linear's output read only by float ops gets no
quantizer (its MatMul then runs as an integer matmul with a float output). A layer called
several times (weights tied across depth, a siamese encoder) is quantized at every call,
each input on its own grid. The simulation then quantizes the same tensors that ONNX
Runtime's integer kernels (QLinearConv, QLinearAdd, QLinearMul, QLinearAveragePool) do;
the ops between (PReLU, SiLU) run in float on
dequantized values, a cheap element-wise pass, while every conv runs on integers.
Hardswish and hardsigmoid are first replaced by their integer forms
(:mod:`edgeslim.quant.integer_gates`; uint8 activations only): their input is quantized
like an add's, and a hardsigmoid's output, already on a fixed 8-bit grid, gets no second
quantizer.

Returns a new ``fx.GraphModule`` (with the same submodule FQNs), like PT2E's ``prepare``.
It shares the model's layers and changes them (their input quantizers move onto edges, a
hardsigmoid's ``+ 3`` goes into its conv's bias): pass a copy to keep the original, as
:func:`~edgeslim.quant.ptq.ptq` does.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from edgeslim.graph.ops import (
    ADDS,
    AVERAGES,
    MOVES_VALUES,
    OpSet,
    clamp_bounds,
    is_spatial_mean,
    padding,
    reads_shape,
    upsample_mode,
)
from edgeslim.graph.trace import trace
from edgeslim.quant.attention import QuantSplitAttention
from edgeslim.quant.gate_patterns import normalize_gates
from edgeslim.quant.integer_gates import (
    IntegerGate,
    IntegerHardsigmoid,
    IntegerHardswish,
    ShiftGridActQuant,
    fold_shift,
    integer_gate,
    shift_grid_eligible,
)
from edgeslim.quant.modules import ActQuant, QuantMixin
from edgeslim.quant.spec import QuantSpec

# a product of two tensors runs as QLinearMul when both operands and the result are quantized;
# a matrix product of two activations (attention scores, weighted values) as an integer
# matmul when both operands are
MULS = frozenset({operator.mul, operator.imul, torch.mul})
MATMULS = frozenset({operator.matmul, torch.matmul, torch.bmm})
# a ReLU reading a conv's output alone is folded into the quantizer after it (see
# export.qdq.drop_relu_before_quantize): quantize after it, not between
RELUS = OpSet(
    modules=(nn.ReLU, nn.ReLU6),
    functions=frozenset({torch.relu, nn.functional.relu, nn.functional.relu6}),
    methods=frozenset({"relu"}),
)
# no-ops in eval: a folded BatchNorm becomes nn.Identity, a Dropout does nothing
PASSES = OpSet(modules=(nn.Identity, nn.Dropout))
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
    # a quantized split attention quantizes its own matmuls and projections' inputs
    gm = trace(model, leaf_types=(QuantMixin, ActQuant, QuantSplitAttention))
    graph = gm.graph
    gated: set[fx.Node] = set()  # layers whose output quantizer is a hardsigmoid's gate
    if not spec.symmetric:
        # the gate's grid is uint8; ONNX Runtime's QLinearAdd/Mul/Conv take one type for
        # their operands, so with int8 activations the gates stay float (measured: a conv
        # whose output was the uint8 gate lost its integer kernel)
        normalize_gates(gm)  # hardswish/hardsigmoid written by hand
        _integer_gates(gm)
        gated = _fold_gate_shifts(gm)
    from_shapes = _from_shapes(graph)
    consumers: dict[fx.Node, list[fx.Node]] = {}
    takeover: dict[fx.Node, ActQuant] = {}
    convs: list[fx.Node] = []
    linears: list[fx.Node] = []  # outputs quantized only when a reader already quantizes
    # the input spec of every quantized layer, read before the loop takes the quantizers
    # over: a layer called more than once (weights shared across depth, a siamese encoder)
    # is quantized at every call, each input on its own grid
    layer_specs = {
        name: m.input_quant.spec
        for name, m in gm.named_modules()
        if isinstance(m, QuantMixin) and m.input_quant is not None
    }
    for node in graph.nodes:
        layer = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        is_add = (
            (node.op == "call_function" and node.target in ADDS)
            # integer kernels exist for pools too (QLinear(Global)AveragePool)
            or AVERAGES.matches(gm, node)
            or is_spatial_mean(node)
            or (isinstance(layer, IntegerGate) and node.all_input_nodes[0] not in gated)
            or _is_tensor_product(node)
            or (node.op == "call_function" and node.target in CATS)
        )
        quant_layer = isinstance(layer, QuantMixin) and str(node.target) in layer_specs
        if not (is_add or quant_layer):
            continue
        if quant_layer and isinstance(layer, nn.modules.conv._ConvNd):
            convs.append(node)
        elif quant_layer and isinstance(layer, nn.Linear):
            linears.append(node)
        for src in node.all_input_nodes:
            if _is_integer_hardsigmoid(gm, src):
                continue  # already on its fixed 8-bit grid
            if src in from_shapes:
                continue  # e.g. ``F.avg_pool2d(x, x.shape[2:])``: a size, not a tensor
            if "tensor_meta" in src.meta or src.op != "get_attr":
                consumers.setdefault(src, []).append(node)
        if quant_layer:
            assert isinstance(layer, QuantMixin)
            src = node.all_input_nodes[0]
            if layer.input_quant is not None:
                takeover.setdefault(src, layer.input_quant)
                layer.input_quant = None
            elif src not in takeover:  # a later call of a shared layer: a fresh grid
                takeover[src] = ActQuant(layer_specs[str(node.target)])
    edges: list[tuple[fx.Node, list[fx.Node], str]] = []
    shared: dict[tuple[fx.Node, fx.Node], str] = {}  # (value-moving op's input, op): quantizer
    alias: dict[str, str] = {}
    for i, (src, users) in enumerate(consumers.items()):
        name = f"edge_quant_{i}"
        gm.add_submodule(name, takeover.get(src) or _edge_quantizer(gm, users, spec))
        edges.append((src, users, name))
        node = src
        while moves_values(gm, node) and node.all_input_nodes:  # share through pool/flatten
            prev = node.all_input_nodes[0]
            owner = shared.setdefault((prev, node), name)
            if owner != name:  # two halves of one split: the first one's quantizer serves both
                alias[name] = _root(alias, owner)
                break
            if not _splits(gm, prev):  # a split's output is a tuple: quantize its input
                edges.append((prev, [node], name))
            node = prev
    if alias:
        edges = [(src, users, _root(alias, name)) for src, users, name in edges]
        for name in alias:
            gm.delete_submodule(name)
    edges = _one_quantizer_per_source(gm, edges)
    covered = {src for src, _, _ in edges}
    for j, layer_node in enumerate(convs + linears):
        out = _conv_output(gm, layer_node)
        if not out.users or out in gated:
            continue
        if out in covered:
            # a reader left on the float tensor beside the quantizer (a pre-activation
            # DenseNet's BatchNorm next to the concat) keeps ONNX Runtime from fusing
            # DQ -> Conv -> Q: every reader reads the quantized tensor, as in ORT's own QDQ
            read = {u for s, users, _ in edges if s is out for u in users}
            rest = [u for u in out.users if u not in read and not reads_shape(u)]
            if rest:
                edges.append((out, rest, next(n for s, _, n in edges if s is out)))
            continue
        if layer_node in linears:  # (a linear's output gets no quantizer of its own)
            continue
        name = f"output_quant_{j}"
        gm.add_submodule(name, ActQuant(spec))
        edges.append((out, list(out.users), name))
        covered.add(out)
    inserted: dict[tuple[fx.Node, str], fx.Node] = {}
    for src, users, name in edges:
        if (src, name) not in inserted:
            with graph.inserting_after(src):
                inserted[src, name] = graph.call_module(name, (src,))
        q = inserted[src, name]
        for user in dict.fromkeys(users):
            user.replace_input_with(src, q)
        for user in list(src.users):  # the same shape: read it after the quantizer, so
            if reads_shape(user):  # the float tensor has no reader left beside it
                user.replace_input_with(src, q)
    _link_input_grids(gm, convs + linears)
    graph.lint()
    gm.recompile()
    return gm


def _link_input_grids(gm: fx.GraphModule, layers: list[fx.Node]) -> None:
    """Tell each quantized layer which edge quantizer its input is on (through
    value-moving ops), for the grid of its bias (:meth:`QuantMixin.quant_bias`); a layer
    called on inputs of different grids (weights shared across calls) gets none."""
    grids: dict[str, set[ActQuant]] = {}
    for node in layers:
        src = node.all_input_nodes[0] if node.all_input_nodes else None
        while src is not None and not (
            src.op == "call_module" and isinstance(gm.get_submodule(str(src.target)), ActQuant)
        ):
            moves = moves_values(gm, src) and bool(src.all_input_nodes)
            src = src.all_input_nodes[0] if moves else None
        if src is not None:
            grid = gm.get_submodule(str(src.target))
            assert isinstance(grid, ActQuant)
            grids.setdefault(str(node.target), set()).add(grid)
    for name, found in grids.items():
        layer = gm.get_submodule(name)
        assert isinstance(layer, QuantMixin)
        layer.input_grid = (next(iter(found)),) if len(found) == 1 else None


def _one_quantizer_per_source(
    gm: fx.GraphModule, edges: list[tuple[fx.Node, list[fx.Node], str]]
) -> list[tuple[fx.Node, list[fx.Node], str]]:
    """Edges on one tensor share one quantizer when they are alike (:func:`_one_grid`).

    A tensor read directly by one quantized op and, through a value-moving op, by another
    (a UNet's skip: a concat and a max pool before the next conv) got a quantizer per path:
    two Q nodes on one conv's output, which keeps ONNX Runtime from fusing that conv
    (measured: both encoder convs of a small UNet ran in float, 23% of its MACs). Both
    observe the same values, so with the same spec they would calibrate to the same grid;
    quantizers with different specs (mixed precision) or both already calibrated stay
    apart.
    """
    first: dict[fx.Node, str] = {}
    renamed: dict[str, str] = {}  # a dropped quantizer -> the one serving its edges now
    for src, _, name in edges:
        name = _root(renamed, name)
        owner = _root(renamed, first.setdefault(src, name))
        if owner == name:
            continue
        a, b = gm.get_submodule(owner), gm.get_submodule(name)
        if _one_grid(a, b):
            # every edge of the dropped one: the whole pool/flatten chain shares; a grid
            # already set (data-free ranges from statistics) is the one kept
            if _calibrated(b):
                renamed[owner] = name
            else:
                renamed[name] = owner
    if not renamed:
        return edges
    for name in renamed:
        gm.delete_submodule(name)
    return [(src, users, _root(renamed, name)) for src, users, name in edges]


def _calibrated(q: nn.Module) -> bool:
    return isinstance(q, ActQuant) and bool(q.quantizer.calibrated)


def _one_grid(a: nn.Module, b: nn.Module) -> bool:
    """Two quantizers of one tensor can be one: same spec, at most one with a grid set.
    Why the set one may serve both: data-free ranges come from statistics before the
    edges exist, so the layer's input quantizer taken over is set and the concat's new
    one is not (a U-Net's skip: two Q nodes on the conv, which ran in float)."""
    return (
        type(a) is type(b) is ActQuant
        and a.spec == b.spec
        and not (_calibrated(a) and _calibrated(b))
    )


def _relu_like(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ReLU, or a clamp whose lower bound is 0 (``x.clamp(min=0)``, ``clamp(0, 6)``,
    ``hardtanh(0, 6)``): export folds it into the quantizer after it the same way."""
    if RELUS.matches(gm, node):
        return True
    bounds = clamp_bounds(gm, node)
    return bounds is not None and bounds[0] == 0.0


def _from_shapes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes computed from tensor shapes alone: shape reads, Python arithmetic on them
    (``x.shape[2:]``, Swin's ``(h + pad) // window``) and tensors built from them with no
    model input, parameter or layer on the way (``torch.arange(n)``, masks, WavLM's
    relative-position buckets ``log(|i - j| / 8)``). Sizes and index arithmetic, not
    activations: a quantizer there gains nothing, would shift an index computed in float
    before it is cast back, and cannot take a range with ``log(0) = -inf`` in it (WavLM's
    export raised)."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        computed = node.op in ("call_function", "call_method") and all(
            n in found for n in node.all_input_nodes
        )  # a call with no input node at all builds a constant (``torch.arange(12)``)
        if reads_shape(node) or computed:
            found.add(node)
    return found


def _root(alias: dict[str, str], name: str) -> str:
    while name in alias:
        name = alias[name]
    return name


def _splits(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``chunk``/``split``: several outputs, read through ``getitem``."""
    return (node.op == "call_method" and node.target in ("chunk", "split")) or (
        node.op == "call_function" and node.target in (torch.chunk, torch.split)
    )


def _integer_gates(gm: fx.GraphModule) -> int:
    """Replace every hardswish/hardsigmoid (module or function) by its integer form."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            gate = integer_gate(gm.get_submodule(str(node.target)))
        elif node.op == "call_function" and len(node.all_input_nodes) == 1:
            gate = integer_gate(node.target)
        else:
            gate = None
        if gate is None:
            continue
        name = f"integer_gate_{count}"
        gm.add_submodule(name, gate)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.all_input_nodes[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        target = str(node.target) if node.op == "call_module" else None
        if target and not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
            gm.delete_submodule(target)  # the float module is gone from the graph
        count += 1
    return count


def _edge_quantizer(gm: fx.GraphModule, users: list[fx.Node], spec: QuantSpec) -> ActQuant:
    """A new edge quantizer; for the input of a hardswish read by it alone, one whose grid
    puts hardswish's ``-3`` on a code, and the gate then runs on those codes (see
    :class:`~edgeslim.quant.integer_gates.IntegerHardswish`)."""
    if len(users) == 1 and users[0].op == "call_module" and shift_grid_eligible(spec):
        gate = gm.get_submodule(str(users[0].target))
        if isinstance(gate, IntegerHardswish):
            act = ShiftGridActQuant(spec)
            gate.input_grid = (act,)
            return act
    return ActQuant(spec)


def _fold_gate_shifts(gm: fx.GraphModule) -> set[fx.Node]:
    """Fold each hardsigmoid's ``+ 3`` into the quantized layer that feeds it alone (see
    :func:`~edgeslim.quant.integer_gates.fold_shift`), looking through a folded BatchNorm
    (``nn.Identity``) or a Dropout; returns the gates' input nodes."""
    folded: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if not _is_integer_hardsigmoid(gm, node):
            continue
        src = producer = node.all_input_nodes[0]
        while PASSES.matches(gm, producer) and len(producer.users) == 1:
            producer = producer.all_input_nodes[0]
        if producer.op != "call_module" or len(producer.users) != 1:
            continue
        layer = gm.get_submodule(str(producer.target))
        gate = gm.get_submodule(str(node.target))
        assert isinstance(gate, IntegerHardsigmoid)
        if isinstance(layer, QuantMixin) and fold_shift(gate, layer):
            folded.add(src)
    return folded


def _is_integer_hardsigmoid(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    return isinstance(gm.get_submodule(str(node.target)), IntegerHardsigmoid)


# a concatenation runs as QLinearConcat when every operand and the result are quantized
CATS = frozenset({torch.cat, torch.concat, torch.concatenate})
# ops that rearrange or select values along any axis (a channel shuffle, a channel split):
# one per-tensor grid serves before and after them (not so for per-channel statistics,
# which is why they are not in the shared MOVES_VALUES)
REARRANGES = OpSet(
    modules=(nn.PixelShuffle, nn.PixelUnshuffle),  # ONNX DepthToSpace/SpaceToDepth on uint8
    functions=frozenset({torch.transpose, torch.permute, torch.chunk, torch.split,
                         nn.functional.pixel_shuffle, nn.functional.pixel_unshuffle}),
    methods=frozenset({"transpose", "permute", "chunk", "split"}),
)  # fmt: skip


def moves_values(gm: fx.GraphModule, node: fx.Node) -> bool:
    """:data:`MOVES_VALUES`, and nearest-neighbour upsampling (``F.interpolate``,
    ``nn.Upsample`` in mode ``nearest``): it copies values, so one quantizer serves before
    and after it and ONNX Runtime runs the ``Resize`` on uint8. Bilinear upsampling
    averages: it stays float between quantizers (ONNX Runtime has no uint8 linear Resize
    in QDQ graphs)."""
    if node.op == "call_function" and node.target is operator.getitem:
        # one part of a chunk/split; indexing a tensor (a recurrent cell's gate slices)
        # keeps a grid per slice
        src = node.args[0]
        return isinstance(src, fx.Node) and _splits(gm, src)
    if MOVES_VALUES.matches(gm, node) or REARRANGES.matches(gm, node):
        return True
    mode = upsample_mode(gm, node)
    if mode is not None:
        return mode == "nearest"
    pad = padding(gm, node)  # zeros: 0 is a code of every grid (export folds the pad)
    return pad is not None and pad.zero


def _is_tensor_product(node: fx.Node) -> bool:
    """``a * b`` of two traced tensors (a gate), not a tensor scaled by a constant."""
    if node.op != "call_function" or node.target not in MULS | MATMULS:
        return False
    return sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2


def _conv_output(gm: fx.GraphModule, conv: fx.Node) -> fx.Node:
    """The tensor to quantize after ``conv``: its ReLU's output when a ReLU is its only
    reader (export folds that ReLU into the quantizer), else the conv's own output.

    Lone ``nn.Identity``/``Dropout`` readers are looked through: a folded BatchNorm stays in
    the module tree as ``nn.Identity`` (``Conv -> Identity -> ReLU6``). Quantizing before it
    as well as after the ReLU rounds every activation twice, the first time on the wider
    pre-ReLU range, and leaves a float requantize step between the integer kernels.
    """
    node = conv
    while len(node.users) == 1 and PASSES.matches(gm, next(iter(node.users))):
        node = next(iter(node.users))
    users = list(node.users)
    if len(users) == 1 and _relu_like(gm, users[0]):
        return users[0]
    return node
