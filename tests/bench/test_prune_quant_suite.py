"""The prune_quant suite (the demo's last table): four real rows in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

from edgeslim.bench.prune_quant import prune_quant_model


def test_pruned_then_quantized_rows(tmp_path: Path) -> None:
    records = prune_quant_model("resnet20", tmp_path, quick=True)
    by = {r.method: r for r in records}
    assert list(by) == ["edgeslim:fp32", "edgeslim:ptq", "edgeslim:pruned", "edgeslim:pruned+ptq"]
    fp32, int8, pruned, both = by.values()
    assert all(r.runtime == "onnxruntime" and r.latency_ms for r in records)
    assert pruned.macs == both.macs <= 0.5 * fp32.macs and int8.macs == fp32.macs
    assert both.size_bytes < pruned.size_bytes < fp32.size_bytes
    assert both.size_bytes < int8.size_bytes < fp32.size_bytes
    assert pruned.config["macs_reduction"] >= 0.5 and pruned.data_used == "train"
    assert fp32.data_used == "none" and int8.data_used == "calibration"
    for r in (int8, pruned, both):
        assert r.value > fp32.value - 3.0  # a real model, not a broken one
    assert abs(both.value - pruned.value) < 1.0  # W8A8 costs the pruned model little
