"""Int8 QDQ export of a PTQ model runs in ONNX Runtime and keeps the fake-quant accuracy."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeslim.data import load_fashion_mnist
from edgeslim.errors import EdgeslimError
from edgeslim.export.qdq import export_qdq
from edgeslim.quant import QuantConfig, QuantSpec, calibrate, fold_batchnorm, quantize_, w8a8
from edgeslim.quant.edges import quantize_edges
from edgeslim.runtime.ort import ort_fused_ops, ort_session, ort_top1
from edgeslim.train.loop import evaluate
from edgeslim.zoo import load_zoo_model


def test_w8a8_qdq_matches_the_fake_quant_model(tmp_path: Path) -> None:
    model = load_zoo_model("resnet20")
    fold_batchnorm(model)
    quantize_(model, w8a8())
    model = quantize_edges(model)
    val = load_fashion_mnist("val", limit=256)
    calibrate(model, [val.images[i : i + 64] for i in range(0, 256, 64)], progress=False)
    test = load_fashion_mnist("test", limit=2000)
    path = export_qdq(copy.deepcopy(model), (test.images[:1],), tmp_path / "q.onnx")
    graph = onnx.load(str(path)).graph
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 22  # every conv and the fc store int8 weights
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    torch_top1 = evaluate(model, test)
    ort_acc = ort_top1(ort_session(path), test.images, test.labels)
    assert abs(ort_acc - torch_top1) <= 0.3
    assert path.stat().st_size < 0.4 * 4 * sum(p.numel() for p in model.parameters())
    # ONNX Runtime fuses every conv, residual add and the pooling into integer kernels
    fused = ort_fused_ops(path)
    assert fused["QLinearConv"] == 21 and fused["QLinearAdd"] == 9
    assert fused.get("QLinearGlobalAveragePool") == 1
    # the classifier too: its bias is stored as int32, so the Gemm fuses into QGemm
    assert fused.get("QGemm") == 1 and "Gemm" not in fused


# weight grids that are integer codes times a scale: the codes an int8 file stores
INTEGER_GRIDS = [
    ("binary", 1, {-64, 64}),
    ("ternary", 2, {-64, 0, 64}),
    ("pow2", 3, {-64, -32, -16, 0, 16, 32, 64}),
]


@pytest.mark.parametrize(("quantizer", "bits", "codes"), INTEGER_GRIDS)
def test_binary_ternary_and_pow2_weights_run_on_int8_kernels_exactly(
    quantizer: str, bits: int, codes: set[int], tmp_path: Path
) -> None:
    from edgeslim.export.qdq import float_weight_layers
    from edgeslim.quant.ptq import ptq

    calib = load_fashion_mnist("val", limit=128).images
    config = QuantConfig(QuantSpec(quantizer=quantizer, bits=bits), w8a8().activation)
    gm = ptq(load_zoo_model("resnet20"), config, calib)
    before = gm.get_submodule("layer1.0.conv1").weight.detach().clone()
    path = export_qdq(gm, (calib[:1],), tmp_path / f"{quantizer}.onnx")
    assert torch.equal(gm.get_submodule("layer1.0.conv1").weight, before)  # restored
    assert float_weight_layers(gm) == []
    graph = onnx.load(str(path)).graph
    int8 = [numpy_helper.to_array(i) for i in graph.initializer
            if i.data_type == onnx.TensorProto.INT8]  # fmt: skip
    assert len(int8) == 22
    assert set().union(*(set(c.ravel().tolist()) for c in int8)) == codes
    fused = ort_fused_ops(path)
    assert fused["QLinearConv"] == 21 and "Conv" not in fused
    # the file computes what the fake-quant model computes, bias rounding included
    test = load_fashion_mnist("test", limit=1000)
    session = ort_session(path)
    with torch.no_grad():
        want = gm(test.images[:64]).numpy()
    got = session.run(None, {session.get_inputs()[0].name: test.images[:64].numpy()})[0]
    assert abs(got - want).max() <= 0.02 * abs(want).max()
    torch_top1 = evaluate(gm, test)
    assert abs(ort_top1(session, test.images, test.labels) - torch_top1) <= 0.3


@pytest.mark.parametrize(("quantizer", "bits"), [("codebook", 3), ("pow2", 5)])
def test_grids_without_int8_codes_export_float_levels_or_are_refused(
    quantizer: str, bits: int, tmp_path: Path
) -> None:
    from edgeslim.export.qdq import float_weight_layers
    from edgeslim.quant.ptq import ptq

    calib = load_fashion_mnist("val", limit=128).images
    # with 8-bit activations ONNX Runtime would requantize the float levels per tensor
    config = QuantConfig(QuantSpec(quantizer=quantizer, bits=bits), w8a8().activation)
    gm = ptq(load_zoo_model("resnet20"), config, calib)
    assert len(float_weight_layers(gm)) == 22
    with pytest.raises(EdgeslimError, match=rf"conv1.*{quantizer} {bits}-bit.*a_bits: null"):
        export_qdq(gm, (calib[:1],), tmp_path / "refused.onnx")
    # weight-only: the file holds the levels as float weights, exactly
    gm = ptq(load_zoo_model("resnet20"), QuantConfig(QuantSpec(quantizer=quantizer, bits=bits)),
             calib)  # fmt: skip
    path = export_qdq(gm, (calib[:1],), tmp_path / f"{quantizer}.onnx")
    graph = onnx.load(str(path)).graph
    conv = next(i for i in graph.initializer if i.name.endswith("layer1.0.conv1.weight"))
    layer = gm.get_submodule("layer1.0.conv1")
    levels = layer.weight_quantizer.quantize(layer.weight).detach()
    assert torch.equal(torch.from_numpy(numpy_helper.to_array(conv).copy()), levels)
    assert "QLinearConv" not in ort_fused_ops(path)
    test = load_fashion_mnist("test", limit=1000)
    torch_top1 = evaluate(gm, test)
    assert abs(ort_top1(ort_session(path), test.images, test.labels) - torch_top1) <= 0.1


def test_w4_weights_export_as_int8_codes_and_are_restored(tmp_path: Path) -> None:
    from edgeslim.bench.quant import edgeslim_ptq

    calib = load_fashion_mnist("val", limit=128).images
    gm = edgeslim_ptq(load_zoo_model("resnet20"), calib, 4, 8, "mse")
    before = gm.get_submodule("layer1.0.conv1").weight.detach().clone()
    path = export_qdq(gm, (calib[:1],), tmp_path / "w4.onnx")
    assert torch.equal(gm.get_submodule("layer1.0.conv1").weight, before)
    graph = onnx.load(str(path)).graph
    codes = [
        numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8
    ]
    # 4-bit codes (|k| <= 7) stored times 8: the same weights on an 8x finer int32 bias grid
    assert len(codes) == 22 and all(abs(c).max() <= 56 for c in codes)
    assert all((c % 8 == 0).all() and len(set(c.ravel().tolist())) <= 15 for c in codes)


def test_a_classifier_head_runs_as_qgemm_and_matches_torch(tmp_path: Path) -> None:
    from edgeslim.quant.ptq import ptq
    from edgeslim.runtime.ort import ort_session

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
    ).eval()
    x = torch.randn(64, 12)
    config = QuantConfig(
        QuantSpec(bits=7),  # reduce_range: exact in ORT on CPUs without VNNI too
        QuantSpec(bits=8, granularity="tensor", symmetric=False),
    )
    gm = ptq(model, config, [(x[i : i + 16],) for i in range(0, 64, 16)])
    path = export_qdq(gm, (x[:1],), tmp_path / "mlp.onnx")
    fused = ort_fused_ops(path)
    assert fused.get("QGemm") == 2 and "Gemm" not in fused
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = gm(x).numpy()
    assert abs(got - ref).max() < 0.05 * abs(ref).max()


@pytest.mark.parametrize("edges", [False, True])
def test_low_bit_activations_round_the_bias_as_the_integer_kernel_does(
    edges: bool, tmp_path: Path
) -> None:
    """ONNX Runtime stores a QDQ conv's bias as int32 on the grid ``scale(x) * scale(W)``;
    at 4-bit activation steps a float bias in torch moved many argmaxes off what the file
    computes. With the bias rounded the same way both agree to float precision, whether
    the layers keep their own input quantizers or the graph's edges carry them."""
    from sklearn.datasets import load_digits

    from edgeslim.quant.ptq import ptq
    from edgeslim.runtime.ort import ort_session

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():  # biases far from any grid the accumulator has
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.bias.uniform_(-0.5, 0.5)
    digits = load_digits()
    x = torch.tensor(digits.images[:256], dtype=torch.float32).unsqueeze(1) / 16.0
    act = QuantSpec(bits=4, granularity="tensor", symmetric=False)
    config = QuantConfig(QuantSpec(bits=4), act)
    if edges:
        gm = ptq(model, config, [(x[i : i + 64],) for i in range(0, 256, 64)])
    else:
        gm = copy.deepcopy(model)
        quantize_(gm, config)
        calibrate(gm, [x[i : i + 64] for i in range(0, 256, 64)], progress=False)
    path = export_qdq(copy.deepcopy(gm), (x[:1],), tmp_path / "w4a4.onnx")
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = gm(x).numpy()
    assert abs(got - ref).max() < 1e-4 * abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_a_4_bit_layer_rounds_its_bias_on_the_finer_int8_step(tmp_path: Path) -> None:
    """A 4-bit weight grid is stored as int8 codes times 8 on a step 8x finer (the same
    weights), so the int32 bias grid ``scale(x) * scale(W)`` is 8x finer too: the bias
    moves by at most a sixteenth of a 4-bit step (half of one before), in torch as in the
    file ONNX Runtime runs."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(288, 10)
    ).eval()
    with torch.no_grad():
        model[0].bias.uniform_(-0.5, 0.5)
    digits = load_digits()
    x = torch.tensor(digits.images[:256], dtype=torch.float32).unsqueeze(1) / 16.0
    gm = copy.deepcopy(model)
    quantize_(gm, QuantConfig(QuantSpec(bits=4), QuantSpec(bits=8, symmetric=False)))
    calibrate(gm, [x[i : i + 64] for i in range(0, 256, 64)], progress=False)
    conv = gm[0]
    coarse = conv.input_quant.quantizer.scale * conv.weight_quantizer.scale.reshape(-1)
    with torch.no_grad():
        moved = (conv.quant_bias() - conv.bias).abs()
    assert bool((moved <= coarse / 16 + 1e-9).all()) and float(moved.max()) > 0
    path = export_qdq(copy.deepcopy(gm), (x[:1],), tmp_path / "w4a8.onnx")
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = gm(x).numpy()
    assert abs(got - ref).max() < 1e-4 * abs(ref).max()


def test_a_dead_output_row_keeps_its_bias_in_the_int8_file(tmp_path: Path) -> None:
    """A classifier row whose weights are all zero (a dead unit) and bias 0.3: its weight
    scale was the floor 1e-8, the int32 bias grid ``scale(x) * scale(W)`` could not hold
    0.3 and saturated, and ONNX Runtime's argmax was that row everywhere. The empty row now
    takes the layer's median scale: codes still 0, the bias exact."""
    from edgeslim.quant.ptq import ptq

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
    ).eval()
    with torch.no_grad():
        model[2].weight[3].zero_()
        model[2].bias[3] = 0.3
    x = torch.randn(64, 12)
    config = QuantConfig(
        QuantSpec(bits=7), QuantSpec(bits=8, granularity="tensor", symmetric=False)
    )
    gm = ptq(model, config, [(x[i : i + 16],) for i in range(0, 64, 16)])
    scale = gm.get_submodule("2").weight_quantizer.scale.reshape(-1)
    assert float(scale[3]) == pytest.approx(float(scale.median()))
    path = export_qdq(gm, (x[:1],), tmp_path / "dead.onnx")
    assert ort_fused_ops(path).get("QGemm") == 2
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = gm(x).numpy()
    assert abs(got - ref).max() < 0.05 * abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_a_layer_called_twice_exports_one_int32_bias_per_call(tmp_path: Path) -> None:
    """A Siamese model's shared head reads two inputs of different scales: two int32 biases
    (the export reused one name for both and refused the file)."""
    from edgeslim.quant.ptq import ptq

    class Siamese(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(12, 6)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.fc(a) - self.fc(b)

    torch.manual_seed(0)
    model = Siamese().eval()
    a, b = torch.randn(64, 12), 5 * torch.randn(64, 12)
    gm = ptq(model, w8a8(), [(a[i : i + 16], b[i : i + 16]) for i in range(0, 64, 16)])
    path = export_qdq(gm, (a[:1], b[:1]), tmp_path / "siamese.onnx")
    names = [n.input[0] for n in onnx.load(str(path)).graph.node
             if n.op_type == "DequantizeLinear" and "int32" in n.input[0]]  # fmt: skip
    assert len(names) == 2 and len(set(names)) == 2
    sess = ort_session(path)
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), (a, b), strict=True)}
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        ref = gm(a, b).numpy()
    assert abs(got - ref).max() < 0.05 * abs(ref).max()
