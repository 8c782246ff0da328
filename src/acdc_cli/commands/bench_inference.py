"""``acdc bench --inference FILE``: inference throughput of the sparse model against the dense one, side by side in one
run, on this device.

- dense: the same network with every conv/linear weight dense (each pruned zero replaced by a small random value),
  run with the same kernels;
- sparse: the file's weights as they are; on CUDA, every Linear whose weight is 2:4 along its input features runs
  ``torch.sparse.to_sparse_semi_structured``'s 2:4 sparse kernels, in fp16 (both models then run in fp16, the
  precision those kernels take). PyTorch has no sparse conv kernel, and none at all on the CPU, so there those layers
  run dense kernels over weights with zeros, and the table says so per layer;
- an ``.onnx`` file runs on ONNX Runtime's CPU provider, dense and sparse alike (its CPU kernels do not skip zeros).

Each (model, batch size) is timed ``repeats`` times after ``warmup`` untimed passes, dense and sparse interleaved (which
goes first alternates) so that drifting machine load hits both alike; the medians are reported. The verdict comes from
the measured noise, not a fixed band: each repeat gives one paired ratio (dense time / sparse time), and a
distribution-free confidence interval for their median (order statistics, as in the sign test) says "faster" when it
lies above 1, "slower" below 1, and "same" when it holds 1.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from acdc_cli.data.bundle import model_input
from acdc_cli.errors import AcdcError
from acdc_cli.files.onnx_file import OnnxRuntimeModule, session
from acdc_cli.files.open import CHECKPOINT, EXPORT, ONNX, OpenedFile, open_any
from acdc_cli.schemas import BENCH_INFERENCE_SCHEMA as SCHEMA
from acdc_cli.sections import MAX_BATCH_SIZE, MAX_BENCH_STEPS
from acdc_cli.sparsity import formats
from acdc_cli.training.distributed import resolve_device
from acdc_cli.training.runtime import interleaved_seconds

BATCH_SIZES = (1, 64)


# one batch of input images: 1 GiB of fp32 (1,783 ImageNet images), before the activations of the model it feeds
MAX_INPUT_ELEMENTS = 2**28


# two-sided confidence of the interval around the median paired ratio that the verdict reads
CONFIDENCE = 0.95


def run_inference_bench(path: Path | str, device: str | None = None, repeats: int = 20, warmup: int = 3,
                        batch_sizes: tuple[int, ...] = BATCH_SIZES,
                        status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Dense vs sparse images/s of a checkpoint, safetensors export or ONNX export, per batch size (see module doc)."""
    if not 1 <= repeats <= MAX_BENCH_STEPS or not 0 <= warmup <= MAX_BENCH_STEPS:
        raise AcdcError(f"--steps must be at least 1 and --warmup at least 0, both at most {MAX_BENCH_STEPS:,}")
    bad = [b for b in batch_sizes if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH_SIZE]
    if bad:
        raise AcdcError(f"--batch-size {bad[0]!r}: expected a whole number 1 to {MAX_BATCH_SIZE:,}")
    path = Path(path)
    say = status or (lambda message: None)
    opened = open_any(path, (CHECKPOINT, EXPORT, ONNX))
    if opened.kind == ONNX:
        if device not in (None, "cpu"):
            raise AcdcError("an ONNX file is timed on ONNX Runtime's CPU provider: drop --device")
        bench = _OnnxBench(opened)
    else:
        bench = _TorchBench(opened, resolve_device(device or "auto"))
    largest = max(batch_sizes) * math.prod(bench.input_shape)
    if largest > MAX_INPUT_ELEMENTS:
        raise AcdcError(f"a batch of {max(batch_sizes)} images of {'x'.join(map(str, bench.input_shape))} is "
                        f"{largest:,} values, above the {MAX_INPUT_ELEMENTS:,} (1 GiB of fp32) this benchmark "
                        "allocates; lower --batch-size")
    results = []
    for batch in batch_sizes:
        say(f"batch {batch}")
        images = torch.randn(batch, *bench.input_shape, generator=torch.Generator().manual_seed(batch))
        dense_times, sparse_times = bench.time(images, repeats, warmup)
        results.append(timing_row(batch, dense_times, sparse_times))
    sparse_layers = [layer["name"] for layer in bench.layers if layer["sparse_kernel"]]
    numel = sum(math.prod(layer["shape"]) for layer in bench.layers)
    kept = sum(round(math.prod(layer["shape"]) * (1 - layer["sparsity"])) for layer in bench.layers)
    return {
        "schema": SCHEMA,
        "file": str(path),
        "kind": bench.kind,
        "arch": bench.arch,
        "runtime": bench.runtime,
        "device": bench.device_name,
        "threads": bench.threads,
        "precision": bench.precision,
        "input_shape": list(bench.input_shape),
        "repeats": repeats,
        "warmup": warmup,
        "sparsity": 1.0 - kept / max(numel, 1),
        "results": results,
        "layers": bench.layers,
        "sparse_layers": len(sparse_layers),
        "max_abs_diff": bench.max_abs_diff,
        "note": bench.note(sparse_layers),
    }


def _densified(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``value`` with each zero replaced by a small random non-zero: the dense counterpart of a sparse weight."""
    scale = float(value.abs().max()) or 1.0
    fill = (torch.rand(value.shape, generator=generator) * 0.5 + 0.5) * scale * 1e-2
    return torch.where(value == 0, fill.to(value.dtype), value)


def _layer_row(name: str, kind: str, value: torch.Tensor, sparse_kernel: bool, note: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": kind,
        "shape": list(value.shape),
        "sparsity": float((value == 0).sum()) / max(value.numel(), 1),
        "nm_valid": formats.nm_check(value, 2, 4),
        "sparse_kernel": sparse_kernel,
        "note": note,
    }


class _TorchBench:
    """A checkpoint or safetensors export, timed with PyTorch."""

    runtime = "pytorch"

    def __init__(self, opened: OpenedFile, device: torch.device) -> None:
        self.kind = opened.kind
        sparse = opened.model().eval()  # refuses a file whose arch / model_kwargs do not build a model
        self.arch = str(opened.arch)
        channels, side = model_input(self.arch, opened.model_kwargs, None)
        self.input_shape = (channels, side, side)
        self.device = device
        self.device_name = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        self.threads = torch.get_num_threads()
        # 2:4 sparse kernels take fp16/bf16: on CUDA both models run in fp16 so that only the kernels differ
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.precision = "fp16" if self.dtype == torch.float16 else "fp32"
        generator = torch.Generator().manual_seed(0)
        dense = copy.deepcopy(sparse)
        with torch.no_grad():
            for module in dense.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                    module.weight.copy_(_densified(module.weight, generator))
        self.dense = dense.to(device, self.dtype)
        self.sparse = sparse.to(device, self.dtype)
        reference = copy.deepcopy(self.sparse)
        self.layers = self._use_sparse_kernels()
        probe = torch.randn(8, *self.input_shape, generator=generator).to(device, self.dtype)
        with torch.inference_mode():
            self.max_abs_diff = float((self.sparse(probe).float() - reference(probe).float()).abs().max())

    def _use_sparse_kernels(self) -> list[dict[str, Any]]:
        """Swap every 2:4 Linear weight for a semi-structured sparse tensor where PyTorch can run it; one row per
        conv/linear layer saying what ran."""
        rows = []
        for name, module in self.sparse.named_modules():
            if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                continue
            weight = module.weight.detach()
            kind = type(module).__name__
            if isinstance(module, nn.Linear):
                ran, note = self._semi_structured(module, weight)
            elif self.device.type != "cuda":
                ran, note = False, f"dense kernel: PyTorch has no sparse conv kernel on {self.device.type}"
            else:
                ran, note = False, "dense kernel: PyTorch's 2:4 kernels cover Linear layers only"
            rows.append(_layer_row(name, kind, weight.float().cpu(), ran, note))
        return rows

    def _semi_structured(self, module: nn.Linear, weight: torch.Tensor) -> tuple[bool, str]:
        if self.device.type != "cuda":
            return False, f"dense kernel: 2:4 sparse kernels need CUDA, this is {self.device.type}"
        if torch.cuda.get_device_capability(self.device) < (8, 0):
            return False, "dense kernel: 2:4 sparse kernels need compute capability 8.0 or newer"
        if formats.nm_check(weight.float().cpu(), 2, 4) is not True:
            return False, "dense kernel: the weight is not 2:4 along its input features"
        from torch.sparse import to_sparse_semi_structured

        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(weight.contiguous()), requires_grad=False)
            with torch.inference_mode():
                module(torch.zeros(1, weight.shape[1], device=self.device, dtype=self.dtype))
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            module.weight = nn.Parameter(weight, requires_grad=False)
            return False, f"dense kernel: PyTorch refused 2:4 for this layer ({_first_line(exc)})"
        return True, f"2:4 sparse kernel ({type(module.weight).__name__})"

    def time(self, images: torch.Tensor, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
        images = images.to(self.device, self.dtype)
        with torch.inference_mode():
            return interleaved(self.dense, self.sparse, images, repeats, warmup, self.device)

    def note(self, sparse_layers: list[str]) -> str | None:
        if sparse_layers:
            return None
        return (f"no layer ran a sparse kernel on {self.device.type}: the sparse model ran the same dense kernels "
                "over weights with zeros, so any difference is not from sparsity")


class _OnnxBench:
    """An ONNX export, timed with ONNX Runtime's CPU provider."""

    kind = "onnx"
    runtime = "onnxruntime"
    precision = "fp32"

    def __init__(self, opened: OpenedFile) -> None:
        from onnx import numpy_helper

        proto = opened.proto
        self.arch = str(opened.arch)
        self.threads = torch.get_num_threads()  # as many as PyTorch would use, set explicitly for both sessions
        self.device_name = "cpu (onnxruntime)"
        shape = proto.graph.input[0].type.tensor_type.shape.dim
        self.input_shape = tuple(int(d.dim_value) for d in shape[1:])
        consumers = {node.input[1]: node.op_type for node in proto.graph.node
                     if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1}
        generator = torch.Generator().manual_seed(0)
        self.layers = []
        dense_proto = copy.deepcopy(proto)
        # sparse initializers (ONNX Runtime densifies them when it loads the file) become dense ones here too
        sparse_names = [sparse.values.name for sparse in dense_proto.graph.sparse_initializer]
        dense_proto.graph.initializer.extend(numpy_helper.from_array(opened.weights[name].numpy(), name)
                                             for name in sparse_names)
        del dense_proto.graph.sparse_initializer[:]
        for init in dense_proto.graph.initializer:
            if init.name not in consumers:
                continue
            value = opened.weights[init.name]
            self.layers.append(_layer_row(init.name, consumers[init.name], value, False,
                                          "dense kernel: ONNX Runtime's CPU kernels do not skip zeros"
                                          + (" (its sparse initializer is densified at load)"
                                             if init.name in sparse_names else "")))
            init.CopyFrom(numpy_helper.from_array(_densified(value, generator).numpy(), init.name))
        self.sparse = opened.runtime(self.threads)
        self.dense = OnnxRuntimeModule(session(dense_proto.SerializeToString(), self.threads))
        self.max_abs_diff = None  # both run the same kernels

    def time(self, images: torch.Tensor, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
        return interleaved(self.dense, self.sparse, images, repeats, warmup, torch.device("cpu"))

    def note(self, sparse_layers: list[str]) -> str:
        return ("ONNX Runtime's CPU provider runs Conv and Gemm densely: a sparse file is smaller, not faster, here; "
                "TensorRT with --sparsity=enable is the runtime that uses 2:4")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else exc.__class__.__name__


def interleaved(dense: Callable[[torch.Tensor], Any], sparse: Callable[[torch.Tensor], Any], images: torch.Tensor,
                repeats: int, warmup: int, device: torch.device) -> tuple[list[float], list[float]]:
    """(dense, sparse) seconds of ``repeats`` passes each after ``warmup`` untimed ones (dense and sparse taking
    turns); each repeat times both, the one that goes first alternating (runtime.interleaved_seconds' rounds), so
    that neither always runs on the caches the other warmed."""
    # the warm-up alternates pass by pass here (interleaved_seconds' warm-up runs each mode's passes in one go)
    for _ in range(warmup):
        dense(images)
        sparse(images)

    def passes(model: Callable[[torch.Tensor], Any]) -> Callable[[int], None]:
        def run(count: int) -> None:
            for _ in range(count):
                model(images)
        return run

    seconds = interleaved_seconds({"dense": passes(dense), "sparse": passes(sparse)}, 1, 0, repeats, device)
    return seconds["dense"], seconds["sparse"]


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(low, high, coverage): a distribution-free confidence interval for the median of ``values`` from their order
    statistics, ``[v(k), v(n+1-k)]`` with the largest k whose coverage ``1 - 2 P(Binomial(n, 1/2) < k)`` is at least
    ``confidence``; with too few values for that (fewer than 6 at 95 %) the whole range, with its own coverage."""
    ordered = sorted(values)
    n = len(ordered)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


def timing_row(batch: int, dense_times: list[float], sparse_times: list[float]) -> dict[str, Any]:
    """One batch size's figures: medians, the paired ratios' median and confidence interval, and the verdict."""
    dense_s, sparse_s = statistics.median(dense_times), statistics.median(sparse_times)
    paired = [d / s for d, s in zip(dense_times, sparse_times)]  # sparse speed over dense, per repeat
    low, high, coverage = median_interval(paired)
    return {
        "batch_size": batch,
        "dense_ms": 1000 * dense_s,
        "sparse_ms": 1000 * sparse_s,
        "dense_images_per_s": batch / dense_s,
        "sparse_images_per_s": batch / sparse_s,
        "ratio": dense_s / sparse_s,
        "paired_ratio": statistics.median(paired),
        "ratio_low": low,
        "ratio_high": high,
        "confidence": coverage,
        "verdict": "faster" if low > 1 else "slower" if high < 1 else "same",
    }


def verdict(row: dict[str, Any]) -> str:
    """The row's verdict in words, with the interval it was read from."""
    spread = f"{row['ratio_low']:.2f}-{row['ratio_high']:.2f}x at {100 * row['confidence']:.0f} % confidence"
    if row["verdict"] == "faster":
        return f"sparse is faster ({row['paired_ratio']:.2f}x dense; {spread})"
    if row["verdict"] == "slower":
        return f"sparse is slower ({row['paired_ratio']:.2f}x dense; {spread})"
    return f"no measurable difference ({row['paired_ratio']:.2f}x; {spread}, which holds 1)"


def render(result: dict[str, Any], console: Console) -> None:
    title = (f"inference: {result['arch']} ({result['kind']}), {result['runtime']} on {result['device']}, "
             f"{result['precision']}, median of {result['repeats']}")
    table = Table(title=escape(title))
    for col in ("batch", "dense img/s", "sparse img/s", "sparse/dense", "dense ms", "sparse ms"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in result["results"]:
        table.add_row(str(row["batch_size"]), f"{row['dense_images_per_s']:,.1f}", f"{row['sparse_images_per_s']:,.1f}",
                      f"{row['ratio']:.3f}", f"{row['dense_ms']:.2f}", f"{row['sparse_ms']:.2f}")
    console.print(table)
    for row in result["results"]:
        console.print(f"batch {row['batch_size']}: {verdict(row)}", highlight=False)
    layers = Table(title="conv and linear layers")
    for col in ("layer", "type", "shape", "sparsity", "2:4", "kernel"):
        layers.add_column(col, justify="right" if col == "sparsity" else "left", overflow="fold",
                          no_wrap=col not in ("layer", "kernel"))
    for layer in result["layers"]:
        nm = "n/a" if layer["nm_valid"] is None else ("yes" if layer["nm_valid"] else "no")
        layers.add_row(escape(layer["name"]), layer["type"], "×".join(map(str, layer["shape"])),
                       f"{100 * layer['sparsity']:.2f} %", nm, escape(layer["note"]))
    console.print(layers)
    console.print(f"{result['sparse_layers']} of {len(result['layers'])} layers ran a sparse kernel; sparsity "
                  f"{100 * result['sparsity']:.2f} % over these layers", highlight=False)
    if result["note"]:
        console.print(escape(result["note"]), highlight=False)
