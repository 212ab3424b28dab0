"""`edgeslim demo` (what `make demo` runs) shows fp32, int8, pruned + int8 and data-free
quantization side by side."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeslim.bench import load_records
from edgeslim.cli import app
from edgeslim.zoo import ZOO


# 4-5 minutes on 2 cores, a third of the default run: `make demo` is this command, and its
# parts are tested apiece (tests/bench: prune_quant and datafree quick suites; the baseline
# and quant suites are slow-marked there too)
@pytest.mark.slow
def test_demo_shows_baseline_quantized_pruned_then_datafree_resnet20(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert all(f"{k}/4" in result.output for k in (1, 2, 3, 4))
    base = load_records(tmp_path / "baseline" / "results.json")
    quant = load_records(tmp_path / "quant" / "results.json")
    assert {r.model for r in base} == {*ZOO, "minilm"}  # every zoo CNN, then MiniLM
    methods = {(r.method, r.config.get("w_bits")) for r in quant}
    assert ("edgeslim:ptq", 8) in methods and ("edgeslim:fp32", 32) in methods
    assert "W8A8" in result.output
    combined = {r.method for r in load_records(tmp_path / "prune_quant" / "results.json")}
    assert combined == {"edgeslim:fp32", "edgeslim:ptq", "edgeslim:pruned", "edgeslim:pruned+ptq"}
    datafree = load_records(tmp_path / "datafree" / "results.json")
    from edgeslim.bench.datafree import DEMO_ROWS

    assert [r.method for r in datafree] == ["edgeslim:fp32"] + [
        f"edgeslim:{m}" for m, *_ in DEMO_ROWS
    ]
    assert all(r.model == "resnet20" and r.data_used == "none" for r in datafree)
    assert "W2/6A8" in result.output
