"""Learned channel gates (ABP / Pruning by Training): prune by training binary gates.

One real-valued latent ``g`` per channel of every gated coupling group; its forward value
is a gate in ``[0, 1]`` multiplying that channel. The gate is binary in the end (``g > 0``)
and gets gradients through an asymptotic estimator: the surrogate ``sigmoid(k g)`` whose
sharpness ``k = k0 (k_max/k0)^p`` grows with training progress ``p`` (the AQE schedule of
:mod:`edgeslim.quant.estimators`). Weights and gates train together from a pretrained
model; a gate that went off still receives gradient, so pruned channels can recover. At
the end the off channels are removed by ordinary surgery.

Decision — where a gate multiplies: on the *consumer* side, i.e. on the input slice of
every ``in`` member of the group (forward pre-hooks; ``offset``, ``repeat`` and ``unit``
honoured). A gate at exactly 0 then is *exactly* channel removal, whatever lies between
producer and consumer: BN shifts, activations with ``f(0) != 0``, depthwise biases,
residual adds (the add still carries the channel, but every reader of the sum sees it
zeroed, just as every reader of the pruned sum lacks it), concatenations and flattens.
Gating producer/BN outputs instead needs one gate per producer path and is only equal to
removal for zero-preserving activations; for ReLU networks the two are the same function
(``relu(s x) = s relu(x)`` for ``s >= 0``), so nothing is lost.

Decision — two forward modes. ``"hard"`` (default; ABP's estimator): the forward is the
binary gate at every step and the gradient that of ``sigmoid(k g)``, ``k`` from 1 to 200;
the pretrained model is exactly unchanged at the start (``g = 1``) and training always sees
the network it will produce. ``"soft"`` (AQE-style): the forward is ``sigmoid(k g)`` itself
until progress 1, then binary; ``k`` from 5 (so it starts at ``sigmoid(5)`` ≈ 0.993, not
1). Measured on resnet20 at 50% MACs (1 epoch, 10k images, KD; 94.6% before): hard 93.25%
top-1, soft 92.0%: soft gates meet the penalty by scaling channels rather than switching
them off, and the budget is then met by the projection alone (see :func:`train_gates`).

Decision — the sparsity term drives MACs to a budget rather than summing gates:
``lam * relu(E/T - (1 - macs_reduction))`` with ``T`` the model's MACs and ``E`` the
expected MACs, where every conv/linear costs its full MACs times the kept fraction of its
output channels times the kept fraction of its input channels (gate values summed per
group slice; a depthwise conv scales with its channels only). With binary gates ``E`` is
the exact MACs of the pruned model, so the penalty vanishes once the budget is met and
the task loss alone decides which channels come back. A hinge rather than a two-sided
penalty: pruning more than asked is never penalised, only resisted by the task loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from edgeslim.data.batching import Batch, Inputs
from edgeslim.errors import PruneError, UnreachableTargetError
from edgeslim.graph.coupling import CouplingGroup
from edgeslim.graph.layers import layer_table, total_macs
from edgeslim.graph.model_graph import analyze
from edgeslim.prune.config import GateConfig, GateMode
from edgeslim.prune.plan import PrunePlan, apply_plan
from edgeslim.prune.surgery import (
    KeepIndices,
    check_kept,
    describe_group,
    round_keep,
    unit_round,
)
from edgeslim.train.distill import kd_loss
from edgeslim.train.loop import (
    LossFn,
    TrainConfig,
    classification_loss,
    steps_per_epoch,
    train_classifier,
)


def _carrier(t: torch.Tensor) -> torch.Tensor:
    """Zero in value, identity in gradient."""
    return t - t.detach()


@dataclass(frozen=True)
class _Slice:
    """Where group ``group`` (index into the gate set) sits on one axis of one module."""

    group: int
    offset: int
    step: int  # rows per unit: group.unit * member.repeat
    size: int  # units


@dataclass
class _Cost:
    """One conv/linear: full MACs, axis widths and the gated slices of each axis."""

    macs: int
    out_width: int
    in_width: int
    out: list[_Slice]
    inp: list[_Slice]


def _widths(m: nn.Module) -> tuple[int, int]:
    """``(output rows, input rows)`` of a conv/linear; a depthwise conv's input is its out.

    Read from the module's channel counts, not its weight: a transposed conv's weight is
    ``(in, out / groups, ...)``, the other way round from a conv's."""
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.groups > 1:
            return int(m.out_channels), int(m.out_channels)
        return int(m.out_channels), int(m.in_channels)
    assert isinstance(m, nn.Linear)
    return int(m.out_features), int(m.in_features)


class GateSet:
    """Latent gates of some coupling groups of one model, applied by removable hooks.

    The model's modules, FQNs and ``state_dict`` are unchanged; :meth:`remove` detaches
    the hooks (also on leaving a ``with`` block). ``latent[i]`` holds one value per unit
    of ``groups[i]``.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[CouplingGroup],
        layer_macs: Mapping[str, int],
        init: float = 1.0,
        k0: float | None = None,
        k_max: float = 200.0,
        mode: GateMode = "hard",
        round_to: int = 1,
    ) -> None:
        if mode not in ("hard", "soft"):
            raise PruneError(f"gate mode must be 'hard' or 'soft'; got {mode!r}")
        if k0 is None:  # soft starts near 1 (sigmoid(5) = 0.993); hard is exactly 1 anyway
            k0 = 1.0 if mode == "hard" else 5.0
        if not 0 < k0 <= k_max:
            raise PruneError(f"gate sharpness needs 0 < k0 <= k_max; got {k0}, {k_max}")
        if round_to < 1:
            raise PruneError(f"round_to must be >= 1; got {round_to}")
        self.round_to = round_to
        self.model = model
        self.groups = list(groups)
        self.k0, self.k_max, self.mode = float(k0), float(k_max), mode
        if init <= 0:
            raise PruneError(f"gate init must be > 0 (all gates on); got {init}")
        self.progress = 0.0
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.latent = [
            nn.Parameter(torch.full((g.size,), float(init), device=device)) for g in self.groups
        ]
        self.total_macs = int(sum(layer_macs.values()))
        self._costs, self._sites = self._index(layer_macs)
        self._handles: list[RemovableHandle] = []
        for fqn, slices in self._sites.items():
            module = model.get_submodule(fqn)
            self._handles.append(module.register_forward_pre_hook(self._hook(module, slices)))

    # --- structure ---------------------------------------------------------------------

    def _index(
        self, layer_macs: Mapping[str, int]
    ) -> tuple[dict[str, _Cost], dict[str, list[_Slice]]]:
        """Per conv/linear its gated output/input slices; per consumer its gated inputs."""
        costs: dict[str, _Cost] = {}
        sites: dict[str, list[_Slice]] = {}
        for i, g in enumerate(self.groups):
            name = describe_group(g)
            if g.kind != "channel" or not g.prunable or not g.producers:
                why = g.reason or (f"kind {g.kind!r}" if g.kind != "channel" else "no producer")
                raise PruneError(
                    f"cannot gate {name}: only prunable channel groups with a producing layer "
                    f"can be gated ({why})."
                )
            for mem in g.members:
                if mem.role in ("bn", "channelwise"):
                    continue  # follows the gated channels; nothing to gate
                try:
                    m = self.model.get_submodule(mem.fqn)
                except AttributeError:
                    raise PruneError(
                        f"cannot gate {name}: the model has no module `{mem.fqn}` (the group "
                        "comes from another model; re-run analyze on this one)."
                    ) from None
                if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                    raise PruneError(
                        f"cannot gate {name}: `{mem.fqn}` ({type(m).__name__}) is not a "
                        f"conv/linear; leave the group out of `groups` (prune_ slices it)."
                    )
                s = _Slice(i, mem.offset, g.unit * mem.repeat, g.size)
                if mem.fqn not in costs:
                    out_w, in_w = _widths(m)
                    costs[mem.fqn] = _Cost(int(layer_macs.get(mem.fqn, 0)), out_w, in_w, [], [])
                cost = costs[mem.fqn]
                # a layer called twice (a shared MLP on two pooled inputs, CBAM-style) is a
                # member twice at the same place: one gate per unit, not one per call
                if mem.role == "in" and s not in cost.inp:
                    cost.inp.append(s)
                    sites.setdefault(mem.fqn, []).append(s)
                elif mem.role != "in" and s not in cost.out:
                    cost.out.append(s)  # out, depthwise: the output axis
        return costs, sites

    def _hook(self, module: nn.Module, slices: list[_Slice]) -> Callable[..., Any]:
        axis = -1 if isinstance(module, nn.Linear) else 1
        width = _widths(module)[1]

        def hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            mult = self._multiplier(slices, width, x.dtype)
            shape = [1] * x.dim()
            shape[axis] = width
            return (x * mult.view(shape), *args[1:])

        return hook

    def _multiplier(self, slices: list[_Slice], width: int, dtype: torch.dtype) -> torch.Tensor:
        """Per input row: the gate of its group unit, 1 where no gated group sits."""
        device = self.latent[0].device
        parts: list[torch.Tensor] = []
        pos = 0
        for s in sorted(slices, key=lambda s: s.offset):
            if s.offset > pos:
                parts.append(torch.ones(s.offset - pos, device=device, dtype=dtype))
            v = self.value(s.group).to(dtype)
            parts.append(v.repeat_interleave(s.step) if s.step > 1 else v)
            pos = s.offset + s.size * s.step
        if pos < width:
            parts.append(torch.ones(width - pos, device=device, dtype=dtype))
        return torch.cat(parts)

    # --- the estimator ----------------------------------------------------------------

    @property
    def k(self) -> float:
        """Surrogate sharpness at the current progress: ``k0 (k_max/k0)^p``."""
        return self.k0 * (self.k_max / self.k0) ** self.progress

    def set_progress(self, p: float) -> None:
        """Training progress in [0, 1]; sharpens the surrogate (soft mode: binary at 1)."""
        self.progress = min(max(float(p), 0.0), 1.0)

    def value(self, i: int) -> torch.Tensor:
        """Forward value of group ``i``'s gates, differentiable in its latent."""
        g = self.latent[i]
        soft = torch.sigmoid(self.k * g)
        if self.mode == "soft" and self.progress < 1.0:
            return soft
        return (g > 0).to(g.dtype) + _carrier(soft)

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.latent)

    # --- MACs -------------------------------------------------------------------------

    def _macs(self, fraction: Callable[[_Slice], Any]) -> Any:
        """``T`` with every gated conv/linear's MACs scaled by its kept out/in fractions."""
        total: Any = float(self.total_macs)
        for c in self._costs.values():
            if c.macs == 0:
                continue
            fo: Any = 1.0
            fi: Any = 1.0
            if c.out:
                fo = (c.out_width + sum(fraction(s) - s.size * s.step for s in c.out)) / c.out_width
            if c.inp:
                fi = (c.in_width + sum(fraction(s) - s.size * s.step for s in c.inp)) / c.in_width
            total = total - c.macs + c.macs * fo * fi
        return total

    def expected_macs(self) -> torch.Tensor:
        """Differentiable MACs of the gated model: exact when the gates are binary."""
        values = [self.value(i) for i in range(len(self.groups))]
        return torch.as_tensor(self._macs(lambda s: values[s.group].sum() * s.step))

    def macs_penalty(self, macs_reduction: float) -> torch.Tensor:
        """``relu(E/T - (1 - macs_reduction))``: zero once the MACs budget is met."""
        return torch.relu(self.expected_macs() / self.total_macs - (1.0 - macs_reduction))

    def macs_of(self, keep: Mapping[CouplingGroup, KeepIndices]) -> int:
        """Exact MACs of the model after keeping ``keep[group]`` (groups left out stay whole)."""
        counts = {i: len(check_kept(g, keep[g])) for i, g in enumerate(self.groups) if g in keep}
        return self._count_macs(counts)

    def macs_at_narrowest(self) -> int:
        """Exact MACs with every gated group cut to its narrowest width at ``round_to``
        (groups already narrower stay whole): the least the gates can reach."""
        return self._count_macs({i: min(g.size, s) for i, (g, s) in enumerate(
            zip(self.groups, self._unit_steps(), strict=True))})  # fmt: skip

    def _unit_steps(self) -> list[int]:
        """``round_to`` in each group's units (a GroupNorm group of 4 channels at
        ``round_to=8``: 2)."""
        return [unit_round(g, self.round_to) for g in self.groups]

    @property
    def gated_macs(self) -> int:
        """MACs of the layers some gated group narrows (the rest no gate can change)."""
        return sum(c.macs for c in self._costs.values())

    def _count_macs(self, counts: Mapping[int, int]) -> int:
        return round(self._macs(lambda s: counts.get(s.group, s.size) * s.step))

    # --- reading the gates ------------------------------------------------------------

    def kept(
        self,
        target_macs: int | None = None,
        floor_macs: int | None = None,
        ceiling_macs: int | None = None,
    ) -> dict[CouplingGroup, list[int]]:
        """Channels whose gate is on (``g > 0``), never emptying a group.

        With ``target_macs``, channels are then removed in order of lowest latent gate
        (across all groups, skipping a group's last channel) until the exact MACs are at
        most ``target_macs``. With ``floor_macs`` too, gates that pruned below it are
        undone in part: the switched-off channels with the highest latent come back while
        the MACs stay within ``ceiling_macs`` (default ``target_macs``; above it when the
        caller accepts a reduction a little short of the target, for models whose smallest
        step is coarse), until they reach ``floor_macs``. Without a floor, gates that
        pruned more than asked are kept as trained. Raises if the target cannot be reached
        with one channel per group.
        """
        on = [(g.detach() > 0).clone() for g in self.latent]
        for i, mask in enumerate(on):
            if not bool(mask.any()):
                mask[int(self.latent[i].detach().argmax())] = True
        left = {i: int(m.sum()) for i, m in enumerate(on)}
        if target_macs is not None and floor_macs is not None:
            ceiling = target_macs if ceiling_macs is None else max(ceiling_macs, target_macs)
            self._bring_back(on, left, ceiling, floor_macs)
            target_macs = max(target_macs, self._count_macs(left))
        if target_macs is None or self._count_macs(left) <= target_macs:
            return self._rounded(on, target_macs)
        lat = torch.cat([g.detach().flatten().cpu() for g in self.latent])
        owner = torch.cat(
            [torch.full((len(g),), i, dtype=torch.long) for i, g in enumerate(self.latent)]
        )
        start = torch.tensor([0, *torch.cumsum(torch.tensor([len(g) for g in self.latent]), 0)])
        for flat in torch.argsort(lat, stable=True).tolist():
            i = int(owner[flat])
            unit = flat - int(start[i])
            if not bool(on[i][unit]) or left[i] <= 1:
                continue
            on[i][unit] = False
            left[i] -= 1
            if self._count_macs(left) <= target_macs:
                return self._rounded(on, target_macs)
        raise PruneError(
            f"cannot reach {target_macs} MACs by gating these groups (at least "
            f"{self._count_macs(left)} with one channel per group)."
        )

    def _bring_back(
        self, on: list[torch.Tensor], left: dict[int, int], ceiling_macs: int, floor_macs: int
    ) -> None:
        """Switch channels back on (``on`` and ``left`` in place), highest latent gate
        first, while the MACs stay within ``ceiling_macs``, until they reach ``floor_macs``."""
        if self._count_macs(left) >= floor_macs:
            return
        candidates = [
            (float(self.latent[i].detach()[u]), i, u)
            for i, mask in enumerate(on)
            for u in (~mask.cpu()).nonzero().flatten().tolist()
        ]
        for _, i, u in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
            trial = {**left, i: left[i] + 1}
            if self._count_macs(trial) > ceiling_macs:
                continue
            on[i][u] = True
            left[i] += 1
            if self._count_macs(left) >= floor_macs:
                return

    def _rounded(
        self, on: list[torch.Tensor], target_macs: int | None
    ) -> dict[CouplingGroup, list[int]]:
        """``on`` with every group's width a multiple of ``round_to`` channels (or whole).

        Each count is first rounded down (to at least ``round_to``; a group no wider than
        ``round_to`` is kept whole, its only such width); then groups are
        rounded back up, the one whose re-added gates are highest first, while the MACs
        stay within ``target_macs``; if the minimum width alone broke the budget, whole
        steps are taken from the groups with the lowest gates. A group keeps its highest
        gates. Without rounding, ``on`` as it is.
        """
        if self.round_to <= 1:
            return self._as_keep(on)
        rs = self._unit_steps()
        counts = {i: int(m.sum()) for i, m in enumerate(on)}
        up = {i: round_keep(n, len(on[i]), rs[i]) for i, n in counts.items()}
        # a group no wider than round_to has one allowed width: whole
        down = {
            i: len(on[i])
            if n == len(on[i]) or len(on[i]) <= rs[i]
            else max(rs[i], n // rs[i] * rs[i])
            for i, n in counts.items()
        }
        order = [torch.argsort(g.detach().cpu(), descending=True, stable=True) for g in self.latent]
        chosen = dict(down)

        def gain(i: int) -> float:  # mean latent of the gates rounding up would bring back
            extra = order[i][down[i] : up[i]]
            return float(self.latent[i].detach().cpu()[extra].mean()) if len(extra) else -1e9

        for i in sorted((i for i in counts if up[i] > down[i]), key=gain, reverse=True):
            trial = {**chosen, i: up[i]}
            if target_macs is None or self._count_macs(trial) <= target_macs:
                chosen = trial
        # A group the gates cut below round_to was raised to round_to: pay for it by taking
        # whole steps of round_to from the groups whose lowest kept gates are lowest.
        while target_macs is not None and self._count_macs(chosen) > target_macs:
            steps = [i for i in chosen if chosen[i] - rs[i] >= rs[i] and chosen[i] % rs[i] == 0]
            if not steps:
                raise PruneError(
                    f"cannot reach {target_macs} MACs with widths that are multiples of "
                    f"round_to={self.round_to}; use a smaller round_to or a smaller reduction."
                )

            def loss(i: int) -> float:  # mean latent of the step that would go
                part = order[i][chosen[i] - rs[i] : chosen[i]]
                return float(self.latent[i].detach().cpu()[part].mean())

            i = min(steps, key=loss)
            chosen[i] -= rs[i]
        masks = []
        for i, m in enumerate(on):
            mask = torch.zeros_like(m)
            mask[order[i][: chosen[i]].to(m.device)] = True
            masks.append(mask)
        return self._as_keep(masks)

    def project(self, target_macs: int) -> int:
        """Switch off what :meth:`kept` removes beyond the gates; returns how many.

        Hard mode sets their latent to 0: off, but at the surrogate's steepest point, so a
        channel can come back if training wants it (the next projection then drops the
        next-lowest gate). Soft mode sets ``-4/k`` (forward ``sigmoid(-4)`` ≈ 0.02).
        """
        keep = self.kept(target_macs)
        off_value = 0.0 if self.mode == "hard" else -4.0 / self.k
        n = 0
        with torch.no_grad():
            for g, lat in zip(self.groups, self.latent, strict=True):
                off = lat > 0
                off[keep[g]] = False
                lat[off] = off_value
                n += int(off.sum())
        return n

    def _as_keep(self, on: list[torch.Tensor]) -> dict[CouplingGroup, list[int]]:
        return {
            g: torch.nonzero(m).flatten().tolist() for g, m in zip(self.groups, on, strict=True)
        }

    def stats(self) -> dict[str, float]:
        """Fraction of gates on and the binary-gate MACs ratio, for the history."""
        n_on = sum(int((g.detach() > 0).sum()) for g in self.latent)
        n = sum(len(g) for g in self.latent)
        hard = self._macs(lambda s: float((self.latent[s.group].detach() > 0).sum()) * s.step)
        return {"gates_on": n_on / max(n, 1), "gate_macs_ratio": float(hard) / self.total_macs}

    # --- lifetime ---------------------------------------------------------------------

    def remove(self) -> None:
        """Detach every hook: the model computes as if it had never been gated."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> GateSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _ungated(model: nn.Module, group: CouplingGroup) -> str | None:
    """The first sliced member that is not a conv/linear (gates scale their inputs and count
    their MACs), as ``'fqn' (Type)``; None when the group can be gated. Groups of recurrent
    layers are left whole by learned gates."""
    for m in group.members:
        mod = model.get_submodule(m.fqn)
        if m.role not in ("bn", "channelwise") and not isinstance(
            mod, (nn.modules.conv._ConvNd, nn.Linear)
        ):
            return f"'{m.fqn}' ({type(mod).__name__})"
    return None


def _refuse_unreachable(gates: GateSet, target: int, reduction: float) -> None:
    """Fail before training when the gated groups cannot hold the target even at their
    narrowest, naming how much of the model the gates cannot reach (a ViT's heads: its
    prune stage with gates trained an epoch, then said only that the MACs were unreachable)."""
    width = max(1, gates.round_to)
    floor = gates.macs_at_narrowest()
    if floor <= target:
        return
    gates.remove()
    total, reach = gates.total_macs, gates.gated_macs
    raise UnreachableTargetError(
        f"learned gates cannot remove {reduction:.0%} of the MACs: with every gated group at "
        f"its narrowest ({width} channel(s)), {floor:,} of {total:,} MACs remain (at most "
        f"-{1 - floor / total:.1%}). {total - reach:,} MACs ({1 - reach / total:.0%}) are in "
        "layers no gated group narrows: attention heads, the FFN groups of Hugging Face "
        "transformers and layers outside any prunable channel group are not gated. Rank them "
        "instead (a prune stage's `method: rank`; `plan_pruning` in Python), or lower "
        "macs_reduction.",
        best=1 - floor / total,
    )


def attach_gates(
    model: nn.Module,
    example_args: Sequence[Any],
    groups: Sequence[CouplingGroup] | None = None,
    init: float = 1.0,
    k0: float | None = None,
    k_max: float = 200.0,
    mode: GateMode = "hard",
    round_to: int = 1,
) -> GateSet:
    """Gate every prunable channel group of ``model`` (or just ``groups``), all gates on.

    ``groups`` must come from :func:`~edgeslim.graph.analyze` on this (unpruned) model.
    Head/FFN groups of transformers are not gated, nor a group no wider than ``round_to``
    (in its units): its only width that is a multiple of ``round_to`` or whole is whole,
    so it is kept whole, as the planner keeps it; a gate there would train the network
    without channels that come back at the end.
    """
    why: list[str] = []
    if groups is None:
        graph = analyze(model, *example_args)
        channel = [g for g in graph.prunable_groups if g.kind == "channel" and g.producers]
        blockers = [(g, _ungated(model, g)) for g in channel]
        groups = [g for g, b in blockers if b is None]
        layers = graph.layers
        why = [f"{describe_group(g)}: {g.reason}" for g in graph.groups if g.reason]
        why += [  # before, left out without a word (a GRU classifier's only groups)
            f"{describe_group(g)}: it spans {b}, which gates do not scale "
            "(`method: rank` prunes it)"
            for g, b in blockers
            if b is not None
        ]
    else:
        layers = layer_table(model, *example_args)  # the groups are known: skip the trace
    narrow = [
        g for g in groups if round_to > 1 and g.prunable and g.size <= unit_round(g, round_to)
    ]
    groups = [g for g in groups if all(g is not n for n in narrow)]
    why += [f"{describe_group(g)}: no wider than round_to={round_to}" for g in narrow]
    if not groups:
        shown = "; ".join(list(dict.fromkeys(why))[:4])
        raise PruneError(
            f"{type(model).__name__} has no prunable channel group to gate (learned gates take "
            "channel groups with a producing layer; heads and Hugging Face FFN groups are "
            "ranked instead, `method: rank`)" + (f". Not gated: {shown}" if shown else ".")
        )
    macs = {fqn: info.macs for fqn, info in layers.items()}
    return GateSet(model, groups, macs, init=init, k0=k0, k_max=k_max, mode=mode, round_to=round_to)


class GateResult(NamedTuple):
    """What :func:`train_gates` returns: the pruned model, its plan and the history."""

    model: nn.Module
    plan: PrunePlan
    history: list[dict[str, float]]


def train_gates(
    model: nn.Module,
    example_args: Sequence[Any],
    train: Iterable[Batch],
    config: TrainConfig,
    gating: GateConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    groups: Sequence[CouplingGroup] | None = None,
    val: Iterable[Batch] | None = None,
    description: str = "gates",
    task_loss: LossFn | None = None,
    **options: Any,
) -> GateResult:
    """Train weights and gates jointly, then remove the off channels; ``model`` in place.

    ``gating``: the budget and the gates' options (:class:`~edgeslim.prune.config.GateConfig`),
    with ``options`` (its field names as keywords, e.g. ``macs_reduction=0.5``) replacing
    its fields.

    ``train`` is re-iterable ``(inputs, target)`` batches, as for
    :func:`~edgeslim.train.loop.train_classifier` (``target`` may be None with a teacher).
    Loss: cross-entropy (or :func:`~edgeslim.train.distill.kd_loss` from ``teacher``, or
    ``task_loss(outputs, target, inputs)`` when given, built before the gates exist) plus
    ``lam * relu(E/T - (1 - macs_reduction))``. The weights use ``config``'s SGD and
    OneCycle schedule; the gates their own SGD (``gate_lr``, ``gate_momentum``), stepped
    from ``on_step``: their gradients are ~1e-3 (a channel's share of the MACs, a
    channel's first-order effect on the loss), so they need a far larger step than the
    weights. Plain SGD, not Adam: Adam's per-parameter normalisation moves every gate at
    the same speed, so all gates crossed zero together and the network collapsed (95% MACs
    removed, 10% top-1 on resnet20).

    Decision — the budget becomes a hard constraint at ``enforce_at`` (progress): the
    surrogate sharpens, so gates far from 0 stop moving and a penalty that has not met
    the budget by mid-training never will. From then on, before every step, the lowest
    gates beyond the budget are switched off (:meth:`GateSet.project`); they may come
    back if another gate goes lower. The rest of training adapts the weights to the
    structure that will be cut, and the final top-up (:meth:`GateSet.kept`) finds
    nothing left to do. ``enforce_at=None`` leaves the budget to the penalty and the
    final top-up alone.

    With ``round_to`` > 1 every kept width is a multiple of it (or the group's full
    width), from the first projection on, so training adapts to the rounded structure:
    counts are rounded down, then back up where the MACs budget allows, highest gates
    first (this may bring back a few channels the gates had switched off). ONNX Runtime's
    blocked conv kernels pad channels to multiples of 8 or 16, so odd widths save MACs
    but little time.

    Returns the model pruned by a :class:`PrunePlan`, in eval mode. History: one row per
    epoch (loss, ``gates_on``, ``gate_macs_ratio``, optional ``val_top1``); the last row
    also gets ``projected`` (switch-offs by the projection, a channel may count twice),
    ``topped_up`` (on-gate channels removed at the end), ``brought_back`` (off-gate channels
    kept so the reduction is within ``max_overshoot`` of the target) and the measured
    ``macs_reduction``.
    """
    cfg = GateConfig.build(gating, **options)
    macs_reduction, enforce_at = cfg.macs_reduction, cfg.enforce_at
    # before the hooks exist, so a copied teacher is never gated
    if task_loss is not None:
        task = task_loss
    elif teacher is not None:
        task = kd_loss(teacher)
    else:
        task = classification_loss(config.label_smoothing)
    gates = attach_gates(
        model, example_args, groups, k0=cfg.k0, k_max=cfg.k_max, mode=cfg.mode,
        round_to=cfg.round_to,
    )  # fmt: skip
    target = math.floor((1.0 - macs_reduction) * gates.total_macs)
    _refuse_unreachable(gates, target, macs_reduction)
    per_epoch_steps = max(steps_per_epoch(train), 1)
    per_epoch: list[dict[str, float]] = []
    counts = {"step": 0, "projected": 0}
    with gates:
        gate_opt = torch.optim.SGD(gates.parameters(), lr=cfg.gate_lr, momentum=cfg.gate_momentum)

        def loss_fn(outputs: Any, labels: Any, inputs: Inputs) -> torch.Tensor:
            return task(outputs, labels, inputs) + cfg.lam * gates.macs_penalty(macs_reduction)

        def on_step(progress: float) -> None:
            step = counts["step"]
            if step > 0:  # the previous backward left the gates' gradients
                gate_opt.step()
                gate_opt.zero_grad(set_to_none=True)
                if step % per_epoch_steps == 0:
                    per_epoch.append(gates.stats())
            gates.set_progress(progress)
            if enforce_at is not None and progress >= enforce_at:
                counts["projected"] += gates.project(target)
            counts["step"] = step + 1

        history = train_classifier(model, train, config, val, loss_fn, description, on_step=on_step)
        per_epoch.append(gates.stats())  # the last gradient is dropped: weights saw these gates
        floor = ceiling = None
        if cfg.max_overshoot is not None:  # within the band the prune stage accepts
            floor = math.ceil((1.0 - macs_reduction - cfg.max_overshoot) * gates.total_macs)
            ceiling = math.floor((1.0 - macs_reduction + cfg.max_overshoot) * gates.total_macs)
        keep = gates.kept(target, floor, ceiling)
        topped = sum(
            int((lat.detach() > 0).sum()) - int((lat.detach()[keep[g]] > 0).sum())
            for g, lat in zip(gates.groups, gates.latent, strict=True)
        )
        brought_back = sum(
            int((lat.detach()[keep[g]] <= 0).sum())
            for g, lat in zip(gates.groups, gates.latent, strict=True)
        )
    changed = {g: kept for g, kept in keep.items() if len(kept) < g.size}
    model.eval()  # traced for the plan as it is deployed: training-only code (wav2vec2's
    # per-sample SpecAugment masks) depends on the batch and stopped the trace
    plan = PrunePlan.from_groups(model, changed, example_args, name=type(model).__name__)
    apply_plan(model, plan, example_args)
    real = total_macs(layer_table(model, *example_args))
    for row, stats in zip(history, per_epoch, strict=False):
        row.update(stats)
    if history:
        history[-1].update(
            projected=float(counts["projected"]),
            topped_up=float(topped),
            brought_back=float(brought_back),
            macs_reduction=1.0 - real / gates.total_macs,
        )
    return GateResult(model, plan, history)
