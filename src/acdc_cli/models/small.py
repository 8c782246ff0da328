"""The quickstart CNN for 8x8 digits. (The tests' tiny model is theirs: tests/support registers it.)"""

from __future__ import annotations

from torch import nn

from acdc_cli.models.table import register


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Four 3x3 conv blocks and a two-layer classifier; about 0.2 M prunable weights for 8x8 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, dropout: float = 0.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w),
            *_conv_bn(w, w),
            nn.MaxPool2d(2),  # 8 -> 4
            *_conv_bn(w, 2 * w),
            *_conv_bn(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 4 -> 2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * 4, 4 * w),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4 * w, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register("digits-cnn", input_size=8, in_channels=1)
def digits_cnn(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    return DigitsCNN(num_classes, in_channels, dropout=dropout)
