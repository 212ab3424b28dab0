"""A transposed conv whose kernel equals its stride, as a 1x1 conv and a pixel shuffle.

``ConvTranspose2d(cin, cout, k, stride=k)`` (a U-Net or FPN decoder's up-sampling) writes
each input pixel into its own ``k x k`` block of the output: the blocks do not overlap, so
it is exactly a 1x1 conv to ``cout * k * k`` channels followed by ``PixelShuffle(k)``
(output channel ``o`` at block offset ``(a, b)`` is 1x1 output channel ``(o k + a) k + b``).
ONNX Runtime has no integer kernel for ``ConvTranspose`` in QDQ graphs, so quantized it ran
in float on dequantized weights; the rewritten pair runs as ``QLinearConv`` and a
``DepthToSpace`` on uint8 codes (a pixel shuffle shares its input's quantizer).

Decision — opt-in, not part of PTQ: on ONNX Runtime's CPU kernels the pair is slower than
the float ``ConvTranspose`` between integer kernels. A small U-Net (two 2x2 up-convs, 3 x
64 x 64, W8A8, 2 threads, ad hoc) ran 1.12x the fp32 speed rewritten against 1.18-1.21x
with its transposed convs float (3 x 128 x 128: 1.24-1.54x against 1.29-1.54x), and the
float pair alone 0.82-0.89x a float ``ConvTranspose``. Call :func:`shuffle_transposed_convs`
before quantizing for a target that runs integer kernels only (every MAC in ``QLinearConv``:
``int8_mac_share`` 1.0 instead of 0.96 there).

Decision — only the non-overlapping case (kernel == stride, no padding, no output
padding, no dilation, ``groups=1``) is rewritten: overlapping windows sum neighbouring
contributions, which a 1x1 conv cannot express.
"""

from __future__ import annotations

import torch
from torch import nn


class ShuffleConvTranspose(nn.Module):
    """``PixelShuffle(k)(Conv2d_1x1(x))``, equal to the transposed conv it was built from."""

    def __init__(self, conv: nn.Conv2d, factor: int) -> None:
        super().__init__()
        self.conv = conv
        self.shuffle = nn.PixelShuffle(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))

    @classmethod
    def from_transposed(cls, m: nn.ConvTranspose2d) -> ShuffleConvTranspose:
        if not rewritable(m):
            raise ValueError(f"not a non-overlapping transposed conv: {m}")
        k = int(m.stride[0])
        cin, cout = m.in_channels, m.out_channels
        conv = nn.Conv2d(cin, cout * k * k, 1, bias=m.bias is not None)
        conv = conv.to(device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            # weight (cin, cout, k, k) -> rows ordered (o, a, b), as PixelShuffle reads them
            conv.weight.copy_(m.weight.permute(1, 2, 3, 0).reshape(cout * k * k, cin, 1, 1))
            if m.bias is not None:
                assert conv.bias is not None
                conv.bias.copy_(m.bias.repeat_interleave(k * k))
        return cls(conv, k)


def rewritable(m: nn.Module) -> bool:
    """A ``ConvTranspose2d`` whose square kernel equals its stride (see the module doc)."""
    if type(m) is not nn.ConvTranspose2d:
        return False
    k = m.kernel_size
    return (
        k[0] == k[1] == m.stride[0] == m.stride[1]
        and tuple(m.padding) == (0, 0)
        and tuple(m.output_padding) == (0, 0)
        and tuple(m.dilation) == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def shuffle_transposed_convs(model: nn.Module, keep: frozenset[str] = frozenset()) -> list[str]:
    """Replace, in place, every rewritable transposed conv of ``model`` (but those named in
    ``keep``) by its :class:`ShuffleConvTranspose`; returns the names replaced."""
    names = [n for n, m in model.named_modules() if n and n not in keep and rewritable(m)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        module = owner.get_submodule(child)
        assert isinstance(module, nn.ConvTranspose2d)
        setattr(owner, child, ShuffleConvTranspose.from_transposed(module))
    return names
