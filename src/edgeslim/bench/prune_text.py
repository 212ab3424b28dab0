"""The ``prune`` suite on MiniLM: attention heads and FFN neurons removed, cosine to fp32.

Rows, all on the same sentences in one process: fp32 in torch and ONNX Runtime, then for
each criterion in :data:`CRITERIA` and each ratio in :data:`RATIOS`, the model with that
fraction of every layer's heads (12 -> 9 or 6) and FFN neurons (1536 -> 1152 or 768)
removed by surgery, exported and run in ONNX Runtime. The metric is the mean cosine of the
sentence embeddings to the fp32 model's; latency is one batch of 32 sentences padded to 128
tokens, interleaved with fp32. ``fluctuation`` (FLAP) scores units by the variance of what
they feed and folds the removed units' means into the next biases, from 64 calibration
sentences that are not among the test ones; the other criteria read weights only.

Decision — no fine-tune: the project has no text training objective or labelled text
corpus, so these rows measure what the criteria keep, not a recovered model.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from torch import nn

from edgeslim.bench.records import Record
from edgeslim.bench.tasks import EmbeddingTask
from edgeslim.cost import compare_latency, ort_runner, size_bytes
from edgeslim.export import export_onnx
from edgeslim.graph import layer_table, total_macs

CRITERIA = ("l1", "l2", "fpgm", "random", "fluctuation")
QUICK_CRITERIA = ("l1", "random", "fluctuation")
RATIOS = (0.25, 0.5)


def prune_minilm(out: Path, quick: bool) -> list[Record]:
    from edgeslim.bench.quant_text import _calibration
    from edgeslim.prune.importance import get_importance
    from edgeslim.prune.planner import build_importance, prune_
    from edgeslim.runtime.ort import ort_session
    from edgeslim.zoo.minilm import MiniLMEmbedder, load_minilm

    name = "minilm"
    task = EmbeddingTask(n_sentences=64 if quick else 256)
    fp32 = load_minilm()
    fp32_value = task.evaluate_torch(fp32)  # sets the fp32 reference embeddings
    calib = _calibration(task)  # sentences after the test ones, for data-driven criteria
    onnx_dir = out / "onnx"
    export_kw: dict[str, Any] = {
        "input_names": task.input_names, "dynamic_axes": task.dynamic_axes()
    }  # fmt: skip
    example = task.example_args()
    feeds = task.latency_feeds()
    one = tuple(a[:1] for a in feeds)
    fp32_macs = total_macs(layer_table(MiniLMEmbedder(fp32), *one))
    fp32_path = export_onnx(
        MiniLMEmbedder(fp32), example, onnx_dir / f"{name}_fp32.onnx", **export_kw
    )
    rows: dict[str, dict[str, Any]] = {}
    for ratio in RATIOS:
        for criterion in QUICK_CRITERIA if quick else CRITERIA:
            t0 = time.perf_counter()
            importance = (
                get_importance("fluctuation", batches=calib)
                if criterion == "fluctuation"
                else build_importance(criterion)
            )
            model, plan = prune_(copy.deepcopy(fp32).eval(), example, importance, ratio=ratio)
            seconds = time.perf_counter() - t0
            key = f"{criterion}_{round(ratio * 100)}"
            path = export_onnx(
                MiniLMEmbedder(model), example, onnx_dir / f"{name}_{key}.onnx", **export_kw
            )
            attn = model.get_submodule("encoder.layer.0.attention.self")
            ffn = model.get_submodule("encoder.layer.0.intermediate.dense")
            heads = attn.num_attention_heads
            assert isinstance(ffn, nn.Linear) and isinstance(heads, int)
            rows[key] = {
                "criterion": criterion, "ratio": ratio, "model": model, "path": path,
                "seconds": seconds, "torch_cosine": task.evaluate_torch(model),
                "macs": total_macs(layer_table(MiniLMEmbedder(model), *one)),
                "heads": heads, "ffn": ffn.out_features,
                "groups": len(plan.keep),
            }  # fmt: skip
    fp32_sess = ort_session(fp32_path)
    sessions = {k: ort_session(r["path"]) for k, r in rows.items()}
    fp32_ort = task.evaluate_ort(fp32_sess)
    np_feeds = {n: a.numpy() for n, a in zip(task.input_names, feeds, strict=True)}
    runners = {"ort_fp32": ort_runner(fp32_sess, np_feeds)}
    runners |= {k: ort_runner(s, np_feeds) for k, s in sessions.items()}
    lat = compare_latency(runners, warmup=2, repeats=5 if quick else 15)

    def record(method: str, config: dict[str, Any], value: float, module: nn.Module,
               macs: int, key: str, seconds: float, extra: dict[str, Any],
               data_used: str = "none") -> Record:  # fmt: skip
        return Record(
            suite="prune", model=name, method=method, config=config, metric="cosine",
            value=round(value, 5), baseline_value=round(fp32_ort, 5),
            params=sum(p.numel() for p in module.parameters()), macs=macs,
            size_bytes=size_bytes(module), latency_ms=round(lat[key].median_ms, 2),
            baseline_latency_ms=round(lat["ort_fp32"].median_ms, 2), runtime="onnxruntime",
            seconds=round(seconds, 2), data_used=data_used,
            extra={"sentences": task.n_sentences, "latency_shape": "32x128 tokens", **extra},
        )  # fmt: skip

    records = [
        record("edgeslim:fp32", {"macs_reduction": 0.0}, fp32_ort, fp32, fp32_macs, "ort_fp32",
               0.0, {"torch_cosine": round(fp32_value, 5)})
    ]  # fmt: skip
    for key, r in rows.items():
        config = {"ratio": r["ratio"], "criterion": r["criterion"], "finetune_epochs": 0}
        extra = {
            "heads_per_layer": f"{r['heads']}/12", "ffn_per_layer": f"{r['ffn']}/1536",
            "macs_reduction": round(1 - r["macs"] / fp32_macs, 4),
            "torch_cosine": round(r["torch_cosine"], 5), "groups_pruned": r["groups"],
        }  # fmt: skip
        value = task.evaluate_ort(sessions[key])
        records.append(
            record(f"edgeslim:{r['criterion']}", config, value, r["model"], r["macs"], key,
                   r["seconds"], extra,
                   "calibration" if r["criterion"] == "fluctuation" else "none")
        )  # fmt: skip
    return records
