"""``compress_model``: run a recipe on a model, then evaluate, export and report.

The uncompressed model is measured in the same run (metric, and latency in torch and in
ONNX Runtime in one process), so every record carries its own baseline.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any

from edgeslim.bench.records import Record, save_records
from edgeslim.bench.tasks import task_for
from edgeslim.checkpoint import save_state
from edgeslim.cost import compare_latency, ort_runner, size_bytes, torch_runner
from edgeslim.export import export_onnx, onnx_parity
from edgeslim.export.qdq import export_qdq
from edgeslim.graph import layer_table, total_macs
from edgeslim.quant.modules import QuantMixin
from edgeslim.recipe import STAGES, StageContext, load_recipe
from edgeslim.report import write_report
from edgeslim.runtime.ort import ort_session
from edgeslim.zoo import resolve_model

DATA_ORDER = ("none", "calibration", "train")


def compress_model(
    model_name: str,
    recipe_path: Path,
    out: Path,
    checkpoint: Path | None = None,
    quick: bool = False,
) -> list[Record]:
    """Apply ``recipe_path`` to ``model_name``; write model.onnx, weights, records, report."""
    recipe = load_recipe(recipe_path)  # validate before any heavy work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe_path, out / "recipe.yaml")
    base = resolve_model(model_name, checkpoint)
    task = task_for(model_name, quick)
    base_value = task.evaluate_torch(base)

    start = time.perf_counter()
    model = copy.deepcopy(base)
    ctx = StageContext(out=out, model_name=model_name, quick=quick)
    data_used = "none"
    for stage in recipe.stages:
        kind = STAGES[stage.kind]
        model = kind.handler(model, stage, ctx)
        if DATA_ORDER.index(kind.data_used) > DATA_ORDER.index(data_used):
            data_used = kind.data_used
    seconds = time.perf_counter() - start
    model.eval()
    value = task.evaluate_torch(model)
    save_state(model, out / "model.safetensors")

    example = task.example_args()
    feeds = task.latency_feeds()
    base_mod, comp_mod = task.export_module(base).eval(), task.export_module(model).eval()
    axes = {"input_names": task.input_names, "dynamic_axes": task.dynamic_axes()}
    base_path = export_onnx(base_mod, example, out / "baseline.onnx", **axes)  # type: ignore[arg-type]
    if any(isinstance(m, QuantMixin) for m in comp_mod.modules()):  # int8 QDQ graph
        comp_path = export_qdq(copy.deepcopy(comp_mod), example, out / "model.onnx", **axes)
    else:
        comp_path = export_onnx(comp_mod, example, out / "model.onnx", **axes)  # type: ignore[arg-type]
    parity = onnx_parity(comp_mod, comp_path, example)
    base_sess, comp_sess = ort_session(base_path), ort_session(comp_path)
    value_ort = task.evaluate_ort(comp_sess)
    names = [i.name for i in comp_sess.get_inputs()]
    np_feeds = {n: a.numpy() for n, a in zip(names, feeds, strict=False)}
    repeats = 10 if quick else 50
    lat = compare_latency(
        {
            "torch_base": torch_runner(base_mod, *feeds),
            "torch": torch_runner(comp_mod, *feeds),
            "ort_base": ort_runner(base_sess, np_feeds),
            "onnxruntime": ort_runner(comp_sess, np_feeds),
        },
        repeats=repeats,
    )
    macs = total_macs(layer_table(comp_mod, *(a[:1] for a in feeds)))
    quantized = {n: m for n, m in comp_mod.named_modules() if isinstance(m, QuantMixin)}
    w_bits = {n: m.qconfig.weight.bits for n, m in quantized.items() if m.qconfig.weight}
    config: dict[str, Any] = {}
    if w_bits:
        a_specs = [m.qconfig.activation for m in quantized.values() if m.qconfig.activation]
        config = {"w_bits": max(w_bits.values()), "a_bits": a_specs[0].bits if a_specs else 32}
    common: dict[str, Any] = {
        "suite": "compress",
        "model": model_name,
        "method": f"edgeslim:{recipe.name}",
        "config": config,
        "metric": task.metric,
        "baseline_value": round(base_value, 4),
        "params": sum(p.numel() for p in model.parameters()),
        "macs": macs,
        "size_bytes": size_bytes(comp_mod, w_bits),
        "seconds": round(seconds, 2),
        "data_used": data_used,
    }
    records = [
        Record(**common, value=round(value, 4), runtime="torch",
               latency_ms=round(lat["torch"].median_ms, 4),
               baseline_latency_ms=round(lat["torch_base"].median_ms, 4),
               extra={"notes": ctx.notes}),
        Record(**common, value=round(value_ort, 4), runtime="onnxruntime",
               latency_ms=round(lat["onnxruntime"].median_ms, 4),
               baseline_latency_ms=round(lat["ort_base"].median_ms, 4),
               extra={"onnx_max_abs_diff": parity.max_abs_diff, "notes": ctx.notes}),
    ]  # fmt: skip
    save_records(records, out / "results.json")
    write_report(records, out, title=f"edgeslim compress {model_name} ({recipe.name})")
    return records
