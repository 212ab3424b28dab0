"""Integer-kernel coverage: which share of a model's MACs ONNX Runtime really runs on integers.

A QDQ file says what *should* be int8; ONNX Runtime decides what *is*: it fuses
``DQ -> Conv -> Q`` into ``QLinearConv`` only when the pattern is exact, and a conv followed by
an op it cannot fuse (PReLU, hardswish, a gate multiply) stays a float ``Conv`` between
dequantize and quantize nodes, slower than the fp32 model. This module reads the graph ORT
optimises (at ``ORT_ENABLE_EXTENDED``, where the QDQ fusions run and ops keep NCHW layout),
runs it once at the example inputs with every compute node's tensors exposed to learn their
shapes, and counts the MACs of each compute node, integer or float.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# compute ops by kind; ConvTranspose-like ops count MACs per *input* position
INTEGER_CONV = frozenset({"QLinearConv", "ConvInteger", "NhwcQLinearConv"})
INTEGER_CONV_TRANSPOSE = frozenset({"QLinearConvTranspose"})
INTEGER_MATMUL = frozenset(
    {"QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
)
INTEGER_GEMM = frozenset({"QGemm"})
INTEGER_RNN = frozenset({"DynamicQuantizeLSTM"})
FLOAT_CONV = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "NchwcConv"})
FLOAT_CONV_TRANSPOSE = frozenset({"ConvTranspose"})
FLOAT_MATMUL = frozenset({"MatMul", "FusedMatMul"})
FLOAT_GEMM = frozenset({"Gemm", "FusedGemm"})
FLOAT_RNN = frozenset({"LSTM", "GRU", "RNN"})
# low-bit weights unpacked in the kernel, float compute: a W4 weight-only linear
WEIGHT_ONLY_MATMUL = frozenset({"MatMulNBits"})
INTEGER_OPS = INTEGER_CONV | INTEGER_CONV_TRANSPOSE | INTEGER_MATMUL | INTEGER_GEMM | INTEGER_RNN
FLOAT_OPS = (
    FLOAT_CONV | FLOAT_CONV_TRANSPOSE | FLOAT_MATMUL | FLOAT_GEMM | FLOAT_RNN | WEIGHT_ONLY_MATMUL
)
# below this share of MACs in integer kernels an int8 export warns (and its record says so)
MIN_INT8_MAC_SHARE = 0.95
# position of the weight input of each conv-like op (QLinearConv: x, x_scale, x_zp, w, ...)
_WEIGHT_INPUT = {"QLinearConv": 3, "NhwcQLinearConv": 3, "QLinearConvTranspose": 3}


@dataclass(frozen=True)
class NodeMacs:
    """One compute node of the optimised graph: its name, op type, MACs at the example
    inputs and whether it runs on integers."""

    name: str
    op_type: str
    macs: int
    integer: bool

    @property
    def weight_only(self) -> bool:
        """Low-bit weights with float compute (``MatMulNBits``): float MACs, but a layer
        quantized as asked (W4 weight-only), not one ONNX Runtime failed to fuse."""
        return self.op_type in WEIGHT_ONLY_MATMUL


@dataclass(frozen=True)
class KernelCoverage:
    """The share of MACs in integer kernels, with every compute node counted."""

    nodes: tuple[NodeMacs, ...] = field(default_factory=tuple)

    @property
    def integer_macs(self) -> int:
        return sum(n.macs for n in self.nodes if n.integer)

    @property
    def float_macs(self) -> int:
        return sum(n.macs for n in self.nodes if not n.integer)

    @property
    def int8_mac_share(self) -> float:
        """Integer MACs over all MACs (0 for a graph without compute nodes)."""
        total = self.integer_macs + self.float_macs
        return self.integer_macs / total if total else 0.0

    @property
    def weight_only_share(self) -> float:
        """MACs of weight-only low-bit kernels (float compute) over all MACs."""
        total = self.integer_macs + self.float_macs
        return sum(n.macs for n in self.nodes if n.weight_only) / total if total else 0.0

    @property
    def quantized_share(self) -> float:
        """MACs quantized as asked: integer kernels plus weight-only low-bit ones."""
        return self.int8_mac_share + self.weight_only_share

    def float_nodes(self, min_share: float = 0.0) -> list[NodeMacs]:
        """Float compute nodes, largest first, each at least ``min_share`` of all MACs."""
        total = max(1, self.integer_macs + self.float_macs)
        found = [n for n in self.nodes if not n.integer and n.macs / total >= min_share]
        return sorted(found, key=lambda n: -n.macs)

    def summary(self, limit: int = 5) -> str:
        """One line: the share, and the largest float compute nodes if any."""
        text = f"int8_mac_share {self.int8_mac_share:.3f}"
        if self.weight_only_share:
            text += f", weight-only low-bit (MatMulNBits) {self.weight_only_share:.3f}"
        rest = [n for n in self.float_nodes() if not n.weight_only]
        if rest:
            named = ", ".join(f"{n.name} ({n.op_type}, {n.macs:,} MACs)" for n in rest[:limit])
            more = f" and {len(rest) - limit} more" if len(rest) > limit else ""
            text += f"; float compute: {named}{more}"
        return text


def optimized_graph(path: Path, out: Path) -> Path:
    """Write the graph ONNX Runtime runs for ``path`` (QDQ fusions applied) to ``out``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return out


def _shapes(model: Any, feeds: Mapping[str, np.ndarray], names: list[str]) -> dict[str, tuple]:
    """Run ``model`` (a ModelProto) once with ``names`` added as outputs; their shapes."""
    import onnx
    import onnxruntime as ort

    known = {o.name for o in model.graph.output}
    for name in names:
        if name and name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            known.add(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    outputs = [o.name for o in session.get_outputs()]
    values = session.run(outputs, dict(feeds))
    return {n: tuple(np.asarray(v).shape) for n, v in zip(outputs, values, strict=True)}


def _attr(node: Any, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _node_macs(node: Any, shape: Mapping[str, tuple]) -> int:
    """MACs of one compute node from its tensors' shapes (0 when a shape is unknown)."""
    op = node.op_type
    out = shape.get(node.output[0])
    if out is None:
        return 0
    if op in INTEGER_CONV | FLOAT_CONV | INTEGER_CONV_TRANSPOSE | FLOAT_CONV_TRANSPOSE:
        w = shape.get(node.input[_WEIGHT_INPUT.get(op, 1)])
        if w is None:
            return 0
        if op in INTEGER_CONV_TRANSPOSE | FLOAT_CONV_TRANSPOSE:
            x = shape.get(node.input[0])
            # every input position meets the whole (in, out/groups, k...) weight
            return 0 if x is None else math.prod(x[2:]) * x[0] * math.prod(w)
        # every output position of every output channel: (in/groups * k...) MACs
        return math.prod(out) * math.prod(w[1:])
    if op in INTEGER_MATMUL | FLOAT_MATMUL | WEIGHT_ONLY_MATMUL:
        a = shape.get(node.input[0])
        return 0 if a is None or not a else math.prod(out) * a[-1]
    if op in INTEGER_GEMM | FLOAT_GEMM:
        a = shape.get(node.input[0])
        if a is None or len(a) != 2:
            return 0
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return math.prod(out) * k
    if op in INTEGER_RNN | FLOAT_RNN:
        x, w, r = (shape.get(node.input[i]) for i in range(3))
        if x is None or w is None or r is None:
            return 0
        steps = x[0] * x[1]  # (seq, batch, features) in the default layout
        if _attr(node, "layout", 0):
            steps = x[0] * x[1]
        return steps * (math.prod(w) + math.prod(r))
    return 0


class FloatKernelWarning(UserWarning):
    """An int8 export whose compute runs partly in float kernels in ONNX Runtime."""


Feeds = Mapping[str, np.ndarray] | Sequence[Any]


def _feeds(model: Any, inputs: Feeds) -> dict[str, np.ndarray]:
    """``inputs`` by the graph's input names (a sequence is taken in the graph's order)."""
    if isinstance(inputs, Mapping):
        return {k: np.asarray(v) for k, v in inputs.items()}
    init = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in init]
    arrays = [np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t) for t in inputs]
    if len(arrays) != len(names):
        raise ValueError(f"the graph takes inputs {names}; got {len(arrays)} arrays")
    return dict(zip(names, arrays, strict=True))


def kernel_coverage(path: Path, inputs: Feeds) -> KernelCoverage:
    """The integer-kernel coverage of the ONNX file ``path`` at ``inputs`` (name -> array,
    or tensors in the graph's input order).

    Reads the graph ONNX Runtime optimises, exposes the inputs and outputs of every compute
    node, runs it once and counts each node's MACs (see module doc).
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        model = onnx.load(str(optimized_graph(Path(path), Path(tmp) / "optimized.onnx")))
    compute = [n for n in model.graph.node if n.op_type in INTEGER_OPS | FLOAT_OPS]
    names = [t for n in compute for t in (*n.input, n.output[0])]
    initializers = {i.name: tuple(i.dims) for i in model.graph.initializer}
    shape = dict(initializers)
    feeds = _feeds(model, inputs)
    shape.update(_shapes(model, feeds, [t for t in names if t not in initializers]))
    nodes = tuple(
        NodeMacs(n.name or n.output[0], n.op_type, _node_macs(n, shape), n.op_type in INTEGER_OPS)
        for n in compute
    )
    return KernelCoverage(nodes)


def check_integer_kernels(path: Path, inputs: Feeds) -> KernelCoverage:
    """:func:`kernel_coverage`, warning when less than ``MIN_INT8_MAC_SHARE`` of the MACs run
    in integer kernels: layers meant to be int8 stay float (and run slower than fp32)."""
    coverage = kernel_coverage(path, inputs)
    if coverage.quantized_share < MIN_INT8_MAC_SHARE:
        warnings.warn(
            f"{Path(path).name}: ONNX Runtime runs only {coverage.int8_mac_share:.1%} of the "
            f"MACs in integer kernels ({coverage.summary()}). Layers kept float on purpose "
            "are expected here: a `select` entry set to null, a GRU/RNN (float by default, "
            "see the quantize warning), or a MatMul of two activations (a transformer's "
            "attention scores and weighted values: float by design, docs/operators.md); any "
            "other is a layer meant to be int8 that ONNX Runtime could not fuse: please "
            "report it with the model.",
            FloatKernelWarning,
            stacklevel=2,
        )
    return coverage


def coverage_extra(coverage: KernelCoverage, limit: int = 10) -> dict[str, Any]:
    """The record fields of a coverage: the share and the largest float compute nodes."""
    extra: dict[str, Any] = {"int8_mac_share": round(coverage.int8_mac_share, 4)}
    if coverage.weight_only_share:
        extra["weight_only_mac_share"] = round(coverage.weight_only_share, 4)
    extra["float_compute"] = [
        {"node": n.name, "op": n.op_type, "macs": n.macs}
        for n in coverage.float_nodes()
        if not n.weight_only
    ][:limit]
    return extra
