"""Suite registry and the runner that writes ``results.json``, ``report.md`` and plots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edgeslim.bench.records import Record, load_records, save_records
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
    killed half-way resumes where it stopped. The file is a plain record list
    (:func:`load_records`), removed once every model is done; delete it to start over.
    """
    from edgeslim.progress import progress_bar

    done: dict[str, list[Record]] = {}
    if progress is not None and Path(progress).is_file():
        for r in load_records(progress):
            done.setdefault(r.model, []).append(r)
    records: list[Record] = []
    with progress_bar() as bar:
        task = bar.add_task(label, total=len(names))
        for name in names:
            if name in done:
                records += done[name]
                bar.advance(task)
                continue
            bar.update(task, description=f"{label} {name}")
            records += measure(name)
            if progress is not None:
                save_records(records, progress)
            bar.advance(task)
    if progress is not None:
        Path(progress).unlink(missing_ok=True)  # complete: the next run starts afresh
    return records


def _load_builtin_suites() -> None:
    import edgeslim.bench.baseline
    import edgeslim.bench.datafree
    import edgeslim.bench.imagenet
    import edgeslim.bench.operators
    import edgeslim.bench.prune
    import edgeslim.bench.prune_quant
    import edgeslim.bench.quant
    import edgeslim.bench.search
    import edgeslim.bench.train  # noqa: F401  (registers "quant", "prune", "train", ...)


def run_suite(
    name: str, out: Path, quick: bool = False, models: list[str] | None = None
) -> list[Record]:
    """Run one suite and write its records, Markdown report and PNG plots under ``out``."""
    from edgeslim.report import write_report

    _load_builtin_suites()
    suite = SUITES.get(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = suite(out, quick, models)
    save_records(records, out / "results.json")
    write_report(records, out, title=f"edgeslim bench {name}" + (" --quick" if quick else ""))
    return records
