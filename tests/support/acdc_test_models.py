"""Models that only the tests use, registered in acdc's model table by the tests themselves: in the pytest process
by conftest, in every Python process a test starts by ``sitecustomize`` (this folder is on their PYTHONPATH).
acdc ships none of them, so ``acdc train --set model.name=tiny-test`` outside the tests is an unknown model."""

from __future__ import annotations

from torch import nn

from acdc_cli.models.table import REGISTRY, register


class TinyNet(nn.Module):
    """A few hundred weights: conv (8 input channels for N:M tests) -> pool -> linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.bn(self.stem(x)).relu()
        x = self.conv(x).relu()
        return self.fc(self.drop(self.pool(x).flatten(1)))


def tiny_test(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return TinyNet(num_classes, in_channels, dropout)


def register_test_models() -> None:
    """Add the test models to acdc's table (again is harmless: the same entries)."""
    if "tiny-test" not in REGISTRY:
        register("tiny-test", input_size=8, in_channels=3)(tiny_test)
