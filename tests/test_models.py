"""The model registry: every registered model trains a step, the paper's architectures have their exact sizes, and
resnet50 is torchvision's."""

import pytest
import torch
from torch import nn

from acdc_cli import models
from acdc_cli.errors import AcdcError


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("entry", models.entries(), ids=lambda e: e.example)
def test_every_registered_model_runs_forward_and_backward(entry):
    torch.manual_seed(0)
    model = models.create(entry.example, num_classes=7)
    # the ImageNet models pool globally, so 64 pixels exercise every layer at a fraction of 224's cost
    size = min(entry.input_size, 64)
    x = torch.randn(2, entry.in_channels, size, size)
    logits = model(x)
    assert logits.shape == (2, 7)
    nn.functional.cross_entropy(logits, torch.tensor([0, 6])).backward()
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert weights and all(w.grad is not None and torch.isfinite(w.grad).all() for w in weights)
    assert any(w.grad.abs().sum() > 0 for w in weights)


@pytest.mark.parametrize(
    "name, num_classes, expected",
    [
        ("wrn-28-10", 100, 36_546_980),  # the paper's 36.5 M
        ("resnet20", 10, 269_722),
        ("resnet50", 1000, 25_557_032),
        ("mobilenet-v1", 1000, 4_231_976),
    ],
)
def test_parameter_counts(name, num_classes, expected):
    assert _params(models.create(name, num_classes=num_classes)) == expected


def test_input_sizes_and_channels_are_recorded():
    sizes = {e.example: (e.input_size, e.in_channels) for e in models.entries()}
    assert sizes["wrn-10-1"] == (32, 3)
    assert sizes["resnet20"] == (32, 3)
    assert sizes["resnet50"] == (224, 3)
    assert sizes["mobilenet-v1"] == (224, 3)


def test_resnet50_loads_torchvision_state_dicts_and_matches_its_output():
    from torchvision.models import resnet50

    reference = resnet50(weights=None, num_classes=10).eval()
    ours = models.create("resnet50", num_classes=10).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


def test_wrn_follows_the_reference_layout():
    model = models.create("wrn-16-2", num_classes=10)
    names = dict(model.named_modules())
    # pre-activation block with conv biases and dropout 0.3 between the convs
    block = names["layer1.0"]
    assert isinstance(block.bn1, nn.BatchNorm2d) and block.conv1.bias is not None and block.dropout.p == 0.3
    # 1x1 conv shortcut only where the shape changes: 16 -> 32 channels in layer1.0, stride 2 in layer2.0
    assert isinstance(names["layer1.0.shortcut.0"], nn.Conv2d)
    assert names["layer1.0.shortcut.0"].kernel_size == (1, 1)
    assert "layer1.1.shortcut.0" not in names
    assert names["layer2.0.shortcut.0"].stride == (2, 2)
    assert models.create("wrn-16-2", num_classes=10, dropout=0.1).layer1[0].dropout.p == 0.1


def test_resnet20_shortcuts_have_no_parameters():
    model = models.create("resnet20", num_classes=10)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    # stem + 9 blocks x 2 convs, no 1x1 shortcut convs (the reference prunes exactly these 19 convs and fc)
    assert len(convs) == 19 and convs[0] == "conv1"
    assert isinstance(model.fc, nn.Linear)


def test_mobilenet_names_depthwise_and_pointwise_as_the_reference():
    model = models.create("mobilenet-v1", num_classes=10)
    names = dict(model.named_modules())
    assert names["model.0.0"].in_channels == 3
    for k in range(1, 14):
        depthwise, pointwise = names[f"model.{k}.0"], names[f"model.{k}.3"]
        assert depthwise.groups == depthwise.in_channels and depthwise.kernel_size == (3, 3)
        assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1


def test_models_accept_other_channel_counts():
    for name in ("wrn-10-1", "resnet20", "resnet50", "mobilenet-v1"):
        model = models.create(name, num_classes=3, in_channels=1)
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("name", ["wrn-12-2", "wrn-28-0"])
def test_invalid_wrn_shapes_are_one_line_errors(name):
    with pytest.raises(AcdcError, match="cannot build model"):
        models.create(name, num_classes=10)
