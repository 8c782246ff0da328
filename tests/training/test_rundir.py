"""The run's persistence (rundir.py): the gradient scaler's state across a resume."""

from __future__ import annotations

import torch

from acdc_cli.config import load_settings
from acdc_cli.engine import ACDC
from acdc_cli.models import create
from acdc_cli.training.checkpoints import RunDir
from acdc_cli.training.distributed import DistInfo

CPU = torch.device("cpu")
TINY = ["model.name=tiny-test", "data.name=synthetic", "data.synthetic_size=32", "data.batch_size=16",
        "schedule.epochs=4", "schedule.warmup_epochs=1", "schedule.compressed_epochs=1",
        "schedule.decompressed_epochs=1", "schedule.final_compressed_epochs=1", "log.tensorboard=false"]


def _store(path, settings, scaler: torch.amp.GradScaler) -> RunDir:
    torch.manual_seed(0)
    model = create("tiny-test", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = ACDC.from_settings(settings, model, optimizer)
    return RunDir(path, settings, {"num_classes": 10, "in_channels": 3}, model, engine, optimizer, scaler,
                  DistInfo(0, 1, 0, CPU))


def test_gradient_scaler_state_is_checkpointed_and_resumed(tmp_path):
    """fp16 runs (CUDA) scale their loss; the scaler's scale and growth count continue across a resume. Checked here
    with an enabled CPU scaler, since acdc itself computes in fp32 on the CPU."""
    settings = load_settings(overrides=TINY)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7, growth_interval=3)
    store = _store(tmp_path, settings, scaler)
    phase = store.engine.start_epoch(0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(2):
        store.optimizer.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(store.model(x), y)).backward()
        scaler.step(store.optimizer)
        scaler.update()
    store.state.epoch = 1
    store.save_epoch(phase, {"epoch": 0, "val_top1": 0.5})
    store.wait()

    resumed_scaler = torch.amp.GradScaler("cpu")
    resumed = _store(tmp_path, settings, resumed_scaler)
    assert resumed.resume() is None  # an epoch-end checkpoint: no mid-epoch sums
    assert resumed_scaler.state_dict() == scaler.state_dict()
    assert resumed_scaler.get_scale() == 2.0**7 and resumed_scaler.state_dict()["_growth_tracker"] == 2
    assert resumed.state.epoch == 1 and resumed.engine.phase == phase

    # a run that was not fp16 saved a disabled scaler (empty state): resumed in fp16, it starts a fresh scaler
    (tmp_path / "bf16").mkdir()
    bf16 = _store(tmp_path / "bf16", settings, torch.amp.GradScaler("cpu", enabled=False))
    bf16.state.epoch = 1
    bf16.save_epoch(bf16.engine.start_epoch(0), {"epoch": 0, "val_top1": 0.5})
    bf16.wait()
    fp16 = _store(tmp_path / "bf16", settings, torch.amp.GradScaler("cpu", init_scale=2.0**5))
    fp16.resume()
    assert fp16.scaler.get_scale() == 2.0**5

