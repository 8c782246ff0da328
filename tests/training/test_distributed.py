"""DDP: `acdc train --nproc 2` (gloo) against the single-process quickstart, and the collectives it relies on
(mask agreement, sharded evaluation, train-metric reduction) in a real 2-process gloo group."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cli_helpers import PINNED, short_schedule
from typer.testing import CliRunner

from acdc_cli.cli.app import app
from acdc_cli.config import load_settings
from acdc_cli.data.tensor_loader import TensorLoader
from acdc_cli.errors import TrainingFault
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.models import create
from acdc_cli.training import distributed, evaluation, runtime
from acdc_cli.training.distributed import DistInfo
from acdc_cli.training.evaluation import evaluate

CPU = torch.device("cpu")


@pytest.mark.slow  # two quickstart runs under torchrun (~20 s); collectives and rank faults stay in the default run
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="--nproc 2 on the CPU needs two cores")
def test_nproc_2_quickstart_agrees_with_single_process(quickstart_run, tmp_path):
    # no --out: the launcher fixes the default run dir once, so both ranks agree on it; pinned like the quickstart
    # fixture (CPU, deterministic, one thread per rank)
    done = subprocess.run([sys.executable, "-m", "acdc_cli", "train", "--nproc", "2", "--json", *PINNED],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(printed) == 1, done.stdout  # only rank 0 prints
    summary = json.loads(printed[0])
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].resolve() == (tmp_path / summary["run_dir"]).resolve()
    run_dir = runs[0]

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(30))  # one writer: every epoch exactly once
    # every mask change was checked on both ranks, and both held the same masks
    checked = [r["mask_checksums"] for r in rows if r["mask_checksums"] is not None]
    assert len(checked) == 4  # the quickstart's four compressed phases
    assert all(len(c) == 2 and c[0] == c[1] for c in checked)
    # the checksum rank 0 reported is that of the masks it saved
    assert distributed.mask_checksum(load_checkpoint(run_dir / "last.safetensors").masks) == checked[-1][0]

    single = read_jsonl(quickstart_run / "metrics.jsonl")
    assert rows[-1]["phase"] == single[-1]["phase"] == "sparse"
    assert rows[-1]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    # two different trainings (each rank's batch norm sees 32 images, other batches, other dropped tails): the same
    # accuracy within 5 of the 270 images (measured: 266 and 269 with whole batches, 268 and 269 before)
    assert abs(rows[-1]["val_top1"] - single[-1]["val_top1"]) <= 5 / 270
    # the sharded evaluation counted each of the 270 held-out images exactly once
    for r in rows:
        assert r["val_top1"] * 270 == pytest.approx(round(r["val_top1"] * 270), abs=1e-6)


# Loaded at startup by every process of a `--nproc 2` run whose PYTHONPATH starts with the folder it is written to:
# on rank 1 only, it breaks one thing, so that the ranks disagree the way a real fault would make them
RANK_1_FAULT = """
import os

if os.environ.get("RANK") == "1":
    fault = os.environ["RANK1_FAULT"]
    if fault == "masks":
        from acdc_cli.sparsity import sparsifier

        compress = sparsifier.Sparsifier.compress

        def compress_then_flip(self, *args, **kwargs):
            change = compress(self, *args, **kwargs)
            first = next(iter(self.masks.values()))
            first.view(-1)[0] = ~first.view(-1)[0]  # one weight kept on rank 1 that rank 0 pruned, or the reverse
            return change

        sparsifier.Sparsifier.compress = compress_then_flip
    else:
        import torch.nn.functional as F

        cross_entropy, calls = F.cross_entropy, []

        def nan_at_step_3(logits, *args, **kwargs):
            loss = cross_entropy(logits, *args, **kwargs)
            if logits.requires_grad:
                calls.append(1)
                if len(calls) == 4:
                    return loss * float("nan")
            return loss

        F.cross_entropy = nan_at_step_3
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="--nproc 2 on the CPU needs two cores")
@pytest.mark.parametrize("fault, message", [
    # the nan case stays in the default run; the masks case is the same two-process path (CI's slow pass runs it)
    pytest.param("masks", "masks differ between ranks: rank 0 has checksum", marks=pytest.mark.slow),
    ("nan", "non-finite loss at epoch 0, step 3"),
])
@pytest.mark.slow  # a long end-to-end run: the slow pass, which CI runs
def test_a_fault_on_one_rank_stops_the_ddp_run_with_exit_1(tmp_path, fault, message):
    """README: all ranks must hold the same masks, a mismatch stops the run (exit 1); a NaN loss stops it too. Here
    rank 1 alone flips one mask bit after the first compression, or gets a NaN loss at step 3 of epoch 0: rank 0
    names the fault in one line, the launcher exits 1, and the checkpoint before the fault is intact."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RANK_1_FAULT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "RANK1_FAULT": fault}
    run_dir = tmp_path / "run"
    # masks: a dense epoch, then the first compression; nan: one dense epoch, with a checkpoint every 2 steps
    schedule = (short_schedule(2, 1, 1, 1, 1) if fault == "masks"
                else short_schedule(1, 0, 1, 1, 1, 0, "schedule.method=dense", "runtime.checkpoint_every_steps=2"))
    done = subprocess.run([sys.executable, "-m", "acdc_cli", "train", "--nproc", "2", "--out", str(run_dir),
                           *schedule], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stderr[-3000:]
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count(message) == 1  # rank 0 says it once
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra.get("step", 0)) == ((1, 0) if fault == "masks" else (0, 2))
    assert all(torch.isfinite(t).all() for t in ckpt.weights.values() if t.is_floating_point())


def test_nproc_refuses_what_cannot_run(tmp_path, monkeypatch):
    runner = CliRunner()
    for args, message in [
        (["--nproc", str((os.cpu_count() or 1) + 1)], "CPU cores"),
        (["--nproc", "2", "--set", "data.batch_size=63"], "does not divide"),
        (["--nproc", "2", "--set", "runtime.sync_batchnorm=true"], "needs CUDA"),
    ]:
        result = runner.invoke(app, ["train", "--device", "cpu", "--out", str(tmp_path / "run"), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "run").exists()  # refused before the run dir is made
    # what torchrun sets (a stray LOCAL_RANK alone no longer counts as a launch)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    result = runner.invoke(app, ["train", "--nproc", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "inside a torchrun process" in result.output


def test_mask_checksum_sees_positions_not_only_counts():
    g = torch.Generator().manual_seed(1)
    masks = {"a.weight": torch.rand(8, 3, 3, 3, generator=g) > 0.7, "b.weight": torch.rand(10, 16, generator=g) > 0.5}
    same = {k: v.clone() for k, v in masks.items()}
    assert distributed.mask_checksum(masks) == distributed.mask_checksum(same)
    moved = {k: v.clone() for k, v in masks.items()}
    flat = moved["b.weight"].view(-1)
    kept, pruned = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
    flat[kept], flat[pruned] = False, True  # same count, one kept weight moved
    assert distributed.mask_checksum(moved) != distributed.mask_checksum(masks)
    # dict order does not matter (a checkpoint stores layers sorted), names do
    assert distributed.mask_checksum({"b.weight": masks["b.weight"], "a.weight": masks["a.weight"]}) == \
        distributed.mask_checksum(masks)
    assert distributed.mask_checksum({"c.weight": masks["a.weight"], "b.weight": masks["b.weight"]}) != \
        distributed.mask_checksum(masks)
    with pytest.raises(TrainingFault, match=r"ranks \[2\]"):
        distributed.check_agreement([5, 5, 6], "masks")


def test_compile_wraps_the_net_but_not_the_saved_names():
    settings = load_settings(overrides=["runtime.compile=true", "model.name=tiny-test"])
    model = create("tiny-test", num_classes=10)
    names = list(model.state_dict())
    net = runtime.prepare_model(model, settings, DistInfo(0, 1, 0, CPU))
    assert net is not model and net._orig_mod is model  # compiled lazily: nothing is compiled until called
    assert list(model.state_dict()) == names


def _shard_contents(loader, world: int) -> list[list[float]]:
    """Per rank, a fingerprint (pixel sum, label) of every sample its evaluation shard yields."""
    shards = []
    for rank in range(world):
        shard = distributed.shard_for_eval(loader, DistInfo(rank, world, rank, CPU))
        shards.append([(round(float(x.sum()), 3), int(y)) for images, labels, *_ in shard
                       for x, y in zip(images, labels)])
    return shards


def test_eval_shards_cover_every_sample_once(tmp_path):
    from acdc_cli import data as data_mod
    from acdc_cli.commands.bench import write_jpeg_tree

    images, _ = _images(23)
    tensor_loader = TensorLoader(images, torch.arange(23), 4, (0.5,) * 3, (0.25,) * 3)
    write_jpeg_tree(tmp_path, train_images=9, test_images=7)
    settings = load_settings(preset="resnet50-imagenet-90", overrides=[
        f"data.dir='{tmp_path}'", "data.val_size=2", "data.num_workers=0", "data.eval_batch_size=2"])
    image_loader = data_mod.build(settings, CPU).test  # an ImageLoader over val/
    batches = [(torch.full((2, 1), float(i)), torch.tensor([i, i])) for i in range(5)]  # any other iterable
    for loader in (tensor_loader, image_loader, batches):
        whole = _shard_contents(loader, 1)[0]
        shards = _shard_contents(loader, 3)
        assert all(shards)  # every rank gets work
        assert sorted(sum(shards, [])) == sorted(whole)  # together: each sample exactly once
    assert sorted(y for _, y in sum(_shard_contents(tensor_loader, 3), [])) == list(range(23))
    # loaders that can shard themselves do, so a rank decodes only its own share of the JPEGs
    for loader in (tensor_loader, image_loader):
        assert type(distributed.shard_for_eval(loader, DistInfo(1, 3, 1, CPU))) is type(loader)


# ----------------------------------------------------------------------------------------------------------------
# the collectives in a real 2-process gloo group


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 4, (n,), generator=g)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create("tiny-test", num_classes=4)
    with torch.no_grad():  # batch-norm statistics that are not the initial ones
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _group_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = DistInfo(rank, world, rank, CPU)
    results = {}
    try:
        g = torch.Generator().manual_seed(0)
        masks = {"a.weight": torch.rand(6, 5, generator=g) > 0.5, "b.weight": torch.rand(9, generator=g) > 0.3}
        results["agree"] = distributed.verify_masks(masks, info)
        if rank == 1:
            masks["a.weight"] = ~masks["a.weight"]
        try:
            distributed.verify_masks(masks, info)
        except TrainingFault as exc:
            results["mismatch"] = str(exc)

        model = _model()
        if rank == 1:  # a rank whose BN statistics drifted: evaluation must use rank 0's, which rank 0 saves
            with torch.no_grad():
                model.bn.running_mean.fill_(3.0)
        names = list(model.state_dict())
        settings = load_settings(overrides=["model.name=tiny-test"])
        net = runtime.prepare_model(model, settings, info)
        results["ddp"] = type(net).__name__
        results["names_kept"] = list(model.state_dict()) == names
        images, labels = _images(37)
        loader = TensorLoader(images, labels, 8, (0.5,) * 3, (0.25,) * 3)
        results["eval"] = evaluation.evaluate_sharded(model, distributed.shard_for_eval(loader, info), CPU, False, info)
        stats = {"train_loss": 1.0 + rank, "train_top1": 0.25 * rank, "img_per_s": 100.0 * (rank + 1), "lr": 0.1}
        results["train"] = distributed.reduce_train_stats(stats, info)
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        # as train.run does: drop DDP (its reducer holds the group), leave together, and let teardown free what
        # still holds the group before destroying it, or gloo may abort at exit
        net = None  # noqa: F841
        distributed.barrier()
        distributed.teardown()


def test_collectives_in_a_two_process_group(tmp_path):
    mp.spawn(_group_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    images, labels = _images(37)
    expected = evaluate(_model(), TensorLoader(images, labels, 8, (0.5,) * 3, (0.25,) * 3), CPU)
    for r in ranks:
        assert len(r["agree"]) == 2 and r["agree"][0] == r["agree"][1]
        assert "masks differ between ranks" in r["mismatch"] and "ranks [1]" in r["mismatch"]
        assert r["ddp"] == "DistributedDataParallel" and r["names_kept"]
        # every image once (37 over 2 ranks), with rank 0's model: what one process reports
        assert r["eval"]["images"] == 37
        assert r["eval"]["top1"] == expected["top1"] and r["eval"]["top5"] == expected["top5"]
        assert r["eval"]["loss"] == pytest.approx(expected["loss"], rel=1e-6)  # float32 batch sums
        assert r["train"]["train_loss"] == pytest.approx(1.5)
        assert r["train"]["train_top1"] == pytest.approx(0.125)
        assert r["train"]["img_per_s"] == pytest.approx(300.0)
