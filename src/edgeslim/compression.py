"""``compress``: run a recipe on any model with a :class:`~edgeslim.task.Task`, then measure,
export and report.

The uncompressed model is measured in the same run (the task's metric, and latency in torch
and in ONNX Runtime in one process), so every record carries its own baseline. Output is
written into a temporary sibling folder and moved into place at the end: an interrupted or
failed run leaves the previous contents of ``out`` (if any) untouched and no half-written
folder behind.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from edgeslim.checkpoint import save_state
from edgeslim.cost import compare_latency, ort_runner, size_bytes, torch_runner
from edgeslim.errors import EdgeslimError, RecipeError
from edgeslim.export.verify import check_parity, export_axes, export_module, output_batch_dims
from edgeslim.graph import layer_table, total_macs
from edgeslim.progress import log_step
from edgeslim.quant.modules import QuantMixin
from edgeslim.recipe import STAGES, Recipe, StageContext, load_recipe, parse_recipe
from edgeslim.records import Record, save_records
from edgeslim.report import write_report
from edgeslim.runtime.ort import OrtModel, ort_session
from edgeslim.task import Task

DATA_ORDER = ("none", "calibration", "train")
# an fp32 export must compute what torch computes: relative to the output's largest value
FP32_REL_TOLERANCE = 1e-3


@dataclass
class CompressResult:
    """What :func:`compress` returns: the compressed model, its records, the files written."""

    model: nn.Module
    records: list[Record]
    paths: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def as_recipe(recipe: Recipe | dict[str, Any] | str | Path) -> Recipe:
    """A validated recipe from a :class:`Recipe`, a dict or a YAML path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    if isinstance(recipe, (str, Path)):
        return load_recipe(Path(recipe))
    raise RecipeError(f"a recipe is a path, a dict or a Recipe; got {type(recipe).__name__}")


def _recipe_yaml(recipe: Recipe) -> str:
    stages = [s.model_dump(mode="json") for s in recipe.stages]
    data = {"name": recipe.name, "description": recipe.description, "stages": stages}
    return yaml.safe_dump(data, sort_keys=False)


def _bits_config(module: nn.Module) -> tuple[dict[str, Any], dict[str, int]]:
    """The bits actually in ``module``: w/a bits, and low/high when weights are mixed."""
    quantized = {n: m for n, m in module.named_modules() if isinstance(m, QuantMixin)}
    w_bits = {n: m.qconfig.weight.bits for n, m in quantized.items() if m.qconfig.weight}
    if not w_bits:
        return {}, {}
    a_specs = [m.qconfig.activation for m in quantized.values() if m.qconfig.activation]
    config: dict[str, Any] = {
        "w_bits": max(w_bits.values()),
        "a_bits": a_specs[0].bits if a_specs else 32,
    }
    if min(w_bits.values()) != max(w_bits.values()):
        config.update(low_bits=min(w_bits.values()), high_bits=max(w_bits.values()))
    return config, w_bits


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` whole (the old contents are removed only once the new are in)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{time.time_ns()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def compress(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | str | Path,
    task: Task,
    out: str | Path | None = None,
    name: str | None = None,
    quick: bool = False,
) -> CompressResult:
    """Compress ``model`` (not changed: a copy is) by ``recipe`` on ``task``.

    Writes into ``out`` (when given): ``model.onnx`` (int8 QDQ when quantized),
    ``baseline.onnx``, ``model.safetensors``, ``results.json`` (one record per runtime,
    with every metric of the task), ``report.md`` with plots, and the ``recipe.yaml`` run.
    ``out=None`` measures the same way in a temporary folder and keeps no file.
    """
    recipe = as_recipe(recipe)  # validate before any heavy work
    if not recipe.stages:
        raise RecipeError("the recipe has no stages: there is nothing to compress")
    name = name or type(model).__name__
    base = model.eval()
    task.check(base)
    target = None if out is None else Path(out)
    if target is not None and target.exists() and not target.is_dir():
        raise EdgeslimError(f"--out {target} exists and is not a folder; give a folder path")
    parent = target.parent if target is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-" if target else "edgeslim-",
                                 dir=parent))  # fmt: skip
    try:
        result = _run(base, recipe, task, work, name, quick)
        if target is None:
            result.paths = {}
            return result
        _move_into_place(work, target)
        result.paths = {k: target / p.name for k, p in result.paths.items()}
        return result
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _run(
    base: nn.Module, recipe: Recipe, task: Task, out: Path, name: str, quick: bool
) -> CompressResult:
    (out / "recipe.yaml").write_text(_recipe_yaml(recipe))
    log_step(f"compress {name}: measuring the uncompressed model on {task.name}")
    task.bind_reference(base)
    base_metrics = task.measure(base)
    start = time.perf_counter()
    model = copy.deepcopy(base)
    ctx = StageContext(out=out, model_name=name, quick=quick, task=task)
    data_used = "none"
    for i, stage in enumerate(recipe.stages):
        kind = STAGES[stage.kind]
        log_step(f"compress {name}: stage {i + 1}/{len(recipe.stages)} ({stage.kind})")
        try:
            model = kind.handler(model, stage, ctx)
        except EdgeslimError:
            raise
        except Exception as exc:  # the user's model met an op a stage does not handle
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise EdgeslimError(
                f"stage {i} ({stage.kind}) failed on {name}: {type(exc).__name__}: {first}. "
                "If a layer type is the cause, keep it in float (a `select` entry set to null "
                "in a quantize stage, `skip` in a prune stage); otherwise report this with "
                "the model."
            ) from exc
        if DATA_ORDER.index(kind.data_used) > DATA_ORDER.index(data_used):
            data_used = kind.data_used
    seconds = time.perf_counter() - start
    model.eval()
    log_step(f"compress {name}: measuring the compressed model")
    metrics = task.measure(model)
    save_state(model, out / "model.safetensors")

    log_step(f"compress {name}: exporting to ONNX and checking it against torch")
    base_mod, comp_mod = task.module(base).eval(), task.module(model).eval()
    example = task.example_inputs
    out_dims = output_batch_dims(base_mod, task.inputs_at(1), task.inputs_at(2))
    axes = export_axes(task.names, task.dims, out_dims)
    base_path = export_module(base_mod, example, out / "baseline.onnx", axes)
    comp_path = export_module(comp_mod, example, out / "model.onnx", axes)
    base_sess, comp_sess = ort_session(base_path), ort_session(comp_path)
    checks = [example, *task.validation_batches()[:3]]
    base_parity = check_parity(base_mod, base_sess, checks)
    if max(base_parity.max_rel_diff) > FP32_REL_TOLERANCE:
        raise EdgeslimError(
            f"the fp32 ONNX export of {name} does not compute what torch computes "
            f"({base_parity.describe()}); the model may depend on data (control flow) or use "
            "an op the exporter mistranslates. Report this with the model."
        )
    parity = check_parity(comp_mod, comp_sess, checks)
    kernels = _integer_kernels(comp_mod, comp_path, example, ctx.notes)
    ort_metrics = task.measure(OrtModel(comp_sess), wrapped=True)
    log_step(f"compress {name}: timing torch and ONNX Runtime, compressed vs uncompressed")
    feeds = task.latency_feeds()
    np_feeds = {n: a.numpy() for n, a in zip(OrtModel(comp_sess).input_names, feeds, strict=True)}
    lat = compare_latency(
        {
            "torch_base": torch_runner(base_mod, *feeds),
            "torch": torch_runner(comp_mod, *feeds),
            "ort_base": ort_runner(base_sess, np_feeds),
            "onnxruntime": ort_runner(comp_sess, np_feeds),
        },
        repeats=10 if quick else 50,
    )
    macs = total_macs(layer_table(comp_mod, *example))
    config, w_bits = _bits_config(comp_mod)
    headline = next(iter(base_metrics))
    common: dict[str, Any] = {
        "suite": "compress",
        "model": name,
        "method": f"edgeslim:{recipe.name}",
        "config": config,
        "metric": headline,
        "baseline_value": round(base_metrics[headline], 4),
        "params": sum(p.numel() for p in model.parameters()),
        "macs": macs,
        "size_bytes": size_bytes(comp_mod, w_bits),
        "seconds": round(seconds, 2),
        "data_used": data_used,
    }
    extra = {"task": task.name, "notes": ctx.notes, "baseline_metrics": base_metrics}
    records = [
        Record(**common, value=round(metrics[headline], 4), runtime="torch",
               latency_ms=round(lat["torch"].median_ms, 4),
               baseline_latency_ms=round(lat["torch_base"].median_ms, 4),
               extra={**extra, "metrics": metrics}),
        Record(**common, value=round(ort_metrics[headline], 4), runtime="onnxruntime",
               latency_ms=round(lat["onnxruntime"].median_ms, 4),
               baseline_latency_ms=round(lat["ort_base"].median_ms, 4),
               extra={**extra, "metrics": ort_metrics,
                      "onnx_max_abs_diff": parity.max_abs_diff,
                      "onnx_parity_inputs": parity.inputs_checked, **kernels}),
    ]  # fmt: skip
    save_records(records, out / "results.json")
    write_report(records, out, title=f"edgeslim compress {name} ({recipe.name})")
    paths = {
        "onnx": comp_path,
        "baseline_onnx": base_path,
        "weights": out / "model.safetensors",
        "results": out / "results.json",
        "report": out / "report.md",
        "recipe": out / "recipe.yaml",
    }
    return CompressResult(model, records, paths, ctx.notes)


def _integer_kernels(
    module: nn.Module, path: Path, example: tuple[torch.Tensor, ...], notes: list[str]
) -> dict[str, Any]:
    """``int8_mac_share`` of a quantized export (empty for a float one); a share below
    ``MIN_INT8_MAC_SHARE`` warns and is noted."""
    from edgeslim.runtime.kernels import MIN_INT8_MAC_SHARE, check_integer_kernels, coverage_extra

    if not any(isinstance(m, QuantMixin) for m in module.modules()):
        return {}
    coverage = check_integer_kernels(path, example)
    if coverage.int8_mac_share < MIN_INT8_MAC_SHARE:
        notes.append(f"export: integer kernels run only part of the model: {coverage.summary()}")
    return coverage_extra(coverage)


def compress_model(
    model_name: str,
    recipe_path: Path,
    out: Path,
    checkpoint: Path | None = None,
    quick: bool = False,
    data: str | None = None,
    metric: str | None = None,
    input_shapes: tuple[tuple[int, ...], ...] = (),
) -> list[Record]:
    """The command line's ``compress``: a zoo name or ``module:factory``, its task from
    ``--data`` (or the zoo model's own), then :func:`compress`."""
    from edgeslim.task import resolve_task
    from edgeslim.zoo import resolve_model

    recipe = load_recipe(recipe_path)
    task = resolve_task(model_name, data, metric, input_shapes, quick)
    base = resolve_model(model_name, checkpoint)
    return compress(base, recipe, task, out, name=model_name, quick=quick).records
