"""Fit each pruned layer back to its unpruned self on calibration inputs (least squares).

Removing input channels from a layer changes what it computes; the layers after it then see
inputs they were not trained on, and BatchNorm statistics stop matching. Before any
fine-tuning, each layer that lost input channels is refitted so that, fed what the pruned
model now gives it, it reproduces the unpruned layer's output on the channels it keeps:

    W* = argmin_W ||Y_dense[kept outputs] - A_pruned W||^2 + lam mean(diag(A^T A)) ||W - W0||^2

``A_pruned`` is the pruned layer's input (unfolded into patches for a conv), ``Y_dense`` the
unpruned layer's output on the same samples (bias included in the fit when the layer has
one), ``W0`` the pruned layer's weights as they are (so that a layer with fewer calibration
rows than weights per output stays near them). Layers are fitted in the order they run, each
on the inputs the already refitted layers produce, so errors do not pile up (ThiNet, Luo et
al. 2017; He et al. 2017's channel pruning reconstruction). It reads calibration inputs only,
no labels.

Decision — what is fitted: plain linears and ungrouped 1-D/2-D/3-D convs that lost input
channels. A depthwise conv loses its channels whole (nothing to refit) and other
layers keep their inputs; they are listed in the report as skipped with the reason.

Decision — a layer called more than once per forward (a shared encoder, one MLP on two
pooled maps) is fitted on the rows of every call together: one weight serves them all. The
inputs of its later calls are read with its weights as they were before the fit (a call
that feeds on an earlier call's output sees that output unrefitted).

Decision — one forward per batch, not one per layer: the pruned model runs every
calibration batch at once, each in its own thread, and the threads meet at each layer to
refit (:func:`_fit_in_lockstep`): the layer is fitted on every batch's input, its new
weights written, and the forwards go on from there. Refitting a layer from a fresh forward
instead costs the model's prefix once per layer and batch: 81 of the 107 s an evaluation of
a pruned MobileNetV2 took in a search (28 layers, 4 batches of 32 crops at 224; ad hoc,
2026-12-04). The fits are the same (same rows, same batch order). Every batch's
activations are then alive together, so this runs only when their estimate (the largest
layer output of one batch, times three, times the batches) stays under
``max_lockstep_bytes``, and when every refitted layer runs once per forward; otherwise each
layer is fitted from its own forwards, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import input_batches
from edgeslim.errors import PruneError
from edgeslim.graph.patches import input_rows, num_rows, output_rows, rows_supported
from edgeslim.progress import progress_bar

Positions = tuple[torch.Tensor | None, torch.Tensor | None]  # (kept outputs, kept inputs)
ROWS_PER_BATCH = 4096  # sampled output positions per batch and layer (all when fewer)
LOCKSTEP_BYTES = 4 << 30  # estimated activations of all batches in flight at once (4 GiB)


@dataclass(frozen=True)
class LayerFit:
    """One refitted layer: its output error relative to the unpruned output's energy, before
    and after the fit, and the rows (output positions) it was fitted on."""

    fqn: str
    rows: int
    error_before: float
    error_after: float


@dataclass
class ReconstructReport:
    """What :func:`reconstruct_` refitted, and what it left and why."""

    layers: list[LayerFit] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def mean_errors(self) -> tuple[float, float]:
        """Mean relative output error of the refitted layers, before and after their fit."""
        n = len(self.layers) or 1
        return (sum(f.error_before for f in self.layers) / n,
                sum(f.error_after for f in self.layers) / n)  # fmt: skip

    def summary(self) -> str:
        if not self.layers:
            return "reconstruct: no layer refitted"
        before, after = self.mean_errors()
        return (
            f"reconstruct: {len(self.layers)} layers refitted, mean relative output error "
            f"{before:.3f} -> {after:.3f}"
            + (f" ({len(self.skipped)} pruned layers left as they are)" if self.skipped else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [vars(f) for f in self.layers],
            "skipped": dict(self.skipped),
        }


FEW_ROWS = 4  # rows per weight of a row under which a fit is cross-validated
RIDGE_STEPS = (1.0, 10.0, 100.0, 1000.0)  # multiples of the ridge the cross-validation tries


class _Normal:
    """The normal equations of one set of rows: ``A^T A``, ``A^T Y``, ``Y^T Y`` (float64)."""

    def __init__(self, d: int, outputs: int) -> None:
        self.gram = torch.zeros(d, d, dtype=torch.float64)
        self.cross = torch.zeros(d, outputs, dtype=torch.float64)
        self.yty = torch.zeros((), dtype=torch.float64)

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        # products in float32 (the costly part: rows x d^2), sums over batches in float64
        self.gram += (a.T @ a).double()
        self.cross += (a.T @ y).double()
        self.yty += (y.double() * y.double()).sum()

    def __add__(self, other: _Normal) -> _Normal:
        out = _Normal(*self.cross.shape)
        out.gram, out.cross = self.gram + other.gram, self.cross + other.cross
        out.yty = self.yty + other.yty
        return out

    def error(self, w: torch.Tensor) -> float:
        """``||Y - A w||^2`` relative to ``||Y||^2``."""
        sq = self.yty - 2 * (w * self.cross).sum() + (w * (self.gram @ w)).sum()
        return float(sq) / (float(self.yty) or 1.0)

    def solve(self, ridge: float, toward: torch.Tensor) -> torch.Tensor:
        """The ridge pulls towards ``toward`` (the pruned weights), not towards zero: where
        the rows are few (a classifier with more inputs than calibration samples) the fit
        stays near them."""
        lam = ridge * (float(self.gram.diagonal().mean()) or 1.0)
        eye = torch.eye(len(self.gram), dtype=self.gram.dtype)
        return torch.linalg.solve(self.gram + lam * eye, self.cross + lam * toward)


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


def _why_not(module: nn.Module) -> str | None:
    why = rows_supported(module)
    if why is not None and why.startswith("grouped"):
        return f"{why}: its channels go whole"
    return why


def _capture(
    model: nn.Module, module: nn.Module, inputs: Sequence[torch.Tensor], calls: int
) -> list[torch.Tensor]:
    """``module``'s input at each of its first ``calls`` calls in ``model(*inputs)``,
    stopping the forward after the last of them."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        got.append(args[0].detach())
        if len(got) == calls:
            raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(*inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if len(got) != calls:
        raise PruneError(
            f"reconstruct: a refitted layer ran {len(got)} time(s) on a calibration batch in "
            f"the pruned model, {calls} in the unpruned one"
        )
    return got


def _run_order(
    model: nn.Module, fqns: Iterable[str], inputs: Sequence[torch.Tensor]
) -> tuple[list[str], int]:
    """``fqns`` in the order their modules first run on ``inputs`` (never-run ones dropped),
    and the bytes of the largest tensor a leaf module outputs on them."""
    wanted = set(fqns)
    order: list[str] = []
    largest = [0]

    def note(name: str, out: Any) -> None:
        if name in wanted and name not in order:
            order.append(name)
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    handles = [
        m.register_forward_hook(lambda _m, _a, o, n=name: note(n, o))
        for name, m in model.named_modules()
        if name in wanted or not any(True for _ in m.children())
    ]
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return order, largest[0]


@torch.no_grad()
def reconstruct_(
    pruned: nn.Module,
    dense: nn.Module,
    kept: Mapping[str, Positions],
    calibration: Iterable[Any],
    *,
    ridge: float = 1e-3,
    rows_per_batch: int = ROWS_PER_BATCH,
    seed: int = 0,
    progress: bool = True,
    max_lockstep_bytes: int = LOCKSTEP_BYTES,
) -> ReconstructReport:
    """Refit, in place, every layer of ``pruned`` that lost input channels (see module doc).

    ``kept``: per pruned module FQN, the ``(output, input)`` positions it keeps of the
    unpruned module's (:meth:`edgeslim.prune.Surgery.kept_positions`, taken before the
    surgery is applied). ``calibration``: input batches (a tensor or tuple of tensors each,
    or ``(inputs, target)`` pairs; targets are ignored). ``ridge`` regularises the fit
    relative to the input energy; each layer is fitted on at most ``rows_per_batch`` output
    positions per batch, drawn with ``seed`` (only their patches are read: the whole
    unfolded input is never built). The batches run at once when their activations'
    estimate fits ``max_lockstep_bytes`` (see the module doc; 0 fits each layer from its
    own forwards, one batch in memory at a time). Raises
    :class:`PruneError` when no layer lost input channels (nothing to refit) or a kept map
    does not fit the model.
    """
    batches = list(input_batches(calibration))
    if not batches:
        raise PruneError("reconstruct: the calibration data is empty")
    modules = dict(pruned.named_modules())
    report = ReconstructReport()
    fit: list[str] = []
    for fqn, (_out_idx, in_idx) in kept.items():
        if in_idx is None:
            continue
        if fqn not in modules:
            raise PruneError(f"reconstruct: the pruned model has no module `{fqn}`")
        why = _why_not(modules[fqn])
        if why is None:
            fit.append(fqn)
        else:
            report.skipped[fqn] = why
    if not fit:
        raise PruneError(
            "reconstruct: no pruned layer lost input channels that can be refitted "
            f"({len(report.skipped)} skipped); nothing to do"
        )
    was_training = (pruned.training, dense.training)
    pruned.eval()
    dense.eval()
    try:
        order, largest = _run_order(dense, fit, batches[0])
        for fqn in fit:
            if fqn not in order:  # said, not silently left as cut
                report.skipped[fqn] = "did not run on the calibration inputs"
        if not order:
            raise PruneError(
                "reconstruct: none of the layers to refit ran on the calibration inputs"
            )
        with progress_bar(transient=not progress) as bar:
            task = bar.add_task("reconstruct", total=len(order) + 1, visible=progress)
            targets = _dense_targets(dense, order, kept, batches, rows_per_batch, seed)
            bar.advance(task)
            once = all(calls == 1 for fqn in order for calls, _, _ in targets[fqn])
            if len(batches) > 1 and once and 3 * largest * len(batches) <= max_lockstep_bytes:
                fits = _fit_in_lockstep(
                    pruned, [(fqn, modules[fqn]) for fqn in order], batches, targets, ridge,
                    lambda: bar.advance(task),
                )  # fmt: skip
                report.layers.extend(fits)
            else:
                for fqn in order:
                    captured = (_capture(pruned, modules[fqn], b, c) for b, (c, _, _) in
                                zip(batches, targets[fqn], strict=True))  # fmt: skip
                    report.layers.append(
                        _fit_layer(fqn, modules[fqn], captured, targets[fqn], ridge)
                    )
                    bar.advance(task)
    finally:
        pruned.train(was_training[0])
        dense.train(was_training[1])
    return report


# per batch: the layer's calls, the sampled output positions over them (None: all) and the
# unpruned outputs there
_Targets = list[tuple[int, torch.Tensor | None, torch.Tensor]]


def _dense_targets(
    dense: nn.Module,
    order: Sequence[str],
    kept: Mapping[str, Positions],
    batches: Sequence[Sequence[torch.Tensor]],
    rows_per_batch: int,
    seed: int,
) -> dict[str, _Targets]:
    """One pass of the unpruned model: each layer's output rows (kept channels) on a sample
    of positions per batch, drawn once so the pruned inputs are read at the same ones."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(dense.named_modules())
    out: dict[str, _Targets] = {fqn: [] for fqn in order}
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        modules[fqn].register_forward_hook(
            lambda _m, _a, o, n=fqn: seen.setdefault(n, []).append(o.detach())
        )
        for fqn in order
    ]
    try:
        for inputs in batches:
            seen.clear()
            dense(*inputs)
            for fqn in order:
                if fqn not in seen:
                    raise PruneError(f"reconstruct: `{fqn}` did not run on a calibration batch")
                y = torch.cat([output_rows(modules[fqn], o) for o in seen[fqn]])
                if kept[fqn][0] is not None:
                    y = y[:, kept[fqn][0]]
                pick = None
                if y.shape[0] > rows_per_batch:
                    pick = torch.randperm(y.shape[0], generator=gen)[:rows_per_batch]
                    y = y[pick]
                out[fqn].append((len(seen[fqn]), pick, y.double()))
    finally:
        for h in handles:
            h.remove()
    return out


def _rows(
    module: nn.Module, xs: list[torch.Tensor], pick: torch.Tensor | None, expected: int
) -> tuple[torch.Tensor | None, int]:
    """The input rows of every call of ``module`` (inputs ``xs``), one after another, at
    positions ``pick`` of them (all when None), and how many there are in all; None for the
    rows when they cannot match the unpruned layer's ``expected`` (models that differ)."""
    assert isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))  # _why_not
    counts = [num_rows(module, x) for x in xs]
    total = sum(counts)
    if pick is None:
        if total != expected:
            return None, total
        return torch.cat([input_rows(module, x) for x in xs]), total
    if total <= int(pick.max()):
        return None, total
    out: torch.Tensor | None = None
    start = 0
    for x, n in zip(xs, counts, strict=True):
        here = (pick >= start) & (pick < start + n)
        if here.any():
            rows = input_rows(module, x, pick[here] - start)
            if out is None:
                out = rows.new_empty(len(pick), rows.shape[1])
            out[here] = rows
        start += n
    return out, total


def _fit_in_lockstep(
    pruned: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    batches: Sequence[Sequence[torch.Tensor]],
    targets: Mapping[str, _Targets],
    ridge: float,
    advance: Callable[[], None],
) -> list[LayerFit]:
    """Every batch's forward in its own thread; at each of ``layers`` (each run once per
    forward, in this order) the threads wait for one another, the layer is fitted on all
    their inputs, and they go on with its new weights (see the module doc)."""
    n = len(batches)
    by_name = dict(layers)
    names = {id(m): fqn for fqn, m in layers}
    expected = [fqn for fqn, _ in layers]
    pending: list[tuple[str, torch.Tensor] | None] = [None] * n
    fits: list[LayerFit] = []
    errors: list[BaseException] = []
    local = threading.local()

    def fit_here() -> None:  # run by one thread once every thread has arrived
        fqn = expected[len(fits)]
        got = {p[0] if p is not None else None for p in pending}
        if got != {fqn}:
            raise PruneError(
                f"reconstruct: the calibration batches reached different layers "
                f"({', '.join(sorted(str(g) for g in got))}) where `{fqn}` was expected: "
                "the model's path depends on its input"
            )
        xs = ([p[1]] for p in pending if p is not None)
        fits.append(_fit_layer(fqn, by_name[fqn], xs, targets[fqn], ridge))
        advance()

    barrier = threading.Barrier(n, action=fit_here)

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        fqn = names[id(module)]
        seen: list[str] = local.seen
        if len(seen) >= len(expected) or expected[len(seen)] != fqn:
            raise PruneError(
                f"reconstruct: `{fqn}` ran out of turn on calibration batch {local.batch} "
                f"(expected {expected[len(seen)] if len(seen) < len(expected) else 'none'})"
            )
        seen.append(fqn)
        pending[local.batch] = (fqn, args[0].detach())
        barrier.wait()
        pending[local.batch] = None

    def run(b: int) -> None:
        local.batch, local.seen = b, []
        try:
            with torch.no_grad():
                pruned(*batches[b])
            if len(local.seen) != len(expected):
                missing = expected[len(local.seen)]
                raise PruneError(f"reconstruct: `{missing}` did not run on calibration batch {b}")
        except threading.BrokenBarrierError:
            pass  # another thread failed: its error is the one reported
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            barrier.abort()

    handles = [m.register_forward_pre_hook(hook) for _, m in layers]
    try:
        threads = [threading.Thread(target=run, args=(b,), daemon=True) for b in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for h in handles:
            h.remove()
    if errors:
        raise errors[0]
    if barrier.broken or len(fits) != len(expected):
        raise PruneError("reconstruct: the lockstep refit stopped early")  # action raised
    return fits


def _fit_layer(
    fqn: str,
    module: nn.Module,
    captured: Iterable[list[torch.Tensor]],
    targets: _Targets,
    ridge: float,
) -> LayerFit:
    """Accumulate ``A^T A``, ``A^T Y`` over the batches (``captured``: the layer's input at
    each of its calls, per batch), solve, write the weights.

    Decision — with fewer than :data:`FEW_ROWS` rows per weight of a row, the fit is
    cross-validated on two halves of the rows (alternate rows): the ridge is the one of
    ``ridge`` x :data:`RIDGE_STEPS` the other half prefers, and the layer keeps its pruned
    weights when no fit beats them there. Why: a classifier of 256 inputs fitted on 128
    samples reproduced them exactly (relative error 0.504 -> 0.00014) and scored 6.7% on
    held samples, below the unrefitted cut (13.3%). With many rows (a conv's positions) the
    fit is the plain one, as before."""
    assert isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))  # _why_not
    weight = module.weight
    bias = module.bias
    d = weight[0].numel() + (1 if bias is not None else 0)
    halves = [_Normal(d, weight.shape[0]), _Normal(d, weight.shape[0])]
    rows = 0
    for xs, (_calls, pick, y) in zip(captured, targets, strict=True):
        a, total = _rows(module, xs, pick, y.shape[0])
        if a is None or y.shape[1] != weight.shape[0]:
            raise PruneError(
                f"reconstruct: `{fqn}` gives {total} output positions x {weight.shape[0]} "
                f"channels, which do not match the unpruned layer's ({y.shape[1]} kept "
                "channels): the kept positions do not belong to this pair of models"
            )
        a = a.float()
        if bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        for k, half in enumerate(halves):
            half.add(a[k::2], y[k::2].float())
        rows += a.shape[0]
    full = halves[0] + halves[1]
    current = weight.detach().reshape(weight.shape[0], -1).double().T
    if bias is not None:
        current = torch.cat([current, bias.detach().double()[None]], dim=0)
    steps = RIDGE_STEPS if rows < FEW_ROWS * d else (1.0,)
    chosen: float | None = steps[0]
    if len(steps) > 1:
        held = [sum(halves[1 - k].error(halves[k].solve(ridge * m, current)) for k in (0, 1))
                for m in steps]  # fmt: skip
        kept = sum(h.error(current) for h in halves)
        best = min(range(len(steps)), key=held.__getitem__)
        chosen = steps[best] if held[best] < kept else None
    before = full.error(current)
    after = before
    if chosen is not None:
        solved = full.solve(ridge * chosen, current)
        after = full.error(solved)
        if after < before:  # never make a layer worse on its own calibration rows
            n = weight[0].numel()
            weight.copy_(solved[:n].T.reshape(weight.shape).to(weight.dtype))
            if bias is not None:
                bias.copy_(solved[n].to(bias.dtype))
        else:
            after = before
    return LayerFit(fqn, rows, round(max(before, 0.0), 6), round(max(after, 0.0), 6))
