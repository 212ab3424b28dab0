"""Reparametrized weights (weight_norm, spectral_norm) are fixed before compression."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import edgeslim
from edgeslim.data import TensorBatches
from edgeslim.errors import Int8SaturationWarning, MetricWarning
from edgeslim.graph.reparam import bake_reparametrizations, has_reparametrizations
from edgeslim.task import Task


class TCN(nn.Module):
    """A temporal conv net as audio and time-series code writes it: weight-normalised
    dilated convs (``parametrizations`` or the older hook-based ``weight_norm``)."""

    def __init__(self, old_style: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        c1, c2 = nn.Conv1d(4, 16, 3, padding=1), nn.Conv1d(16, 16, 3, padding=2, dilation=2)
        if old_style:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated in torch, still in use
                self.c1, self.c2 = nn.utils.weight_norm(c1), nn.utils.weight_norm(c2)
        else:
            self.c1, self.c2 = weight_norm(c1), weight_norm(c2)
        self.bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.bn(self.c2(y)))
        return self.fc(y.mean(-1))


def _ready(model: nn.Module) -> nn.Module:
    model.eval()
    with torch.no_grad():  # the hook-based form keeps a non-leaf weight until a no-grad call
        model(torch.zeros(1, 4, 32))
    return model


@pytest.mark.parametrize("old_style", [False, True])
def test_baking_a_copy_is_exact_and_leaves_the_original_whole(old_style: bool) -> None:
    model = _ready(TCN(old_style))
    x = torch.randn(5, 4, 32, generator=torch.Generator().manual_seed(1))
    copied = copy.deepcopy(model)
    baked = bake_reparametrizations(copied)
    assert [b.split(" ")[0] for b in baked] == ["c1.weight", "c2.weight"]
    assert not has_reparametrizations(copied) and has_reparametrizations(model)
    assert type(copied.c1) is nn.Conv1d
    assert sorted(copied.c1.state_dict()) == ["bias", "weight"]
    # a trainable parameter (torch leaves a buffer when a parametrization had two originals)
    assert {"c1.weight", "c2.weight"} <= dict(copied.named_parameters()).keys()
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x), rtol=1e-5, atol=1e-6)
        model(x)  # the original still runs (a deepcopy shared its parametrized class)


def test_spectral_norm_both_forms() -> None:
    model = nn.Sequential(
        nn.utils.spectral_norm(nn.Linear(6, 6)), nn.ReLU(), spectral_norm(nn.Linear(6, 2))
    ).eval()
    x = torch.randn(4, 6)
    copied = copy.deepcopy(model)
    assert len(bake_reparametrizations(copied)) == 2
    assert {"0.weight", "2.weight"} <= dict(copied.named_parameters()).keys()
    torch.testing.assert_close(copied(x), model(x))
    assert bake_reparametrizations(copied) == []  # nothing left: a no-op


@pytest.mark.parametrize(
    ("old_style", "stages"),
    [
        (False, [{"kind": "quantize", "w_bits": 8, "a_bits": 8}]),
        (True, [{"kind": "prune", "macs_reduction": 0.3, "finetune_epochs": 0},
                {"kind": "quantize", "w_bits": 8, "a_bits": 8}]),
    ],
)  # fmt: skip
def test_compress_quantizes_and_prunes_weight_normed_convs(
    old_style: bool, stages: list[dict[str, object]], tmp_path: Path
) -> None:
    model = _ready(TCN(old_style))
    x = torch.randn(64, 4, 32, generator=torch.Generator().manual_seed(0))
    task = Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing may stay float
        warnings.simplefilter("ignore", MetricWarning)  # random weights: one class
        warnings.simplefilter("ignore", Int8SaturationWarning)  # (this CPU's, not the model's)
        result = edgeslim.compress(model, {"name": "r", "stages": stages}, task, tmp_path / "o")
    ort_record = next(r for r in result.records if r.runtime == "onnxruntime")
    assert ort_record.extra["int8_mac_share"] == pytest.approx(1.0)
    assert has_reparametrizations(model)  # the caller's model is untouched
    reloaded = edgeslim.load(tmp_path / "o", model=_ready(TCN(old_style)))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model(x))


class StdConv2d(nn.Conv2d):
    """Weight standardisation as BiT and timm write it: a subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv1d(nn.Conv1d):
    """NFNet's form, 1-D: a learned gain and ``F.batch_norm`` over each filter."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1), 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * 0.5).view(-1), training=True, momentum=0.0, eps=1e-6,
        ).reshape_as(self.weight)  # fmt: skip
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Doubled(nn.Conv2d):
    """A forward that does more than one conv: not a reparametrization, left alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class CosineHead(nn.Linear):
    """A cosine classifier normalises its input too: not a plain linear, left alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


def test_layers_computing_their_weight_become_plain_layers() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "ws": StdConv2d(3, 8, 3, stride=2, padding=1),
            "ws1d": ScaledStdConv1d(4, 6, 5, padding=2, groups=2),
            "doubled": Doubled(3, 4, 1),
            "cosine": CosineHead(8, 3, bias=False),
        }
    )
    x2, x1, xl = torch.randn(2, 3, 9, 9), torch.randn(2, 4, 20), torch.randn(2, 8)
    with torch.no_grad():
        want = [model["ws"](x2), model["ws1d"](x1), model["doubled"](x2), model["cosine"](xl)]
    copied = copy.deepcopy(model)
    baked = bake_reparametrizations(copied)
    assert baked == ["ws.weight (StdConv2d.forward)", "ws1d.weight (ScaledStdConv1d.forward)"]
    assert type(copied["ws"]) is nn.Conv2d and type(copied["ws1d"]) is nn.Conv1d
    assert copied["ws1d"].groups == 2 and copied["ws"].stride == (2, 2)
    assert type(copied["doubled"]) is Doubled and type(copied["cosine"]) is CosineHead
    with torch.no_grad():
        got = [copied["ws"](x2), copied["ws1d"](x1), copied["doubled"](x2), copied["cosine"](xl)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert type(model["ws"]) is StdConv2d  # the original is untouched


def test_compress_quantizes_weight_standardised_convs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        StdConv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        StdConv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()  # fmt: skip
    x = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    task = Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=16))
    recipe = {"name": "w8a8", "stages": [{"kind": "quantize", "w_bits": 8, "a_bits": 8}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "left in float" would raise here
        warnings.simplefilter("ignore", MetricWarning)  # random weights: one class
        warnings.simplefilter("ignore", Int8SaturationWarning)  # (this CPU's, not the model's)
        result = edgeslim.compress(model, recipe, task, tmp_path / "o")
    torch_record = next(r for r in result.records if r.runtime == "torch")
    assert torch_record.value > 80.0  # agreement with the float model (%)
    ort_record = next(r for r in result.records if r.runtime == "onnxruntime")
    assert ort_record.extra["int8_mac_share"] > 0.99  # the convs run on integers
    reloaded = edgeslim.load(tmp_path / "o", model=model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model(x))


class TransposedLinear(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view((*x.size()[:-1], self.nf))


class NotALinear(TransposedLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_a_linear_stored_transposed_becomes_nn_linear() -> None:
    """Before, GPT-2's layers stayed float (0.4% of its MACs on integer kernels)."""
    torch.manual_seed(0)
    model = nn.Sequential(TransposedLinear(8, 6), nn.GELU(), NotALinear(4, 8))
    x = torch.randn(2, 5, 6)
    want = model(x)
    baked = bake_reparametrizations(model)
    assert type(model[0]) is nn.Linear and (model[0].in_features, model[0].out_features) == (6, 8)
    assert isinstance(model[2], NotALinear)  # computes more than x @ w + b: left as it is
    assert baked == ["0.weight (TransposedLinear as nn.Linear)"]
    torch.testing.assert_close(model(x), want)


def _tf_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow's "SAME" padding as timm and Keras ports compute it, from the input size."""
    pads: list[int] = []
    for size in (int(x.shape[-1]), int(x.shape[-2])):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame`` (its ``tf_*`` models): padding computed at every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _tf_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class PadsBefore(Conv2dSame):
    """The odd pixel on the start side: another rule, not TF's, left alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 0, 1, 0) if int(x.shape[-1]) % 2 == 0 else (1, 1, 1, 1))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_a_conv_padding_the_tf_way_becomes_a_pad_and_a_plain_conv() -> None:
    """Before, timm's ``Conv2dSame`` stayed float under W8A8 (tf_efficientnet_lite0)."""
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), PadsBefore(8, 4, 3, stride=2))
    model.append(Conv2dSame(4, 4, 5, groups=4))
    originals = copy.deepcopy(model)
    baked = bake_reparametrizations(model)
    assert baked == ["0.weight (Conv2dSame as SAME pad + conv)",
                     "3.weight (Conv2dSame as SAME pad + conv)"]  # fmt: skip
    assert type(model[0][1]) is nn.Conv2d and model[0][1].padding == (0, 0)
    assert model[3][1].groups == 4 and isinstance(model[2], PadsBefore)
    for size in (15, 16, 17, 32):  # odd and even: the pads differ
        x = torch.randn(2, 3, size, size + 1)
        torch.testing.assert_close(model(x), originals(x))


def _pruned_then_quantized(model: nn.Module, size: int, tmp_path: Path) -> edgeslim.CompressResult:
    """Half of every prunable group removed, then W8A8; checks what every such test needs:
    integer kernels in the file, and a reload that rebuilds the same model."""
    x = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(0))
    task = Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=16))
    recipe = {"name": "p", "stages": [
        {"kind": "prune", "ratio": 0.5, "finetune_epochs": 0},
        {"kind": "quantize", "w_bits": 8, "a_bits": 8},
    ]}  # fmt: skip
    result = edgeslim.compress(model, recipe, task, tmp_path / "o")
    ort_record = next(r for r in result.records if r.runtime == "onnxruntime")
    assert ort_record.extra["int8_mac_share"] > 0.99
    reloaded = edgeslim.load(tmp_path / "o", model=model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model(x))
    return result


def test_compress_quantizes_and_prunes_tf_same_convs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dSame(3, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        Conv2dSame(16, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "left in float" would raise here
        warnings.simplefilter("ignore", MetricWarning)  # random weights: one class
        warnings.simplefilter("ignore", Int8SaturationWarning)  # (this CPU's, not the model's)
        result = _pruned_then_quantized(model, 16, tmp_path)
    first = result.model.get_submodule("0.1")  # the plain conv after its pad
    assert isinstance(first, nn.Conv2d) and first.out_channels == 8  # half its filters


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm + activation in one module (``F.batch_norm`` then its children)."""

    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected a 4D input")  # (a check feeding no output)
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, self.momentum or 0.0, self.eps,
        )  # fmt: skip
        return self.act(self.drop(x))


class GroupNormAct(nn.GroupNorm):
    def __init__(self, groups: int, channels: int) -> None:
        super().__init__(groups, channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class GELU(nn.Module):
    """An activation class of the model's own (timm's ``GELU``): fx traces into it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


class NormPlusInput(BatchNormAct2d):
    """More than a chain after the norm: left alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def test_a_norm_running_its_children_becomes_a_sequential() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), BatchNormAct2d(8, nn.ReLU6()), nn.Conv2d(8, 8, 1),
        GroupNormAct(2, 8), NormPlusInput(8, nn.ReLU()), BatchNormAct2d(8, GELU()),
    ).eval()  # fmt: skip
    for m in model.modules():  # statistics a fresh BatchNorm does not have
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 9, 9)
    want = model(x)
    baked = bake_reparametrizations(model)
    assert baked == [
        "1 (BatchNormAct2d as norm + children)", "3 (GroupNormAct as norm + children)",
        "5 (BatchNormAct2d as norm + children)",
    ]  # fmt: skip
    assert [type(m) for m in model[1]] == [nn.BatchNorm2d, nn.Identity, nn.ReLU6]
    assert [type(m) for m in model[5]] == [nn.BatchNorm2d, nn.Identity, GELU]
    assert [type(m) for m in model[3]] == [nn.GroupNorm, nn.SiLU]
    assert isinstance(model[4], NormPlusInput)
    torch.testing.assert_close(model(x), want)


def test_compress_prunes_through_norms_with_their_activation(tmp_path: Path) -> None:
    """Before, pruning stopped at every ``F.batch_norm`` ("no prunable channel group")."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), BatchNormAct2d(16, nn.ReLU()),
        nn.Conv2d(16, 16, 3, padding=1), BatchNormAct2d(16, nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()  # fmt: skip
    result = _pruned_then_quantized(model, 12, tmp_path)
    assert result.model.get_submodule("0").out_channels == 8
    assert result.model.get_submodule("2").in_channels == 8  # (its BatchNorm folded)


def tcn() -> nn.Module:
    """``module:factory`` for the command line's ``export onnx`` below."""
    return _ready(TCN())


def test_export_onnx_with_a_recipe_bakes_weight_norm_first(tmp_path: Path) -> None:
    """``export onnx --recipe`` quantizes the layers as ``compress`` does: weight-normalised
    convs were left float (an int8 file with 60% of its MACs in integer kernels)."""
    import numpy as np
    import yaml

    from edgeslim.export.command import export_command

    data = tmp_path / "x.npz"
    np.savez(data, x=torch.randn(48, 4, 32, generator=torch.Generator().manual_seed(2)).numpy())
    recipe = tmp_path / "w8a8.yaml"
    stage = {"kind": "quantize", "w_bits": 8, "a_bits": 8, "calibration": 32, "reduce_range": True}
    recipe.write_text(yaml.safe_dump({"name": "w8a8", "stages": [stage]}))
    check = export_command(
        f"{Path(__file__)}:tcn", tmp_path / "tcn.onnx", recipe_path=recipe, data=str(data)
    )
    assert check.quantized and check.int8_mac_share is not None
    assert check.int8_mac_share > 0.95, check.int8_mac_share
