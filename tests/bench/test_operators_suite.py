"""Suite ``operators``: the data-free int8 files of a BN-free model run in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

from edgeslim.bench.operators import DATAFREE_ORT, datafree_ort_rows


def test_datafree_w8a8_files_of_a_bn_free_model_run_on_integer_kernels(tmp_path: Path) -> None:
    """prelu-cnn has no BatchNorm: its ranges come from estimated statistics. Every MAC of
    the RTN and DFQ files must run in ONNX Runtime's integer kernels (0.1% did before), and
    the files' top-1 stay within a point of fp32's on the quick test images."""
    records = datafree_ort_rows("prelu-cnn", tmp_path, quick=True)
    assert [r.method for r in records] == [f"edgeslim:{m}" for m in DATAFREE_ORT]
    for r in records:
        assert r.runtime == "onnxruntime" and r.data_used == "none"
        assert r.extra["int8_mac_share"] >= 0.99, r.extra
        assert r.value >= r.baseline_value - 1.0
        assert r.latency_ms and r.baseline_latency_ms  # timed against the fp32 file
    assert (tmp_path / "onnx" / "prelu-cnn_dfq_w8a8.onnx").is_file()
