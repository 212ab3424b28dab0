"""Suite ``baseline``: every zoo model in fp32, in torch and in ONNX Runtime.

For each model: the metric on the real test data in both runtimes, ONNX output parity,
params, MACs, size and batch-1 (MiniLM: 32 x 128 tokens) latency measured in one process.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgeslim.bench.records import Record
from edgeslim.bench.suites import per_model, register_suite
from edgeslim.bench.tasks import ClassificationTask, task_for
from edgeslim.cost import compare_latency, ort_runner, size_bytes, torch_runner
from edgeslim.cost.analytic import peak_activation_bytes
from edgeslim.export import export_onnx, onnx_parity
from edgeslim.graph import layer_table, total_macs
from edgeslim.runtime.ort import ort_session
from edgeslim.zoo import ZOO, resolve_model

ALL_MODELS = [*ZOO, "minilm"]


def measure_fp32(name: str, out: Path, quick: bool, suite: str = "baseline") -> list[Record]:
    """Torch and ONNX Runtime records of one model in fp32."""
    start = time.perf_counter()
    model = resolve_model(name)
    task = task_for(name, quick)
    module = task.export_module(model).eval()
    example = task.example_args()
    feeds = task.latency_feeds()
    macs = total_macs(layer_table(module, *(a[:1] for a in feeds)))
    params = sum(p.numel() for p in model.parameters())
    size = size_bytes(model)
    value_torch = task.evaluate_torch(model)
    torch_seconds = time.perf_counter() - start

    t0 = time.perf_counter()
    path = export_onnx(
        module,
        example,
        out / "onnx" / f"{name}.onnx",
        input_names=task.input_names,
        dynamic_axes=task.dynamic_axes(),
    )
    parity = onnx_parity(module, path, example)
    session = ort_session(path)
    value_ort = task.evaluate_ort(session)
    ort_seconds = time.perf_counter() - t0

    feed_names = [i.name for i in session.get_inputs()]
    np_feeds = {n: a.numpy() for n, a in zip(feed_names, feeds, strict=False)}
    heavy = isinstance(task, ClassificationTask) is False
    repeats = (3 if heavy else 30) if quick else (10 if heavy else 200)
    lat = compare_latency(
        {"torch": torch_runner(module, *feeds), "onnxruntime": ort_runner(session, np_feeds)},
        warmup=1 if heavy else 10,
        repeats=repeats,
    )
    extra_common = {
        "onnx_max_abs_diff": parity.max_abs_diff,
        "latency_batch": int(feeds[0].shape[0]),
    }
    if isinstance(task, ClassificationTask):
        extra_common["peak_activation_bytes"] = peak_activation_bytes(model, example[0][:1])
        extra_common["target_top1"] = ZOO[name].target_top1
    records = []
    for runtime, value, seconds in (
        ("torch", value_torch, torch_seconds),
        ("onnxruntime", value_ort, ort_seconds),
    ):
        stats = lat[runtime]
        records.append(
            Record(
                suite=suite,
                model=name,
                method="edgeslim:fp32",
                config={"w_bits": 32, "a_bits": 32},
                metric=task.metric,
                value=round(value, 4),
                baseline_value=round(value_torch, 4),
                params=params,
                macs=macs,
                size_bytes=size,
                latency_ms=round(stats.median_ms, 4),
                baseline_latency_ms=round(stats.median_ms, 4),
                runtime=runtime,
                seconds=round(seconds, 2),
                data_used="none",
                extra={
                    **extra_common,
                    "latency_p10_ms": round(stats.p10_ms, 4),
                    "latency_p90_ms": round(stats.p90_ms, 4),
                    "latency_repeats": stats.repeats,
                },
            )
        )
    return records


@register_suite("baseline")
def baseline(out: Path, quick: bool, models: list[str] | None) -> list[Record]:
    progress = out / ("progress-quick.json" if quick else "progress.json")  # resume after a kill
    names = models or ALL_MODELS
    return per_model("baseline", names, lambda n: measure_fp32(n, out, quick), progress=progress)
