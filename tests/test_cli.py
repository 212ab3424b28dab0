"""The command line, end to end, on the shipped checkpoints and real data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeslim.cli import app

runner = CliRunner()


def _one_paragraph(text: str) -> str:
    return " ".join(text.split())


def test_info_resnet20_prints_the_analytic_macs_total() -> None:
    result = runner.invoke(app, ["info", "resnet20"])
    assert result.exit_code == 0, result.output
    total = re.search(r"MACs ([\d,]+)", result.output)
    assert total is not None and int(total.group(1).replace(",", "")) == 31_021_952
    assert "layer3.0.downsample.0" in result.output and "coupling groups" in result.output
    text = _one_paragraph(result.output)  # the console wraps long lines
    assert "residual branches (9," in text and "layer1.2 11.6%, layer2.0 8.7%" in text


def test_info_of_a_module_factory_with_input_shape() -> None:
    result = runner.invoke(
        app, ["info", "edgeslim.zoo.torchvision_style:resnet18", "--input-shape", "1,3,64,64"]
    )
    assert result.exit_code == 0, result.output
    assert "layer4.1.conv2" in result.output


def test_python_dash_m_edgeslim_runs_the_command_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "edgeslim", "info", "resnet20"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "31,021,952" in done.stdout


def test_unknown_model_is_a_clear_error() -> None:
    result = runner.invoke(app, ["info", "resnet21"])
    assert result.exit_code == 2
    text = _one_paragraph(result.output)
    assert "unknown model 'resnet21'" in text and "edgeslim zoo list" in text


def test_untraceable_model_names_op_and_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "badnet.py").write_text(
        "import torch\n"
        "class Gate(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.mean() > 0:\n"
        "            return x\n"
        "        return -x\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(1, 4, 3)\n"
        "        self.gate = Gate()\n"
        "    def forward(self, x):\n"
        "        return self.gate(self.conv(x))\n"
        "def build():\n"
        "    return Net()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["info", "badnet:build", "--input-shape", "1,1,28,28"])
    assert result.exit_code == 2
    text = _one_paragraph(result.output)
    assert "`gate` (Gate)" in text and "if x.mean() > 0" in text


def test_invalid_recipe_is_a_clear_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - kind: magic\n")
    result = runner.invoke(
        app, ["compress", "resnet20", "--recipe", str(recipe), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert (
        "stages[0].kind: 'magic' is not a stage kind; allowed values: datafree, finetune, lowrank, "
        "prune, quantize" in _one_paragraph(result.output)
    )


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    from edgeslim.data import fashion_mnist as fm

    env = {"EDGESLIM_DATA": str(tmp_path)}
    saved = fm.DEBIAN_DIR
    fm.DEBIAN_DIR = tmp_path / "nowhere"
    try:
        result = runner.invoke(app, ["zoo", "train", "resnet20", "--epochs", "1"], env=env)
    finally:
        fm.DEBIAN_DIR = saved
    assert result.exit_code == 2
    assert "apt-get install dataset-fashion-mnist" in _one_paragraph(result.output)


def test_zoo_list_shows_measured_accuracy() -> None:
    result = runner.invoke(app, ["zoo", "list"])
    assert result.exit_code == 0
    for name in ("resnet20", "vgg-small", "mobilenetv2-small", "minilm"):
        assert name in result.output


def test_compress_runs_a_finetune_recipe_and_reports(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: ft\nstages:\n  - kind: finetune\n    epochs: 1\n    lr: 0.001\n    limit: 512\n"
    )
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["compress", "vgg-small", "--recipe", str(recipe), "--out", str(out), "--quick"]
    )
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())
    assert {r["runtime"] for r in records} == {"torch", "onnxruntime"}
    assert all(r["data_used"] == "train" and r["method"] == "edgeslim:ft" for r in records)
    assert all(max(r["extra"].get("onnx_max_abs_diff", [0])) <= 1e-4 for r in records)
    assert all(r["extra"]["task"] == "fashion-mnist" for r in records)
    assert records[0]["value"] > 88.0  # a gentle fine-tune keeps the model accurate
    assert (out / "model.onnx").is_file() and (out / "report.md").is_file()


def test_compress_with_a_quantize_stage_exports_int8(tmp_path: Path) -> None:
    import onnx

    recipe = tmp_path / "q.yaml"
    recipe.write_text("name: w8a8\nstages:\n  - kind: quantize\n    w_bits: 8\n    a_bits: 8\n")
    out = tmp_path / "out"
    args = ["compress", "resnet20", "--recipe", str(recipe), "--out", str(out), "--quick"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())
    ort = next(r for r in records if r["runtime"] == "onnxruntime")
    assert ort["config"] == {"w_bits": 8, "a_bits": 8} and ort["data_used"] == "calibration"
    assert abs(ort["value"] - ort["baseline_value"]) <= 0.3
    assert ort["size_bytes"] < 0.3 * 4 * ort["params"] and ort["macs"] == 31_021_952
    graph = onnx.load(str(out / "model.onnx")).graph
    assert sum(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer) == 22


def test_export_onnx_writes_a_checked_int8_file(tmp_path: Path) -> None:
    recipe = tmp_path / "q.yaml"
    recipe.write_text("stages:\n  - kind: quantize\n    w_bits: 8\n    a_bits: 8\n")
    out = tmp_path / "m.onnx"
    args = ["export", "onnx", "resnet20", "--recipe", str(recipe), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "int8 QDQ" in result.output and out.is_file()
    said = " ".join(result.output.split())  # the console wraps at its own width
    assert "top1" in said and "input batches" in said
    assert out.stat().st_size < 0.35 * 1_088_744  # int8 weights, not float
    # which data the figure read, on screen and in the manifest (a quick test subset here,
    # not the full split a compress record reads)
    assert "2000 test images" in said
    side = json.loads(out.with_name(f"{out.name}.manifest.json").read_text())
    assert "2000 test images" in side["metric"]["measured_on"]


def test_report_merges_runs_in_order(tmp_path: Path) -> None:
    from edgeslim.bench.records import Record, load_records, save_records

    def rec(model: str) -> Record:
        return Record(
            suite="prune", model=model, method="edgeslim:fp32", metric="top1", value=90.0,
            baseline_value=90.0, params=1, macs=1, size_bytes=4, latency_ms=1.0,
            baseline_latency_ms=1.0, runtime="onnxruntime", seconds=0.0, data_used="none",
        )  # fmt: skip

    save_records([rec("a")], tmp_path / "one" / "results.json")
    save_records([rec("b"), rec("c")], tmp_path / "two" / "results.json")
    from edgeslim.runtime.machine import machine_info, save_machine

    save_machine(tmp_path / "two", {**machine_info(), "cpu": "Test CPU 9000"})
    out = tmp_path / "merged"
    result = runner.invoke(
        app, ["report", str(tmp_path / "one"), str(tmp_path / "two"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert [r.model for r in load_records(out / "results.json")] == ["a", "b", "c"]
    text = (out / "report.md").read_text()
    assert "| c | edgeslim:fp32 |" in text
    # the merge says where its records were measured, not that it measured them
    assert "from 2 run(s) (1 from `one`, 2 from `two`)" in text
    assert "measured in the run that wrote" not in text
    # each run's machine is named from its machine.json, an older run's as not recorded
    assert "`one`: not recorded" in text and "`two`: Test CPU 9000 (" in text
    assert not (out / "machine.json").exists()  # the merge measured nothing here
    missing = runner.invoke(app, ["report", str(tmp_path / "none"), "--out", str(out)])
    assert missing.exit_code == 2 and "does not exist" in missing.output
