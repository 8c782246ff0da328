"""MobileNetV1 (Howard et al. 2017) for 224-pixel ImageNet, laid out as the AC/DC reference (from STR) lays it out.

``model.0`` is the 3x3 stem (conv, BN, ReLU); ``model.1`` ... ``model.13`` are depthwise-separable blocks whose
``.0`` is the depthwise 3x3 conv and ``.3`` the pointwise 1x1 conv; ``fc`` is the classifier. The reference's
"no_conv1_dw" sparsity rules (prune ``model.*.3`` and ``fc`` only) therefore apply unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from acdc_cli.models.registry import register

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
        self.model = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        # global average pool (7x7 at 224 pixels) so smaller inputs also work
        out = self.model(x).mean((2, 3))
        return self.fc(self.dropout(out))


@register("mobilenet-v1", input_size=224, in_channels=3)
def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """The standard 224-pixel ImageNet MobileNetV1, width 1.0 (4,231,976 parameters at 1000 classes)."""
    return MobileNetV1(num_classes, in_channels, dropout)
