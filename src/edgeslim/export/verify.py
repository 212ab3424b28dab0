"""Export a model for a task and verify the file: every output, several inputs.

The batch axis of every input comes from the task (a recurrent state may carry it on
dimension 1); the batch axis of every output is found by running the model at batch 1 and
batch 2 and seeing which dimension grows (an output that does not grow gets no dynamic
axis). Parity is checked on the example inputs and on held input batches, output by output,
so a file that matches one input but not others is caught.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.data.batching import Inputs
from edgeslim.errors import EdgeslimError
from edgeslim.task.agreement import flat_outputs


def output_batch_dims(module: nn.Module, one: Inputs, two: Inputs) -> list[int | None]:
    """Each output's batch dimension (None when it does not depend on the batch)."""
    module.eval()
    with torch.no_grad():
        a, b = flat_outputs(module(*one)), flat_outputs(module(*two))
    dims: list[int | None] = []
    for x, y in zip(a, b, strict=True):
        grown = [d for d in range(x.dim()) if x.shape[d] != y.shape[d]]
        dims.append(grown[0] if grown else None)
    return dims


def export_axes(
    names: list[str], in_dims: tuple[int, ...], out_dims: list[int | None]
) -> dict[str, Any]:
    """``input_names``, ``output_names`` and ``dynamic_axes`` for :func:`export_onnx`."""
    outs = [f"output{i}" if i else "output" for i in range(len(out_dims))]
    axes: dict[str, dict[int, str]] = {n: {d: "batch"} for n, d in zip(names, in_dims, strict=True)}
    axes.update({n: {d: "batch"} for n, d in zip(outs, out_dims, strict=True) if d is not None})
    return {"input_names": names, "output_names": outs, "dynamic_axes": axes}


def export_module(module: nn.Module, example: Inputs, path: Path, axes: dict[str, Any]) -> Path:
    """ONNX (int8 QDQ when the module holds quantized layers) of ``module``."""
    from edgeslim.export.onnx import export_onnx
    from edgeslim.export.qdq import export_qdq
    from edgeslim.quant.modules import QuantMixin

    module.eval()
    if any(isinstance(m, QuantMixin) for m in module.modules()):
        return export_qdq(copy.deepcopy(module), example, path, **axes)
    return export_onnx(module, example, path, **axes)


@dataclass(frozen=True)
class Parity:
    """Largest differences between torch and ONNX Runtime, per output, over every input."""

    max_abs_diff: list[float]
    max_rel_diff: list[float]
    inputs_checked: int

    def describe(self) -> str:
        diffs = ", ".join(f"{d:.3g}" for d in self.max_abs_diff)
        return f"max |torch - onnx| per output {diffs} over {self.inputs_checked} input batches"


def check_parity(module: nn.Module, session: Any, batches: list[Inputs]) -> Parity:
    """Run every batch through torch and ONNX Runtime; compare every output."""
    from edgeslim.runtime.ort import OrtModel

    ort = OrtModel(session)
    module.eval()
    abs_d: list[float] = []
    rel_d: list[float] = []
    for inputs in batches:
        with torch.no_grad():
            ref = flat_outputs(module(*inputs))
        got = flat_outputs(ort(*inputs))
        if len(got) != len(ref):
            raise EdgeslimError(
                f"the ONNX file returns {len(got)} outputs but the model {len(ref)}; "
                "the export is wrong. Report this with the model."
            )
        for i, (r, g) in enumerate(zip(ref, got, strict=True)):
            if tuple(r.shape) != tuple(g.shape):
                raise EdgeslimError(
                    f"output {i} of the ONNX file has shape {list(g.shape)} where the model "
                    f"gives {list(r.shape)} for inputs {[list(t.shape) for t in inputs]}"
                )
            d = float(np.abs(g.float().numpy() - r.float().numpy()).max()) if r.numel() else 0.0
            scale = float(r.float().abs().max()) if r.numel() else 0.0
            if len(abs_d) <= i:
                abs_d.append(0.0)
                rel_d.append(0.0)
            abs_d[i] = max(abs_d[i], d)
            rel_d[i] = max(rel_d[i], d / max(scale, 1e-12))
    return Parity(abs_d, rel_d, len(batches))
