"""docs/search.md runs: its Python blocks, executed in order in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "search.md"


def test_the_examples_of_the_search_page_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "cache"))  # the latency table's cache
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    out = capsys.readouterr().out
    assert "allowed values: 4, 6, 8" in out  # the edited policy file was refused as shown
    assert (tmp_path / "search.jsonl").is_file() and (tmp_path / "policy.json").is_file()
    assert "best feasible policy" in out
