"""The baseline suite on real data: records for both runtimes, parity, targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeslim.bench import load_records, run_suite
from edgeslim.bench.records import CONFIG_KEYS
from edgeslim.zoo import ZOO

# the quick suite runs every zoo CNN in both runtimes (on the first 2,000 test images): 29 s
# on a 2-core machine; `edgeslim bench baseline` is the benchmark it checks
pytestmark = pytest.mark.slow

FIELDS = {
    "suite", "model", "method", "config", "metric", "value", "baseline_value", "params", "macs",
    "size_bytes", "latency_ms", "baseline_latency_ms", "runtime", "seconds", "data_used",
}  # fmt: skip


@pytest.fixture(scope="module")
def baseline_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baseline")
    run_suite("baseline", out, quick=True, models=[*ZOO])
    return out


def test_records_cover_every_cnn_in_both_runtimes(baseline_out: Path) -> None:
    records = load_records(baseline_out / "results.json")
    assert {(r.model, r.runtime) for r in records} == {
        (m, rt) for m in ZOO for rt in ("torch", "onnxruntime")
    }
    for r in records:
        assert set(r.model_dump()) >= FIELDS
        assert set(r.config) <= set(CONFIG_KEYS)
        assert r.method == "edgeslim:fp32" and r.metric == "top1" and r.data_used == "none"
        assert r.value >= ZOO[r.model].target_top1
        assert r.extra["onnx_max_abs_diff"] <= 1e-4
        assert r.latency_ms is not None and r.latency_ms > 0
        assert r.size_bytes == 4 * r.params


def test_torch_and_onnx_agree_on_accuracy(baseline_out: Path) -> None:
    records = load_records(baseline_out / "results.json")
    for m in ZOO:
        t = next(r for r in records if r.model == m and r.runtime == "torch")
        o = next(r for r in records if r.model == m and r.runtime == "onnxruntime")
        assert abs(t.value - o.value) <= 0.02  # no flip in the quick run's 2,000 images
        assert t.macs == o.macs


def test_report_and_plots_written(baseline_out: Path) -> None:
    text = (baseline_out / "report.md").read_text()
    for m in ZOO:
        assert f"| {m} | edgeslim:fp32 |" in text
    assert (baseline_out / "tradeoff_onnxruntime_latency_ms.png").is_file()
    assert (baseline_out / "onnx" / "resnet20.onnx").is_file()
