"""The journal: a search killed with SIGKILL (or cut mid-line) resumes without measuring a
finished evaluation again and ends where an uninterrupted run ends; a journal written by a
different search is refused with the field named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from edgeslim.search import (
    EvalResult,
    Evaluator,
    JournalError,
    Policy,
    SearchResult,
    SearchSpace,
    search,
)
from edgeslim.task import Task

HERE = Path(__file__).parent
CONSTRAINTS = ["size<=0.2x"]
BUDGET = 8


class CountingEvaluator(Evaluator):
    """The real evaluator, counting its measurements."""

    measured: list[str]

    def measure(self, policy: Policy) -> EvalResult:
        self.__dict__.setdefault("measured", []).append(policy.id)
        return super().measure(policy)


@pytest.fixture(scope="module")
def sp(digits_model: nn.Module, digits_task: Task) -> SearchSpace:
    return SearchSpace.build(
        digits_model, digits_task, w_bits=(2, 4, 8), keep=(0.5, 1.0), calibration=128
    )


def _search(
    sp: SearchSpace, journal: Path | None, budget: int = BUDGET, **kw: object
) -> tuple[SearchResult, list[str]]:
    ev = CountingEvaluator(sp, CONSTRAINTS, max_drop=2.0)
    options = {"strategy": "evolutionary", "seed": 0, "batch": 2, **kw}
    result = search(
        sp.model, sp.task, sp, budget=budget, journal=journal, evaluator=ev,
        progress=False, **options,  # type: ignore[arg-type]
    )  # fmt: skip
    return result, ev.__dict__.get("measured", [])


@pytest.fixture(scope="module")
def reference(sp: SearchSpace) -> list[str]:
    """Policy ids of an uninterrupted run, in told order."""
    result, measured = _search(sp, None)
    assert len(measured) == BUDGET
    return [e.policy.id for e in result.evaluations]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_a_torn_write_redoes_nothing(
    sp: SearchSpace, reference: list[str], tmp_path: Path
) -> None:
    journal = tmp_path / "search.jsonl"
    first, _ = _search(sp, journal)
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1 + len(first.evaluations)  # the header, then one line each
    assert [json.loads(x)["policy"]["id"] for x in lines[1:]] == reference
    kept = lines[:6]  # header + 5 told results, then half of the 6th as a kill would leave it
    journal.write_bytes(b"".join(kept) + lines[6][: len(lines[6]) // 2])
    done = [json.loads(x) for x in kept[1:]]
    already = [d["policy"]["id"] for d in done if d["source"] == "measured"]
    resumed, measured = _search(sp, journal)
    assert [e.policy.id for e in resumed.evaluations] == reference
    assert [e.replayed for e in resumed.evaluations] == [True] * 5 + [False] * (len(reference) - 5)
    assert not set(measured) & set(already)  # no finished evaluation measured again
    assert len(measured) == BUDGET - len(already)
    assert len(_lines(journal)) == 1 + len(reference)  # the torn line was cut, not kept


def test_stop_after_k_then_continue_with_a_larger_budget(
    sp: SearchSpace, reference: list[str], tmp_path: Path
) -> None:
    journal = tmp_path / "search.jsonl"
    _, first = _search(sp, journal, budget=3)
    assert len(first) == 3
    result, second = _search(sp, journal)
    assert len(second) == BUDGET - 3 and not set(first) & set(second)
    assert [e.policy.id for e in result.evaluations] == reference
    again, third = _search(sp, journal)  # everything replayed: nothing to measure
    assert third == [] and all(e.replayed for e in again.evaluations)
    assert [e.result for e in again.evaluations] == [e.result for e in result.evaluations]


CHILD = """
import os, signal, sys
import torch
sys.path.insert(0, {helpers!r})
from search_helpers import DigitsNet, make_task
from edgeslim.search import Evaluator, SearchSpace, search

torch.set_num_threads(1)
model = DigitsNet()
model.load_state_dict(torch.load({state!r}, weights_only=True))
model.eval()
task = make_task()
space = SearchSpace.build(model, task, w_bits=(2, 4, 8), keep=(0.5, 1.0), calibration=128)

class Dying(Evaluator):
    count = 0

    def measure(self, policy):
        if Dying.count == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
        Dying.count += 1
        return super().measure(policy)

ev = Dying(space, {constraints!r}, max_drop=2.0)
search(model, task, space, strategy="evolutionary", budget={budget}, seed=0, batch=2,
       journal={journal!r}, evaluator=ev, progress=False)
"""


def test_kill_9_mid_search_then_rerun_resumes(
    sp: SearchSpace, reference: list[str], tmp_path: Path
) -> None:
    state = tmp_path / "digits.pt"
    torch.save(sp.model.state_dict(), state)
    journal = tmp_path / "search.jsonl"
    code = CHILD.format(
        helpers=str(HERE), state=str(state), kill_at=5, constraints=CONSTRAINTS, budget=BUDGET,
        journal=str(journal),
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    done = _lines(journal)[1:]
    finished = [d["policy"]["id"] for d in done if d["source"] == "measured"]
    assert len(finished) == 5  # every measurement finished before the kill was journaled
    result, measured = _search(sp, journal)
    assert not set(measured) & set(finished)
    assert len(measured) == BUDGET - 5
    assert [e.policy.id for e in result.evaluations] == reference


def test_a_journal_of_another_search_is_refused(
    sp: SearchSpace, digits_model: nn.Module, digits_task: Task, tmp_path: Path
) -> None:
    journal = tmp_path / "search.jsonl"
    _search(sp, journal, budget=2)
    for change, field in [({"seed": 1}, "seed"), ({"strategy": "random"}, "strategy"),
                          ({"batch": 4}, "batch")]:  # fmt: skip
        with pytest.raises(JournalError, match=f"its {field} is"):
            _search(sp, journal, budget=2, **change)
    other_space = SearchSpace.build(
        digits_model, digits_task, w_bits=(4, 8), keep=(0.5, 1.0), calibration=128
    )
    with pytest.raises(JournalError, match="its space is"):
        _search(other_space, journal, budget=2)
    with pytest.raises(JournalError, match="its constraints is"):
        search(
            sp.model, sp.task, sp, ["size<=0.3x"], "evolutionary", budget=2, batch=2,
            journal=journal, max_drop=2.0, progress=False,
        )  # fmt: skip
    changed = SearchSpace.build(
        _perturbed(digits_model), digits_task, w_bits=(2, 4, 8), keep=(0.5, 1.0), calibration=128
    )
    with pytest.raises(JournalError, match="its model is"):
        _search(changed, journal, budget=2)


def _perturbed(model: nn.Module) -> nn.Module:
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_submodule("fc").bias.add_(1e-3)
    return other


def test_a_corrupt_journal_is_refused(sp: SearchSpace, tmp_path: Path) -> None:
    journal = tmp_path / "search.jsonl"
    _search(sp, journal, budget=2)
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(JournalError, match="line 2 is not JSON"):
        _search(sp, journal, budget=2)
    journal.write_text('{"hello": 1}\n')
    with pytest.raises(JournalError, match="not an edgeslim search journal"):
        _search(sp, journal, budget=2)
    with pytest.raises(JournalError, match="is a folder"):
        _search(sp, tmp_path, budget=2)
