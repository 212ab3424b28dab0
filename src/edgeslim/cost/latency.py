"""Measured latency: warm-up, then the median of repeats, at a fixed thread count.

Timings drift by 20-30% between runs on a shared machine, so variants are compared in one
process with their repeats interleaved (:func:`compare_latency`): a slow phase of the
machine then slows every variant alike and the ratios stay meaningful. Runners alternate
in blocks of consecutive calls, not call by call, and the first ``settle`` calls of each
block are run but not recorded: ONNX Runtime's (and OpenMP's) worker threads keep spinning
for a while after a run and steal the cores from whichever runner comes next (measured:
torch resnet20 at batch 1 read 10.8 ms instead of 3.3 ms when interleaved call by call
with four ONNX Runtime sessions).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from edgeslim.runtime.denormal import denormal_mode

DEFAULT_THREADS = 2
Runner = Callable[[], Any]

# Decision — whole models are timed for at least 8 s, however fast they are (2026-12-03):
# on a 2-core VM, resnet20's all-int8 over fp32 read 0.47-0.60 between windows of about 1 s
# a few seconds apart in one process (the rounds' median; the 10*repeats cap ended them),
# and the same policy 0.51x in one search's verification and 0.62x in another's. A longer
# window takes the median over more of the machine's states instead of one; it costs
# about 8 s per calibration, check and verification of a search, and per
# pair of models in ``bench imagenet``.
TIMING_SECONDS = 8.0


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per call: median and the 10th/90th percentiles of ``repeats`` calls;
    ``blocks``: the median of each block of calls, in round order (see
    :func:`ratio_over_rounds`)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    blocks: tuple[float, ...] = ()


def _quantile(s: list[float], f: float) -> float:
    return s[min(len(s) - 1, int(f * len(s)))]


def _stats(samples: list[float], block: int) -> LatencyStats:
    s = sorted(samples)
    blocks = tuple(statistics.median(samples[i : i + block]) for i in range(0, len(samples), block))
    return LatencyStats(statistics.median(s), _quantile(s, 0.1), _quantile(s, 0.9), len(s), blocks)


@dataclass(frozen=True)
class RatioStats:
    """One runner's latency over another's, round by round: the median and 10th/90th
    percentiles of the per-round ratios, over ``rounds`` rounds; ``windows``: the median of
    each timing window when the figure merges several (:func:`compare_in_windows`)."""

    median: float
    p10: float
    p90: float
    rounds: int
    windows: tuple[float, ...] = ()


def ratio_over_rounds(stats: LatencyStats, base: LatencyStats) -> RatioStats:
    """``stats`` over ``base`` as the median of the ratios of their blocks timed in the same
    round of one :func:`compare_latency` run, with the spread of those ratios.

    Why per round: on a shared machine the int8/float ratio itself moves with the machine's
    state (measured on a 2-core VM, 2 threads: resnet20's all-int8 over fp32 between 0.66
    and 0.87 from one second to the next, while two int8 files of the same kernels timed in
    the same runs stayed within 4% of each other). A ratio of whole-run medians mixes the
    states in whatever proportion each runner met them; the per-round ratios pair like with
    like, and their spread says how far one figure can be trusted.
    """
    pairs = [a / b for a, b in zip(stats.blocks, base.blocks, strict=False) if b > 0]
    if not pairs:
        raise ValueError("ratio_over_rounds needs two runners timed in one compare_latency run")
    s = sorted(pairs)
    return RatioStats(statistics.median(s), _quantile(s, 0.1), _quantile(s, 0.9), len(s))


def latency_spread(stats: LatencyStats, base: LatencyStats) -> dict[str, float]:
    """A record's latency spread: the 10th/90th percentiles of both runners' calls and of
    the speed-up ``base / stats`` per round (:func:`ratio_over_rounds`), and the calls
    timed. Why: a median alone does not say whether 1.1x is a gain or the machine's noise."""
    out = {
        "p10_ms": round(stats.p10_ms, 4), "p90_ms": round(stats.p90_ms, 4),
        "baseline_p10_ms": round(base.p10_ms, 4), "baseline_p90_ms": round(base.p90_ms, 4),
        "repeats": float(stats.repeats),
    }  # fmt: skip
    if stats.blocks and base.blocks:
        speed = ratio_over_rounds(base, stats)
        out |= {"speedup_median": round(speed.median, 4), "speedup_p10": round(speed.p10, 4),
                "speedup_p90": round(speed.p90, 4)}  # fmt: skip
    return out


def torch_runner(model: nn.Module, *inputs: Any, **kwargs: Any) -> Runner:
    """A no-grad call of ``model`` in eval mode."""
    model.eval()

    def run() -> Any:
        with torch.inference_mode():
            return model(*inputs, **kwargs)

    return run


def ort_runner(session: Any, feeds: Mapping[str, Any]) -> Runner:
    """One ``session.run`` on fixed numpy feeds."""
    feeds = dict(feeds)
    return lambda: session.run(None, feeds)


def compare_latency(
    runners: Mapping[str, Runner],
    warmup: int = 5,
    repeats: int = 30,
    threads: int = DEFAULT_THREADS,
    min_seconds: float = 0.0,
    block: int = 10,
    settle: int = 3,
    max_repeats: int | None = None,
) -> dict[str, LatencyStats]:
    """Time every runner, alternating blocks of ``block`` calls; medians per runner.

    Each runner gets at least ``repeats`` timed calls; the rounds go on until
    ``min_seconds`` have passed, so that very fast models still get a stable median, but
    stop at ``max_repeats`` calls per runner (default ``10 * repeats``), which bounds the
    time a slow model takes; pass a large one to make ``min_seconds`` decide.
    Every other round runs the runners in reverse order (a b, b a, ...), and rounds come in
    pairs, so no runner is always the one timed right after the same other: whatever one
    leaves behind (caches, the frequency it ran the cores at) falls on each alike. Why: two
    int8 MobileNetV2 files that fuse to the same graph (edgeslim's and ONNX Runtime's own),
    timed in a fixed order, came out 3% apart in two runs of ``bench imagenet``; whatever
    the cause, the order of the runners must not be one.
    """
    per_block = max(1, min(block, repeats))
    cap = 10 * repeats if max_repeats is None else max(repeats, max_repeats)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    # Denormal floats make CPU kernels 5-10x slower on some inputs (measured: vgg-small at
    # batch 1, 3.2 ms vs 1.3 ms depending on the image); deployments flush them, so do we.
    try:
        with denormal_mode(flush=True):
            for run in runners.values():
                for _ in range(warmup):
                    run()
            samples: dict[str, list[float]] = {k: [] for k in runners}
            start = time.perf_counter()
            done = 0
            forward = list(runners.items())
            rounds = 0
            while True:
                for name, run in forward if rounds % 2 == 0 else forward[::-1]:
                    for _ in range(settle if len(runners) > 1 else 0):
                        run()
                    for _ in range(per_block):
                        t0 = time.perf_counter()
                        run()
                        samples[name].append((time.perf_counter() - t0) * 1e3)
                done += per_block
                rounds += 1
                if len(forward) > 1 and rounds % 2:
                    continue  # finish the pair: each order as often
                enough = done >= repeats and time.perf_counter() - start >= min_seconds
                if enough or done >= cap:
                    break
    finally:
        torch.set_num_threads(previous)
    return {k: _stats(v, per_block) for k, v in samples.items()}


def measure_latency(
    run: Runner, warmup: int = 5, repeats: int = 30, threads: int = DEFAULT_THREADS
) -> LatencyStats:
    """Median latency of one runner (see :func:`compare_latency` to compare several)."""
    return compare_latency({"run": run}, warmup, repeats, threads)["run"]


@dataclass(frozen=True)
class Windows:
    """How a whole-model comparison is spread in time (:func:`compare_in_windows`): runs
    of :func:`compare_latency` ``gap`` seconds apart (None: as long as a run's
    ``min_seconds``), until two of them agree within ``agree`` (relative) on every ratio to
    the reference, or ``most`` runs were made.

    Decision (2026-12-06): on a 2-core VM, 1 of 25 back-to-back 8-second windows timed
    resnet20's all-int8 model at 0.67x fp32 where the other 24 read 0.50-0.54x (its int8
    sessions ~35% slower, fp32 5%), and a search calibrated in such a window screened out
    almost every policy (bench search, resnet20 re-run: 35.6% pessimistic table). One
    window cannot tell such a transient from the machine's state; a second window a gap
    later that agrees can, and when it does not, a third outvotes the odd one (the median
    over windows). Stopping on agreement, not on a limit being met, keeps the measurement
    blind to what it decides."""

    most: int = 3
    gap: float | None = None
    agree: float = 0.05

    def __post_init__(self) -> None:
        if self.most < 1:
            raise ValueError(f"Windows.most must be >= 1; got {self.most}")
        if self.gap is not None and self.gap < 0:
            raise ValueError(f"Windows.gap must be >= 0 seconds; got {self.gap}")
        if not self.agree > 0:
            raise ValueError(f"Windows.agree must be > 0; got {self.agree}")


DEFAULT_WINDOWS = Windows()


def _agree(a: Mapping[str, float], b: Mapping[str, float], tol: float) -> bool:
    return all(abs(a[k] / b[k] - 1.0) <= tol for k in a if b.get(k, 0.0) > 0)


def _merge(stats: Sequence[LatencyStats]) -> LatencyStats:
    """One runner's windows as one: medians over windows of each window's figures, every
    block kept in order (so :func:`ratio_over_rounds` still pairs rounds)."""
    return LatencyStats(
        statistics.median(s.median_ms for s in stats), statistics.median(s.p10_ms for s in stats),
        statistics.median(s.p90_ms for s in stats), sum(s.repeats for s in stats),
        tuple(b for s in stats for b in s.blocks),
    )  # fmt: skip


T = TypeVar("T")


def until_agreement(
    measure: Callable[[], T],
    figure: Callable[[T], Mapping[str, float]],
    windows: Windows = DEFAULT_WINDOWS,
    gap: float | None = None,
) -> list[T]:
    """``measure()`` once per window, ``gap`` seconds apart (default ``windows.gap``, else
    none), until two windows' ``figure`` agree within ``windows.agree`` on every key, or
    ``windows.most`` were taken (see :class:`Windows`); every window's result, in order."""
    if gap is None:
        gap = windows.gap or 0.0
    runs: list[T] = []
    figures: list[Mapping[str, float]] = []
    for i in range(windows.most):
        if i:
            time.sleep(gap)
        run = measure()
        runs.append(run)
        now = figure(run)
        agreed = any(_agree(now, f, windows.agree) for f in figures)
        figures.append(now)
        if agreed:
            break
    return runs


def compare_in_windows(
    runners: Mapping[str, Runner],
    reference: str,
    windows: Windows = DEFAULT_WINDOWS,
    **compare: Any,
) -> tuple[dict[str, LatencyStats], dict[str, RatioStats]]:
    """:func:`compare_latency` in separate windows (see :class:`Windows`), merged: each
    runner's latency and each other runner's :func:`ratio_over_rounds` to ``reference``
    are the medians over the windows of each window's figure (``RatioStats.windows`` lists
    them). With one runner, the windows agree on its median milliseconds."""
    if reference not in runners:
        raise ValueError(f"reference {reference!r} is not among the runners {list(runners)}")
    gap = windows.gap if windows.gap is not None else float(compare.get("min_seconds", 0.0))

    Window = tuple[dict[str, LatencyStats], dict[str, RatioStats]]

    def window() -> Window:  # each window's ratios computed once, for agreement and merging
        stats = compare_latency(runners, **compare)
        base = stats[reference]
        return stats, {k: ratio_over_rounds(s, base) for k, s in stats.items() if k != reference}

    def figure(w: Window) -> dict[str, float]:
        return {k: r.median for k, r in w[1].items()} or {reference: w[0][reference].median_ms}

    runs = until_agreement(window, figure, windows, gap)
    merged = {k: _merge([stats[k] for stats, _ in runs]) for k in runners}
    ratios = {}
    for k in runners:
        if k == reference:
            continue
        per = [r[k] for _, r in runs]
        ratios[k] = RatioStats(
            statistics.median(p.median for p in per), statistics.median(p.p10 for p in per),
            statistics.median(p.p90 for p in per), sum(p.rounds for p in per),
            tuple(p.median for p in per),
        )  # fmt: skip
    return merged, ratios
