"""ONNX export of a checkpoint (for ONNX Runtime and TensorRT), its read-back check, and ONNX Runtime as a module.

The graph comes from PyTorch's torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``, the default
since PyTorch 2.9; the TorchScript exporter is deprecated and folds BatchNorm into the convs in eval mode). Its graph
optimizer folds BatchNorm into the preceding conv too, so acdc runs the exporter with ``optimize=False`` and then
only folds constants: every conv and linear initializer is the checkpoint's weight bit for bit, pruned zeros
included. ``fold_bn`` folds each BatchNorm that directly follows a conv into it in PyTorch first (torch.fx), which
scales every output channel of the conv, and re-checks sparsity and the 2:4 pattern in the folded initializers.

Nothing is written until the initializers have been read back with ``onnx`` and checked, and ONNX Runtime (CPU) has
run the graph and been compared with PyTorch's logits.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from acdc_cli.commands.export import ONNX
from acdc_cli.data.bundle import model_input
from acdc_cli.data.preprocessing import preprocessing
from acdc_cli.errors import AcdcError, TrainingFault
from acdc_cli.files.atomic import atomic_write_bytes, check_writable
from acdc_cli.files.checkpoint import provenance, rebuild_model
from acdc_cli.files.jsonio import meta_text
from acdc_cli.files.onnx_file import (
    ONNX_FORMAT,
    PROTOBUF_LIMIT,
    OnnxRuntimeModule,
    first_line,
    initializers,
    require_onnx,
    session,
    to_sparse_initializers,
)
from acdc_cli.files.open import CHECKPOINT, PLAIN_STATE_DICT_HINT, open_any
from acdc_cli.schemas import EXPORT_SCHEMA
from acdc_cli.sections import MAX_BATCH_SIZE, MAX_IMAGE_SIDE
from acdc_cli.sparsity import formats
from acdc_cli.sparsity.rules import natural_key, prunable_names

MIN_OPSET = 18  # the torch.export-based exporter writes opset 18 or newer


@dataclass
class OnnxLayer:
    name: str
    shape: list[int]
    kept: int  # non-zero values in the initializer
    sparsity: float  # zeros / values, counted in the initializer
    nm_valid: bool | None  # 2:4 along input channels in the initializer; None: input channels not a multiple of 4
    zeros_kept: bool  # every weight pruned in the checkpoint is zero in the initializer
    exact: bool  # the initializer equals the checkpoint's weight bit for bit (False after folding BatchNorm)


@dataclass
class OnnxExportResult:
    path: Path
    opset: int
    batch: int | None  # None: dynamic
    input_shape: list[int | str]
    fold_bn: bool
    batchnorms: int  # BatchNorm layers in the model
    batchnorms_folded: int
    structure: str
    layers: list[OnnxLayer]
    size_bytes: int
    max_abs_diff: float  # ONNX Runtime vs PyTorch logits on random inputs
    max_abs_logit: float
    sparse_initializers: list[str] = field(default_factory=list)  # layers written as ONNX sparse initializers

    @property
    def sparsity(self) -> float:
        numel = sum(math.prod(layer.shape) for layer in self.layers)
        return 1.0 - sum(layer.kept for layer in self.layers) / max(numel, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": EXPORT_SCHEMA,
            "path": str(self.path),
            "format": ONNX,
            "dtype": "float32",
            "opset": self.opset,
            "batch": "dynamic" if self.batch is None else self.batch,
            "input_shape": self.input_shape,
            "fold_bn": self.fold_bn,
            "batchnorms": self.batchnorms,
            "batchnorms_folded": self.batchnorms_folded,
            "structure": self.structure,
            "sparsity": self.sparsity,
            "size_bytes": self.size_bytes,
            "max_abs_diff": self.max_abs_diff,
            "max_abs_logit": self.max_abs_logit,
            "sparse_initializers": self.sparse_initializers,
            "layers": [asdict(layer) for layer in self.layers],
        }


def parse_batch(batch: str | int | None) -> int | None:
    """``"dynamic"`` (or None) -> None; a positive integer -> that fixed batch size."""
    if batch is None or batch == "dynamic":
        return None
    text = str(batch).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_BATCH_SIZE:
        raise AcdcError(f"--batch expects 'dynamic' or a whole number 1 to {MAX_BATCH_SIZE}, got {batch!r}")
    return int(text)


# the example batch the exporter traces: 2**28 floats (1 GiB), far above a 2048-pixel RGB pair
MAX_EXAMPLE_ELEMENTS = 2**28




def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int, int]:
    """(model with every BatchNorm that directly follows a conv folded into it, BatchNorm layers before, after)."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(model)
    except Exception as exc:  # torch.fx cannot trace every model; say which and why
        raise AcdcError(f"--fold-bn: torch.fx cannot trace this model ({first_line(exc)})") from exc
    return fused, batchnorm_count(model), batchnorm_count(fused)


def batchnorm_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())




def _graph(model: nn.Module, example: torch.Tensor, opset: int | None, dynamic: bool) -> Any:
    """The ONNX model (onnx_ir) of ``model`` on ``example``: no graph optimization beyond constant folding."""
    import onnxscript.optimizer

    kwargs: dict[str, Any] = {
        "dynamo": True,
        "input_names": ["input"],
        "output_names": ["logits"],
        "optimize": False,  # the exporter's optimizer would fold BatchNorm into the convs' initializers
        "verbose": False,
    }
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    # the exporter and onnxscript log their progress and opset conversions as warnings: acdc reports the outcome
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), **kwargs)
    except Exception as exc:  # the exporter raises many kinds; the chain is kept for --debug
        raise AcdcError(f"the ONNX exporter failed: {first_line(exc)}") from exc
    finally:
        logging.disable(logging.NOTSET)
    # the exporter builds the zero bias of a bias-free conv from Shape/Expand nodes; fold those into initializers
    onnxscript.optimizer.fold_constants(program.model)
    onnxscript.optimizer.remove_unused_nodes(program.model)
    return program.model


def export_onnx(source: Path, out: Path, opset: int | None = None, batch: str | int | None = None,
                input_size: int | None = None, fold_bn: bool = False, force: bool = False, *,
                model_name: str | None = None, num_classes: int | None = None,
                sparse: bool | None = None) -> OnnxExportResult:
    """Write the checkpoint ``source`` as an ONNX model (fp32, eval mode, masks folded in) to ``out``.

    ``batch`` None / "dynamic": a dynamic batch dimension; an integer fixes it. ``input_size``: the side of the square
    input (default: the size of the data the checkpoint records, else the model's registry entry). ``fold_bn``: fold
    BatchNorm into the preceding convs. ``sparse``: write each pruned layer that is smaller so (over 2/3 zeros) as an
    ONNX sparse initializer (None: when the checkpoint has masks); the values read back and ONNX Runtime's logits are
    checked after the change.
    """
    onnx, _ = require_onnx()
    source, out = Path(source), Path(out)
    fixed_batch = parse_batch(batch)
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int)
                                   or not 1 <= input_size <= MAX_IMAGE_SIDE):
        raise AcdcError(f"--input-size expects a whole number 1 to {MAX_IMAGE_SIDE}, got {input_size!r}")
    if opset is not None and not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise AcdcError(f"--opset {opset} is not available: the exporter writes opset {MIN_OPSET} to "
                        f"{onnx.defs.onnx_opset_version()} (onnx {onnx.__version__})")
    if out.suffix != ".onnx":
        raise AcdcError(f"{out}: an ONNX export is a .onnx file (a directory export takes a safetensors format)")
    check_writable(out, force)
    ckpt = open_any(source, (CHECKPOINT,), torch_files=True, model_name=model_name, num_classes=num_classes,
                    hint=PLAIN_STATE_DICT_HINT).checkpoint()
    weights = ckpt.weights  # a read checkpoint's weights hold zeros outside their masks (load_checkpoint)
    model = rebuild_model(ckpt.arch, ckpt.model_kwargs, weights, str(source)).float().eval()
    recorded = preprocessing(ckpt.config)
    if input_size is None and recorded is not None:
        input_size = recorded["input_shape"][1]  # the images the model was trained on, not the registry's default
    channels, side = model_input(ckpt.arch, ckpt.model_kwargs, input_size)
    if (fixed_batch or 2) * channels * side * side > MAX_EXAMPLE_ELEMENTS:
        raise AcdcError(f"an example batch of {fixed_batch or 2} x {channels} x {side} x {side} is above the "
                        f"{MAX_EXAMPLE_ELEMENTS:,} values the exporter traces; lower --batch or --input-size")
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(fixed_batch or 2, channels, side, side, generator=generator)

    if fold_bn:
        exported, batchnorms, left = fold_batchnorm(model)
    else:
        exported, batchnorms, left = model, batchnorm_count(model), batchnorm_count(model)
    graph = _graph(exported, example, opset, dynamic=fixed_batch is None)

    masks = ckpt.masks
    prunable = prunable_names(weights, masks, ckpt.config)
    # as the safetensors exports say it: the saved N:M / unstructured rule when there are masks
    structure = str((ckpt.config.get("sparsity") or {}).get("structure", "unstructured")) if masks else "dense"
    metadata = {
        "format": ONNX_FORMAT,
        **provenance(ckpt),
        # what ONNX Runtime's caller must do to an image first (shape, channel order, resize, mean/std)
        "preprocessing": recorded,
        "source": source.name,
        "structure": structure,
        "prunable": prunable,
        "fold_bn": fold_bn,
        "input": {"name": "input", "shape": ["batch" if fixed_batch is None else fixed_batch, channels, side, side]},
        **{k: v for k, v in ckpt.extra.items() if k in ("preset", "paper_top1")},
    }
    proto = _serialize(graph, metadata)
    layers = check_initializers(proto, weights, masks, prunable, exact=not fold_bn, structure=structure)
    moved = to_sparse_initializers(proto, [layer.name for layer in layers]) if (
        bool(masks) if sparse is None else sparse) else []
    if moved:  # read back through the sparse initializers: the same values, bit for bit
        layers = check_initializers(proto, weights, masks, prunable, exact=not fold_bn, structure=structure)
    proto.metadata_props.add(key="sparsity", value=meta_text(_sparsity(layers)))
    data = proto.SerializeToString()
    max_diff, max_logit = compare_with_pytorch(data, model, example, fixed_batch, generator)
    opset_written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and opset_written != opset:
        raise AcdcError(f"--opset {opset}: the exporter wrote opset {opset_written}")
    atomic_write_bytes(out, data)
    return OnnxExportResult(out, opset_written, fixed_batch, metadata["input"]["shape"], fold_bn, batchnorms,
                            batchnorms - left, structure, layers, out.stat().st_size, max_diff, max_logit, moved)


def _sparsity(layers: list[OnnxLayer]) -> float:
    numel = sum(math.prod(layer.shape) for layer in layers)
    return 1.0 - sum(layer.kept for layer in layers) / max(numel, 1)


def _serialize(graph: Any, metadata: dict[str, Any]) -> Any:
    import onnx_ir

    for key, value in metadata.items():
        graph.metadata_props[key] = meta_text(value)
    graph.producer_name = "acdc"
    proto = onnx_ir.serde.serialize_model(graph)
    if proto.ByteSize() >= PROTOBUF_LIMIT:
        raise AcdcError("the model is over 2 GiB, more than one ONNX file can hold")
    return proto


def check_initializers(proto: Any, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                       prunable: list[str], exact: bool, structure: str) -> list[OnnxLayer]:
    """Per prunable layer: sparsity and 2:4 validity counted in the initializers, and whether the pruned zeros (and,
    when ``exact``, every value) survived. A layer that lost a zero or its 2:4 pattern is an error: nothing is
    written (exit 1)."""
    stored = initializers(proto)
    layers = []
    for name in prunable:
        if name not in stored:
            raise TrainingFault(f"ONNX export: no initializer named {name}; the exporter renamed or inlined it, so "
                                "its sparsity cannot be checked")
        value = torch.from_numpy(np.array(stored[name]))
        weight = weights[name].float()
        if tuple(value.shape) != tuple(weight.shape):
            raise TrainingFault(f"ONNX export: initializer {name} has shape {tuple(value.shape)}, "
                                f"the weight {tuple(weight.shape)}")
        pruned = masks[name].logical_not() if name in masks else weight == 0
        layer = OnnxLayer(
            name=name,
            shape=list(weight.shape),
            kept=int((value != 0).sum()),
            sparsity=float((value == 0).sum()) / max(value.numel(), 1),
            nm_valid=formats.nm_check(value, 2, 4),
            zeros_kept=bool((value[pruned] == 0).all()),
            exact=bool(torch.equal(value.view(torch.int32), weight.contiguous().view(torch.int32))),
        )
        # not the user's doing: exit 1, as for a failed run
        if not layer.zeros_kept or (exact and not layer.exact):
            raise TrainingFault(f"ONNX export: initializer {name} differs from the checkpoint's weight"
                                + ("" if layer.zeros_kept else " where it was pruned"))
        if structure == "2:4" and name in masks and layer.nm_valid is not True:
            raise TrainingFault(f"ONNX export: initializer {name} is no longer 2:4 along input channels")
        layers.append(layer)
    return sorted(layers, key=lambda layer: natural_key(layer.name))


def compare_with_pytorch(data: bytes, model: nn.Module, example: torch.Tensor, fixed_batch: int | None,
                         generator: torch.Generator) -> tuple[float, float]:
    """(max |ONNX Runtime - PyTorch| over the logits, max |logit|) on ``example`` and, with a dynamic batch, on a
    batch of another size too."""
    runner = OnnxRuntimeModule(session(data))
    inputs = [example]
    if fixed_batch is None:
        inputs.append(torch.randn(3, *example.shape[1:], generator=generator))
    diff = logit = 0.0
    with torch.no_grad():
        for images in inputs:
            expected, got = model(images), runner(images)
            diff = max(diff, float((expected - got).abs().max()))
            logit = max(logit, float(expected.abs().max()))
    return diff, logit
