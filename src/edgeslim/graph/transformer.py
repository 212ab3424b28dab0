"""Coupling groups of BERT-style transformers, found from module structure.

Hugging Face models do not trace with plain torch.fx, but their structure is regular:
a self-attention module with ``query``/``key``/``value`` linears and ``num_attention_heads``
whose sibling ``output.dense`` consumes the heads, and a layer whose ``intermediate.dense``
feeds ``output.dense`` (the FFN). The hidden size is the residual stream shared by every
layer, the embeddings and the pooler; it is reported as one fixed group.
"""

from __future__ import annotations

from torch import nn

from edgeslim.graph.coupling import CouplingGroup, GroupMember


def _linear(model: nn.Module, fqn: str) -> nn.Linear | None:
    try:
        m = model.get_submodule(fqn)
    except AttributeError:
        return None
    return m if isinstance(m, nn.Linear) else None


def is_transformer(model: nn.Module) -> bool:
    """A BERT-style model: a self-attention with ``num_attention_heads`` and a ``query``
    linear (edgeslim's split ``nn.MultiheadAttention`` has heads too, but is traced)."""
    return any(hasattr(m, "num_attention_heads") and hasattr(m, "query") for m in model.modules())


def _per_head_tensors(attention: nn.Module, heads: int) -> list[str]:
    """``name shape`` of the attention's parameters and buffers, besides ``query``/``key``/
    ``value``, with an axis of ``heads`` entries: per-head tensors a head cut would leave at
    the old count (Swin V2's ``logit_scale`` and position-bias MLP), so the pruned model
    failed in a reshape. An axis that only happens to equal ``heads`` also counts: the
    group is then kept whole, never cut wrong. A conv's kernel axes are not counted
    (PVTv2's spatial-reduction conv, 2x2 over the hidden channels, kept 2 heads whole)."""
    found = []
    for name, t in [*attention.named_parameters(), *attention.named_buffers()]:
        if name.split(".")[0] in ("query", "key", "value"):
            continue
        owner, _, leaf = name.rpartition(".")
        conv = leaf == "weight" and isinstance(
            attention.get_submodule(owner), nn.modules.conv._ConvNd
        )
        if heads in tuple(t.shape[:2] if conv else t.shape):
            found.append(f"`{name}` {tuple(t.shape)}")
    return found


def transformer_groups(model: nn.Module) -> list[CouplingGroup]:
    """Head groups (q/k/v rows + output.dense columns, ``unit = head_dim``) and FFN groups."""
    groups: list[CouplingGroup] = []
    hidden: list[GroupMember] = []
    for fqn, m in model.named_modules():
        heads = getattr(m, "num_attention_heads", None)
        head_dim = getattr(m, "attention_head_size", None)
        prefix = f"{fqn}." if fqn else ""
        qkv = [_linear(model, prefix + n) for n in ("query", "key", "value")]
        if heads is not None and head_dim is not None and all(q is not None for q in qkv):
            parent = fqn.rsplit(".", 1)[0] if "." in fqn else ""
            out_fqn = f"{parent}.output.dense" if parent else "output.dense"
            members = [GroupMember(prefix + n, "out") for n in ("query", "key", "value")]
            why = ""
            if _linear(model, out_fqn) is not None:
                members.append(GroupMember(out_fqn, "in"))
                hidden.append(GroupMember(out_fqn, "out"))
            else:  # PVTv2's `proj`, read after a reshape to the input's width: kept whole
                why = (
                    f"the heads of `{fqn}` are read by no `{out_fqn}`, so the layer that "
                    "takes their output is unknown"
                )
            hidden += [GroupMember(prefix + n, "in") for n in ("query", "key", "value")]
            others = _per_head_tensors(m, int(heads))
            if others:
                why = f"`{fqn}` holds per-head tensors that are not cut with the heads: " + (
                    ", ".join(others)
                )
            groups.append(
                CouplingGroup(
                    len(groups), int(heads), tuple(members), prunable=not why, reason=why,
                    kind="head", unit=int(head_dim),
                )
            )  # fmt: skip
        inter = _linear(model, prefix + "intermediate.dense")
        out = _linear(model, prefix + "output.dense")
        if inter is not None and out is not None and out.in_features == inter.out_features:
            members = [
                GroupMember(prefix + "intermediate.dense", "out"),
                GroupMember(prefix + "output.dense", "in"),
            ]
            hidden += [
                GroupMember(prefix + "intermediate.dense", "in"),
                GroupMember(prefix + "output.dense", "out"),
            ]
            groups.append(
                CouplingGroup(len(groups), inter.out_features, tuple(members), True, kind="ffn")
            )
    norms = [GroupMember(n, "bn") for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    if hidden:
        size = next(
            (m.normalized_shape[0] for m in model.modules() if isinstance(m, nn.LayerNorm)), 0
        )
        groups.append(
            CouplingGroup(
                len(groups),
                int(size),
                tuple(hidden + norms),
                prunable=False,
                reason="residual stream of the transformer (prune heads and FFN neurons instead)",
                kind="hidden",
            )
        )
    return groups
