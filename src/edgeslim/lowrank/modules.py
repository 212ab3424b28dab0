"""The factorized layers: a weight ``W ~ A B`` run as two ordinary layers.

A conv becomes a k x k conv with ``rank`` outputs (the original stride, padding, dilation)
followed by a 1x1 conv back to the original outputs (the channel scheme: ``W`` reshaped to
``N x (C k k)``); a 1-D conv (audio, sensor and text CNNs) the same with a length-k kernel;
a 3-D conv (video) with a k x k x k kernel; a linear becomes two linears. Both halves are
plain ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` / ``nn.Linear`` inside an
``nn.Sequential``, so the model still fx-traces, exports to ONNX and can be quantized or
pruned like any other; the subclass only marks what was factorized.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from edgeslim.errors import EdgeslimError


class LowRankError(EdgeslimError, ValueError):
    """A factorization request cannot be carried out; the message says why and what to do."""


class WeightReadError(LowRankError):
    """Code around a factorized layer read its ``weight`` (``fqn``: that layer)."""

    def __init__(self, message: str, fqn: str | None) -> None:
        super().__init__(message)
        self.fqn = fqn


class _NoSingleWeight:
    """``weight`` of a factorized pair: there is none, and code around the layer that reads
    it (Hugging Face's ViT family casts its input to ``projection.weight.dtype``) gets an
    error naming the layer and the fix, rather than torch's bare AttributeError
    (:func:`~edgeslim.lowrank.svd.factorize_` then keeps that layer whole by itself)."""

    @property
    def weight(self) -> torch.Tensor:
        fqn = getattr(self, FQN_ATTR, None)
        where = fqn or type(self).__name__
        raise WeightReadError(
            f"code around the factorized layer {where} reads its `weight`, which a low-rank "
            "pair of layers does not have: keep that layer whole with the lowrank stage's "
            f"`skip: [{where}]`",
            fqn,
        )


FQN_ATTR = "_edgeslim_fqn"  # set on a factorized pair: the layer it replaced


class LowRankLinear(_NoSingleWeight, nn.Sequential):
    """``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``: ``reduce`` then ``expand``.

    It answers the attributes of the layer it replaces (``in_features``, ``out_features``)
    that code around it may read."""

    reduce: nn.Linear
    expand: nn.Linear

    @property
    def in_features(self) -> int:
        return self.reduce.in_features


class _LowRankConv(_NoSingleWeight, nn.Sequential):
    """The attributes of the conv a low-rank pair replaces, which code around it may read
    (Hugging Face's TF padding reads ``stride`` and ``kernel_size``): geometry is the first
    conv's, channels in from the first and out from the second."""

    reduce: nn.Conv1d | nn.Conv2d | nn.Conv3d
    expand: nn.Conv1d | nn.Conv2d | nn.Conv3d

    @property
    def in_channels(self) -> int:
        return self.reduce.in_channels

    @property
    def out_channels(self) -> int:
        return self.expand.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.reduce.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.reduce.stride

    @property
    def padding(self) -> str | tuple[int, ...]:
        return self.reduce.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.reduce.dilation

    @property
    def groups(self) -> int:
        return self.reduce.groups


class LowRankConv2d(_LowRankConv):
    """A k x k ``Conv2d(C, rank)`` then a 1x1 ``Conv2d(rank, N)``: ``reduce`` then ``expand``."""

    reduce: nn.Conv2d
    expand: nn.Conv2d


class LowRankConv1d(_LowRankConv):
    """A length-k ``Conv1d(C, rank)`` then a length-1 ``Conv1d(rank, N)``."""

    reduce: nn.Conv1d
    expand: nn.Conv1d


class LowRankConv3d(_LowRankConv):
    """A k x k x k ``Conv3d(C, rank)`` then a 1x1x1 ``Conv3d(rank, N)`` (video models)."""

    reduce: nn.Conv3d
    expand: nn.Conv3d


LowRank = LowRankLinear | LowRankConv1d | LowRankConv2d | LowRankConv3d
LOW_RANK_TYPES = (LowRankLinear, LowRankConv1d, LowRankConv2d, LowRankConv3d)
Factorizable = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
FACTORIZABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PAIRS: dict[type[nn.Module], type[LowRankConv1d | LowRankConv2d | LowRankConv3d]] = {
    nn.Conv1d: LowRankConv1d, nn.Conv2d: LowRankConv2d, nn.Conv3d: LowRankConv3d,
}  # fmt: skip


def why_not_factorizable(module: nn.Module) -> str | None:
    """None for a layer :func:`factorize_layer` handles, else the reason it is left alone."""
    if type(module) is nn.Linear:
        return None
    if type(module) in _PAIRS:
        assert isinstance(module, nn.modules.conv._ConvNd)
        if module.groups != 1:
            return (
                f"grouped conv (groups={module.groups}): each group is its own small matrix "
                "and a 1x1 expansion would mix the groups; left dense"
            )
        return None
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return (
            "an nn.MultiheadAttention's out_proj: the attention reads its weight directly "
            "(F.multi_head_attention_forward), so two smaller layers there would never run; "
            "left dense"
        )
    return f"{type(module).__name__} is not a plain nn.Linear or nn.Conv1d/2d/3d"


def weight_matrix(module: Factorizable) -> torch.Tensor:
    """The weight as the 2-D matrix that is factorized: ``out x in`` (linear) or
    ``N x (C k k)`` (conv, channel scheme), detached, in float64 for an accurate SVD."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1).to(torch.float64)


def max_rank(module: Factorizable) -> int:
    m, n = weight_matrix(module).shape
    return min(m, n)


def inner_size(module: Factorizable) -> int:
    """MACs per output value of the dense layer (``in`` or ``C k k``)."""
    return int(weight_matrix(module).shape[1])


def factorized_macs_ratio(module: Factorizable, rank: int) -> float:
    """MACs of the factorized layer over those of the dense one, at ``rank``:
    ``rank (C k k + N) / (N C k k)`` (same positions, so the ratio is exact)."""
    out, inner = weight_matrix(module).shape
    return rank * (inner + out) / (out * inner)


def factorize_layer(
    module: Factorizable,
    rank: int,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> LowRank:
    """The rank-``rank`` truncated SVD of ``module``'s weight as two layers (exact at full
    rank up to float rounding). The singular values are split evenly (``sqrt(S)`` on each
    side) so both halves have the same scale, which keeps later quantization fair to both.

    ``svd`` is ``torch.linalg.svd(weight_matrix(module), full_matrices=False)`` if already
    computed. The bias stays on the second layer; the module's dtype and device are kept.
    """
    reason = why_not_factorizable(module)
    if reason is not None:
        raise LowRankError(f"cannot factorize: {reason}")
    full = max_rank(module)
    if not 1 <= rank <= full:
        raise LowRankError(f"rank must be in [1, {full}] for this layer; got {rank}")
    if svd is None:
        svd = torch.linalg.svd(weight_matrix(module), full_matrices=False)
    u, s, vh = svd
    root = s[:rank].sqrt()
    first = (root[:, None] * vh[:rank]).to(module.weight.dtype)  # rank x in
    second = (u[:, :rank] * root[None, :]).to(module.weight.dtype)  # out x rank
    bias = module.bias is not None
    layer: LowRank
    if isinstance(module, nn.Linear):
        layer = LowRankLinear(
            OrderedDict(
                reduce=nn.Linear(module.in_features, rank, bias=False),
                expand=nn.Linear(rank, module.out_features, bias=bias),
            )
        )
    else:
        conv = type(module)  # nn.Conv1d, nn.Conv2d or nn.Conv3d
        reduce = conv(
            module.in_channels, rank, module.kernel_size, module.stride,  # type: ignore[arg-type]
            module.padding, module.dilation, bias=False,  # type: ignore[arg-type]
            padding_mode=module.padding_mode,
        )  # fmt: skip
        expand = conv(rank, module.out_channels, 1, bias=bias)
        layer = _PAIRS[conv](OrderedDict(reduce=reduce, expand=expand))
        first = first.reshape(rank, *module.weight.shape[1:])
        ones = (1,) * (module.weight.dim() - 2)
        second = second.reshape(module.out_channels, rank, *ones)
    layer.to(device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        layer.reduce.weight.copy_(first)
        layer.expand.weight.copy_(second)
        if module.bias is not None and layer.expand.bias is not None:
            layer.expand.bias.copy_(module.bias.detach())
    layer.train(module.training)
    return layer
