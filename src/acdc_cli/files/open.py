"""One way in for every file acdc reads: :func:`identify` says what a file is from its header alone, :func:`open_any`
reads it into one :class:`OpenedFile` that eval, inspect, bench --inference, export, prune and ``model.weights`` all
use.

The kinds: an acdc checkpoint, a safetensors export (``sparse-24-bitmask``, ``sparse-bitmask`` or ``dense``), an ONNX
export, and a plain state dict (safetensors another tool wrote, or a torch file read with ``weights_only=True``). A
file of another kind, or one a command does not take, is a one-line AcdcError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    check_model_fit,
    load_checkpoint,
    rebuild_model,
)
from acdc_cli.files.export import EXPORT_FORMAT, FORMATS, WEIGHTS_FILE, decode_export
from acdc_cli.files.jsonio import meta_field
from acdc_cli.files.onnx_file import OnnxRuntimeModule, initializers, is_onnx_file, read_onnx, session
from acdc_cli.files.state_dict import check_num_classes, fit_pretrained, read_torch_state, unwrapped
from acdc_cli.files.tensors import read_metadata, read_safetensors
from acdc_cli.models.registry import lookup

CHECKPOINT = "checkpoint"
EXPORT = "export"
ONNX = "onnx"
STATE_DICT = "state_dict"
KINDS = (CHECKPOINT, EXPORT, ONNX, STATE_DICT)


# what other tools put in ``__metadata__["format"]`` of a plain state dict (safetensors' own convention)
FRAMEWORK_TAGS = {"pt", "torch", "np", "numpy", "tf", "flax", "jax", "mlx", "paddle"}


# what prune and export say of a file that is not a checkpoint: they read a plain state dict with these flags
PLAIN_STATE_DICT_HINT = "for a plain state dict give --model NAME --num-classes N"


# the format of a plain state dict in a torch file (``torch.save``), which has no header to read
TORCH_FILE = "torch"


@dataclass(frozen=True)
class Identity:
    """What a file is: its kind, its format (acdc-checkpoint, an export format, onnx, dense or torch) and the raw
    metadata of its header (empty where the header is not read: ONNX and torch files)."""

    kind: str
    format: str
    meta: dict[str, str]


def model_file(path: Path | str) -> Path:
    """``path``, or the ``model.safetensors`` in it when ``path`` is a directory export (or another model directory
    that holds one)."""
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    return path


def identify(path: Path | str, torch_files: bool = False) -> Identity:
    """What ``path`` is, from its header alone (no tensor is read). ``torch_files``: a file that is neither
    safetensors nor ONNX is taken for a torch state dict, which only reading it can confirm; otherwise it is an
    error saying it is not a readable safetensors file. A directory is read through its ``model.safetensors``."""
    path = model_file(path)
    if path.is_dir():
        raise AcdcError(f"{path} is a directory without {WEIGHTS_FILE}")
    if not path.is_file():
        raise AcdcError(f"no such file: {path}")
    if is_onnx_file(path):  # ONNX has no header short of parsing the whole model; its metadata comes with it
        return Identity(ONNX, "onnx", {})
    try:
        meta = read_metadata(path)
    except AcdcError:
        if torch_files and path.suffix != ".safetensors":
            return Identity(STATE_DICT, TORCH_FILE, {})
        raise
    tag = meta.get("format")
    if tag == CHECKPOINT_FORMAT:
        return Identity(CHECKPOINT, CHECKPOINT_FORMAT, meta)
    if tag == EXPORT_FORMAT:
        fmt = meta.get("export_format")
        if fmt not in FORMATS:
            raise AcdcError(f"{path}: unknown export format {fmt!r}")
        return Identity(EXPORT, fmt, meta)
    if tag is None or tag in FRAMEWORK_TAGS:
        return Identity(STATE_DICT, "dense", meta)
    raise AcdcError(f"{path} carries foreign metadata (format '{tag}'): not an acdc checkpoint, export or plain "
                    "state dict")


@dataclass
class OpenedFile:
    """A file read by :func:`open_any`, whatever its kind."""

    path: Path
    kind: str  # checkpoint | export | onnx | state_dict
    format: str  # acdc-checkpoint, sparse-24-bitmask, sparse-bitmask, dense, onnx or torch
    raw_meta: dict[str, str]  # the metadata as stored: JSON text, or free text (preset, phase)
    weights: dict[str, torch.Tensor]  # the dense state dict: masks folded in, exports decoded, ONNX initializers
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> bool mask (checkpoints)
    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # a compressed layer's stored tensors
    arch: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    epoch: Any = None
    phase: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    preset: Any = None
    prunable: list[str] | None = None  # the weights sparsity is counted over; None: the sparsity rules decide
    dtype: str = "float32"  # of the stored weights
    structure: str | None = None  # the N:M structure or "unstructured" an export records
    extra: dict[str, Any] = field(default_factory=dict)  # a checkpoint's other metadata (kind, selection_split, ...)
    proto: Any = None  # the ONNX model
    _stored: dict[str, torch.Tensor] | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata parsed: each field's JSON where it is JSON, its text where it is free text."""
        return {k: meta_field(self.raw_meta, k, self.path, text=True) for k in self.raw_meta}

    @property
    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors as the file holds them (a checkpoint's weights before masking and its masks, an export's
        compressed parts); a checkpoint's are read on first use."""
        if self._stored is None:
            self._stored = read_safetensors(self.path)[0]
        return self._stored

    def checkpoint(self) -> Checkpoint:
        """The file as a checkpoint, for the commands that write one from it (prune, export)."""
        if self.arch is None:
            raise AcdcError(f"{self.path}: a plain state dict does not say which model it holds")
        # what eval refuses, export and prune refuse too: a file that does not fit its model, or a diverged one
        check_model_fit(self.arch, self.model_kwargs, self.weights, self._source())
        self._check_finite()
        return Checkpoint(weights=self.weights, masks=self.masks, arch=self.arch, model_kwargs=self.model_kwargs,
                          config=self.config, epoch=self.epoch if isinstance(self.epoch, int) else 0,
                          phase=str(self.phase or "dense"), metrics=self.metrics, extra=self.extra)

    def model(self) -> nn.Module:
        """The model the file describes with its weights loaded (an ONNX Runtime session as a module for ONNX)."""
        self._check_finite()
        if self.kind == ONNX:
            return self.runtime()
        if not isinstance(self.arch, str):
            raise AcdcError(f"{self.path}: metadata lacks arch, so the model cannot be rebuilt")
        return rebuild_model(self.arch, self.model_kwargs, self.weights, self._source())

    def _source(self) -> str:
        return f"a {self.arch} checkpoint" if self.kind == CHECKPOINT else str(self.path)

    def _check_finite(self) -> None:
        """A weight holding inf or NaN makes every score, pruning threshold and export of the file meaningless
        (eval used to print a top-1 with a null loss): refused, naming the first such tensor."""
        for name, tensor in self.weights.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AcdcError(f"{self.path}: {name} holds non-finite values (inf or NaN); the model it holds has "
                                "diverged")

    def runtime(self, threads: int | None = None) -> OnnxRuntimeModule:
        """An ONNX export's ONNX Runtime CPU session, as a module (opened here, only when asked for)."""
        if self.kind != ONNX:
            raise AcdcError(f"{self.path} is not an ONNX export")
        return OnnxRuntimeModule(session(self.path, threads))


def open_any(path: Path | str, accept: tuple[str, ...] = KINDS, *, torch_files: bool = False,
             model_name: str | None = None, num_classes: int | None = None, hint: str | None = None) -> OpenedFile:
    """Read ``path`` if it is one of the kinds in ``accept``; any other kind, and any defect, is one AcdcError
    (ending in ``hint`` where the file's kind is the problem). ``torch_files``: a file that is not safetensors may be
    a torch state dict (see :func:`identify`).

    ``model_name`` and ``num_classes``: the file is a plain state dict (safetensors, a torch file or an export) of
    that model, checked against it and read as a dense checkpoint; an acdc checkpoint records its own model."""
    path = model_file(path)
    if model_name is not None or num_classes is not None:
        return _open_as_model(path, model_name, num_classes)
    found = identify(path, torch_files)
    if found.kind not in accept:
        raise AcdcError(_refusal(path, found, accept, hint))
    if found.kind == CHECKPOINT:
        return _from_checkpoint(path, load_checkpoint(path), found.meta)
    if found.kind == EXPORT:
        return _open_export(path)
    if found.kind == ONNX:
        return _open_onnx(path)
    return _open_state_dict(path, found)


def _refusal(path: Path, found: Identity, accept: tuple[str, ...], hint: str | None) -> str:
    names = {CHECKPOINT: "checkpoint", EXPORT: "export", ONNX: "ONNX export", STATE_DICT: "plain state dict"}
    wanted = [names[kind] for kind in accept]
    wanted = ", ".join(wanted[:-1]) + " or " + wanted[-1] if len(wanted) > 1 else wanted[0]
    if found.kind == EXPORT and CHECKPOINT in accept:  # the plain-state-dict hint would mislead here
        source = found.meta.get("source")
        return (f"{path} is an acdc {found.format} export, not a checkpoint: use the checkpoint it was made from"
                + (f" ({source})" if isinstance(source, str) and source else ""))
    if found.format == TORCH_FILE:
        what = "a .safetensors file"
    else:
        what = f"format: {found.meta.get('format') or 'no acdc metadata'}" if found.kind != ONNX else "format: onnx"
    return f"{path} is not an acdc {wanted} ({what})" + (f"; {hint}" if hint else "")


def _from_checkpoint(path: Path, ckpt: Checkpoint, meta: dict[str, str], kind: str = CHECKPOINT) -> OpenedFile:
    return OpenedFile(
        path=path, kind=kind, format=CHECKPOINT_FORMAT if kind == CHECKPOINT else "dense", raw_meta=meta,
        weights=ckpt.weights, masks=ckpt.masks, arch=ckpt.arch, model_kwargs=ckpt.model_kwargs, config=ckpt.config,
        epoch=ckpt.epoch, phase=ckpt.phase, metrics=ckpt.metrics, preset=ckpt.extra.get("preset"),
        prunable=list(ckpt.masks) if ckpt.masks else None, extra=ckpt.extra,
        structure=(ckpt.config.get("sparsity") or {}).get("structure") if ckpt.masks else None,
    )


def _described(path: Path, meta: dict[str, str], weights: dict[str, torch.Tensor],
               prunable: list[str] | None) -> dict[str, Any]:
    """The fields an export and an ONNX export both carry from their checkpoint (see ``checkpoint.provenance``)."""
    arch = meta.get("arch")
    recorded = meta_field(meta, "prunable", path, list, prunable)
    if not all(isinstance(n, str) and isinstance(weights.get(n), torch.Tensor) for n in recorded):
        raise AcdcError(f"{path}: metadata field 'prunable' names weights the file does not hold")
    return {
        "arch": arch if isinstance(arch, str) else None,
        "model_kwargs": meta_field(meta, "model_kwargs", path, dict, required=True),
        "config": meta_field(meta, "config", path, dict, {}),
        "epoch": meta_field(meta, "epoch", path, text=True),
        "phase": meta.get("phase"),
        "metrics": meta_field(meta, "metrics", path, dict, {}),
        "preset": meta.get("preset"),
        "prunable": recorded,
        "structure": meta.get("structure"),
    }


def _open_export(path: Path) -> OpenedFile:
    tensors, meta = read_safetensors(path)
    weights, parts = decode_export(tensors, meta, path)
    return OpenedFile(path=path, kind=EXPORT, format=meta["export_format"], raw_meta=meta, weights=weights,
                      parts=parts, dtype=str(meta.get("dtype", "float32")), _stored=tensors,
                      **_described(path, meta, weights, list(parts)))


def _open_onnx(path: Path) -> OpenedFile:
    proto, meta = read_onnx(path)
    weights = {name: torch.from_numpy(value.copy()) for name, value in initializers(proto).items()}
    return OpenedFile(path=path, kind=ONNX, format="onnx", raw_meta=meta, weights=weights, proto=proto,
                      _stored=weights, **_described(path, meta, weights, []))


def _open_state_dict(path: Path, found: Identity) -> OpenedFile:
    if found.format == TORCH_FILE:
        tensors, meta = read_torch_state(path), {}
    else:
        tensors, meta = read_safetensors(path)
        compressed = sorted(k for k in tensors if k.endswith(".compressed"))
        if compressed:
            raise AcdcError(f"{path} holds compressed tensors ({compressed[0]}) but no acdc metadata, so the original "
                            "layer shapes are unknown")
    return OpenedFile(path=path, kind=STATE_DICT, format=found.format, raw_meta=meta, weights=tensors,
                      _stored=tensors)


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """The dense state dict in any file acdc reads (an export decoded, a checkpoint's masks folded in), keyed by
    unwrapped names (``module.``, ``_orig_mod.`` stripped). Any defect is a one-line AcdcError."""
    opened = open_any(path, accept=(CHECKPOINT, EXPORT, STATE_DICT), torch_files=True)
    return unwrapped(opened.weights, opened.path)


def load_pretrained(model: nn.Module, path: Path | str, skip: list[str], model_name: str) -> list[str]:
    """``model.weights``: the state dict in ``path`` loaded into ``model`` but for the keys matching a ``skip``
    glob (see :func:`acdc_cli.files.state_dict.fit_pretrained`); returns the keys left as initialised."""
    return fit_pretrained(model, read_state_dict(path), Path(path), skip, model_name)


def _open_as_model(path: Path, model_name: str | None, num_classes: int | None) -> OpenedFile:
    if model_name is None or num_classes is None:
        raise AcdcError("a plain state dict needs both --model NAME and --num-classes N")
    check_num_classes(num_classes)
    found = identify(path, torch_files=True)
    if found.kind == CHECKPOINT:
        raise AcdcError(f"{path} is an acdc checkpoint, which records its own model: drop --model and --num-classes")
    if found.kind == ONNX:
        raise AcdcError(f"{path} is an ONNX export, not a state dict: export or prune the checkpoint it came from")
    state = unwrapped(_open_export(path).weights if found.kind == EXPORT else _open_state_dict(path, found).weights,
                      path)
    return _from_checkpoint(path, import_state_dict(state, path, model_name, num_classes), found.meta, STATE_DICT)


def load(path: Path | str) -> dict[str, torch.Tensor]:
    """The exact dense state dict of an export (any format), in the dtype it was exported in.

    A checkpoint is accepted too: its weights with the masks folded in.
    """
    return open_any(path, accept=(CHECKPOINT, EXPORT)).weights


def load_model(path: Path | str) -> nn.Module:
    """The model an export (or checkpoint) describes, rebuilt from its metadata, with the weights loaded (and cast
    to the model's float32 parameters)."""
    return open_any(path, accept=(CHECKPOINT, EXPORT)).model()


def import_state_dict(state: dict[str, torch.Tensor], path: Path, model_name: str, num_classes: int) -> Checkpoint:
    """A plain state dict (read from ``path``) as a dense checkpoint of ``model_name`` at ``num_classes`` classes
    (the model is built to check every name and shape), for the commands that read checkpoints. ``num_classes`` is
    checked by the caller (:func:`_open_as_model`, before the file is read)."""
    path = Path(path)
    entry, _ = lookup(model_name)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_channels": entry.in_channels}
    model = rebuild_model(model_name, kwargs, state, f"{path} (as {model_name})")
    return Checkpoint(
        weights={k: v.detach() for k, v in model.state_dict().items()},
        masks={},
        arch=model_name,
        model_kwargs=kwargs,
        config={},
        epoch=0,
        phase="dense",
        extra={"kind": "import", "imported_from": path.name},
    )
