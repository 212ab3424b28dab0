"""The suite runner: a killed multi-model suite resumes at the next model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeslim.bench.records import Record
from edgeslim.bench.suites import per_model


def _record(model: str) -> Record:
    return Record(
        suite="t", model=model, method="edgeslim:x", metric="top1", value=1.0,
        baseline_value=1.0, params=1, macs=1, size_bytes=1, latency_ms=None,
        baseline_latency_ms=None, runtime="torch", seconds=0.0, data_used="none",
    )  # fmt: skip


def test_killed_suite_resumes_without_redoing_finished_models(tmp_path: Path) -> None:
    progress = tmp_path / "progress.json"
    calls: list[str] = []

    def dies_on_b(name: str) -> list[Record]:
        calls.append(name)
        if name == "b":
            raise KeyboardInterrupt
        return [_record(name)]

    with pytest.raises(KeyboardInterrupt):
        per_model("t", ["a", "b", "c"], dies_on_b, progress=progress)
    assert list(json.loads(progress.read_text())["steps"]) == ["a"]

    def works(name: str) -> list[Record]:
        calls.append(name)
        return [_record(name)]

    records = per_model("t", ["a", "b", "c"], works, progress=progress)
    assert [r.model for r in records] == ["a", "b", "c"]
    assert calls == ["a", "b", "b", "c"]  # a was not measured again
    assert not progress.exists()  # a complete run leaves nothing to resume


def test_strategies_are_refused_by_a_suite_without_them(tmp_path: Path) -> None:
    from edgeslim.bench.suites import run_suite
    from edgeslim.errors import EdgeslimError

    with pytest.raises(EdgeslimError, match="runs no search strategies"):
        run_suite("baseline", tmp_path, quick=True, strategies=["random"])
    assert not (tmp_path / "results.json").exists()
