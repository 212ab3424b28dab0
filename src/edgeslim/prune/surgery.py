"""Structured pruning surgery: physically remove coupled channels from a model.

Given ``{group: kept unit indices}`` (groups from :func:`edgeslim.graph.analyze`), every
member module is rebuilt smaller: new ``nn.Parameter`` tensors, sliced BatchNorm statistics
and updated ``in_channels``/``out_features``/``groups``/``num_features`` attributes, so the
result is an ordinary, smaller ``nn.Module`` that still traces and exports. PReLU slopes
shrink with their channels (``num_parameters``); a recurrent layer (RNN/LSTM/GRU of any
depth and direction without a projection, or a cell) loses input columns of the first
layer's ``weight_ih`` (``input_size``) and, for its hidden units, the rows ``g*H + i`` of
every gate ``g`` in every layer's and direction's ``weight_ih``, ``weight_hh`` and biases,
the columns of ``weight_hh`` and those a later layer reads (``hidden_size``).

All groups of a request are applied together. A module's channel axis may hold several
groups side by side (a concatenation), and each member's ``offset`` refers to the *original*
axis, so the kept positions are first collected per ``(module, axis)`` over the full axis
and each module is sliced once. Work happens in two phases: :func:`prepare_surgery`
validates the request and computes every new tensor without touching the model, then
:meth:`Surgery.apply` swaps them in. A refused request therefore never leaves a model
half-pruned.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgeslim.errors import PruneError
from edgeslim.graph.coupling import CouplingGroup, GroupMember
from edgeslim.graph.layers import recurrent_gates

KeepIndices = Sequence[int] | torch.Tensor
KeepMap = Mapping[CouplingGroup, KeepIndices]

_AXIS = {"out": 0, "bn": 0, "depthwise": 0, "channelwise": 0, "in": 1}
_UNIT_WORD = {"channel": "channels", "head": "heads", "ffn": "neurons", "hidden": "features"}


def group_key(group: CouplingGroup) -> str:
    """Stable name of a group: the FQN of its first producing layer (``#id`` if it has none).

    Producers are unique to a group (a layer's output axis is one channel space), and FQNs
    survive re-analysis of a freshly built model, unlike ``group.id``.
    """
    return group.producers[0] if group.producers else f"#{group.id}"


def describe_group(group: CouplingGroup) -> str:
    """``group 'layer1.0.conv1' (16 channels)`` — for error messages; a group pruned in
    blocks (GroupNorm groups, a grouped conv's groups) says so, since its kept indices count
    blocks: ``group 'conv1' (32 channels in 8 blocks of 4)``."""
    if group.kind == "channel" and group.unit > 1:
        return (
            f"group {group_key(group)!r} ({group.size * group.unit} channels in {group.size} "
            f"blocks of {group.unit})"
        )
    return f"group {group_key(group)!r} ({group.size} {_unit_word(group)})"


def _unit_word(group: CouplingGroup) -> str:
    """What one kept index of ``group`` counts."""
    if group.kind == "channel" and group.unit > 1:
        return "blocks"
    return _UNIT_WORD.get(group.kind, "units")


def round_keep(n_keep: int, size: int, round_to: int = 1) -> int:
    """``n_keep`` rounded *up* to a multiple of ``round_to``, within ``[1, size]``.

    Up, so a planner never keeps fewer channels than it asked for; hardware kernels run
    best on multiples of 4/8/16. A group smaller than ``round_to`` is kept whole.
    """
    if size < 1:
        raise PruneError(f"group size must be >= 1; got {size}")
    if round_to < 1:
        raise PruneError(f"round_to must be >= 1; got {round_to}")
    n = min(max(int(n_keep), 1), size)
    n = -(-n // round_to) * round_to
    return min(n, size)


def unit_round(group: CouplingGroup, round_to: int) -> int:
    """``round_to`` (a width in channels) in ``group``'s units: the fewest units whose width
    is a multiple of it (a GroupNorm group of 4 channels, ``round_to=8``: 2 units; a head
    of 64: 1)."""
    return round_to // math.gcd(round_to, max(group.unit, 1))


def check_kept(group: CouplingGroup, kept: KeepIndices) -> list[int]:
    """Sorted kept indices of ``group``; refuse a fixed group, bad indices or keeping none."""
    name = describe_group(group)
    if not group.prunable:
        raise PruneError(
            f"cannot prune {name}: it is not prunable ({group.reason}). "
            "Leave it out of the request."
        )
    raw = kept.tolist() if isinstance(kept, torch.Tensor) else list(kept)
    idx: list[int] = []
    for i in raw:
        if isinstance(i, bool):
            raise PruneError(f"kept indices of {name} must be integers, not booleans")
        try:
            idx.append(operator.index(i))
        except TypeError:
            raise PruneError(f"kept indices of {name} must be integers; got {i!r}") from None
    if not idx:
        raise PruneError(
            f"cannot keep zero {_unit_word(group)} of {name}: that would cut "
            "the network. Keep at least one."
        )
    bad = [i for i in idx if not 0 <= i < group.size]
    if bad:
        raise PruneError(f"kept index {bad[0]} of {name} is out of range 0..{group.size - 1}")
    if len(set(idx)) != len(idx):
        dup = next(i for i in idx if idx.count(i) > 1)
        raise PruneError(f"kept index {dup} of {name} is listed twice")
    return sorted(idx)


# --- per-module slicing -------------------------------------------------------------------


def _is_depthwise(m: nn.Module) -> bool:
    """A conv whose groups each map their channels to as many (depthwise: one each), which
    the coupling analysis prunes in whole groups (role ``depthwise``)."""
    return (
        isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.in_channels == m.out_channels
    )


def _is_norm(m: nn.Module) -> bool:
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return True
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def _recurrent_problem(m: nn.Module) -> str:
    """Why a recurrent layer cannot be sliced ("" if it can, or if it is not one)."""
    if not isinstance(m, nn.RNNBase):
        return ""
    return f"proj_size={m.proj_size}" if getattr(m, "proj_size", 0) else ""


def _is_recurrent(m: nn.Module) -> bool:
    return recurrent_gates(m) > 0 and not _recurrent_problem(m)


def _rnn_suffixes(m: nn.Module) -> list[tuple[int, str]]:
    """``(layer, suffix)`` of every layer and direction (``_l0``, ``_l0_reverse``, ``_l1``
    ...); a cell has one, with no suffix."""
    if not isinstance(m, nn.RNNBase):
        return [(0, "")]
    sides = ["", "_reverse"] if m.bidirectional else [""]
    return [(k, f"_l{k}{side}") for k in range(m.num_layers) for side in sides]


def is_transposed_conv(m: nn.Module) -> bool:
    """A ConvTranspose: its weight is ``(in, out / groups, ...)``, the other way round from a
    conv's, so its output channels are weight axis 1 and its input channels axis 0."""
    return isinstance(m, nn.modules.conv._ConvTransposeNd)


def _axis_len(m: nn.Module, axis: int) -> int:
    if recurrent_gates(m):
        size = m.hidden_size if axis == 0 else m.input_size
        assert isinstance(size, int)
        return size
    if isinstance(m, nn.PReLU):
        return int(m.num_parameters)
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[0])
    if isinstance(m, nn.GroupNorm):
        return int(m.num_channels)
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return int(m.num_features)
    weight = m.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[1 - axis if is_transposed_conv(m) else axis])


def _check_role(m: nn.Module, fqn: str, role: str, name: str) -> None:
    if recurrent_gates(m) and _recurrent_problem(m):
        raise PruneError(
            f"cannot prune {name}: member `{fqn}` ({type(m).__name__}) has "
            f"{_recurrent_problem(m)}; edgeslim slices recurrent layers without a projection "
            f"only. Pass `{fqn}` in skip= to leave its group whole."
        )
    plain = (
        isinstance(m, nn.Linear)
        or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1)
        or _is_recurrent(m)
    )
    ok = {
        "out": plain,
        "in": plain,
        "depthwise": _is_depthwise(m),
        "bn": _is_norm(m),
        "channelwise": isinstance(m, nn.PReLU) and m.num_parameters > 1,
    }.get(role, False)
    if not ok:
        raise PruneError(
            f"cannot prune {name}: member `{fqn}` ({type(m).__name__}) cannot be sliced as "
            f"role {role!r}; edgeslim slices Conv/Linear (groups=1), depthwise convs, grouped "
            "convs that keep their width (whole groups), "
            "BatchNorm/LayerNorm, PReLU and RNN/LSTM/GRU layers (no projection) and cells. Pass "
            f"`{fqn}` in skip= to leave its group whole."
        )


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t.detach().index_select(dim, idx.to(t.device))


def _sliced(
    m: nn.Module, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """New tensors and attributes of ``m`` after keeping ``out_idx`` / ``in_idx`` (None = all)."""
    tensors: dict[str, torch.Tensor] = {}
    attrs: dict[str, Any] = {}
    if recurrent_gates(m):
        return _sliced_recurrent(m, out_idx, in_idx)
    if isinstance(m, nn.PReLU):
        if out_idx is not None:
            tensors["weight"] = _take(m.weight, 0, out_idx)
            attrs["num_parameters"] = int(out_idx.numel())
        return tensors, attrs
    if _is_norm(m):
        n = _axis_len(m, 0)
        own = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
        for name, t in own:
            if out_idx is not None and t.dim() >= 1 and t.shape[0] == n:
                tensors[name] = _take(t, 0, out_idx)
        if out_idx is None:
            return tensors, attrs
        k = int(out_idx.numel())
        if isinstance(m, nn.GroupNorm):
            per = m.num_channels // m.num_groups
            kept = out_idx.view(-1, per) if k % per == 0 else None
            whole = kept is not None and bool(
                ((kept - kept[:, :1]) == torch.arange(per)).all() and (kept[:, 0] % per == 0).all()
            )
            if not whole:  # coupling prunes GroupNorm channels in whole groups only
                raise PruneError(f"GroupNorm ({m.num_groups} groups of {per}) can only lose "
                                 "whole groups; the kept channels split one")  # fmt: skip
            attrs.update(num_channels=k, num_groups=k // per)
        elif isinstance(m, nn.LayerNorm):
            attrs["normalized_shape"] = (k,)
        else:
            attrs["num_features"] = k
        return tensors, attrs
    weight = m.weight
    bias = m.bias
    assert isinstance(weight, torch.Tensor)
    if is_transposed_conv(m):  # (in, out, ...): keep the kept outputs' columns
        w = _take(_take(weight, 1, out_idx), 0, in_idx)
        tensors["weight"] = w
        if isinstance(bias, torch.Tensor) and out_idx is not None:
            tensors["bias"] = _take(bias, 0, out_idx)
        attrs.update(out_channels=int(w.shape[1]), in_channels=int(w.shape[0]))
        return tensors, attrs
    w = _take(_take(weight, 0, out_idx), 1, in_idx)
    tensors["weight"] = w
    if isinstance(bias, torch.Tensor) and out_idx is not None:
        tensors["bias"] = _take(bias, 0, out_idx)
    if isinstance(m, nn.Linear):
        attrs.update(out_features=int(w.shape[0]), in_features=int(w.shape[1]))
    elif _is_depthwise(m):
        n, per = int(w.shape[0]), int(w.shape[1])
        kept = out_idx.view(-1, per) if out_idx is not None and n % per == 0 else None
        whole = kept is not None and bool(
            ((kept - kept[:, :1]) == torch.arange(per)).all() and (kept[:, 0] % per == 0).all()
        )
        if not whole:  # coupling prunes a grouped conv's channels in whole groups only
            raise PruneError(f"grouped conv ({m.groups} groups of {per}) can only lose whole "
                             "groups; the kept channels split one")  # fmt: skip
        attrs.update(out_channels=n, in_channels=n, groups=n // per)
    else:
        attrs.update(out_channels=int(w.shape[0]), in_channels=int(w.shape[1]))
    return tensors, attrs


def _sliced_recurrent(
    m: nn.Module, hidden_idx: torch.Tensor | None, in_idx: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A recurrent layer keeping hidden units ``hidden_idx`` and input features ``in_idx``.

    Its gate weights are stacked ``G`` blocks of ``H`` rows, so hidden unit ``i`` owns rows
    ``g*H + i`` of every gate ``g`` (and column ``i`` of ``weight_hh``, which reads h), in
    every layer and direction (they share ``hidden_size``). Layer 0 reads the input
    features; a later layer reads the one before it, ``[forward | backward]`` when
    bidirectional, so its ``weight_ih`` keeps those hidden columns in each half.
    """
    gates = recurrent_gates(m)
    size = m.hidden_size
    assert isinstance(size, int)
    sides = 2 if getattr(m, "bidirectional", False) else 1
    rows = below = None
    if hidden_idx is not None:
        rows = torch.cat([hidden_idx + g * size for g in range(gates)])
        below = torch.cat([hidden_idx + d * size for d in range(sides)])
    tensors: dict[str, torch.Tensor] = {}
    for layer, suffix in _rnn_suffixes(m):
        for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            t = getattr(m, key + suffix, None)
            if not isinstance(t, torch.Tensor):
                continue  # bias=False
            t = _take(t, 0, rows)
            if key == "weight_ih":
                t = _take(t, 1, in_idx if layer == 0 else below)
            elif key == "weight_hh":
                t = _take(t, 1, hidden_idx)
            tensors[key + suffix] = t
    attrs: dict[str, Any] = {}
    if hidden_idx is not None:
        attrs["hidden_size"] = int(hidden_idx.numel())
    if in_idx is not None:
        attrs["input_size"] = int(in_idx.numel())
    return tensors, attrs


@dataclass
class _Edit:
    fqn: str
    module: nn.Module
    tensors: dict[str, torch.Tensor]
    attrs: dict[str, Any]
    out_idx: torch.Tensor | None = None  # kept output positions (None: all)
    in_idx: torch.Tensor | None = None  # kept input positions (None: all)


@dataclass
class Surgery:
    """A validated pruning request with every new tensor computed; nothing applied yet.

    ``state_shapes()`` tells what the state dict will look like (to check a checkpoint
    before committing); ``apply()`` swaps the tensors in, in place.
    """

    model: nn.Module
    edits: list[_Edit]
    applied: bool = field(default=False)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every state-dict entry of the model after :meth:`apply`."""
        new: dict[int, torch.Tensor] = {}
        for e in self.edits:
            own: dict[str, torch.Tensor] = dict(e.module.named_buffers(recurse=False))
            own.update(e.module.named_parameters(recurse=False))
            for name, t in e.tensors.items():
                new[id(own[name])] = t
        state = self.model.state_dict(keep_vars=True)
        return {k: tuple(new.get(id(v), v).shape) for k, v in state.items()}

    def kept_positions(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per sliced module FQN, the ``(output, input)`` positions it keeps of the unpruned
        module's (None: all of that axis), e.g. to fit a pruned layer to its unpruned self
        (:func:`edgeslim.prune.reconstruct.reconstruct_`)."""
        return {e.fqn: (e.out_idx, e.in_idx) for e in self.edits if e.tensors}

    def apply(self) -> nn.Module:
        """Swap in the sliced tensors and attributes; returns the (same) model."""
        if self.applied:
            raise PruneError("this surgery was already applied; prepare a new one")
        with torch.no_grad():
            for e in self.edits:
                params = e.module._parameters
                for name, t in e.tensors.items():
                    old = params.get(name)
                    if old is not None:
                        setattr(e.module, name, nn.Parameter(t, requires_grad=old.requires_grad))
                    else:
                        setattr(e.module, name, t)
                for name, value in e.attrs.items():
                    setattr(e.module, name, value)
                if isinstance(e.module, nn.RNNBase):
                    e.module._init_flat_weights()  # refresh its cached weight list
        self.applied = True
        return self.model


def _canonical_names(model: nn.Module) -> dict[int, str]:
    """One FQN per module object, so a module reachable by two paths is sliced once."""
    return {id(m): n for n, m in model.named_modules()}


def _head_parent(model: nn.Module, group: CouplingGroup, name: str) -> tuple[str, nn.Module]:
    fqn = group.producers[0].rsplit(".", 1)[0] if "." in group.producers[0] else ""
    parent = model.get_submodule(fqn)
    if not hasattr(parent, "num_attention_heads"):
        raise PruneError(
            f"cannot prune {name}: `{fqn}` has no `num_attention_heads` to update, so the "
            "attention would reshape wrongly after pruning."
        )
    return fqn, parent


def prepare_surgery(model: nn.Module, keep: KeepMap) -> Surgery:
    """Validate ``keep`` against ``model`` and compute the sliced tensors; model untouched.

    Raises :class:`PruneError` for a non-prunable group, an index out of range, keeping
    zero units, or a member the model lacks or edgeslim cannot slice.
    """
    names = _canonical_names(model)
    masks: dict[tuple[str, int], torch.Tensor] = {}
    modules: dict[str, nn.Module] = {}
    attr_edits: dict[str, dict[str, Any]] = {}
    for group, kept in keep.items():
        idx = check_kept(group, kept)
        name = describe_group(group)
        unit_keep = torch.zeros(group.size, dtype=torch.bool)
        unit_keep[idx] = True
        for mem in group.members:
            fqn, m = _member(model, names, mem, name)
            _check_role(m, mem.fqn, mem.role, name)
            axis = _AXIS[mem.role]
            step = group.unit * mem.repeat
            length = _axis_len(m, axis)
            end = mem.offset + group.size * step
            if end > length:
                raise PruneError(
                    f"cannot prune {name}: member `{mem.fqn}` has {length} positions on axis "
                    f"{axis} but the group spans {mem.offset}..{end}; the group does not "
                    "belong to this model (re-run analyze on it)."
                )
            mask = masks.setdefault((fqn, axis), torch.ones(length, dtype=torch.bool))
            mask[mem.offset : end] &= unit_keep.repeat_interleave(step)
            modules[fqn] = m
        if group.kind == "head":
            pfqn, parent = _head_parent(model, group, name)
            attrs = {"num_attention_heads": len(idx)}
            if hasattr(parent, "all_head_size"):
                attrs["all_head_size"] = len(idx) * group.unit
            attr_edits[names.get(id(parent), pfqn)] = attrs
    edits: list[_Edit] = []
    for fqn, m in modules.items():
        out_idx, in_idx = (_kept_positions(masks.get((fqn, a))) for a in (0, 1))
        if in_idx is not None and (_is_depthwise(m) or _is_norm(m) or isinstance(m, nn.PReLU)):
            raise PruneError(f"`{fqn}` is asked to drop input channels, which it cannot do")
        if out_idx is None and in_idx is None:
            continue
        tensors, attrs = _sliced(m, out_idx, in_idx)
        edits.append(_Edit(fqn, m, tensors, attrs, out_idx, in_idx))
    for fqn, attrs in attr_edits.items():
        edits.append(_Edit(fqn, model.get_submodule(fqn), {}, attrs))
    return Surgery(model, edits)


def _member(
    model: nn.Module, names: dict[int, str], mem: GroupMember, name: str
) -> tuple[str, nn.Module]:
    try:
        m = model.get_submodule(mem.fqn)
    except AttributeError:
        raise PruneError(
            f"cannot prune {name}: the model has no module `{mem.fqn}` (the group comes from "
            "a different model; re-run analyze on this one)."
        ) from None
    return names.get(id(m), mem.fqn), m


def _kept_positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or bool(mask.all()):
        return None
    return torch.nonzero(mask).flatten()


def prune_groups(model: nn.Module, keep: KeepMap) -> nn.Module:
    """Keep only ``keep[group]`` units of every listed group, in place; returns ``model``.

    Groups not listed keep all their channels. Optimizers holding the old parameters must
    be rebuilt afterwards, since every sliced tensor is a new ``nn.Parameter``.
    """
    return prepare_surgery(model, keep).apply()
