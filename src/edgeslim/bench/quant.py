"""Suite ``quant``: edgeslim PTQ against fp32 and peers, on the same model and data.

Per model (``resnet20`` and ``mobilenetv2-small`` by default), in one process:
- fp32 in torch and in ONNX Runtime;
- ``edgeslim:ptq`` W8A8, and W4A8 with MSE weight ranges and bias correction, exported as
  QDQ and run in ONNX Runtime;
- the peers ``onnxruntime:quantize_static`` and ``torch:fx_int8``;
- weight-only 3-bit ``pow2`` vs ``uniform``, fake-quant in torch (no shift kernel exists in
  either runtime, so no latency).

Latency is the median at batch 1 (``latency_ms``) and batch 32 (``extra.latency_b32_ms``),
every variant interleaved with its fp32 baseline. QAT rows (W4A4, W2A2/W1A1 with ste vs
aqe; see :mod:`edgeslim.bench.quant_qat`) are fine-tuned for one epoch on
``QAT_IMAGES`` training images and scored in torch. MiniLM rows: :mod:`edgeslim.bench.quant_text`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.bench.quant_qat import VARIANTS, QatVariant, qat_variant
from edgeslim.bench.records import Record
from edgeslim.bench.suites import per_model, register_suite
from edgeslim.bench.tasks import QUICK_TEST_IMAGES
from edgeslim.cost import compare_latency, ort_runner, size_bytes, torch_runner
from edgeslim.data import TensorBatches, load_fashion_mnist
from edgeslim.data.batching import augmented_batches
from edgeslim.export import export_onnx
from edgeslim.graph import layer_table, total_macs
from edgeslim.runtime.kernels import coverage_extra, kernel_coverage
from edgeslim.runtime.ort import ort_session, ort_top1
from edgeslim.train.loop import TrainConfig, evaluate
from edgeslim.zoo import load_zoo_model

QAT_IMAGES, QAT_IMAGES_QUICK = 5000, 512
QAT_CONFIG = TrainConfig(epochs=1, lr=0.001, batch_size=64)
DEFAULT_MODELS = ["resnet20", "mobilenetv2-small", "minilm"]
CALIBRATION = 256


def edgeslim_ptq(
    model: nn.Module,
    calib: torch.Tensor,
    w_bits: int,
    a_bits: int | None,
    observer: str,
    bias_correction: bool = False,
) -> nn.Module:
    """edgeslim's PTQ as benchmarked: per-channel weights, uint8 percentile activations."""
    from edgeslim.quant import QuantConfig, QuantSpec
    from edgeslim.quant.ptq import ptq

    act = None
    if a_bits is not None:
        act = QuantSpec(bits=a_bits, granularity="tensor", symmetric=False, observer="percentile")
    config = QuantConfig(QuantSpec(bits=w_bits, observer=observer), act)
    return ptq(model, config, calib, bias_correction=bias_correction)


def weight_only(model: nn.Module, quantizer: str, bits: int) -> nn.Module:
    from edgeslim.quant import QuantConfig, QuantSpec, quantize_

    m = copy.deepcopy(model).eval()
    quantize_(m, QuantConfig(QuantSpec(quantizer=quantizer, bits=bits, observer="minmax")))
    return m


def _quant_bits(model: nn.Module, bits: int) -> dict[str, int]:
    from edgeslim.quant.modules import QuantMixin

    return {n: bits for n, m in model.named_modules() if isinstance(m, QuantMixin)}


def quant_model(name: str, out: Path, quick: bool) -> list[Record]:
    from edgeslim.bench.peers import ort_quantize_static, torch_fx_int8
    from edgeslim.export.qdq import export_qdq

    fp32 = load_zoo_model(name)
    test = load_fashion_mnist("test", limit=QUICK_TEST_IMAGES if quick else None)
    calib = load_fashion_mnist("val", limit=CALIBRATION).images
    test_batches = TensorBatches(test.images, test.labels, 500)
    x1, x32 = test.images[:1].contiguous(), test.images[:32].contiguous()
    onnx_dir = out / "onnx"
    macs = total_macs(layer_table(fp32, x1))
    params = sum(p.numel() for p in fp32.parameters())
    fp32_top1 = evaluate(fp32, test_batches)
    fp32_path = export_onnx(fp32, (x1,), onnx_dir / f"{name}_fp32.onnx")

    variants: dict[str, dict[str, Any]] = {}

    def timed(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        row = fn()
        row["seconds"] = time.perf_counter() - t0
        variants[key] = row

    def ptq(bits: int, observer: str, bias_correction: bool = False) -> dict[str, Any]:
        gm = edgeslim_ptq(fp32, calib, bits, 8, observer, bias_correction)
        path = export_qdq(copy.deepcopy(gm), (x1,), onnx_dir / f"{name}_w{bits}a8.onnx")
        return {
            "method": "edgeslim:ptq", "runtime": "onnxruntime", "path": path,
            "config": {"w_bits": bits, "a_bits": 8, "estimator": "ste", "granularity": "channel"},
            "size": size_bytes(gm, _quant_bits(gm, bits)), "data_used": "calibration",
            "fake_quant": gm,
            "extra": {"observer": observer, "bias_correction": bias_correction},
        }  # fmt: skip

    timed("ptq_w8a8", lambda: ptq(8, "minmax"))
    timed("ptq_w4a8", lambda: ptq(4, "mse", bias_correction=True))

    def peer_ort() -> dict[str, Any]:
        path = ort_quantize_static(fp32_path, onnx_dir / f"{name}_ort_static.onnx", calib, "input")
        return {
            "method": "onnxruntime:quantize_static", "runtime": "onnxruntime", "path": path,
            "config": {"w_bits": 8, "a_bits": 8, "granularity": "channel"},
            "size": size_bytes(fp32, 8), "data_used": "calibration", "extra": {},
        }  # fmt: skip

    timed("ort_static", peer_ort)

    def peer_fx() -> dict[str, Any]:
        return {
            "method": "torch:fx_int8", "runtime": "torch", "module": torch_fx_int8(fp32, calib),
            "config": {"w_bits": 8, "a_bits": 8, "granularity": "channel"},
            "size": size_bytes(fp32, 8), "data_used": "calibration", "extra": {},
        }  # fmt: skip

    timed("fx_int8", peer_fx)
    for quantizer in ("pow2", "uniform"):

        def wonly(q: str = quantizer) -> dict[str, Any]:
            m = weight_only(fp32, q, 3)
            return {
                "method": f"edgeslim:ptq_{q}", "runtime": "torch", "module": m, "no_latency": True,
                "config": {"w_bits": 3, "granularity": "channel"},
                "size": size_bytes(m, _quant_bits(m, 3)), "data_used": "none", "extra": {},
            }  # fmt: skip

        timed(f"w3_{quantizer}", wonly)

    qat_split = load_fashion_mnist("train", limit=QAT_IMAGES_QUICK if quick else QAT_IMAGES)
    for variant in VARIANTS[:3] if quick else VARIANTS:  # quick: W4A4 and W2A2 ste/aqe

        def qat(v: QatVariant = variant) -> dict[str, Any]:
            train = augmented_batches(  # afresh per variant: each sees the same batches
                qat_split.images, qat_split.labels, QAT_CONFIG.batch_size, QAT_CONFIG.seed
            )
            res = qat_variant(fp32, v, calib, train, test_batches, QAT_CONFIG)
            return {
                "method": "edgeslim:qat", "runtime": "torch", "top1": res["top1"],
                "no_latency": True, "data_used": "train",
                "config": {"w_bits": v.w_bits, "a_bits": v.a_bits, "estimator": v.estimator,
                           "granularity": "channel"},
                "size": size_bytes(res["module"], _quant_bits(res["module"], v.w_bits)),
                "extra": res["extra"],
            }  # fmt: skip

        timed(variant.key, qat)

    sessions = {k: ort_session(v["path"]) for k, v in variants.items() if "path" in v}
    fp32_sess = ort_session(fp32_path)
    for key, sess in sessions.items():
        variants[key]["top1"] = ort_top1(sess, test.images, test.labels)
        if variants[key]["config"].get("a_bits") == 8:  # the share ONNX Runtime runs on ints
            cover = kernel_coverage(variants[key]["path"], (x1,))
            variants[key]["extra"] = {**variants[key]["extra"], **coverage_extra(cover)}
    for row in variants.values():
        if "module" in row:
            row["top1"] = evaluate(row["module"], test_batches)
        if "fake_quant" in row:  # the torch simulation, to check ONNX Runtime agrees with it
            fake_top1 = evaluate(row["fake_quant"], test_batches)
            row["extra"]["torch_fake_quant_top1"] = round(fake_top1, 4)
    fp32_ort_top1 = ort_top1(fp32_sess, test.images, test.labels)

    repeats = 30 if quick else 200
    lat: dict[int, dict[str, float]] = {}
    for batch, x in ((1, x1), (32, x32)):
        runners = {"ort_fp32": ort_runner(fp32_sess, {"input": x.numpy()})}
        runners |= {k: ort_runner(s, {"input": x.numpy()}) for k, s in sessions.items()}
        runners["torch_fp32"] = torch_runner(fp32, x)
        runners["fx_int8"] = torch_runner(variants["fx_int8"]["module"], x)
        reps = repeats if batch == 1 else max(20, repeats // 2)  # b32 calls are still cheap
        stats = compare_latency(runners, warmup=5, repeats=reps)
        lat[batch] = {k: v.median_ms for k, v in stats.items()}

    def record(method: str, runtime: str, value: float, size: int, seconds: float,
               config: dict[str, Any], data_used: str, key: str | None,
               extra: dict[str, Any]) -> Record:  # fmt: skip
        base = "ort_fp32" if runtime == "onnxruntime" else "torch_fp32"
        ex = dict(extra)
        ex["test_images"] = len(test)
        lat_ms = base_ms = None
        if key is not None:
            lat_ms, base_ms = round(lat[1][key], 4), round(lat[1][base], 4)
            ex |= {"latency_b32_ms": round(lat[32][key], 4),
                   "baseline_latency_b32_ms": round(lat[32][base], 4)}  # fmt: skip
        return Record(
            suite="quant", model=name, method=method, config=config, metric="top1",
            value=round(value, 4), baseline_value=round(fp32_top1, 4), params=params, macs=macs,
            size_bytes=size, latency_ms=lat_ms, baseline_latency_ms=base_ms, runtime=runtime,
            seconds=round(seconds, 2), data_used=data_used, extra=ex,
        )  # fmt: skip

    fp_cfg = {"w_bits": 32, "a_bits": 32}
    size32 = size_bytes(fp32)
    records = [
        record("edgeslim:fp32", rt, top1, size32, 0.0, fp_cfg, "none", key, {})
        for rt, top1, key in (
            ("torch", fp32_top1, "torch_fp32"),
            ("onnxruntime", fp32_ort_top1, "ort_fp32"),
        )
    ]
    for key, row in variants.items():
        lat_key = None if row.get("no_latency") else key
        records.append(
            record(
                row["method"],
                row["runtime"],
                row["top1"],
                row["size"],
                row["seconds"],
                row["config"],
                row["data_used"],
                lat_key,
                row["extra"],
            )
        )
    return records


@register_suite("quant")
def quant_suite(out: Path, quick: bool, models: list[str] | None) -> list[Record]:
    from edgeslim.bench.quant_text import quant_minilm

    def measure(name: str) -> list[Record]:
        return quant_minilm(out, quick) if name == "minilm" else quant_model(name, out, quick)

    progress = out / ("progress-quick.json" if quick else "progress.json")  # resume after a kill
    return per_model("quant", models or DEFAULT_MODELS, measure, progress=progress)
