"""VGG-small: a plain chain of 3x3 conv-BN-ReLU pairs and max-pools, then a flattened MLP.

The flatten into ``classifier.0`` is kept on purpose: pruning the last conv must remove
the matching block of 3x3 = 9 input features of the first linear layer.
"""

from __future__ import annotations

import torch
from torch import nn

CFG: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M")


class VGGSmall(nn.Module):
    """``features`` (conv/BN/ReLU/pool) then ``classifier`` (linear/ReLU/dropout/linear)."""

    def __init__(
        self,
        cfg: tuple[int | str, ...] = CFG,
        hidden: int = 256,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch, size = in_channels, input_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(ch, v, 3, padding=1, bias=False), nn.BatchNorm2d(v)]
                layers.append(nn.ReLU(inplace=True))
                ch = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(ch * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg_small(num_classes: int = 10, in_channels: int = 1) -> VGGSmall:
    """VGG-small for 28x28 inputs: 6 convs (32-32-64-64-128-128), 2 linears."""
    return VGGSmall(num_classes=num_classes, in_channels=in_channels)
