"""Suite ``search``: automated per-layer bits + pruning under three constraints at once.

Two models, one after the other (``--models`` picks; a killed run resumes after the last
finished model): ``mobilenetv2-imagenet`` on the photo crops, with agreement as the metric
and every strategy (:mod:`edgeslim.bench.search_imagenet` says what differs), and
``resnet20`` on Fashion-MNIST with everything below, in one process:

- constraints together: ONNX Runtime latency at batch 1 <= 0.6x the fp32 model (predicted
  by :class:`~edgeslim.search.latency.LutLatency`, the per-layer kernel table), size <=
  0.2x the fp32 bytes, and at most 1 point of validation top-1 lost;
- pruned policies are refitted by least squares on the calibration images before scoring
  (``SearchSpace.build(reconstruct=True)``), so keep ratios down to 0.5 are worth trying;
- the search sees only the **validation** split (scoring) and training images
  (calibration); the **test** split is read once per final row, for the chosen policy;
- rows: the best uniform policy that meets the constraints (or a row saying none does),
  every edgeslim strategy and the Optuna peers (``optuna-tpe``, ``optuna-nsga2``) at the
  same measurement budget and seed;
- per row: validation top-1, test top-1, size, predicted latency, the chosen policy
  exported (QDQ) and timed in ONNX Runtime next to the fp32 export, measurements until the
  first feasible policy (by the table), seconds. As in ``edgeslim search``, each row's
  policy is the best whose exported model meets the latency limit **when timed whole**
  (:func:`~edgeslim.search.verify.verify_latency`, up to 4 candidates feasible by the
  table, best validation score first); a row whose candidates all miss it has no policy;
- the Ray executor (2 workers) against in-process on the same strategy and seed: the same
  policy? the wall-time speed-up;
- the latency table's prediction error on a few measured policies;
- the accuracy-aware mode from uniform W4A4 (bits-only space) against NNCF's "revert one
  layer at a time by sensitivity", budget ``Sizes.aa_budget``: layers given back.

Budgets (module constants) keep resnet20's part near 20 minutes on 2 cores (a
measurement is about 1.7 s there: prune, PTQ with 256 calibration images, 1,000
validation images; the whole suite with mobilenetv2-imagenet took 97 min in the
committed run, b441b45, about 20 of them resnet20's);
``--quick`` runs two strategies at a tiny budget in a few minutes (once the machine's
kernel table is cached; the first run also times every kernel shape).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.bench.records import Record
from edgeslim.bench.suites import per_model, register_suite
from edgeslim.data import TensorBatches, load_fashion_mnist
from edgeslim.errors import EdgeslimError
from edgeslim.search import (
    Evaluation,
    Evaluator,
    Policy,
    SearchError,
    SearchResult,
    SearchSpace,
    search,
)
from edgeslim.search.choices import SpaceChoices
from edgeslim.search.latency import LutLatency
from edgeslim.search.verify import CANDIDATES, measure_candidates, verify_latency
from edgeslim.task import Task
from edgeslim.train.loop import evaluate
from edgeslim.zoo import load_zoo_model

MODEL = "resnet20"
IMAGENET_MODEL = "mobilenetv2-imagenet"  # its rows: edgeslim.bench.search_imagenet
CONSTRAINTS = ("latency<=0.6x", "size<=0.2x")
MAX_DROP = 1.0
SEED = 0
BATCH = 4  # policies asked per round, measured in parallel by the Ray executor
# pruned policies are refitted by least squares (RECONSTRUCT): keep 0.5 everywhere then
# scores 87.7% val top-1 at W8A8 instead of 33.9% with BatchNorm re-estimation alone
# (docs/search.md), so the space reaches half the channels; bits 4/6/8 let size<=0.2x mix
W_BITS, A_BITS, KEEP, ROUND_TO = (4, 6, 8), (8,), (0.5, 0.75, 1.0), 4
RECONSTRUCT = True
CALIBRATION = 256  # training images PTQ calibrates a policy on
STRATEGIES = (
    "random", "evolutionary", "abc", "reinforce", "envelope_ddpg", "greedy", "dp",
    "accuracy_aware", "optuna-tpe", "optuna-nsga2",
)  # fmt: skip
PEERS = ("optuna-tpe", "optuna-nsga2")
RAY_STRATEGY, RAY_WORKERS = "evolutionary", 2
LATENCY_CHECKS = 6  # measured policies whose exported latency is compared with the table's


@dataclass(frozen=True)
class Sizes:
    """How much the suite measures (full or ``--quick``)."""

    budget: int
    val_images: int
    test_images: int | None
    strategies: tuple[str, ...]
    latency_repeats: int
    latency_seconds: float  # each whole-model timing (see edgeslim.search.latency)
    aa_budget: int  # accuracy-aware from W4A4: 21 layer probes + start + top, give-backs


# 9 searches x 24 measurements + the Ray pair + 6 uniforms, about 1.7 s each, plus the
# latency table, exports and checks timed in windows: about 30-35 min (the resnet20 parts
# of benchmarks/search/resnet20-windows and resnet20-kernels; 20 min before the windows)
FULL = Sizes(24, 1000, None, STRATEGIES, 100, 8.0, 40)
QUICK = Sizes(4, 300, 2000, ("evolutionary", "optuna-tpe"), 20, 1.0, 4)


def search_task(val_images: int) -> Task:
    """Fashion-MNIST for the search: calibration from the train split, scores on the val
    split; the test split is deliberately absent (it scores the final rows only)."""
    train = load_fashion_mnist("train", limit=max(CALIBRATION, 512))
    val = load_fashion_mnist("val", limit=val_images)
    return Task(
        example_inputs=(val.images[:1].contiguous(),),
        calibration=TensorBatches(train.images[:CALIBRATION], batch_size=64),
        train=TensorBatches(train.images, train.labels, 64, shuffle=True),
        validation=TensorBatches(val.images, val.labels, batch_size=500),
        metric="val_top1",
        name="fashion-mnist-search",
        description=f"Fashion-MNIST: val top-1 on {len(val)} images, calibration on train",
    )


# the suite's choices, described as `edgeslim search` and the recipe stage describe theirs
CHOICES = SpaceChoices(w_bits=W_BITS, a_bits=A_BITS, keep=KEEP, round_to=ROUND_TO,
                       reconstruct=RECONSTRUCT, calibration=CALIBRATION)  # fmt: skip


def build_space(model: nn.Module, task: Task) -> SearchSpace:
    """The suite's search space (bits, keep ratios, calibration) on ``model``."""
    return CHOICES.build(model, task, seed=SEED)


def _available(names: tuple[str, ...]) -> tuple[str, ...]:
    from edgeslim.search import STRATEGIES as REGISTRY

    return tuple(n for n in names if n in REGISTRY)


@dataclass
class SearchBench:
    """What every row shares: the space, the latency table, the test split, fp32 figures."""

    name: str
    out: Path
    sizes: Sizes
    model: nn.Module
    space: SearchSpace
    latency: LutLatency
    score_test: Callable[[nn.Module], float]  # the final rows' metric, on the test data
    test_count: int
    fp32_test: float
    fp32_ms: float
    metric: str = "top1"
    limits: tuple[str, ...] = CONSTRAINTS
    max_drop: float = MAX_DROP
    quick: bool = False  # its searches journal apart from a full run's (other data, budget)

    def record(
        self, method: str, policy: Policy | None, seconds: float, extra: dict[str, Any],
        config: dict[str, Any] | None = None, space: SearchSpace | None = None,
    ) -> Record:  # fmt: skip
        """One row for ``policy`` (None: no policy; test top-1 NaN). On the suite's space it
        is exported and timed in ONNX Runtime; on another ``space`` (bits below 8, which no
        runtime runs) it is fake-quant top-1 in torch, untimed."""
        sp = space if space is not None else self.space
        timed = space is None
        ms = predicted = None
        windows: list[float] | None = None
        base_ms = self.fp32_ms if timed else None
        if policy is None:
            model, costs, test = self.model, sp.baseline_costs(), math.nan
        else:
            model, costs = sp.apply(policy), sp.costs(policy)
            test = self.score_test(model)
            if timed:
                # interleaved with the float model, in windows: each window's ratio is kept,
                # as a policy verified within a limit can read above it minutes later (dp's
                # row in benchmarks/search/resnet20-together: 0.519x verified, 0.651x here)
                fp32, [(_, ratio)] = self.latency.measure_against_float([policy])
                base_ms = fp32.median_ms
                ms = round(base_ms * ratio.median, 4)
                windows = [round(w, 4) for w in ratio.windows]
                predicted = round(self.latency.predict(policy), 4)
        base = sp.baseline_costs()
        cfg = {"budget": self.sizes.budget, "seed": SEED, "constraints": self.constraints,
               **(config or {})}  # fmt: skip
        if policy is not None:
            cfg.update(_bits(policy))
            extra = {"policy_file": self.save_policy(policy).relative_to(self.out).as_posix(),
                     **extra}  # fmt: skip
        return Record(
            suite="search", model=self.name, method=method, config=cfg,
            metric=self.metric, value=round(test, 4), baseline_value=round(self.fp32_test, 4),
            params=sum(p.numel() for p in model.parameters()), macs=costs.macs,
            size_bytes=costs.size, latency_ms=ms,
            baseline_latency_ms=None if base_ms is None else round(base_ms, 4),
            runtime="onnxruntime" if timed else "torch", seconds=round(seconds, 2),
            data_used="calibration",
            extra={
                "test_images": self.test_count, "policy": None if policy is None else policy.id,
                "policy_summary": None if policy is None else policy.describe(),
                "size_ratio": round(costs.size / base.size, 4),
                "predicted_latency_ms": predicted,
                "predicted_latency_ratio": None if predicted is None
                else round(predicted / self.latency.predict(None), 4),
                "measured_latency_ratio": None if ms is None or base_ms is None
                else round(ms / base_ms, 4),
                "measured_latency_windows": windows,
                **extra,
            },
        )  # fmt: skip

    def save_policy(self, policy: Policy) -> Path:
        """``policy`` as JSON under ``out/policies`` (named by model and policy id), so a
        row's policy can be loaded, applied and compared after the run (results.json keeps
        only its id; the journals are removed when the suite finishes)."""
        return policy.save(Path(self.out) / "policies" / f"{self.name}-{policy.id}.json")

    @property
    def constraints(self) -> list[str]:
        return [*self.limits, f"drop<={self.max_drop:g}"]

    def run(
        self, strategy: str, executor: Any = None, space: SearchSpace | None = None
    ) -> tuple[SearchResult, float]:
        """One search; in-process runs keep a journal under ``out/journals`` so a killed
        suite resumes mid-search (the row then says how many measurements were replayed:
        its ``seconds`` cover the rest). The Ray pair is timed whole, without one."""
        t0 = time.perf_counter()
        journal = None
        if executor is None and space is None:
            journal = journal_dir(self.out, self.quick) / f"{self.name}-{strategy}.jsonl"
        result = search(
            self.model, self.space.task, space or self.space, list(self.limits), strategy,
            budget=self.sizes.budget, seed=SEED, batch=BATCH, max_drop=self.max_drop,
            latency=self.latency, executor=executor, progress=False, journal=journal,
        )  # fmt: skip
        return result, time.perf_counter() - t0


def journal_dir(out: Path, quick: bool = False) -> Path:
    """Where the suite's searches journal (removed once the suite has finished); a
    ``--quick`` run's apart, so a full run never replays measurements on its fewer images."""
    return Path(out) / ("journals-quick" if quick else "journals")


def _bits(policy: Policy) -> dict[str, Any]:
    ws = sorted(set(policy.weight_bits.values()))
    as_ = sorted({32 if b is None else b for b in policy.act_bits.values()})
    return {"w_bits": "/".join(map(str, ws)), "a_bits": "/".join(map(str, as_))}


def _search_extra(result: SearchResult, metric: str = "top1") -> dict[str, Any]:
    best = result.best or result.closest
    r = None if best is None else best.result
    return {
        "feasible": result.feasible,
        f"val_{metric}": None if r is None or r.metric is None else round(r.metric, 4),
        f"val_{metric}_fp32": round(result.baseline_metric, 4),
        "measured": result.measured,
        "rejected": result.rejected,
        "first_feasible": result.first_feasible,
        "checks": [] if r is None else [str(c) for c in r.checks],
        "message": result.message,
        "replayed": sum(e.replayed for e in result.evaluations),
        "notes": {
            k: v
            for k, v in result.notes.items()
            if k in ("stopped", "given_back_count", "latency_measured")
        },
    }


def _uniform_row(b: SearchBench) -> Record:
    """Every uniform policy screened and (when it passes) measured; the best feasible one."""
    t0 = time.perf_counter()
    ev = Evaluator(b.space, list(b.limits), max_drop=b.max_drop, latency=b.latency)
    results = [(p, ev.evaluate(p)) for p in b.space.uniforms()]
    seconds = time.perf_counter() - t0
    feasible = [(p, r) for p, r in results if r.feasible and r.metric is not None]
    listing = {
        p.describe(): {f"val_{b.metric}": r.metric, "feasible": r.feasible,
                       "checks": [str(c) for c in r.checks]}
        for p, r in results
    }  # fmt: skip
    extra: dict[str, Any] = {"uniforms": listing, "measured": sum(r.evaluated for _, r in results)}
    if not feasible:
        extra.update(feasible=False, message="none of the uniform policies meets them")
        return b.record("edgeslim:uniform-best", None, seconds, extra)
    # as the searches' answers are: the best by the table first, timed whole to decide
    ranked = sorted(feasible, key=lambda pr: -(pr[1].metric or 0.0))
    evals = [Evaluation(i, p, r, "measured") for i, (p, r) in enumerate(ranked)]
    verdict, kept = measure_candidates(evals[:CANDIDATES], ev.constraints.limits, b.latency)
    extra["latency_measured"] = verdict.to_dict()
    if kept is None:
        extra.update(feasible=False, message="the uniform policies feasible by the latency "
                     "table all missed the latency limit when timed whole")  # fmt: skip
        return b.record("edgeslim:uniform-best", None, seconds, extra)
    r = kept.result
    extra.update({"feasible": True, f"val_{b.metric}": r.metric,
                  "checks": [str(c) for c in r.checks]})  # fmt: skip
    return b.record("edgeslim:uniform-best", kept.policy, seconds, extra)


def _measurement_seconds(result: SearchResult) -> list[float]:
    """Seconds of each measurement the search made, as the process that made it timed it
    (a Ray worker for the Ray run)."""
    return [e.result.seconds for e in result.evaluations if e.counted and not e.replayed]


def ray_accounting(
    t_in: list[float], t_on: list[float], local_s: float, remote_s: float, workers: int
) -> dict[str, Any]:
    """Where the Ray run's wall time went, from the two searches' own measurements
    (``t_in``, ``t_on``: each measurement's seconds; ``local_s``, ``remote_s``: the runs'
    wall seconds): a measurement's mean seconds in-process (torch on every thread) and on
    a worker (one thread, beside the other workers), the share of each run's wall time its
    measurements filled, and the speed-up the workers would give if they were never idle
    (``throughput_bound``: workers x in-process seconds / worker seconds). With as many
    measurements in both runs the speed-up is exactly ``throughput_bound x
    workers_busy_share / in_process_busy_share``; on a machine with as many cores as
    workers, the bound is what the in-process run left of the cores. Empty when either run
    measured nothing."""
    if not t_in or not t_on:
        return {}
    mean_in, mean_on = statistics.fmean(t_in), statistics.fmean(t_on)
    return {
        "measurement_seconds_in_process": round(mean_in, 3),
        "measurement_seconds_on_workers": round(mean_on, 3),
        "in_process_busy_share": round(sum(t_in) / local_s, 3),
        "workers_busy_share": round(sum(t_on) / (workers * remote_s), 3),
        "throughput_bound": round(workers * mean_in / mean_on, 3),
    }


def _ray_row(b: SearchBench) -> Record:
    """The same strategy and seed in-process and on 2 Ray workers: the same evaluations
    and policy? the wall-time speed-up, and where it went (:func:`ray_accounting`). Both
    timed after the other searches warmed the latency table, so neither pays for timing
    kernels; Ray's start-up is reported apart."""
    from edgeslim.search.ray_executor import RayExecutor

    # each run on a space built afresh: the suite's own space holds the pruned copies the
    # earlier searches made, which would spare the in-process run work the workers redo
    local, local_s = b.run(RAY_STRATEGY, space=build_space(b.model, b.space.task))
    fresh = build_space(b.model, b.space.task)
    t0 = time.perf_counter()
    with RayExecutor(workers=RAY_WORKERS) as ex:
        threads = ex.worker_threads()  # the workers are up before the clock starts
        startup = time.perf_counter() - t0
        remote, remote_s = b.run(RAY_STRATEGY, ex, space=fresh)
    ids = [[e.policy.id for e in r.evaluations] for r in (local, remote)]
    metrics = [[e.result.metric for e in r.evaluations] for r in (local, remote)]
    same_policy = local.policy == remote.policy  # by the table: timing is not repeatable
    accounting = ray_accounting(
        _measurement_seconds(local), _measurement_seconds(remote), local_s, remote_s, RAY_WORKERS
    )
    remote = verify_latency(remote, b.latency)
    extra = {
        **_search_extra(remote), "same_policy": same_policy,
        "same_evaluations": ids[0] == ids[1], "same_metrics": metrics[0] == metrics[1],
        "workers": RAY_WORKERS, "in_process_seconds": round(local_s, 2),
        "ray_seconds": round(remote_s, 2), "ray_startup_seconds": round(startup, 2),
        "speedup": round(local_s / remote_s, 3) if local.measured else None,
        "measured_in_process": local.measured,
        "in_process_torch_threads": torch.get_num_threads(), "worker_torch_threads": threads,
        **accounting,
    }  # fmt: skip
    if not local.measured:  # every policy rejected by the table: nothing ran in parallel
        extra["speedup_note"] = (
            f"no policy was measured (every one asked broke an analytic limit), so the workers "
            f"had nothing to do: the runs took {local_s:.1f} s in-process and {remote_s:.1f} s "
            "beside the idle Ray runtime, screening only"
        )
    return b.record(f"edgeslim:{RAY_STRATEGY}@ray{RAY_WORKERS}", remote.policy, remote_s, extra)


def _accuracy_aware_rows(b: SearchBench) -> list[Record]:
    """From uniform W4A4 on a bits-only space (weights and activations 4 or 8 per layer),
    give layers back until the drop is within ``MAX_DROP``: edgeslim's procedure (ranking
    chosen by the start, galloping give-back, then every layer not needed compressed again)
    against NNCF's (each layer restored alone from the start ranks them, given back one at
    a time) at the same budget. Fewer layers given back is better; test top-1 in torch
    (fake-quant: ONNX Runtime has no 4-bit kernels)."""
    bits_only = dataclasses.replace(CHOICES, w_bits=(4, 8), a_bits=(4, 8), keep=(1.0,),
                                    round_to=1, reconstruct=None)  # fmt: skip
    space = bits_only.build(b.model, b.space.task, seed=SEED)
    start = space.uniform(4, 4)
    rows = []
    procedures = (
        ("edgeslim:accuracy_aware", {"rank": "auto", "steps": "gallop", "trim": True}),
        ("nncf-style:revert", {"rank": "restore", "steps": "linear", "trim": False}),
    )
    for method, procedure in procedures:
        t0 = time.perf_counter()
        result = search(
            b.model, space.task, space, None, "accuracy_aware", budget=b.sizes.aa_budget, seed=SEED,
            batch=1, max_drop=MAX_DROP, options={"start": start, **procedure},
            progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        notes = result.notes
        config = {"start": "W4A4", **procedure, "budget": b.sizes.aa_budget,
                  "constraints": [f"drop<={MAX_DROP:g}"]}  # fmt: skip
        extra = {
            **_search_extra(result), "start_drop": notes.get("start_drop"),
            "given_back_count": notes.get("given_back_count"),
            "given_back": notes.get("given_back"), "layers": len(space.layers),
            "rank_used": notes.get("rank"), "trimmed": notes.get("trimmed"),
            "max_drop_met": notes.get("max_drop_met"),
        }  # fmt: skip
        rows.append(b.record(method, result.policy, seconds, extra, config, space=space))
    return rows


def _latency_row(b: SearchBench, chosen: list[Policy]) -> Record:
    """The table's predictions against exported models timed interleaved with fp32: half
    the checks on policies the searches chose, the rest on the space's uniform policies
    (pruned ones included), so the figure covers the space, not only where searches went."""
    seen: dict[str, Policy] = {}
    for p in chosen:
        if len(seen) >= LATENCY_CHECKS // 2:
            break
        seen.setdefault(p.id, p)
    for p in b.space.uniforms():
        if len(seen) >= LATENCY_CHECKS:
            break
        seen.setdefault(p.id, p)
    picks = list(seen.values())
    t0 = time.perf_counter()
    check = b.latency.check(picks)
    extra = {
        **check.to_dict(),
        "anchors_ms": b.latency.anchors,
        "anchor_windows": b.latency.anchor_windows,
    }
    rec = b.record("edgeslim:latency-table", None, time.perf_counter() - t0, extra)
    return rec.model_copy(update={"metric": "latency_max_error", "value": check.max_error,
                                  "baseline_value": 0.0})  # fmt: skip


def _strategy_rows(b: SearchBench) -> tuple[list[Record], list[Policy]]:
    """The best uniform row, then one row per strategy of ``b.sizes`` (each verified by
    timing whole, as ``edgeslim search`` does); with the policies they chose."""
    records = [_uniform_row(b)]
    chosen: list[Policy] = []
    for strategy in _available(b.sizes.strategies):
        result, seconds = b.run(strategy)
        result = verify_latency(result, b.latency)  # untimed: the same for every strategy
        if result.policy is not None:
            chosen.append(result.policy)
        tool = "optuna" if strategy in PEERS else "edgeslim"
        method = f"{tool}:{strategy.removeprefix('optuna-')}"
        records.append(
            b.record(method, result.policy, seconds, _search_extra(result, b.metric),
                     {"strategy": strategy})
        )  # fmt: skip
    return records, chosen


def chosen_strategies(names: list[str]) -> tuple[str, ...]:
    """``--strategy`` names, checked against the suite's list (an unknown name is refused,
    not skipped: a row silently missing would read as a strategy that was not asked)."""
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise EdgeslimError(f"unknown search strategy {', '.join(map(repr, unknown))}; the "
                            f"suite runs: {', '.join(STRATEGIES)}")  # fmt: skip
    available = _available(tuple(names))
    missing = [n for n in names if n not in available]
    if missing:
        raise EdgeslimError(
            f"strategy {', '.join(missing)} is not installed here (Optuna's samplers need "
            "the optional extra: pip install 'edgeslim[peers]')"
        )
    return tuple(dict.fromkeys(names))


def search_model(
    name: str, out: Path, quick: bool, strategies: tuple[str, ...] | None = None
) -> list[Record]:
    """Every row of the suite for one model (see the module doc); ``strategies`` runs only
    those strategy rows (with the best uniform and the latency table's check; resnet20's
    Ray and accuracy-aware rows only in a whole run)."""
    if name == IMAGENET_MODEL:
        from edgeslim.bench.search_imagenet import imagenet_bench

        b = imagenet_bench(out, quick, strategies)
        records, chosen = _strategy_rows(b)
        return [*records, _latency_row(b, chosen)]
    sizes = QUICK if quick else FULL
    if strategies:
        sizes = dataclasses.replace(sizes, strategies=strategies)
    model = load_zoo_model(name).eval()
    task = search_task(sizes.val_images)
    space = build_space(model, task)
    latency = LutLatency(space, repeats=sizes.latency_repeats, seconds=sizes.latency_seconds)
    latency.calibrate()
    test = load_fashion_mnist("test", limit=sizes.test_images)
    test_batches = TensorBatches(test.images, test.labels, batch_size=500)
    b = SearchBench(
        name, out, sizes, model, space, latency, lambda m: evaluate(m, test_batches),
        len(test), evaluate(model, test_batches), latency.anchors["fp32"], quick=quick,
    )  # fmt: skip
    records, chosen = _strategy_rows(b)
    if strategies:
        return [*records, _latency_row(b, chosen)]
    try:
        records.append(_ray_row(b))
    except SearchError as exc:  # ray is an optional extra: say so in the report
        records.append(b.record(f"edgeslim:{RAY_STRATEGY}@ray", None, 0.0, {"skipped": str(exc)}))
    records += _accuracy_aware_rows(b)
    records.append(_latency_row(b, chosen))
    return records


@register_suite("search")
def search_suite(
    out: Path, quick: bool, models: list[str] | None, strategies: list[str] | None = None
) -> list[Record]:
    only = chosen_strategies(strategies) if strategies else None
    label = "-".join(["progress", *(["quick"] if quick else []), *(only or ())])
    progress = Path(out) / f"{label}.json"  # a run of other strategies never replays these
    names = models or [MODEL, IMAGENET_MODEL]
    records = per_model("search", names, lambda n: search_model(n, out, quick, only), progress)
    shutil.rmtree(journal_dir(out, quick), ignore_errors=True)  # complete: measure afresh next
    return records
