"""Checkpoints: one ``.safetensors`` per model (weights, ``mask.<name>`` uint8, JSON metadata) plus a sibling
``.state.pt`` for resume (optimizer, progress, RNG), loaded with ``torch.load(weights_only=True)``.

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the target, so a crash
mid-write leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

import acdc_cli
from acdc_cli import testing_hooks
from acdc_cli.errors import AcdcError
from acdc_cli.metrics import finite_or_null

CHECKPOINT_FORMAT = "acdc-checkpoint"
# bytes, a memoryview or a NumPy uint8 array: anything memoryview() reads (collections.abc.Buffer is Python 3.12+)
Buffer = Any
MASK_PREFIX = "mask."


def atomic_write_bytes(path: Path, data: bytes | Sequence[Buffer]) -> None:
    """Write ``data`` (bytes, or a sequence of byte buffers written one after the other) to a temporary file beside
    ``path``, fsync it, rename it over ``path``. An unwritable place is a one-line AcdcError; the previous file, if
    any, is untouched."""
    path = Path(path)
    try:
        _atomic_write(path, data)
    except OSError as exc:
        raise AcdcError(f"cannot write {path}: {exc.strerror or exc.__class__.__name__}") from None


def _atomic_write(path: Path, data: bytes | Sequence[Buffer]) -> None:
    faults = testing_hooks.faults_for_write(path)  # None unless a test asks for a crash or a full disk
    # one write per piece: each releases the interpreter lock while the kernel copies it
    pieces = [memoryview(piece).cast("B") for piece in ([data] if isinstance(data, (bytes, bytearray)) else data)]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            if faults:
                first, second = _split_at(pieces, sum(len(piece) for piece in pieces) // 2)
                for piece in first:
                    fh.write(piece)
                fh.flush()
                testing_hooks.fault_point(faults, "write", path)
                for piece in second:
                    fh.write(piece)
            else:
                for piece in pieces:
                    fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        testing_hooks.fault_point(faults, "rename", path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    testing_hooks.fault_point(faults, "renamed", path)
    _fsync_dir(path.parent)


def _split_at(pieces: list[memoryview], offset: int) -> tuple[list[memoryview], list[memoryview]]:
    """The byte pieces before and after ``offset`` of their concatenation."""
    first: list[memoryview] = []
    for index, piece in enumerate(pieces):
        if offset <= len(piece):
            return first + [piece[:offset]], [piece[offset:], *pieces[index + 1:]]
        first.append(piece)
        offset -= len(piece)
    return first, []


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files of atomic writes that a killed process left in ``folder``. One that cannot be
    deleted (a read-only file system) is left: it is never read, and the run's next write names the real problem."""
    for tmp in Path(folder).glob(".*.tmp"):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def host_copy(value: Any) -> Any:
    """``value`` with every tensor copied to the CPU (nested dicts, lists and tuples rebuilt): a snapshot that shares
    no memory with the training state, so it can be written while training goes on."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [host_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(host_copy(v) for v in value)
    return value


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Whether every value of the floating-point ``tensors`` (all on one device) is finite, as a 0-dim bool tensor
    on that device: nothing waits for it until it is read. One fused pass per dtype: a tensor's largest magnitude is
    NaN or infinite exactly when one of its values is (and, unlike a sum, never overflows)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.numel():
            groups.setdefault(tensor.dtype, []).append(tensor.detach())
    verdicts = [torch.stack(torch._foreach_norm(group, float("inf"))).isfinite().all() for group in groups.values()]
    if not verdicts:
        return torch.ones((), dtype=torch.bool)
    return torch.stack(verdicts).all() if len(verdicts) > 1 else verdicts[0]


class HostSnapshot:
    """Host buffers that snapshots of the training state are copied into, reused from one checkpoint to the next.

    From a CUDA device the buffers are pinned and the copies non-blocking: the training thread only queues them,
    behind the kernels already queued, and an event recorded after them tells the writer thread when they have
    landed (:meth:`Taken.wait`). From the CPU the copy is a plain one. Either way the snapshot shares no memory with
    training. The buffers are reused, so a new snapshot may only be taken once the write of the previous one is
    done (``RunDir`` waits for its writer first)::

        with host.taking() as taken:
            weights = host.copy(model.state_dict(), "weights")
        writer.submit(lambda: (taken.wait(), write(weights)))
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._used: set[tuple[Any, ...]] = set()
        self._cuda: set[torch.device] = set()

    @contextlib.contextmanager
    def taking(self) -> Iterator[Taken]:
        """Copies made inside belong to one snapshot; on leaving, an event is recorded behind the device copies
        and buffers that this snapshot did not use are freed."""
        self._used, self._cuda = set(), set()
        taken = Taken()
        yield taken
        taken.events = [torch.cuda.Event() for _ in self._cuda]
        for event, device in zip(taken.events, self._cuda):
            event.record(torch.cuda.current_stream(device))
        self._buffers = {key: buffer for key, buffer in self._buffers.items() if key in self._used}

    def copy(self, value: Any, *path: Any) -> Any:
        """``value`` with every tensor copied into this snapshot's buffer for its place (``path`` + the keys and
        indices leading to it), nested dicts, lists and tuples rebuilt; as :func:`host_copy`, but reusing memory."""
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value.detach(), path)
        if isinstance(value, dict):
            return {k: self.copy(v, *path, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.copy(v, *path, i) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(self.copy(v, *path, i) for i, v in enumerate(value))
        return value

    def _copy_tensor(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        on_cuda = tensor.device.type == "cuda"
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            # contiguous whatever the source's layout (channels_last): the file is written from it as it is
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_cuda)
            self._buffers[path] = buffer
        self._used.add(path)
        if on_cuda:
            self._cuda.add(tensor.device)
        buffer.copy_(tensor, non_blocking=on_cuda)
        return buffer


class Taken:
    """One snapshot's device copies: :meth:`wait` returns once they are in host memory."""

    def __init__(self) -> None:
        self.events: list[torch.cuda.Event] = []

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()


class BackgroundWriter:
    """Writes checkpoints in a thread while training goes on, one write at a time.

    ``submit`` first waits for the previous write, so files land in submission order; ``wait`` blocks until the
    last one is on disk and re-raises its error, if any (a full disk is then an AcdcError in the training loop).
    Writes are atomic, so a process killed mid-write still leaves the previous files intact. Callers hand over
    snapshots (:func:`host_copy`), never live tensors.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        self.wait()

        def run() -> None:
            try:
                write(*args)
            except BaseException as exc:  # handed to the training thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=run, name="acdc-checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write tensors (made contiguous, on CPU) with metadata values encoded as JSON strings."""
    # strict JSON: a non-finite number (a diverged metric) is written as null, never as bare NaN
    meta = {k: v if isinstance(v, str) else json.dumps(finite_or_null(v), allow_nan=False)
            for k, v in metadata.items()}
    atomic_write_bytes(path, safetensors_pieces({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta))


# the safetensors names of the dtypes acdc's files hold
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def safetensors_pieces(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[Buffer]:
    """A safetensors file as its header followed by one buffer per tensor (views of the contiguous CPU tensors, no
    copy). ``safetensors.torch.save`` builds the whole file in one bytes object while holding the interpreter lock
    (76-79 ms for a WRN-28-10 checkpoint, stalling the training thread); written piece by piece, the lock is free
    during each write. The same format and size as ``safetensors.torch.save``: a little-endian u64 header length,
    the JSON header (``__metadata__`` first, then each tensor's dtype, shape and byte offsets) padded with spaces to
    a multiple of 8, then the tensors' bytes; tensors ordered by element size, largest first, then name, so each
    starts aligned to its element size."""
    if any(t.dtype not in _SAFETENSORS_DTYPES for t in tensors.values()):
        return [st_save(tensors, metadata=metadata)]
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        size = tensors[name].numel() * tensors[name].element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    pieces: list[Buffer] = [struct.pack("<Q", len(text)), text]
    pieces += [tensors[name].reshape(-1).view(torch.uint8).numpy() for name in names if tensors[name].numel()]
    return pieces


# acdc's own metadata nests 4 levels; a file nesting hundreds would make json.loads hit Python's recursion limit
MAX_METADATA_DEPTH = 32
# No layer of an image classifier comes near these. A tensor's bytes always lie inside the file (safe_open checks
# that), but a tensor of no elements may still declare [0, 2**40], which readers would carry into reshapes and
# divisions.
MAX_TENSOR_DIM = 2**31
MAX_TENSOR_DIMS = 8


def _json_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text (brackets inside strings do not count); plain strings give 0."""
    deepest = depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the raw metadata of a safetensors file; any defect is a one-line AcdcError."""
    path = Path(path)
    if not path.is_file():
        raise AcdcError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            # the header first: safe_open has checked that every declared tensor's bytes lie inside the file, and
            # the shapes are checked here before any tensor is read
            meta = _checked_metadata(fh, path)
            names = list(fh.keys())
            for name in names:
                shape = fh.get_slice(name).get_shape()
                if len(shape) > MAX_TENSOR_DIMS or any(size > MAX_TENSOR_DIM for size in shape):
                    raise AcdcError(f"{path}: tensor {name} declares shape {shape}, beyond any layer acdc reads "
                                    f"(at most {MAX_TENSOR_DIMS} dimensions of at most 2**31)")
            tensors = {name: fh.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise AcdcError(f"{path} is not a readable safetensors file ({first})") from None
    return tensors, meta


def _checked_metadata(fh: Any, path: Path) -> dict[str, str]:
    meta = fh.metadata() or {}
    for key, text in meta.items():
        if _json_depth(text) > MAX_METADATA_DEPTH:
            raise AcdcError(f"{path}: metadata field '{key}' is nested deeper than {MAX_METADATA_DEPTH} levels")
    return meta


def read_metadata(path: Path) -> dict[str, str]:
    """The raw metadata of a safetensors file, from its header alone: no tensor is read."""
    path = Path(path)
    if not path.is_file():
        raise AcdcError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return _checked_metadata(fh, path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise AcdcError(f"{path} is not a readable safetensors file ({first})") from None


def recorded_config(path: Path) -> dict[str, Any]:
    """The settings an acdc checkpoint records (from its header alone); empty when it records none."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise AcdcError(f"{path} is not an acdc checkpoint (format: {meta.get('format', 'no acdc metadata')})")
    config = _json_field(meta, "config", path, {})
    if not isinstance(config, dict):
        raise AcdcError(f"{path}: malformed metadata (epoch / config / metrics)")
    _check_config(config, path)
    return config


def parse_json(text: str) -> Any:
    """``json.loads`` for text from a file: ValueError on anything it cannot read (not JSON, an integer of more than
    4,300 digits, nesting beyond the recursion limit)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _json_field(meta: dict[str, str], key: str, path: Path, default: Any = None) -> Any:
    if key not in meta:
        return default
    try:
        return parse_json(meta[key])
    except ValueError:
        raise AcdcError(f"{path}: metadata field '{key}' is not valid JSON") from None


def lenient_json(text: str) -> Any:
    """Metadata strings are stored raw, everything else as JSON; read both back."""
    try:
        return parse_json(text)
    except ValueError:
        return text


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]  # the model's state_dict
    masks: dict[str, torch.Tensor]  # weight name -> bool mask (empty in a dense checkpoint)
    arch: str
    model_kwargs: dict[str, Any]  # num_classes, in_channels, dropout, ...
    config: dict[str, Any]  # resolved settings
    epoch: int  # epochs completed
    phase: str  # "dense" | "sparse"
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # other metadata (preset, paper_top1, kind, ...)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    tensors = dict(ckpt.weights)
    for name, mask in ckpt.masks.items():
        # -0.0 from masking is stored as +0.0 so the file holds plain zeros
        tensors[name] = tensors[name] + 0.0 if tensors[name].is_floating_point() else tensors[name]
        tensors[MASK_PREFIX + name] = mask.to(torch.uint8)
    save_safetensors(path, tensors, {"format": CHECKPOINT_FORMAT, **provenance(ckpt), **ckpt.extra})


def provenance(ckpt: Checkpoint) -> dict[str, Any]:
    """The metadata that every file made from a checkpoint carries: acdc version, model, settings and progress."""
    return {
        "acdc_version": acdc_cli.__version__,
        "arch": ckpt.arch,
        "model_kwargs": ckpt.model_kwargs,
        "config": ckpt.config,
        "epoch": ckpt.epoch,
        "phase": ckpt.phase,
        "metrics": ckpt.metrics,
    }


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format", "no acdc metadata")
        raise AcdcError(f"{path} is not an acdc checkpoint (format: {found})")
    stored_masks = {k[len(MASK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    stray = set(stored_masks) - set(weights)
    if stray:
        raise AcdcError(f"{path}: mask for unknown weight {sorted(stray)[0]}")
    masks = {}
    for name, mask in stored_masks.items():
        if mask.shape != weights[name].shape:
            raise AcdcError(f"{path}: mask shape of {name} does not match its weight")
        if weights[name].dim() < 2 or not weights[name].is_floating_point():
            raise AcdcError(f"{path}: mask for {name}, which is not a conv or linear weight")
        # a mask is 0/1: reading 2, 255 or 0.5 as "keep" would trust a file that is not what acdc wrote
        if mask.dtype not in (torch.uint8, torch.bool):
            raise AcdcError(f"{path}: mask of {name} is {str(mask.dtype).removeprefix('torch.')}; acdc masks are "
                            "0/1 uint8")
        if bool((mask.view(torch.uint8) > 1).any()):
            raise AcdcError(f"{path}: mask of {name} holds values other than 0 and 1")
        masks[name] = mask.bool()
        # weights outside their mask count as pruned everywhere: eval scores, inspect counts and export writes the
        # same tensors (acdc writes zeros there; a file that does not is read as if it did)
        weights[name] = torch.where(masks[name], weights[name], torch.zeros((), dtype=weights[name].dtype))
    arch = meta.get("arch")
    model_kwargs = _json_field(meta, "model_kwargs", path, {})
    if not isinstance(arch, str) or not isinstance(model_kwargs, dict):
        raise AcdcError(f"{path}: metadata lacks a valid arch / model_kwargs")
    known = {"format", "acdc_version", "arch", "model_kwargs", "config", "epoch", "phase", "metrics"}
    extra = {k: lenient_json(meta[k]) for k in meta if k not in known}
    epoch = _json_field(meta, "epoch", path, 0)
    config = _json_field(meta, "config", path, {})
    metrics = _json_field(meta, "metrics", path, {})
    if (not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0 or not isinstance(config, dict)
            or not isinstance(metrics, dict)):
        raise AcdcError(f"{path}: malformed metadata (epoch / config / metrics)")
    _check_config(config, path)
    return Checkpoint(
        weights=weights,
        masks=masks,
        arch=arch,
        model_kwargs=model_kwargs,
        config=config,
        epoch=epoch,
        phase=str(meta.get("phase", "dense")),
        metrics=metrics,
        extra=extra,
    )


_SECTIONS = ("data", "model", "optim", "schedule", "sparsity", "runtime", "log")


def _check_config(config: dict[str, Any], path: Path) -> None:
    """The saved settings' shape, as far as readers use them before (or without) validating them as settings:
    sections are tables and the sparsity rules are strings."""
    for section in _SECTIONS:
        if not isinstance(config.get(section, {}), dict):
            raise AcdcError(f"{path}: malformed metadata (config section '{section}' is not a table)")
    rules = config.get("sparsity", {})
    if not isinstance(rules.get("structure", ""), str):
        raise AcdcError(f"{path}: malformed metadata (config sparsity.structure is not a string)")
    for key in ("include", "exclude"):
        patterns = rules.get(key, [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise AcdcError(f"{path}: malformed metadata (config sparsity.{key} is not a list of strings)")


def build_model(ckpt: Checkpoint) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (strict)."""
    return rebuild_model(ckpt.arch, ckpt.model_kwargs, ckpt.weights, f"a {ckpt.arch} checkpoint")


def rebuild_model(arch: str, model_kwargs: dict[str, Any], weights: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The model that a file's metadata describes, with the file's ``weights`` loaded (strict).

    The metadata is checked first on a model built on the meta device, which allocates nothing: a file asking for a
    huge model (num_classes = 10**9) is refused by shape before any memory is spent on it.
    """
    from acdc_cli.models import create

    kwargs = dict(model_kwargs)
    num_classes = kwargs.pop("num_classes", None)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise AcdcError(f"{source}: metadata lacks num_classes")
    with torch.device("meta"):
        check_fit(create(arch, num_classes=num_classes, **kwargs).state_dict(), weights, source)
    model = create(arch, num_classes=num_classes, **kwargs)
    model.load_state_dict(weights)
    return model


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    check_fit(model.state_dict(), weights, source)
    model.load_state_dict(weights)


def check_fit(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], source: str) -> None:
    """Raise unless ``weights`` has exactly the names and shapes of the state dict ``own``."""
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        which = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise AcdcError(f"{source} does not fit this model ({which})")
    for name, tensor in weights.items():
        if own[name].shape != tensor.shape:
            raise AcdcError(
                f"{source} does not fit this model: {name} is {tuple(tensor.shape)}, model has {tuple(own[name].shape)}"
            )


def save_state(path: Path, state: dict[str, Any]) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, [buffer.getbuffer()])  # getvalue() would copy it all again, holding the lock


def torch_load_plain(path: Path, expected: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain data only. A file holding anything else,
    or no torch file at all, is one AcdcError saying it is not ``expected`` (e.g. "a valid acdc resume state");
    FileNotFoundError passes through for the caller to word."""
    try:
        with warnings.catch_warnings():
            # a foreign pickle makes torch warn about its protocol before refusing it: the error line is enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:  # weights_only met something other than tensors and plain data
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        raise AcdcError(f"{path} is not {expected}: refused, it holds {what} (only tensors and plain data are "
                        "read)") from None
    except Exception as exc:  # corrupt zips and foreign files raise various errors
        first = str(exc).splitlines()[0].split(". ")[0][:200] if str(exc) else ""
        raise AcdcError(f"{path} is not {expected} ({exc.__class__.__name__} {first})") from None


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch_load_plain(path, "a valid acdc resume state")
    except FileNotFoundError:
        raise AcdcError(f"resume state not found: {path}") from None
    if not isinstance(state, dict):
        raise AcdcError(f"{path} is not a valid acdc resume state")
    return state
