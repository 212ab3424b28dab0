"""``edgeslim export onnx``: a model (optionally run through a recipe) to a checked ONNX file.

Quantized models export as int8 QDQ. A model torch.fx cannot trace is refused unless the
user opts in to tracing by example. The file is checked against torch on the example
inputs, calibration and validation batches of the task and perturbed inputs, every output
compared (a float export must match within 1e-3 of each output's scale); the task's headline
metric is measured in torch and in ONNX Runtime, and a gap beyond ``tolerance`` (a fraction
of the metric's scale) is an error, so a file that does not compute what was measured in
torch is never presented as good.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edgeslim.errors import EdgeslimError
from edgeslim.task import Task


@dataclass(frozen=True)
class ExportCheck:
    """What the export wrote and how it compares with torch."""

    path: Path
    quantized: bool
    metric: str
    torch_value: float
    ort_value: float
    max_abs_diff: list[float]
    inputs_checked: int
    int8_mac_share: float | None = None  # MACs in ONNX Runtime's integer kernels (int8 only)
    measured_on: str = ""  # the task's description: which data the metric read


def export_checked(
    model: nn.Module,
    task: Task,
    out: Path,
    reference: nn.Module | None = None,
    tolerance: float | None = None,
    *,
    force: bool = False,
    trace_by_example: bool = False,
    manifest: dict[str, Any] | None = None,
) -> ExportCheck:
    """Export ``model`` for ``task`` and check it in ONNX Runtime.

    ``reference`` is the uncompressed model agreement is measured against (default:
    ``model`` itself). ``tolerance``: largest allowed gap between the torch and the ONNX
    Runtime metric, as a fraction of ``max(|torch value|, 1)`` (0.46 points at 92% top-1);
    for a metric measured by agreement or a built-in top-1, at least
    :data:`~edgeslim.compression.FLIPS_ALLOWED` held rows' worth
    (:func:`~edgeslim.compression.refuse_metric_gap`). The file is compared with torch
    on the example inputs, calibration and validation batches and perturbed inputs, every
    output; a float export off by more than 1e-3 of an output's scale is refused. A model
    torch.fx cannot trace is refused unless ``trace_by_example``. ``out`` is written
    through a temporary sibling, with ``<out>.manifest.json`` (SHA-256, versions, plus
    ``manifest``) beside it; an existing ``out`` is replaced only with ``force``.
    """
    from edgeslim.artifacts import clean_stale_siblings, sha256_of, versions
    from edgeslim.compression import (
        FP32_REL_TOLERANCE,
        METRIC_TOLERANCE,
        _parity_sources,
        _refuse_mismatch,
        refuse_metric_gap,
    )
    from edgeslim.export.verify import (
        check_parity,
        check_resized,
        check_traceable,
        export_module,
        task_axes,
    )
    from edgeslim.quant.modules import QuantMixin
    from edgeslim.runtime.ort import OrtModel, ort_session, output_structure

    out = Path(out)
    check_export_target(out, force)
    task.check(model)
    if not trace_by_example:
        check_traceable(reference if reference is not None else model, type(model).__name__)
    task.bind_reference(reference if reference is not None else model)
    module = task.module(model).eval()
    axes = task_axes(task, module)
    if reference is not None:
        check_resized(task, module, task.module(reference).eval())
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-onnx")
    side = manifest_path(out)
    tmp_side = out.with_name(f".{out.name}.tmp-{os.getpid()}-manifest")
    quantized = any(isinstance(m, QuantMixin) for m in module.modules())
    try:
        path = export_module(module, task.example_inputs, tmp, axes)
        session = ort_session(path)
        parity = check_parity(module, session, _parity_sources(task))
        if not quantized:
            _refuse_mismatch(parity, "the fp32 ONNX export", trace_by_example)
        torch_m = task.measure(model)
        structure = output_structure(module, task.example_inputs)
        ort_m = task.measure(OrtModel(session, structure), wrapped=True)
        refuse_metric_gap(
            task, torch_m, ort_m, parity,
            METRIC_TOLERANCE if tolerance is None else tolerance, model=model,
        )  # fmt: skip
        name = next(iter(torch_m))
        record = {
            "format": "edgeslim-manifest",
            "version": 1,
            "versions": versions(),
            "files": {out.name: {"sha256": sha256_of(tmp), "bytes": tmp.stat().st_size}},
            "metric": {
                "name": name,
                "torch": torch_m[name],
                "onnxruntime": ort_m[name],
                "measured_on": task.description,
            },
            "parity": {
                "max_abs_diff": parity.max_abs_diff,
                "sources": parity.sources,
                "fp32_rel_tolerance": FP32_REL_TOLERANCE,
                "held_to_torch_precision": [a.describe() for a in parity.set_aside],
            },
            "trace_by_example": trace_by_example,
            **(manifest or {}),
        }
        tmp_side.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(out)
        tmp_side.replace(side)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_side.unlink(missing_ok=True)
    share = None
    if quantized:
        from edgeslim.runtime.kernels import check_integer_kernels

        share = check_integer_kernels(out, task.example_inputs).int8_mac_share
    return ExportCheck(
        out, quantized, name, torch_m[name], ort_m[name], parity.max_abs_diff,
        parity.inputs_checked, share, task.description,
    )  # fmt: skip


def manifest_path(out: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.manifest.json`` (an export's manifest, beside it)."""
    return out.with_name(f"{out.name}.manifest.json")


def check_export_target(out: Path, force: bool) -> None:
    """Refuse a folder, or an existing file unless ``force``, before any work."""
    out = Path(out)
    if out.is_dir():
        raise EdgeslimError(f"--out {out} is a folder; give the path of the .onnx file to write")
    if out.exists() and not force:
        raise EdgeslimError(
            f"--out {out} exists; pass --force to replace it (and its manifest), or choose "
            "another path"
        )
    from edgeslim.artifacts import check_writable

    check_writable(out)


def export_command(
    model_name: str | None,
    out: Path,
    recipe_path: Path | None = None,
    checkpoint: Path | None = None,
    data: str | None = None,
    metric: str | None = None,
    input_shapes: tuple[tuple[int, ...], ...] = (),
    *,
    force: bool = False,
    trace_by_example: bool = False,
    from_dir: Path | None = None,
    command: list[str] | None = None,
    dynamic_dims: tuple[tuple[int, ...], ...] = (),
) -> ExportCheck:
    """The command line's ``export onnx``: validate the recipe, the target, the model (or
    the compress output ``from_dir``), the data and the traceability first, then run the
    recipe's stages (if any) and :func:`export_checked`."""
    import copy
    import tempfile

    from edgeslim.compression import (
        recipe_data,
        recorded_data,
        starting_model,
        uncompressed_model,
    )
    from edgeslim.export.verify import check_traceable
    from edgeslim.graph.reparam import bake_reparametrizations
    from edgeslim.recipe import STAGES, StageContext, load_recipe
    from edgeslim.task import resolve_task

    recipe = load_recipe(recipe_path) if recipe_path is not None else None
    check_export_target(out, force)
    reference: nn.Module | None = None
    model_name, base, lineage = starting_model(model_name, checkpoint, from_dir)
    data, metric, input_shapes, dynamic_dims = recorded_data(
        from_dir, data, metric, input_shapes, dynamic_dims
    )
    task = resolve_task(model_name, data, metric, input_shapes, True, dynamic_dims)
    task.check(base)
    if not trace_by_example:
        check_traceable(base, model_name)
    original = uncompressed_model(lineage) if from_dir is not None else None
    net = base
    if recipe is not None and recipe.stages:
        net = copy.deepcopy(base)
        bake_reparametrizations(net)  # as compress does: weight_norm layers become plain
        with tempfile.TemporaryDirectory() as tmp:
            ctx = StageContext(out=Path(tmp), model_name=model_name, task=task, reference=base)
            for stage in recipe.stages:
                net = STAGES[stage.kind].handler(net, stage, ctx)
        reference = base
    reference = original or reference
    extra: dict[str, Any] = {"command": command, "model": model_name}
    if recipe is not None:
        extra["recipe"] = recipe_data(recipe)
    if from_dir is not None:
        extra["from"] = str(from_dir)
    if task.evaluate is None:  # what the agreement figures of the manifest are against
        extra["agreement_with"] = "uncompressed" if reference is not None else "itself in torch"
    return export_checked(
        net.eval(), task, out, reference=reference, force=force,
        trace_by_example=trace_by_example, manifest=extra,
    )  # fmt: skip
