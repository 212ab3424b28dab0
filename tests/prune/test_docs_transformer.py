"""docs/pruning.md's examples run and print what they say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "pruning.md"


def test_the_transformer_example_of_the_pruning_page_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    section = DOC.read_text().split("## Transformer blocks and ConvNeXt", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    namespace: dict[str, object] = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Linear(in_features=32, out_features=64, bias=True)")
    assert lines[1].split()[0] == "2"  # heads of the encoder's nn.MultiheadAttention


def test_the_depth_example_of_the_pruning_page_runs(capsys: pytest.CaptureFixture[str]) -> None:
    section = DOC.read_text().split("## Residual branches removed whole (depth)", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    namespace: dict[str, object] = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    out = capsys.readouterr().out
    assert out.count("Bypassed()") == 3 and "(bn2): BranchMean()" in out


def _last_line_of_example(after: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the first python block after ``after`` on the page; the last line it printed."""
    block = re.findall(r"```python\n(.*?)```", DOC.read_text().split(after, 1)[1], flags=re.S)[0]
    namespace: dict[str, object] = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_the_reconstruction_example_of_the_pruning_page_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _last_line_of_example("- **Reconstruction**", capsys)
    match = re.match(r"reconstruct: (\d+) layers refitted, mean relative output error "
                     r"([\d.]+) -> ([\d.]+)", line)  # fmt: skip
    assert match, line
    assert int(match[1]) > 0 and float(match[3]) < float(match[2])


def test_the_epoch_selection_example_of_the_pruning_page_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _last_line_of_example("A fine-tune does not always help", capsys)
    match = re.match(r"kept epoch (\d) of 2: agreement ([\d.]+)% before, ([\d.]+)% kept", line)
    assert match, line
    assert float(match[3]) >= float(match[2]) and (float(match[3]) > float(match[2])) == (
        match[1] != "0"
    )
