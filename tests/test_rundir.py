"""The run's persistence (rundir.py): the gradient scaler's state across a resume, run dirs written before the
engine and the new setting choices existed, and the settings that replaced booleans."""

from __future__ import annotations

import torch
from faults_helpers import as_written_before_resume_state
from safetensors.torch import load_file
from typer.testing import CliRunner

from acdc_cli.cli.app import app
from acdc_cli.config import load_settings
from acdc_cli.engine import ACDC
from acdc_cli.files.checkpoint import load_state, save_state
from acdc_cli.files.jsonio import read_jsonl
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


class Interrupted(Exception):
    pass


def test_old_settings_and_an_old_run_dir_resume_identically(tmp_path, monkeypatch):
    """A run dir written before the engine (booleans for schedule.reset_momentum and runtime.amp in config.toml; the
    previous masks and the mask change in other places of the resume state) continues as if never stopped."""
    assert load_settings(overrides=["schedule.reset_momentum=true", "runtime.amp=true"]).schedule.reset_momentum \
        == "every"
    old = load_settings(overrides=["schedule.reset_momentum=false", "runtime.amp=false"])
    assert (old.schedule.reset_momentum, old.runtime.amp) == ("never", "off")
    env = CliRunner(env={"ACDC_RUNTIME__AMP": "false"}).invoke(app, ["train", "--dry-run", "--json"])
    assert env.exit_code == 0 and '"amp": "off"' in env.stdout

    # dense 0, compressed 1, decompressed 2, final compressed 3-5
    settings = [*TINY, "schedule.epochs=6", "schedule.final_compressed_epochs=3", "schedule.reset_momentum=never"]
    args = ["--device", "cpu"] + [arg for item in settings for arg in ("--set", item)]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert CliRunner().invoke(app, ["train", "--out", str(whole), *args]).exit_code == 0
    real_save = RunDir.save_epoch

    def save_then_crash(store, phase, row):
        real_save(store, phase, row)
        if row["epoch"] == 2:  # the next epoch compresses again: its mask change needs epoch 1's masks
            store.wait()
            raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(RunDir, "save_epoch", save_then_crash)
        assert isinstance(CliRunner().invoke(app, ["train", "--out", str(broken), *args]).exception, Interrupted)

    # the files as the earlier version wrote them
    config = (broken / "config.toml").read_text()
    assert 'reset_momentum = "never"' in config and 'amp = "bf16"' in config
    config = config.replace('reset_momentum = "never"', "reset_momentum = false").replace('amp = "bf16"', "amp = true")
    (broken / "config.toml").write_text(config)
    as_written_before_resume_state(broken)
    state = load_state(broken / "last.state.pt")
    engine = state.pop("engine")
    del state["scaler"]
    state["previous_masks"] = engine["previous_masks"]
    state["progress"]["mask_change"] = engine["mask_change"]
    save_state(broken / "last.state.pt", state)

    resumed = CliRunner().invoke(app, ["train", "--resume", str(broken)])
    assert resumed.exit_code == 0, resumed.output
    strip = lambda rows: [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]  # noqa: E731
    rows = strip(read_jsonl(broken / "metrics.jsonl"))
    # such a state holds no training FLOPs: from the resumed epoch on they are unknown (null), never a partial sum
    unknown = {"train_flops": None, "train_flops_ratio": None}
    assert rows == [{**r, **unknown} if r["epoch"] >= 3 else r for r in strip(read_jsonl(whole / "metrics.jsonl"))]
    assert rows[3]["mask_change"] is not None
    for name in ("last.safetensors", "best_sparse.safetensors"):
        a, b = load_file(whole / name), load_file(broken / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
