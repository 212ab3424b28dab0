"""Why DF-MPC clamps, rescales and corrects as it does: the measurements behind docs/datafree.md.

    python scripts/dfmpc_diagnostics.py [MODEL] [--images N]

Prints, at 2/6 bits, (1) for every 2-bit layer the output error of the clamped vs the
min-max rounding, on real activations (256 train images) and as the data-free prior
predicts; (2) top-1 on the first N test images with one layer clamped alone and with all
clamped; (3) DF-MPC with its variance-matching gain vs the least-squares gain. Real data is
read only to score and to check the prior, never by the methods.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.data import load_fashion_mnist
from edgeslim.datafree import (
    DataFreeResult,
    DataFreeSpec,
    analyze,
    assign_bits,
    compress_datafree,
    quantized_model,
)
from edgeslim.datafree.chain import Chain, input_stats
from edgeslim.datafree.compensate import compensate_all, inner_products, input_variance
from edgeslim.datafree.methods import MethodArgs, clip_low_bits
from edgeslim.datafree.ops import mse_clip, quantize_weight
from edgeslim.train.loop import evaluate
from edgeslim.zoo import load_zoo_model

LOW, HIGH = 2, 6


def _out(m: nn.Module, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return F.linear(x, w)
    assert isinstance(m, nn.Conv2d)
    return F.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups)


def layer_errors(chain: Chain, low: list[str], images: torch.Tensor) -> None:
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        chain.layer(f).register_forward_hook(
            lambda _m, i, _o, f=f: seen.__setitem__(f, i[0].detach())
        )
        for f in low
    ]
    with torch.no_grad():
        chain.model(images)
    for h in hooks:
        h.remove()
    print("layer | real error clamped / min-max | prior's prediction")
    for f in low:
        m = chain.layer(f)
        w, x = m.weight.detach(), seen[f]
        v = input_variance(m, input_stats(chain, f))
        plain, clamped = quantize_weight(w, LOW), quantize_weight(mse_clip(w, LOW, weights=v), LOW)
        y = _out(m, w, x)
        real = [(_out(m, q, x) - y).pow(2).mean().item() for q in (plain, clamped)]
        prior = [(v * (q - w) ** 2).sum().item() for q in (plain, clamped)]
        print(f"{f} | {real[1] / real[0]:.3f} | {prior[1] / prior[0]:.3f}")


def clamped_top1(model: nn.Module, which: list[str], test) -> float:  # type: ignore[no-untyped-def]
    chain = analyze(model, torch.zeros(1, 1, 28, 28))
    bits = assign_bits(chain, LOW, HIGH, 8)
    with torch.no_grad():
        for f in which:
            m = chain.layer(f)
            m.weight.copy_(
                mse_clip(m.weight, LOW, weights=input_variance(m, input_stats(chain, f)))
            )
    return evaluate(quantized_model(DataFreeResult(chain.model, bits), act_bits=8), test)


def least_squares_gain(chain: Chain, args: MethodArgs) -> None:
    """DF-MPC with the MSE-optimal gain <w, q>_v / |q|_v^2 in place of the variance match."""
    original = clip_low_bits(chain, args.bits, LOW, match=False)
    with torch.no_grad():
        for f, w0 in original.items():
            m = chain.layer(f)
            x = input_stats(chain, f)
            q = quantize_weight(m.weight.detach(), LOW)
            gain = inner_products(m, w0, q, x, full=False) / inner_products(m, q, q, x, full=False)
            m.weight.mul_(gain.to(m.weight.dtype).reshape(-1, *[1] * (m.weight.dim() - 1)))
    compensate_all(chain, args.bits, reference=original)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="mobilenetv2-small")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    model = load_zoo_model(args.model).eval()
    test = load_fashion_mnist("test", limit=args.images)
    chain = analyze(model, torch.zeros(1, 1, 28, 28))
    low = [f for f, b in assign_bits(chain, LOW, HIGH, 8).items() if b == LOW]
    layer_errors(chain, low, load_fashion_mnist("train", limit=256).images)
    print(f"\ntop-1 on {len(test)} test images, {LOW}/{HIGH} bits, nothing but the clamp")
    print(
        f"RTN {clamped_top1(model, [], test):.2f}, all clamped {clamped_top1(model, low, test):.2f}"
    )
    for f in low:
        print(f"{f} clamped alone: {clamped_top1(model, [f], test):.2f}")
    spec, x1 = DataFreeSpec(LOW, HIGH), torch.zeros(1, 1, 28, 28)
    for name, method in (
        ("variance match (dfmpc)", "dfmpc"),
        ("least-squares gain", least_squares_gain),
    ):
        result = compress_datafree(model, method, spec, x1)
        print(f"{name}: {evaluate(quantized_model(result, act_bits=8), test):.2f}")


if __name__ == "__main__":
    main()
