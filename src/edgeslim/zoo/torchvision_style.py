"""Hand-built ImageNet-shape models with torchvision-compatible module names.

torchvision itself cannot be installed beside the pinned CPU torch here, so these
re-creations (same layers, same FQNs, random weights) stand in for it in graph, pruning
and export tests: ResNet-18, ResNet-50, MobileNetV2 and a DenseNet-style block.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.zoo.mobilenetv2 import MobileNetV2
from edgeslim.zoo.resnet import BasicBlock

TV_MOBILENETV2_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1x1 -> 3x3 (stride) -> 1x1 x4, with a shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout (7x7 stem, max-pool, four stages, fc)."""

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        expansion = getattr(block, "expansion", 1)
        in_ch = 64
        stages = []
        for i, n in enumerate(layers):
            width = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, width, 2 if i > 0 and j == 0 else 1))
                in_ch = width * expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(
        TV_MOBILENETV2_CFG,
        stem=32,
        last=1280,
        num_classes=num_classes,
        in_channels=3,
        stem_stride=2,
    )


class DenseLayer(nn.Module):
    """BN-ReLU-conv producing ``growth`` channels, concatenated to its input."""

    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=False)
        self.conv = nn.Conv2d(in_ch, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], 1)


class TinyDenseNet(nn.Module):
    """A stem and one dense block of concatenations, then a classifier (concat coverage)."""

    def __init__(self, in_channels: int = 1, stem: int = 16, growth: int = 8, n: int = 3):
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        layers = [DenseLayer(stem + i * growth, growth) for i in range(n)]
        self.block = nn.Sequential(*layers)
        ch = stem + n * growth
        self.norm = nn.BatchNorm2d(ch)
        self.fc = nn.Linear(ch, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.block(self.conv0(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
