"""Suite ``operators``: the layers real edge models use, quantized, pruned and repaired.

Per model (``mobilenetv3-small``: hardswish and squeeze-excite; ``prelu-cnn``: PReLU, no
BatchNorm; ``conv-lstm``: Conv1d + LSTM), Fashion-MNIST, in one process:

- fp32 and ``edgeslim:ptq`` W8A8 in ONNX Runtime, with the peer
  ``onnxruntime:quantize_static`` on the same calibration images; every int8 record carries
  ``int8_mac_share`` (MACs ONNX Runtime runs in integer kernels, read from its optimised
  graph) and ``agreement_with_fp32`` (argmax agreement with the fp32 file on the test
  images); latency is the median at batch 1, 2 threads, the int8 files interleaved with
  the fp32 file in one :func:`~edgeslim.cost.compare_latency` call;
- data-free rows (:func:`edgeslim.bench.datafree.datafree_model`): RTN and DFQ at W8 and W4,
  DF-MPC at 3/8 bits, UDFC at 30% MACs, each with the method's report (what it changed or
  why not) in ``extra``; the CNNs only (no data-free method covers an LSTM); RTN and DFQ
  W8A8 also exported as the ``datafree`` stage exports them and run in ONNX Runtime
  (:func:`datafree_ort_rows`: latency against fp32, ``int8_mac_share``);
- pruning rows (:func:`edgeslim.bench.prune.prune_model`): 30% MACs with edgeslim's l1
  criterion and the peer Torch-Pruning, before and after the prune suite's short fine-tune;
  ``extra.macs_reduction`` is the reduction reached.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeslim.bench.quant import CALIBRATION, _quant_bits, edgeslim_ptq
from edgeslim.bench.suites import per_model, register_suite
from edgeslim.bench.tasks import QUICK_TEST_IMAGES
from edgeslim.cost import compare_latency, ort_runner, size_bytes
from edgeslim.data import load_fashion_mnist
from edgeslim.export import export_onnx
from edgeslim.graph import example_like, layer_table, total_macs
from edgeslim.records import Record
from edgeslim.runtime.kernels import coverage_extra, kernel_coverage
from edgeslim.runtime.ort import ort_predict, ort_session
from edgeslim.zoo import load_zoo_model

DEFAULT_MODELS = ["mobilenetv3-small", "prelu-cnn", "conv-lstm"]
CNNS = ("mobilenetv3-small", "prelu-cnn")
PRUNE_TARGET = 0.3


def _datafree_rows() -> list[Any]:
    from edgeslim.bench.datafree import Config
    from edgeslim.datafree import DataFreeSpec

    return [
        Config("rtn", DataFreeSpec(low_bits=8, high_bits=8)),
        Config("dfq", DataFreeSpec(low_bits=8, high_bits=8)),
        Config("rtn", DataFreeSpec(low_bits=4, high_bits=4)),
        Config("dfq", DataFreeSpec(low_bits=4, high_bits=4)),
        Config("rtn", DataFreeSpec(low_bits=3, high_bits=8)),
        Config("dfmpc", DataFreeSpec(low_bits=3, high_bits=8)),
        Config("udfc", DataFreeSpec(low_bits=8, high_bits=8, prune_ratio=PRUNE_TARGET)),
    ]


def int8_rows(name: str, out: Path, quick: bool) -> list[Record]:
    """fp32, edgeslim W8A8 and the ONNX Runtime peer, in ONNX Runtime (see module doc)."""
    from edgeslim.bench.peers import ort_quantize_static
    from edgeslim.export.qdq import export_qdq

    fp32 = load_zoo_model(name)
    test = load_fashion_mnist("test", limit=QUICK_TEST_IMAGES if quick else None)
    calib = load_fashion_mnist("val", limit=CALIBRATION).images
    x1 = test.images[:1].contiguous()
    onnx_dir = out / "onnx"
    macs = total_macs(layer_table(fp32, x1))
    fp32_path = export_onnx(fp32, (x1,), onnx_dir / f"{name}_fp32.onnx")
    t0 = time.perf_counter()
    gm = edgeslim_ptq(fp32, calib, 8, 8, "minmax")
    ours = export_qdq(gm, (x1,), onnx_dir / f"{name}_w8a8.onnx")
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer = ort_quantize_static(fp32_path, onnx_dir / f"{name}_ort_static.onnx", calib, "input")
    peer_s = time.perf_counter() - t0
    paths = {"fp32": fp32_path, "ours": ours, "peer": peer}
    sessions = {k: ort_session(p) for k, p in paths.items()}
    logits = {k: ort_predict(s, test.images) for k, s in sessions.items()}
    labels = test.labels
    top1 = {k: 100.0 * float((v.argmax(1) == labels).float().mean()) for k, v in logits.items()}
    lat = compare_latency(
        {k: ort_runner(s, {"input": x1.numpy()}) for k, s in sessions.items()},
        warmup=10,
        repeats=50 if quick else 300,
    )
    ms = {k: round(v.median_ms, 4) for k, v in lat.items()}

    def record(method: str, key: str, config: dict[str, Any], size: int, seconds: float,
               data_used: str, extra: dict[str, Any]) -> Record:  # fmt: skip
        return Record(
            suite="operators", model=name, method=method, config=config, metric="top1",
            value=round(top1[key], 4), baseline_value=round(top1["fp32"], 4),
            params=sum(p.numel() for p in fp32.parameters()), macs=macs, size_bytes=size,
            latency_ms=ms[key], baseline_latency_ms=ms["fp32"], runtime="onnxruntime",
            seconds=round(seconds, 2), data_used=data_used,
            extra={"test_images": len(test), **extra},
        )  # fmt: skip

    def int8_extra(key: str) -> dict[str, Any]:
        agree = (logits[key].argmax(1) == logits["fp32"].argmax(1)).float().mean()
        cover = kernel_coverage(paths[key], (x1,))
        return {
            "agreement_with_fp32": round(100.0 * float(agree), 4),
            "speedup_vs_fp32": round(ms["fp32"] / ms[key], 3),
            **coverage_extra(cover),
        }

    w8a8 = {"w_bits": 8, "a_bits": 8, "granularity": "channel"}
    return [
        record("edgeslim:fp32", "fp32", {"w_bits": 32, "a_bits": 32}, size_bytes(fp32), 0.0,
               "none", {}),
        record("edgeslim:ptq", "ours", w8a8, size_bytes(gm, _quant_bits(gm, 8)), ours_s,
               "calibration", {**int8_extra("ours"), "calibration_images": len(calib)}),
        record("onnxruntime:quantize_static", "peer", w8a8, size_bytes(fp32, 8), peer_s,
               "calibration", {**int8_extra("peer"), "calibration_images": len(calib)}),
    ]  # fmt: skip


def datafree_rows(name: str, quick: bool) -> list[Record]:
    from edgeslim.bench.datafree import datafree_model

    records = datafree_model(
        name, quick, _datafree_rows(), test_images=QUICK_TEST_IMAGES if quick else None
    )
    return [r.model_copy(update={"suite": "operators"}) for r in records[1:]]  # no 2nd fp32


DATAFREE_ORT = ("rtn", "dfq")  # W8A8, ranges from the BN (or estimated) statistics


def datafree_ort_rows(name: str, out: Path, quick: bool) -> list[Record]:
    """RTN and DFQ W8A8 exported as QDQ and run in ONNX Runtime, as the ``datafree`` recipe
    stage exports them (``act_ranges: statistics``), timed against the fp32 file in one
    :func:`~edgeslim.cost.compare_latency` call. Why: a data-free int8 file is only worth
    shipping if ONNX Runtime runs it on integer kernels; a BN-free model's ranges come from
    estimated statistics, and until 2026-12-04 its file ran in float (``int8_mac_share``)."""
    from edgeslim.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from edgeslim.datafree import DataFreeSpec, compress_datafree, quantized_model
    from edgeslim.export.qdq import export_qdq
    from edgeslim.task.builtin import normalised_range

    fp32 = load_zoo_model(name).eval()
    test = load_fashion_mnist("test", limit=QUICK_TEST_IMAGES if quick else None)
    x1 = test.images[:1].contiguous()  # the export's example: no image reaches the methods
    onnx_dir = out / "onnx"
    fp32_path = export_onnx(fp32, (x1,), onnx_dir / f"{name}_fp32.onnx")
    input_range = normalised_range(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    spec = DataFreeSpec(low_bits=8, high_bits=8, edge_bits=8)
    paths: dict[str, Path] = {"fp32": fp32_path}
    done: dict[str, Any] = {}
    for method in DATAFREE_ORT:
        result = compress_datafree(fp32, method, spec, example_like(x1), input_range)
        model = quantized_model(result, 8, "statistics", edges=True).eval()
        paths[method] = export_qdq(model, (x1,), onnx_dir / f"{name}_{method}_w8a8.onnx")
        done[method] = result
    sessions = {k: ort_session(p) for k, p in paths.items()}
    logits = {k: ort_predict(s, test.images) for k, s in sessions.items()}
    top1 = {
        k: 100.0 * float((v.argmax(1) == test.labels).float().mean()) for k, v in logits.items()
    }
    lat = compare_latency(
        {k: ort_runner(s, {"input": x1.numpy()}) for k, s in sessions.items()},
        warmup=10,
        repeats=50 if quick else 300,
    )
    macs = total_macs(layer_table(fp32, x1))
    records = []
    for method, result in done.items():
        agree = (logits[method].argmax(1) == logits["fp32"].argmax(1)).float().mean()
        cover = kernel_coverage(paths[method], (x1,))
        records.append(
            Record(
                suite="operators", model=name, method=f"edgeslim:{method}",
                config={"method": method, "w_bits": 8, "a_bits": 8, "act_ranges": "statistics"},
                metric="top1", value=round(top1[method], 4), baseline_value=round(top1["fp32"], 4),
                params=sum(p.numel() for p in fp32.parameters()), macs=macs,
                size_bytes=size_bytes(result.model, result.weight_bits),
                latency_ms=round(lat[method].median_ms, 4),
                baseline_latency_ms=round(lat["fp32"].median_ms, 4), runtime="onnxruntime",
                seconds=round(result.seconds, 2), data_used="none",
                extra={"test_images": len(test), "notes": list(result.notes),
                       "agreement_with_fp32": round(100.0 * float(agree), 4),
                       "speedup_vs_fp32": round(lat["fp32"].median_ms / lat[method].median_ms, 3),
                       **coverage_extra(cover)},
            )
        )  # fmt: skip
    return records


def prune_rows(name: str, out: Path, quick: bool) -> list[Record]:
    """edgeslim l1 and the peer at ``PRUNE_TARGET``. A peer that raises on the model is
    measured without, and its error is written into edgeslim's records
    (``extra.peer_failed``), never hidden."""
    from edgeslim.bench.prune import METHODS, prune_model

    ours, peer = "edgeslim:l1", "torch-pruning:magnitude"
    failed: dict[str, str] = {}

    def guarded(model: Any, job: Any) -> Any:
        try:
            return METHODS[peer](model, job)
        except Exception as exc:
            failed[peer] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            raise

    try:
        records = prune_model(
            name, out, quick, methods={ours: METHODS[ours], peer: guarded},
            targets=(PRUNE_TARGET,),
        )  # fmt: skip
    except Exception:
        if not failed:
            raise
        records = prune_model(
            name, out, quick, methods={ours: METHODS[ours]}, targets=(PRUNE_TARGET,)
        )
    note = {"peer_failed": dict(failed)} if failed else {}
    kept = [r for r in records if r.method != "edgeslim:fp32"]  # fp32 is in the int8 rows
    return [r.model_copy(update={"suite": "operators", "extra": {**r.extra, **note}}) for r in kept]


def operators_model(name: str, out: Path, quick: bool) -> list[Record]:
    """Every record of one model (see the module docstring)."""
    torch.manual_seed(0)
    np.random.seed(0)
    records = int8_rows(name, out, quick)
    if name in CNNS:
        records += datafree_rows(name, quick) + datafree_ort_rows(name, out, quick)
    return records + prune_rows(name, out, quick)


@register_suite("operators")
def operators_suite(out: Path, quick: bool, models: list[str] | None) -> list[Record]:
    return per_model(
        "operators",
        models or DEFAULT_MODELS,
        lambda name: operators_model(name, out, quick),
        progress=out / "operators.progress.json",
    )
