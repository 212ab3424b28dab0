"""Suite ``prune_quant``: pruning and quantization composed, beside each alone.

For ``resnet20`` (and any zoo CNN with a shipped pruned model ``<name>-pruned50``), in one
process, all in ONNX Runtime at batch 1 and interleaved for latency:

- fp32;
- ``edgeslim:ptq`` W8A8 (the ``quant`` suite's configuration, QDQ export);
- ``edgeslim:pruned``: the shipped pruned-and-fine-tuned model, fp32
  (see :mod:`edgeslim.zoo.pruned`; its card holds the command that made it);
- ``edgeslim:pruned+ptq``: that pruned model, then W8A8 PTQ.

This is what ``make demo`` shows last; the shipped pruned model keeps the demo short.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from torch import nn

from edgeslim.bench.records import Record
from edgeslim.bench.suites import per_model, register_suite
from edgeslim.bench.tasks import QUICK_TEST_IMAGES
from edgeslim.cost import compare_latency, ort_runner, size_bytes
from edgeslim.data import load_fashion_mnist
from edgeslim.export import export_onnx
from edgeslim.graph import layer_table, total_macs
from edgeslim.runtime.kernels import coverage_extra, kernel_coverage
from edgeslim.runtime.ort import ort_session, ort_top1
from edgeslim.zoo import load_card, load_zoo_model

DEFAULT_MODELS = ["resnet20"]
PRUNED_SUFFIX = "-pruned50"


def prune_quant_model(name: str, out: Path, quick: bool) -> list[Record]:
    """The four rows of one model (see the module docstring)."""
    from edgeslim.bench.quant import CALIBRATION, _quant_bits, edgeslim_ptq
    from edgeslim.export.qdq import export_qdq
    from edgeslim.zoo.pruned import load_pruned_zoo_model

    test = load_fashion_mnist("test", limit=QUICK_TEST_IMAGES if quick else None)
    calib = load_fashion_mnist("val", limit=CALIBRATION).images
    x1 = test.images[:1].contiguous()
    onnx_dir = out / "onnx"
    pruned_name = f"{name}{PRUNED_SUFFIX}"
    models = {"fp32": load_zoo_model(name), "pruned": load_pruned_zoo_model(pruned_name)}
    card = load_card(pruned_name)
    rows: dict[str, dict[str, Any]] = {}
    for kind, model in models.items():
        macs = total_macs(layer_table(model, x1))
        path = export_onnx(model, (x1,), onnx_dir / f"{name}_{kind}.onnx")
        rows[kind] = {"model": model, "path": path, "macs": macs, "seconds": 0.0,
                      "size": size_bytes(model), "bits": 32}  # fmt: skip
        t0 = time.perf_counter()
        q = edgeslim_ptq(model, calib, 8, 8, "minmax")
        qpath = export_qdq(copy.deepcopy(q), (x1,), onnx_dir / f"{name}_{kind}_w8a8.onnx")
        rows[f"{kind}+ptq"] = {"model": model, "path": qpath, "macs": macs, "bits": 8,
                               "seconds": time.perf_counter() - t0,
                               "size": size_bytes(q, _quant_bits(q, 8))}  # fmt: skip
    sessions = {k: ort_session(r["path"]) for k, r in rows.items()}
    lat = compare_latency(
        {k: ort_runner(s, {"input": x1.numpy()}) for k, s in sessions.items()},
        warmup=5,
        repeats=50 if quick else 200,
    )
    top1 = {k: ort_top1(s, test.images, test.labels) for k, s in sessions.items()}
    methods = {"fp32": "edgeslim:fp32", "fp32+ptq": "edgeslim:ptq",
               "pruned": "edgeslim:pruned", "pruned+ptq": "edgeslim:pruned+ptq"}  # fmt: skip
    records = []
    for key, row in rows.items():
        module: nn.Module = row["model"]
        pruned = key.startswith("pruned")
        config = {"macs_reduction": card["macs_reduction"] if pruned else 0.0,
                  "w_bits": row["bits"], "a_bits": row["bits"]}  # fmt: skip
        extra: dict[str, Any] = {"test_images": len(test)}
        if row["bits"] == 8:  # the share of MACs ONNX Runtime runs in integer kernels
            extra |= coverage_extra(kernel_coverage(row["path"], (x1,)))
        if pruned:
            extra |= {"pruned_model": pruned_name, "pruned_by": card["command"]}
        data_used = "train" if pruned else ("calibration" if row["bits"] == 8 else "none")
        record = Record(
            suite="prune_quant",
            model=name,
            method=methods[key],
            config=config,
            metric="top1",
            value=round(top1[key], 4),
            baseline_value=round(top1["fp32"], 4),
            params=sum(p.numel() for p in module.parameters()),
            macs=row["macs"],
            size_bytes=row["size"],
            latency_ms=round(lat[key].median_ms, 4),
            baseline_latency_ms=round(lat["fp32"].median_ms, 4),
            runtime="onnxruntime",
            seconds=round(row["seconds"], 2),
            data_used=data_used,
            extra=extra,
        )
        records.append(record)
    return records


@register_suite("prune_quant")
def prune_quant_suite(out: Path, quick: bool, models: list[str] | None) -> list[Record]:
    return per_model(
        "prune+quant", models or DEFAULT_MODELS, lambda n: prune_quant_model(n, out, quick)
    )
