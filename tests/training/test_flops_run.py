"""FLOPs in a run, as the paper claims them and the reference counts them (``policies/manager.py`` after every
epoch: ``get_macs_sparse`` of the model as it is, x 3 for forward + backward, x the epoch's training images):
``inference_flops`` / ``inference_flops_ratio`` and cumulative ``train_flops`` / ``train_flops_ratio`` in every row
of metrics.jsonl, exact across a resume, in the summary panel, and ``flops`` in ``acdc eval`` / ``acdc inspect`` of
any checkpoint or export."""

import pytest
import torch
from cli_helpers import assert_same_run, fails, invoke, invoke_json, short_schedule, squash, trained
from torch import nn

from acdc_cli import ACDC
from acdc_cli.config import load_settings
from acdc_cli.data import build
from acdc_cli.data.bundle import input_shape
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.files.torchfile import load_state
from acdc_cli.flops import si
from acdc_cli.models import create
from acdc_cli.training.checkpoints import state_path

# the quickstart CNN at 8x8, by hand (output positions x weights): conv 1->32 at 8x8 64 x 288, conv 32->32 64 x 9,216,
# after the 2x2 pool conv 32->64 16 x 18,432 and conv 64->64 16 x 36,864, then linear 256->128 and 128->10
QUICKSTART_DENSE = 64 * 288 + 64 * 9216 + 16 * 18432 + 16 * 36864 + 256 * 128 + 128 * 10
# the quickstart's training images: 1,797 digits less 270 test and 270 val, in whole batches of 64 (19 of them)
QUICKSTART_IMAGES = 19 * 64


def test_quickstart_rows_carry_the_four_flops_fields(quickstart_run):
    assert QUICKSTART_DENSE == 1_527_040
    assert build(load_settings(config=quickstart_run / "config.toml"), torch.device("cpu")).train.num_samples \
        == QUICKSTART_IMAGES == 1216
    rows = read_jsonl(quickstart_run / "metrics.jsonl")
    total = 0
    for row in rows:
        assert row["inference_flops_ratio"] == row["inference_flops"] / QUICKSTART_DENSE
        # a dense epoch trains at the dense cost, a compressed one at the cost of its sparse model
        per_image = QUICKSTART_DENSE if row["phase"] == "dense" else row["inference_flops"]
        total += 3 * per_image * QUICKSTART_IMAGES
        assert row["train_flops"] == total, row["epoch"]
        assert row["train_flops_ratio"] == total / (3 * QUICKSTART_DENSE * QUICKSTART_IMAGES * (row["epoch"] + 1))
        if row["phase"] == "sparse":  # 90 % of the weights, not 90 % of the FLOPs: global magnitude pruning
            assert 0.10 < row["inference_flops_ratio"] < 0.13
    # the run's ratio is the mean over epochs of 1 (dense) and the sparse ratio
    mean = sum(1.0 if r["phase"] == "dense" else r["inference_flops_ratio"] for r in rows) / len(rows)
    assert rows[-1]["train_flops_ratio"] == pytest.approx(mean, rel=1e-12)
    assert 0.45 < mean < 0.55  # 14 dense epochs of 30

    printed = squash((quickstart_run.parent / "stdout.txt").read_text())
    last = rows[-1]
    assert (f"inference FLOPs: {si(last['inference_flops'])} per image, {last['inference_flops_ratio']:.4f} × dense "
            f"(1.527 M)") in printed
    assert (f"training FLOPs: {si(last['train_flops'])}, {last['train_flops_ratio']:.4f} × the same run "
            "dense") in printed


def _counted_by_hooks(path) -> int:
    """Multiply-accumulates of one image through the model a checkpoint holds, counted independently of acdc's
    counter: forward hooks read each conv's output positions and the kept (non-zero) weights are counted in place."""
    ckpt = load_checkpoint(path)
    model = create(ckpt.arch, **ckpt.model_kwargs).eval()
    model.load_state_dict(ckpt.weights)
    total = [0]

    def count(module, _inputs, output):
        positions = output.shape[-2] * output.shape[-1] if isinstance(module, nn.Conv2d) else 1
        total[0] += positions * int(torch.count_nonzero(module.weight))

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, *input_shape("digits", ckpt.arch, None)))
    return total[0]


def test_eval_and_inspect_count_the_flops_of_checkpoints_and_exports(quickstart_run, tmp_path):
    best = read_jsonl(quickstart_run / "metrics.jsonl")
    sparse_ckpt = quickstart_run / "best_sparse.safetensors"
    row = next(r for r in best if r["epoch"] == invoke_json("inspect", sparse_ckpt)["metadata"]["epoch"] - 1)
    expected = {"dense": QUICKSTART_DENSE, "sparse": row["inference_flops"], "ratio": row["inference_flops_ratio"],
                "input_shape": [1, 8, 8]}
    # the run's own figure equals a count made without acdc's counter (the value depends on the CPU and torch build
    # that trained the run, so it is never written here as a constant)
    assert expected["sparse"] == _counted_by_hooks(sparse_ckpt)
    assert expected["ratio"] == expected["sparse"] / QUICKSTART_DENSE
    export = tmp_path / "sparse.safetensors"
    invoke_json("export", sparse_ckpt, "--format", "sparse-bitmask", "-o", export)
    for path in (sparse_ckpt, export):
        assert invoke_json("inspect", path)["flops"] == expected, path
        assert invoke_json("eval", path)["flops"] == expected, path
    dense = invoke_json("inspect", quickstart_run / "best_dense.safetensors")["flops"]
    assert dense["dense"] == QUICKSTART_DENSE and dense["ratio"] > 0.9
    assert dense["sparse"] == _counted_by_hooks(quickstart_run / "best_dense.safetensors")

    # a plain state dict does not say which model it holds: no FLOPs, and why
    from safetensors.torch import load_file, save_file

    plain = tmp_path / "plain.safetensors"
    save_file({k: v for k, v in load_file(sparse_ckpt).items() if not k.startswith("mask.")}, plain)
    info = invoke_json("inspect", plain)
    assert info["flops"] is None and "does not say which model" in info["flops_note"]


def test_eval_counts_the_flops_of_an_onnx_export(quickstart_run, tmp_path):
    pytest.importorskip("onnx", reason="the 'onnx' extra is not installed (pip install -e '.[onnx]')")
    pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed (pip install -e '.[onnx]')")
    source = quickstart_run / "best_sparse.safetensors"
    wanted = invoke_json("eval", source)["flops"]
    for fold in ([], ["--fold-bn"]):  # folding BatchNorm scales the conv weights: their zeros stay zeros
        out = tmp_path / f"m{len(fold)}.onnx"
        invoke_json("export", source, "--format", "onnx", "-o", out, *fold)
        assert invoke_json("eval", out)["flops"] == wanted, fold


RUN = short_schedule(4, 1, 1, 1, 1, 0, "data.batch_size=64", "runtime.checkpoint_every_steps=5")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return trained(tmp_path_factory, "flops", *RUN)


def _stopped(run_dir):
    """The run stopped where its 7th last.safetensors write fails (epoch 1, step 15); the 6th (epoch 1, step 10:
    mid-epoch, in the first compressed phase) is what it resumes from."""
    assert "No space left on device" in fails(["train", "--out", run_dir, *RUN],
                                              env={"_ACDC_TEST_FAULT": "fail@write:7:last.safetensors"})


FLOPS = ("inference_flops", "inference_flops_ratio", "train_flops", "train_flops_ratio")


def test_a_resumed_run_counts_the_flops_of_an_uninterrupted_one(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    _stopped(run_dir)
    assert load_state(state_path(run_dir))["engine"]["train_flops"]["flops"] == \
        read_jsonl(uninterrupted / "metrics.jsonl")[0]["train_flops"]  # epoch 0's total, carried mid-epoch 1
    resumed = invoke("train", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output
    expected, got = read_jsonl(uninterrupted / "metrics.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    assert [[r[k] for k in FLOPS] for r in got] == [[r[k] for k in FLOPS] for r in expected]
    assert [r["phase"] for r in got] == ["dense", "sparse", "dense", "sparse"]
    assert_same_run(uninterrupted, run_dir)


def _two_layers() -> nn.Module:
    """A 3x3 conv (1 -> 2 channels, 4x4 output: 16 positions x 18 weights = 288) and a linear layer (32 -> 3: 96)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(32, 3, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        # the 57 smallest magnitudes of the 114 weights are all the linear layer's: 39 of its 96 stay
        model[2].weight.copy_(torch.arange(1, 97, dtype=torch.float32).view(3, 32) / 100)
    return model


def test_the_engine_counts_flops_by_hand():
    model = _two_layers()
    acdc = ACDC(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, sparsity=0.5, warmup_epochs=1,
                final_compressed_epochs=1)
    acdc.start_epoch(0)
    assert "inference_flops" not in acdc.metrics()  # counting is opt-in: the row is as before
    with pytest.raises(RuntimeError, match="count_flops"):
        acdc.end_epoch(10)
    acdc.count_flops((1, 4, 4))
    acdc.end_epoch(10)
    row = acdc.metrics()
    assert {k: row[k] for k in FLOPS} == {"inference_flops": 384, "inference_flops_ratio": 1.0,
                                          "train_flops": 3 * 384 * 10, "train_flops_ratio": 1.0}
    acdc.start_epoch(1)
    acdc.end_epoch(10)
    sparse = 16 * 18 + 39
    row = acdc.metrics()
    assert {k: row[k] for k in FLOPS} == {
        "inference_flops": sparse, "inference_flops_ratio": sparse / 384,
        "train_flops": 3 * 10 * (384 + sparse), "train_flops_ratio": (384 + sparse) / (2 * 384)}
    assert acdc.flops().as_dict() == {"dense": 384, "sparse": sparse, "ratio": sparse / 384}

    # the totals travel in the engine's state
    state = acdc.state_dict()
    assert state["train_flops"] == {"flops": 3 * 10 * (384 + sparse), "dense_flops": 3 * 10 * 2 * 384}
    other_model = _two_layers()
    other = ACDC(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), epochs=2, sparsity=0.5,
                 warmup_epochs=1, final_compressed_epochs=1)
    other.count_flops((1, 4, 4))
    other.load_state_dict(state)
    assert other.train_flops == acdc.train_flops and other.metrics() == acdc.metrics()
    with pytest.raises(AcdcError, match="train_flops is malformed"):
        other.load_state_dict({k: v for k, v in state.items() if k != "train_flops"})
    with pytest.raises(AcdcError, match="train_flops is malformed"):
        other.load_state_dict({**state, "train_flops": {"flops": -1, "dense_flops": 3}})
