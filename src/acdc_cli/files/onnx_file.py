"""acdc's ONNX files: reading them (initializers dense or sparse, metadata), writing pruned weights as ONNX sparse
initializers, and ONNX Runtime (CPU) as a module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from acdc_cli.errors import AcdcError

ONNX_FORMAT = "acdc-onnx"


PROTOBUF_LIMIT = 2**31  # one ONNX file without external data holds at most 2 GiB


EXTRA_HINT = "pip install 'acdc-cli[onnx]'"


def require_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules (and ``onnxscript``, which the exporter needs), or one AcdcError
    naming the optional extra."""
    import importlib

    modules = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            raise AcdcError(f"ONNX needs the optional extra 'onnx' ({name} is not installed): {EXTRA_HINT}") from None
    return modules[0], modules[1]


def initializers(proto: Any) -> dict[str, np.ndarray]:
    """Every initializer of an ONNX model by name, as numpy arrays, sparse initializers as their dense values; a
    malformed one is a one-line AcdcError."""
    from onnx import numpy_helper

    out = {}
    for init in proto.graph.initializer:
        try:
            out[init.name] = numpy_helper.to_array(init)
        except Exception as exc:  # onnx raises ValueError, TypeError, ... for tensors whose data does not fit
            raise AcdcError(f"ONNX initializer {init.name!r} is malformed ({first_line(exc)})") from None
    for sparse in proto.graph.sparse_initializer:
        out[sparse.values.name] = dense_of_sparse(sparse)
    return out


def dense_of_sparse(sparse: Any) -> np.ndarray:
    """The dense array of an ONNX sparse tensor (indices linear, shape [NNZ], or coordinates, [NNZ, rank])."""
    from onnx import numpy_helper

    name = sparse.values.name
    try:
        values, indices = numpy_helper.to_array(sparse.values), numpy_helper.to_array(sparse.indices)
        shape = tuple(int(d) for d in sparse.dims)
        dense = np.zeros(int(np.prod(shape)), dtype=values.dtype)
        if indices.ndim == 2:
            indices = np.ravel_multi_index(tuple(indices.T), shape)
        if values.ndim != 1 or indices.shape != values.shape:
            raise ValueError(f"{values.shape[0] if values.ndim else 0} values for indices of shape {indices.shape}")
        if indices.size and not 0 <= int(indices.min()) <= int(indices.max()) < dense.size:
            raise ValueError(f"an index outside the {dense.size} values of shape {shape}")
        dense[indices] = values
    except Exception as exc:  # onnx's and numpy's errors for data that does not fit its shape
        raise AcdcError(f"ONNX sparse initializer {name!r} is malformed ({first_line(exc)})") from None
    return dense.reshape(shape)


# bytes per kept value of a sparse initializer: the fp32 value and its int64 linear index (ONNX's index type)
SPARSE_BYTES_PER_VALUE = 4 + 8


def to_sparse_initializers(proto: Any, names: list[str]) -> list[str]:
    """Move each initializer named in ``names`` into ``graph.sparse_initializer`` (its non-zero values and their
    linear indices) where that makes it smaller: more than 2/3 zeros for fp32. Returns the names moved."""
    from onnx import helper, numpy_helper

    wanted, moved, kept = set(names), [], []
    for init in proto.graph.initializer:
        value = numpy_helper.to_array(init) if init.name in wanted else None
        nonzero = None if value is None else np.flatnonzero(value)
        if value is None or value.dtype != np.float32 or \
                len(nonzero) * SPARSE_BYTES_PER_VALUE >= value.size * value.itemsize:
            kept.append(init)
            continue
        values = numpy_helper.from_array(value.reshape(-1)[nonzero], init.name)
        indices = numpy_helper.from_array(nonzero.astype(np.int64), f"{init.name}.indices")
        proto.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(value.shape)))
        moved.append(init.name)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return moved


def session(model: bytes | str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of a model (file or serialized bytes)."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's concern
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise AcdcError(f"ONNX Runtime cannot load {'the model' if isinstance(model, bytes) else model} "
                        f"({first_line(exc)})") from None


class OnnxRuntimeModule(nn.Module):
    """An ONNX Runtime session as a module: ``forward(images) -> logits`` on the CPU, in fp32.

    A model exported with a fixed batch size gets its input in chunks of that size, the last one padded.
    """

    def __init__(self, sess: Any) -> None:
        super().__init__()
        self.session = sess
        first = sess.get_inputs()[0]
        self.input_name = first.name
        batch = first.shape[0] if first.shape else None
        self.batch = batch if isinstance(batch, int) and batch > 0 else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.batch is None:
            return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
        outputs = []
        for start in range(0, len(array), self.batch):
            chunk = array[start:start + self.batch]
            count = len(chunk)
            if count < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - count, *chunk.shape[1:]), chunk.dtype)])
            outputs.append(self.session.run(None, {self.input_name: chunk})[0][:count])
        return torch.from_numpy(np.concatenate(outputs))


def read_onnx(path: Path) -> tuple[Any, dict[str, str]]:
    """(the ONNX model, its metadata props) of an acdc ONNX export; anything else is a one-line AcdcError."""
    onnx, _ = require_onnx()
    path = Path(path)
    if not path.is_file():
        raise AcdcError(f"no such file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise AcdcError(f"{path} is not a readable ONNX file ({first_line(exc)})") from None
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    if meta.get("format") != ONNX_FORMAT:
        raise AcdcError(f"{path} is an ONNX file but not an acdc export (it carries no acdc metadata)")
    # acdc writes every initializer into the file; one pointing elsewhere would make the readers open that path
    tensors = [*proto.graph.initializer, *(t for sparse in proto.graph.sparse_initializer
                                           for t in (sparse.values, sparse.indices))]
    external = [t.name for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise AcdcError(f"{path}: initializer {external[0]!r} points to external data, which acdc does not read")
    check_tensor_sizes(proto, path)
    return proto, meta


# any one tensor a graph computes for one batch: 4 GiB is a thousand times a ResNet-50 activation at 224 pixels
MAX_ONNX_TENSOR_BYTES = 2**32


def check_tensor_sizes(proto: Any, path: Path) -> None:
    """Refuse, before ONNX Runtime allocates it, a graph whose shapes (inferred from its initializers and constant
    shapes: a ConstantOfShape of 10**10 floats) make some tensor larger than MAX_ONNX_TENSOR_BYTES. Shapes that
    depend on the input (a dynamic batch) count at one."""
    onnx, _ = require_onnx()
    try:
        inferred = onnx.shape_inference.infer_shapes(_sparse_as_inputs(onnx, proto), data_prop=True)
    except Exception as exc:  # shape inference raises its own errors for inconsistent graphs
        raise AcdcError(f"{path}: the ONNX graph's shapes are inconsistent ({first_line(exc)})") from None
    graph = inferred.graph
    for info in (*graph.value_info, *graph.output):
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        elements = 1
        for dim in tensor_type.shape.dim:
            elements *= dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 1
        itemsize = _itemsize(onnx, tensor_type.elem_type)
        if elements * itemsize > MAX_ONNX_TENSOR_BYTES:
            raise AcdcError(f"{path}: the ONNX graph computes {info.name!r} of {elements:,} elements "
                            f"({elements * itemsize / 2**30:.1f} GiB), above the "
                            f"{MAX_ONNX_TENSOR_BYTES // 2**30} GiB acdc runs")


def _sparse_as_inputs(onnx: Any, proto: Any) -> Any:
    """``proto`` for shape inference: ONNX's inference types a sparse initializer as a sparse tensor and then refuses
    the dense type the graph gives it, so each one becomes a graph input of its dense shape (a copy; the file's graph
    is left as it is)."""
    if not len(proto.graph.sparse_initializer):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for sparse in copy.graph.sparse_initializer:
        copy.graph.input.append(onnx.helper.make_tensor_value_info(sparse.values.name, sparse.values.data_type,
                                                                   list(sparse.dims)))
    del copy.graph.sparse_initializer[:]
    return copy


def _itemsize(onnx: Any, elem_type: int) -> int:
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 1


def output_classes(proto: Any) -> int | None:
    """The class scores an ONNX classifier gives per image: the last dimension of its first output, where fixed."""
    outputs = proto.graph.output
    if not outputs:
        return None
    dims = outputs[0].type.tensor_type.shape.dim
    if not dims or not dims[-1].HasField("dim_value"):
        return None
    return int(dims[-1].dim_value)


def is_onnx_file(path: Path) -> bool:
    """Whether ``path`` names an ONNX file (by its suffix: ONNX has no magic number)."""
    return Path(path).suffix.lower() == ".onnx"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else exc.__class__.__name__
