"""``compress``: run a recipe on any model with a :class:`~edgeslim.task.Task`, then measure,
export and report.

The uncompressed model is measured in the same run (the task's metric, and latency in torch
and in ONNX Runtime in one process), so every record carries its own baseline. Everything is
validated before ``out`` is touched; output is written into a temporary sibling folder and
moved into place at the end: an interrupted or failed run leaves the previous contents of
``out`` (if any) untouched and no half-written folder behind (a killed run's sibling is
removed by the next run). ``manifest.json`` lists every file with its SHA-256 and says how
:func:`edgeslim.load` rebuilds the compressed model (see :mod:`edgeslim.artifacts`).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from edgeslim.checkpoint import save_state
from edgeslim.cost import compare_latency, ort_runner, size_bytes, torch_runner
from edgeslim.cost.latency import latency_spread
from edgeslim.errors import EdgeslimError, Int8SaturationWarning, RecipeError, first_line
from edgeslim.export.verify import (
    check_parity,
    check_resized,
    export_module,
    perturbed,
    task_axes,
)
from edgeslim.graph import layer_table, total_macs
from edgeslim.graph.reparam import bake_reparametrizations
from edgeslim.progress import log_step
from edgeslim.quant.modules import QuantMixin
from edgeslim.recipe import STAGES, Recipe, StageContext, load_recipe, parse_recipe
from edgeslim.records import Record, save_records
from edgeslim.report import write_report
from edgeslim.runtime.machine import KERNEL_BLOCK
from edgeslim.runtime.ort import OrtModel, ort_session, output_structure
from edgeslim.task import Task

if TYPE_CHECKING:
    from edgeslim.artifacts import Lineage
    from edgeslim.export.verify import Parity

DATA_ORDER = ("none", "calibration", "train")
# an fp32 export must compute what torch computes: relative to the output's largest value
FP32_REL_TOLERANCE = 1e-3
# largest gap between the metric in torch and in ONNX Runtime, of max(|value|, 1)
METRIC_TOLERANCE = 0.005
# held rows whose top-1 may differ between the int8 file and torch's fake-quant before the
# file is refused: a near-tie flips under integer rounding (a ViT W8A8 on 60 held samples:
# one row, 1.7 points), a file computing something else (saturating int8 sums) moves many
FLIPS_ALLOWED = 2
# an int8 file differs from its fake-quant torch model by rounding ties, about 1% of the
# output's scale (resnet20 W7A8: 1.3%); saturating kernels gave 17.6% (W8A8, no VNNI)
SATURATION_HINT = 0.05
COMPRESS_REMEDY = (
    "quantize with reduce_range: true (7-bit weights in int8, which cannot overflow; auto: "
    "only on CPUs like this one; in a datafree stage, 7 in place of 8 in its bit fields)"
)


@dataclass
class CompressResult:
    """What :func:`compress` returns: the compressed model, its records, the files written."""

    model: nn.Module
    records: list[Record]
    paths: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)  # what reload replays


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
    return yaml.safe_dump(recipe_data(recipe), sort_keys=False)


def _bits_label(values: list[int]) -> int | str:
    """``8`` when uniform, ``"3/8"`` (lowest/highest) when mixed."""
    low, high = min(values), max(values)
    return low if low == high else f"{low}/{high}"


def _bits_config(module: nn.Module) -> tuple[dict[str, Any], dict[str, int]]:
    """The bits actually in ``module``, read from its quantized layers (never from the
    recipe's request): ``w_bits`` (``"3/8"`` when mixed, with ``low_bits``/``high_bits``) and
    ``a_bits`` (``32`` when no activation is quantized, ``"8/32"`` when some quantized
    layers keep float inputs: a data-free model's layers without BatchNorm statistics, a
    ``select`` entry with ``a_bits: null``); plus the per-layer weight bits."""
    quantized = {n: m for n, m in module.named_modules() if isinstance(m, QuantMixin)}
    w_bits = {n: m.qconfig.weight.bits for n, m in quantized.items() if m.qconfig.weight}
    if not w_bits:
        return {}, {}
    a_bits = sorted({m.qconfig.activation.bits for m in quantized.values() if m.qconfig.activation})
    if a_bits and any(m.qconfig.activation is None for m in quantized.values()):
        a_bits.append(32)
    config: dict[str, Any] = {
        "w_bits": _bits_label(list(w_bits.values())),
        "a_bits": _bits_label(a_bits) if a_bits else 32,
    }
    if min(w_bits.values()) != max(w_bits.values()):
        config.update(low_bits=min(w_bits.values()), high_bits=max(w_bits.values()))
    return config, w_bits


def _parity_sources(task: Task, per_source: int = 2) -> list[tuple[str, Any]]:
    """Named input batches the exports are checked on: example, calibration, validation and
    perturbed inputs (see :func:`edgeslim.export.verify.parity_inputs`)."""
    from edgeslim.export.verify import parity_inputs

    calib = task.calibration_batches(64)[:per_source] if task.calibration is not None else []
    held = task.validation_batches()[:per_source]
    sources = parity_inputs(task.example_inputs, calib, held)
    resized = task.resized((held or calib or [task.example_inputs])[0])
    if resized is not None:  # the file's free dimensions, at another size
        sizes = [list(t.shape) for t in resized]
        sources.append((f"held batch doubled along the dynamic dimensions {sizes}", resized))
    return sources


def compress(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | str | Path,
    task: Task,
    out: str | Path | None = None,
    name: str | None = None,
    quick: bool = False,
    *,
    force: bool = False,
    trace_by_example: bool = False,
    source: Lineage | None = None,
    command: list[str] | None = None,
    reference: nn.Module | None = None,
) -> CompressResult:
    """Compress ``model`` (not changed: a copy is) by ``recipe`` on ``task``.

    Writes into ``out`` (when given): ``model.onnx`` (int8 QDQ when quantized),
    ``baseline.onnx``, ``model.safetensors`` (``model-packed.safetensors`` too when weights
    are under 8 bits: their codes at their bits), the prune plans, ``results.json`` (one record
    per runtime, with every metric of the task), ``report.md`` with plots, the
    ``recipe.yaml`` run, ``reload_check.safetensors`` and ``manifest.json`` (files with
    SHA-256, versions, recipe, command line and how :func:`edgeslim.load` rebuilds the
    model). ``out=None`` measures the same way in a temporary folder and keeps no file.

    Everything is validated before ``out`` is touched: the recipe (no stages: refused), the
    folder (a non-empty one needs ``force``, which replaces it whole), the inputs, and that
    torch.fx can trace the model (what ``edgeslim info`` checks; ``trace_by_example`` exports
    an untraceable model as its example input runs it, checked on perturbed inputs).
    ``source`` (from :func:`edgeslim.artifacts.load_artifact`) continues the lineage of a
    model reloaded from an earlier output; ``command`` is recorded in the manifest.
    ``reference`` is the uncompressed model the baseline figures (metric, agreement,
    ``baseline.onnx``, latency, MACs) are measured on when ``model`` is already compressed
    (the CLI's ``--from``: the model the chain started from); default ``model``.
    """
    from edgeslim.artifacts import Lineage, check_out_folder, temp_sibling
    from edgeslim.export.verify import check_traceable

    recipe = as_recipe(recipe)  # validate before any heavy work
    if not recipe.stages:
        raise RecipeError("the recipe has no stages: there is nothing to compress")
    name = name or type(model).__name__
    target = None if out is None else Path(out)
    if target is not None:
        check_out_folder(target, force)
    base = model.eval()
    task.check(base)
    if reference is not None:
        task.check(reference.eval())  # its inputs declared as the model's for the export
    if not trace_by_example:
        check_traceable(base, name)
    lineage = copy.copy(source) if source is not None else Lineage(base_class=type(base).__name__)
    if lineage.base_sha256 is None and target is not None:
        from edgeslim.artifacts import state_sha256

        lineage.base_sha256 = state_sha256(base)
    if target is not None:
        work = temp_sibling(target)
    else:
        work = Path(tempfile.mkdtemp(prefix="edgeslim-"))
    try:
        note = None
        if reference is None and source is not None and source.steps:
            note = (
                "baseline: the model this run started from (already compressed: "
                f"{', '.join(str(s.get('kind')) for s in source.steps)}); the model it was "
                "made from could not be rebuilt, so every baseline figure is against it"
            )
        result = _run(base, recipe, task, work, name, quick, trace_by_example, reference, note)
        if target is None:
            result.paths = {}
            return result
        _finish_folder(result, recipe, task, work, lineage, command)
        from edgeslim.artifacts import move_into_place

        move_into_place(work, target)
        result.paths = {k: target / p.name for k, p in result.paths.items()}
        return result
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _finish_folder(
    result: CompressResult,
    recipe: Recipe,
    task: Task,
    out: Path,
    lineage: Lineage,
    command: list[str] | None,
) -> None:
    """Write what reload needs (prior steps' files, the check file) and the manifest."""
    from edgeslim.artifacts import Lineage, save_check, write_manifest
    from edgeslim.task.agreement import flat_outputs

    steps: list[dict[str, Any]] = []
    for step in lineage.steps:  # a model reloaded with --from: carry its files along
        files = dict(step.get("files") or {})
        for key, fname in files.items():
            assert lineage.folder is not None
            copied = f"from.{fname}"
            shutil.copyfile(lineage.folder / fname, out / copied)
            files[key] = copied
        steps.append({**step, "files": files})
    steps += result.steps
    if task.wrap is None:
        with torch.no_grad():
            outputs = flat_outputs(result.model(*task.example_inputs))
        save_check(out, task.example_inputs, outputs)
    else:  # the raw model does not take the example inputs: record them alone
        save_check(out, task.example_inputs, [])
    rebuild = Lineage(
        lineage.spec, lineage.checkpoint, lineage.base_class, lineage.base_sha256, steps
    ).to_dict()
    if task.wrap is None:  # reload traces the model as compress did (shape conditions)
        rebuild["batch_dims"] = list(task.dims)
    path = write_manifest(
        out, recipe=json.loads(json.dumps(recipe_data(recipe))), command=command,
        rebuild=rebuild, name=result.records[0].model if result.records else None,
    )  # fmt: skip
    result.paths["check"] = out / "reload_check.safetensors"
    result.paths["manifest"] = path


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data, every stage with all its fields."""
    stages = [s.model_dump(mode="json") for s in recipe.stages]
    return {"name": recipe.name, "description": recipe.description, "stages": stages}


def _plan_files(out: Path) -> set[str]:
    from edgeslim.artifacts import PLAN_GLOB

    return {p.name for p in out.glob(PLAN_GLOB)}


SLOWER_TOLERANCE = 1.05  # a compressed model this much slower than its original is said


def slower_warnings(
    medians: dict[str, tuple[float, float]], stages: list[dict[str, Any]]
) -> list[str]:
    """WARNING notes for each runtime where the compressed model ran slower than the original
    (``medians``: runtime -> (compressed ms, original ms)), with the likely cause when a prune
    stage kept widths ONNX Runtime's blocked conv kernels cannot use.

    Measured: a pruned EfficientNet-style model at -30% MACs ran 0.52x in ONNX Runtime with
    free widths and 1.54x with widths rounded to 8 (its NCHWc kernels block channels by 8
    or 16 and fall back to slower paths and layout reorders otherwise)."""
    notes = []
    for runtime, (ms, base_ms) in medians.items():
        if ms <= base_ms * SLOWER_TOLERANCE:
            continue
        text = (f"WARNING: the compressed model runs slower than the original in {runtime} "
                f"({ms:.3f} ms vs {base_ms:.3f} ms, {base_ms / ms:.2f}x)")  # fmt: skip
        free = [  # set below a block by hand; an unset (auto) one's note says what it chose
            s for s in stages
            if s.get("kind") == "prune" and int(s.get("round_to") or KERNEL_BLOCK) < KERNEL_BLOCK
        ]  # fmt: skip
        if runtime == "onnxruntime" and free:
            text += ("; pruned widths that are not multiples of 8 fall off ONNX Runtime's "
                     "blocked conv kernels: set `round_to: 8` on the prune stage")  # fmt: skip
        notes.append(text)
    return notes


def _run(
    base: nn.Module,
    recipe: Recipe,
    task: Task,
    out: Path,
    name: str,
    quick: bool,
    trace_by_example: bool = False,
    reference: nn.Module | None = None,
    baseline_note: str | None = None,
) -> CompressResult:

    (out / "recipe.yaml").write_text(_recipe_yaml(recipe))
    log_step(f"compress {name}: measuring the uncompressed model on {task.name}")
    original = (reference if reference is not None else base).eval()
    task.bind_reference(original)
    base_metrics = task.measure(original)
    start = time.perf_counter()
    model = copy.deepcopy(base)
    baked = bake_reparametrizations(model)
    if baked:
        log_step(f"compress {name}: weights fixed at their value: {', '.join(baked)}")
    ctx = StageContext(out=out, model_name=name, quick=quick, task=task, reference=base)
    ctx.notes.extend(task.notes)  # the headline the task chose for this model's outputs
    if baseline_note is not None:
        ctx.notes.append(baseline_note)
    data_used = "none"
    steps: list[dict[str, Any]] = []
    for i, stage in enumerate(recipe.stages):
        kind = STAGES[stage.kind]
        log_step(f"compress {name}: stage {i + 1}/{len(recipe.stages)} ({stage.kind})")
        plans_before = _plan_files(out)
        try:
            model = kind.handler(model, stage, ctx)
        except EdgeslimError:
            raise
        except Exception as exc:  # the user's model met an op a stage does not handle
            raise EdgeslimError(
                f"stage {i} ({stage.kind}) failed on {name}: {first_line(exc)}. "
                "If a layer type is the cause, keep it in float (a `select` entry set to null "
                "in a quantize stage, `skip` in a prune stage); otherwise report this with "
                "the model."
            ) from exc
        step: dict[str, Any] = {"kind": stage.kind, "stage": stage.model_dump(mode="json")}
        new_plans = sorted(_plan_files(out) - plans_before)
        step["files"] = {"plan": new_plans[0]} if new_plans else {}
        steps.append(step)
        if DATA_ORDER.index(kind.data_used) > DATA_ORDER.index(data_used):
            data_used = kind.data_used
    seconds = time.perf_counter() - start
    model.eval()
    if trace_by_example:
        ctx.notes.append(
            "export: traced by example (trace_by_example): torch.fx was not required to trace "
            "the model; the files were checked on calibration, validation and perturbed inputs"
        )
    log_step(f"compress {name}: measuring the compressed model")
    metrics = task.measure(model)
    save_state(model, out / "model.safetensors")

    log_step(f"compress {name}: exporting to ONNX and checking it against torch")
    base_mod, comp_mod = task.module(original).eval(), task.module(model).eval()
    example = task.example_inputs
    axes = task_axes(task, base_mod)
    check_resized(task, comp_mod, base_mod)
    base_path = export_module(base_mod, example, out / "baseline.onnx", axes)
    comp_path = export_module(comp_mod, example, out / "model.onnx", axes)
    base_sess, comp_sess = ort_session(base_path), ort_session(comp_path)
    checks = _parity_sources(task)
    base_parity = check_parity(base_mod, base_sess, checks)
    if not any(isinstance(m, QuantMixin) for m in base_mod.modules()):
        # (a model reloaded --from a quantized output is int8 already: its file is held to
        # the metric check below, as the compressed one)
        _refuse_mismatch(base_parity, f"the fp32 ONNX export of {name}", trace_by_example)
    parity: Parity = check_parity(comp_mod, comp_sess, checks)
    for which, checked in (("fp32 file", base_parity), ("compressed file", parity)):
        ctx.notes += [
            f"export check ({which}): rows held to torch's own float32 precision, not to "
            f"{FP32_REL_TOLERANCE:g} of the output's scale: {a.describe()}"
            for a in checked.set_aside
        ]
    quantized = any(isinstance(m, QuantMixin) for m in comp_mod.modules())
    if not quantized:  # a float model (pruned, fine-tuned) must match torch as closely
        _refuse_mismatch(parity, f"the ONNX export of compressed {name}", trace_by_example)
    if quantized:
        searched = any(stage.kind == "search" for stage in recipe.stages)
        remedy = (
            "give the search stage 7 in place of 8 in w_bits (7-bit weights in int8, which "
            "cannot overflow)" if searched else COMPRESS_REMEDY
        )  # fmt: skip
        saturation_note(comp_mod, parity, ctx.notes, remedy)
    kernels = _integer_kernels(comp_mod, comp_path, example, ctx.notes)
    ort_metrics = task.measure(
        OrtModel(comp_sess, output_structure(comp_mod, example)), wrapped=True
    )
    refuse_metric_gap(task, metrics, ort_metrics, parity, model=comp_mod)
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
    ctx.notes += slower_warnings(
        {rt: (lat[rt].median_ms, lat[base].median_ms)
         for rt, base in (("torch", "torch_base"), ("onnxruntime", "ort_base"))},
        [s.model_dump() for s in recipe.stages],
    )  # fmt: skip
    macs = total_macs(layer_table(comp_mod, *example))
    config, w_bits = _bits_config(comp_mod)
    config.update(_macs_config(recipe, base_mod, example, macs))
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
    extra: dict[str, Any] = {
        "task": task.name, "notes": ctx.notes, "baseline_metrics": base_metrics,
        "trace_by_example": trace_by_example,
    }  # fmt: skip
    if w_bits:
        extra["weight_bits"] = w_bits
    packed = _save_packed(model, w_bits, out, ctx.notes)
    if packed is not None:
        extra["packed_bytes"] = packed.stat().st_size
    records = [
        Record(**common, value=round(metrics[headline], 4), runtime="torch",
               latency_ms=round(lat["torch"].median_ms, 4),
               baseline_latency_ms=round(lat["torch_base"].median_ms, 4),
               extra={**extra, "metrics": metrics,
                      "latency": latency_spread(lat["torch"], lat["torch_base"])}),
        Record(**common, value=round(ort_metrics[headline], 4), runtime="onnxruntime",
               latency_ms=round(lat["onnxruntime"].median_ms, 4),
               baseline_latency_ms=round(lat["ort_base"].median_ms, 4),
               extra={**extra, "metrics": ort_metrics,
                      "latency": latency_spread(lat["onnxruntime"], lat["ort_base"]),
                      "onnx_max_abs_diff": parity.max_abs_diff,
                      "onnx_parity_inputs": parity.inputs_checked,
                      "onnx_parity_sources": parity.sources, **kernels}),
    ]  # fmt: skip
    save_records(records, out / "results.json")
    write_report(records, out, title=f"edgeslim compress {name} ({recipe.name})")
    paths = {
        "onnx": comp_path,
        "baseline_onnx": base_path,
        "weights": out / "model.safetensors",
        "results": out / "results.json",
        "report": out / "report.md",
        "machine": out / "machine.json",
        "recipe": out / "recipe.yaml",
    }
    if packed is not None:
        paths["packed"] = packed
    for step in steps:
        if "plan" in step["files"]:
            key = "plan" if "plan" not in paths else f"plan{len(paths)}"
            paths[key] = out / step["files"]["plan"]
    result = CompressResult(model, records, paths, ctx.notes)
    result.steps = steps
    return result


def _save_packed(
    model: nn.Module, w_bits: dict[str, int], out: Path, notes: list[str]
) -> Path | None:
    """``model-packed.safetensors`` (+ ``.json``) when a layer's weights are under 8 bits:
    each quantized weight as its codes, ``b`` bits each (:func:`~.export.packed.save_packed`).

    Why: the record's ``size_bytes`` counts weights at their bits, while ``model.onnx``
    stores every code in an int8 byte (what ONNX Runtime's kernels read) and
    ``model.safetensors`` in float32; this file holds the codes at their bits with their
    scales, and the float tensors (ternary resnet20: 81 KB against 69 KB stated; W4 with
    8-bit first and last layers: 150 KB against 139 KB; ``extra.packed_bytes`` records it).
    """
    if not w_bits or min(w_bits.values()) >= 8:
        return None
    from edgeslim.export.packed import save_packed

    st_path, _ = save_packed(model, out / "model-packed")
    notes.append(
        f"packed weights: {st_path.name} holds each quantized weight in its own bits "
        f"({st_path.stat().st_size / 1024:.1f} KiB; model.onnx keeps one int8 byte per code "
        "for the integer kernels)"
    )
    return st_path


def refuse_metric_gap(
    task: Task,
    torch_m: dict[str, float],
    ort_m: dict[str, float],
    parity: Any,
    tolerance: float = METRIC_TOLERANCE,
    model: nn.Module | None = None,
) -> None:
    """Refuse a file whose headline metric in ONNX Runtime is further from torch's than
    ``tolerance`` of ``max(|torch value|, 1)``; for a metric measured by agreement or a
    built-in top-1 (a percentage of held rows), ``tolerance`` of 100 (0.5 points) and at
    least :data:`FLIPS_ALLOWED` held rows' worth (:meth:`~edgeslim.task.Task.metric_step`):
    int8 kernels round differently from fake-quant (and float kernels from torch's, far
    less), so near-tie rows may flip (4 of 800 per-frame rows of a small conformer block
    read 0.50 points, against 0.48 allowed when the scale was the figure itself), but a
    file computing something else (a saturated bias, overflowing sums) moves many.

    ``model`` (the torch model the file was made from): when the file is refused, the
    message also says how far noise of :data:`SENSITIVITY_NOISE` of each input's spread
    moves the torch model's own metric (:func:`input_sensitivity`), so that a model whose
    outputs amplify any rounding (random or badly scaled weights) is told apart from a
    wrong export."""
    name = next(iter(torch_m))
    gap = abs(ort_m[name] - torch_m[name])
    allowed = tolerance * max(abs(torch_m[name]), 1.0)
    step = task.metric_step(torch_m)
    if step is not None:
        allowed = max(tolerance * 100.0, FLIPS_ALLOWED * step)
    if gap > allowed + 1e-9:
        moved = None if model is None else input_sensitivity(task, model, name)
        if moved is not None and abs(moved - torch_m[name]) > allowed:
            cause = (
                f" The torch model itself is that sensitive: noise of "
                f"{SENSITIVITY_NOISE:.1%} of each input's spread moves its {name} from "
                f"{torch_m[name]:.4g} to {moved:.4g}, so the small rounding differences "
                "between torch's and ONNX Runtime's kernels are amplified alike. A trained "
                "model rarely is: check its weights (random or badly scaled "
                "initialisation?); the file cannot be checked against such a model."
            )
        else:
            cause = " The export does not compute what torch computed. Report this with the model."
        raise EdgeslimError(
            f"the exported file scores {name} {ort_m[name]:.4g} in ONNX Runtime but the "
            f"torch model {torch_m[name]:.4g} (allowed gap {allowed:.3g}; "
            f"{parity.describe()}).{cause}"
        )


# input noise (a fraction of each float input's standard deviation) under which the torch
# model's own metric is measured when its file is refused for a metric gap: 10x float16's
# resolution, far below anything a trained model's prediction should depend on
SENSITIVITY_NOISE = 1e-3


class _NoisyInputs(nn.Module):
    """``model`` reading its float inputs with Gaussian noise added (token ids unchanged)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, *inputs: torch.Tensor) -> Any:
        self.calls += 1
        return self.model(*perturbed(inputs, self.calls, SENSITIVITY_NOISE))


def input_sensitivity(task: Task, model: nn.Module, name: str) -> float | None:
    """The task's ``name`` metric of ``model`` under input noise of
    :data:`SENSITIVITY_NOISE`; None when it cannot be measured that way (integer inputs
    only, or a metric function that needs the model itself)."""
    noisy = _NoisyInputs(model).eval()
    try:
        with torch.no_grad():
            value = task.measure(noisy).get(name)
    except Exception:  # a user's metric reading the model's attributes: no hint, same error
        return None
    return None if noisy.calls == 0 else value


def _refuse_mismatch(parity: Any, what: str, trace_by_example: bool) -> None:
    """An fp32 file that differs from torch beyond ``FP32_REL_TOLERANCE`` is an error naming
    the output, the difference and the input source it was found on."""
    failures = parity.failures(FP32_REL_TOLERANCE)
    if not failures:
        return
    cause = (
        "The model was traced by example (trace_by_example): its data-dependent control flow "
        "took another branch on these inputs than on the example, so the file computes "
        "something else. Rewrite that op with tensor ops (e.g. torch.where) so torch.fx can "
        "trace it, and drop --trace-by-example."
        if trace_by_example
        else "The model may depend on data (control flow) or use an op the exporter "
        "mistranslates. Report this with the model."
    )
    raise EdgeslimError(
        f"{what} does not compute what torch computes: {'; '.join(failures)} (allowed "
        f"{FP32_REL_TOLERANCE:g} of the output's scale; checked on {parity.inputs_checked} "
        f"input batches: example, calibration, validation and perturbed inputs). {cause}"
    )


def _macs_config(
    recipe: Recipe, base_mod: nn.Module, example: tuple[torch.Tensor, ...], macs: int
) -> dict[str, Any]:
    """The measured MACs reduction (when the recipe prunes), the requested target and
    whether a miss was allowed: what the record and the report show."""
    targets = [getattr(s, "macs_reduction", None) or getattr(s, "prune_ratio", None)
               for s in recipe.stages]  # fmt: skip
    prunes = [s for s, t in zip(recipe.stages, targets, strict=True)
              if s.kind == "prune" or t]  # fmt: skip
    if not prunes:
        return {}
    base_macs = total_macs(layer_table(base_mod, *example))
    out: dict[str, Any] = {"macs_reduction": round(1 - macs / max(base_macs, 1), 4)}
    wanted = [t for t in targets if t]
    if wanted:
        out["macs_target"] = wanted[0] if len(wanted) == 1 else wanted
    if any(getattr(s, "allow_target_miss", False) for s in prunes):
        out["allow_target_miss"] = True
    return out


def saturation_note(
    module: nn.Module, parity: Parity, notes: list[str], remedy: str = COMPRESS_REMEDY
) -> None:
    """Warn (and note) when the int8 file differs from torch by more than rounding explains
    on a CPU whose int8 kernels saturate, and full-range 8-bit weights are why; ``remedy``
    says how the caller's surface gets 7-bit weights."""
    from edgeslim.runtime.machine import int8_sums_saturate

    full = [
        m for m in module.modules()
        if isinstance(m, QuantMixin) and m.qconfig.weight is not None
        and m.qconfig.weight.bits == 8 and m.qconfig.weight.quantizer == "uniform"
    ]  # fmt: skip
    worst = max(parity.max_rel_diff, default=0.0)
    if not full or worst <= SATURATION_HINT or not int8_sums_saturate():
        return
    text = (
        f"export: the int8 file differs from the quantized torch model by up to {worst:.1%} "
        "of its output's scale on this CPU, an x86 without VNNI, whose int8 kernels add "
        "pairs of products in 16 bits and saturate with full-range 8-bit weights; the "
        "ONNX Runtime figures here carry that error. On CPUs with VNNI or on Arm the file "
        f"computes as torch does; for CPUs without, {remedy}"
    )
    warnings.warn(text, Int8SaturationWarning, stacklevel=2)
    notes.append(text)


def _integer_kernels(
    module: nn.Module, path: Path, example: tuple[torch.Tensor, ...], notes: list[str]
) -> dict[str, Any]:
    """``int8_mac_share`` of a quantized export (empty for a float one); a share below
    ``MIN_INT8_MAC_SHARE`` warns and is noted."""
    from edgeslim.runtime.kernels import MIN_INT8_MAC_SHARE, check_integer_kernels, coverage_extra

    if not any(isinstance(m, QuantMixin) for m in module.modules()):
        return {}
    coverage = check_integer_kernels(path, example)
    if coverage.quantized_share < MIN_INT8_MAC_SHARE:
        notes.append(f"export: integer kernels run only part of the model: {coverage.summary()}")
    return coverage_extra(coverage)


def compress_model(
    model_name: str | None,
    recipe_path: Path,
    out: Path,
    checkpoint: Path | None = None,
    quick: bool = False,
    data: str | None = None,
    metric: str | None = None,
    input_shapes: tuple[tuple[int, ...], ...] = (),
    *,
    force: bool = False,
    trace_by_example: bool = False,
    from_dir: Path | None = None,
    command: list[str] | None = None,
    dynamic_dims: tuple[tuple[int, ...], ...] = (),
) -> list[Record]:
    """The command line's ``compress``: a zoo name or ``module:factory`` (or, with
    ``from_dir``, the model an earlier ``compress`` wrote), its task from ``--data`` (or the
    zoo model's own), then :func:`compress`. Recipe, output folder, model, checkpoint and data
    are all validated before anything is written."""
    from edgeslim.artifacts import check_out_folder
    from edgeslim.task import resolve_task

    recipe = load_recipe(recipe_path)
    if not recipe.stages:
        raise RecipeError(f"{recipe_path}: the recipe has no stages: there is nothing to compress")
    check_out_folder(out, force)
    model_name, base, lineage = starting_model(model_name, checkpoint, from_dir)
    data, metric, input_shapes, dynamic_dims = recorded_data(
        from_dir, data, metric, input_shapes, dynamic_dims
    )
    task = resolve_task(model_name, data, metric, input_shapes, quick, dynamic_dims)
    original = uncompressed_model(lineage) if from_dir is not None else None
    return compress(
        base, recipe, task, out, name=model_name, quick=quick, force=force,
        trace_by_example=trace_by_example, source=lineage, command=command,
        reference=original,
    ).records  # fmt: skip


Shapes = tuple[tuple[int, ...], ...]


def recorded_data(
    from_dir: Path | None,
    data: str | None,
    metric: str | None,
    input_shapes: Shapes,
    dynamic_dims: Shapes = (),
) -> tuple[str | None, str | None, Shapes, Shapes]:
    """``--data``, ``--metric``, ``--input-shape`` and ``--dynamic-dims`` for a command that
    starts ``--from`` an output: those given, else those the command line that wrote it
    recorded in its manifest (a model from outside the zoo needs them again to be measured
    and exported; a file exported from it keeps the same free dimensions). A recorded path
    that does not exist from here is left out, so the usual error asks for ``--data``.
    Decision: all come from the record together, or none does, so a recorded shape never
    meets other data."""
    from edgeslim.artifacts import read_manifest

    if from_dir is None or data is not None:
        return data, metric, input_shapes, dynamic_dims
    found: dict[str, list[str]] = {}
    folder: Path | None = Path(from_dir)
    for _ in range(16):  # a chain of --from outputs: the data its first command was given
        if folder is None or not (folder / "manifest.json").is_file():
            break
        found = _recorded_options(read_manifest(folder, verify=False).get("command") or [])
        if found.get("--data"):
            break
        earlier = found.get("--from", [])
        folder = None if not earlier else _earlier_folder(Path(earlier[-1]), folder)
    recorded = found.get("--data", [])
    if not recorded or not _reachable(recorded[-1]):
        return data, metric, input_shapes, dynamic_dims
    shapes = tuple(tuple(int(v) for v in s.split(",")) for s in found.get("--input-shape", []))
    dims = tuple(tuple(int(v) for v in s.split(",") if v.strip())
                 for s in found.get("--dynamic-dims", []))  # fmt: skip
    metrics = found.get("--metric", [])
    return (recorded[-1], metric or (metrics[-1] if metrics else None), input_shapes or shapes,
            dynamic_dims or dims)  # fmt: skip


def _recorded_options(argv: list[Any]) -> dict[str, list[str]]:
    """The values of ``--data``, ``--metric``, ``--input-shape``, ``--dynamic-dims`` and
    ``--from`` in a recorded command line (``--opt value`` or ``--opt=value``)."""
    found: dict[str, list[str]] = {}
    for i, arg in enumerate(argv):
        name, eq, value = str(arg).partition("=")
        if name in ("--data", "--metric", "--input-shape", "--dynamic-dims", "--from"):
            if not eq and i + 1 < len(argv):
                value = str(argv[i + 1])
            found.setdefault(name, []).append(value)
    return found


def _earlier_folder(recorded: Path, later: Path) -> Path | None:
    """The folder a recorded ``--from`` names: as written (absolute, or relative to here),
    else beside the output that recorded it."""
    for candidate in (recorded, later.parent / recorded.name):
        if (candidate / "manifest.json").is_file() and candidate.resolve() != later.resolve():
            return candidate
    return None


def _reachable(spec: str) -> bool:
    """A recorded ``--data``: a built-in, ``module:function`` or a path that exists here."""
    from edgeslim.task.resolve import BUILTIN_DATA

    return spec in BUILTIN_DATA or Path(spec).exists() or (":" in spec and ".npz" not in spec)


def starting_model(
    model_name: str | None, checkpoint: Path | None, from_dir: Path | None
) -> tuple[str, nn.Module, Any]:
    """``(model name, model, lineage)`` a command starts from: the compressed model a
    ``compress`` wrote to ``from_dir`` (named by the spec it was made from), or
    ``model_name`` with its optional ``checkpoint``. Shared by ``compress`` and ``export``."""
    from edgeslim.artifacts import Lineage, load_artifact, read_manifest

    if from_dir is not None:
        if checkpoint is not None:
            raise EdgeslimError("give either --from or --checkpoint, not both")
        rebuild = read_manifest(Path(from_dir), verify=False).get("rebuild") or {}
        made_in_python = isinstance(rebuild, dict) and not (rebuild.get("model") or {}).get("spec")
        # a model compressed from Python is rebuilt on the factory the command names
        given = resolve_base(model_name, None) if made_in_python and model_name else None
        artifact = load_artifact(from_dir, given)
        lineage = artifact.lineage
        if model_name is not None and lineage.spec is not None and model_name != lineage.spec:
            raise EdgeslimError(
                f"--from {from_dir} holds a compressed {lineage.spec}, not {model_name}; "
                "leave the model name out with --from"
            )
        name = model_name or lineage.spec
        if name is None:
            raise EdgeslimError(
                f"--from {from_dir} was written by edgeslim.compress from Python; name the "
                "model's factory (module:factory) so its task can be resolved"
            )
        return name, artifact.model, lineage
    if model_name is None:
        raise EdgeslimError("name a model (zoo name or module:factory) or pass --from OUT_DIR")
    base = resolve_base(model_name, checkpoint)
    lineage = Lineage(
        model_name, None if checkpoint is None else str(Path(checkpoint).resolve()),
        type(base).__name__,
    )  # fmt: skip
    return model_name, base, lineage


def uncompressed_model(lineage: Lineage) -> nn.Module | None:
    """The model a ``compress`` output was made from (its spec and checkpoint), so that an
    ``export`` or ``compress`` of ``--from`` measures against it (agreement, baseline); None when it
    cannot be rebuilt (a model compressed from Python, a checkpoint moved since): the file
    is then compared with the compressed model itself."""
    if lineage.spec is None:
        return None
    ckpt = Path(lineage.checkpoint) if lineage.checkpoint else None
    if ckpt is not None and not ckpt.exists():
        return None
    try:
        return resolve_base(lineage.spec, ckpt)
    except EdgeslimError:
        return None


def resolve_base(model_name: str, checkpoint: Path | None, pretrained: bool = True) -> nn.Module:
    """:func:`edgeslim.zoo.resolve_model`, with a hint when ``checkpoint`` is the
    ``model.safetensors`` of a compress output (that folder reloads with ``--from``)."""
    from edgeslim.artifacts import compress_output_hint
    from edgeslim.errors import CheckpointError
    from edgeslim.zoo import resolve_model

    try:
        return resolve_model(model_name, checkpoint, pretrained=pretrained)
    except CheckpointError as exc:
        hint = compress_output_hint(checkpoint) if checkpoint is not None else None
        if hint is None:
            raise
        raise CheckpointError(f"{exc} {hint}") from exc


def info_model(
    model_name: str | None, checkpoint: Path | None, from_dir: Path | None
) -> tuple[str, nn.Module, tuple[torch.Tensor, ...] | None]:
    """The model ``edgeslim info`` describes: ``(name, module, example inputs or None)``;
    with ``from_dir`` the compressed model of that folder (quantizers in float mode: the
    table shows structure) and its recorded example inputs."""
    if from_dir is None:
        if model_name is None:
            raise EdgeslimError("name a model (zoo name or module:factory) or pass --from OUT_DIR")
        net = resolve_base(model_name, checkpoint, pretrained=False)
        bake_reparametrizations(net)  # the layers as compress sees them (its own instance)
        return model_name, net, None
    from edgeslim.artifacts import load_artifact

    if checkpoint is not None:
        raise EdgeslimError("give either --from or --checkpoint, not both")
    from edgeslim.export.verify import float_view

    artifact = load_artifact(from_dir)
    lineage = artifact.lineage
    name = model_name or lineage.spec or lineage.base_class or "model"
    return name, float_view(artifact.model), artifact.example_inputs
