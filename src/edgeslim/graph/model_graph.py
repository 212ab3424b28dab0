"""``analyze``: trace once, build the layer table and the coupling groups of a model."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from edgeslim.data.batching import flat_outputs
from edgeslim.errors import TraceError
from edgeslim.graph.attention import SplitMultiheadAttention
from edgeslim.graph.coupling import CouplingGroup, fx_coupling_groups, graph_coupling_groups
from edgeslim.graph.layers import LayerInfo, layer_table
from edgeslim.graph.swap import tied_parameters
from edgeslim.graph.trace import trace
from edgeslim.graph.tracer import eval_mode
from edgeslim.graph.transformer import is_transformer, transformer_groups


@dataclass
class ModelGraph:
    """What edgeslim knows of a model's structure, keyed by fully-qualified names."""

    model: nn.Module
    layers: dict[str, LayerInfo]
    groups: list[CouplingGroup]
    traced: fx.GraphModule | None

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.layers.values())

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def groups_of(self, fqn: str) -> list[CouplingGroup]:
        return [g for g in self.groups if any(m.fqn == fqn for m in g.members)]

    @property
    def prunable_groups(self) -> list[CouplingGroup]:
        return [g for g in self.groups if g.prunable]


def analyze(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> ModelGraph:
    """Analyze ``model`` on example inputs.

    Transformers (modules exposing ``num_attention_heads``) get structural head/FFN groups,
    plus the prunable channel groups torch.fx finds that those miss (see
    :func:`_traced_extras`); every other model is traced with torch.fx, and a model that
    cannot be traced raises :class:`~edgeslim.errors.TraceError` naming the op and module.
    """
    layers = layer_table(model, *example_args, **example_kwargs)
    if is_transformer(model):
        groups = transformer_groups(model)
        groups = _fix_tied(model, groups + _traced_extras(model, groups, example_args))
        return ModelGraph(model, layers, groups, None)
    # a split attention is analysed whole, as its heads (quantization traces into it); the
    # structure is the deployed one (eval mode: training-only Python code is not traced)
    with eval_mode(model):  # (the graph's modules are the model's: restored after both)
        gm = trace(
            model, (SplitMultiheadAttention,), inputs=len(example_args), examples=example_args
        )
        groups = graph_coupling_groups(gm, *example_args)
    return ModelGraph(model, layers, _fix_tied(model, groups), gm)


def _fix_tied(model: nn.Module, groups: list[CouplingGroup]) -> list[CouplingGroup]:
    """Groups reaching a tied parameter's layer are not prunable: cutting one owner's
    channels would give the two owners different tensors (the tie silently broken, the
    parameter count up, as seen on a GRU language model whose head shares the embedding).
    Decision: fixed, not pruned in lockstep; both ends of a tie sit in different groups."""
    tied = tied_parameters(model)
    owners: dict[str, str] = {}
    for name, first in tied.items():
        for a, b in ((name, first), (first, name)):
            owners.setdefault(a.rpartition(".")[0], f"`{a}` is tied to `{b}` (one tensor)")
    out = []
    for g in groups:
        why = next((owners[m.fqn] for m in g.members if m.fqn in owners), None)
        if g.prunable and why is not None:
            g = replace(g, prunable=False, reason=f"{why}: pruning would untie them")
        out.append(g)
    return out


def _traced_extras(
    model: nn.Module, named: list[CouplingGroup], example_args: tuple[Any, ...]
) -> list[CouplingGroup]:
    """Prunable channel groups of a transformer that its named head/FFN groups miss: MLPs
    not named BERT's way (PVTv2's and SegFormer's ``dense1 -> dwconv -> dense2``, CLIP's
    ``fc1``/``fc2``), and the conv blocks of a hybrid (MobileViT's inverted residuals,
    whose convs each sit in a wrapper module), read from the fx graph when the model traces
    (none otherwise).

    A group within one module (every member under its first producer's parent: an MLP, a
    conv pair of a residual unit) is taken as it is. A group across modules is taken only
    if the model, with every such group cut to half its units, still runs on the example
    and gives the same output shapes (:func:`_cuttable`). Why: DPT's neck has groups
    across modules whose code reshapes with the width of another tensor
    (``reshape(b, c, h, w)`` with ``c`` read from the hidden states): cut, the model no
    longer ran. Taking only groups within one module kept DPT prunable but left every conv
    of MobileViT whole (each conv in its own ``MobileViTConvLayer``): a -30% MACs target
    was refused at 17.6% reachable, and learned gates found nothing to gate. A group
    touching a layer axis the named groups already hold is left out, so no channel is
    claimed twice (BERT's FFN is found both ways)."""
    if not example_args:
        return []
    try:
        traced = fx_coupling_groups(model, *example_args)
    except TraceError:
        return []
    held = {(m.fqn, m.role) for g in named for m in g.members}
    extras = [
        g for g in traced
        if g.prunable and g.kind == "channel" and g.producers
        and not any((m.fqn, m.role) in held for m in g.members)
    ]  # fmt: skip
    across = [g for g in extras if not _within_one_module(g)]
    taken = set(map(id, _cuttable(model, across, example_args)))
    extras = [g for g in extras if _within_one_module(g) or id(g) in taken]
    return [replace(g, id=len(named) + i) for i, g in enumerate(extras)]


def _cuttable(
    model: nn.Module, groups: list[CouplingGroup], example_args: tuple[Any, ...]
) -> list[CouplingGroup]:
    """The ``groups`` that can be cut: all of them when the model with every one cut to
    half its units runs on the example with unchanged output shapes; otherwise each tried
    alone. The cuts are made on copies; ``model`` is not changed."""
    if not groups:
        return []
    with torch.no_grad(), eval_mode(model):
        want = _shapes(model(*example_args))
    if _runs_cut(model, groups, example_args, want):
        return groups
    return [g for g in groups if _runs_cut(model, [g], example_args, want)]


def _runs_cut(
    model: nn.Module, groups: list[CouplingGroup], example_args: tuple[Any, ...], want: Any
) -> bool:
    # (the one place graph reaches up to prune: only a real cut shows whether the model's
    # code reads the width elsewhere)
    from edgeslim.prune.surgery import prune_groups

    trial = copy.deepcopy(model).eval()
    try:
        prune_groups(trial, {g: list(range(max(1, g.size // 2))) for g in groups})
        with torch.no_grad():
            return _shapes(trial(*example_args)) == want
    except Exception:  # the model's code reads the cut width somewhere else
        return False


def _shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in flat_outputs(out)]


def _within_one_module(group: CouplingGroup) -> bool:
    parent = group.producers[0].rpartition(".")[0]
    return all(m.fqn.startswith(parent + ".") for m in group.members) if parent else False
