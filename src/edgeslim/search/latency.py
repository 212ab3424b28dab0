"""ONNX Runtime latency of a policy, predicted from the per-layer table (:mod:`edgeslim.cost.lut`).

``LutLatency(space)`` is the :class:`~edgeslim.search.constraints.LatencyPredictor` a search
uses for ``latency<=...`` constraints: a policy's latency is the sum of its layers' kernel
timings (each conv / linear at its pruned shape and the precision ONNX Runtime will run it
in) plus the model's residual (:class:`~edgeslim.cost.lut.Residual`: an addend, or a scale
of the sum where the kernels over-count). :meth:`LutLatency.calibrate` first times the
kernels of the space's likely policies together (:meth:`LutLatency.warm`), then measures the
residual once, on the exported float model and on the exported all-int8 policy timed
interleaved, so both anchors are exact;
:meth:`LutLatency.check` exports other policies and times them interleaved with the float
model to report how far the table's ratio to it is off (``PredictionCheck.max_error``),
which the search record carries.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from edgeslim.cost.latency import (
    DEFAULT_WINDOWS,
    TIMING_SECONDS,
    LatencyStats,
    RatioStats,
    Windows,
)
from edgeslim.cost.lut import (
    LatencyTable,
    LayerKey,
    LayerTime,
    PredictionCheck,
    Residual,
    layer_keys,
    layer_times,
    session_feeds,
)
from edgeslim.graph import layer_table
from edgeslim.graph.layers import LayerInfo
from edgeslim.search.policy import Policy
from edgeslim.search.space import SearchSpace

# Decision (2026-12-06): calibration first times together the kernels of the float model, the
# uniform policies and random policies, drawn until WARM_PATIENCE in a row bring no new
# kernel (WARM_SAMPLES at most): entries timed in a few interleaved runs share the machine's
# state, where asked one policy at a time during a search they would be timed minutes apart.
# resnet20's bench space has 69 int8 kernels, all seen within 40 random policies;
# mobilenetv2-imagenet's 80 within 20 (ad hoc). Kernels never drawn are timed when asked.
WARM_SAMPLES, WARM_PATIENCE = 64, 16


class LutLatency:
    """Predicted ONNX Runtime milliseconds of a policy at the task's example batch.

    Every whole-model timing (:meth:`calibrate`, :meth:`check`, :meth:`measure_against_float`)
    runs each model at least ``repeats`` times and for at least ``seconds`` in all, in
    ``windows`` (:class:`~edgeslim.cost.latency.Windows`: a second window a gap later, a
    third when the first two disagree; the median over them), so that a transient of the
    machine during one window does not decide a whole search's screen."""

    unit = "ms"

    def __init__(
        self,
        space: SearchSpace,
        table: LatencyTable | None = None,
        *,
        repeats: int = 50,
        seconds: float = TIMING_SECONDS,
        windows: Windows = DEFAULT_WINDOWS,
    ) -> None:
        self.space = space
        self.table = table if table is not None else LatencyTable(threads=_threads())
        self.repeats = repeats
        self.seconds = seconds
        self.windows = windows
        self.residual: Residual | None = None
        self.anchors: dict[str, float] = {}  # measured whole-model ms of the anchors
        # each int8 anchor's ratio to fp32 in each calibration window (the spread behind them)
        self.anchor_windows: dict[str, tuple[float, ...]] = {}
        self._base_rows: dict[str, LayerInfo] | None = None

    # --- the layer sum ---------------------------------------------------------------------

    def _rows_and_bits(self, policy: Policy | None) -> tuple[
        dict[str, LayerInfo], dict[str, int | None], Mapping[str, int | None]
    ]:  # fmt: skip
        """The layer table ``policy`` runs (None: the float model) and its bits per layer."""
        space = self.space
        if policy is None:
            if self._base_rows is None:
                self._base_rows = layer_table(space.model, *space.task.example_inputs)
            return self._base_rows, {}, {}
        return space.layer_table(policy), dict(policy.weight_bits), policy.act_bits

    def layers(self, policy: Policy | None) -> LayerTime:
        """Per-layer kernel times of ``policy`` (None: the float model)."""
        return layer_times(self.table, self.space.model, *self._rows_and_bits(policy))

    def keys(self, policy: Policy | None) -> list[LayerKey]:
        """The table keys of ``policy``'s modelled layers (None: the float model)."""
        keys = layer_keys(self.space.model, *self._rows_and_bits(policy))
        return [k for k in keys.values() if k is not None]

    def warm(self, samples: int = WARM_SAMPLES, patience: int = WARM_PATIENCE) -> int:
        """Time together the kernels the table lacks of the float model, the uniform
        policies and up to ``samples`` random ones (drawn until ``patience`` in a row add no
        kernel; seeded by the space); how many were timed."""
        space = self.space
        keys = {k.id(): k for p in [None, *space.uniforms()] for k in self.keys(p)}
        rng, quiet = random.Random(space.seed), 0
        for _ in range(samples if space.dims else 0):
            genes = [rng.randrange(len(d.choices)) for d in space.dims]
            new = {k.id(): k for k in self.keys(space.decode(genes)) if k.id() not in keys}
            keys.update(new)
            quiet = 0 if new else quiet + 1
            if quiet >= patience:
                break
        return self.table.measure(keys.values())

    def predict(self, policy: Policy | None, residual: Residual | None = None) -> float:
        """Predicted milliseconds of ``policy``: its layers' kernel times with the residual
        applied (this table's calibration unless ``residual`` is given); positive."""
        if residual is None:
            if self.residual is None:
                self.calibrate()
            residual = self.residual
        assert residual is not None
        lt = self.layers(policy)
        return residual.predict(lt.total_ms, lt.int8_share)

    def _residual(self, ms: Sequence[float], anchors: Sequence[Policy]) -> Residual:
        """The residual that makes the measurements ``ms`` of the float model and of
        ``anchors`` (:meth:`_int8_anchors`, in order) exact."""
        fp32 = (ms[0], self.layers(None).total_ms)
        pairs = [(m, self.layers(a).total_ms) for m, a in zip(ms[1:], anchors, strict=True)]
        return Residual.fit(fp32, *pairs)

    # --- measuring whole models --------------------------------------------------------------

    def export(self, policy: Policy | None, path: Path) -> Path:
        """The ONNX file ``policy`` deploys as (QDQ when anything is quantized)."""
        from edgeslim.export import export_onnx
        from edgeslim.export.qdq import export_qdq

        example = tuple(self.space.task.example_inputs)
        if policy is None:
            return export_onnx(self.space.model, example, path)
        model: nn.Module = self.space.apply(policy)
        return export_qdq(model, example, path)

    def _int8_anchors(self) -> list[Policy]:
        """The all-int8 policies the residual is fitted on: the least pruned, then (in a
        space that prunes) the one with every channel group at its smallest keep ratio.
        Empty when some layer cannot take 8-bit weights and activations."""
        space = self.space
        if not space.layers or not all(8 in lc.a_bits for lc in space.layers):
            return []
        if not all(8 in lc.w_bits for lc in space.layers):
            return []
        out = [space.uniform(w_bits=8, a_bits=8, keep=1.0)]
        keeps = {g.keep[0] for g in space.channel_groups}
        if len(keeps) == 1 and min(keeps) < 1.0:  # one smallest ratio every group allows
            out.append(space.uniform(w_bits=8, a_bits=8, keep=min(keeps)))
        return out

    def calibrate(self) -> Residual:
        """Measure the float and all-int8 models whole; the residual is what they cost
        beyond their layers. Saves the table's new entries to its cache."""
        self.warm()
        anchors = self._int8_anchors()
        # the probes the cached entries are relative to, then the anchors timed
        # interleaved: apart, each carries its session's drift, and every prediction
        # shares their difference
        self.table.refresh_probes()
        timed = self._time([None, *anchors])
        ms = _milliseconds(timed)
        names = ("fp32", "int8", "int8_narrow")
        self.anchors = dict(zip(names, ms, strict=False))
        self.anchor_windows = {n: r.windows for n, (_, r) in zip(names[1:], timed[1], strict=False)}
        self.residual = self._residual(ms, anchors)
        self.table.save()
        return self.residual

    def _time(
        self, policies: Sequence[Policy | None]
    ) -> tuple[LatencyStats, list[tuple[LatencyStats, RatioStats]]]:
        """The first of ``policies`` (the reference) and each other one with its ratio to
        it, all exported and timed interleaved in :attr:`windows`."""
        from edgeslim.cost.latency import compare_in_windows, ort_runner
        from edgeslim.runtime.ort import ort_session

        example = self.space.task.example_inputs
        with tempfile.TemporaryDirectory() as tmp:
            runners = {}
            for i, p in enumerate(policies):
                sess = ort_session(self.export(p, Path(tmp) / f"m{i}.onnx"), self.table.threads)
                runners[str(i)] = ort_runner(sess, session_feeds(sess, example))
            stats, ratios = compare_in_windows(
                runners, "0", self.windows, repeats=self.repeats, threads=self.table.threads,
                min_seconds=self.seconds, max_repeats=1_000_000,
            )  # fmt: skip
        return stats["0"], [(stats[str(i)], ratios[str(i)]) for i in range(1, len(policies))]

    def measure_many(self, policies: Sequence[Policy | None]) -> list[float]:
        """Milliseconds of ``policies`` (None: the float model), all timed interleaved
        (:func:`edgeslim.cost.compare_in_windows`), so their ratios do not carry the drift
        between separate timing sessions. The first is the reference: its median; each
        other is that median times its median per-round ratio to the first
        (:func:`~edgeslim.cost.latency.ratio_over_rounds`), so the ratios the table is
        anchored on and checked against are the ones a latency limit is verified on."""
        if not policies:
            return []
        return _milliseconds(self._time(policies))

    def measure_against_float(
        self, policies: Sequence[Policy]
    ) -> tuple[LatencyStats, list[tuple[LatencyStats, RatioStats]]]:
        """The float model's timing, and each policy's timing with its round-by-round ratio
        to the float model (:func:`~edgeslim.cost.latency.ratio_over_rounds`), all timed
        interleaved (in :attr:`windows`)."""
        return self._time([None, *policies])

    def check(self, policies: Sequence[Policy]) -> PredictionCheck:
        """Predicted against measured whole-model latency on ``policies``, timed interleaved
        with the float model; errors are of the ratio to it (see :class:`PredictionCheck`).

        The all-int8 anchor is timed in the same run, and the check also carries the errors
        with the residual re-measured there (``reanchored``). Why: on a shared machine the
        int8/float ratio itself drifts between timing sessions (measured here: the same
        anchor at 0.60x at a search's start, near-identical files at 0.49-0.52x 25 minutes
        later), which no per-layer table can predict; the re-anchored errors are the table's
        own (how it composes layers between the anchors), the plain ones include the drift
        since :meth:`calibrate`.
        """
        if not policies:
            return PredictionCheck(())
        if self.residual is None:
            self.calibrate()
        extra = self._int8_anchors()
        ms = self.measure_many([None, *extra, *policies])
        measured = ms[1 + len(extra) :]
        now = self._residual(ms[: 1 + len(extra)], extra)
        rows = [(p.id, self.predict(p), m) for p, m in zip(policies, measured, strict=True)]
        again = [(p.id, self.predict(p, now), m) for p, m in zip(policies, measured, strict=True)]
        self.table.save()
        reanchored = PredictionCheck(tuple(again), (self.predict(None, now), ms[0]), None, now)
        return PredictionCheck(tuple(rows), (self.predict(None), ms[0]), reanchored, self.residual)


def _milliseconds(timed: tuple[LatencyStats, list[tuple[LatencyStats, RatioStats]]]) -> list[float]:
    """The reference's median, then each other model's ratio to it in the reference's ms."""
    base, others = timed
    return [base.median_ms] + [base.median_ms * r.median for _, r in others]


def _threads() -> int:
    from edgeslim.cost.latency import DEFAULT_THREADS

    return DEFAULT_THREADS
