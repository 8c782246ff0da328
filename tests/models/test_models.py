"""The model registry: every registered model trains a step; the paper's architectures have the reference's layout,
parameter counts and initialisation; resnet50 is torchvision's."""

import pytest
import torch
from torch import nn

from acdc_cli import models
from acdc_cli.errors import AcdcError

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Per-layer weight std of each model freshly built under torch.manual_seed(0) by the reference's own model code
# (IST-DASLab/ACDC HEAD ac53210: models/resnet_cifar10.py resnet20(), models/wide_resnet_cifar.py
# Wide_ResNet(28, 10, 0.3, 100), models/mobilenet.py mobilenet(), models/resnet_imagenet.py resnet50()), run once
# on torch 2.14 and rounded to 6 digits.
REFERENCE_INIT_STD = {
    "resnet20": {
        "conv1": 0.116958, "layer1.0.conv1": 0.116501, "layer1.0.conv2": 0.115699, "layer1.1.conv1": 0.120423,
        "layer1.1.conv2": 0.116352, "layer1.2.conv1": 0.119526, "layer1.2.conv2": 0.118008,
        "layer2.0.conv1": 0.0824236, "layer2.0.conv2": 0.0835197, "layer2.0.downsample.0": 0.246882,
        "layer2.1.conv1": 0.0827567, "layer2.1.conv2": 0.0833832, "layer2.2.conv1": 0.0831282,
        "layer2.2.conv2": 0.0836304, "layer3.0.conv1": 0.0590174, "layer3.0.conv2": 0.0589323,
        "layer3.0.downsample.0": 0.176293, "layer3.1.conv1": 0.0590887, "layer3.1.conv2": 0.0589924,
        "layer3.2.conv1": 0.0589366, "layer3.2.conv2": 0.0584767, "fc": 0.0722659,
    },
    "wrn-28-10": {
        "conv1": 0.111045, "layer1.0.conv1": 0.0480839, "layer1.0.conv2": 0.0152178, "layer1.0.shortcut.0": 0.144902,
        "layer1.1.conv1": 0.0152154, "layer1.1.conv2": 0.0152083, "layer1.2.conv1": 0.0152061,
        "layer1.2.conv2": 0.0152215, "layer1.3.conv1": 0.0152085, "layer1.3.conv2": 0.0152181,
        "layer2.0.conv1": 0.015233, "layer2.0.conv2": 0.0107565, "layer2.0.shortcut.0": 0.0455068,
        "layer2.1.conv1": 0.010766, "layer2.1.conv2": 0.010764, "layer2.2.conv1": 0.0107592,
        "layer2.2.conv2": 0.0107567, "layer2.3.conv1": 0.0107608, "layer2.3.conv2": 0.0107624,
        "layer3.0.conv1": 0.0107575, "layer3.0.conv2": 0.00760791, "layer3.0.shortcut.0": 0.0322952,
        "layer3.1.conv1": 0.00760506, "layer3.1.conv2": 0.00760853, "layer3.2.conv1": 0.00760621,
        "layer3.2.conv2": 0.00760815, "layer3.3.conv1": 0.00760688, "layer3.3.conv2": 0.00760917, "linear": 0.0227814,
    },
    "mobilenet-v1": {
        "model.0.0": 0.111877, "model.1.0": 0.19868, "model.1.3": 0.100363, "model.2.0": 0.190344,
        "model.2.3": 0.0721617, "model.3.0": 0.197494, "model.3.3": 0.0507132, "model.4.0": 0.196296,
        "model.4.3": 0.0508707, "model.5.0": 0.190963, "model.5.3": 0.0361236, "model.6.0": 0.192092,
        "model.6.3": 0.0361413, "model.7.0": 0.191064, "model.7.3": 0.0255149, "model.8.0": 0.190549,
        "model.8.3": 0.025492, "model.9.0": 0.193952, "model.9.3": 0.02552, "model.10.0": 0.192197,
        "model.10.3": 0.025506, "model.11.0": 0.195146, "model.11.3": 0.0255178, "model.12.0": 0.193414,
        "model.12.3": 0.0255414, "model.13.0": 0.19389, "model.13.3": 0.0180344, "fc": 0.0180618,
    },
    "resnet50": {
        "conv1": 0.0250688, "layer1.0.conv1": 0.175798, "layer1.0.conv2": 0.0583184, "layer1.0.conv3": 0.0889096,
        "layer1.0.downsample.0": 0.0886238, "layer1.1.conv1": 0.175648, "layer1.1.conv2": 0.0587185,
        "layer1.1.conv3": 0.0889551, "layer1.2.conv1": 0.175721, "layer1.2.conv2": 0.0591221,
        "layer1.2.conv3": 0.088668, "layer2.0.conv1": 0.124488, "layer2.0.conv2": 0.0416383,
        "layer2.0.conv3": 0.0624226, "layer2.0.downsample.0": 0.0623856, "layer2.1.conv1": 0.124894,
        "layer2.1.conv2": 0.0416132, "layer2.1.conv3": 0.0625283, "layer2.2.conv1": 0.125451,
        "layer2.2.conv2": 0.041611, "layer2.2.conv3": 0.0625668, "layer2.3.conv1": 0.124229,
        "layer2.3.conv2": 0.0417331, "layer2.3.conv3": 0.0625873, "layer3.0.conv1": 0.0884922,
        "layer3.0.conv2": 0.0294842, "layer3.0.conv3": 0.0441722, "layer3.0.downsample.0": 0.0441383,
        "layer3.1.conv1": 0.0882582, "layer3.1.conv2": 0.0294654, "layer3.1.conv3": 0.044156,
        "layer3.2.conv1": 0.0887438, "layer3.2.conv2": 0.0293987, "layer3.2.conv3": 0.044218,
        "layer3.3.conv1": 0.0882588, "layer3.3.conv2": 0.0294461, "layer3.3.conv3": 0.0441767,
        "layer3.4.conv1": 0.0882354, "layer3.4.conv2": 0.0294866, "layer3.4.conv3": 0.0442133,
        "layer3.5.conv1": 0.0886238, "layer3.5.conv2": 0.0294984, "layer3.5.conv3": 0.0442003,
        "layer4.0.conv1": 0.062501, "layer4.0.conv2": 0.0208381, "layer4.0.conv3": 0.0312662,
        "layer4.0.downsample.0": 0.0312484, "layer4.1.conv1": 0.0624517, "layer4.1.conv2": 0.0208281,
        "layer4.1.conv3": 0.0312686, "layer4.2.conv1": 0.0624816, "layer4.2.conv2": 0.0208322,
        "layer4.2.conv3": 0.0312462, "fc": 0.0127553,
    },
}


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
        # the reference's models (IST-DASLab/ACDC models/wide_resnet_cifar.py, resnet_cifar10.py,
        # resnet_imagenet.py, mobilenet.py) built at these class counts have exactly these parameter counts
        ("wrn-28-10", 100, 36_546_980),  # the paper's 36.5 M
        ("resnet20", 10, 272_474),  # with the 1x1 conv + BatchNorm downsample shortcuts
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


def test_resnet20_follows_the_reference_layout():
    model = models.create("resnet20", num_classes=10)
    names = dict(model.named_modules())
    convs = [n for n, m in names.items() if isinstance(m, nn.Conv2d)]
    # stem + 9 blocks x 2 convs + the 1x1 "option B" shortcuts where a stage changes shape
    # (IST-DASLab/ACDC models/resnet_cifar10.py: downsample = Conv2d(1x1, stride 2) + BatchNorm2d)
    assert len(convs) == 21 and convs[0] == "conv1"
    assert [n for n in convs if "downsample" in n] == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    shortcut = names["layer2.0.downsample.0"]
    assert shortcut.kernel_size == (1, 1) and shortcut.stride == (2, 2) and shortcut.bias is None
    assert (shortcut.in_channels, shortcut.out_channels) == (16, 32)
    assert isinstance(names["layer3.0.downsample.1"], nn.BatchNorm2d)
    assert names["layer1.0"].downsample is None and names["layer2.1"].downsample is None
    assert isinstance(model.fc, nn.Linear)


@pytest.mark.parametrize("name, num_classes", [("resnet20", 10), ("wrn-28-10", 100), ("mobilenet-v1", 1000),
                                               ("resnet50", 1000)])
def test_initialisation_is_the_references(name, num_classes):
    """ResNet-20: the reference's N(0, 2 / (k*k*out)) convs; WRN-28-10 and MobileNetV1: PyTorch's default init (the
    reference's WRN conv_init is never called); ResNet-50: torchvision's, which equals the reference's. Built in the
    reference's order, every layer's weights have the std the reference's code gives them under the same seed."""
    torch.manual_seed(0)
    model = models.create(name, num_classes=num_classes)
    std = {n: m.weight.detach().std().item() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    expected = REFERENCE_INIT_STD[name]
    assert list(std) == list(expected)
    for layer, value in expected.items():
        assert std[layer] == pytest.approx(value, rel=2e-5), layer


def test_mobilenet_init_leaves_depthwise_convs_mostly_kept_by_a_global_mask():
    """With the reference's (default) init a 90 % global magnitude mask at epoch 0 removes 5,066 of the 44,640
    depthwise weights (11.3 %), counted on the reference's models/mobilenet.py under seed 0; a kaiming fan-out init
    would remove 99 % of them."""
    from acdc_cli.sparsity.sparsifier import Sparsifier

    torch.manual_seed(0)
    model = models.create("mobilenet-v1", num_classes=1000)
    sparsifier = Sparsifier(model, ["*"], [], "global", "unstructured")
    sparsifier.compress(0.9)
    depthwise = [f"model.{k}.0.weight" for k in range(1, 14)]
    pruned = sum(int((sparsifier.masks[name] == 0).sum()) for name in depthwise)
    assert sum(sparsifier.masks[name].numel() for name in depthwise) == 44_640
    assert pruned == 5_066


def test_mobilenet_names_depthwise_and_pointwise_as_the_reference():
    model = models.create("mobilenet-v1", num_classes=10)
    names = dict(model.named_modules())
    assert names["model.0.0"].in_channels == 3
    assert isinstance(names["model.14"], nn.AdaptiveAvgPool2d) and "model.15" not in names
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
