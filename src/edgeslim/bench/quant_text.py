"""The ``quant`` suite on MiniLM: sentence-embedding cosine to fp32, ONNX Runtime latency.

Rows, all on the same sentences in one process:
- fp32 in torch and ONNX Runtime;
- ``edgeslim:ptq`` W8A8: SmoothQuant (alpha picked on calibration sentences, never the
  test ones) + int8 per-channel weights + dynamic uint8 activations, run in ONNX Runtime's
  fused ``DynamicQuantizeMatMul`` kernels;
- ``edgeslim:ptq`` W8A8 with per-token activations (torch fake-quant: no ORT kernel);
- ``edgeslim:ptq`` W4 weight-only in ``MatMulNBits`` (4-bit codes packed two per byte);
- peers ``onnxruntime:quantize_dynamic`` (its defaults, and with ``per_channel=True``)
  and ``torch:quantize_dynamic`` (qint8 ``nn.Linear``).

Latency is the median over repeats of one batch of 32 sentences padded to 128 tokens,
interleaved with the fp32 baseline of the same runtime.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.bench.records import Record
from edgeslim.bench.tasks import EmbeddingTask
from edgeslim.cost import compare_latency, ort_runner, size_bytes, torch_runner
from edgeslim.export import export_onnx
from edgeslim.graph import layer_table, total_macs
from edgeslim.quant.config import Selection
from edgeslim.zoo.minilm import mean_cosine

ALPHAS = (0.5, 0.6, 0.75)
CALIB_SENTENCES = 64
SKIP: Selection = {"pooler.dense": None}  # the pooler is not part of the sentence embedding


def _calibration(task: EmbeddingTask) -> list[dict[str, torch.Tensor]]:
    """Sentences after the test ones, in batches of 16."""
    from edgeslim.data import load_sentences
    from edgeslim.zoo.minilm import tokenize

    sentences = load_sentences(task.n_sentences + CALIB_SENTENCES)[task.n_sentences :]
    return [tokenize(sentences[i : i + 16], task.max_length) for i in range(0, len(sentences), 16)]


def _embed(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    from edgeslim.zoo.minilm import MiniLMEmbedder

    module = MiniLMEmbedder(model).eval()
    with torch.no_grad():
        return torch.cat([module(b["input_ids"], b["attention_mask"]) for b in batches])


def pick_alpha(
    fp32: nn.Module, calib: list[dict[str, torch.Tensor]], per_token: bool = False
) -> tuple[nn.Module, float, dict[float, float]]:
    """The SmoothQuant alpha with the best calibration-sentence cosine, and its model."""
    from edgeslim.quant import w8a8_dynamic
    from edgeslim.quant.ptq import ptq_transformer

    ref = _embed(fp32, calib)
    best: tuple[float, float, nn.Module] | None = None
    scores: dict[float, float] = {}
    for alpha in ALPHAS:
        m = ptq_transformer(fp32, w8a8_dynamic(per_token), calib, alpha=alpha, select=SKIP)
        scores[alpha] = round(mean_cosine(_embed(m, calib), ref), 5)
        if best is None or scores[alpha] > best[0]:
            best = (scores[alpha], alpha, m)
    assert best is not None
    return best[2], best[1], scores


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic``: qint8 weights, dynamic activations."""
    import copy

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8
        )


def ort_quantize_dynamic(fp32_onnx: Path, out: Path, per_channel: bool) -> Path:
    """``onnxruntime.quantization.quantize_dynamic`` with int8 weights."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" notice
    quantize_dynamic(str(fp32_onnx), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    return out


def quant_minilm(out: Path, quick: bool) -> list[Record]:
    from edgeslim.export.integer_linear import export_integer_linear
    from edgeslim.quant import w4_weight_only
    from edgeslim.quant.ptq import ptq_transformer
    from edgeslim.runtime.ort import ort_session
    from edgeslim.zoo.minilm import MiniLMEmbedder, load_minilm

    name = "minilm"
    task = EmbeddingTask(n_sentences=64 if quick else 256)
    fp32 = load_minilm()
    fp32_value = task.evaluate_torch(fp32)  # sets the fp32 reference embeddings
    calib = _calibration(task)
    onnx_dir = out / "onnx"
    export_kw: dict[str, Any] = {
        "input_names": task.input_names, "dynamic_axes": task.dynamic_axes()
    }  # fmt: skip
    example = task.example_args()
    fp32_path = export_onnx(
        MiniLMEmbedder(fp32), example, onnx_dir / f"{name}_fp32.onnx", **export_kw
    )
    linear_bits = {
        n: 8 for n, m in fp32.named_modules() if isinstance(m, nn.Linear) and n not in SKIP
    }
    params = sum(p.numel() for p in fp32.parameters())
    feeds = task.latency_feeds()
    macs = total_macs(layer_table(MiniLMEmbedder(fp32), *(a[:1] for a in feeds)))
    rows: dict[str, dict[str, Any]] = {}

    def timed(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        row = fn()
        row["seconds"] = time.perf_counter() - t0
        rows[key] = row

    def w8a8() -> dict[str, Any]:
        model, alpha, scores = pick_alpha(fp32, calib)
        path, _ = export_integer_linear(
            MiniLMEmbedder(model), example, onnx_dir / f"{name}_w8a8.onnx", **export_kw
        )
        return {
            "method": "edgeslim:ptq", "runtime": "onnxruntime", "path": path,
            "config": {"w_bits": 8, "a_bits": 8, "granularity": "channel"},
            "size": size_bytes(fp32, linear_bits), "data_used": "calibration",
            "extra": {"activations": "dynamic per-tensor uint8", "smoothquant_alpha": alpha,
                      "alpha_calibration_cosine": scores,
                      "torch_fake_quant_cosine": round(task.evaluate_torch(model), 5)},
        }  # fmt: skip

    def w8a8_token() -> dict[str, Any]:
        model, alpha, scores = pick_alpha(fp32, calib, per_token=True)
        return {
            "method": "edgeslim:ptq", "runtime": "torch", "module": model, "no_latency": True,
            "config": {"w_bits": 8, "a_bits": 8, "granularity": "channel"},
            "size": size_bytes(fp32, linear_bits), "data_used": "calibration",
            "extra": {"activations": "dynamic per-token int8 (fake-quant; no ORT kernel)",
                      "smoothquant_alpha": alpha, "alpha_calibration_cosine": scores},
        }  # fmt: skip

    def w4() -> dict[str, Any]:
        model = ptq_transformer(fp32, w4_weight_only(32), select=SKIP)
        path, _ = export_integer_linear(
            MiniLMEmbedder(model), example, onnx_dir / f"{name}_w4.onnx", **export_kw
        )
        return {
            "method": "edgeslim:ptq", "runtime": "onnxruntime", "path": path,
            "config": {"w_bits": 4, "granularity": "group", "group_size": 32},
            "size": size_bytes(fp32, {n: 4 for n in linear_bits}), "data_used": "none",
            "extra": {"kernel": "com.microsoft.MatMulNBits",
                      "torch_fake_quant_cosine": round(task.evaluate_torch(model), 5)},
        }  # fmt: skip

    def ort_dyn(per_channel: bool) -> dict[str, Any]:
        tag = "pc" if per_channel else "default"
        path = ort_quantize_dynamic(
            fp32_path, onnx_dir / f"{name}_ort_dynamic_{tag}.onnx", per_channel
        )
        gran = "channel" if per_channel else "tensor"
        return {
            "method": "onnxruntime:quantize_dynamic", "runtime": "onnxruntime", "path": path,
            "config": {"w_bits": 8, "a_bits": 8, "granularity": gran},
            "size": size_bytes(fp32, linear_bits), "data_used": "none", "extra": {},
        }  # fmt: skip

    def torch_dyn() -> dict[str, Any]:
        return {
            "method": "torch:quantize_dynamic", "runtime": "torch",
            "module": torch_dynamic_int8(fp32),
            "config": {"w_bits": 8, "a_bits": 8, "granularity": "tensor"},
            "size": size_bytes(fp32, linear_bits), "data_used": "none", "extra": {},
        }  # fmt: skip

    timed("ptq_w8a8", w8a8)
    timed("ptq_w8a8_token", w8a8_token)
    timed("ptq_w4", w4)
    timed("ort_dynamic", lambda: ort_dyn(False))
    timed("ort_dynamic_pc", lambda: ort_dyn(True))
    timed("torch_dynamic", torch_dyn)

    fp32_sess = ort_session(fp32_path)
    sessions = {k: ort_session(r["path"]) for k, r in rows.items() if "path" in r}
    fp32_ort_value = task.evaluate_ort(fp32_sess)
    for key, row in rows.items():
        row["value"] = (
            task.evaluate_ort(sessions[key])
            if key in sessions
            else task.evaluate_torch(row["module"])
        )

    np_feeds = {n: a.numpy() for n, a in zip(task.input_names, feeds, strict=True)}
    runners = {"ort_fp32": ort_runner(fp32_sess, np_feeds)}
    runners |= {k: ort_runner(s, np_feeds) for k, s in sessions.items()}
    runners["torch_fp32"] = torch_runner(MiniLMEmbedder(fp32), *feeds)
    runners["torch_dynamic"] = torch_runner(MiniLMEmbedder(rows["torch_dynamic"]["module"]), *feeds)
    stats = compare_latency(runners, warmup=2, repeats=5 if quick else 15)
    lat = {k: v.median_ms for k, v in stats.items()}

    def record(key: str | None, row: dict[str, Any], value: float) -> Record:
        runtime = row["runtime"]
        base = "ort_fp32" if runtime == "onnxruntime" else "torch_fp32"
        has_lat = key is not None and not row.get("no_latency")
        extra = dict(row["extra"])
        extra |= {"sentences": task.n_sentences, "latency_shape": "32x128 tokens"}
        return Record(
            suite="quant", model=name, method=row["method"], config=row["config"],
            metric="cosine", value=round(value, 5), baseline_value=round(fp32_value, 5),
            params=params, macs=macs, size_bytes=row["size"],
            latency_ms=round(lat[key], 2) if has_lat and key else None,
            baseline_latency_ms=round(lat[base], 2) if has_lat else None,
            runtime=runtime, seconds=round(row.get("seconds", 0.0), 2),
            data_used=row["data_used"], extra=extra,
        )  # fmt: skip

    fp_row: dict[str, Any] = {
        "method": "edgeslim:fp32", "config": {"w_bits": 32, "a_bits": 32},
        "size": size_bytes(fp32), "data_used": "none", "extra": {},
    }  # fmt: skip
    records = [
        record("torch_fp32", fp_row | {"runtime": "torch"}, fp32_value),
        record("ort_fp32", fp_row | {"runtime": "onnxruntime"}, fp32_ort_value),
    ]
    records += [record(k, r, r["value"]) for k, r in rows.items()]
    return records
