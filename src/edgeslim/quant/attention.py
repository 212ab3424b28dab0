"""``nn.MultiheadAttention`` with int8 projections and integer attention matmuls.

Torch's module keeps its input projection as a bare ``in_proj_weight`` parameter and runs
``F.multi_head_attention_forward``, which leaves no point to quantize: exported, every one
of its matmuls is float (in a one-block encoder, 55% of the MACs). The twin here writes the
same computation out: the input projection with a fake-quant weight on a quantized input,
and quantizers on queries, keys, values and attention probabilities, so that ONNX Runtime
runs every matmul of the block as an integer kernel. ``out_proj`` becomes a quantized
``nn.Linear`` with it. Parameter names stay torch's (``in_proj_weight``, ``in_proj_bias``,
``out_proj.weight``), so checkpoints and FQN selectors keep working.

Self-attention (query, key and value the same tensor) runs its projection as one int8
matmul; cross-attention slices the weight per projection, which ONNX Runtime runs in float.
Supported: packed q/k/v projections (``kdim == vdim == embed_dim``), no ``bias_k``/``bias_v``,
no ``add_zero_attn``; other configurations stay in float (``from_float`` raises, and
``quantize_`` warns naming the module).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeslim.graph.attention import SplitMultiheadAttention, additive_mask, maybe_quant
from edgeslim.quant.config import QuantConfig
from edgeslim.quant.modules import ActQuant, QuantLinear, QuantMixin
from edgeslim.quant.spec import QuantConfigError


class QuantMultiheadAttention(QuantMixin, nn.MultiheadAttention):
    """Fake-quant multi-head attention (see module doc)."""

    kv_quant: ActQuant | None
    q_quant: ActQuant | None
    k_quant: ActQuant | None
    v_quant: ActQuant | None
    attn_quant: ActQuant | None

    @property
    def _weight(self) -> torch.Tensor:
        return self.in_proj_weight

    @staticmethod
    def why_not(mha: nn.MultiheadAttention) -> str | None:
        """Why ``mha`` has no quantized twin (None: it has one)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            return (
                "separate q/k/v projection sizes, bias_k/bias_v or add_zero_attn are not "
                "supported by the quantized attention"
            )
        return None

    @classmethod
    def from_float(
        cls, mha: nn.MultiheadAttention, qconfig: QuantConfig
    ) -> QuantMultiheadAttention:
        reason = cls.why_not(mha)
        if reason is not None:
            raise QuantConfigError(
                f"nn.MultiheadAttention: {reason}; keep it in float with a `select` entry set "
                "to null"
            )
        new = cls(
            mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first, device=mha.in_proj_weight.device,
            dtype=mha.in_proj_weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            new.in_proj_weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None and new.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias)
        new.out_proj = QuantLinear.from_float(mha.out_proj, qconfig)  # type: ignore[assignment]
        new.train(mha.training)
        new._setup(qconfig)
        spec = qconfig.activation
        # separate key/value inputs (cross-attention) and the four operands of the matmuls
        new.kv_quant = ActQuant(spec) if spec is not None else None
        new.q_quant = ActQuant(spec) if spec is not None else None
        new.k_quant = ActQuant(spec) if spec is not None else None
        new.v_quant = ActQuant(spec) if spec is not None else None
        new.attn_quant = ActQuant(spec) if spec is not None else None
        return new

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
        same_kq, same_vq, same_vk = key is query, value is query, value is key
        if self.batch_first:
            query = query.transpose(0, 1)
            key = query if same_kq else key.transpose(0, 1)
            value = query if same_vq else key if same_vk else value.transpose(0, 1)
        tgt, bsz, embed = query.shape
        src = key.shape[0]
        heads, dh = self.num_heads, self.head_dim
        w = self.quant_weight()
        b = self.in_proj_bias
        xq = self.quant_input(query)
        if same_kq and same_vq:
            # self-attention: one matmul on the whole int8 weight (a slice of a dequantized
            # weight would keep ONNX Runtime from fusing an integer kernel), then split
            qkv = nn.functional.linear(xq, w, b)
            q, k, v = qkv[..., :embed], qkv[..., embed : 2 * embed], qkv[..., 2 * embed :]
        else:
            xk = xq if key is query else maybe_quant(self.kv_quant, key)
            xv = (
                xk
                if value is key
                else (xq if value is query else maybe_quant(self.kv_quant, value))
            )
            bq = bk = bv = None
            if b is not None:
                bq, bk, bv = b[:embed], b[embed : 2 * embed], b[2 * embed :]
            q = nn.functional.linear(xq, w[:embed], bq)
            k = nn.functional.linear(xk, w[embed : 2 * embed], bk)
            v = nn.functional.linear(xv, w[2 * embed :], bv)
        # (length, batch, embed) -> (batch, heads, length, head_dim)
        q = q.reshape(tgt, bsz * heads, dh).transpose(0, 1).reshape(bsz, heads, tgt, dh)
        k = k.reshape(src, bsz * heads, dh).transpose(0, 1).reshape(bsz, heads, src, dh)
        v = v.reshape(src, bsz * heads, dh).transpose(0, 1).reshape(bsz, heads, src, dh)
        q = maybe_quant(self.q_quant, q * (1.0 / math.sqrt(dh)))
        k = maybe_quant(self.k_quant, k)
        v = maybe_quant(self.v_quant, v)
        scores = q @ k.transpose(-2, -1)
        scores = scores + additive_mask(
            attn_mask, key_padding_mask, is_causal, bsz, self.num_heads, tgt, src, scores.dtype,
            scores.device,
        )  # fmt: skip
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = nn.functional.dropout(attn, self.dropout)
        out = maybe_quant(self.attn_quant, attn) @ v  # (batch, heads, tgt, head_dim)
        out = out.permute(2, 0, 1, 3).reshape(tgt, bsz, embed)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn


class QuantSplitAttention(SplitMultiheadAttention):
    """A split attention (:class:`~edgeslim.graph.attention.SplitMultiheadAttention`, e.g.
    after its heads were pruned) with its four projections as :class:`QuantLinear` and
    quantizers on the operands of both attention matmuls, as :class:`QuantMultiheadAttention`
    has, so ONNX Runtime runs every matmul of the block on integers. The projections keep
    their own input quantizers (the module is a leaf to edge placement)."""

    @classmethod
    def from_float(
        cls, split: SplitMultiheadAttention, qconfig: QuantConfig
    ) -> QuantSplitAttention:
        new = cls(
            split.embed_dim, split.num_attention_heads, split.head_dim,
            kdim=split.k_proj.in_features, vdim=split.v_proj.in_features,
            bias=split.q_proj.bias is not None, dropout=split.dropout,
            batch_first=split.batch_first,
        )  # fmt: skip
        new.built_heads = split.built_heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layer = split.get_submodule(name)
            assert isinstance(layer, nn.Linear)
            setattr(new, name, QuantLinear.from_float(layer, qconfig))
        spec = qconfig.activation
        if spec is not None:
            new.q_quant, new.k_quant = ActQuant(spec), ActQuant(spec)
            new.v_quant, new.attn_quant = ActQuant(spec), ActQuant(spec)
        new.train(split.training)
        return new
