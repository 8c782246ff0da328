"""``acdc bench``: how fast a preset trains on this device, measured in one run.

Timed on synthetic data at the preset's batch and input size, in a compressed phase at the preset's target sparsity:

- the step, in three modes timed in alternating rounds (each mode ``steps`` steps per round; the median and the best
  of the rounds reported), so that a change in machine load hits all alike:
  the reference's step as the AC/DC reference code trains (``bench_reference``: fp32, NCHW, eager; every conv/linear
  weight re-masked before its forward, gradient-mask hooks, per-tensor SGD, the pruned weights re-masked after the
  step, two host syncs; on CUDA inside ``nn.DataParallel`` over one GPU), acdc's own step (``train.train_epoch``
  itself over a batch already on the device, with the network ``runtime.prepare_model`` makes: bf16 autocast,
  channels_last, torch.compile as the settings say; the engine's masks), and acdc's step at fp32/NCHW/eager. The
  headline ratio acdc / reference is the product of two factors: the step path (masking, optimizer, host syncs) and
  precision/layout/compile; where acdc's step already runs fp32/NCHW/eager (the CPU without compile) the middle mode
  is acdc's step itself and the second factor is 1;
- acdc's training epoch: the same step fed by the preset's GPU-resident loader (data + step + masks + metrics) over a
  split that ends in a short batch, which the loader drops as in training; then the validation pass (compiled when
  runtime.compile is on) over a split that ends in a short batch; and how many graphs torch.compile built during
  both (after warm-up: any is a recompilation that a run would also pay);
- the post-backward step alone (gradient mask + ``SGD(fused=True)``, the engine's hooks) against the previous path
  (gradient mask + foreach SGD + weight mask) and the single mask pass with foreach SGD between them, on the preset's
  model with synthetic gradients at the target sparsity, interleaved, medians in ms, and the shares of the saving
  that ``fused=True`` and the single mask pass account for;
- the global mask update (recompute masks from magnitudes, apply them, measure the mask change), in ms;
- the input pipeline alone: the preset's loader type on synthetic images (TensorLoader with the preset's
  augmentation; for ImageFolder presets, the real ImageFolder pipeline over ImageNet-sized JPEGs generated in a
  temporary folder, per core: no worker processes and one torch thread, from files to uint8 batches on the device,
  with data.decode as set and with PIL side by side, in interleaved passes whose medians are reported).

Every timing starts after warm-up steps (which also absorb torch.compile and cudnn autotuning) and, on CUDA, is
bracketed by CUDA events after a device synchronize.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from acdc_cli import data as data_mod
from acdc_cli import models
from acdc_cli.commands import bench_reference
from acdc_cli.config import Settings
from acdc_cli.data.tensor_loader import TensorLoader
from acdc_cli.engine import ACDC
from acdc_cli.errors import AcdcError
from acdc_cli.sections import MAX_BATCH_SIZE, MAX_BENCH_STEPS
from acdc_cli.sparsity.sparsifier import Sparsifier
from acdc_cli.training import evaluation, runtime
from acdc_cli.training.distributed import DistInfo, resolve_device
from acdc_cli.training.loop import build_optimizer, train_epoch
from acdc_cli.training.runtime import elapsed_seconds, interleaved_seconds

# classes of each dataset, for building the model without reading the dataset
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000, "synthetic": 10}


# datasets whose training loader is the GPU-resident TensorLoader; imagenet reads an ImageFolder tree
TENSOR_DATASETS = {"digits", "cifar10", "cifar100", "synthetic"}


# the digits builder never augments (8x8 digits do not survive a 4-pixel crop)
UNAUGMENTED = {"digits"}


MASK_UPDATE_REPEATS = 5


# rounds of the interleaved step modes (min and median reported)
STEP_ROUNDS = 5


MAX_ROUNDS = 1000


# post-backward steps per timed pass, and interleaved passes per path (medians reported)
POST_BACKWARD_STEPS = 10


POST_BACKWARD_REPEATS = 5


# batches of JPEGs generated for the ImageFolder pipeline: writing each costs a few ms, so not one per timed step
IMAGEFOLDER_BATCHES = 4


IMAGEFOLDER_VAL_IMAGES = 4


# timed passes per ImageFolder decoder, interleaved so that a change in machine load hits both alike
PIPELINE_REPEATS = 3


IMAGEFOLDER_KINDS = {
    "cpu": "torchvision decode_jpeg + transforms.v2",
    "gpu": "nvJPEG batch decode + crop on the device",
    "pil": "PIL decode + resize",
}


# the random input batch lives on the device (8 GiB: ~14,000 ImageNet-sized float32 images), and the input pipeline
# is timed over steps x batch uint8 images in memory
MAX_BATCH_BYTES = 8 * 2**30


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return str(device)


class RepeatedBatch:
    """A loader that yields the same on-device batch ``steps`` times: the step alone, no input pipeline."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, steps: int):
        self.images, self.labels, self.steps = images, labels, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps):
            yield self.images, self.labels


def _build_model(settings: Settings, device: torch.device) -> nn.Module:
    entry, _ = models.lookup(settings.model.name)
    torch.manual_seed(settings.runtime.seed)
    model = models.create(settings.model.name, num_classes=NUM_CLASSES[settings.data.name],
                          in_channels=entry.in_channels, dropout=settings.model.dropout)
    return model.to(device)


def _masks_at_target(model: nn.Module, settings: Settings) -> Sparsifier:
    sp = settings.sparsity
    sparsifier = Sparsifier(model, sp.include, sp.exclude, sp.scope, sp.structure)
    sparsifier.compress(sp.target)
    return sparsifier


def _acdc_step(settings: Settings, images: torch.Tensor, labels: torch.Tensor,
               device: torch.device) -> tuple[SimpleNamespace, Callable[[int], None]]:
    """acdc's step as ``acdc train`` runs it (``train_epoch`` with the engine's hooks, masks at the target sparsity,
    whatever the plan) and a function running ``count`` steps of it over the same on-device batch."""
    model = _build_model(settings, device)
    net = runtime.prepare_model(model, settings, DistInfo(0, 1, 0, device))
    optimizer = build_optimizer(model, settings)
    sparsifier = ACDC.from_settings(settings, model, optimizer).sparsifier
    sparsifier.compress(settings.sparsity.target)
    scaler = runtime.grad_scaler(device, settings.runtime.amp)
    parts = SimpleNamespace(net=net, model=model, optimizer=optimizer, sparsifier=sparsifier, scaler=scaler)
    return parts, lambda count: train_epoch(net, RepeatedBatch(images, labels, count), optimizer, settings,
                                            device=device, scaler=scaler)


def fp32_eager(settings: Settings) -> Settings:
    """The settings with acdc's precision, layout and compile choices off: acdc's masking path and optimizer at the
    reference's numerics, the middle point of the breakdown."""
    plain = settings.model_copy(deep=True)
    plain.runtime.amp, plain.runtime.channels_last, plain.runtime.compile = "off", False, False
    return plain


def runs_fp32_eager(settings: Settings, device: torch.device) -> bool:
    rt = settings.runtime
    return runtime.precision(device, rt.amp) == "fp32" and not (rt.channels_last and device.type == "cuda") \
        and not rt.compile


def rates(seconds: list[float], images: int) -> tuple[float, float]:
    """(median img/s, best img/s) of passes of ``images`` images lasting ``seconds`` each."""
    return images / statistics.median(seconds), images / min(seconds)


def step_breakdown(reference: float, plain: float, acdc: float) -> dict[str, float]:
    """The ratio acdc / reference as the product of its two factors: the step path (masking, optimizer, host syncs:
    acdc at fp32/NCHW/eager over the reference) and precision/layout/compile (acdc over itself at fp32/NCHW/eager)."""
    return {"ratio": acdc / reference, "ratio_step_path": plain / reference,
            "ratio_precision_layout_compile": acdc / plain}


def _tensor_loader(settings: Settings, batch_size: int, images: int, device: torch.device,
                   train: bool = True) -> tuple[Any, str]:
    """The preset's GPU-resident training loader (or, ``train=False``, its validation loader) over synthetic images,
    and a name for its kind."""
    name = settings.data.name
    entry, _ = models.lookup(settings.model.name)
    c, s = entry.in_channels, entry.input_size
    g = torch.Generator().manual_seed(settings.runtime.seed + (0 if train else 1))
    pixels = torch.randint(0, 256, (images, c, s, s), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, NUM_CLASSES[name], (images,), generator=g)
    augment = train and settings.data.augment and name not in UNAUGMENTED
    loader = TensorLoader(pixels, targets, batch_size, (0.5,) * c, (0.25,) * c, shuffle=train, drop_last=train,
                          augment=augment, seed=settings.runtime.seed, device=device)
    return loader, "TensorLoader (on device" + (", crop + flip)" if augment else ")")


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def post_backward_ms(settings: Settings, device: torch.device, steps: int = POST_BACKWARD_STEPS,
                     repeats: int = POST_BACKWARD_REPEATS) -> dict[str, Any]:
    """ms per post-backward step of acdc's path, of the previous path and of the path between them, on the preset's
    model, with acdc's SGD kernel.

    acdc's path is ``optimizer.step()`` of ``train.build_optimizer`` with the engine's hooks: one gradient-mask pass,
    then fused SGD (foreach where there is no fused kernel), no weight mask. The previous path is what the hooks did
    before: gradient mask, foreach SGD, weight mask. Between them, the single mask pass with foreach SGD (the engine's
    hooks on a foreach optimizer): previous - single is what dropping the weight mask saves, single - acdc what
    ``fused=True`` itself saves. All update the same weights (with the layout training gives them) from the same
    synthetic gradients, with momentum buffers already built; passes interleaved, medians reported."""
    model = _build_model(settings, device)
    if settings.runtime.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3  # like p: the same memory format
    optimizer = build_optimizer(model, settings)
    engine = ACDC.from_settings(settings, model, optimizer)
    engine.sparsifier.compress(settings.sparsity.target)
    sparsifier = engine.sparsifier
    fused = bool(optimizer.defaults.get("fused"))
    paths: dict[str, Callable[[int], None]] = {"acdc": lambda count: [optimizer.step() for _ in range(count)]}
    if fused:
        single = build_optimizer(model, settings, kernel="foreach")
        ACDC.from_settings(settings, model, single).sparsifier.compress(settings.sparsity.target)  # its own hooks
        paths["single_pass"] = lambda count: [single.step() for _ in range(count)]
    previous = build_optimizer(model, settings, kernel="foreach")  # no engine hooks: the steps below mask

    def previous_steps(count: int) -> None:
        for _ in range(count):
            sparsifier.apply_to_grads()
            previous.step()
            sparsifier.apply_to_weights()

    paths["previous"] = previous_steps
    # one step each first: momentum buffers, and the masking of the pruned ones
    seconds = interleaved_seconds(paths, steps, 1, repeats, device)
    ms = {name: 1000 * statistics.median(measured) / steps for name, measured in seconds.items()}
    ms.setdefault("single_pass", ms["acdc"])
    return {"post_backward_kernel": "fused" if fused else "foreach", "post_backward_ms": ms["acdc"],
            "post_backward_previous_ms": ms["previous"], "post_backward_single_pass_ms": ms["single_pass"],
            **saving_split(ms["previous"], ms["single_pass"], ms["acdc"])}


def saving_split(previous: float, single_pass: float, acdc: float) -> dict[str, float | None]:
    """The post-backward ratio, and the shares of the saving (previous - acdc) that ``fused=True`` itself and the
    single mask pass account for (None when there is no saving to share)."""
    saving = previous - acdc
    fused = (single_pass - acdc) / saving if saving > 0 else None
    return {"post_backward_ratio": previous / acdc, "post_backward_fused_share": fused,
            "post_backward_mask_pass_share": None if fused is None else 1 - fused}


def _imagefolder_loader(settings: Settings, batch_size: int, device: torch.device, workdir: Path,
                        decode: str) -> tuple[Any, str]:
    """The ImageFolder training loader over the tree in ``workdir`` with one decoder and no worker processes."""
    local = settings.model_copy(deep=True)
    local.data.dir = workdir
    local.data.val_size = IMAGEFOLDER_VAL_IMAGES
    local.data.batch_size = batch_size
    local.data.num_workers = 0
    local.data.decode = decode
    bundle = data_mod.build(local, device)
    return bundle.train, f"ImageFolder, data.decode={decode} ({IMAGEFOLDER_KINDS[decode]}), one core"


def measure_pipeline(settings: Settings, batch_size: int, images: int, device: torch.device,
                     workdir: Path) -> tuple[Any, str, float, float | None]:
    """(the preset's training loader over ``images`` synthetic images, its kind, its img/s, and for ImageFolder
    presets the img/s of the PIL decoder measured beside it, else None)."""
    name = settings.data.name
    if name in TENSOR_DATASETS:
        loader, kind = _tensor_loader(settings, batch_size, images, device)
        return loader, kind, pipeline_rate(loader, device), None
    if name != "imagenet":
        raise AcdcError(f"acdc bench has no input pipeline for dataset '{name}'")
    write_jpeg_tree(workdir, train_images=images + IMAGEFOLDER_VAL_IMAGES, test_images=4)
    loader, kind = _imagefolder_loader(settings, batch_size, device, workdir, settings.data.decode)
    pil_loader, _ = _imagefolder_loader(settings, batch_size, device, workdir, "pil")
    rate, pil_rate = per_core_rates([loader, pil_loader], device)
    return loader, kind, rate, pil_rate


def write_jpeg_tree(root: Path, train_images: int, test_images: int, classes: int = 2, seed: int = 0) -> None:
    """An ImageFolder tree (train/ and val/) of 500x375 JPEGs, ImageNet's typical size. The pictures are smooth
    (upsampled noise) so that they compress, and decode, like photographs rather than like noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_images), ("val", test_images)):
        for index in range(count):
            folder = root / split / f"class{index % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            picture = Image.fromarray(coarse).resize((500, 375), Image.BILINEAR)
            picture.save(folder / f"img{index:05d}.JPEG", quality=90)


def _timed_pass(batches: Callable[[], Any], device: torch.device) -> float:
    """img/s of one pass over ``batches()``."""
    counted: list[int] = []
    seconds = elapsed_seconds(lambda: counted.append(sum(batch[1].numel() for batch in batches())), device)
    return counted[0] / seconds


def pipeline_rate(loader: Any, device: torch.device) -> float:
    """img/s of one pass over the loader after a warm-up pass (workers started, caches warm)."""
    _timed_pass(lambda: loader, device)
    return _timed_pass(lambda: loader, device)


def per_core_rates(loaders: list[Any], device: torch.device, repeats: int = PIPELINE_REPEATS) -> list[float]:
    """Median img/s of each ImageFolder loader over ``repeats`` passes on one torch thread, the loaders' passes
    interleaved (after one warm-up pass each: page cache, decoder set-up). A pass ends with uint8 batches on the
    device: normalization is the training device's work (on a GPU, a negligible one), not the decoders'."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        passes = [lambda loader=loader: loader.iterate(normalized=False) for loader in loaders]
        for one_pass in passes:
            _timed_pass(one_pass, device)
        rates: list[list[float]] = [[] for _ in loaders]
        for _ in range(repeats):
            for one_pass, measured in zip(passes, rates):
                measured.append(_timed_pass(one_pass, device))
    finally:
        torch.set_num_threads(threads)
    return [statistics.median(measured) for measured in rates]


def run_bench(settings: Settings, *, steps: int = 50, warmup: int = 10, rounds: int = STEP_ROUNDS,
              batch_size: int | None = None, status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure everything ``acdc bench`` reports; returns one flat dict (the JSON the CLI prints)."""
    if not 1 <= steps <= MAX_BENCH_STEPS or not 0 <= warmup <= MAX_BENCH_STEPS:
        raise AcdcError(f"--steps must be in [1, {MAX_BENCH_STEPS}] and --warmup in [0, {MAX_BENCH_STEPS}] "
                        f"(got {steps}, {warmup})")
    if not 1 <= rounds <= MAX_ROUNDS:
        raise AcdcError(f"--rounds must be in [1, {MAX_ROUNDS}], got {rounds}")
    if settings.data.name not in NUM_CLASSES:
        raise AcdcError(f"acdc bench does not know dataset '{settings.data.name}'")
    say = status or (lambda message: None)
    device = resolve_device(settings.runtime.device)
    batch = settings.data.batch_size if batch_size is None else batch_size  # 0 is refused, not read as "unset"
    if not 1 <= batch <= MAX_BATCH_SIZE:
        raise AcdcError(f"--batch-size must be in [1, {MAX_BATCH_SIZE}], got {batch}")
    entry, _ = models.lookup(settings.model.name)
    c, s = entry.in_channels, entry.input_size
    if batch * c * s * s * 4 > MAX_BATCH_BYTES:
        raise AcdcError(f"--batch-size {batch}: a batch of {c}x{s}x{s} float32 images for {settings.model.name} "
                        f"exceeds the {MAX_BATCH_BYTES // 2**30} GiB acdc bench allocates; lower it")
    if settings.data.name in TENSOR_DATASETS and batch * steps * c * s * s > MAX_BATCH_BYTES:
        raise AcdcError(f"--steps {steps} x --batch-size {batch}: the input pipeline's {batch * steps:,} uint8 images "
                        f"exceed the {MAX_BATCH_BYTES // 2**30} GiB acdc bench allocates; lower either")
    g = torch.Generator().manual_seed(settings.runtime.seed)
    images = torch.randn(batch, c, s, s, generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES[settings.data.name], (batch,), generator=g).to(device)
    rt = settings.runtime
    on_cuda = device.type == "cuda"

    graphs_at_start = compiled_graphs()
    say("step modes: reference, acdc" + (" (torch.compile warm-up can take a minute)" if rt.compile else ""))
    reference_model = _build_model(settings, device)
    reference_step = bench_reference.ReferenceStep(
        reference_model, _masks_at_target(reference_model, settings).masks or {}, settings, device)
    parts, acdc_steps = _acdc_step(settings, images, labels, device)
    modes = {"reference": lambda count: [reference_step(images, labels) for _ in range(count)], "acdc": acdc_steps}
    plain_is_acdc = runs_fp32_eager(settings, device)
    if not plain_is_acdc:
        modes["fp32_eager"] = _acdc_step(fp32_eager(settings), images, labels, device)[1]
    autotune = on_cuda and not rt.deterministic
    flags = {"reference": False, "acdc": autotune, "fp32_eager": autotune}  # the reference leaves autotuning off

    def cudnn(name: str) -> Callable[[], None]:
        return lambda: setattr(torch.backends.cudnn, "benchmark", flags[name]) if on_cuda else None

    seconds = interleaved_seconds(modes, steps, warmup, rounds, device, {name: cudnn(name) for name in modes})
    seconds.setdefault("fp32_eager", seconds["acdc"])
    median, best = {}, {}
    for name, measured in seconds.items():
        median[name], best[name] = rates(measured, steps * batch)
    net, model, optimizer, sparsifier, scaler = (parts.net, parts.model, parts.optimizer, parts.sparsifier,
                                                 parts.scaler)

    say("post-backward step: gradient mask + fused SGD against gradient mask + foreach SGD + weight mask")
    post_backward = post_backward_ms(settings, device)
    if on_cuda:
        torch.cuda.empty_cache()

    say("global mask update")
    mask_ms = []
    for _ in range(MASK_UPDATE_REPEATS + 1):
        sparsifier.decompress()
        mask_ms.append(1000 * elapsed_seconds(lambda: sparsifier.compress(settings.sparsity.target), device))
    mask_update_ms = statistics.median(mask_ms[1:])  # the first includes one-time allocations

    say("input pipeline")
    with tempfile.TemporaryDirectory(prefix="acdc-bench-") as workdir:
        tensor_data = settings.data.name in TENSOR_DATASETS
        # a split that ends in a short batch, as real ones do: the training loader drops it
        count = batch * steps + batch // 2 if tensor_data else batch * min(steps, IMAGEFOLDER_BATCHES)
        loader, pipeline_kind, pipeline, pipeline_pil = measure_pipeline(settings, batch, count, device, Path(workdir))
        epoch = eval_rate = epoch_graphs = None
        if tensor_data:
            say("training epoch (input pipeline + step + masks + metrics) and validation pass")
            eval_batch = settings.data.eval_batch_size
            val_loader, _ = _tensor_loader(settings, eval_batch, eval_batch + max(eval_batch // 2, 1), device,
                                           train=False)
            eval_net = runtime.prepare_eval_model(model, settings)
            info = DistInfo(0, 1, 0, device)
            evaluation.evaluate_sharded(eval_net, val_loader, device, rt.amp, info)  # warm-up: compiles both batch sizes
            graphs = compiled_graphs()
            epoch_seconds = elapsed_seconds(
                lambda: train_epoch(net, loader, optimizer, settings, device=device, scaler=scaler), device)
            epoch = loader.num_samples / epoch_seconds
            eval_rate = val_loader.num_samples / elapsed_seconds(
                lambda: evaluation.evaluate_sharded(eval_net, val_loader, device, rt.amp, info), device)
            epoch_graphs = compiled_graphs() - graphs

    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "preset": settings.preset,
        "model": settings.model.name,
        "dataset": settings.data.name,
        "batch_size": batch,
        "input_shape": [c, s, s],
        "steps": steps,
        "warmup": warmup,
        "sparsity": settings.sparsity.target,
        "structure": settings.sparsity.structure,
        "acdc_amp": runtime.precision(device, rt.amp) != "fp32",
        "acdc_precision": runtime.precision(device, rt.amp),
        "acdc_channels_last": rt.channels_last and on_cuda,
        "acdc_compile": rt.compile,
        "rounds": rounds,
        "reference_elements": bench_reference.elements(device),
        "reference_img_per_s": median["reference"],
        "reference_img_per_s_best": best["reference"],
        "fp32_eager_img_per_s": median["fp32_eager"],
        "fp32_eager_img_per_s_best": best["fp32_eager"],
        "fp32_eager_is_acdc": plain_is_acdc,
        "acdc_img_per_s": median["acdc"],
        "acdc_img_per_s_best": best["acdc"],
        **step_breakdown(median["reference"], median["fp32_eager"], median["acdc"]),
        "ratio_best": best["acdc"] / best["reference"],
        "acdc_epoch_img_per_s": epoch,
        "acdc_eval_img_per_s": eval_rate,
        "compile_graphs": compiled_graphs() - graphs_at_start if rt.compile else None,
        "epoch_recompiles": epoch_graphs if rt.compile else None,
        **post_backward,
        "mask_update_ms": mask_update_ms,
        "mask_weights": sparsifier.numel,
        "pipeline": pipeline_kind,
        "pipeline_img_per_s": pipeline,
        "pipeline_pil_img_per_s": pipeline_pil,
        "pipeline_ratio": pipeline / pipeline_pil if pipeline_pil else None,
    }


def render(result: dict[str, Any], console: Console) -> None:
    """The bench result as a table, with how it was measured."""
    acdc_mode = ", ".join(
        label for key, label in (("acdc_amp", f"{result['acdc_precision']} autocast"),
                                 ("acdc_channels_last", "channels_last"),
                                 ("acdc_compile", "torch.compile")) if result[key]
    ) or "fp32, eager"
    table = Table(title=escape(f"acdc bench: {result['preset'] or result['model']} on {result['device']}"))
    table.add_column("measurement")
    table.add_column("rate", justify="right")
    def rate(key: str) -> str:
        return f"{result[key]:,.0f} img/s (best {result[key + '_best']:,.0f})"

    table.add_row("reference step, as the AC/DC reference trains (elements below)", rate("reference_img_per_s"))
    table.add_row(f"acdc step ({acdc_mode}, gradient mask + {result['post_backward_kernel']} SGD)",
                  rate("acdc_img_per_s"))
    table.add_row("ratio acdc / reference (medians; from the best rounds)",
                  f"{result['ratio']:.2f}x ({result['ratio_best']:.2f}x)", style="bold")
    plain = "acdc step itself" if result["fp32_eager_is_acdc"] else rate("fp32_eager_img_per_s")
    table.add_row("  acdc step at fp32, NCHW, eager", plain)
    table.add_row("  of it: step path (masking, optimizer, host syncs): acdc fp32 eager / reference",
                  f"{result['ratio_step_path']:.2f}x")
    table.add_row("  of it: precision, layout, compile: acdc / acdc fp32 eager",
                  f"{result['ratio_precision_layout_compile']:.2f}x")
    if result["acdc_epoch_img_per_s"] is not None:
        table.add_row("acdc training epoch (loader + step + masks + metrics; short last batch dropped)",
                      f"{result['acdc_epoch_img_per_s']:,.0f} img/s")
        table.add_row("acdc validation pass (short last batch)", f"{result['acdc_eval_img_per_s']:,.0f} img/s")
    if result["compile_graphs"] is not None:
        recompiles = result["epoch_recompiles"]
        table.add_row("torch.compile graphs built (of them during the timed epoch and validation)",
                      f"{result['compile_graphs']} ({'-' if recompiles is None else recompiles})")
    table.add_row(f"post-backward step: gradient mask + {result['post_backward_kernel']} SGD",
                  f"{result['post_backward_ms']:.3f} ms")
    table.add_row("post-backward step before: gradient mask + foreach SGD + weight mask",
                  f"{result['post_backward_previous_ms']:.3f} ms")
    table.add_row("post-backward step, single mask pass: gradient mask + foreach SGD",
                  f"{result['post_backward_single_pass_ms']:.3f} ms")
    table.add_row("ratio previous / acdc post-backward step", f"{result['post_backward_ratio']:.2f}x", style="bold")
    if result["post_backward_fused_share"] is not None:
        table.add_row("  of the saving: fused=True itself / the single mask pass",
                      f"{100 * result['post_backward_fused_share']:.0f} % / "
                      f"{100 * result['post_backward_mask_pass_share']:.0f} %")
    table.add_row(f"global mask update ({result['mask_weights']:,} weights, {result['structure']})",
                  f"{result['mask_update_ms']:.2f} ms")
    table.add_row(f"input pipeline: {result['pipeline']}", f"{result['pipeline_img_per_s']:,.0f} img/s")
    if result["pipeline_pil_img_per_s"] is not None:
        table.add_row(f"input pipeline: ImageFolder, data.decode=pil ({IMAGEFOLDER_KINDS['pil']}), one core",
                      f"{result['pipeline_pil_img_per_s']:,.0f} img/s")
        table.add_row("ratio pipeline / PIL pipeline, per core", f"{result['pipeline_ratio']:.2f}x", style="bold")
    console.print(table)
    console.print("reference step: " + "; ".join(result["reference_elements"]), highlight=False, markup=False)
    console.print(
        f"{result['model']} at batch {result['batch_size']}, input {'x'.join(map(str, result['input_shape']))}, "
        f"{100 * result['sparsity']:.0f} % sparse; {result['steps']} timed steps per mode in each of "
        f"{result['rounds']} alternating rounds, after {result['warmup']} warm-up steps; torch {result['torch']}",
        highlight=False,
        markup=False,
    )
