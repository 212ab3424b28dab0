"""Markdown report: one table per suite, rows exactly as the records hold them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgeslim.records import Record


def _fmt_config(config: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "-"


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def records_table(records: Sequence[Record]) -> str:
    """A Markdown table of records; deltas and ratios are computed from the record fields."""
    head = (
        "| model | method | config | runtime | metric | value | baseline | delta | params | "
        "MMACs | size KiB | latency ms | baseline ms | speed-up | seconds | data |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        delta = r.value - r.baseline_value
        digits = 4 if r.metric == "cosine" else 2
        lines.append(
            f"| {r.model} | {r.method} | {_fmt_config(r.config)} | {r.runtime} | {r.metric} | "
            f"{r.value:.{digits}f} | {r.baseline_value:.{digits}f} | {delta:+.{digits}f} | "
            f"{r.params:,} | {r.macs / 1e6:.2f} | {r.size_bytes / 1024:.1f} | "
            f"{_num(r.latency_ms, 3)} | {_num(r.baseline_latency_ms, 3)} | "
            f"{_num(r.speedup)}x | {r.seconds:.1f} | {r.data_used} |"
        )
    return "\n".join(lines)


def _warnings(records: Sequence[Record]) -> list[str]:
    """``WARNING:`` notes of the records (e.g. a MACs target missed on purpose), once each."""
    notes = [n for r in records for n in r.extra.get("notes", []) if isinstance(n, str)]
    return list(dict.fromkeys(n.removeprefix("WARNING:").strip() for n in notes
                              if n.startswith("WARNING")))  # fmt: skip


def write_report(
    records: Sequence[Record],
    out: Path,
    title: str = "edgeslim report",
    provenance: str | None = None,
    machines: str | None = None,
) -> Path:
    """Write ``report.md`` and the plots for ``records`` into ``out``. ``provenance`` says
    where the records come from when they were not all measured in the run writing the
    file (a merge of several runs, ``machines`` then says where each was measured); by
    default, that run, on this machine, which ``out/machine.json`` records."""
    from edgeslim.report.plots import plot_tradeoffs
    from edgeslim.runtime.machine import describe_machine, save_machine

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_tradeoffs(records, out)
    parts = [f"# {title}", ""]
    parts.append(
        (provenance or "Every number below was measured in the run that wrote `results.json` "
         "beside this file.")
        + " Latencies are medians at a fixed thread count; `baseline ms` is the "
        "uncompressed fp32 model in the same runtime and process, so `speed-up` shows what "
        "compression gained, not what the runtime gained."
    )  # fmt: skip
    if provenance is None:
        machines = "Measured on " + describe_machine(save_machine(out)) + "."
    if machines:
        parts += ["", machines]
    parts.append("")
    for suite in dict.fromkeys(r.suite for r in records):
        rows = [r for r in records if r.suite == suite]
        parts += [f"## {suite}", "", records_table(rows), ""]
    warnings = _warnings(records)
    if warnings:
        parts += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    for p in plots:
        parts += [f"![{p.stem}]({p.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
