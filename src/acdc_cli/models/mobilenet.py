"""MobileNetV1 (Howard et al. 2017) for 224-pixel ImageNet, laid out as the AC/DC reference lays it out
(IST-DASLab/ACDC ``models/mobilenet.py``, from Intel's Distiller, width 1.0).

``model.0`` is the 3x3 stem (conv, BN, ReLU); ``model.1`` ... ``model.13`` are depthwise-separable blocks whose
``.0`` is the depthwise 3x3 conv and ``.3`` the pointwise 1x1 conv; ``model.14`` is the average pool and ``fc`` the
classifier. The reference's "no_conv1_dw" layer list (``model.N.3`` and ``fc``) therefore applies unchanged.
Initialisation is PyTorch's default, as in the reference (which sets none), and modules are created in its order, so
under the same seed the weights are the reference's.
"""

from __future__ import annotations

from torch import Tensor, nn

from acdc_cli.models.table import register

# (output channels, stride) of the 13 depthwise-separable blocks
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def _stem(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        layers = [_stem(in_channels, 32, 2)]
        cin = 32
        for cout, stride in _BLOCKS:
            layers.append(_separable(cin, cout, stride))
            cin = cout
        # the reference's AvgPool2d(7) at 224 pixels; adaptive so that smaller inputs also work
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        # not in the reference (model.dropout, 0 by default: the identity); holds no parameters
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.model(x).flatten(1)))


@register("mobilenet-v1", input_size=224, in_channels=3)
def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """The AC/DC reference's 224-pixel ImageNet MobileNetV1, width 1.0 (4,231,976 parameters at 1000 classes)."""
    return MobileNetV1(num_classes, in_channels, dropout)
