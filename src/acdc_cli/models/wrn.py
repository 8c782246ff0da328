"""Wide ResNets for 32x32 inputs (Zagoruyko & Komodakis), as the AC/DC reference builds them.

The reference (IST-DASLab/ACDC ``models/wide_resnet_cifar.py``, from meliketoy/wide-resnet.pytorch) uses
pre-activation wide blocks with conv biases, dropout between the two 3x3 convs, and a 1x1 conv (with bias) on the
shortcut whenever the block changes shape. Module names follow it (``conv1``, ``layer1.0.conv1``,
``layer1.0.shortcut.0``, ``bn1``, ``linear``) so its sparsity rules carry over. Initialisation is PyTorch's default,
as in the reference: it defines a xavier ``conv_init`` but never applies it. Modules are created in the reference's
order, so under the same seed the weights are the reference's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from acdc_cli.models.table import register


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, dropout: float, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int = 3, dropout: float = 0.3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if width < 1:
            raise ValueError(f"WRN width must be at least 1, got {width}")
        blocks = (depth - 4) // 6
        stages = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, stages[0], 3, padding=1, bias=True)
        in_planes = stages[0]
        layers = []
        for planes, stride in zip(stages[1:], (1, 2, 2)):
            group = []
            for s in [stride] + [1] * (blocks - 1):
                group.append(WideBasic(in_planes, planes, dropout, s))
                in_planes = planes
            layers.append(nn.Sequential(*group))
        self.layer1, self.layer2, self.layer3 = layers
        # as in the reference: momentum 0.9 on the final BatchNorm (its running stats weight each new batch by 0.9)
        self.bn1 = nn.BatchNorm2d(stages[3], momentum=0.9)
        self.linear = nn.Linear(stages[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        # global average pool (the reference's avg_pool2d(8) at 32x32) so other resolutions also work
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register("wrn-{depth}-{width}", example="wrn-10-1", input_size=32, in_channels=3)
def wrn(depth: int, width: int, num_classes: int = 100, in_channels: int = 3, dropout: float = 0.3) -> nn.Module:
    """WRN-depth-width; ``wrn-28-10`` is the paper's CIFAR-100 model (36.5 M parameters)."""
    return WideResNet(depth, width, num_classes, in_channels, dropout)
