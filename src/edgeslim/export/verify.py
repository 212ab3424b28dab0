"""Export a model for a task and verify the file: every output, several inputs.

The batch axis of every input comes from the task (a recurrent state may carry it on
dimension 1); the batch axis of every output is found by running the model at batch 1 and
batch 2 and seeing which dimension grows (an output that does not grow gets no dynamic
axis). Parity is checked output by output on inputs from several sources (:func:`parity_inputs`:
the example inputs, calibration and validation batches of the task, and perturbed copies of
them), so a file that matches the inputs it was traced on but not others is caught: a
tracing exporter bakes in the branch of data-dependent control flow that the example took.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edgeslim.data.batching import Inputs, output_labels
from edgeslim.errors import EdgeslimError, TaskError, first_line
from edgeslim.export.conditioning import FLOAT_NOISE, Float64Reference, SetAside, judge_rows
from edgeslim.task.agreement import flat_outputs

if TYPE_CHECKING:
    from edgeslim.task import Task


def output_batch_dims(
    module: nn.Module, one: Inputs, two: Inputs
) -> tuple[list[int | None], list[str]]:
    """Each output's batch dimension (None when it does not depend on the batch), and its
    name in the file (:func:`~edgeslim.data.batching.output_labels`)."""
    module.eval()
    with torch.no_grad():
        first = module(*one)
        a, b = flat_outputs(first), flat_outputs(module(*two))
    dims: list[int | None] = []
    for x, y in zip(a, b, strict=True):
        grown = [d for d in range(x.dim()) if x.shape[d] != y.shape[d]]
        dims.append(grown[0] if grown else None)
    return dims, output_labels(first)


def export_axes(
    names: list[str],
    in_dims: tuple[int, ...],
    out_dims: list[int | None],
    out_names: list[str] | None = None,
) -> dict[str, Any]:
    """``input_names``, ``output_names`` and ``dynamic_axes`` for :func:`export_onnx`."""
    outs = [f"output{i}" if i else "output" for i in range(len(out_dims))]
    if out_names and len(out_names) == len(outs) and not set(out_names) & set(names):
        outs = out_names  # a dict's keys, unless one is an input's name
    axes: dict[str, dict[int, str]] = {n: {d: "batch"} for n, d in zip(names, in_dims, strict=True)}
    axes.update({n: {d: "batch"} for n, d in zip(outs, out_dims, strict=True) if d is not None})
    return {"input_names": names, "output_names": outs, "dynamic_axes": axes}


def _mark_differing(dyn: dict[str, dict[int, str]], names: Any, xs: Any, ys: Any) -> None:
    """Make dynamic every dimension of each named tensor whose size differs between the
    ``xs`` and ``ys`` runs (and is not dynamic already)."""
    for name, a, b in zip(names, xs, ys, strict=False):
        for d in range(min(a.dim(), b.dim())):
            if a.shape[d] != b.shape[d] and d not in dyn.get(name, {}):
                dyn.setdefault(name, {})[d] = f"{name}_{d}"


def widen_axes(
    axes: dict[str, Any], module: nn.Module, example: Inputs, other: Inputs
) -> dict[str, Any]:
    """``axes`` with every other dimension that differs between ``example`` and ``other``
    (a sequence length: MiniLM is timed on 128 tokens but traced on its example's 25) made
    dynamic too, on the inputs and on the outputs that follow it; otherwise ONNX Runtime
    refuses the file on any input shaped unlike the example."""
    dyn = {k: dict(v) for k, v in axes["dynamic_axes"].items()}
    _mark_differing(dyn, axes["input_names"], example, other)
    if dyn == axes["dynamic_axes"]:
        return axes
    module.eval()
    with torch.no_grad():
        ya, yb = flat_outputs(module(*example)), flat_outputs(module(*other))
    _mark_differing(dyn, axes["output_names"], ya, yb)
    return {**axes, "dynamic_axes": dyn}


def task_axes(task: Task, module: nn.Module) -> dict[str, Any]:
    """The export axes of ``module`` on ``task``: every input's and output's batch
    dimension, the dimensions the latency inputs change (:func:`widen_axes`), and the
    task's :attr:`~edgeslim.Task.dynamic_dims` with the output dimensions that follow them."""
    dims, labels = output_batch_dims(module, task.inputs_at(1), task.inputs_at(2))
    example = task.example_inputs
    axes = widen_axes(export_axes(task.names, task.dims, dims, labels), module, example,
                      task.latency_feeds())  # fmt: skip
    resized = task.resized(example)
    if resized is None:
        return axes
    try:
        return widen_axes(axes, module, example, resized)
    except Exception as exc:  # it ran on the example: the size is what differs
        sizes = [list(t.shape) for t in resized]
        raise TaskError(
            f"the model does not run on its inputs doubled along the dynamic dimensions "
            f"{[list(d) for d in task.dynamic_dims or ()]} ({sizes}): {first_line(exc)}. "
            "Its code fixes those sizes (e.g. a flatten into a Linear), or another input must "
            "have the same size (give its dimension in --dynamic-dims too); leave them out of "
            "--dynamic-dims (Task.dynamic_dims), or make the model size-independent (a global "
            "pool, AdaptiveAvgPool2d(1), before the flatten)"
        ) from None


def check_resized(task: Task, module: nn.Module, reference: nn.Module) -> None:
    """With :attr:`~edgeslim.Task.dynamic_dims`: ``module`` (the model to export) must give
    ``reference``'s (the uncompressed model's) output shapes on the example doubled along
    them. A traced copy whose graph resolved a size read from the input (``int(x.shape[2])``)
    keeps the example's size; its file would too, and match that copy on every check."""
    resized = task.resized(task.example_inputs)
    if resized is None or module is reference:
        return
    with torch.no_grad():
        want = [list(t.shape) for t in flat_outputs(reference.eval()(*resized))]
        try:
            got: list[Any] = [list(t.shape) for t in flat_outputs(module.eval()(*resized))]
        except Exception as exc:  # the model runs there: the traced copy is what differs
            got = [first_line(exc)]
    if got != want:
        raise TaskError(
            f"on inputs doubled along the dynamic dimensions ({[list(t.shape) for t in resized]}) "
            f"the compressed model gives outputs {got} where the model gives {want}: its traced "
            "graph fixed a size the model reads from its input (e.g. `int(x.shape[2])`), so its "
            "file would too. Leave those dimensions out of --dynamic-dims, or read the size "
            "as a tensor shape (`x.shape[2:]`, without int())"
        )


def export_module(module: nn.Module, example: Inputs, path: Path, axes: dict[str, Any]) -> Path:
    """ONNX (int8 QDQ when the module holds quantized layers) of ``module``."""
    from edgeslim.export.onnx import export_onnx
    from edgeslim.export.qdq import export_qdq
    from edgeslim.quant.modules import QuantMixin

    module.eval()
    if any(isinstance(m, QuantMixin) for m in module.modules()):
        return export_qdq(copy.deepcopy(module), example, path, **axes)
    return export_onnx(module, example, path, **axes)


def perturbed(inputs: Inputs, seed: int, noise: float = 0.1, scale: float = 1.0) -> Inputs:
    """``inputs`` scaled by ``scale`` plus Gaussian noise of ``noise`` times each float
    tensor's standard deviation (integer inputs, e.g. token ids, are kept as they are):
    inputs the model was not traced on, that still look like its data."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        if not t.is_floating_point():
            out.append(t)
            continue
        std = float(t.float().std()) if t.numel() > 1 else 1.0
        jitter = torch.randn(t.shape, generator=gen, dtype=t.dtype) * noise * max(std, 1e-3)
        out.append(t * scale + jitter)
    return tuple(out)


def parity_inputs(
    example: Inputs, calibration: list[Inputs], validation: list[Inputs], per_source: int = 2
) -> list[tuple[str, Inputs]]:
    """Named input batches to check an export on: the example inputs, ``per_source``
    calibration and validation batches, and perturbed copies (noise, then scaled by 0.5 and
    1.5 with noise) of the first held batch."""
    sources: list[tuple[str, Inputs]] = [("example inputs", example)]
    sources += [(f"calibration batch {i}", b) for i, b in enumerate(calibration[:per_source])]
    sources += [(f"validation batch {i}", b) for i, b in enumerate(validation[:per_source])]
    held = (validation or calibration or [example])[0]
    for k, (noise, scale) in enumerate(((0.1, 1.0), (0.1, 0.5), (0.1, 1.5))):
        label = f"perturbed input (x{scale:g} + {noise:g} sd noise)"
        sources.append((label, perturbed(held, k, noise, scale)))
    return sources


@dataclass(frozen=True)
class Parity:
    """Largest differences between torch and ONNX Runtime, per output, over every input;
    ``worst`` names the input source of each output's largest relative difference.
    ``set_aside``: rows of a float model where torch's float32 result is itself far from
    float64, judged against that instead (:mod:`edgeslim.export.conditioning`)."""

    max_abs_diff: list[float]
    max_rel_diff: list[float]
    inputs_checked: int
    worst: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    set_aside: list[SetAside] = field(default_factory=list)

    def describe(self) -> str:
        diffs = ", ".join(f"{d:.3g}" for d in self.max_abs_diff)
        text = f"max |torch - onnx| per output {diffs} over {self.inputs_checked} input batches"
        if self.worst:
            text += f" (largest on: {', '.join(dict.fromkeys(self.worst))})"
        if self.set_aside:
            text += "; held to torch's own float32 precision: " + "; ".join(
                a.describe() for a in self.set_aside
            )
        return text

    def failures(self, tolerance: float) -> list[str]:
        """One phrase per output whose relative difference exceeds ``tolerance``."""
        worst = self.worst or ["an input"] * len(self.max_abs_diff)
        rows = zip(self.max_abs_diff, self.max_rel_diff, worst, strict=True)
        return [
            f"output {i} differs by {a:.3g} ({r:.2%} of its scale) on {w}"
            for i, (a, r, w) in enumerate(rows)
            if r > tolerance
        ]


def _unrunnable(session: Any, source: str, inputs: Inputs, exc: Exception) -> EdgeslimError:
    """ONNX Runtime failed on inputs the model runs: a size traced into the file as a
    constant. ``--dynamic-dims`` is named only when the file has free dimensions besides
    the batch (it was exported with them)."""
    shapes = [list(t.shape) for t in inputs]
    declared = [list(i.shape) for i in session.get_inputs()]
    free = any(sum(not isinstance(d, int) for d in dims) > 1 for dims in declared)
    fix = (
        "with --dynamic-dims (Task.dynamic_dims), leave that dimension out"
        if free
        else "read sizes from the input as tensors' shapes (`x.view(x.shape[0], -1)`, not "
        "`x.view(1, -1)` or `int(x.shape[0])`)"
    )
    said = first_line(exc)
    head = (
        f"ONNX Runtime cannot run the exported file on the {source} ({shapes}; the file's "
        f"inputs: {declared}), which the model runs: {said[:300]}."
    )
    if not any(word in said.lower() for word in _SIZE_WORDS):
        # e.g. "QLinearGlobalAveragePool ... parameter out of computation range": a value
        # in the file, not a size; the size advice below misled (2026-12-05)
        return EdgeslimError(
            f"{head} The file holds a value ONNX Runtime refuses for that operator (a "
            "quantizer's scale or zero point out of its range, an attribute); report this "
            "with the model."
        )
    return EdgeslimError(
        f"{head} The exporter fixed a size the inputs change (torch's exporter writes "
        f"nn.MultiheadAttention with its traced sequence length): {fix}"
    )


# words of ONNX Runtime's messages when a size in the file does not fit the inputs
_SIZE_WORDS = ("shape", "dimension", "dim ", "size", "broadcast", "reshape", "index", "rank")


def check_parity(
    module: nn.Module, session: Any, batches: list[Inputs] | list[tuple[str, Inputs]]
) -> Parity:
    """Run every batch (plain, or ``(source name, batch)``) through torch and ONNX Runtime;
    compare every output. On a float model, an output further from torch than
    :data:`~edgeslim.export.conditioning.FLOAT_NOISE` of its scale is compared with the
    model in float64 too, and the rows where torch's own float32 result is that far off are
    set aside (:func:`~edgeslim.export.conditioning.judge_rows`)."""
    from edgeslim.quant.modules import QuantMixin
    from edgeslim.runtime.ort import OrtModel

    ort = OrtModel(session)
    module.eval()
    exact = None
    if not any(isinstance(m, QuantMixin) for m in module.modules()):
        exact = Float64Reference(module)
    batch_axes = _batch_axes(session)
    set_aside: list[SetAside] = []
    abs_d: list[float] = []
    rel_d: list[float] = []
    worst: list[str] = []
    named: list[tuple[str, Inputs]] = []
    for i, b in enumerate(batches):
        if len(b) == 2 and isinstance(b[0], str):
            named.append((b[0], b[1]))  # type: ignore[arg-type]
        else:
            named.append((f"input batch {i}", b))  # type: ignore[arg-type]
    for source, inputs in named:
        with torch.no_grad():
            ref = flat_outputs(module(*inputs))
        try:
            got = flat_outputs(ort(*inputs))
        except Exception as exc:  # the file itself cannot run these inputs
            raise _unrunnable(session, source, inputs, exc) from None
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
            if exact is not None and d > FLOAT_NOISE * scale and r.is_floating_point():
                wide = exact.outputs(inputs)
                if wide is not None and tuple(wide[i].shape) == tuple(r.shape):
                    dim = batch_axes[i] if i < len(batch_axes) else None
                    d, aside = judge_rows(source, i, r, g, wide[i], dim, scale)
                    if aside is not None:
                        set_aside.append(aside)
            if len(abs_d) <= i:
                abs_d.append(0.0)
                rel_d.append(0.0)
                worst.append(source)
            rel = d / max(scale, 1e-12)
            if rel > rel_d[i]:
                worst[i] = source
            abs_d[i] = max(abs_d[i], d)
            rel_d[i] = max(rel_d[i], rel)
    return Parity(abs_d, rel_d, len(named), worst, [s for s, _ in named], set_aside)


def _batch_axes(session: Any) -> list[int | None]:
    """Each output's batch axis in the file (the dimension exported as ``batch``)."""
    axes: list[int | None] = []
    for out in session.get_outputs():
        dims = list(out.shape) if out.shape is not None else []
        axes.append(dims.index("batch") if "batch" in dims else None)
    return axes


def check_traceable(model: nn.Module, name: str | None = None) -> None:
    """Refuse a model torch.fx cannot trace (the check ``edgeslim info`` makes).

    Why: the ONNX exporter records the ops the example input runs through, so data-dependent
    control flow (``if h.mean() > 0.1:``) is baked in as the branch the example took, and the
    file computes something else on other inputs. Transformers (analysed structurally, not
    fx-traced) are not refused here; their exports are still checked on perturbed inputs.
    """
    from edgeslim.errors import TraceError
    from edgeslim.graph.trace import trace
    from edgeslim.graph.transformer import is_transformer

    if is_transformer(model):
        return
    try:
        trace(float_view(model))
    except TraceError as exc:
        raise TraceError(
            f"{exc} Exporting {name or 'this model'} would record only the branch its example "
            "input takes, so the ONNX file could compute something else on other inputs. To "
            "export anyway by tracing the example (the file is then compared with torch on "
            "calibration, validation and perturbed inputs and refused if it differs), pass "
            "--trace-by-example (Python: trace_by_example=True)."
        ) from None


def float_view(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a fake-quant model a copy in which every quantized layer is
    its plain torch layer (same weights) and every activation quantizer an identity: same
    structure, shapes and MACs, traceable by torch.fx (a fake-quant layer reads its
    quantizer's state in Python). For structure checks and tables only."""
    from edgeslim.quant.modules import ActQuant, QuantMixin
    from edgeslim.quant.recurrent import QuantRNN

    if not any(isinstance(m, (ActQuant, QuantMixin)) for m in model.modules()):
        return model
    view = copy.deepcopy(model)
    for fqn, m in list(view.named_modules()):
        if isinstance(m, QuantRNN):  # its forward reads its quantizers: the torch layer
            parent, _, name = fqn.rpartition(".")
            setattr(view.get_submodule(parent) if parent else view, name, m.to_float())
    for m in view.modules():
        if isinstance(m, ActQuant):
            m.__class__ = nn.Identity  # type: ignore[assignment]
        elif isinstance(m, QuantMixin):
            plain = next((c for c in type(m).__mro__ if c.__module__.startswith("torch.nn")), None)
            if plain is not None and plain is not nn.Module:
                m.__class__ = plain
    return view
