"""The training recipe beyond the reference's (optimizer by name, gradient accumulation and clipping, EMA of the
weights, mixup / cutmix, label smoothing, RandAugment / TrivialAugment): each one does what docs/settings.md says,
checked against its formula, and a run with all of them resumes mid-epoch bit-identically."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_same_run, fails, invoke, short_schedule, shows, torch_state_kept, trained
from data_helpers import write_imagefolder
from faults_helpers import killed_at
from safetensors.torch import load_file
from torch import nn

from acdc_cli.config import load_settings
from acdc_cli.data.imagefolder import ImageDataset
from acdc_cli.data.policies import build_policy
from acdc_cli.data.tensor_loader import TensorLoader
from acdc_cli.engine import ACDC
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.models import create
from acdc_cli.training.loop import EpochSteps, build_optimizer, train_epoch
from acdc_cli.training.recipe import WeightEma, clip_gradients, draw_mix, mixed_targets, recipe_loss


def _settings(*overrides: str):
    return load_settings(overrides=["optim.lr_schedule=constant", "runtime.device=cpu", *overrides])


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _loader(images, labels, batch_size, **kw) -> TensorLoader:
    return TensorLoader(images, labels, batch_size, (0.5,), (0.25,), drop_last=True, **kw)


# --- optimizer by name ------------------------------------------------------------------------------------------


def test_optimizer_by_name_with_its_arguments():
    settings = _settings("optim.optimizer=AdamW", "optim.optimizer_args={betas=[0.8, 0.95], eps=1e-6}",
                         "optim.weight_decay=0.05")
    optimizer = build_optimizer(_linear_model(), settings)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.05
    assert group["lr"] == settings.optim.lr


@pytest.mark.parametrize("setting, message", [
    ("optim.optimizer=Adamm", "'Adamm' is not a torch.optim optimizer; did you mean Adam"),
    ("optim.optimizer_args={gamma=2.0}", "SGD takes no optimizer_args key 'gamma'"),
    ("optim.optimizer_args={lr=2.0}", "SGD takes no optimizer_args key 'lr'"),
])
def test_a_wrong_optimizer_is_one_line_and_nothing_written(tmp_path, setting, message):
    line = fails(["train", "--out", tmp_path / "run", "--set", setting])
    assert message in line
    assert not (tmp_path / "run").exists()


def test_accumulation_needs_checkpoints_between_optimizer_steps(tmp_path):
    line = fails(["train", "--out", tmp_path / "run", "--set", "optim.grad_accumulation=3",
                  "--set", "runtime.checkpoint_every_steps=4"])
    assert "must be a multiple of optim.grad_accumulation (3)" in line


# --- gradient accumulation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_accumulating_two_batches_of_b_is_one_step_of_2b(momentum):
    """SGD over 4 batches of 16 accumulated 2 by 2 equals 2 steps over batches of 32 (same images, same order)."""
    images, labels = _data(64)
    results = []
    for batch, accumulation in ((16, 2), (32, 1)):
        settings = _settings(f"optim.grad_accumulation={accumulation}", f"optim.momentum={momentum}",
                             "optim.weight_decay=0.001", "optim.lr=0.5")
        model = _linear_model()
        optimizer = build_optimizer(model, settings, kernel="foreach")
        train_epoch(model, _loader(images, labels, batch), optimizer, settings, device=torch.device("cpu"))
        results.append([p.detach().clone() for p in model.parameters()])
    moved = [not torch.equal(p, q) for p, q in zip(results[0], _linear_model().parameters())]
    assert all(moved)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulation_steps_once_per_group_and_yields_only_after_a_step():
    """5 batches accumulated 2 by 2: optimizer steps after batches 2, 4 and 5 (a short last group); the loop may
    checkpoint only there."""
    images, labels = _data(80)
    settings = _settings("optim.grad_accumulation=2")
    model = _linear_model()
    optimizer = build_optimizer(model, settings)
    stepped = []
    optimizer.register_step_post_hook(lambda *_: stepped.append(True))
    steps = EpochSteps(model, _loader(images, labels, 16), optimizer, settings, epoch=0, device=torch.device("cpu"))
    assert list(steps) == [2, 4, 5]
    assert len(stepped) == 3


# --- gradient clipping ------------------------------------------------------------------------------------------


def test_clipping_bounds_the_norm_of_the_masked_gradients_the_step_sees():
    settings = _settings("schedule.warmup_epochs=0", "sparsity.target=0.5")
    model = create("digits-cnn", num_classes=10, in_channels=1)
    optimizer = build_optimizer(model, settings)
    engine = ACDC.from_settings(settings, model, optimizer)
    engine.start_epoch(0)  # compressed: half the prunable weights pruned
    clip_gradients(optimizer, 0.5)
    seen = {}

    def spy(opt, args, kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen["norm"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        seen["pruned"] = [model.get_parameter(n).grad[~m] for n, m in engine.masks.items()]

    optimizer.register_step_pre_hook(spy)
    images, labels = _data(32)
    loss = F.cross_entropy(model((images.float() - 128) / 64), labels) * 1000  # a gradient far above the bound
    loss.backward()
    unclipped = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))
    assert unclipped > 10
    optimizer.step()
    assert seen["norm"] == pytest.approx(0.5, rel=1e-5)
    assert all(torch.count_nonzero(g) == 0 for g in seen["pruned"])


# --- EMA --------------------------------------------------------------------------------------------------------


def test_ema_is_the_formula_and_follows_the_masks():
    settings = _settings("schedule.warmup_epochs=1", "sparsity.target=0.75")
    model = create("digits-cnn", num_classes=10, in_channels=1)
    optimizer = build_optimizer(model, settings)
    engine = ACDC.from_settings(settings, model, optimizer)
    engine.start_epoch(0)  # dense warm-up
    ema = WeightEma(model, 0.9, engine)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update()
    live = model.state_dict()
    for name, value in ema.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * start[name] + 0.1 * live[name], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, live[name])
    engine.start_epoch(1)  # compressed: the EMA's copies of pruned weights go to exactly zero with the model's
    ema.follow_masks()
    weights = dict(ema.module.named_parameters())
    assert engine.masks
    for name, mask in engine.masks.items():
        assert torch.count_nonzero(weights[name][~mask]) == 0
        assert torch.count_nonzero(weights[name][mask]) == mask.sum()
    # within the phase they stay zero without masking: the model's pruned weights are zero after every step
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.arange(8)).backward()
        optimizer.step()
        ema.update()
    for name, mask in engine.masks.items():
        assert torch.isfinite(weights[name]).all() and torch.count_nonzero(weights[name][~mask]) == 0
        assert torch.count_nonzero(weights[name][mask]) == mask.sum()


# --- mixup, cutmix, label smoothing -----------------------------------------------------------------------------


def test_label_smoothing_loss_is_the_formula():
    torch.manual_seed(0)
    logits, labels, s = torch.randn(8, 10), torch.randint(0, 10, (8,)), 0.1
    expected = -(((1 - s) * F.one_hot(labels, 10) + s / 10) * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(recipe_loss(logits, labels, None, s), expected)
    lam = 0.3  # mixed: the smoothed loss of each label, weighted
    mixed = lam * recipe_loss(logits, labels, None, s) + (1 - lam) * recipe_loss(logits, labels.roll(1), None, s)
    torch.testing.assert_close(recipe_loss(logits, labels, lam, s), mixed)


def test_mixup_mixes_images_and_labels_by_lambda():
    data = _settings("data.mixup_alpha=0.4").data
    images = torch.randn(6, 1, 8, 8)
    torch.manual_seed(3)
    mixed, lam = draw_mix(images, data)
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    targets = mixed_targets(labels, lam, 10)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert targets[2, 2] == pytest.approx(lam) and targets[2, 1] == pytest.approx(1 - lam)
    assert draw_mix(images, _settings().data) == (images, None)


def test_cutmix_pastes_a_box_whose_area_sets_lambda():
    data = _settings("data.cutmix_alpha=1.0").data
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 16, 16).contiguous()  # image i is all i
    for seed in range(10):
        torch.manual_seed(seed)
        mixed, lam = draw_mix(images, data)
        pasted = (mixed != images)[:, 0]  # (N, H, W): pixels from the rolled image
        assert torch.equal(pasted, pasted[:1].expand_as(pasted))  # one box for the whole batch
        assert pasted[0].float().mean().item() == pytest.approx(1 - lam)
        box = pasted[0]
        for i in range(5):  # inside the box, image i shows image i - 1; outside, itself
            assert torch.all(mixed[i][:, box] == (i - 1) % 5) and torch.all(mixed[i][:, ~box] == i)


# --- RandAugment / TrivialAugment -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_augment_policy_is_seeded_per_batch_and_leaves_other_randomness_alone(policy):
    images, labels = _data(48)
    settings = _settings(f"data.augment_policy={policy}", "data.randaugment_magnitude=15")
    loader = _loader(images, labels, 16, shuffle=True, policy=build_policy(settings.data))
    plain = _loader(images, labels, 16, shuffle=True)
    loader.set_epoch(2)
    plain.set_epoch(2)
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    batches = [b[0] for b in loader]
    assert torch.equal(torch.rand(3), before)  # the policy's draws came from a generator of its own
    assert not all(torch.equal(a, b[0]) for a, b in zip(batches, plain))  # it changed the images
    again = [b[0] for b in loader.iterate(1)]  # a resume at batch 1 augments as the whole pass did
    assert all(torch.equal(a, b) for a, b in zip(again, batches[1:]))


# --- a run with everything on resumes exactly -------------------------------------------------------------------

RECIPE = short_schedule(
    3, 1, 1, 1, 1, 0, "data.batch_size=64", "optim.optimizer=AdamW", "optim.lr=0.003",
    "optim.optimizer_args={betas=[0.9, 0.95]}", "optim.grad_accumulation=2", "optim.clip_grad_norm=1.0",
    "optim.ema_decay=0.9", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "data.augment_policy=trivialaugment",
    "optim.label_smoothing=0.1", "model.dropout=0.2", "runtime.checkpoint_every_steps=4")
EMA_FILES = ("last.safetensors", "best_sparse.safetensors", "best_dense.safetensors", "ema_best_sparse.safetensors",
             "ema_best_dense.safetensors")


@pytest.mark.slow
def test_a_run_with_the_whole_recipe_resumes_mid_epoch_bit_identically(tmp_path, tmp_path_factory):
    reference = trained(tmp_path_factory, "recipe", *RECIPE)
    rows = read_jsonl(reference / "metrics.jsonl")
    assert all(r["val_ema_top1"] is not None for r in rows)
    # the EMA's best sparse checkpoint: the model's masks, and its pruned weights exactly zero
    ema_sparse = load_checkpoint(reference / "ema_best_sparse.safetensors")
    assert ema_sparse.masks
    for name, mask in ema_sparse.masks.items():
        assert torch.count_nonzero(ema_sparse.weights[name][~mask.bool()]) == 0
    assert not torch.equal(load_file(reference / "ema_best_sparse.safetensors")[next(iter(ema_sparse.masks))],
                           load_file(reference / "best_sparse.safetensors")[next(iter(ema_sparse.masks))])

    # killed while writing the 4th last.safetensors (epoch 0, step 16 of 19), so the resume starts at step 12: in
    # the middle of the epoch, the EMA, the optimizer's moments and the augmentation draws picked up from there
    run_dir = tmp_path / "run"
    killed_at("kill@write:4:last.safetensors", "--out", run_dir, *RECIPE)
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra.get("step")) == (0, 12)
    for setting in ("optim.ema_decay=0.5", "optim.grad_accumulation=1", "data.augment_policy=none"):
        assert "cannot change" in fails(["train", "--resume", run_dir, "--set", setting])  # they change results
    with torch_state_kept():
        result = invoke("train", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert shows("EMA best sparse: val top-1", result.output) and shows("EMA best dense : val top-1", result.output)
    assert_same_run(reference, run_dir, EMA_FILES)


@pytest.mark.parametrize("decode", ["cpu", "pil"])
def test_imagefolder_applies_the_policy_per_image_with_its_own_seed(tmp_path, decode):
    root = write_imagefolder(tmp_path / "images", classes=1, train=2, val=1)
    paths = sorted(str(p) for p in (root / "train").rglob("*.JPEG"))
    policy = build_policy(_settings("data.augment_policy=randaugment", "data.randaugment_magnitude=20").data)
    labels = np.zeros(len(paths), dtype=np.int64)
    augmented = ImageDataset(paths, labels, augment=True, decode=decode, policy=policy)
    plain = ImageDataset(paths, labels, augment=True, decode=decode)
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    first = [augmented[(i, 1234 + i)][0] for i in range(len(paths))]
    assert torch.equal(torch.rand(3), before)
    assert all(torch.equal(a, augmented[(i, 1234 + i)][0]) for i, a in enumerate(first))  # same key, same image
    assert not all(torch.equal(a, plain[(i, 1234 + i)][0]) for i, a in enumerate(first))  # same crop, then the policy
