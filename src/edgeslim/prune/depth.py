"""Depth pruning: a residual branch (:mod:`edgeslim.graph.branches`) removed whole.

``y = x + f(x)`` becomes ``y = x + c``, ``c`` the branch's mean output per channel, a
trainable parameter (fine-tuning moves it as it moves a bias). The branch's last layer is
replaced by :class:`BranchMean`, its other layers with weights by :class:`Bypassed`; the
user's ``forward`` still runs as written, the ONNX export drops the dead nodes, and the
layer table, size and latency see the layers gone.

Decision, the constant: when the branch ends in a BatchNorm (in eval mode), ``c`` is its
shift ``beta``, the mean of its output under its own statistics (no data read; after
channel pruning and before the statistics are re-estimated this is still the right value,
which a measurement would not give). Otherwise ``c`` is measured on the given batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import input_batches
from edgeslim.errors import PruneError
from edgeslim.graph.branches import ResidualBranch
from edgeslim.graph.swap import replace_submodule


class BranchMean(nn.Module):
    """Stands for a removed residual branch's last layer: its mean output, whatever reaches
    it (broadcast against the shortcut by the ``add``)."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.mean = nn.Parameter(mean.detach().clone())

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # an op, not the bare parameter: activation quantization skips a parameter read
        # straight into an add, and ONNX Runtime then ran DQ -> float Add -> Q where it
        # fuses QLinearAdd with the quantized constant (checked in the export test)
        return self.mean * 1.0


class Bypassed(nn.Module):
    """Stands for a layer inside a removed branch: passes a copy of its input on (nothing
    reads it). A copy, because what follows in the model's own code may act in place (a
    shared ``ReLU(inplace=True)``), and the input is the shortcut's too; the export drops
    the copy with the rest of the dead branch."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x.clone() if isinstance(x, (torch.Tensor, torch.fx.Proxy)) else x


def _shaped(values: torch.Tensor, branch: ResidualBranch) -> torch.Tensor:
    shape = [1] * branch.rank
    shape[branch.channel_dim] = -1
    return values.reshape(shape)


def _bn_mean(module: nn.Module) -> torch.Tensor | None:
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.training:
        return None
    if module.running_mean is None:  # batch statistics even in eval: no fixed mean
        return None
    if module.affine:
        return module.bias.detach().clone()
    return torch.zeros_like(module.running_mean)


@torch.no_grad()
def branch_means(
    model: nn.Module,
    branches: Sequence[ResidualBranch],
    batches: Iterable[Any] | None = None,
    max_batches: int = 8,
) -> dict[str, torch.Tensor]:
    """Each branch's mean output per channel, by branch name, shaped to broadcast (see the
    module doc: a BatchNorm's shift, else measured on up to ``max_batches`` of ``batches``:
    input batches or ``(inputs, target)`` pairs, as
    :func:`~edgeslim.data.batching.input_batches` reads them)."""
    means: dict[str, torch.Tensor] = {}
    todo: list[ResidualBranch] = []
    for b in branches:
        mean = _bn_mean(model.get_submodule(b.last))
        if mean is None:
            todo.append(b)
        else:
            means[b.name] = _shaped(mean, b)
    if not todo:
        return means
    if batches is None:
        raise PruneError(
            f"removing residual branch {todo[0].name!r} needs its mean output, and its last "
            f"layer {todo[0].last!r} is not a BatchNorm: pass calibration data"
        )
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys((b.name for b in todo), 0)

    def hook(branch: ResidualBranch) -> Any:
        def record(_m: nn.Module, _i: Any, out: Any) -> None:
            t = out if isinstance(out, torch.Tensor) else out[0]
            dim = branch.channel_dim % t.dim()
            other = [d for d in range(t.dim()) if d != dim]
            s = t.detach().float().sum(dim=other)
            sums[branch.name] = sums.get(branch.name, 0) + s
            counts[branch.name] += t.numel() // t.shape[dim]

        return record

    handles = [model.get_submodule(b.last).register_forward_hook(hook(b)) for b in todo]
    was = model.training
    model.eval()
    try:
        for i, inputs in enumerate(input_batches(batches)):
            if i >= max_batches:
                break
            model(*inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    for b in todo:
        if not counts[b.name]:
            raise PruneError(f"residual branch {b.name!r}: the calibration data is empty")
        means[b.name] = _shaped(sums[b.name] / counts[b.name], b)
    return means


def remove_branches(
    model: nn.Module,
    branches: Sequence[ResidualBranch],
    batches: Iterable[Any] | None = None,
) -> nn.Module:
    """Remove ``branches`` from ``model`` in place (see the module doc); returns it."""
    means = branch_means(model, branches, batches)
    for b in branches:
        for fqn in b.body:
            replace_submodule(model, fqn, Bypassed())
        last = model.get_submodule(b.last)
        mean = means[b.name]
        weight = next(iter(last.parameters()), None)
        if weight is not None:
            mean = mean.to(weight.dtype)
        replace_submodule(model, b.last, BranchMean(mean))
    return model


def removed_modules(model: nn.Module) -> set[str]:
    """FQNs of the layers depth pruning replaced in ``model``."""
    return {n for n, m in model.named_modules() if isinstance(m, (BranchMean, Bypassed))}
