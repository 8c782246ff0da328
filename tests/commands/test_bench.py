"""`acdc bench` on the CPU at tiny sizes: both step modes, their ratio, the mask update and the input pipelines."""

import json
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import fails, invoke, invoke_json, needs_cpp_compiler, shows

from acdc_cli.commands import bench, bench_reference
from acdc_cli.config import load_settings
from acdc_cli.engine import ACDC
from acdc_cli.training import runtime
from acdc_cli.training.loop import build_optimizer

TICK_S = 0.25


PIPELINE_IMAGES = 8  # the per-core ImageFolder pass: 2 batches of 4


@pytest.fixture
def fake_clock(monkeypatch):
    """bench's clock advances exactly TICK_S per reading, so every timed section lasts TICK_S: each figure must then
    be the work counted in that section over TICK_S, whatever the machine's speed."""
    now = [0.0]

    def perf_counter() -> float:
        now[0] += TICK_S
        return now[0]

    monkeypatch.setattr(runtime, "time", SimpleNamespace(perf_counter=perf_counter))  # bench times with elapsed_seconds


def _bench_json(*args: str) -> dict:
    return invoke_json("bench", "--device", "cpu", *args)


def test_bench_json_reports_both_modes_and_ratio(fake_clock):
    out = _bench_json("--steps", "3", "--warmup", "1")
    assert out["device"].startswith("cpu") and out["preset"] == "quickstart" and out["model"] == "digits-cnn"
    assert out["batch_size"] == 64 and out["input_shape"] == [1, 8, 8]
    images = 3 * 64  # timed steps x batch; the pipeline and the epoch pass over as many images
    for key in ("reference_img_per_s", "acdc_img_per_s", "acdc_epoch_img_per_s", "pipeline_img_per_s",
                "reference_img_per_s_best", "acdc_img_per_s_best", "fp32_eager_img_per_s"):
        assert out[key] == pytest.approx(images / TICK_S), key
    assert out["mask_update_ms"] == pytest.approx(1000 * TICK_S)
    assert out["ratio"] == pytest.approx(out["acdc_img_per_s"] / out["reference_img_per_s"])
    assert out["ratio"] == pytest.approx(out["ratio_step_path"] * out["ratio_precision_layout_compile"])
    assert out["rounds"] == 5 and out["ratio_best"] == pytest.approx(1.0)
    # the CPU without compile: acdc's step is already fp32/NCHW/eager, so it is the middle mode and its factor is 1
    assert out["fp32_eager_is_acdc"] is True and out["ratio_precision_layout_compile"] == 1.0
    assert out["reference_elements"] == bench_reference.elements(torch.device("cpu"))
    assert any("re-masked before its forward" in e for e in out["reference_elements"])
    assert any("two host syncs" in e for e in out["reference_elements"])
    # the CPU step runs fp32 whatever the settings say; the mask update covers every conv/linear weight
    assert out["acdc_amp"] is False and out["acdc_channels_last"] is False
    assert out["mask_weights"] == 98_848 and out["pipeline"].startswith("TensorLoader")
    assert out["pipeline_pil_img_per_s"] is None and out["pipeline_ratio"] is None  # no PIL path to compare
    # the validation pass: one full batch of 512 and the short one of 256
    assert out["acdc_eval_img_per_s"] == pytest.approx((512 + 256) / TICK_S)
    assert out["compile_graphs"] is None and out["epoch_recompiles"] is None  # runtime.compile is off
    # the three post-backward paths timed over POST_BACKWARD_STEPS steps per pass
    assert out["post_backward_kernel"] == "fused"  # the CPU has fused SGD
    assert out["post_backward_ms"] == out["post_backward_previous_ms"] == out["post_backward_single_pass_ms"] \
        == pytest.approx(1000 * TICK_S / bench.POST_BACKWARD_STEPS)
    assert out["post_backward_ratio"] == pytest.approx(1.0)
    # no saving on this clock: no shares of it
    assert out["post_backward_fused_share"] is None and out["post_backward_mask_pass_share"] is None


def test_bench_table_and_bad_input():
    """On the real clock: the table names every measurement, and each figure is a positive number."""
    result = invoke("bench", "--device", "cpu", "--steps", "2", "--warmup", "0", "-b", "16")
    assert result.exit_code == 0, result.output
    for text in ("reference step, as the AC/DC reference trains", "acdc step", "ratio acdc / reference",
                 "step path (masking, optimizer, host syncs)", "precision, layout, compile", "global mask update",
                 "input pipeline", "post-backward step: gradient mask + fused SGD", "single mask pass",
                 "ratio previous / acdc post-backward step", "validation pass", "alternating rounds",
                 "per-tensor SGD"):
        assert shows(text, result.stdout), text
    assert "--steps" in fails(["bench", "--device", "cpu", "--steps", "0"])
    assert "--rounds" in fails(["bench", "--device", "cpu", "--rounds", "0"])


def test_post_backward_paths_update_the_same_weights(one_thread):
    """The two timed paths do the same work: from the same weights and gradients, acdc's (engine hooks + fused SGD)
    and the previous one (gradient mask + foreach SGD + weight mask) leave the same weights, pruned ones at zero."""
    settings = load_settings(overrides=["runtime.device='cpu'"])
    results = []
    for path in ("acdc", "previous"):
        model = bench._build_model(settings, torch.device("cpu"))
        torch.manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer = build_optimizer(model, settings, kernel="auto" if path == "acdc" else "foreach")
        engine = ACDC.from_settings(settings, model, optimizer)
        engine.sparsifier.compress(0.9)
        if path == "previous":
            engine.remove_hooks()
        for _ in range(3):
            if path == "acdc":
                optimizer.step()
            else:
                engine.sparsifier.apply_to_grads()
                optimizer.step()
                engine.sparsifier.apply_to_weights()
        results.append((dict(model.named_parameters()), dict(engine.masks)))
    (acdc, masks), (previous, _) = results
    for name, weight in acdc.items():
        torch.testing.assert_close(weight, previous[name], rtol=1e-5, atol=1e-7)
    assert all(torch.count_nonzero(acdc[name].detach()[~mask]) == 0 for name, mask in masks.items())


@needs_cpp_compiler
def test_compiled_bench_epoch_with_short_batches_recompiles_nothing():
    """runtime.compile on (inductor on the CPU): the training graph from the warm-up and the two validation graphs
    (full and short batch) are all that is built; the timed epoch over a split with a short last batch and the
    timed validation pass build none."""
    out = _bench_json("--set", "runtime.compile=true", "--set", "data.eval_batch_size=100", "-b", "64",
                      "--steps", "2", "--warmup", "1")
    assert out["acdc_compile"] is True
    assert out["compile_graphs"] == 3 and out["epoch_recompiles"] == 0


def test_bench_times_the_imagefolder_pipeline_on_generated_jpegs(fake_clock):
    # an ImageNet preset with a tiny model in its place: the JPEG pipeline is real, the step is cheap
    out = _bench_json("--preset", "resnet50-imagenet-90", "--set", "model.name=tiny-test",
                      "--set", "data.num_workers=0", "-b", "4", "--steps", "2", "--warmup", "1")
    assert out["dataset"] == "imagenet" and out["pipeline"].startswith("ImageFolder, data.decode=cpu")
    assert out["acdc_epoch_img_per_s"] is None
    assert out["reference_img_per_s"] == out["acdc_img_per_s"] == pytest.approx(2 * 4 / TICK_S)
    # the PIL decoder side by side, per core, over as many images as the new path, and their ratio
    assert out["pipeline_img_per_s"] == pytest.approx(PIPELINE_IMAGES / TICK_S)
    assert out["pipeline_pil_img_per_s"] == pytest.approx(PIPELINE_IMAGES / TICK_S)
    assert out["pipeline_ratio"] == pytest.approx(out["pipeline_img_per_s"] / out["pipeline_pil_img_per_s"])


def _reference_step(settings, batch: int = 16):
    model = bench._build_model(settings, torch.device("cpu"))
    masks = bench._masks_at_target(model, settings).masks
    step = bench_reference.ReferenceStep(model, masks, settings, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    return model, masks, step, torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)


def test_reference_step_keeps_pruned_weights_at_zero():
    # the reference step must do the same sparse training as acdc's, only slower
    settings = load_settings(overrides=["runtime.device='cpu'"])
    model, masks, step, images, labels = _reference_step(settings)
    for _ in range(3):
        step(images, labels)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.9 * sum(w.numel() for w in weights))
    # the gradient hooks zeroed the last step's gradients of exactly the pruned weights
    assert all(torch.count_nonzero(w.grad[w == 0]) == 0 for w in weights)
    assert sum(int(torch.count_nonzero(w.grad[w != 0])) for w in weights) > 0


def test_reference_step_remasks_before_forward_and_syncs_twice(monkeypatch):
    """The reference's WrappedLayer re-masks each weight before its forward, and its loop reads two numbers per
    step (train accuracy and loss) with .item()."""
    settings = load_settings(overrides=["runtime.device='cpu'"])
    model, masks, step, images, labels = _reference_step(settings)
    name, mask = next(iter(masks.items()))
    weight = dict(model.named_parameters())[name]
    with torch.no_grad():
        weight[~mask] = 1.0  # a pruned weight moved off zero between steps
    seen = []
    module = model.get_submodule(name.rsplit(".", 1)[0])
    module.register_forward_hook(lambda m, args, out: seen.append(int(torch.count_nonzero(m.weight[~mask]))))
    items = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: items.append(t.shape) or original(t))
    step(images, labels)
    step(images, labels)
    assert seen == [0, 0] and len(items) == 4
    assert step.correct <= 2 * len(labels) and step.epoch_loss > 0


def test_reference_sgd_is_pytorch_per_tensor_sgd():
    """The reference's optimizer (optimization/sgd.py) is PyTorch's SGD of its day: the same weights, bit for bit,
    as today's per-tensor SGD, with weight decay, momentum and Nesterov."""
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    results = []
    for make in (lambda ps: bench_reference.ReferenceSGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
                 lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True,
                                            foreach=False)):
        params = [p.clone().requires_grad_() for p in start]
        optimizer = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_interleaved_rounds_take_turns_and_time_each_pass(monkeypatch):
    """Each round runs every mode once, the first mode rotating; warm-up runs first, untimed; the flags set before
    each mode's pass run before it."""
    calls = []
    modes = {name: (lambda count, name=name: calls.append((name, count))) for name in ("a", "b", "c")}
    before = {"a": lambda: calls.append(("flag a", 0))}
    timed = iter(range(1, 100))
    monkeypatch.setattr(runtime, "elapsed_seconds", lambda fn, device: fn() or float(next(timed)))
    seconds = runtime.interleaved_seconds(modes, steps=7, warmup=2, rounds=4, device=torch.device("cpu"),
                                          before=before)
    assert calls[:4] == [("flag a", 0), ("a", 2), ("b", 2), ("c", 2)]
    order = [name for name, count in calls[4:] if count == 7]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert calls.count(("flag a", 0)) == 1 + 4
    assert seconds == {"a": [1, 6, 8, 10], "b": [2, 4, 9, 11], "c": [3, 5, 7, 12]}


def test_rates_and_breakdown_arithmetic():
    # 5 rounds of 10 images: the median pass (3 s) and the best (1 s)
    assert bench.rates([2.0, 1.0, 4.0, 3.0, 5.0], 10) == (pytest.approx(10 / 3), pytest.approx(10.0))
    parts = bench.step_breakdown(reference=100.0, plain=150.0, acdc=600.0)
    assert parts == {"ratio": 6.0, "ratio_step_path": 1.5, "ratio_precision_layout_compile": 4.0}
    # the saving of 8 ms: 6 ms from fused=True (single pass 8 -> acdc 2), 2 ms from dropping the weight mask
    split = bench.saving_split(previous=10.0, single_pass=8.0, acdc=2.0)
    assert split == {"post_backward_ratio": 5.0, "post_backward_fused_share": 0.75,
                     "post_backward_mask_pass_share": pytest.approx(0.25)}
    assert bench.saving_split(previous=2.0, single_pass=3.0, acdc=2.5)["post_backward_fused_share"] is None


def test_bench_figures_follow_a_clock_that_differs_per_mode(monkeypatch):
    """With step passes lasting 4 s (reference) and 1 s (acdc), and post-backward passes 60/30/10 ms (previous,
    single mask pass, acdc), the report carries exactly the figures and ratios that follow."""
    step_modes = {"reference": 4.0, "acdc": 1.0}
    post_backward_paths = {"previous": 0.06, "single_pass": 0.03, "acdc": 0.01}
    original = bench.interleaved_seconds

    def scripted(modes, steps, warmup, rounds, device, before=None):
        original(modes, 1, 0, 1, device, before)  # the modes still run: the rest of bench uses their state
        seconds = post_backward_paths if "previous" in modes else step_modes
        return {name: [seconds[name]] * rounds for name in modes}

    monkeypatch.setattr(bench, "interleaved_seconds", scripted)
    settings = load_settings(overrides=["runtime.device='cpu'"])
    out = bench.run_bench(settings, steps=2, warmup=0, rounds=3, batch_size=8)
    assert out["reference_img_per_s"] == pytest.approx(16 / 4.0) and out["acdc_img_per_s"] == pytest.approx(16.0)
    assert out["ratio"] == pytest.approx(4.0) and out["ratio_step_path"] == pytest.approx(4.0)
    # post-backward passes of POST_BACKWARD_STEPS (10) steps: 1, 6 and 3 ms a step
    assert out["post_backward_ms"] == pytest.approx(1.0) and out["post_backward_previous_ms"] == pytest.approx(6.0)
    assert out["post_backward_single_pass_ms"] == pytest.approx(3.0)
    assert out["post_backward_ratio"] == pytest.approx(6.0)
    assert out["post_backward_fused_share"] == pytest.approx(0.4)  # (3 - 1) / (6 - 1)


@pytest.mark.slow
def test_gpu_check_script_rehearses_on_the_cpu(tmp_path):
    """bench/gpu_check.py end to end in its CPU rehearsal (toy sizes, about 1.5 minutes on 2 cores, hence slow):
    every step passes, the outputs are the 7 small files a GPU run leaves, and the summary names every target. A
    broken script would otherwise only show on a GPU machine, whose minutes are few. The rehearsal's steps have no
    time limit of their own (a slow machine must not fail them), only the script's overall budget; the timeout
    here is a safety net beyond it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script), "--rehearsal"], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "checks.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["PASS"] * 12, rows
    assert {r["check"] for r in rows} >= {"preflight", "global mask time (target <= 10 ms)",
                                          "torchrun smoke run (2 process(es))", "acdc bench resnet50-imagenet-90",
                                          "post-backward step ratio", "ImageFolder pipeline per core"}
    checks = {r["check"]: r for r in rows}
    # the GPU tests: collected (the selection and imports work) but not run without CUDA
    for name, count in (("masks on CUDA (pytest -m gpu)", 3), ("fused step and pinned snapshots (pytest -m gpu)", 2),
                        ("nvJPEG pipeline = CPU pipeline (pytest -m gpu)", 1),
                        ("2:4 inference kernel (pytest -m gpu)", 1)):
        assert checks[name]["detail"] == f"rehearsal: {count} GPU test(s) collected, not run (no CUDA)"
    assert checks["post-backward step ratio"]["ratio"] > 0
    assert set(checks["ImageFolder pipeline per core"]["img_per_s"]) == {"cpu", "pil"}  # nvJPEG needs CUDA
    assert sorted(p.name for p in out.iterdir()) == [
        "bench-resnet50-imagenet-90.json", "bench-wrn-cifar100-95.json", "checks.jsonl", "gpu_check.log",
        "mask_update.json", "torchrun-run-metrics.jsonl", "wrn-run-metrics.jsonl"]
    for name, batch, steps in (("bench-wrn-cifar100-95.json", 16, 3), ("bench-resnet50-imagenet-90.json", 4, 2)):
        result = json.loads((out / name).read_text())  # the rehearsal's toy sizes: the figures mean nothing
        assert result["device_type"] == "cpu" and (result["batch_size"], result["steps"]) == (batch, steps)
        assert result["ratio"] == pytest.approx(result["acdc_img_per_s"] / result["reference_img_per_s"])
    metrics = [json.loads(line) for line in (out / "torchrun-run-metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in metrics] == ["dense", "sparse", "dense", "sparse"]
    assert all(len(set(m["mask_checksums"])) == 1 for m in metrics if m["mask_checksums"])
    summary = done.stdout[done.stdout.index("REHEARSAL on the CPU at toy sizes: it tested"):]
    for target in ("<= 10 ms", ">= 9,000 img/s", ">= 2.8x", ">= 5,500 img/s", "ImageFolder pipeline",
                   "post-backward step: fused / previous path", "decode_jpeg / PIL, per core"):
        assert target in summary
    assert not list(tmp_path.glob("tmp*"))  # its temporary folder (and the runs in it) are gone
