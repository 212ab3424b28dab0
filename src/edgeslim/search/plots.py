"""Pareto plots of a search: validation metric against each constrained cost.

Every measured policy is a grey dot, the Pareto front a dashed line, the uniform policies
(the same bits and keep ratio everywhere: what a user would pick by hand) orange squares,
and the chosen policy a red star, so the figure shows what the search bought over the
hand-picked baselines at the same costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgeslim.report.pareto import pareto_front
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.run import SearchResult

COSTS = ("size", "latency", "macs", "bops", "memory")


def _points(results: Sequence[EvalResult], cost: str) -> list[tuple[float, float]]:
    pts = []
    for r in results:
        c = r.costs.get(cost)
        if r.metric is not None and c is not None:
            pts.append((float(c), float(r.metric)))
    return pts


def plot_search(
    result: SearchResult, uniforms: Sequence[EvalResult], out: Path, costs: Sequence[str] = ()
) -> list[Path]:
    """One PNG per cost (default: every cost the constraints name, else size): metric vs cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = [c.cost for c in result.constraints.limits if c.cost in COSTS]
    axes = list(dict.fromkeys([*costs, *named])) or ["size"]
    measured = [e.result for e in result.evaluations if e.result.evaluated]
    paths: list[Path] = []
    for cost in axes:
        pts = _points(measured, cost)
        if not pts:
            continue
        base = result.baseline_costs.get(cost) or 1.0
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [x / base for x, _ in pts]
        ax.scatter(xs, [y for _, y in pts], s=12, c="0.6", label="measured policies")
        front = pareto_front([(x, y) for x, (_, y) in zip(xs, pts, strict=True)])
        ax.plot(
            [xs[i] for i in front], [pts[i][1] for i in front], "--", c="0.3", label="Pareto front"
        )
        upts = _points(uniforms, cost)
        if upts:
            ax.scatter([x / base for x, _ in upts], [y for _, y in upts], marker="s", s=30,
                       c="tab:orange", label="uniform policies")  # fmt: skip
        if result.best is not None:
            c = result.best.result.costs.get(cost)
            if c is not None and result.best.result.metric is not None:
                ax.scatter([c / base], [result.best.result.metric], marker="*", s=160,
                           c="tab:red", label="chosen", zorder=3)  # fmt: skip
        for limit in result.constraints.limits:
            if limit.cost == cost and limit.relative:
                ax.axvline(limit.limit, c="tab:red", lw=0.8, ls=":")
        ax.axhline(result.baseline_metric, c="tab:blue", lw=0.8, ls=":", label="uncompressed")
        ax.set_xlabel(f"{cost} (x uncompressed)")
        ax.set_ylabel(f"validation {result.metric}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"search_{cost}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
