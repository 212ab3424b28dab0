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

Decision — what is fitted: plain linears and ungrouped 1-D/2-D convs that lost input
channels. A depthwise conv loses its channels whole (nothing to refit) and other
layers keep their inputs; they are listed in the report as skipped with the reason.

Decision — a layer called more than once per forward (a shared encoder, one MLP on two
pooled maps) is fitted on the rows of every call together: one weight serves them all. The
inputs of its later calls are read with its weights as they were before the fit (a call
that feeds on an earlier call's output sees that output unrefitted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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


def _run_order(model: nn.Module, fqns: Iterable[str], inputs: Sequence[torch.Tensor]) -> list[str]:
    """``fqns`` in the order their modules first run on ``inputs`` (never-run ones dropped)."""
    wanted = set(fqns)
    order: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if name in wanted:
            handles.append(
                m.register_forward_hook(
                    lambda _m, _a, _o, n=name: order.append(n) if n not in order else None
                )
            )
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return order


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
) -> ReconstructReport:
    """Refit, in place, every layer of ``pruned`` that lost input channels (see module doc).

    ``kept``: per pruned module FQN, the ``(output, input)`` positions it keeps of the
    unpruned module's (:meth:`edgeslim.prune.Surgery.kept_positions`, taken before the
    surgery is applied). ``calibration``: input batches (a tensor or tuple of tensors each,
    or ``(inputs, target)`` pairs; targets are ignored). ``ridge`` regularises the fit
    relative to the input energy; each layer is fitted on at most ``rows_per_batch`` output
    positions per batch, drawn with ``seed`` (only their patches are read: the whole
    unfolded input is never built, so memory stays at the layer's input). Raises
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
        order = _run_order(dense, fit, batches[0])
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
            for fqn in order:
                report.layers.append(
                    _fit_layer(fqn, modules[fqn], pruned, batches, targets[fqn], ridge)
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
    assert isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))  # _why_not
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


def _fit_layer(
    fqn: str,
    module: nn.Module,
    pruned: nn.Module,
    batches: Sequence[Sequence[torch.Tensor]],
    targets: _Targets,
    ridge: float,
) -> LayerFit:
    """Accumulate ``A^T A``, ``A^T Y`` over the batches, solve, write the weights."""
    assert isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))  # _why_not
    weight = module.weight
    bias = module.bias
    d = weight[0].numel() + (1 if bias is not None else 0)
    gram = torch.zeros(d, d, dtype=torch.float64)
    cross = torch.zeros(d, weight.shape[0], dtype=torch.float64)
    yty = torch.zeros((), dtype=torch.float64)
    rows = 0
    for inputs, (calls, pick, y) in zip(batches, targets, strict=True):
        a, total = _rows(module, _capture(pruned, module, inputs, calls), pick, y.shape[0])
        if a is None or y.shape[1] != weight.shape[0]:
            raise PruneError(
                f"reconstruct: `{fqn}` gives {total} output positions x {weight.shape[0]} "
                f"channels, which do not match the unpruned layer's ({y.shape[1]} kept "
                "channels): the kept positions do not belong to this pair of models"
            )
        a = a.float()
        if bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        # products in float32 (the costly part: rows x d^2), sums over batches in float64
        gram += (a.T @ a).double()
        cross += (a.T @ y.float()).double()
        yty += (y * y).sum()
        rows += a.shape[0]
    energy = float(yty) or 1.0
    current = weight.detach().reshape(weight.shape[0], -1).double().T
    if bias is not None:
        current = torch.cat([current, bias.detach().double()[None]], dim=0)

    def error(w: torch.Tensor) -> float:
        return float(yty - 2 * (w * cross).sum() + (w * (gram @ w)).sum()) / energy

    # the ridge pulls towards the pruned weights, not towards zero: where the rows are few
    # (a classifier with more inputs than calibration samples) the fit stays near them
    lam = ridge * (float(gram.diagonal().mean()) or 1.0)
    solved = torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype), cross + lam * current)
    before, after = error(current), error(solved)
    if after < before:  # never make a layer worse on its own calibration rows
        n = weight[0].numel()
        weight.copy_(solved[:n].T.reshape(weight.shape).to(weight.dtype))
        if bias is not None:
            bias.copy_(solved[n].to(bias.dtype))
    else:
        after = before
    return LayerFit(fqn, rows, round(max(before, 0.0), 6), round(max(after, 0.0), 6))
