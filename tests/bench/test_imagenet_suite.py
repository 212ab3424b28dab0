"""Suite ``imagenet`` on the real ImageNet MobileNetV2 (slow: about 5 minutes with --quick)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeslim.bench.suites import SUITES, _load_builtin_suites


def test_the_imagenet_suite_is_registered() -> None:
    _load_builtin_suites()
    assert "imagenet" in SUITES


@pytest.mark.slow
def test_quick_imagenet_suite_beats_the_peer_on_agreement(tmp_path: Path) -> None:
    from edgeslim.bench.suites import run_suite

    records = run_suite("imagenet", tmp_path, quick=True)
    by = {(r.method, r.runtime): r for r in records}
    ours = by[("edgeslim:ptq", "onnxruntime")]
    peer = by[("onnxruntime:quantize_static", "onnxruntime")]
    assert ours.metric == "agreement" and ours.value >= peer.value
    assert ours.extra["int8_ops"].get("QLinearConv") == 52 and "Conv" not in ours.extra["int8_ops"]
    assert by[("edgeslim:dfq", "torch")].data_used == "none"
    # least squares gives back what pruning took before any fine-tuning
    refit, plain = by[("edgeslim:l1+recon", "onnxruntime")], by[("edgeslim:l1", "onnxruntime")]
    assert refit.extra["reconstruct"]["layers"] > 0
    assert refit.extra["before_finetune"]["agreement"] > plain.extra["before_finetune"]["agreement"]
    # every fine-tune kept its best epoch on training crops it did not train on
    tuned = [r for r in records if "finetune_epochs" in r.config]
    assert tuned and all(0 <= r.extra["kept_epoch"] <= r.config["finetune_epochs"] for r in tuned)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "report.md").is_file()
