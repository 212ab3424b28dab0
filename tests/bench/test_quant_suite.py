"""The quant suite on real data: every method present, measured in one run."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeslim.bench import load_records, run_suite


@pytest.mark.slow  # 67 s on a 2-core machine; `edgeslim bench quant` is what it checks
def test_quant_suite_rows_on_vgg_small(tmp_path: Path) -> None:
    run_suite("quant", tmp_path, quick=True, models=["vgg-small"])
    records = load_records(tmp_path / "results.json")
    by = {(r.method, r.config.get("w_bits"), r.runtime): r for r in records}
    fp32 = by[("edgeslim:fp32", 32, "onnxruntime")]
    w8 = by[("edgeslim:ptq", 8, "onnxruntime")]
    w4 = by[("edgeslim:ptq", 4, "onnxruntime")]
    peer = by[("onnxruntime:quantize_static", 8, "onnxruntime")]
    assert ("torch:fx_int8", 8, "torch") in by
    assert w8.value >= fp32.value - 0.5 and w4.value >= fp32.value - 2.0
    assert abs(w8.value - w8.extra["torch_fake_quant_top1"]) <= 0.3  # ORT agrees with torch
    assert w8.size_bytes < fp32.size_bytes / 3.5 and w4.size_bytes < w8.size_bytes
    for r in (w8, w4, peer):
        assert r.latency_ms and r.baseline_latency_ms == fp32.latency_ms
        assert r.extra["latency_b32_ms"] > 0 and r.data_used == "calibration"
    pow2 = by[("edgeslim:ptq_pow2", 3, "torch")]
    assert pow2.latency_ms is None and pow2.value > 50.0
    qat = {(r.config["w_bits"], r.config["estimator"]): r for r in records
           if r.method == "edgeslim:qat"}  # fmt: skip
    assert set(qat) == {(4, "ste"), (2, "ste"), (2, "aqe")}  # W1A1 only in the full run
    w4a4 = qat[(4, "ste")]
    assert w4a4.data_used == "train" and w4a4.latency_ms is None
    assert w4a4.value >= w4a4.extra["ptq_top1"] - 1.0 and w4a4.value > 85.0
    assert w4a4.size_bytes < w8.size_bytes
