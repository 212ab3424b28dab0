"""ONNX export of fake-quant models as QuantizeLinear/DequantizeLinear (QDQ) graphs.

In ``export`` mode every quantized layer expresses its rounding with torch's
``fake_quantize_per_{tensor,channel}_affine``, which the TorchScript exporter writes as a
QuantizeLinear -> DequantizeLinear pair; ONNX Runtime then fuses the pairs around Conv,
MatMul, Relu and Add into integer kernels.

Uniform weights of any width up to 8 bits export as int8: their integer codes are exact in
int8, so a 4-bit layer runs as int8 with only 15 distinct values. A symmetric grid under 7
bits is stored with its step divided by ``2^(7 - b)`` (codes times the same power of two,
at most 64 in magnitude; ``UniformQuantizer.int8_scale``), so the int32 bias grid that
``scale(x) * scale(W)`` sets is as fine as a 7-bit layer's. Activations export as uint8
(asymmetric) or int8 (symmetric); sub-8-bit activation grids are clamped to their range
before the pair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.errors import EdgeslimError
from edgeslim.export.rewrite import constants, drop_dead, set_nodes
from edgeslim.quant.base import Quantizer
from edgeslim.quant.quantizers import UniformQuantizer


def _uniform(q: Quantizer, what: str) -> UniformQuantizer:
    if not isinstance(q, UniformQuantizer):
        raise EdgeslimError(f"QDQ export needs uniform {what} quantizers; got {q.spec.quantizer!r}")
    return q


def qdq_weight(q: Quantizer, w: torch.Tensor) -> torch.Tensor:
    """Int8 per-channel (or per-tensor) QDQ carrying the layer's own grid.

    Any grid whose levels are integer codes times a scale (:meth:`Quantizer.int8_scale`:
    uniform, binary, ternary, power-of-two up to 4 bits) exports as int8, exactly; ``w``
    is on the grid already (:func:`export_mode` snaps it). A grid without one (a
    codebook's centroids) exports its snapped weights as they are, float: ONNX Runtime runs
    that layer on a float kernel (:func:`float_weight_layers` names them), as long as no
    activation around it is quantized (:func:`refuse_float_weights_between_qdq`).
    """
    int8 = q.int8_scale()
    if int8 is None:  # float levels (only without activation QDQ: :func:`export_mode`)
        return w
    # python-side constants: the exporter then writes initializers, not ops on buffers
    scale = torch.tensor(int8.detach().float().tolist())
    point = getattr(q, "zero_point", None)
    zeros = [0] * scale.numel() if point is None else [round(v) for v in point.tolist()]
    zp = torch.tensor(zeros, dtype=torch.int32)
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(w, float(scale), int(zp), -128, 127)
    if q.spec.granularity != "channel":
        raise EdgeslimError("QDQ export supports per-tensor or per-channel weights, not groups")
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)


def float_weight_layers(model: nn.Module) -> list[str]:
    """Quantized layers whose weight grid has no int8 form (:meth:`Quantizer.int8_scale`):
    the QDQ file holds their weights as float values on the grid's levels."""
    from edgeslim.quant.modules import QuantMixin

    return [n for n, m in model.named_modules() if isinstance(m, QuantMixin)
            and isinstance(m.weight_quantizer, Quantizer)
            and m.weight_quantizer.int8_scale() is None]  # fmt: skip


def refuse_float_weights_between_qdq(model: nn.Module) -> None:
    """Refuse a model whose weights have no int8 form while its activations are quantized.

    Why: ONNX Runtime quantizes a float weight read between DequantizeLinear and
    QuantizeLinear itself, per tensor to int8, when it loads the file (a 3-bit codebook
    resnet20 exported with float centroids ran as 21 ``QLinearConv``), so the file would
    compute something other than the levels torch computed with. Without activation
    quantizers the weights stay float, exactly on their levels.
    """
    from edgeslim.quant.modules import ActQuant, QuantMixin

    floats = float_weight_layers(model)
    quantized_acts = any(
        isinstance(m, ActQuant) or (isinstance(m, QuantMixin) and m.input_quant is not None)
        for m in model.modules()
    )
    if not floats or not quantized_acts:
        return
    quantizer = model.get_submodule(floats[0]).weight_quantizer
    assert isinstance(quantizer, Quantizer)
    spec = quantizer.spec
    more = f" (and {len(floats) - 1} more layers)" if len(floats) > 1 else ""
    raise EdgeslimError(
        f"{floats[0]}{more}: {spec.quantizer} {spec.bits}-bit weights have no int8 form (codes "
        "times one scale), and ONNX Runtime quantizes a float weight between quantized "
        "activations to int8 per tensor on its own, so the file would not compute what torch "
        "computes. Use a weight grid int8 holds exactly (uniform, binary, ternary, pow2 up to "
        "4 bits) or keep the activations float (a_bits: null); "
        "edgeslim.export.packed.save_packed stores these weights at their bits."
    )


def qdq_activation(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """uint8 (asymmetric) or int8 (symmetric) per-tensor QDQ of an activation."""
    q = _uniform(q, "activation")
    scale, zp = float(q.scale.detach()), round(float(q.zero_point.detach()))
    if q.spec.bits < 8:
        lo, hi = (q.qmin - zp) * scale, (q.qmax - zp) * scale
        x = x.clamp(lo, hi)
    if q.symmetric:
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[None]:
    """Switch every quantized layer to ``export`` mode for the duration."""
    from edgeslim.quant.modules import ActQuant, QuantMixin

    refuse_float_weights_between_qdq(model)
    mods = [m for m in model.modules() if isinstance(m, (ActQuant, QuantMixin))]
    saved = [m.mode for m in mods]
    # sub-8-bit and non-uniform weights are snapped to their grid in place (restored on
    # exit), so that they stay initializers and export as int8 codes (or, without an int8
    # form, as their levels); a constant copy would be folded to float
    # (through ``_store_weight``: a transposed conv's ``_weight`` is a reordered copy)
    snapped: list[tuple[QuantMixin, torch.Tensor]] = []
    with torch.no_grad():
        for m in mods:
            q = getattr(m, "weight_quantizer", None)
            if not isinstance(m, QuantMixin) or not isinstance(q, Quantizer):
                continue
            # an 8-bit symmetric grid is its own int8 codes: QuantizeLinear rounds it alike
            if isinstance(q, UniformQuantizer) and q.spec.bits >= 8 and q.symmetric:
                continue
            w = m._weight
            snapped.append((m, w.detach().clone()))
            m._store_weight(q.quantize(w))
    for m in mods:
        m.mode = "export"
    try:
        yield
    finally:
        for m, mode in zip(mods, saved, strict=True):
            m.mode = mode
        with torch.no_grad():
            for layer, original in snapped:
                layer._store_weight(original)


def export_qdq(
    model: nn.Module, example_args: tuple[torch.Tensor, ...], path: Path, **kwargs: object
) -> Path:
    """Export a calibrated fake-quant model to a QDQ ONNX file (opset 17)."""
    from edgeslim.export.onnx import export_onnx
    from edgeslim.export.recurrent import finish_qdq

    with export_mode(model):
        out = export_onnx(model, example_args, path, **kwargs)  # type: ignore[arg-type]
    import onnx

    proto = onnx.load(str(out))
    fold_weight_quantizers(proto)
    drop_relu_before_quantize(proto)
    quantize_add_constants(proto)
    fold_scale_into_dequantize(proto)
    quantize_gemm_bias(proto)
    fold_pad_into_conv(proto)
    requantize_moved_codes(proto)
    bypass_requantize(proto)
    hardswish_on_codes(proto)
    mean_as_global_pool(proto)
    shape_of_codes(proto)
    finish_qdq(proto)
    drop_dead(proto)
    onnx.save(proto, str(out))
    return out


def fold_weight_quantizers(model: Any) -> int:
    """Store quantized weights as int8 initializers: ``Q(const) -> DQ`` becomes ``int8 -> DQ``.

    The exporter writes each weight as a float constant followed by QuantizeLinear, which
    ONNX Runtime would run at every inference. Folding it offline also shrinks the file
    4x. Returns the number of weights folded.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    consts = constants(graph)
    folded = 0
    keep = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in consts and len(node.input) == 3:
            x = consts[node.input[0]].astype(np.float32)
            scale, zp = consts.get(node.input[1]), consts.get(node.input[2])
            if scale is None or zp is None:
                keep.append(node)
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * x.ndim
            if scale.ndim == 1 and scale.size > 1:
                shape[axis] = -1
            s, z = scale.reshape(shape), zp.astype(np.int32).reshape(shape)
            info = np.iinfo(zp.dtype)
            q = np.clip(np.rint(x / s) + z, info.min, info.max).astype(zp.dtype)
            graph.initializer.append(numpy_helper.from_array(q, name=node.output[0]))
            folded += 1
            continue
        keep.append(node)
    set_nodes(graph, keep)
    drop_dead(model)  # the float weights the folded Q nodes read
    return folded


def drop_relu_before_quantize(model: Any) -> int:
    """Remove a Relu (or a ReLU6 Clip) whose every consumer is a QuantizeLinear clamping at 0.

    ``Q(relu(x)) == Q(x)`` when the zero point equals the lowest code (uint8 zero point 0):
    the quantizer already clips negatives. Without the Relu, ONNX Runtime sees the
    ``DQ -> Conv -> Q`` pattern and runs the conv as an integer kernel. Returns the count.
    """
    import numpy as np
    import onnx

    graph = model.graph
    consts = constants(graph)
    users = _readers(graph)
    outputs = {o.name for o in graph.output}

    def clamps_at_zero(q: onnx.NodeProto) -> bool:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[2] not in consts:
            return False
        zp = consts[q.input[2]]
        return bool(zp.dtype == np.uint8 and np.all(zp == 0))

    def q_max(q: onnx.NodeProto) -> float:
        scale, zp = consts[q.input[1]], consts[q.input[2]]
        return float(np.max((255 - zp.astype(np.float64)) * scale))

    def removable(node: onnx.NodeProto, consumers: list[onnx.NodeProto]) -> bool:
        if not consumers or not all(clamps_at_zero(c) for c in consumers):
            return False
        if node.op_type == "Relu":
            return True
        # Clip(0, hi) (ReLU6) is redundant when no quantizer can represent values above hi;
        # Clip(0) (clamp(min=0)) is a Relu
        lo = consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if lo is None or float(lo) != 0.0:
            return False
        return hi is None or all(q_max(c) <= float(hi) + 1e-6 for c in consumers)

    removed = 0
    keep = []
    for node in graph.node:
        out = node.output[0] if node.op_type in ("Relu", "Clip") else None
        if out is not None and out not in outputs:
            consumers = users.get(out, [])
            if removable(node, consumers):
                for c in consumers:
                    c.input[0] = node.input[0]
                removed += 1
                continue
        keep.append(node)
    set_nodes(graph, keep)
    return removed


def quantize_gemm_bias(model: Any) -> int:
    """Store a quantized ``Gemm``'s float bias as int32 behind a DequantizeLinear.

    ONNX Runtime fuses ``DQ(x), DQ(W), DQ(int32 bias) -> Gemm`` into one integer ``QGemm``
    (with a float output when no quantizer follows, as for a classifier's logits); with a
    float bias it keeps the Gemm in float and dequantizes the int8 weight at every run
    (mobilenetv2-imagenet: 1.28M MACs of float GEMV over 5 MB of weights at batch 1). The
    bias scale is ``scale(x) * scale(W)`` (per output channel), zero point 0, as the
    integer kernel accumulates. Returns the count.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = constants(graph)
    producer = _producers(graph)
    added: list[Any] = []
    used: set[str] = set()
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in consts:
            continue
        a, b = producer.get(node.input[0]), producer.get(node.input[1])
        if (
            a is None
            or b is None
            or any(p.op_type != "DequantizeLinear" or p.input[1] not in consts for p in (a, b))
        ):
            continue
        trans_b = next((at.i for at in node.attribute if at.name == "transB"), 0)
        bias = consts[node.input[2]].astype(np.float64).reshape(-1)
        scale = (consts[a.input[1]].astype(np.float64) * consts[b.input[1]]).reshape(-1)
        if scale.size not in (1, bias.size) or (scale.size > 1 and not trans_b):
            continue  # per-channel weights along an axis the bias does not follow
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
        codes = np.rint(bias / scale)
        if np.abs(codes).max(initial=0.0) > 2**31 - 1:
            continue  # saturating int32 would change the outputs: the Gemm stays float
        q = codes.astype(np.int32)
        # one name per Gemm: a layer called twice (a Siamese backbone) reads one float bias
        # with two input scales, so two int32 biases
        name = node.input[2] if node.input[2] not in used else f"{node.input[2]}_{len(added)}"
        used.add(node.input[2])
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{name}_int32"),
            numpy_helper.from_array(scale, f"{name}_int32_scale"),
            numpy_helper.from_array(np.zeros(bias.shape, np.int32), f"{name}_int32_zp"),
        ])  # fmt: skip
        added.append(helper.make_node(
            "DequantizeLinear", [f"{name}_int32", f"{name}_int32_scale", f"{name}_int32_zp"],
            [f"{name}_dequantized"], axis=0,
        ))  # fmt: skip
        node.input[2] = f"{name}_dequantized"
    for n in added:
        graph.node.insert(0, n)
    return len(added)


def _producers(graph: Any) -> dict[str, Any]:
    """The node that writes each tensor, by tensor name."""
    return {o: n for n in graph.node for o in n.output}


def _readers(graph: Any) -> dict[str, list[Any]]:
    """The nodes that read each tensor, by tensor name."""
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _scalar(consts: dict[str, Any], name: str) -> float | None:
    value = consts.get(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def quantize_add_constants(model: Any) -> int:
    """Put a scalar constant added to a dequantized tensor behind its own DequantizeLinear.

    ``Add(DQ(x), 3.0) -> Q`` (the integer hardsigmoid's ``x + 3``) runs in float; with the
    constant as ``DQ(uint8 255, scale 3/255)`` ONNX Runtime fuses the three into one
    ``QLinearAdd``. A positive ``c`` is code 255 at scale ``c/255``, a negative one code 0
    at zero point 255: exact up to float32 rounding. Returns the count.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = constants(graph)
    producer = _producers(graph)
    users = _readers(graph)
    added = []
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        readers = users.get(node.output[0], [])
        if not readers or any(r.op_type != "QuantizeLinear" for r in readers):
            continue
        for i in (0, 1):
            c, other = _scalar(consts, node.input[i]), producer.get(node.input[1 - i])
            if c is None or c == 0.0 or other is None or other.op_type != "DequantizeLinear":
                continue
            name = f"{node.name or node.output[0]}_const"
            code, zp = (255, 0) if c > 0 else (0, 255)
            graph.initializer.extend([
                numpy_helper.from_array(np.array(code, np.uint8), f"{name}_q"),
                numpy_helper.from_array(np.array(abs(c) / 255, np.float32), f"{name}_scale"),
                numpy_helper.from_array(np.array(zp, np.uint8), f"{name}_zp"),
            ])  # fmt: skip
            added.append(helper.make_node(
                "DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [name]
            ))  # fmt: skip
            node.input[i] = name
            break
    for n in added:
        graph.node.insert(0, n)
    return len(added)


def fold_scale_into_dequantize(model: Any) -> int:
    """``DQ(q, s) * c`` (or ``/ c``) becomes ``DQ(q, s * c)`` for a positive scalar ``c``.

    The integer hardsigmoid's ``/ 6``: folded, its gate is a plain quantized tensor that
    ``QLinearMul`` (the squeeze-excite product, hardswish's ``x * gate``) reads directly.
    Only a per-tensor DQ whose one reader is the Mul/Div is folded; it gets a scale of its
    own (the exporter shares a scale constant between a Q and its DQ). Returns the count.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    consts = constants(graph)
    producer = _producers(graph)
    users = _readers(graph)
    outputs = {o.name for o in graph.output}
    drop = set()
    for node in graph.node:
        if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
            continue
        sides = (0, 1) if node.op_type == "Mul" else (0,)
        for i in sides:
            dq, c = producer.get(node.input[i]), _scalar(consts, node.input[1 - i])
            if dq is None or dq.op_type != "DequantizeLinear" or c is None or c <= 0.0:
                continue
            scale = _scalar(consts, dq.input[1])
            if scale is None or len(users[dq.output[0]]) != 1 or node.output[0] in outputs:
                continue
            factor = c if node.op_type == "Mul" else 1.0 / c
            name = f"{dq.output[0]}_scaled"
            graph.initializer.append(
                numpy_helper.from_array(np.array(scale * factor, np.float32), name)
            )
            dq.input[1] = name
            for reader in users.get(node.output[0], []):
                for j, inp in enumerate(reader.input):
                    if inp == node.output[0]:
                        reader.input[j] = dq.output[0]
            drop.add(id(node))
            break
    keep = [n for n in graph.node if id(n) not in drop]
    set_nodes(graph, keep)
    return len(drop)


def _same_grid(consts: dict[str, Any], a: Any, b: Any) -> bool:
    """Whether two Q/DQ nodes have the same constant scale and zero point (and type)."""
    import numpy as np

    for i in (1, 2):
        x = consts.get(a.input[i]) if len(a.input) > i else None
        y = consts.get(b.input[i]) if len(b.input) > i else None
        if x is None or y is None or x.dtype != y.dtype or not np.array_equal(x, y):
            return False
    return True


def bypass_requantize(model: Any) -> int:
    """``Q(DQ(codes))`` on the same grid is ``codes``: its readers read ``codes`` directly.

    The exporter writes such pairs where one quantizer covers an edge and the value-moving
    op after it (a folded BatchNorm's Identity). ONNX Runtime removes a pair itself only
    when DequantizeLinear nodes alone read it; a ``Clip`` on the codes
    (:func:`hardswish_on_codes`) would keep it as two float passes. Returns the count."""
    graph = model.graph
    consts = constants(graph)
    producer = _producers(graph)
    users = _readers(graph)
    outputs = {o.name for o in graph.output}
    count = 0
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if dq is None or dq.op_type != "DequantizeLinear" or node.output[0] in outputs:
            continue
        if not _same_grid(consts, node, dq):
            continue
        for reader in users.get(node.output[0], []):
            for j, name in enumerate(reader.input):
                if name == node.output[0]:
                    reader.input[j] = dq.input[0]
        count += 1
    drop_dead(model)
    return count


def _uint8_grid(consts: dict[str, Any], dq: Any) -> tuple[float, int] | None:
    """``(scale, zero point)`` of a per-tensor uint8 DequantizeLinear with constants."""
    import numpy as np

    if dq.op_type != "DequantizeLinear" or len(dq.input) != 3:
        return None
    scale, zp = _scalar(consts, dq.input[1]), consts.get(dq.input[2])
    if scale is None or zp is None or zp.dtype != np.uint8 or zp.size != 1:
        return None
    return scale, int(zp.reshape(-1)[0])


def hardswish_on_codes(model: Any) -> int:
    """``HardSwish(DQ(codes))`` whose grid has ``-3`` on a code (uint8 zero point ``k``,
    scale ``3 / k``; see :func:`~edgeslim.quant.integer_gates.align_to_shift`) becomes
    ``Mul(DQ(codes), DQ(Clip(codes, max=2k), scale / 6))``.

    ``x + 3`` is the codes read at zero point 0 (never below it: code 0 is -3), ``relu6``'s
    top the clip at ``6 / scale = 2k``: the gate is exact, and ONNX Runtime runs an
    integer ``Clip`` and one ``QLinearMul`` where the fixed-grid gate needs a ``QLinearAdd``
    and a ``QLinearMul``. Measured on the zoo's MobileNetV3-small (W8A8, batch 1, 2
    threads, one process, median of 5 interleaved rounds, graphs edited by hand): ``Clip``
    with its upper bound alone 1.248x over fp32, with both bounds 1.235x, ``Min`` 1.210x.
    Other grids keep ``HardSwish`` (a float pass, still correct). Returns the count."""
    import math

    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = constants(graph)
    producer = _producers(graph)
    nodes = []
    count = 0
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "HardSwish" else None
        grid = _uint8_grid(consts, dq) if dq is not None else None
        if grid is None or not math.isclose(grid[1] * grid[0], 3.0, rel_tol=1e-5):
            nodes.append(node)
            continue
        assert dq is not None
        scale, k = grid
        base = node.name or node.output[0]
        graph.initializer.extend([
            numpy_helper.from_array(np.array(0, np.uint8), f"{base}_zero"),
            numpy_helper.from_array(np.array(min(2 * k, 255), np.uint8), f"{base}_top"),
            numpy_helper.from_array(np.array(scale / 6.0, np.float32), f"{base}_gate_scale"),
        ])  # fmt: skip
        codes = dq.input[0]
        if 2 * k < 255:  # code 0 is -3 already: only relu6's top needs a clip
            nodes.append(helper.make_node(
                "Clip", [codes, "", f"{base}_top"], [f"{base}_codes"], name=f"{base}_clip"
            ))  # fmt: skip
            codes = f"{base}_codes"
        nodes += [
            helper.make_node(
                "DequantizeLinear", [codes, f"{base}_gate_scale", f"{base}_zero"],
                [f"{base}_gate"], name=f"{base}_gate",
            ),
            helper.make_node(
                "Mul", [node.input[0], f"{base}_gate"], [node.output[0]], name=f"{base}_mul"
            ),
        ]  # fmt: skip
        count += 1
    if count:
        set_nodes(graph, nodes)
    return count


def _ranks(model: Any) -> dict[str, int]:
    """The rank of every tensor ONNX shape inference can tell, by name."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks = {}
    for v in [*inferred.value_info, *inferred.input, *inferred.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            ranks[v.name] = len(t.shape.dim)
    return ranks


def mean_as_global_pool(model: Any) -> int:
    """``ReduceMean`` over every axis after the channels of a dequantized tensor of rank 3
    to 5 (``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, T, H, W)``) becomes
    ``GlobalAveragePool`` (then ``Squeeze`` of those axes without ``keepdims``).

    The same values; but ONNX Runtime has an integer kernel for the pool
    (``QLinearGlobalAveragePool``) and none for ``ReduceMean``, which would run in float and
    leave the ops around it (a squeeze-excite product, a residual add) in float too.
    Returns the count."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = _producers(graph)
    consts = constants(graph)
    ranks: dict[str, int] | None = None
    nodes = []
    count = 0
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "ReduceMean" else None
        if dq is None or dq.op_type != "DequantizeLinear":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1:  # opset 18: axes as an input
            axes = consts.get(node.input[1])
            axes = None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
        if ranks is None:
            ranks = _ranks(model)
        rank = ranks.get(node.input[0])
        if axes is None or rank is None or not 3 <= rank <= 5:
            nodes.append(node)
            continue
        spatial = list(range(2, rank))
        if sorted({int(a) % rank for a in axes}) != spatial:
            nodes.append(node)
            continue
        base = node.name or node.output[0]
        if attrs.get("keepdims", 1):
            nodes.append(helper.make_node(
                "GlobalAveragePool", [node.input[0]], [node.output[0]], name=f"{base}_pool"
            ))  # fmt: skip
        else:
            graph.initializer.append(
                numpy_helper.from_array(np.array(spatial, np.int64), f"{base}_axes")
            )
            nodes += [
                helper.make_node(
                    "GlobalAveragePool", [node.input[0]], [f"{base}_pooled"], name=f"{base}_pool"
                ),
                helper.make_node(
                    "Squeeze", [f"{base}_pooled", f"{base}_axes"], [node.output[0]],
                    name=f"{base}_squeeze",
                ),
            ]  # fmt: skip
        count += 1
    if count:
        set_nodes(graph, nodes)
    return count


def shape_of_codes(model: Any) -> int:
    """``Shape(DQ(codes))`` reads ``Shape(codes)``: the same shape, without dequantizing a
    tensor only to measure it (a channel shuffle's ``view`` sizes, a chunk's split point).
    Returns the count; the DequantizeLinear nodes left unread go with :func:`drop_dead`."""
    producer = _producers(graph := model.graph)
    count = 0
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type in ("Shape", "Size") else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            node.input[0] = dq.input[0]
            count += 1
    return count


def _evaluate(model: Any, name: str, consts: dict[str, Any], producer: dict[str, Any]) -> Any:
    """The value of tensor ``name`` when only constants feed it (the subgraph the exporter
    writes to compute ``F.pad``'s pads), else None."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    if name in consts:
        return consts[name]
    needed: set[int] = set()
    stack, leaves = [name], set()
    while stack:
        t = stack.pop()
        if t in consts or not t:
            leaves.add(t)
            continue
        node = producer.get(t)
        if node is None:
            return None  # a graph input: not constant
        if id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    order = [n for n in model.graph.node if id(n) in needed]
    graph = helper.make_graph(
        order, "pads", [], [helper.make_tensor_value_info(name, 0, None)],
        [numpy_helper.from_array(consts[t], t) for t in leaves if t],
    )  # fmt: skip
    sub = helper.make_model(graph, opset_imports=model.opset_import)
    try:
        result: Any = ReferenceEvaluator(sub).run(None, {})
    except Exception:  # an op the reference runtime lacks: leave the Pad alone
        return None
    return result[0]


# ops that only move or copy values: their output is on their inputs' grid
_MOVES_CODES = ("Slice", "Concat", "Pad")


def _moved_from(name: str, producer: dict[str, Any], depth: int = 0) -> list[Any] | None:
    """The per-tensor ``DequantizeLinear`` nodes whose values ``name`` only moves (through
    :data:`_MOVES_CODES`; a ``Pad`` in reflect or edge mode), or None when anything else
    computes it."""
    from onnx import helper

    node = producer.get(name)
    if node is None or depth > 16:
        return None
    if node.op_type == "DequantizeLinear":
        per_tensor = len(node.input) >= 3 and not any(a.name == "axis" for a in node.attribute)
        return [node] if per_tensor else None
    if node.op_type not in _MOVES_CODES:
        return None
    if node.op_type == "Pad":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("mode", b"constant") not in (b"reflect", b"edge"):
            return None
    data = node.input if node.op_type == "Concat" else node.input[:1]
    found: list[Any] = []
    for d in data:
        leaves = _moved_from(d, producer, depth + 1)
        if leaves is None:
            return None
        found.extend(leaves)
    return found


def requantize_moved_codes(model: Any) -> int:
    """A conv whose input only moves dequantized values of one grid (a reflect or edge
    ``Pad``; circular padding, which exports as ``Slice`` + ``Concat``) gets a ``Q -> DQ``
    on that grid before it, so ONNX Runtime moves codes and runs the conv as
    ``QLinearConv``. The float ``Pad``/``Concat`` left the conv without a dequantized
    input, in float (an ESPCN-style super-resolution net: 20% of its MACs on integers; a
    circular-padded conv: 68%). Exact: those ops copy values already on that grid.
    Returns the count."""
    from onnx import helper

    graph = model.graph
    users = _readers(graph)
    producer = _producers(graph)
    outputs = {o.name for o in graph.output}
    added: list[tuple[Any, list[Any]]] = []
    for node in graph.node:
        if node.op_type not in _MOVES_CODES or node.output[0] in outputs:
            continue
        readers = users.get(node.output[0], [])
        if not readers or any(r.op_type != "Conv" for r in readers):
            continue
        dqs = _moved_from(node.output[0], producer)
        if not dqs or len({(d.input[1], d.input[2]) for d in dqs}) != 1:
            continue  # not codes of one grid
        coded, back = f"{node.output[0]}_codes", f"{node.output[0]}_dequantized"
        grid = [dqs[0].input[1], dqs[0].input[2]]
        q_node = helper.make_node("QuantizeLinear", [node.output[0], *grid], [coded],
                                  name=f"{node.name}_requantize")  # fmt: skip
        dq_node = helper.make_node("DequantizeLinear", [coded, *grid], [back],
                                   name=f"{node.name}_dequantize")  # fmt: skip
        for r in readers:
            r.input[0] = back
        added.append((node, [q_node, dq_node]))
    if added:
        after = {id(n): extra for n, extra in added}
        nodes = []
        for n in graph.node:
            nodes.append(n)
            nodes.extend(after.get(id(n), []))
        set_nodes(graph, nodes)
    return len(added)


def fold_pad_into_conv(model: Any) -> int:
    """A zero ``Pad`` of the spatial axes before a ``Conv`` (through its quantizer) becomes the
    conv's own padding: ``Conv(DQ(Q(Pad(x))))`` is ``Conv_padded(DQ(Q(x)))``, since 0 is a code
    of every grid. "Same" padding written with ``F.pad``/``nn.ZeroPad2d`` (EfficientNet
    ports) otherwise runs as a float ``Pad`` between integer kernels: ONNX Runtime has no
    integer rule for it. Returns the count."""
    import numpy as np
    from onnx import helper

    graph = model.graph
    consts = constants(graph)
    users = _readers(graph)
    producer = _producers(graph)
    outputs = {o.name for o in graph.output}
    drop = set()
    for node in graph.node:
        if node.op_type != "Pad" or node.output[0] in outputs:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("mode", b"constant")
        has_value = len(node.input) > 2 and bool(node.input[2])
        value = consts.get(node.input[2]) if has_value else np.zeros(())
        if mode not in (b"constant", "constant") or value is None or np.any(value != 0):
            continue  # another mode, a value computed at run time, or not zero
        q = users.get(node.output[0], [])
        if len(q) != 1 or q[0].op_type != "QuantizeLinear":
            continue
        dq = users.get(q[0].output[0], [])
        conv = [u for d in dq for u in users.get(d.output[0], [])] if dq else []
        if not dq or any(d.op_type != "DequantizeLinear" for d in dq) or not conv:
            continue
        if any(c.op_type != "Conv" or c.input[0] != dq[0].output[0] for c in conv):
            continue
        pads = _evaluate(model, node.input[1], consts, producer) if len(node.input) > 1 else None
        if pads is None or np.asarray(pads).size != 8:
            continue
        p = [int(v) for v in np.asarray(pads).reshape(-1)]
        if any(p[i] for i in (0, 1, 4, 5)) or min(p) < 0:
            continue  # batch/channel padding, or cropping
        auto = [a.s for c in conv for a in c.attribute if a.name == "auto_pad"]
        if any(a not in (b"", b"NOTSET") for a in auto):
            continue  # SAME_UPPER/VALID: the conv's pads are not its own to add to
        for c in conv:
            old = next((a for a in c.attribute if a.name == "pads"), None)
            base = list(old.ints) if old is not None else [0, 0, 0, 0]
            new = [base[0] + p[2], base[1] + p[3], base[2] + p[6], base[3] + p[7]]
            if old is not None:
                c.attribute.remove(old)
            c.attribute.append(helper.make_attribute("pads", new))
        q[0].input[0] = node.input[0]
        drop.add(id(node))
    if drop:  # the pads' subgraph, now unread, goes with drop_dead at the end of the export
        set_nodes(graph, [n for n in graph.node if id(n) not in drop])
    return len(drop)
