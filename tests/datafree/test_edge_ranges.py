"""Data-free edge quantizers: ranges from BN statistics, so the int8 export has no float conv."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeslim.data import Split
from edgeslim.datafree import DataFreeSpec, compress_datafree, quantized_model
from edgeslim.export.qdq import export_qdq
from edgeslim.quant.modules import ActQuant
from edgeslim.runtime.kernels import kernel_coverage
from edgeslim.train.loop import evaluate
from edgeslim.zoo import load_zoo_model


def test_edges_get_statistics_ranges_and_the_export_runs_on_integers(
    tmp_path: Path, fmnist_test_small: Split
) -> None:
    """resnet20 DFQ W8A8: with input quantizers alone every conv before a residual add
    stayed float in ONNX Runtime (47% of the MACs on integers); with the edges quantized
    from BN statistics only the first conv, whose image input has no statistics, is float."""
    model = load_zoo_model("resnet20")
    x = fmnist_test_small.images[:1]
    result = compress_datafree(model, "dfq", DataFreeSpec(8, 8), x)
    plain = quantized_model(result, 8, "statistics").eval()
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    quants = [m for m in edged.modules() if isinstance(m, ActQuant)]
    assert len(quants) > sum(isinstance(m, ActQuant) for m in plain.modules())
    assert all(bool(q.quantizer.calibrated) for q in quants)  # none left without a range
    assert evaluate(edged, fmnist_test_small) > evaluate(plain, fmnist_test_small) - 1.0
    path = export_qdq(edged, (x,), tmp_path / "dfq.onnx")
    share = kernel_coverage(path, (x,)).int8_mac_share
    assert share > 0.95, share
    plain_share = kernel_coverage(export_qdq(plain, (x,), tmp_path / "plain.onnx"), (x,))
    assert plain_share.int8_mac_share < 0.6  # what the edges fix


def test_an_edge_without_statistics_keeps_no_quantizer() -> None:
    """A model without BatchNorm: the residual add's operands have no statistics, so the
    quantizers the edge pass put there are removed, not left uncalibrated."""
    from torch import nn

    class NoBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            h = torch.relu(self.b(h) + h)
            return self.c(h.mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(1, 1, 6, 6)
    result = compress_datafree(NoBN().eval(), "rtn", DataFreeSpec(8, 8), x)
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    assert all(bool(m.quantizer.calibrated) for m in edged.modules() if isinstance(m, ActQuant))
    assert torch.isfinite(edged(torch.randn(4, 1, 6, 6))).all()


def test_a_relu_read_by_two_ops_still_bounds_its_readers_ranges_at_zero() -> None:
    """resnet20's block outputs (``relu(x + residual)``) feed the next conv and the next
    add, so no single pair owns the ReLU: the next conv's statistics range was
    mean +- k std, below zero for 12 of its 22 layers, which wastes codes and keeps the
    export from folding the ReLU into the quantizer before it."""
    model = load_zoo_model("resnet20")
    result = compress_datafree(model, "dfq", DataFreeSpec(8, 8), torch.zeros(1, 1, 28, 28))
    ranges = result.input_ranges
    after_relu = [f for f in ranges if f.endswith("conv1") and f != "conv1"] + ["fc"]
    assert all(ranges[f] is not None and ranges[f][0] == 0.0 for f in after_relu), ranges


def test_an_upsample_and_concat_path_keeps_its_statistics_and_integer_kernels(
    tmp_path: Path,
) -> None:
    """A feature-pyramid top-down path (nearest upsample, concat with the finer map): the
    statistics stopped at the upsample, so the conv after the concat had no input range
    and ran in float (most of the MACs)."""
    from torch import nn

    def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())  # fmt: skip

    class TopDown(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fine, self.coarse = cbr(3, 8), cbr(8, 16, stride=2)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.fuse = cbr(24, 16)
            self.fc = nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.fine(x)
            y = self.fuse(torch.cat([self.up(self.coarse(f)), f], 1))
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    model = TopDown().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 16, 16)
    result = compress_datafree(model, "rtn", DataFreeSpec(8, 8), x)  # no pair to equalize
    assert result.input_ranges["fuse.0"] is not None and result.input_ranges["fuse.0"][0] == 0.0
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    share = kernel_coverage(export_qdq(edged, (x,), tmp_path / "m.onnx"), (x,)).int8_mac_share
    assert share > 0.9, share


def test_a_bn_free_concat_takes_its_readers_range_and_runs_on_integers(tmp_path: Path) -> None:
    """SqueezeNet's fire module has no BatchNorm: the convs it concatenates have no output
    statistics, so their quantizers were removed and they ran in float (28% of a small
    SqueezeNet's MACs on integers); each operand now takes the range of the quantizer the
    concat's output reaches (the next conv's input, through a max pool)."""
    from torch import nn

    class Fire(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.squeeze = nn.Conv2d(16, 8, 1)
            self.e1, self.e3 = nn.Conv2d(8, 16, 1), nn.Conv2d(8, 16, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.after = nn.Conv2d(32, 16, 3, padding=1)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = torch.relu(self.squeeze(torch.relu(self.stem(x))))
            y = torch.cat([torch.relu(self.e1(s)), torch.relu(self.e3(s))], 1)
            return self.fc(torch.relu(self.after(self.pool(y))).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    result = compress_datafree(Fire().eval(), "rtn", DataFreeSpec(8, 8), x, (-2.0, 2.0))
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    cov = kernel_coverage(export_qdq(edged, (x,), tmp_path / "m.onnx"), (x,))
    integer = {n.name.split("/")[1]: n.integer for n in cov.nodes}
    # the concatenated convs and the ones before them; `after`, whose output reaches the
    # head with no statistics on the way, stays float as it did
    assert all(integer[k] for k in ("stem", "squeeze", "e1", "e3")), integer


def test_no_statistics_anywhere_leaves_every_activation_float() -> None:
    """A text model (embeddings, then linears, no BatchNorm): no layer has an input range,
    so no activation is quantized; the edge pass raised "needs activation quantization"."""
    from torch import nn

    from edgeslim.quant.modules import QuantMixin

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(self.emb(ids)))).mean(1)

    torch.manual_seed(0)
    ids = torch.randint(0, 20, (1, 5))
    result = compress_datafree(Text().eval(), "rtn", DataFreeSpec(8, 8), ids)
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    layers = [m for m in edged.modules() if isinstance(m, QuantMixin)]
    assert layers and not any(m.input_quant for m in layers)
    assert not any(isinstance(m, ActQuant) for m in edged.modules())
    assert torch.isfinite(edged(torch.randint(0, 20, (4, 5)))).all()


def test_bn_free_conv_outputs_take_estimated_ranges_and_run_on_integers(
    tmp_path: Path, fmnist_test_small: Split
) -> None:
    """prelu-cnn has no BatchNorm: its convs' outputs had no range, so ONNX Runtime could
    fuse none of them (0.1% of the MACs on integers, slower than fp32); their estimated
    statistics give them one now (with twice the margin), at no cost in top-1."""
    model = load_zoo_model("prelu-cnn")
    x = fmnist_test_small.images[:1]
    result = compress_datafree(model, "dfq", DataFreeSpec(8, 8), x)
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    share = kernel_coverage(export_qdq(edged, (x,), tmp_path / "m.onnx"), (x,)).int8_mac_share
    assert share > 0.95, share
    assert evaluate(edged, fmnist_test_small) > evaluate(model, fmnist_test_small) - 1.0


def test_group_norm_outputs_have_statistics_and_the_export_runs_on_integers(
    tmp_path: Path,
) -> None:
    """A GroupNorm net: each GroupNorm's output is ``N(beta, gamma^2)`` per channel
    (estimated), so the convs around it and the residual add get ranges; before, no
    activation after the first GroupNorm had one (0% of the MACs on integers)."""
    from torch import nn

    from edgeslim.datafree import ESTIMATED_RANGE_STDS

    class GNBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.n0 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
            self.a, self.na = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16)
            self.b, self.nb = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16)
            self.fc = nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.n0(self.stem(x)))
            h = torch.relu(h + self.nb(self.b(torch.relu(self.na(self.a(h))))))
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    model = GNBlock().eval()
    for norm in (model.n0, model.na, model.nb):
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.3, 0.3)
    x = torch.randn(1, 3, 16, 16)
    result = compress_datafree(model, "rtn", DataFreeSpec(8, 8), x)
    nb = model.nb
    lo = float((nb.bias - ESTIMATED_RANGE_STDS * nb.weight.abs()).detach().min())
    assert result.output_ranges["nb"][0] == pytest.approx(lo, rel=1e-5)
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    assert all(bool(q.quantizer.calibrated) for q in edged.modules() if isinstance(q, ActQuant))
    share = kernel_coverage(export_qdq(edged, (x,), tmp_path / "m.onnx"), (x,)).int8_mac_share
    assert share > 0.99, share
    xs = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(edged(xs), model(xs), dim=-1)
    assert float(cos.min()) > 0.99


def test_a_unet_skip_read_by_a_pool_and_a_concat_keeps_one_quantizer(tmp_path: Path) -> None:
    """The skip tensor's reader through the max pool (the next conv's input quantizer, its
    range set from statistics) and the concat's new quantizer were kept apart: two Q nodes
    on the conv's output, which ONNX Runtime then ran in float (a U-Net: 81% of its MACs
    on integers, 0.78x fp32; the W8A8 PTQ file of the same model: 100%)."""
    from torch import nn

    def cbr(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU())  # fmt: skip

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1, self.pool, self.e2 = cbr(3, 8), nn.MaxPool2d(2), cbr(8, 16)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.d1, self.head = cbr(24, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.e1(x)
            return self.head(self.d1(torch.cat([self.up(self.e2(self.pool(s))), s], 1)))

    torch.manual_seed(0)
    model = UNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 16, 16)
    result = compress_datafree(model, "rtn", DataFreeSpec(8, 8), x, (-2.0, 2.0))
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    cov = kernel_coverage(export_qdq(edged, (x,), tmp_path / "m.onnx"), (x,))
    integer = {n.name.split("/")[1]: n.integer for n in cov.nodes}
    assert integer["e1.0"] and integer["e2.0"], integer


def test_hardswish_and_squeeze_excite_edges_get_ranges_from_intervals(
    tmp_path: Path, fmnist_test_small: Split
) -> None:
    """mobilenetv3-small's data-free W8A8 file ran 48% of its MACs on integers, 0.36x the
    fp32 speed: statistics stop at a hardswish, so the depthwise convs after one, the SE
    linears and the projection after the SE product had no input range. Intervals carried
    through hardswish, the sigmoid gate (always [0, 1]), the product and, where no
    statistics exist, a linear's weights bound them all."""
    from edgeslim.datafree.edge_ranges import _act_interval, _layer_interval

    assert _act_interval("hardswish", (-4.0, 5.0)) == pytest.approx((-0.375, 5.0))
    assert _act_interval("hardswish", (0.0, 2.0)) == pytest.approx((0.0, 2 * 5 / 6))
    assert _act_interval("hardsigmoid", None) == (0.0, 1.0)
    assert _act_interval("silu", None) is None
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0]]))
        lin.bias.fill_(0.5)
    assert _layer_interval(lin, (0.0, 3.0)) == pytest.approx((-2.5, 6.5))

    model = load_zoo_model("mobilenetv3-small")
    x = fmnist_test_small.images[:1]
    result = compress_datafree(model, "rtn", DataFreeSpec(8, 8), x)
    assert any(v is None for v in result.input_ranges.values())  # what statistics miss
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    share = kernel_coverage(export_qdq(edged, (x,), tmp_path / "m.onnx"), (x,)).int8_mac_share
    assert share > 0.99, share
    xs = fmnist_test_small.images[:300]
    with torch.no_grad():
        agree = (edged(xs).argmax(1) == model.eval()(xs).argmax(1)).float().mean()
    assert float(agree) > 0.97, float(agree)


class _SharedHeadFpn(torch.nn.Module):
    """Two pyramid levels and one 3x3 head conv shared by both (as detectors share theirs)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.l1, self.l2 = nn.Conv2d(16, 32, 1), nn.Conv2d(32, 32, 1)
        self.head = nn.Conv2d(32, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.c1(x)
        b = self.c2(a)
        p2 = self.l2(b)
        p1 = self.l1(a) + torch.nn.functional.interpolate(p2, scale_factor=2.0)
        return self.head(p1), self.head(p2)


def test_a_head_shared_by_several_levels_takes_its_calls_ranges() -> None:
    # its output had no statistics (the module runs twice), so its range came from its
    # weights alone, hundreds of times the outputs' spread: every output rounded to 0 and
    # RTN W8A8 read cosine 0.000 to fp32 on a small FPN
    torch.manual_seed(0)
    model = _SharedHeadFpn()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.no_grad():  # BatchNorm statistics of the data the model will see
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        model(x)
    model.eval()
    result = compress_datafree(model, "rtn", DataFreeSpec(8, 8), x[:1])
    assert "head" in result.output_ranges
    q = quantized_model(result, act_bits=8, act_ranges="statistics", edges=True)
    with torch.no_grad():
        for ref, out in zip(model(x), q(x), strict=True):
            cos = torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1)).mean()
            assert cos > 0.95, float(cos)


def test_averages_of_codes_round_alike_in_torch_and_the_file(tmp_path: Path) -> None:
    """A DenseNet-style transition (an average pool read by a BatchNorm and a concat) and a
    global average pool: data-free, each average's output grid had its input's, so 2x2
    averages of codes fell on exact half steps, which torch rounded down and ONNX Runtime
    to even: the file differed from torch by 4% of the output norm. An average's grid is
    offset from its input's now, so no average of codes sits on a tie."""
    import numpy as np
    import onnxruntime as ort
    from torch import nn

    class Transition(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.pool = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.AvgPool2d(2)
            self.bn1, self.conv = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 3, padding=1, bias=False)
            self.bn, self.fc = nn.BatchNorm2d(24), nn.Linear(24, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.pool(self.stem(x))
            y = torch.cat([h, self.conv(torch.relu(self.bn1(h)))], 1)
            return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(y)), 1).flatten(1))

    torch.manual_seed(0)
    model = Transition()
    xs = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()(xs)  # BatchNorm statistics of these inputs
    model.eval()
    result = compress_datafree(model, "rtn", DataFreeSpec(8, 8), xs[:1], (-4.0, 4.0))
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    path = export_qdq(edged, (xs[:1],), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with torch.no_grad():
        ours = edged(xs[:16]).numpy()
    runs = [session.run(None, {name: xs[i : i + 1].numpy()})[0] for i in range(16)]
    theirs = np.concatenate(runs)
    rel = float(np.linalg.norm(theirs - ours) / np.linalg.norm(ours))
    assert rel < 1e-4, rel
