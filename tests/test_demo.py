"""`edgeslim demo` (what `make demo` runs) shows fp32 and int8 side by side."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from edgeslim.bench import load_records
from edgeslim.cli import app


def test_demo_shows_baseline_then_quantized_resnet20(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1/2" in result.output and "2/2" in result.output
    base = load_records(tmp_path / "baseline" / "results.json")
    quant = load_records(tmp_path / "quant" / "results.json")
    assert {r.model for r in base} == {"resnet20", "vgg-small", "mobilenetv2-small", "minilm"}
    methods = {(r.method, r.config.get("w_bits")) for r in quant}
    assert ("edgeslim:ptq", 8) in methods and ("edgeslim:fp32", 32) in methods
    assert "W8A8" in result.output
