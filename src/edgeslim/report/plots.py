"""PNG plots of the accuracy/cost trade-off, one panel per model, Pareto front drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgeslim.records import Record, precision_label, weight_bits_label
from edgeslim.report.pareto import pareto_front

AXES = (("latency_ms", "latency (ms, median)"), ("size_bytes", "size (KiB)"))


def _label(r: Record) -> str:
    """``ptq W8A8``: the method's short name and, where set, its pruned fraction
    (``udfc -30%``) and bit-widths (``W2/6A8`` for a mixed low/high setting)."""
    name = r.method.split(":")[-1]
    if r.config.get("prune_ratio"):
        name += f" -{r.config['prune_ratio']:.0%}"
    w_bits = weight_bits_label(r.config)
    if w_bits is not None and w_bits != "32":
        label = precision_label(r.config) if "a_bits" in r.config else None
        name += f" {label or f'W{w_bits}'}"
    return name


def plot_tradeoffs(records: Sequence[Record], out: Path) -> list[Path]:
    """One PNG per (runtime, cost axis): metric vs cost for every model, Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    models = list(dict.fromkeys(r.model for r in records))
    for runtime in dict.fromkeys(r.runtime for r in records):
        for field, label in AXES:
            rows = [r for r in records if r.runtime == runtime and getattr(r, field) is not None]
            if not rows:
                continue
            fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.4), squeeze=False)
            for ax, model in zip(axes[0], models, strict=True):
                pts = [r for r in rows if r.model == model]
                if not pts:
                    ax.set_visible(False)
                    continue
                scale = 1 / 1024 if field == "size_bytes" else 1.0
                xy = [(float(getattr(r, field)) * scale, r.value) for r in pts]
                for (x, y), r in zip(xy, pts, strict=True):
                    ax.scatter(x, y, s=25)
                    ax.annotate(_label(r), (x, y), fontsize=7)
                front = [xy[i] for i in pareto_front(xy)]
                ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8)
                ax.axhline(pts[0].baseline_value, color="grey", lw=0.6)
                ax.set_title(model, fontsize=9)
                ax.set_xlabel(label, fontsize=8)
                ax.set_ylabel(pts[0].metric, fontsize=8)
            metrics = "/".join(dict.fromkeys(r.metric for r in rows))
            fig.suptitle(f"{runtime}: {metrics} vs {label}", fontsize=9)
            fig.tight_layout()
            path = out / f"tradeoff_{runtime}_{field}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths
