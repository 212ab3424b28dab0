"""``nn.MultiheadAttention`` with its projections as four linears, so heads can be pruned.

Why: torch's ``nn.MultiheadAttention`` keeps q/k/v in one packed ``in_proj_weight`` and
computes them inside one function, and it requires ``embed_dim == num_heads * head_dim``:
no narrower torch module exists for an attention with fewer heads than its embedding
width. :class:`SplitMultiheadAttention` computes the same function with ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj`` as ordinary ``nn.Linear`` children, and any number of
heads of ``head_dim`` each between them. The graph analysis then sees one head group per
attention (q/k/v rows and ``out_proj`` columns, ``head_dim`` at a time), importance criteria
score it like any group, and surgery slices the four linears and updates
``num_attention_heads``. Quantization and export treat the four linears like any other.

:func:`split_attention` swaps every ``nn.MultiheadAttention`` of a model for its split twin
in place (outputs equal to float precision); pruning calls it on its working copy.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward (same arguments and outputs) over four linears.

    ``num_attention_heads`` heads of ``head_dim`` each; ``embed_dim`` is the query's (and the
    output's) width. Per-head 3-D ``attn_mask`` of shape ``(N * heads, L, S)`` is accepted
    while no head has been pruned (which heads it meant is no longer known after).
    """

    # read by nn.TransformerEncoderLayer's fast-path checks: they must send it the slow way
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim = embed_dim
        self.num_attention_heads = num_heads
        self.built_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        # fake-quant hooks for the two attention matmuls' operands, set by quantization
        # (edgeslim.quant.attention.QuantSplitAttention); None: float
        self.q_quant: nn.Module | None = None
        self.k_quant: nn.Module | None = None
        self.v_quant: nn.Module | None = None
        self.attn_quant: nn.Module | None = None

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
        """The same attention, weights copied (raises ``ValueError`` for what it lacks)."""
        why = unsplittable(mha)
        if why:
            raise ValueError(why)
        e, h = int(mha.embed_dim), int(mha.num_heads)
        bias = mha.in_proj_bias is not None
        new = cls(
            e, h, e // h, kdim=int(mha.kdim), vdim=int(mha.vdim), bias=bias,
            dropout=float(mha.dropout), batch_first=bool(mha.batch_first),
        )  # fmt: skip
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                q, k, v = mha.in_proj_weight.chunk(3, 0)
            else:
                q, k, v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, w in zip((new.q_proj, new.k_proj, new.v_proj), (q, k, v), strict=True):
                lin.weight.copy_(w)
            if bias:
                for lin, b in zip(
                    (new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3), strict=True
                ):
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if new.out_proj.bias is not None and mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)

    def _heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        n, t = x.shape[0], x.shape[1]
        return proj(x).reshape(n, t, self.num_attention_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # traced (torch.fx, for quantization), the call is taken to be batched: a traced
        # value's rank cannot steer Python
        unbatched = not is_fx_symbolic_tracing() and query.dim() == 2
        if unbatched:  # (L, E): one sequence
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length = query.shape[0], query.shape[1]
        q = self._heads(query, self.q_proj)
        k = self._heads(key, self.k_proj)
        v = self._heads(value, self.v_proj)
        q = maybe_quant(self.q_quant, q * (1.0 / math.sqrt(self.head_dim)))
        k, v = maybe_quant(self.k_quant, k), maybe_quant(self.v_quant, v)
        scores = q @ k.transpose(-2, -1)  # (N, H, L, S)
        if attn_mask is not None and attn_mask.dim() == 3:
            self._check_per_head(attn_mask)
        scores = scores + additive_mask(
            attn_mask, key_padding_mask, is_causal, n, self.num_attention_heads, length,
            k.shape[2], scores.dtype, scores.device,
        )  # fmt: skip
        weights = scores.softmax(-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = (maybe_quant(self.attn_quant, weights) @ v).transpose(1, 2).reshape(n, length, -1)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        w = weights.mean(1) if average_attn_weights else weights
        return out, w.squeeze(0) if unbatched else w

    def _check_per_head(self, mask: torch.Tensor) -> None:
        if self.num_attention_heads != self.built_heads:
            raise ValueError(
                f"a per-head attn_mask {tuple(mask.shape)} was given to an attention pruned "
                f"from {self.built_heads} to {self.num_attention_heads} heads; which heads it "
                "meant is no longer known: pass an (L, S) mask"
            )


def maybe_quant(quant: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """``quant(x)``, or ``x`` when there is no quantizer (float)."""
    return x if quant is None else quant(x)


def additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    batch: int,
    heads: int,
    tgt: int,
    src: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``nn.MultiheadAttention``'s masks as one term added to the scores, broadcast to
    ``(batch, heads, tgt, src)``: boolean ``True`` (not allowed) becomes ``-inf``, a float
    mask is added as it is; 0 when there is none. ``is_causal`` without a mask builds the
    causal one; a 3-D ``attn_mask`` is ``(batch * heads, tgt, src)``."""
    total = torch.zeros((), dtype=dtype, device=device)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=device).triu(1)
    if attn_mask is not None:
        m = _as_additive(attn_mask, dtype)
        if m.dim() == 3:
            m = m.reshape(batch, heads, tgt, src)
        total = total + m
    if key_padding_mask is not None:
        total = total + _as_additive(key_padding_mask, dtype).reshape(batch, 1, 1, src)
    return total


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def unsplittable(mha: nn.MultiheadAttention) -> str:
    """Why this attention has no split twin ("" when it has one)."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True (learned key/value biases appended to the sequence)"
    if mha.add_zero_attn:
        return "add_zero_attn=True"
    if mha.embed_dim % mha.num_heads:
        return f"embed_dim {mha.embed_dim} is not a multiple of num_heads {mha.num_heads}"
    return ""


def split_attention(model: nn.Module, only: Collection[str] | None = None) -> dict[str, str]:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (those named in ``only``, if
    given; the model itself excepted) by a :class:`SplitMultiheadAttention` computing the
    same outputs, in place. Returns, per attention FQN, ``"split"`` or why it was left as it
    is. ``nn.TransformerEncoder`` stacks stop using their nested-tensor fast path (it reads
    the packed weights)."""
    done: dict[str, str] = {}
    for fqn, mod in list(model.named_modules()):
        if not isinstance(mod, nn.MultiheadAttention) or not fqn:
            continue
        if only is not None and fqn not in only:
            continue
        why = unsplittable(mod)
        if why:
            done[fqn] = why
            continue
        parent_fqn, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_fqn)
        setattr(parent, name, SplitMultiheadAttention.from_mha(mod))
        done[fqn] = "split"
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder):
            mod.use_nested_tensor = False
    return done


def _stock_encoder_layer(layer: nn.TransformerEncoderLayer) -> bool:
    attn = layer.self_attn
    return (
        type(layer.linear1) is nn.Linear
        and type(layer.linear2) is nn.Linear
        and type(attn) is nn.MultiheadAttention
        and isinstance(attn.out_proj, nn.Linear)
        and type(attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    )


def unfuse_encoder_layers(model: nn.Module) -> int:
    """Send every ``nn.TransformerEncoderLayer`` whose layers edgeslim replaced (fake-quant
    twins, low-rank factors, a split attention) down its layer-by-layer path; returns how
    many. Why: in eval mode under ``no_grad`` its fused inference kernel reads
    ``linear1.weight`` and the attention's packed weights itself and never calls their
    ``forward``, so quantized layers were skipped (measured as float) and factorized ones,
    which have no ``weight``, raised AttributeError. The flag only chooses the path. An
    ``nn.TransformerEncoder`` holding such a layer stops packing padded batches into nested
    tensors (its fast path under a ``src_key_padding_mask``), which replaced layers cannot
    take ("Nested tensor dimension 0 cannot be transposed")."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and not _stock_encoder_layer(m):
            m.activation_relu_or_gelu = 0
            n += 1
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            not _stock_encoder_layer(layer) for layer in m.layers
        ):
            m.use_nested_tensor = False
    return n


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds an ``nn.MultiheadAttention`` (one :func:`split_attention`
    could split)."""
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def attention_named(model: nn.Module, fqns: Iterable[str]) -> list[str]:
    """The ``nn.MultiheadAttention`` modules of ``model`` that some of ``fqns`` lie inside
    (a plan made on a split model names their ``q_proj``, ``out_proj``, ...)."""
    names = list(fqns)
    return [
        fqn for fqn, mod in model.named_modules()
        if fqn and isinstance(mod, nn.MultiheadAttention)
        and any(n.startswith(f"{fqn}.") for n in names)
    ]  # fmt: skip
