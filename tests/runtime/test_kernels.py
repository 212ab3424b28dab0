"""Integer-kernel coverage read from the graph ONNX Runtime optimises."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from edgeslim.cost.analytic import cost_report
from edgeslim.data import load_fashion_mnist
from edgeslim.export.onnx import export_onnx
from edgeslim.export.qdq import export_qdq
from edgeslim.quant import w8a8
from edgeslim.quant.ptq import ptq
from edgeslim.runtime.kernels import FloatKernelWarning, check_integer_kernels, kernel_coverage
from edgeslim.zoo import load_zoo_model
from edgeslim.zoo.edge import prelu_cnn


@pytest.mark.parametrize("name", ["prelu-cnn", "mobilenetv3-small"])
def test_w8a8_runs_every_conv_on_integers(name: str, tmp_path: Path) -> None:
    """The shipped PReLU and hardswish/squeeze-excite models: W8A8 agrees with fp32 on
    real images, every MAC runs in an integer kernel, and the MACs counted in the ONNX
    Runtime graph are the cost model's."""
    model = load_zoo_model(name)
    calib = load_fashion_mnist("val", limit=128).images
    test = load_fashion_mnist("test", limit=500).images
    q = ptq(model, w8a8(), [(calib,)])
    with torch.no_grad():
        agree = (q(test).argmax(1) == model(test).argmax(1)).float().mean()
    assert float(agree) >= 0.97  # measured 0.99+ on both
    x1 = test[:1]
    path = export_qdq(q, (x1,), tmp_path / "int8.onnx")
    coverage = kernel_coverage(path, (x1,))
    assert coverage.int8_mac_share >= 0.99, coverage.summary()
    assert coverage.integer_macs + coverage.float_macs == cost_report(model, x1).macs
    fp32 = kernel_coverage(export_onnx(model, (x1,), tmp_path / "fp32.onnx"), (x1,))
    assert fp32.int8_mac_share == 0.0
    assert fp32.float_macs == cost_report(model, x1).macs


def test_a_conv_kept_float_is_named_and_warned(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = prelu_cnn().eval()
    x = torch.randn(16, 1, 28, 28)
    q = ptq(model, w8a8(), [(x,)], select={"features.5": None, "features.8": None})
    path = export_qdq(q, (x[:1],), tmp_path / "int8.onnx")
    with pytest.warns(FloatKernelWarning, match="integer kernels"):
        coverage = check_integer_kernels(path, (x[:1],))
    assert 0.3 < coverage.int8_mac_share < 0.95
    assert len(coverage.float_nodes()) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatKernelWarning)
        full = ptq(model, w8a8(), [(x,)])
        check_integer_kernels(export_qdq(full, (x[:1],), tmp_path / "all.onnx"), (x[:1],))
