"""NISP: Neuron Importance Score Propagation (Yu et al. 2018).

Importance starts at the model output (every output feature scores 1) and flows backward
through the absolute weights, ``s_k = |W_{k+1}|^T s_{k+1}``. At the group level a unit's
score is the sum over the group's consumers ``c`` (members with role ``in``) of
``|W_c|^T r_c``, summed over the consumer's other weight axes (kernel taps) and over the
``unit * repeat`` columns of the unit, where ``r_c`` scores the consumer's *own* output
channels: the NISP scores of the group in which ``c`` is a producer, or 1 when that group is
not prunable (the model output, a transformer's residual stream, an opaque op) or was not
passed in.

Residual groups make the group graph cyclic (``layer1.0.conv1`` reads the stream that
``layer1.0.conv2`` writes back into), so scores are defined per position: the scores of
group ``G`` *as written by a producer at position t* sum only the consumers after ``t``
(module registration order, which follows execution order in the zoo and in Hugging Face
models). ``s(G) = s(G, -1)`` uses every consumer. The recursion over ``(group, t)`` is
memoised and acyclic for a feed-forward network; if registration order ever closes a
cycle, the looping edge contributes 0 instead of recursing forever.

Not propagated: BatchNorm scales and depthwise kernels (they sit inside a group and do not
change which channel feeds which); biases. Computation is in float64 (raw scores grow
geometrically with depth); the returned scores are divided by their mean per group unless
``normalize=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgeslim.graph.coupling import CouplingGroup, GroupMember
from edgeslim.prune.importance.base import Importance, finish, register


def _abs_in_out(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` as ``(out, in)``, summed over the remaining (kernel) axes."""
    w = weight.detach().double().abs()
    return w.reshape(w.shape[0], w.shape[1], -1).sum(dim=2)


@register("nisp")
class NISP(Importance):
    """Importance propagated backward from the output through ``|W|`` (see module doc)."""

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize

    def scores(self, model: nn.Module, groups: Sequence[CouplingGroup]) -> dict[int, torch.Tensor]:
        return _Propagation(model, groups).run(self.normalize)


class _Propagation:
    def __init__(self, model: nn.Module, groups: Sequence[CouplingGroup]) -> None:
        self.model = model
        self.by_id = {g.id: g for g in groups}
        self.pos = {name: i for i, (name, _) in enumerate(model.named_modules())}
        # fqn -> [(group, member)] where the module writes the group's channels.
        self.writes: dict[str, list[tuple[CouplingGroup, GroupMember]]] = {}
        for g in groups:
            for m in g.members:
                if m.role == "out":
                    self.writes.setdefault(m.fqn, []).append((g, m))
        self.memo: dict[tuple[int, int], torch.Tensor] = {}
        self.active: set[tuple[int, int]] = set()
        self.weights: dict[str, torch.Tensor] = {}

    def run(self, normalize: bool) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for g in self.by_id.values():
            if g.prunable:
                s = self.group(g, -1)
                out[g.id] = finish(s / (s.mean() + 1e-300) if normalize else s)
        return out

    def abs_weight(self, fqn: str) -> torch.Tensor | None:
        if fqn not in self.weights:
            w = getattr(self.model.get_submodule(fqn), "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() < 2:
                return None
            self.weights[fqn] = _abs_in_out(w)
        return self.weights[fqn]

    def group(self, g: CouplingGroup, after: int) -> torch.Tensor:
        """Scores of ``g``'s units as seen by its consumers positioned after ``after``."""
        key = (g.id, after)
        if key in self.memo:
            return self.memo[key]
        total = torch.zeros(g.size, dtype=torch.float64)
        if key in self.active:  # a cycle in registration order: cut the edge
            return total
        self.active.add(key)
        for m in g.members:
            if m.role != "in" or self.pos.get(m.fqn, -1) <= after:
                continue
            w = self.abs_weight(m.fqn)
            if w is None:
                continue
            per_col = w.T @ self.outputs(m.fqn, w.shape[0])
            width = g.unit * m.repeat
            cols = per_col[m.offset : m.offset + g.size * width]
            total += cols.reshape(g.size, width).sum(dim=1)
        self.active.discard(key)
        self.memo[key] = total
        return total

    def outputs(self, fqn: str, n_out: int) -> torch.Tensor:
        """Importance of each output channel of ``fqn``: its groups' scores, 1 elsewhere."""
        r = torch.ones(n_out, dtype=torch.float64)
        at = self.pos.get(fqn, -1)
        for h, m in self.writes.get(fqn, []):
            if h.prunable:
                s = self.group(h, at).repeat_interleave(h.unit)
                r[m.offset : m.offset + s.numel()] = s
        return r
