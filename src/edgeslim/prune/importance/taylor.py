"""First-order Taylor importance (Molchanov et al. 2019), from a few batches of data."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import as_inputs, input_batches
from edgeslim.errors import PruneError
from edgeslim.graph.coupling import CouplingGroup, GroupMember
from edgeslim.graph.layers import recurrent_gates
from edgeslim.prune.importance.base import (
    Importance,
    combine,
    finish,
    member_units,
    recurrent_tensor,
    register,
    scored_members,
)
from edgeslim.train.loop import cross_entropy

LossFn = Callable[[Any, Any], torch.Tensor]


def _forward(model: nn.Module, inputs: Any) -> Any:
    """Call the model on an input batch (``model(*inputs)``) or a dict of keyword tensors."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*as_inputs(inputs))


def model_inputs(item: Any) -> Any:
    """The inputs of one batch: a dict of keyword tensors as it is (also as the first of an
    ``(inputs, target)`` pair), anything else read by :func:`~edgeslim.data.batching.
    input_batches` (a tensor, a tuple of tensors, or a pair whose target is dropped)."""
    if isinstance(item, Mapping):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Mapping):
        return item[0]
    return next(input_batches([item]))


def _labelled(item: Any) -> tuple[Any, Any]:
    """One ``(inputs, target)`` batch, inputs a dict or an input tuple."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(
            "taylor importance batches are (inputs, target) pairs, inputs a tensor, a tuple "
            f"of tensors or a dict of keyword tensors; got {type(item).__name__}"
        )
    inputs, target = item
    return (inputs if isinstance(inputs, Mapping) else as_inputs(inputs)), target


def _channel_params(module: nn.Module, member: GroupMember) -> list[torch.Tensor]:
    """The member's tensors indexed by the group's channels: weight, plus bias unless a consumer
    (a recurrent layer's ``weight_ih``, plus ``weight_hh`` and both biases for its hidden units)."""
    if recurrent_gates(module):
        keys = ["weight_ih"]
        if member.role != "in":
            keys += ["weight_hh", "bias_ih", "bias_hh"]
        found = [recurrent_tensor(module, k) for k in keys]
        return [p for p in found if isinstance(p, nn.Parameter)]
    names = ("weight",) if member.role == "in" else ("weight", "bias")
    out: list[torch.Tensor] = []
    for n in names:
        p = getattr(module, n, None)
        if isinstance(p, nn.Parameter):
            out.append(p)
    return out


@register("taylor")
class Taylor(Importance):
    """``|sum over a unit's parameters of w * dL/dw|``, averaged over ``batches``.

    That sum is the first-order change of the loss when the unit's parameters are zeroed,
    so units whose removal the loss barely notices score low. Each batch is
    ``(inputs, target)``; ``inputs`` is a tensor, a tuple of positional tensors or a dict of
    keyword tensors, and the loss is ``loss_fn(model(*inputs), target)`` (cross-entropy on
    the first output by default, which needs labels: a None target is refused; a
    ``loss_fn`` for an encoder may ignore ``target``). ``batches`` is stored as a list, so a
    generator can be passed.

    Members are the producers (``out``/``depthwise``: weight and bias rows) and, with
    ``include_consumers``, the consumers' weight columns. Per-member sums are *not*
    normalised by default: Taylor values are loss changes, already on one scale across
    layers. The model runs in eval mode (so BatchNorm statistics and dropout are untouched),
    gradients come from ``torch.autograd.grad`` (no ``.grad`` is written), and every
    module's train/eval mode and every parameter's ``requires_grad`` are restored.
    """

    def __init__(
        self,
        batches: Iterable[tuple[Any, Any]],
        loss_fn: LossFn = cross_entropy,
        include_consumers: bool = False,
        normalize: bool = False,
    ) -> None:
        self.batches = [_labelled(b) for b in batches]
        if not self.batches:
            raise ValueError("taylor importance needs at least one (inputs, target) batch")
        if loss_fn is cross_entropy and any(t is None for _, t in self.batches):
            raise PruneError(
                "taylor importance needs labels: its default loss is cross-entropy, but a "
                "batch has target None. Pass labelled (inputs, target) batches, or a loss_fn "
                "that needs no labels (loss_fn(outputs, target) may ignore target). In a "
                "recipe: give the data labels (an .npz's `y`, a folder per class) or choose a "
                "criterion that reads none (l1, l1_group, fpgm, nisp)."
            )
        self.loss_fn = loss_fn
        self.include_consumers = include_consumers
        self.normalize = normalize

    def scores(self, model: nn.Module, groups: Sequence[CouplingGroup]) -> dict[int, torch.Tensor]:
        targets = [g for g in groups if g.prunable]
        # (group, member, key, param); a parameter may serve several groups.
        entries: list[tuple[CouplingGroup, GroupMember, tuple[int, int], torch.Tensor]] = []
        for g in targets:
            for m in scored_members(g, self.include_consumers):
                key = (g.id, g.members.index(m))
                for p in _channel_params(model.get_submodule(m.fqn), m):
                    entries.append((g, m, key, p))
        params = list({id(p): p for *_, p in entries}.values())
        index = {id(p): i for i, p in enumerate(params)}
        acc: dict[tuple[int, int], torch.Tensor] = {}  # (group id, member idx) -> (size,)

        modes = [(m, m.training) for m in model.modules()]
        grad_flags = [(p, p.requires_grad) for p in params]
        try:
            model.eval()
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                for inputs, target in self.batches:
                    loss = self.loss_fn(_forward(model, inputs), target)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    batch: dict[tuple[int, int], torch.Tensor] = {}
                    for g, m, key, p in entries:
                        grad = grads[index[id(p)]]
                        if grad is None:
                            continue
                        mod = model.get_submodule(m.fqn)
                        part = member_units(mod, m, g, (p.detach() * grad).double()).sum(dim=1)
                        batch[key] = batch[key] + part if key in batch else part
                    for key, value in batch.items():
                        acc[key] = acc[key] + value.abs() if key in acc else value.abs()
        finally:
            for p, flag in grad_flags:
                p.requires_grad_(flag)
            for mod, training in modes:
                mod.training = training

        out: dict[int, torch.Tensor] = {}
        n = len(self.batches)
        for g in targets:
            per_member = [
                acc[key] / n
                for m in scored_members(g, self.include_consumers)
                if (key := (g.id, g.members.index(m))) in acc
            ]
            if not per_member:
                per_member = [torch.zeros(g.size, dtype=torch.float64)]
            out[g.id] = finish(combine(per_member, self.normalize))
        return out
