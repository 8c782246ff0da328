"""Behaviour on CUDA: the global mask computed on the GPU is the CPU's with the exact count, and acdc's own training
step keeps pruned weights and their gradients exactly zero under bf16 autocast + channels_last + torch.compile
(unstructured and 2:4); a 2:4 ONNX export builds a sparse TensorRT engine. Marked ``gpu`` (left out of the default
run) and skipped without CUDA; `python bench/gpu_check.py` runs them on a GPU machine, where none may skip."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from cli_helpers import invoke

from acdc_cli.commands.bench import RepeatedBatch
from acdc_cli.config import load_settings
from acdc_cli.engine import ACDC
from acdc_cli.models import create
from acdc_cli.sparsity import masks as M
from acdc_cli.sparsity.sparsifier import Sparsifier
from acdc_cli.training import runtime
from acdc_cli.training.distributed import DistInfo
from acdc_cli.training.loop import build_optimizer, train_epoch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_global_mask_on_cuda_equals_the_cpu_mask_with_the_exact_count():
    """The global threshold over WRN-28-10's 36.5M weights: on the GPU the same mask as on the CPU, and exactly
    round(0.95 n) weights pruned (the figure of its time is bench/gpu_check.py's)."""
    torch.manual_seed(0)
    wrn = create("wrn-28-10", num_classes=100).cuda()
    weights = dict(Sparsifier(wrn, ["*"], [], "global", "unstructured").params)
    n = sum(w.numel() for w in weights.values())
    on_gpu = M.compute_masks(weights, 0.95)
    on_cpu = M.compute_masks({k: v.detach().cpu() for k, v in weights.items()}, 0.95)
    assert all(torch.equal(on_gpu[k].cpu(), on_cpu[k]) for k in on_gpu)
    assert sum(int((~m).sum()) for m in on_gpu.values()) == round(0.95 * n)


@pytest.mark.parametrize(("structure", "sparsity"), [("unstructured", 0.95), ("2:4", 0.5)])
def test_masks_stay_exact_under_bf16_channels_last_and_compile(structure, sparsity):
    """acdc's own step (prepare_model, train_epoch) with bf16 autocast, channels_last and torch.compile: after a
    compression and 20 steps the pruned weights and their gradients are exactly zero, the kept ones moved, a 2:4
    mask stays 2:4, the count is exact, the parameters are channels_last and the state-dict names plain."""
    cuda = torch.device("cuda")
    settings = load_settings(preset="wrn-cifar100-95", overrides=[
        "model.name=wrn-10-2", "runtime.compile=true", "runtime.amp='bf16'", "runtime.channels_last=true",
        f"sparsity.structure='{structure}'", f"sparsity.target={sparsity}"])
    torch.manual_seed(0)
    model = create("wrn-10-2", num_classes=100).to(cuda)
    net = runtime.prepare_model(model, settings, DistInfo(0, 1, 0, cuda))
    optimizer = build_optimizer(model, settings)
    sparsifier = ACDC.from_settings(settings, model, optimizer).sparsifier  # its step hooks apply these masks
    x = torch.randn(128, 3, 32, 32, device=cuda)
    y = torch.randint(0, 100, (128,), device=cuda)
    train_epoch(net, RepeatedBatch(x, y, 3), optimizer, settings, 0, cuda, None)  # dense, compiles
    sparsifier.compress(sparsity)
    masks = {k: v.clone() for k, v in sparsifier.masks.items()}
    stats = train_epoch(net, RepeatedBatch(x, y, 20), optimizer, settings, 0, cuda, None)
    params = dict(model.named_parameters())
    assert all(int(torch.count_nonzero(params[k].detach()[~m])) == 0 for k, m in masks.items())
    assert all(int(torch.count_nonzero(params[k].grad[~m])) == 0 for k, m in masks.items())
    assert sum(int(torch.count_nonzero(params[k].detach()[m])) for k, m in masks.items()) > 0
    if structure == "2:4":
        assert all(M.nm_valid(params[k].detach(), 2, 4) for k in masks)
    else:
        total = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in model.state_dict())
    assert stats["train_loss"] == stats["train_loss"]  # finite enough to compare with itself: not NaN


@pytest.mark.skipif(shutil.which("trtexec") is None, reason="needs TensorRT's trtexec")
def test_tensorrt_builds_a_sparse_engine_from_the_2_4_export(quickstart_24, tmp_path):
    """docs/files.md: `acdc prune --structure 2:4`, `acdc export -f onnx`, then `trtexec --sparsity=enable --fp16`
    builds an engine from the file."""
    pytest.importorskip("onnxruntime")
    pruned, _ = quickstart_24
    onnx = tmp_path / "model.onnx"
    assert invoke("export", pruned, "-f", "onnx", "-o", onnx).exit_code == 0
    done = subprocess.run(["trtexec", f"--onnx={onnx}", "--sparsity=enable", "--fp16",
                           f"--saveEngine={tmp_path / 'model.plan'}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert (tmp_path / "model.plan").stat().st_size > 0
