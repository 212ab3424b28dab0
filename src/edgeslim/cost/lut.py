"""A per-layer ONNX Runtime latency table: measured once per machine, cached, summed.

A search scores thousands of policies; exporting and timing each whole model would cost
seconds apiece. Instead each conv / linear layer shape is timed once, alone, as the very
kernel ONNX Runtime runs after fusing our QDQ export (``Conv``/``Gemm`` in float,
``QLinearConv``/``QGemm`` in int8), and a policy's latency is the sum over its layers plus
a **residual**: what the whole model costs beyond its layers (adds, pools, activations,
quantize steps at the edges), measured once on the float and the all-int8 model and
interpolated by the share of MACs that run in int8 (where the layers' sum exceeds the
model, the residual scales the sum instead: see :class:`Residual`).
:func:`check_prediction` measures whole models to report the table's error instead of
trusting it.

Decisions:
- A layer runs in int8 when its weights have <= 8 bits *and* its input is quantized
  (ONNX Runtime has no int4/int2 kernel: 4- and 2-bit weights run as int8). A weight-only
  quantized layer (float input) is its own precision, ``w8a32``: ONNX Runtime keeps the
  weights' ``DequantizeLinear`` and runs it at every call, and the float conv then reads a
  weight that is no longer constant, so the pre-reordered (NCHWc) kernel of the float
  model is not used. Timed as the float kernel, a weight-only W4/8 policy of a small CNN
  was predicted at 1.00x fp32 and measured at 1.55x (ad hoc, 2026-12-01). Its entries are
  relative to the float probe.
- A kernel's time is **differential**: a model of ``COPIES`` copies of the node on the same
  input, minus the one-copy model, over ``COPIES - 1``. What a lone-kernel session costs
  beyond the kernel (binding the input, returning the output, waking the thread pool) is
  paid once per run in both and cancels. Measured on resnet20 at 1x28x28 (int8 whole model
  0.18 ms): one-copy timings minus an empty ``session.run`` summed to twice the whole
  model (0.36 ms), and predicted pruned policies faster than unpruned ones while inside
  the model they are slower; the differential sum is 0.24 ms, and pruned > unpruned as
  measured. The per-call overhead is counted once per model, in the residual.
- Entries are stored **relative to a probe kernel** of the same precision (a 3x3 conv,
  16 -> 16 channels at 14x14), timed in the same interleaved run as the kernel, and turned
  back into milliseconds with the probe as this table instance times it. Why: the entries
  of one table are timed minutes or sessions apart, and on a shared machine a kernel's
  time moves by up to +-50% with the machine's state. A table whose 16-channel entries
  were timed in a fast phase and 12-channel ones in a slow phase put a pruned resnet20
  (12/24/48 channels) at 1.10x fp32 where it measured 0.80x, while both kernels, timed
  together, differ as they do inside the model (differential 24 us and 39 us; in-model,
  profiled interleaved, 28 us and 40 us; ad hoc, 2026-12-01). The probe is per precision
  because the machine's state moves int8 and float kernels differently.
- An entry is timed for at least :data:`KERNEL_SECONDS` per model, in windows
  (:data:`KERNEL_WINDOWS`: until two agree within 10%, three at most, the median), as whole
  models are (:class:`~edgeslim.cost.latency.Windows`). Until 2026-12-06 an entry was 30
  calls per model, a few milliseconds: in that day's ``bench search`` run resnet20 at W4A8
  keep 0.5, which the run before had predicted within 2%, was predicted at the unpruned
  model's 0.506x fp32 and measured at 0.428x (18% off, 19% re-anchored: the table's own
  entries, not the anchors); its 9 kernels, timed 5 times each that way, read 1.2-2.6x
  apart, and 1.02-1.36x apart timed for half a second (ad hoc).
- Missing entries are timed **together** (:meth:`LatencyTable.measure`): up to
  :data:`KERNEL_CHUNK` kernels and their probes in one interleaved run, and a search's
  calibration first asks for every kernel of the uniform and of sampled random policies
  (:meth:`edgeslim.search.latency.LutLatency.warm`). Timed one by one, even for half a
  second each, the entries of one policy were timed minutes apart and a 12-channel int8
  kernel of resnet20 came out below the 16-channel one in one process and 1.4x above it in
  others (1.5x in one long interleaved run; inside the model, profiled, 1.27x).
- Layers the table does not model (recurrent, attention, transposed convs) fall into the
  residual: constant across policies; ``LatencyTable.unmodelled`` names them.
- The cache is a JSON file per machine fingerprint (CPU model, ONNX Runtime version,
  threads) in ``cache_dir`` (``EDGESLIM_CACHE``, else ``~/.cache/edgeslim``); entries are
  added as new shapes are asked, and the file is rewritten atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.cost.latency import DEFAULT_THREADS, Windows, until_agreement
from edgeslim.graph.layers import LayerInfo
from edgeslim.progress import log_step
from edgeslim.runtime.denormal import denormal_mode

FP32, INT8, WONLY = "fp32", "int8", "w8a32"
MS = "com.microsoft"
COPIES = 8  # nodes in the many-copy model of a differential timing
# bumped when what an entry means or how well it is measured changes (2: differential,
# 3: per probe, 4: timed for KERNEL_SECONDS in KERNEL_WINDOWS, 5: timed together)
TABLE_VERSION = 5
# Decision (2026-12-06): a kernel's entry is timed for at least half a second per model, in
# windows 0.2 s apart until two agree within 10% (three at most; the median). Timed as 30
# calls per model (a few milliseconds), resnet20's 9 kernels of its W4A8 keep-0.5 policy
# read 1.2-2.6x apart (max over min) in 5 timings each; for half a second, 1.02-1.36x
# (ad hoc, 2026-12-06). A wrong entry stays in the cache for every search that reads it.
KERNEL_SECONDS = 0.5
KERNEL_WINDOWS = Windows(most=3, gap=0.2, agree=0.10)
# kernels timed together in one interleaved run, with their probes (why: the module doc)
KERNEL_CHUNK = 12


@dataclass(frozen=True)
class LayerKey:
    """One timed kernel: a conv (1-D, 2-D or 3-D) or a linear layer at one shape and
    precision."""

    kind: str  # "conv" or "linear"
    cin: int
    cout: int
    spatial: tuple[int, ...]  # input spatial size (conv) or () (linear)
    rows: int  # batch (conv) or batch x tokens (linear)
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    precision: str = FP32

    def id(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def probe_precision(precision: str) -> str:
    """The probe a precision's entries are scaled by: int8's own, else the float one
    (weight-only layers run float kernels)."""
    return INT8 if precision == INT8 else FP32


def probe_key(precision: str) -> LayerKey:
    """The reference kernel entries of ``precision`` are stored relative to."""
    return LayerKey("conv", 16, 16, (14, 14), 1, (3, 3), (1, 1), (1, 1), (1, 1), 1,
                    probe_precision(precision))  # fmt: skip


def layer_key(module: nn.Module, row: LayerInfo, precision: str) -> LayerKey | None:
    """The table key of a layer, or None when the table does not model its type.

    Channel counts come from ``row`` (the layer table of the model as it runs), not from
    the module, so the key of a pruned layer can be read off the unpruned module's kernel
    geometry with the pruned table's shapes (a depthwise conv stays depthwise, a grouped conv
    keeps its channels per group).
    """
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(module.padding, tuple):
        n = module.weight.dim() - 2
        cin, cout = int(row.in_shape[1]), int(row.out_shape[1])
        per = module.in_channels // module.groups  # a grouped conv loses whole groups
        groups = 1 if module.groups == 1 else max(cin // per, 1)
        return LayerKey(
            "conv", cin, cout, tuple(row.in_shape[2:]), int(row.in_shape[0]),
            _tuple(module.kernel_size, n), _tuple(module.stride, n), _tuple(module.padding, n),
            _tuple(module.dilation, n), groups, precision,
        )  # fmt: skip
    if isinstance(module, nn.Linear):
        rows = int(np.prod(row.in_shape[:-1])) if len(row.in_shape) > 1 else 1
        return LayerKey("linear", int(row.in_shape[-1]), int(row.out_shape[-1]), (), rows,
                        precision=precision)  # fmt: skip
    return None


def _kernel_model(key: LayerKey, copies: int = 1) -> tuple[bytes, dict[str, np.ndarray]]:
    """An ONNX model running ``key``'s kernel ``copies`` times on the same input (outputs
    ``y``, or ``y0 ... y{copies-1}``), and its feeds."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    int8 = key.precision == INT8
    inits: list[Any] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    if key.kind == "conv":
        shape = [key.rows, key.cin, *key.spatial]
        wshape = [key.cout, key.cin // key.groups, *key.kernel]
        attrs: dict[str, Any] = {"kernel_shape": list(key.kernel), "strides": list(key.stride),
                 "pads": list(key.padding) * 2, "dilations": list(key.dilation),
                 "group": key.groups}  # fmt: skip
    else:
        shape = [key.rows, key.cin]
        wshape = [key.cout, key.cin]
        attrs = {"transB": 1}
    domain = ""
    if int8:
        x = rng.integers(0, 255, shape, dtype=np.uint8)
        w = const("w", rng.integers(-127, 127, wshape, dtype=np.int8))
        qparams = [const("xs", np.array(0.02, np.float32)), const("xz", np.array(0, np.uint8))]
        bias = const("b", np.zeros(key.cout, np.int32))
        yparams = [const("ys", np.array(0.05, np.float32)), const("yz", np.array(0, np.uint8))]
        if key.kind == "conv":  # per-channel weight scales, as our export writes them
            wparams = [const("ws", np.full(key.cout, 0.01, np.float32)),
                       const("wz", np.zeros(key.cout, np.int8))]  # fmt: skip
            # the channels-last kernel ORT's NHWC transformer runs inside a model: a lone
            # NCHW QLinearConv would be timed with a Transpose on each side
            op, inputs, domain = "QLinearConv", ["x", *qparams, w, *wparams, *yparams, bias], MS
            attrs["channels_last"] = 1
            shape = [key.rows, *key.spatial, key.cin]
            x = rng.integers(0, 255, shape, dtype=np.uint8)
        else:  # the kernel ORT fuses DQ -> Gemm -> Q into
            wparams = [const("ws", np.array(0.01, np.float32)), const("wz", np.array(0, np.int8))]
            op, domain = "QGemm", MS
            inputs = ["x", *qparams, w, *wparams, bias, *yparams]
        elem_in, elem_out = TensorProto.UINT8, TensorProto.UINT8
    else:
        x = rng.standard_normal(shape).astype(np.float32)
        w = "w"  # weight-only: each copy's dequantized int8 weight instead, below
        if key.precision != WONLY:
            const(w, rng.standard_normal(wshape).astype(np.float32))
        bias = const("b", np.zeros(key.cout, np.float32))
        op, inputs = ("Conv" if key.kind == "conv" else "Gemm"), ["x", w, bias]
        elem_in = elem_out = TensorProto.FLOAT
    outs = ["y"] if copies == 1 else [f"y{i}" for i in range(copies)]
    if key.precision != WONLY:
        nodes = [helper.make_node(op, inputs, [o], domain=domain, **attrs) for o in outs]
    else:  # each layer dequantizes its own int8 weight at every call
        nodes = []
        scale = const("ws", np.full(key.cout, 0.01, np.float32))
        zero = const("wz", np.zeros(key.cout, np.int8))
        for i, o in enumerate(outs):
            wq = const(f"wq{i}", rng.integers(-127, 127, wshape, dtype=np.int8))
            nodes.append(helper.make_node("DequantizeLinear", [wq, scale, zero], [f"w{i}"], axis=0))
            nodes.append(helper.make_node(op, ["x", f"w{i}", bias], [o], **attrs))
    graph = helper.make_graph(
        nodes, "kernel", [helper.make_tensor_value_info("x", elem_in, shape)],
        [helper.make_tensor_value_info(o, elem_out, None) for o in outs], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model.SerializeToString(), {"x": x}


def _empty_model() -> tuple[bytes, dict[str, np.ndarray]]:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "empty",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), {"x": np.zeros(1, np.float32)}


def _time_ms(model: bytes, feeds: Mapping[str, np.ndarray], threads: int, repeats: int) -> float:
    from edgeslim.runtime.ort import ort_session

    return _run_ms(ort_session(model, threads), feeds, repeats)


def _differentials(
    keys: Sequence[LayerKey], threads: int, repeats: int, seconds: float = 0.0
) -> list[float]:
    """Each kernel's differential milliseconds (``COPIES`` copies minus one, over
    ``COPIES - 1``), every model timed interleaved in one run of at least ``seconds``."""
    from edgeslim.cost.latency import compare_latency, ort_runner
    from edgeslim.runtime.ort import ort_session

    runners = {}
    for i, key in enumerate(keys):
        for copies in (1, COPIES):
            model, feeds = _kernel_model(key, copies)
            runners[f"{i}x{copies}"] = ort_runner(ort_session(model, threads), feeds)
    stats = compare_latency(runners, warmup=3, repeats=repeats, threads=threads,
                            min_seconds=seconds, max_repeats=1_000_000)  # fmt: skip
    return [
        max(0.0, (stats[f"{i}x{COPIES}"].median_ms - stats[f"{i}x1"].median_ms) / (COPIES - 1))
        for i in range(len(keys))
    ]


def _run_ms(sess: Any, feeds: Mapping[str, np.ndarray], repeats: int) -> float:
    """Median milliseconds of ``sess.run`` after a warm-up, denormals flushed as in
    :func:`~edgeslim.cost.latency.compare_latency`."""
    with denormal_mode(flush=True):
        for _ in range(max(3, repeats // 5)):
            sess.run(None, dict(feeds))
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, dict(feeds))
            samples.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(samples))


def machine_fingerprint(threads: int) -> str:
    """CPU model, ONNX Runtime version and thread count: what a timing depends on."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}|{os.cpu_count()}|onnxruntime {ort.__version__}|threads {threads}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    env = os.environ.get("EDGESLIM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgeslim"


class LatencyTable:
    """Per-layer kernel latencies (ms) for this machine, measured on demand and cached."""

    def __init__(
        self,
        threads: int = DEFAULT_THREADS,
        repeats: int = 30,
        cache_dir: Path | str | None = None,
    ) -> None:
        self.threads = threads
        self.repeats = repeats
        self.fingerprint = machine_fingerprint(threads)
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.path = base / f"latency-v{TABLE_VERSION}-{self.fingerprint}.json"
        self._entries: dict[str, float] = {}
        self._overhead: float | None = None
        self._probes: dict[str, float] = {}
        self.measured = 0  # kernels timed by this instance (the rest came from the cache)
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self._entries = {str(k): float(v) for k, v in data["layers"].items()}
                self._overhead = float(data["overhead_ms"])
            except (ValueError, KeyError, TypeError):
                self._entries, self._overhead = {}, None  # unreadable: measure afresh

    @property
    def overhead_ms(self) -> float:
        """The cost of one empty ``session.run`` (what a model pays once per call)."""
        if self._overhead is None:
            self._overhead = _time_ms(*_empty_model(), self.threads, self.repeats * 3)
        return self._overhead

    def probe_ms(self, precision: str) -> float:
        """The probe kernel's differential milliseconds now (timed once per instance, or
        again by :meth:`refresh_probes`): the scale of every entry of ``precision``."""
        if precision not in self._probes:
            self.refresh_probes()
        return self._probes[precision]

    def refresh_probes(self) -> None:
        """Time both probes again, together: call right before the whole-model timings a
        prediction is anchored on, so both see the same state of the machine."""
        keys = [probe_key(FP32), probe_key(INT8)]
        fp32, int8 = _differentials(keys, self.threads, self.repeats, KERNEL_SECONDS)
        self._probes = {FP32: max(fp32, 1e-6), INT8: max(int8, 1e-6)}

    def relative(self, key: LayerKey) -> float:
        """The kernel's differential time over its precision's probe (see :meth:`measure`),
        read from the cache once timed."""
        self.measure([key])
        return self._entries[key.id()]

    def measure(self, keys: Iterable[LayerKey]) -> int:
        """Time the kernels of ``keys`` the table does not have yet, together: in runs of
        at most :data:`KERNEL_CHUNK` kernels interleaved with the probes of their precisions,
        each for :data:`KERNEL_SECONDS` per kernel, in :data:`KERNEL_WINDOWS` (until two
        windows agree within 10% on every kernel; the median). Returns how many were timed.

        Why together: timed one at a time, an entry carries the machine's state of its own
        moment, and a policy's sum adds entries timed minutes apart (see the module doc).
        """
        missing = list({k.id(): k for k in keys if k.id() not in self._entries}.values())
        for key in [k for k in missing if k == probe_key(k.precision)]:
            self._entries[key.id()] = 1.0  # the probe over itself
            missing.remove(key)
        chunks = [missing[i : i + KERNEL_CHUNK] for i in range(0, len(missing), KERNEL_CHUNK)]
        if len(chunks) > 1:
            log_step(f"latency table: timing {len(missing)} kernels in {len(chunks)} runs")
        for chunk in chunks:
            for key, value in zip(chunk, self._time_together(chunk), strict=True):
                self._entries[key.id()] = value
            self.measured += len(chunk)
        return len(missing)

    def _time_together(self, chunk: Sequence[LayerKey]) -> list[float]:
        """Each kernel of ``chunk`` over its precision's probe, all timed in one interleaved
        run per window; the median over the windows."""
        probes = list(dict.fromkeys(probe_key(k.precision) for k in chunk))
        at = {p: len(chunk) + i for i, p in enumerate(probes)}

        def ratios(run: list[float]) -> list[float]:
            return [run[i] / max(run[at[probe_key(k.precision)]], 1e-6)
                    for i, k in enumerate(chunk)]  # fmt: skip

        runs = until_agreement(
            lambda: ratios(_differentials([*chunk, *probes], self.threads, self.repeats,
                                          KERNEL_SECONDS * len(chunk))),
            lambda r: {str(i): v for i, v in enumerate(r)},
            KERNEL_WINDOWS,
        )  # fmt: skip
        return [statistics.median(r[i] for r in runs) for i in range(len(chunk))]

    def layer_ms(self, key: LayerKey) -> float:
        """The kernel's latency inside a model, in ms: its cached time relative to the probe
        (see the module doc) times the probe as this instance timed it."""
        return self.relative(key) * self.probe_ms(probe_precision(key.precision))

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        payload = {"fingerprint": self.fingerprint, "threads": self.threads,
                   "version": TABLE_VERSION,
                   "overhead_ms": self.overhead_ms, "layers": self._entries}  # fmt: skip
        tmp.write_text(json.dumps(payload, indent=0, sort_keys=True))
        tmp.replace(self.path)
        return self.path

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class LayerTime:
    """A model's predicted latency split into its modelled layers."""

    layers: dict[str, float]  # fqn -> ms
    int8_macs: int
    macs: int
    unmodelled: tuple[str, ...]

    @property
    def total_ms(self) -> float:
        return float(sum(self.layers.values()))

    @property
    def int8_share(self) -> float:
        return self.int8_macs / self.macs if self.macs else 0.0


def runs_int8(w_bits: int | None, a_bits: int | None) -> bool:
    """Whether ONNX Runtime runs the layer on an integer kernel (see module doc)."""
    return w_bits is not None and w_bits <= 8 and a_bits is not None and a_bits <= 8


def layer_keys(
    model: nn.Module,
    rows: Mapping[str, LayerInfo],
    w_bits: Mapping[str, int | None],
    a_bits: Mapping[str, int | None],
) -> dict[str, LayerKey | None]:
    """The table key of each layer of ``rows`` that computes (None: a type the table does
    not model), at its precision under these bits."""
    keys: dict[str, LayerKey | None] = {}
    for fqn, row in rows.items():
        if not row.macs:
            continue
        int8 = runs_int8(w_bits.get(fqn), a_bits.get(fqn))
        weight_only = not int8 and w_bits.get(fqn) is not None
        precision = INT8 if int8 else WONLY if weight_only else FP32
        keys[fqn] = layer_key(model.get_submodule(fqn), row, precision)
    return keys


def layer_times(
    table: LatencyTable,
    model: nn.Module,
    rows: Mapping[str, LayerInfo],
    w_bits: Mapping[str, int | None],
    a_bits: Mapping[str, int | None],
) -> LayerTime:
    """Per-layer kernel latencies of ``model`` (its layer table ``rows``) at these bits;
    the kernels the table is missing are timed together first (:meth:`LatencyTable.measure`)."""
    keys = layer_keys(model, rows, w_bits, a_bits)
    table.measure(k for k in keys.values() if k is not None)
    times: dict[str, float] = {}
    unmodelled: list[str] = []
    int8_macs = macs = 0
    for fqn, key in keys.items():
        macs += rows[fqn].macs
        if key is None:
            unmodelled.append(fqn)
            continue
        times[fqn] = table.layer_ms(key) * rows[fqn].calls
        int8_macs += rows[fqn].macs if key.precision == INT8 else 0
    return LayerTime(times, int8_macs, macs, tuple(unmodelled))


@dataclass(frozen=True)
class Residual:
    """Whole-model latency beyond the modelled layers, at the float and the all-int8 anchor.

    Each anchor contributes what its whole-model measurement costs beyond its layers' sum:
    ``*_ms`` added when the measurement exceeds the sum (adds, pools, activations, the
    quantize steps at the edges), or ``*_scale`` (measured / sum, below 1) when the sum
    exceeds the measurement. Why not a negative addend: on a model whose kernels take a few
    microseconds (the tests' 8x8 digits CNN, 0.03 ms whole) the differential kernel timings
    over-count, and an additive residual of -0.05 ms predicted a lighter policy at -0.030 ms
    (CI run of 2026-12-04). Scaling keeps both anchors exact and every prediction of a
    non-negative layer sum positive. A policy between the anchors interpolates both parts
    by its share of MACs in int8.

    With a third anchor, the narrowest all-int8 policy of a space that prunes, the int8
    part is the line through both int8 anchors (``int8_scale`` its slope, ``int8_ms`` its
    intercept, which may be negative). Why: a scale alone shrinks the per-op cost that
    pruning does not remove along with the kernels; on resnet20 (int8 scale 0.66) two
    keep-0.5 policies were predicted at 0.35x and 0.39x fp32 and measured at 0.45x and
    0.55x (the first ``benchmarks/search_resnet20`` run, commit a0cdb8a). An int8
    prediction stays at or above ``floor_ms`` (half the narrow anchor; in proportion for a
    mixed one), as the line is only measured between its anchors.

    Tried and not kept: a broken line with a knot at every keep ratio all groups allow
    (resnet20's bench space: also keep 0.75). It made the keep-0.75 uniform policies exact
    (0.503x -> 0.523x predicted, 0.529-0.543x measured) but those are its own anchors; on
    four random policies, the ones it had not measured, its ratio error averaged 2.7%
    against the line's 2.1% (max 7.8% against 3.9%), for one more whole-model timing per
    calibration and check (ad hoc, 2026-12-05, 13 policies timed interleaved).
    """

    fp32_ms: float
    int8_ms: float
    fp32_scale: float = 1.0
    int8_scale: float = 1.0
    floor_ms: float = 0.0

    @classmethod
    def fit(
        cls, fp32: tuple[float, float], int8: tuple[float, float] | None = None,
        narrow: tuple[float, float] | None = None,
    ) -> Residual:  # fmt: skip
        """From the ``(measured, layer sum)`` milliseconds of the float anchor, of the
        all-int8 anchor (None: the float anchor's residual serves both) and of the narrowest
        all-int8 policy (``narrow``; ignored when its layer sum is not below the int8
        anchor's or the line through both would not rise with the sum)."""

        def part(measured: float, layers: float) -> tuple[float, float]:
            if measured >= layers or layers <= 0:
                return measured - max(layers, 0.0), 1.0
            return 0.0, measured / layers

        f_ms, f_scale = part(*fp32)
        i_ms, i_scale = (f_ms, f_scale) if int8 is None else part(*int8)
        if int8 is not None and narrow is not None and narrow[1] < int8[1]:
            slope = (int8[0] - narrow[0]) / (int8[1] - narrow[1])
            if slope > 0:
                return cls(f_ms, int8[0] - slope * int8[1], f_scale, slope, narrow[0] / 2)
        return cls(f_ms, i_ms, f_scale, i_scale)

    def predict(self, layers_ms: float, int8_share: float) -> float:
        """Whole-model milliseconds of layers summing to ``layers_ms`` with ``int8_share``
        of their MACs in int8."""

        def lerp(a: float, b: float) -> float:
            return a + (b - a) * int8_share

        ms = layers_ms * lerp(self.fp32_scale, self.int8_scale) + lerp(self.fp32_ms, self.int8_ms)
        return max(ms, self.floor_ms * int8_share)

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 5) for k, v in asdict(self).items()}


def session_feeds(sess: Any, example_inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """``example_inputs`` as numpy feeds named by the session's inputs, in order."""
    names = [i.name for i in sess.get_inputs()]
    return {n: x.detach().numpy() for n, x in zip(names, example_inputs, strict=False)}


@dataclass(frozen=True)
class PredictionCheck:
    """Predicted against measured whole-model latency, per checked policy.

    ``reference``: the float model's (predicted, measured) milliseconds, measured in the
    same interleaved timing as the rows. The errors compare **ratios to it**, which is what
    a relative constraint (``latency<=0.6x``) reads, and which cancels the 10-30% drift
    between timing sessions of this machine that milliseconds taken at different moments
    carry. Without a reference, the errors compare milliseconds.
    """

    rows: tuple[tuple[str, float, float], ...]  # (label, predicted ms, measured ms)
    reference: tuple[float, float] | None = None
    reanchored: PredictionCheck | None = None  # the same rows, residual re-timed with them
    residual: Residual | None = None  # the residual the predictions were made with

    def _ratios(self) -> list[tuple[float, float]]:
        if self.reference is None:
            return [(p, m) for _, p, m in self.rows]
        rp, rm = (max(v, 1e-12) for v in self.reference)
        return [(p / rp, m / rm) for _, p, m in self.rows]

    @property
    def errors(self) -> list[float]:
        return [abs(p - m) / m for p, m in self._ratios() if m > 0]

    @property
    def max_error(self) -> float:
        return max(self.errors, default=0.0)

    @property
    def mean_error(self) -> float:
        errs = self.errors
        return sum(errs) / len(errs) if errs else 0.0

    def to_dict(self) -> dict[str, Any]:
        ratios = self._ratios() if self.reference is not None else [(None, None)] * len(self.rows)
        rows = [
            {"policy": lbl, "predicted_ms": round(p, 4), "measured_ms": round(m, 4),
             "predicted_ratio": None if pr is None else round(pr, 4),
             "measured_ratio": None if mr is None else round(mr, 4)}
            for (lbl, p, m), (pr, mr) in zip(self.rows, ratios, strict=True)
        ]  # fmt: skip
        ref = None if self.reference is None else [round(v, 4) for v in self.reference]
        return {"rows": rows, "reference_ms": ref, "errors_of": "ratio" if ref else "ms",
                "max_error": round(self.max_error, 4),
                "mean_error": round(self.mean_error, 4),
                **({} if self.residual is None else {"residual": self.residual.to_dict()}),
                **({} if self.reanchored is None
                   else {"reanchored": self.reanchored.to_dict()})}  # fmt: skip
