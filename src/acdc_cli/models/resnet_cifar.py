"""CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of 16/32/64 channels, 6n+2 layers, built as the AC/DC
reference builds them (IST-DASLab/ACDC ``models/resnet_cifar10.py``).

Post-activation BasicBlocks; a block that changes shape gets a ``downsample`` shortcut of a strided 1x1 conv and a
BatchNorm ("option B"), so ResNet-20 has 272,474 parameters at 10 classes. Module names are the reference's
(``conv1``, ``layer2.0.conv1``, ``layer2.0.downsample.0``, ``fc``), so its layer lists apply unchanged.
Initialisation is the reference's: every conv weight ~ N(0, 2/n) with n = kh * kw * out_channels, BatchNorm weight 1
and bias 0, the classifier left at PyTorch's default. Modules are created and initialised in the reference's order,
so under the same seed the weights are the reference's, tensor for tensor.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from acdc_cli.models.table import register


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        # registered after the convs, as in the reference: the init loop visits modules in this order
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            downsample = None
            if stride != 1 or in_planes != planes:
                # created before the block, as in the reference, so the default-init draws come in its order
                downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(planes))
            group = [BasicBlock(in_planes, planes, stride, downsample)]
            in_planes = planes
            group += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*group))
        self.layer1, self.layer2, self.layer3 = stages
        # the reference's AvgPool2d(8) at 32x32; adaptive so that other resolutions also work
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.avgpool(out).flatten(1))


@register("resnet20", input_size=32, in_channels=3)
def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The AC/DC reference's CIFAR ResNet-20 (272,474 parameters at 10 classes)."""
    return CifarResNet(20, num_classes, in_channels)
