"""Suite registry and the runner that writes ``results.json``, ``report.md`` and plots."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from edgeslim.bench.records import Record, save_records
from edgeslim.registry import Registry


class Suite(Protocol):
    def __call__(self, out: Path, quick: bool, models: list[str] | None) -> list[Record]: ...


SUITES: Registry[Suite] = Registry("benchmark suite")


def register_suite(name: str) -> Callable[[Suite], Suite]:
    def add(fn: Suite) -> Suite:
        SUITES.register(name, fn)
        return fn

    return add


def per_model(
    label: str,
    names: list[str],
    measure: Callable[[str], list[Record]],
    progress: Path | None = None,
) -> list[Record]:
    """Run ``measure(name)`` for each model under one progress bar; concatenate records.

    With ``progress`` (a JSON file), each finished model's records are saved there at once
    and a rerun with the same file skips the models it already holds, so a long suite
    killed half-way resumes where it stopped (see :func:`resumable_steps`).
    """
    steps = [(name, (lambda n: lambda: measure(n))(name)) for name in names]
    return resumable_steps(label, steps, progress)


def _read_progress(path: Path | None) -> dict[str, list[Record]]:
    """Finished steps of an earlier run; an unreadable file (killed mid-write before the
    atomic rename existed, or edited) is ignored, so the run starts over."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        data = json.loads(Path(path).read_text())
        return {str(k): [Record(**r) for r in v] for k, v in data["steps"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_progress(path: Path, done: dict[str, list[Record]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    payload = {"steps": {k: [r.model_dump(mode="json") for r in v] for k, v in done.items()}}
    with open(tmp, "w") as f:
        f.write(json.dumps(payload))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)  # atomic: a kill leaves the old file or the new one, never half of one


def resumable_steps(
    label: str,
    steps: Sequence[tuple[str, Callable[[], list[Record]]]],
    progress: Path | None = None,
) -> list[Record]:
    """Run named steps in order under one progress bar; concatenate their records.

    With ``progress`` (a JSON file), each finished step's records are written there at once
    (atomically), and a rerun with the same file replays the steps it holds instead of
    measuring them again: a suite killed half-way resumes where it stopped. The file is
    removed once every step is done, so the next run measures afresh; delete it to start
    over. Step names must be unique.
    """
    from edgeslim.progress import progress_bar

    names = [name for name, _ in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"step names must be unique; got {names}")
    done = _read_progress(progress)
    records: list[Record] = []
    with progress_bar() as bar:
        task = bar.add_task(label, total=len(steps))
        for name, run in steps:
            if name in done:
                records += done[name]
                bar.advance(task)
                continue
            bar.update(task, description=f"{label} {name}")
            done[name] = run()
            records += done[name]
            if progress is not None:
                _write_progress(Path(progress), done)
            bar.advance(task)
    if progress is not None:
        Path(progress).unlink(missing_ok=True)  # complete: the next run starts afresh
    return records


def _load_builtin_suites() -> None:
    import edgeslim.bench.baseline
    import edgeslim.bench.datafree
    import edgeslim.bench.depth
    import edgeslim.bench.imagenet
    import edgeslim.bench.operators
    import edgeslim.bench.prune
    import edgeslim.bench.prune_quant
    import edgeslim.bench.quant
    import edgeslim.bench.search
    import edgeslim.bench.train  # noqa: F401  (registers "quant", "prune", "train", ...)


def run_suite(
    name: str,
    out: Path,
    quick: bool = False,
    models: list[str] | None = None,
    strategies: list[str] | None = None,
) -> list[Record]:
    """Run one suite and write its records, Markdown report and PNG plots under ``out``.

    ``strategies`` restricts a suite that runs search strategies (``search``) to these;
    any other suite refuses it rather than ignore it."""
    import inspect

    from edgeslim.errors import EdgeslimError
    from edgeslim.report import write_report

    _load_builtin_suites()
    suite = SUITES.get(name)
    options = {}
    if strategies:
        if "strategies" not in inspect.signature(suite).parameters:
            raise EdgeslimError(f"suite {name!r} runs no search strategies; --strategy applies "
                                "to the search suite")  # fmt: skip
        options["strategies"] = list(strategies)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = suite(out, quick, models, **options)
    save_records(records, out / "results.json")
    write_report(records, out, title=f"edgeslim bench {name}" + (" --quick" if quick else ""))
    return records
