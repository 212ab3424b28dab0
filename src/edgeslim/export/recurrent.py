"""ONNX post-pass for the layers added with the recurrent twins (see :func:`finish_qdq`).

Shared constants: an unrolled
:class:`~edgeslim.quant.recurrent.QuantRNN` runs the same ``hh`` Gemm once per
time step, all steps reading one int8 weight and one bias. Passes that rewrite a Gemm's bias
(``quantize_gemm_bias``) then add the same int32 initializer and ``DequantizeLinear`` once per
Gemm, and ONNX refuses a graph that defines a name twice. This pass keeps the first of
identical definitions; different definitions under one name are an error, never merged.

Float fallbacks: ONNX Runtime (1.32, CPU) fuses no ``DQ -> ConvTranspose -> Q`` into an
integer kernel (checked per tensor and per channel, int8 weights, uint8 activations), so a
quantized ConvTranspose runs in float on dequantized weights; the export says so.

LSTM (:func:`quantize_lstm`): in export mode a
:class:`~edgeslim.quant.recurrent.QuantRNN` LSTM runs torch's own LSTM on its dequantized
weights, so the exporter writes one ONNX ``LSTM`` node per layer, and registers each gate
matrix's int8 grid here, keyed by the float tensor the node will hold (ONNX layout: gates
``i, o, f, c``, ``[num_directions, 4*hidden, in]``). This pass replaces every ``LSTM``
whose ``W`` and ``R`` match a registered grid by ONNX Runtime's
``com.microsoft.DynamicQuantizeLSTM``: int8 ``W``/``R`` transposed to
``[num_directions, in, 4*hidden]``, ``W_scale``/``R_scale`` and zero points
``[num_directions, 4*hidden]`` (per output channel) or ``[num_directions]`` (per tensor).
One fused kernel per layer, integer matmuls, and the sequence length stays dynamic. The
kernel quantizes ``x`` and ``h`` per call (uint8, its own range each time), where the torch
simulation uses the calibrated static ranges: the two differ slightly. An ``LSTM`` that
matches nothing (a float layer kept by ``select``) stays float.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np

from edgeslim.errors import EdgeslimError
from edgeslim.export.rewrite import constants, drop_dead, set_nodes

MS_DOMAIN = "com.microsoft"
# gate rows of torch (i, f, g, o) taken in ONNX's order (i, o, f, c)
_ONNX_GATES = (0, 3, 1, 2)
# grids registered by QuantRNN exports, consumed by quantize_lstm (bounded: an export-mode
# forward outside export_qdq leaves entries that nothing consumes)
_LSTM_GRIDS: OrderedDict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
_MAX_GRIDS = 256


def dedupe_shared_definitions(model: Any) -> int:
    """Drop repeated identical initializers and nodes (same outputs) of ``model``'s graph.

    Returns the number removed. Raises :class:`EdgeslimError` when one name has two
    different definitions (a real conflict that deduplication must not hide).
    """
    graph = model.graph
    removed = 0
    seen_init: dict[str, bytes] = {}
    keep_init = []
    for init in graph.initializer:
        data = init.SerializeToString()
        if init.name in seen_init:
            if seen_init[init.name] != data:
                raise EdgeslimError(f"ONNX export: two different initializers named {init.name}")
            removed += 1
            continue
        seen_init[init.name] = data
        keep_init.append(init)
    seen_node: dict[tuple[str, ...], bytes] = {}
    keep_nodes = []
    for node in graph.node:
        key = tuple(node.output)
        data = node.SerializeToString()
        if key in seen_node:
            if seen_node[key] != data:
                raise EdgeslimError(f"ONNX export: two different nodes define {list(key)}")
            removed += 1
            continue
        seen_node[key] = data
        keep_nodes.append(node)
    if removed:
        del graph.initializer[:]
        graph.initializer.extend(keep_init)
        set_nodes(graph, keep_nodes)
    return removed


def warn_float_fallbacks(model: Any) -> list[str]:
    """Warn about quantized ops ONNX Runtime runs in float (ConvTranspose); returns their names."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names = [
        n.name or n.output[0]
        for n in model.graph.node
        if n.op_type == "ConvTranspose"
        and any(getattr(producer.get(i), "op_type", "") == "DequantizeLinear" for i in n.input)
    ]
    if names:
        warnings.warn(
            f"QDQ export: {len(names)} quantized ConvTranspose ({', '.join(names[:5])}) keep "
            "int8 weights in the file, but ONNX Runtime has no integer ConvTranspose kernel for "
            "QDQ graphs: they run in float on dequantized weights (no speed-up). Keep them float "
            "with select: {<fqn>: null} to avoid the dequantization at every run.",
            stacklevel=3,
        )
    return names


def _key(w: np.ndarray) -> str:
    w = np.ascontiguousarray(w, dtype=np.float32)
    return hashlib.sha1(repr(w.shape).encode() + w.tobytes()).hexdigest()


def _onnx_rows(a: np.ndarray, hidden: int) -> np.ndarray:
    """Rows of a gate matrix (or vector) in torch's order i, f, g, o -> ONNX's i, o, f, c."""
    return np.concatenate([a[g * hidden : (g + 1) * hidden] for g in _ONNX_GATES])


def register_lstm_grid(directions: list[tuple[Any, Any, Any]], hidden: int) -> None:
    """Record the int8 grid of one LSTM layer's ``W`` (or ``R``): per direction the torch
    codes ``(4*hidden, in)`` int8, scale and zero point per row. The key is the float tensor
    the exported ``LSTM`` node holds, ``(codes - zp) * scale`` in ONNX layout."""
    codes, scales, zps = [], [], []
    floats = []
    for k, scale, zp in directions:
        k, scale, zp = (_onnx_rows(np.asarray(a), hidden) for a in (k, scale, zp))
        floats.append(((k.astype(np.float32) - zp[:, None]) * scale[:, None]).astype(np.float32))
        codes.append(k.T)  # DynamicQuantizeLSTM: [in, 4*hidden]
        scales.append(scale)
        zps.append(zp)
    key = _key(np.stack(floats))
    _LSTM_GRIDS[key] = (
        np.ascontiguousarray(np.stack(codes), dtype=np.int8),
        np.stack(scales).astype(np.float32),
        np.stack(zps).astype(np.int8),
    )
    _LSTM_GRIDS.move_to_end(key)
    while len(_LSTM_GRIDS) > _MAX_GRIDS:
        _LSTM_GRIDS.popitem(last=False)


def _per_tensor(scale: np.ndarray, zp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[dirs, 4H]`` -> ``[dirs]`` when every row of a direction has one scale and zero point
    (a per-tensor grid), the shape ONNX Runtime's per-tensor path takes."""
    if np.all(scale == scale[:, :1]) and np.all(zp == zp[:, :1]):
        return scale[:, 0].copy(), zp[:, 0].copy()
    return scale, zp


def quantize_lstm(model: Any) -> int:
    """Replace each ONNX ``LSTM`` whose weights match a registered int8 grid by
    ``com.microsoft.DynamicQuantizeLSTM`` (see module doc). Returns the count."""
    from onnx import helper, numpy_helper

    graph = model.graph
    lstms = [n for n in graph.node if n.op_type == "LSTM"]
    if not lstms:
        return 0
    consts = constants(graph)
    names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    replaced = 0
    for node in lstms:
        if len(node.input) < 3 or any(a.name == "layout" and a.i for a in node.attribute):
            continue
        if len(node.input) > 7 and node.input[7]:
            continue  # peepholes: torch never writes them
        w, r = consts.get(node.input[1]), consts.get(node.input[2])
        if w is None or r is None:
            continue
        gw, gr = _LSTM_GRIDS.get(_key(w)), _LSTM_GRIDS.get(_key(r))
        if gw is None or gr is None:
            continue
        base = (node.name or node.output[0]).strip("/").replace("/", "_") or "lstm"
        while f"{base}_W_int8" in names:
            base += "_"
        inits = {}
        for part, (codes, scale, zp) in (("W", gw), ("R", gr)):
            scale, zp = _per_tensor(scale, zp)
            inits[part] = numpy_helper.from_array(codes, f"{base}_{part}_int8")
            inits[f"{part}_scale"] = numpy_helper.from_array(scale, f"{base}_{part}_scale")
            inits[f"{part}_zero_point"] = numpy_helper.from_array(zp, f"{base}_{part}_zero_point")
        graph.initializer.extend(inits.values())
        names.update(i.name for i in inits.values())
        optional = [node.input[i] if len(node.input) > i else "" for i in range(3, 8)]
        attrs = {
            a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "layout"
        }
        new = helper.make_node(
            "DynamicQuantizeLSTM",
            [node.input[0], inits["W"].name, inits["R"].name, *optional,
             *(inits[k].name for k in ("W_scale", "W_zero_point", "R_scale", "R_zero_point"))],
            list(node.output),
            name=(node.name + "_quant") if node.name else "",
            domain=MS_DOMAIN,
            **attrs,
        )  # fmt: skip
        node.CopyFrom(new)
        replaced += 1
    if replaced:
        drop_dead(model)  # the float W and R
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return replaced


def finish_qdq(model: Any) -> None:
    """The post-passes of this module, run by ``export_qdq`` after its own."""
    dedupe_shared_definitions(model)
    quantize_lstm(model)
    _LSTM_GRIDS.clear()
    warn_float_fallbacks(model)
