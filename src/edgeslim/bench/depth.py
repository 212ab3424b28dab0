"""Suite ``depth``: residual branches removed whole against channel pruning, same MACs.

On ``resnet20`` (Fashion-MNIST), in one process, with the ``prune`` suite's pruning,
fine-tune and export (:func:`edgeslim.bench.prune.prune_variants`: one epoch of KD from the
fp32 model on 5,000 augmented training images, the whole test split):

- ``edgeslim:depth``: :func:`edgeslim.prune.depth.depth_prune_` at MACs-reduction targets
  of 10%, 20% and 30% (whole branches, so it reaches a little more);
- ``edgeslim:l1``: channel pruning (global l1 ranking, widths rounded to 8) asked for the
  reduction depth pruning reached, so both remove the same MACs;
- each fine-tuned model and the fp32 one in ONNX Runtime as float and as W8A8 (edgeslim
  PTQ, the ``quant`` suite's settings; 7-bit weights on an x86 without VNNI, whose int8
  kernels would saturate full-range ones), every file timed interleaved in one run.

Why: where per-node overhead sets latency (ONNX Runtime's int8 kernels on a small
network), removing a block removes every node it ran, while narrowing channels keeps them.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from torch import nn

from edgeslim.bench.prune import (
    FINETUNE,
    FINETUNE_IMAGES,
    KD_ALPHA,
    QUICK_FINETUNE_IMAGES,
    ROUND_TO,
    PruneJob,
    edgeslim_method,
    prune_variants,
)
from edgeslim.bench.records import Record
from edgeslim.bench.suites import per_model, register_suite
from edgeslim.bench.tasks import QUICK_TEST_IMAGES
from edgeslim.cost import compare_latency, ort_runner, size_bytes
from edgeslim.data import load_fashion_mnist
from edgeslim.data.batching import augmented_batches
from edgeslim.export import export_onnx
from edgeslim.graph import layer_table, total_macs
from edgeslim.runtime.kernels import coverage_extra, kernel_coverage
from edgeslim.runtime.machine import int8_weight_bits
from edgeslim.runtime.ort import ort_session, ort_top1
from edgeslim.zoo import load_zoo_model

MODEL = "resnet20"
TARGETS = (0.1, 0.2, 0.3)
QUICK_TARGETS = (0.2,)
DEPTH = "edgeslim:depth"


def _depth(model: nn.Module, job: PruneJob) -> nn.Module:
    from edgeslim.prune.depth import depth_prune_

    pruned, removed, _ = depth_prune_(
        copy.deepcopy(model).eval(), (job.example,), job.train_batches(), job.macs_reduction
    )
    job.info["removed"] = removed
    return pruned


def depth_model(name: str, out: Path, quick: bool) -> list[Record]:
    """Every row of one model (see the module doc)."""
    from edgeslim.bench.quant import CALIBRATION, _quant_bits, edgeslim_ptq
    from edgeslim.export.qdq import export_qdq

    test = load_fashion_mnist("test", limit=QUICK_TEST_IMAGES if quick else None)
    train = load_fashion_mnist("train", limit=QUICK_FINETUNE_IMAGES if quick else FINETUNE_IMAGES)
    calib = load_fashion_mnist("val", limit=CALIBRATION).images
    x1 = test.images[:1].contiguous()
    onnx_dir = out / "onnx"
    fp32 = load_zoo_model(name).eval()
    batches = augmented_batches(train.images, train.labels, FINETUNE.batch_size, FINETUNE.seed)

    def job_for(target: float) -> PruneJob:
        return PruneJob(name, target, ROUND_TO, x1, batches, FINETUNE)

    variants = prune_variants(
        name, fp32, test, job_for, {DEPTH: _depth}, QUICK_TARGETS if quick else TARGETS, onnx_dir
    )
    reached = tuple(sorted({float(v.extra["macs_reduction"]) for v in variants}))
    variants += prune_variants(
        name, fp32, test, job_for, {"edgeslim:l1": edgeslim_method("l1")}, reached, onnx_dir
    )
    w_bits = int8_weight_bits()
    rows: dict[str, dict[str, Any]] = {}
    models: list[tuple[str, nn.Module, dict[str, Any]]] = [("fp32", fp32, {})]
    models += [(f"v{i}", v.tuned, {"variant": v}) for i, v in enumerate(variants)]
    for key, model, info in models:
        fpath = export_onnx(model, (x1,), onnx_dir / f"{name}_depth_{key}.onnx")
        t0 = time.perf_counter()
        q = edgeslim_ptq(model, calib, w_bits, 8, "minmax")
        qpath = export_qdq(copy.deepcopy(q), (x1,), onnx_dir / f"{name}_depth_{key}_w8a8.onnx")
        ptq_s = time.perf_counter() - t0
        base = {"model": model, "macs": total_macs(layer_table(model, x1)), **info}
        rows[key] = {**base, "path": fpath, "bits": 32, "size": size_bytes(model), "ptq_s": 0.0}
        rows[f"{key}_q"] = {**base, "path": qpath, "bits": 8, "ptq_s": ptq_s,
                            "size": size_bytes(q, _quant_bits(q, w_bits))}  # fmt: skip
    sessions = {k: ort_session(r["path"]) for k, r in rows.items()}
    lat = compare_latency(
        {k: ort_runner(s, {"input": x1.numpy()}) for k, s in sessions.items()},
        warmup=5, repeats=30 if quick else 200,
    )  # fmt: skip
    top1 = {k: ort_top1(s, test.images, test.labels) for k, s in sessions.items()}
    records = []
    for key, row in rows.items():
        v = row.get("variant")
        quantized = row["bits"] == 8
        method = "edgeslim:fp32" if v is None else v.method
        if quantized:
            method += "+ptq"
        config: dict[str, Any] = {
            "macs_reduction": 0.0 if v is None else v.target,
            "w_bits": w_bits if quantized else 32, "a_bits": 8 if quantized else 32,
        }  # fmt: skip
        extra: dict[str, Any] = {"test_images": len(test)}
        if v is not None:
            config["finetune_epochs"] = FINETUNE.epochs
            extra |= {**v.extra, "finetune_images": len(train), "kd_alpha": KD_ALPHA,
                      "top1_before_finetune": round(v.top1, 4),
                      "torch_top1": round(v.tuned_top1, 4)}  # fmt: skip
        if quantized:
            extra |= coverage_extra(kernel_coverage(row["path"], (x1,)))
        seconds = row["ptq_s"] + (0.0 if v is None else v.prune_seconds + v.finetune_seconds)
        data_used = "train" if v is not None else "calibration" if quantized else "none"
        records.append(
            Record(
                suite="depth",
                model=name,
                method=method,
                config=config,
                metric="top1",
                value=round(top1[key], 4),
                baseline_value=round(top1["fp32"], 4),
                params=sum(p.numel() for p in row["model"].parameters()),
                macs=row["macs"],
                size_bytes=row["size"],
                latency_ms=round(lat[key].median_ms, 4),
                baseline_latency_ms=round(lat["fp32"].median_ms, 4),
                runtime="onnxruntime",
                seconds=round(seconds, 2),
                data_used=data_used,
                extra=extra,
            )
        )
    return records


@register_suite("depth")
def depth_suite(out: Path, quick: bool, models: list[str] | None) -> list[Record]:
    return per_model("depth", models or [MODEL], lambda n: depth_model(n, out, quick))
