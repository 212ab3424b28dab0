"""MobileNetV2-small: inverted residuals with depthwise 3x3 convs, sized for 28x28 inputs.

Module names follow torchvision's MobileNetV2 (``features.i.conv.j``, ``classifier.1``).
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper
SMALL_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 2, 1),
)


class ConvBNReLU(nn.Sequential):
    """conv -> BN -> ReLU6, the torchvision ``Conv2dNormActivation`` layout."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU(in_ch, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a configurable stem, block table and last width."""

    def __init__(
        self,
        cfg: tuple[tuple[int, int, int, int], ...] = SMALL_CFG,
        stem: int = 16,
        last: int = 256,
        num_classes: int = 10,
        in_channels: int = 1,
        stem_stride: int = 1,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU(in_channels, stem, stride=stem_stride)]
        ch = stem
        for t, c, n, s in cfg:
            for i in range(n):
                features.append(InvertedResidual(ch, c, s if i == 0 else 1, t))
                ch = c
        features.append(ConvBNReLU(ch, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2_small(num_classes: int = 10, in_channels: int = 1) -> MobileNetV2:
    """MobileNetV2-small for 28x28: stem 16, blocks to 64 channels, 256-wide head."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels)
