"""Coupling groups are checked by what they mean, not by a list typed by hand.

For a prunable group and a channel i: zero channel i in every consumer (``in`` member),
then scramble channel i in every producer, norm and depthwise member. If the group is
complete, channel i can no longer reach the output, so the output must not change.
A group that misses a member fails this check (a negative test proves it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from coupling_check import check_group
from torch import nn

from edgeslim.graph import analyze, example_input
from edgeslim.zoo.mobilenetv2 import mobilenetv2_small
from edgeslim.zoo.resnet import resnet20
from edgeslim.zoo.torchvision_style import TinyDenseNet, mobilenet_v2, resnet18, resnet50
from edgeslim.zoo.vgg import vgg_small


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


class _ViewPooled(nn.Module):
    """Pools written as a reshape that keeps the channel axis (``x.view(b, c, -1)``,
    ``x.flatten(2)``), and a patch embedding read channels-last by a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.proj = nn.Linear(24, 32)
        self.fc = nn.Linear(16 + 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        pooled = a.view(a.shape[0], a.shape[1], -1).mean(-1)
        tokens = self.proj(self.c2(a).flatten(2).transpose(1, 2))  # (b, positions, 32)
        return self.fc(torch.cat([pooled, tokens.mean(1)], 1))


CNNS = {
    "view-pooled": (_ViewPooled, (1, 3, 16, 16)),
    "resnet20": (resnet20, (1, 1, 28, 28)),
    "vgg-small": (vgg_small, (1, 1, 28, 28)),
    "mobilenetv2-small": (mobilenetv2_small, (1, 1, 28, 28)),
    "tv-resnet18": (resnet18, (1, 3, 32, 32)),
    "tv-resnet50": (resnet50, (1, 3, 32, 32)),
    "tv-mobilenet_v2": (mobilenet_v2, (1, 3, 32, 32)),
    "densenet-block": (TinyDenseNet, (1, 1, 16, 16)),
}


@pytest.mark.parametrize("name", list(CNNS))
def test_every_prunable_group_is_complete(name: str) -> None:
    factory, shape = CNNS[name]
    torch.manual_seed(0)
    model = factory().eval()
    _randomize_bn(model)
    x = example_input(shape)
    graph = analyze(model, x)
    assert graph.prunable_groups, name
    for group in graph.prunable_groups:
        check_group(model, group, (x,))


def test_missing_member_is_detected() -> None:
    model = resnet20().eval()
    _randomize_bn(model)
    x = example_input()
    group = next(g for g in analyze(model, x).prunable_groups if "fc" in g.consumers)
    broken = dataclasses.replace(group, members=tuple(m for m in group.members if m.fqn != "fc"))
    with pytest.raises(AssertionError, match="leaks"):
        check_group(model, broken, (x,))


def test_resnet20_structure() -> None:
    graph = analyze(resnet20(), example_input())
    prunable = graph.prunable_groups
    # 9 inner-block groups + one residual group per stage
    assert len(prunable) == 12
    residual = [g for g in prunable if len(g.producers) > 1]
    assert sorted(g.size for g in residual) == [16, 32, 64]
    stage3 = next(g for g in residual if g.size == 64)
    assert {"layer3.0.conv2", "layer3.0.downsample.0", "layer3.2.conv2"} <= set(stage3.producers)
    assert "fc" in stage3.consumers
    fixed = {g.reason for g in graph.groups if not g.prunable}
    assert fixed == {"model input", "model output"}


def test_vgg_flatten_spreads_channels_over_spatial_positions() -> None:
    graph = analyze(vgg_small(), example_input())
    g = next(g for g in graph.groups if "classifier.0" in g.consumers)
    member = next(m for m in g.members if m.fqn == "classifier.0")
    assert (g.size, member.repeat) == (128, 9)


def test_mobilenet_depthwise_and_residual() -> None:
    graph = analyze(mobilenetv2_small(), example_input())
    dw = [g for g in graph.prunable_groups if any(m.role == "depthwise" for m in g.members)]
    assert len(dw) == 8  # one per expand (7) plus the first block's depthwise on the stem
    expand = next(g for g in dw if "features.2.conv.0.0" in g.producers)
    assert expand.size == 96 and "features.2.conv.2" in expand.consumers


def test_densenet_concat_offsets() -> None:
    graph = analyze(TinyDenseNet(), example_input((1, 1, 16, 16)))
    g = next(g for g in graph.groups if "block.0.conv" in g.producers)
    offsets = {m.fqn: m.offset for m in g.members if m.role == "in"}
    # block.0 output (8 channels) sits after the 16 stem channels in every later input
    assert offsets == {"block.1.conv": 16, "block.2.conv": 16, "fc": 16}


class Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class MixNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.mix = Opaque()
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.a(x)))
        return self.c(self.mix(y.reshape(1, 8, 8, 8)))


def test_channel_mixing_op_fixes_its_groups_with_a_reason() -> None:
    graph = analyze(MixNet(), example_input((1, 1, 8, 8)))
    by_producer = {p: g for g in graph.groups for p in g.producers}
    assert by_producer["a"].prunable
    assert not by_producer["b"].prunable
    assert "transpose" in by_producer["b"].reason


class ChunkNet(nn.Module):
    """A YOLO C3/C2f-style split: ``cv1``'s output cut in two halves along the channels, one
    half through ``m``, both concatenated; then a spatial chunk the channels pass through."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(3, 16, 1)
        self.m = nn.Conv2d(8, 8, 3, padding=1)
        self.cv2 = nn.Conv2d(16, 12, 1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).chunk(2, 1)
        y = torch.relu(self.cv2(torch.cat([a, self.m(b) + b], 1)))
        top, bottom = torch.split(y, 4, dim=2)  # along H: the channels pass through
        return self.head(top + bottom)


def test_a_channel_chunk_fixes_its_producer_and_a_spatial_one_keeps_the_channels() -> None:
    torch.manual_seed(0)
    model = ChunkNet().eval()
    x = example_input((1, 3, 8, 8))
    graph = analyze(model, x)
    by_producer = {p: g for g in graph.groups for p in g.producers}
    # pruning cv1 would move the cut: m would read other channels (it crashed before)
    assert not by_producer["cv1"].prunable and "chunk" in by_producer["cv1"].reason
    assert by_producer["cv2"].prunable and "head" in by_producer["cv2"].consumers
    for group in graph.prunable_groups:
        check_group(model, group, (x,))


def test_a_reshape_after_the_channel_axis_keeps_the_group_prunable() -> None:
    graph = analyze(_ViewPooled().eval(), example_input((1, 3, 16, 16)))
    prunable = {p for g in graph.prunable_groups for p in g.producers}
    assert {"c1.0", "c2.0", "proj"} <= prunable


def test_a_video_model_s_3d_pools_pass_channels() -> None:
    """Conv3d -> BN3d -> ReLU -> MaxPool3d -> Conv3d -> AdaptiveAvgPool3d -> Linear: both
    convs' channels are prunable groups (3-D pools were unknown and fixed 67% of the MACs)."""
    model = nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool3d(2),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()  # fmt: skip
    graph = analyze(model, torch.randn(1, 3, 8, 16, 16))
    producers = {p for g in graph.prunable_groups for p in g.producers}
    assert {"0", "4"} <= producers
    for g in graph.prunable_groups:
        check_group(model, g, (torch.randn(2, 3, 8, 16, 16),))
