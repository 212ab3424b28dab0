"""The importance-criterion interface, the registry, and per-unit views of member weights.

A criterion scores every unit of a coupling group (a channel, an FFN neuron or an attention
head of ``unit`` rows); higher means more important. ``scores`` takes all groups at once so
criteria that need the whole network (NISP propagation, Taylor's shared backward passes)
can compute everything in one go.

Aggregation (the default of every weight criterion): a group is scored from its
*producers* only, the members that write its channels (role ``out`` and ``depthwise``);
``include_consumers=True`` adds the consumers' input columns (role ``in``). Each member is
scored on its own and, with ``normalize=True``, divided by its mean score before the
members are summed, so a residual group's producers in different layers (with different
weight scales and fan-ins) weigh equally and groups of different layers compare on one
scale (mean score 1 per member).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from edgeslim.errors import EdgeslimError
from edgeslim.graph.coupling import CouplingGroup, GroupMember, Role
from edgeslim.graph.layers import recurrent_gates
from edgeslim.registry import Registry

PRODUCER_ROLES: tuple[Role, ...] = ("out", "depthwise")
CONSUMER_ROLES: tuple[Role, ...] = ("in",)
_EPS = 1e-12


class UnknownImportanceError(EdgeslimError, ValueError):
    """An importance criterion name is not registered; the message lists the valid names."""


class Importance(ABC):
    """Scores every unit of each prunable coupling group; higher = more important."""

    name: str = ""

    @abstractmethod
    def scores(self, model: nn.Module, groups: Sequence[CouplingGroup]) -> dict[int, torch.Tensor]:
        """``{group.id: float32 tensor of group.size scores}`` for each prunable group.

        Non-prunable groups in ``groups`` get no entry; they may still be used as context
        (NISP reads which groups a consumer's outputs belong to).
        """

    def __call__(
        self, model: nn.Module, groups: Sequence[CouplingGroup]
    ) -> dict[int, torch.Tensor]:
        return self.scores(model, groups)


class ScoredOnce(Importance):
    """``criterion``'s scores of one model, computed at the first call and reused after.

    For planning the same model several times (the prune stage's automatic ``round_to``
    tries steps 8, 4, 2, 1): a data-driven criterion (Taylor, fluctuation) reads its
    batches once instead of at every try. Scores are keyed by the model's identity and the
    groups' ids; any other model or group set is scored afresh.
    """

    def __init__(self, criterion: Importance) -> None:
        self.criterion = criterion
        self.name = criterion.name
        self._key: tuple[int, tuple[int, ...]] | None = None
        self._scores: dict[int, torch.Tensor] = {}

    def scores(self, model: nn.Module, groups: Sequence[CouplingGroup]) -> dict[int, torch.Tensor]:
        key = (id(model), tuple(g.id for g in groups))
        if key != self._key:
            self._scores, self._key = self.criterion.scores(model, groups), key
        return self._scores


IMPORTANCE: Registry[Callable[..., Importance]] = Registry("importance criterion")


def register(name: str) -> Callable[[type[Importance]], type[Importance]]:
    """Class decorator: register a criterion under ``name`` and record the name on it."""

    def add(cls: type[Importance]) -> type[Importance]:
        cls.name = name
        IMPORTANCE.register(name, cls)
        return cls

    return add


def check_criterion(name: str) -> str:
    """``name`` when a criterion is registered under it, else an error listing the names
    (what every surface that takes a criterion checks before loading anything)."""
    if name not in IMPORTANCE:
        raise UnknownImportanceError(
            f"unknown importance criterion {name!r}; allowed values: "
            f"{', '.join(IMPORTANCE.names())}"
        )
    return name


def get_importance(name: str, **kwargs: Any) -> Importance:
    """Build the criterion registered as ``name`` with ``kwargs`` (e.g. ``batches`` for taylor)."""
    check_criterion(name)
    try:
        return IMPORTANCE.get(name)(**kwargs)
    except TypeError as exc:
        raise TypeError(f"importance criterion {name!r}: {exc}") from exc


# --- per-unit views ------------------------------------------------------------------------


def channel_dim(member: GroupMember) -> int:
    """The weight axis that holds the group's channels: 1 for consumers, 0 otherwise."""
    return 1 if member.role == "in" else 0


def member_span(member: GroupMember, group: CouplingGroup) -> slice:
    """The slice of the member's channel axis covered by the group (all units)."""
    width = group.unit * (member.repeat if member.role == "in" else 1)
    return slice(member.offset, member.offset + group.size * width)


def unit_view(tensor: torch.Tensor, member: GroupMember, group: CouplingGroup) -> torch.Tensor:
    """``tensor`` regrouped to ``(group.size, -1)``: row i holds every entry of unit i.

    Rows ``offset + i*unit ...`` on dim 0 for producers/norms, columns
    ``offset + i*unit*repeat ...`` on dim 1 for consumers (a flatten spreads one channel over
    ``repeat`` features).
    """
    dim = channel_dim(member)
    span = member_span(member, group)
    part = tensor.narrow(dim, span.start, span.stop - span.start)
    return part.movedim(dim, 0).reshape(group.size, -1)


def recurrent_unit_rows(tensor: torch.Tensor, gates: int) -> torch.Tensor:
    """A recurrent layer's gate-stacked rows regrouped per hidden unit: ``(G*H, ...)`` ->
    ``(H, G*...)``, row i holding rows ``g*H + i`` of every gate ``g``."""
    hidden = tensor.shape[0] // gates
    return tensor.reshape(gates, hidden, -1).transpose(0, 1).reshape(hidden, -1)


def recurrent_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``weight_ih``/``weight_hh``/``bias_ih``/``bias_hh`` of a recurrent layer (its first
    layer, forward direction: the one reading the input features) or cell."""
    t = getattr(module, name if isinstance(module, nn.RNNCellBase) else f"{name}_l0", None)
    return t if isinstance(t, torch.Tensor) else None


def recurrent_hidden_rows(module: nn.Module, gates: int) -> torch.Tensor | None:
    """Every weight row a hidden unit owns, in every layer and direction, as ``(H, ...)``:
    its gate rows of each ``weight_ih*`` and ``weight_hh*`` (they share the hidden units)."""
    if isinstance(module, nn.RNNCellBase):
        names = ["weight_ih", "weight_hh"]
    else:
        sides = ["", "_reverse"] if getattr(module, "bidirectional", False) else [""]
        layers = int(getattr(module, "num_layers", 1))
        names = [f"weight_{k}_l{i}{d}" for i in range(layers) for d in sides for k in ("ih", "hh")]
    parts = [getattr(module, n, None) for n in names]
    if not all(isinstance(t, torch.Tensor) for t in parts):
        return None
    return torch.cat([recurrent_unit_rows(t, gates) for t in parts], 1)  # type: ignore[arg-type]


def member_units(
    module: nn.Module, member: GroupMember, group: CouplingGroup, tensor: torch.Tensor
) -> torch.Tensor:
    """``tensor`` (one of the member's parameters, or a gradient of one) as ``(size, -1)``.

    A recurrent layer's hidden units (role ``out``) are gate-strided; everything else is
    :func:`unit_view`.
    """
    gates = recurrent_gates(module)
    if gates and member.role == "out":
        return recurrent_unit_rows(tensor, gates)
    return unit_view(tensor, member, group)


def member_weight(model: nn.Module, member: GroupMember) -> torch.Tensor | None:
    """The member module's ``weight`` tensor, or None (e.g. a norm layer without affine).

    A recurrent layer has no ``weight``: its hidden units (role ``out``) are scored by their
    rows of every gate in every ``weight_ih*`` and ``weight_hh*`` (all layers and
    directions), regrouped to ``(H, ...)``; its input features (role ``in``) by the columns
    of the first layer's ``weight_ih``.
    """
    module = model.get_submodule(member.fqn)
    gates = recurrent_gates(module)
    if gates:
        if member.role == "in":
            return recurrent_tensor(module, "weight_ih")
        return recurrent_hidden_rows(module, gates)
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and isinstance(weight, torch.Tensor):
        return weight.transpose(0, 1)  # (in, out, ...) -> (out, in, ...), as a conv's
    return weight if isinstance(weight, torch.Tensor) else None


def unit_matrix(model: nn.Module, group: CouplingGroup, member: GroupMember) -> torch.Tensor:
    """The member's weights as a detached float64 ``(group.size, d)`` matrix, one row a unit."""
    weight = member_weight(model, member)
    if weight is None:
        raise ValueError(f"member {member.fqn!r} of group {group.id} has no weight tensor")
    return unit_view(weight.detach().double(), member, group)


def scored_members(group: CouplingGroup, include_consumers: bool) -> list[GroupMember]:
    roles = PRODUCER_ROLES + (CONSUMER_ROLES if include_consumers else ())
    return [m for m in group.members if m.role in roles]


def unit_matrices(
    model: nn.Module, group: CouplingGroup, include_consumers: bool = False
) -> list[torch.Tensor]:
    """One ``(size, d)`` matrix per scored member that has weights."""
    mats = [
        unit_matrix(model, group, m)
        for m in scored_members(group, include_consumers)
        if member_weight(model, m) is not None
    ]
    if not mats:
        raise ValueError(
            f"group {group.id} has no member with weights to score ({group.describe()})"
        )
    return mats


def combine(per_member: Sequence[torch.Tensor], normalize: bool) -> torch.Tensor:
    """Sum the members' unit scores, each divided by its mean first when ``normalize``."""
    total = torch.zeros_like(per_member[0], dtype=torch.float64)
    for s in per_member:
        s = s.double()
        total += s / (s.abs().mean() + _EPS) if normalize else s
    return total


def finish(scores: torch.Tensor) -> torch.Tensor:
    """Scores as returned to callers: detached float32 on the CPU."""
    return scores.detach().to(device="cpu", dtype=torch.float32)


class MemberImportance(Importance):
    """A criterion computed per member from its ``(units, d)`` weight matrix, then combined."""

    def __init__(self, include_consumers: bool = False, normalize: bool = True) -> None:
        self.include_consumers = include_consumers
        self.normalize = normalize

    @abstractmethod
    def member_scores(self, mat: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` float64 unit matrix -> ``(n,)`` scores."""

    def group_scores(self, model: nn.Module, group: CouplingGroup) -> torch.Tensor:
        mats = unit_matrices(model, group, self.include_consumers)
        return combine([self.member_scores(m) for m in mats], self.normalize)

    def scores(self, model: nn.Module, groups: Sequence[CouplingGroup]) -> dict[int, torch.Tensor]:
        return {g.id: finish(self.group_scores(model, g)) for g in groups if g.prunable}
