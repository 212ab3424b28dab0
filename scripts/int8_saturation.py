"""Does this CPU's ONNX Runtime saturate int8 sums? The measurement behind docs/quantization.md.

    python scripts/int8_saturation.py [MODEL] [--images N]

Quantizes a zoo model W8A8 (256 calibration images) three ways: 8-bit weights everywhere,
7-bit weights on the first layer only, 7-bit everywhere (``reduce_range``); exports each
and prints how often ONNX Runtime's argmax agrees with the quantized torch model's on the
first N test images, their largest difference (of the logits' scale) and both top-1s. On a
CPU with VNNI (or Arm) all three agree to rounding; on x86 without VNNI the full-range
file drifts (see ``edgeslim.runtime.machine.int8_sums_saturate``).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeslim.data import load_fashion_mnist
from edgeslim.export.verify import export_module
from edgeslim.quant import QuantConfig
from edgeslim.quant.ptq import ptq
from edgeslim.quant.spec import QuantSpec
from edgeslim.runtime.machine import describe_machine, int8_sums_saturate, machine_info
from edgeslim.runtime.ort import ort_session
from edgeslim.zoo.registry import load_zoo_model


def _config(w_bits: int) -> QuantConfig:
    return QuantConfig(
        QuantSpec(bits=w_bits), QuantSpec(bits=8, granularity="tensor", symmetric=False)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet20")
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    info = machine_info()
    print(f"{describe_machine(info)}; int8 sums saturate: {int8_sums_saturate(info)}")
    test = load_fashion_mnist("test", limit=args.images)
    calibration = load_fashion_mnist("train", limit=256).images
    model = load_zoo_model(args.model).eval()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    x, y = test.images, test.labels.numpy()
    for name, first, rest in [("8-bit", 8, 8), ("7-bit first", 7, 8), ("7-bit all", 7, 7)]:
        q = ptq(
            copy.deepcopy(model), _config(rest), calibration, select={layers[0]: _config(first)}
        )
        with tempfile.TemporaryDirectory() as tmp:
            session = ort_session(
                export_module(copy.deepcopy(q), (x[:1],), Path(tmp) / "m.onnx", {})
            )
            feed = session.get_inputs()[0].name
            got = np.concatenate([session.run(None, {feed: x[i : i + 1].numpy()})[0]
                                  for i in range(len(x))])  # fmt: skip
        with torch.no_grad():
            want = q(x).numpy()
        agree = 100 * float((got.argmax(1) == want.argmax(1)).mean())
        diff = float(np.abs(got - want).max() / np.abs(want).max())
        top1_torch = 100 * float((want.argmax(1) == y).mean())
        top1_ort = 100 * float((got.argmax(1) == y).mean())
        print(
            f"{name:12s} agree {agree:6.2f}%  max diff {diff:6.1%}  top-1 torch "
            f"{top1_torch:.2f}  onnxruntime {top1_ort:.2f}"
        )


if __name__ == "__main__":
    main()
