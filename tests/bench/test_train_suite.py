"""The ``train`` suite end to end, in quick mode on tiny Fashion-MNIST subsets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import edgeslim.bench.train as suite
from edgeslim.bench.records import load_records
from edgeslim.bench.suites import SUITES, _load_builtin_suites, run_suite


def test_train_is_a_registered_suite() -> None:
    _load_builtin_suites()
    assert "train" in SUITES


@pytest.mark.slow  # 17 short training runs, ONNX export and latency: minutes on 2 cores
def test_quick_run_writes_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite, "TRAIN_IMAGES_QUICK", 64)
    monkeypatch.setattr(suite, "VAL_IMAGES_QUICK", 100)
    monkeypatch.setattr(suite, "TEST_IMAGES_QUICK", 200)
    monkeypatch.setattr(suite, "CALIBRATION", 64)
    run_suite("train", tmp_path, quick=True)
    records = load_records(tmp_path / "results.json")
    assert (tmp_path / "report.md").is_file()
    methods = Counter(r.method for r in records)
    assert methods == {
        "edgeslim:fp32": 1,
        "edgeslim:qat_recipe": 4,
        "edgeslim:qat_ste": 4,
        "edgeslim:qat_recipe_aqe": 2,
        "edgeslim:qat_recipe_progressive": 1,
        "edgeslim:distill": 6,
        "edgeslim:svd_finetune": 1,
        "edgeslim:trp": 1,
        "edgeslim:svd_finetune_scratch": 1,
        "edgeslim:trp_scratch": 1,
    }
    fp32 = next(r for r in records if r.method == "edgeslim:fp32")
    assert fp32.value > 85 and fp32.data_used == "none"
    for r in records:
        assert r.suite == "train" and r.baseline_value == fp32.value and r.seconds >= 0
        if r.method != "edgeslim:fp32":
            assert r.data_used == "train" and r.extra["epochs"] >= 1 and r.seconds > 0
    qat = [r for r in records if r.method.startswith("edgeslim:qat")]
    assert {r.config["setting"] for r in qat} == {"w4a4", "w2a2", "tw_a8", "w1a1"}
    for r in qat:  # first conv and last linear at 8 bits, stated in the record
        assert r.config["edge_layers_w8a8"] == ["conv1", "fc"]
        assert r.extra["first_last_layer_bits"] == 8
        assert r.size_bytes < fp32.size_bytes / 3  # packed codes, not float weights
    w1 = next(r for r in qat if r.config["setting"] == "w1a1" and r.method == "edgeslim:qat_ste")
    w4 = next(r for r in qat if r.config["setting"] == "w4a4" and r.method == "edgeslim:qat_ste")
    assert w1.size_bytes < w4.size_bytes
    prog = next(r for r in qat if r.method == "edgeslim:qat_recipe_progressive")
    # quick: W1A1 gets the suite's one epoch, so the schedule keeps its last stage (one
    # epoch at 2 bits, then one at W1A1); the full run: 8, 4 and 2 bits, then W1A1
    assert prog.config["progressive"] == [2] and prog.extra["epochs"] >= 1
    distill = [r for r in records if r.method == "edgeslim:distill"]
    assert Counter((r.config["student"], r.config["distill"]) for r in distill) == Counter(
        (s, d) for s in ("w2a2", "resnet20-pruned50") for d in ("none", "kd", "dccd")
    )
    pruned = [r for r in distill if r.config["student"] == "resnet20-pruned50"]
    assert all(r.macs <= 0.55 * fp32.macs for r in pruned)
    for method in ("edgeslim:svd_finetune", "edgeslim:trp"):
        r = next(x for x in records if x.method == method)
        assert r.runtime == "onnxruntime" and r.latency_ms and r.baseline_latency_ms
        assert r.macs <= 0.52 * fp32.macs and r.extra["layers_factorized"] > 0


def test_w1a1_rows_train_longer_than_the_others() -> None:
    data = suite.Data(train=None, val=None, test=None, example=(), calibration=(), epochs=3)
    epochs = {s.key: s.epochs(data) for s in suite.SETTINGS}
    assert epochs == {"w4a4": 3, "w2a2": 3, "tw_a8": 3, "w1a1": suite.W1A1_EPOCHS}
    assert suite.W1A1_EPOCHS > suite.EPOCHS
    quick = suite.Data(train=None, val=None, test=None, example=(), calibration=(), epochs=1)
    assert {s.epochs(quick) for s in suite.SETTINGS} == {1}  # the quick run stays short


def test_scratch_rows_spend_the_same_epochs_from_a_random_init() -> None:
    """TRP from scratch against dense + SVD + fine-tune: the same total epochs, both at the
    suite's MACs target, recorded with what each spent."""
    from edgeslim.data import TensorBatches, load_fashion_mnist
    from edgeslim.graph import layer_table, total_macs
    from edgeslim.zoo.resnet import resnet20

    train = load_fashion_mnist("train", limit=64)
    test = load_fashion_mnist("test", limit=100)
    data = suite.Data(
        train=train, val=TensorBatches(test.images, test.labels, 50), test=test,
        example=(test.images[:1].contiguous(),), calibration=[], epochs=1,
    )  # fmt: skip
    rows: list[tuple[str, float, dict[str, object], int]] = []

    def record(method: str, value: float, config: dict[str, object], seconds: float,
               extra: dict[str, object], **kw: object) -> None:  # fmt: skip
        rows.append((method, value, config, int(kw["m"])))  # type: ignore[call-overload]

    suite._lowrank_scratch_rows(data, record)
    assert [r[0] for r in rows] == ["edgeslim:svd_finetune_scratch", "edgeslim:trp_scratch"]
    svd, trp = rows[0][2], rows[1][2]
    assert svd["epochs"] == trp["epochs"] == 2 and svd["init"] == trp["init"] == "random"
    assert svd["dense_epochs"] == 1 and svd["finetune_epochs"] == 1
    dense = total_macs(layer_table(resnet20(), *data.example))
    assert all(0.45 * dense <= r[3] <= 0.5 * dense for r in rows), [r[3] for r in rows]
    assert all(0.0 <= r[1] <= 100.0 for r in rows)
