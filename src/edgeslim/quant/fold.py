"""BatchNorm folding: ``conv -> BN`` (or ``linear -> BN1d``) becomes one layer with a bias.

Conv1d/2d/3d pair with BatchNorm1d/2d/3d, transposed convs too (their output channels are
weight axis 1, per group); Linear pairs with BatchNorm1d.

Found from the fx graph, so only BNs whose single input is a conv used by nothing else are
folded; each folded BN is replaced by ``nn.Identity`` so FQNs of other modules stay put.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from edgeslim.graph.swap import replace_submodule
from edgeslim.graph.trace import trace

# which BatchNorm may follow which layer type (the BN normalises the layer's channel axis 1)
_BN_AFTER: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.Linear: (nn.BatchNorm1d,),
    nn.Conv1d: (nn.BatchNorm1d,),
    nn.Conv2d: (nn.BatchNorm2d,),
    nn.Conv3d: (nn.BatchNorm3d,),
    nn.ConvTranspose1d: (nn.BatchNorm1d,),
    nn.ConvTranspose2d: (nn.BatchNorm2d,),
    nn.ConvTranspose3d: (nn.BatchNorm3d,),
}
Foldable = nn.Linear | nn.modules.conv._ConvNd


def _scale_output_channels(layer: Foldable, g: torch.Tensor) -> None:
    """Multiply every output channel's weights by ``g`` (transposed convs: axis 1 per group)."""
    w = layer.weight
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        groups, cin, opg = layer.groups, w.shape[0], w.shape[1]
        view = w.view(groups, cin // groups, opg, *w.shape[2:])
        view.mul_(g.reshape(groups, 1, opg, *([1] * (w.dim() - 2))))
        return
    w.mul_(g.reshape(-1, *([1] * (w.dim() - 1))))


@torch.no_grad()
def fold_conv_bn(conv: Foldable, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` into ``conv`` in place: W' = W g, b' = (b - mean) g + beta, g = gamma/std."""
    assert bn.running_var is not None and bn.running_mean is not None
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    g = gamma / std
    _scale_output_channels(conv, g)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
    new_bias = (bias - bn.running_mean) * g + beta
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))


def _only_with(calls: dict[str, list[fx.Node]], conv: str, bn: str) -> bool:
    """Whether every call of ``conv`` feeds ``bn`` alone and every call of ``bn`` reads
    ``conv``: a module called twice (``self.f(x)`` run twice, a layer shared by two
    branches) is folded only when each of its calls is the same conv->BN pair, since
    folding changes the module for all of them."""
    return all(len(n.users) == 1 and next(iter(n.users)).target == bn for n in calls[conv]) and all(
        isinstance(n.args[0], fx.Node) and n.args[0].target == conv for n in calls[bn]
    )


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable conv->BN pair of ``model`` in place; returns the (conv, bn) FQNs."""
    gm = trace(model)
    pairs: list[tuple[str, str]] = []
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(str(node.target))
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            continue
        src = node.args[0]
        if getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            continue
        conv = gm.get_submodule(str(src.target))
        pair = (str(src.target), str(node.target))
        if (isinstance(bn, _BN_AFTER.get(type(conv), ())) and pair not in pairs
                and _only_with(calls, *pair)):  # fmt: skip
            pairs.append(pair)
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        assert isinstance(conv, (nn.Linear, nn.modules.conv._ConvNd))
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        fold_conv_bn(conv, bn)
        replace_submodule(model, bn_name, nn.Identity())
    return pairs
