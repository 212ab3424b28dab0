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
"""

from __future__ import annotations

import warnings
from typing import Any

from edgeslim.errors import EdgeslimError


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
        del graph.node[:]
        graph.node.extend(keep_nodes)
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


def finish_qdq(model: Any) -> None:
    """The post-passes of this module, run by ``export_qdq`` after its own."""
    dedupe_shared_definitions(model)
    warn_float_fallbacks(model)
