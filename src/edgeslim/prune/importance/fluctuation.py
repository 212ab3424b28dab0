"""Fluctuation importance with bias compensation (FLAP, An et al. 2024), from a few batches.

A unit feeds its consumers' weight columns. If the unit's input to a consumer hardly
varies, removing it changes that consumer's output by an almost constant vector, which a
bias can absorb. So a unit scores ``sum_j Var(x_j) * ||W[:, j]||^2`` over its features
``j`` in every consumer (the expected squared output change left *after* compensation), and
:meth:`Fluctuation.compensate` adds ``W[:, removed] @ mean(x_removed)`` to each consumer's
bias before surgery. Needs no labels and no gradients, only forward passes, which is why
it suits encoders such as MiniLM (heads and FFN neurons) where a task loss is not at hand.

Decision — only ``nn.Linear`` consumers are scored and compensated: for a conv the constant
an input channel carries is smeared by zero padding at the borders, so the bias cannot
absorb it exactly. Groups without a linear consumer score zero (ranked last).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from edgeslim.graph.coupling import CouplingGroup
from edgeslim.prune.importance.base import Importance, finish, register, unit_view
from edgeslim.prune.importance.taylor import _forward, model_inputs


class _Moments:
    """Running mean and variance of a linear layer's input features (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        s, q = flat.sum(0), (flat * flat).sum(0)
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.n += flat.shape[0]

    def mean(self) -> torch.Tensor:
        assert self.total is not None
        return self.total / self.n

    def var(self) -> torch.Tensor:
        assert self.squares is not None
        return (self.squares / self.n - self.mean() ** 2).clamp_min(0.0)


@register("fluctuation")
class Fluctuation(Importance):
    """``Var(x_j) * ||W[:, j]||^2`` summed over a unit's consumer features (FLAP).

    ``batches`` are model inputs (a tensor, a tuple of positional tensors or a dict of
    keyword tensors; an ``(inputs, target)`` pair also works, the target is ignored; see
    :func:`~edgeslim.prune.importance.taylor.model_inputs`).
    After :meth:`scores`, :meth:`compensate` folds the removed features' means into the
    consumers' biases.
    """

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = [model_inputs(b) for b in batches]
        if not self.batches:
            raise ValueError("fluctuation importance needs at least one batch of inputs")
        self.moments: dict[str, _Moments] = {}

    def _consumers(self, model: nn.Module, group: CouplingGroup) -> list[Any]:
        return [
            m
            for m in group.members
            if m.role == "in" and isinstance(model.get_submodule(m.fqn), nn.Linear)
        ]

    def _collect(self, model: nn.Module, fqns: Sequence[str]) -> None:
        self.moments = {f: _Moments() for f in fqns}
        handles = []
        for f in fqns:
            stats = self.moments[f]

            def hook(_: nn.Module, args: tuple[Any, ...], stats: _Moments = stats) -> None:
                stats.add(args[0])

            handles.append(model.get_submodule(f).register_forward_pre_hook(hook))
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                for inputs in self.batches:
                    _forward(model, inputs)
        finally:
            for h in handles:
                h.remove()
            for mod, training in modes:
                mod.training = training

    def scores(self, model: nn.Module, groups: Sequence[CouplingGroup]) -> dict[int, torch.Tensor]:
        targets = [g for g in groups if g.prunable]
        fqns = sorted({m.fqn for g in targets for m in self._consumers(model, g)})
        self._collect(model, fqns)
        out: dict[int, torch.Tensor] = {}
        for g in targets:
            total = torch.zeros(g.size, dtype=torch.float64)
            for m in self._consumers(model, g):
                layer = model.get_submodule(m.fqn)
                assert isinstance(layer, nn.Linear)
                col_norm = layer.weight.detach().double().pow(2).sum(0)
                feature = (self.moments[m.fqn].var() * col_norm).unsqueeze(0)
                total += unit_view(feature, m, g).sum(dim=1)
            out[g.id] = finish(total)
        return out

    def compensate(self, model: nn.Module, keep: Mapping[CouplingGroup, Sequence[int]]) -> int:
        """Before surgery: add each removed feature's mean contribution to its consumers'
        biases. A consumer without a bias is left as it is (adding one would change the
        model's state keys, which plans and checkpoints rely on). Returns the layers changed."""
        changed = 0
        for g, kept in keep.items():
            removed = torch.ones(g.size, dtype=torch.bool)
            removed[list(kept)] = False
            if not bool(removed.any()):
                continue
            for m in self._consumers(model, g):
                if m.fqn not in self.moments:
                    raise ValueError(f"compensate: {m.fqn} was not scored; call scores() first")
                layer = model.get_submodule(m.fqn)
                assert isinstance(layer, nn.Linear)
                mask = torch.zeros(layer.in_features, dtype=torch.bool)
                per_unit = removed.repeat_interleave(g.unit * m.repeat)
                mask[m.offset : m.offset + per_unit.numel()] = per_unit
                mean = self.moments[m.fqn].mean().to(layer.weight.dtype)
                delta = layer.weight.detach()[:, mask] @ mean[mask]
                if layer.bias is None:
                    continue
                with torch.no_grad():
                    layer.bias.add_(delta)
                changed += 1
        return changed
