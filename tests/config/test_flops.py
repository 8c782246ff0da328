"""FLOPs counted as the reference counts them (IST-DASLab/ACDC utils/flop_utils.py get_macs_sparse, per epoch in
policies/manager.py): conv and linear multiply-accumulates, output positions x non-zero weights, backward = 2 x
forward, dense epochs at the dense cost and compressed epochs at the sparse cost."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from acdc_cli import models
from acdc_cli.config import load_settings
from acdc_cli.flops import (
    InferenceFlops,
    TrainingFlops,
    epoch_forward_flops,
    inference_flops,
    layer_flops,
    output_positions,
    weights_flops,
)
from acdc_cli.sparsity.schedule import epoch_plan
from acdc_cli.sparsity.sparsifier import Sparsifier

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 8x8 -> 4x4: 16 positions, 4*3*3*3 = 108 weights
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 5)  # 1 position, 320 weights

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().flatten(1))


def test_hand_count_on_two_layers():
    model = TwoLayers()
    positions = output_positions(model, (3, 8, 8))
    assert positions == {"conv": 16, "fc": 1}
    assert inference_flops(model, positions) == InferenceFlops(dense=16 * 108 + 320, sparse=16 * 108 + 320)
    with torch.no_grad():
        model.conv.weight[0] = 0  # one filter: 27 weights
        model.conv.weight[1, 2, 1, 1] = 0  # and one more
        model.fc.weight[:, :32] = 0  # half the classifier
    flops = inference_flops(model, positions)
    assert flops.dense == 2048
    assert flops.sparse == 16 * (108 - 28) + 160 == 1440
    assert flops.ratio == 1440 / 2048
    assert flops.as_dict() == {"dense": 2048, "sparse": 1440, "ratio": 0.703125}
    layers = {layer.name: layer for layer in layer_flops(model, positions)}
    assert (layers["conv"].weights, layers["conv"].nonzero, layers["conv"].sparse) == (108, 80, 1280)
    assert (layers["fc"].dense, layers["fc"].sparse) == (320, 160)


def test_grouped_convs_and_linear_over_positions():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depthwise: 6x6 positions x 36 weights
        nn.Conv2d(4, 8, 1, bias=False),  # pointwise: 36 x 32
        nn.Flatten(2),  # (1, 8, 36)
        nn.Linear(36, 2),  # applied at each of the 8 rows: 8 positions x 72 weights
    )
    positions = output_positions(model, (4, 6, 6))
    assert positions == {"0": 36, "1": 36, "3": 8}
    assert inference_flops(model, positions).dense == 36 * 36 + 36 * 32 + 8 * 72


def test_counting_leaves_the_model_as_it_was():
    model = TwoLayers().train()
    model.fc.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    output_positions(model, (3, 8, 8))
    # eval-mode pass: batch-norm statistics untouched, every module's mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model.conv.training and model.bn.training and not model.fc.training


def test_resnet50_dense_forward_is_the_well_known_4_1_gmacs():
    model = models.create("resnet50", num_classes=1000)
    flops = inference_flops(model, output_positions(model, (3, 224, 224)))
    print(f"ResNet-50 dense forward at 224 px: {flops.dense / 1e9:.4f} GMACs per image")
    assert 4.08e9 < flops.dense < 4.10e9
    # torch's own counter agrees layer for layer: it counts 2 FLOPs per multiply-accumulate of conv and matmul
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    assert counter.get_total_flops() == 2 * flops.dense


def test_mobilenet_dense_forward_is_the_papers_569_million():
    model = models.create("mobilenet-v1", num_classes=1000)
    flops = inference_flops(model, output_positions(model, (3, 224, 224)))
    print(f"MobileNetV1 dense forward at 224 px: {flops.dense / 1e6:.1f} M MACs per image")
    # Howard et al. 2017, table 8: 569 million mult-adds
    assert 568e6 < flops.dense < 570e6


def test_training_flops_per_epoch():
    flops = InferenceFlops(dense=1000, sparse=250)
    assert epoch_forward_flops("dense", flops) == 1000 and epoch_forward_flops("sparse", flops) == 250
    with pytest.raises(ValueError):
        epoch_forward_flops("pruned", flops)
    run = TrainingFlops()
    assert run.ratio == 1.0
    run = run.add_epoch("dense", flops, images=10)
    assert (run.flops, run.dense_flops, run.ratio) == (30_000, 30_000, 1.0)
    run = run.add_epoch("sparse", flops, images=10).add_epoch("sparse", flops, images=10)
    assert (run.flops, run.dense_flops) == (30_000 + 2 * 7_500, 90_000)
    assert run.ratio == pytest.approx((1 + 0.25 + 0.25) / 3)


def test_train_flops_ratio_of_the_quickstart_plan_is_the_mean_over_its_epochs():
    settings = load_settings()
    torch.manual_seed(0)
    model = models.create("digits-cnn", num_classes=10)
    positions = output_positions(model, (1, 8, 8))
    dense = inference_flops(model, positions)
    sparsifier = Sparsifier(model, ["*"], [], "global", "unstructured")
    sparsifier.compress(settings.sparsity.target)
    sparse = inference_flops(model, positions)
    assert sparse.dense == dense.dense and 0 < sparse.ratio < 0.2
    run = TrainingFlops()
    plan = epoch_plan(settings)
    for epoch in plan:
        run = run.add_epoch(epoch.phase, dense if epoch.phase == "dense" else sparse, images=1257)
    phases = [e.phase for e in plan]
    mean = sum(1.0 if p == "dense" else sparse.ratio for p in phases) / len(phases)
    assert run.ratio == pytest.approx(mean, rel=1e-12)
    # quickstart: 13 dense epochs (warm-up 4 + 3 decompressed phases of 3) and 17 compressed ones
    assert (phases.count("dense"), phases.count("sparse")) == (13, 17)


@pytest.mark.parametrize("preset, classes, shape, ratio", [
    pytest.param("resnet50-imagenet-90", 1000, (3, 224, 224), 0.2229, marks=pytest.mark.slow),
    pytest.param("wrn-cifar100-95", 100, (3, 32, 32), 0.1724, marks=pytest.mark.slow),
    ("mobilenet-imagenet-75", 1000, (3, 224, 224), 0.4709),
])
def test_inference_flops_ratio_of_the_first_masks_is_the_one_docs_state(preset, classes, shape, ratio):
    """docs/reproducing.md's FLOPs ratios, acdc's count: the preset's model at seed 0, pruned as at its first
    compressed epoch (the reference's own counter, which adds batch-norm, activation, pooling and bias operations,
    gives 0.2259, 0.1730 and 0.4789 for the same three)."""
    from acdc_cli.engine import ACDC
    from acdc_cli.training.loop import build_optimizer

    settings = load_settings(preset=preset, flags={"runtime.device": "cpu"})
    torch.manual_seed(settings.runtime.seed)
    model = models.create(settings.model.name, num_classes=classes, in_channels=3)
    engine = ACDC.from_settings(settings, model, build_optimizer(model, settings))
    engine.count_flops(shape)
    engine.start_epoch(settings.schedule.warmup_epochs)
    assert engine.sparsity() == pytest.approx(settings.sparsity.target, abs=1e-7)
    assert round(engine.flops().ratio, 4) == ratio


def test_weights_by_name_cost_what_the_model_costs():
    model = TwoLayers()
    positions = output_positions(model, (3, 8, 8))
    with torch.no_grad():
        model.conv.weight[0] = 0
        model.fc.weight[:, :32] = 0
    assert weights_flops(positions, model.state_dict()) == inference_flops(model, positions) == InferenceFlops(
        dense=2048, sparse=16 * (108 - 27) + 160)
    with pytest.raises(KeyError, match="fc"):
        weights_flops(positions, {"conv.weight": model.conv.weight})
