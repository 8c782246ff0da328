"""ResNet-50 exactly as torchvision defines it, so torchvision state dicts (and its pretrained weights) load as they
are and exported checkpoints load back into ``torchvision.models.resnet50``."""

from __future__ import annotations

from torch import nn

from acdc_cli.models.table import register


@register("resnet50", input_size=224, in_channels=3)
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50 (25,557,032 parameters at 1000 classes), randomly initialised."""
    # imported here: torchvision.models costs every acdc command about a second at startup
    from torchvision.models import resnet50 as tv_resnet50

    model = tv_resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        # same stem shape and name, so only the input channel count differs from torchvision's
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
