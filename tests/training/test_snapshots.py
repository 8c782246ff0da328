"""Checkpoint snapshots and how they are written: reused host buffers (pinned, with non-blocking copies and an event
on CUDA), the writer waiting for the previous write before a snapshot reuses its buffers, and safetensors files
written piece by piece (the same file safetensors writes, without building it in one bytes object)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from acdc_cli.config import load_settings
from acdc_cli.engine import ACDC
from acdc_cli.files.atomic import _split_at
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.tensors import read_metadata, safetensors_pieces, save_safetensors
from acdc_cli.files.torchfile import load_state, save_state
from acdc_cli.models import create
from acdc_cli.sparsity.schedule import Phase
from acdc_cli.training import checkpoints
from acdc_cli.training.distributed import DistInfo
from acdc_cli.training.snapshots import HostSnapshot


def _joined(pieces) -> bytes:
    return b"".join(bytes(memoryview(piece).cast("B")) for piece in pieces)


def test_safetensors_pieces_are_the_file_safetensors_writes():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g), "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.randn(5, generator=g).half(), "brain": torch.randn(3, 2, generator=g).bfloat16(),
        "mask.conv.weight": torch.randint(0, 2, (4, 3, 3, 3), generator=g, dtype=torch.uint8),
        "flags": torch.tensor([True, False, True]), "empty": torch.zeros(0, 3), "double": torch.ones(2).double(),
        "int8": torch.tensor([-3, 4], dtype=torch.int8),
    }
    metadata = {"format": "acdc-checkpoint", "config": '{"a": [1, 2]}', "note": "é \" \\ \n \x01 ∑"}
    data = _joined(safetensors_pieces(tensors, metadata))
    reference = st_save(tensors, metadata=metadata)
    # the same size (exports report file sizes computed with safetensors.torch.save) and the same content
    assert len(data) == len(reference)
    header_size = struct.unpack("<Q", data[:8])[0]
    assert header_size % 8 == 0 and data[8 + header_size - 1:8 + header_size] in (b" ", b"}")
    back = st_load(data)
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape and torch.equal(back[name], tensor)
    # every tensor starts at a multiple of its element size: largest elements first
    header = json.loads(data[8:8 + header_size])
    assert header.pop("__metadata__") == metadata
    assert all(info["data_offsets"][0] % tensors[name].element_size() == 0 for name, info in header.items())


def test_safetensors_pieces_fall_back_for_a_dtype_they_do_not_name(tmp_path):
    tensors = {"c": torch.ones(2, dtype=torch.complex64), "f": torch.ones(3)}
    pieces = safetensors_pieces(tensors, {"k": "v"})
    assert len(pieces) == 1 and pieces[0] == st_save(tensors, metadata={"k": "v"})


def test_the_written_file_is_read_back_by_safetensors(tmp_path):
    tensors = {"w": torch.randn(64, 32).to(memory_format=torch.contiguous_format), "b": torch.arange(5)}
    save_safetensors(tmp_path / "x.safetensors", {"w": tensors["w"].t(), "b": tensors["b"]}, {"epoch": 3})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"epoch": "3"}
        assert torch.equal(fh.get_tensor("w"), tensors["w"].t()) and torch.equal(fh.get_tensor("b"), tensors["b"])


@pytest.mark.parametrize("offset", range(8))
def test_split_at_cuts_the_pieces_where_their_bytes_would_be_cut(offset):
    pieces = [memoryview(b"abc"), memoryview(b""), memoryview(b"defg")]
    first, second = _split_at(pieces, offset)
    assert _joined(first) == b"abcdefg"[:offset] and _joined(second) == b"abcdefg"[offset:]


def test_host_snapshot_copies_into_reused_buffers_that_share_nothing_with_training():
    host = HostSnapshot()
    live = {"w": torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last), "n": torch.tensor(2),
            "nested": [torch.ones(2), (torch.zeros(1), "text")]}
    with host.taking() as taken:
        first = host.copy(live, "state")
    taken.wait()
    assert torch.equal(first["w"], live["w"]) and first["w"].is_contiguous()  # written as it is
    assert first["nested"][1][1] == "text" and isinstance(first["nested"][1], tuple)
    live["w"].add_(1.0)
    live["nested"][0].add_(1.0)
    assert not torch.equal(first["w"], live["w"]) and torch.equal(first["nested"][0], torch.ones(2))
    pointers = {id(t): t.data_ptr() for t in (first["w"], first["n"])}
    with host.taking():
        second = host.copy(live, "state")
    assert second["w"].data_ptr() == pointers[id(first["w"])]  # the same memory, now holding the new values
    assert torch.equal(second["w"], live["w"])
    # a tensor that changed shape gets a new buffer; one no longer copied frees its buffer
    with host.taking():
        third = host.copy({"w": torch.zeros(2, 2)}, "state")
    assert third["w"].shape == (2, 2) and set(host._buffers) == {("state", "w")}


def _store(tmp_path: Path):
    settings = load_settings(overrides=["model.name='tiny-test'", "runtime.device='cpu'"])
    torch.manual_seed(0)
    model = create("tiny-test", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = ACDC.from_settings(settings, model, optimizer)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    store = checkpoints.RunDir(tmp_path, settings, {"num_classes": 10}, model, engine, optimizer,
                          torch.amp.GradScaler("cpu", enabled=False), DistInfo(0, 1, 0, torch.device("cpu")))
    return store, model, optimizer


def test_each_save_waits_for_the_previous_write_before_reusing_its_buffers(tmp_path, monkeypatch):
    """The second snapshot is only taken once the first file is written, and each file holds the weights and
    momentum of its own moment, although training changed them in between."""
    store, model, optimizer = _store(tmp_path)
    idle_at_take: list[bool] = []  # whether no write was in flight when each snapshot began
    real_taking = store._host.taking
    monkeypatch.setattr(store._host, "taking",
                        lambda: idle_at_take.append(store._writer._thread is None) or real_taking())
    written: list[tuple[dict, dict]] = []
    real_write = checkpoints._write_checkpoints

    def spy(run_dir, ckpt, state, best_path):
        real_write(run_dir, ckpt, state, best_path)
        written.append((load_checkpoint(run_dir / "last.safetensors").weights,
                        load_state(run_dir / read_metadata(run_dir / "last.safetensors")["resume_state"])["optimizer"]))

    monkeypatch.setattr(checkpoints, "_write_checkpoints", spy)
    dense = Phase(0, 5, "dense", 0.0)
    expected = []
    for epoch in range(2):
        expected.append(({k: v.clone() for k, v in model.state_dict().items()},
                         [s["momentum_buffer"].clone() for s in optimizer.state.values()]))
        store.save_epoch(dense, {"epoch": epoch, "val_top1": 0.1 * epoch})
        with torch.no_grad():  # training goes on while the file is written
            for p in model.parameters():
                p.add_(1.0)
            for state in optimizer.state.values():
                state["momentum_buffer"].mul_(-2.0)
    store.wait()
    assert idle_at_take == [True, True] and len(written) == 2
    for (weights, momentum), (file_weights, file_optimizer) in zip(expected, written):
        assert all(torch.equal(weights[k], file_weights[k]) for k in weights)
        buffers = [s["momentum_buffer"] for s in file_optimizer["state"].values()]
        assert all(torch.equal(a, b) for a, b in zip(momentum, buffers)) and len(buffers) == len(momentum)


def test_state_file_is_torch_save_of_the_state(tmp_path):
    state = {"progress": {"epoch": 2}, "optimizer": {"state": {0: {"momentum_buffer": torch.arange(6.0)}}}}
    save_state(tmp_path / "s.pt", state)
    expected = io.BytesIO()
    torch.save(state, expected)
    assert (tmp_path / "s.pt").read_bytes() == expected.getvalue()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_snapshots_are_pinned_non_blocking_and_exact(tmp_path):
    """On CUDA: the buffers are pinned; the copies are queued behind the kernels already queued and land before the
    writer reads them, so work queued after the snapshot never reaches the file; a RunDir save of a CUDA model
    writes exactly the weights and momentum of its moment."""
    cuda = torch.device("cuda")
    host = HostSnapshot()
    big = torch.zeros(64, 1024, 1024, device=cuda)  # 256 MiB: the copy takes long enough to overlap
    big.add_(1.0)  # queued before the snapshot: the snapshot holds ones
    with host.taking() as taken:
        copy = host.copy({"big": big}, "x")["big"]
    big.mul_(3.0)  # queued after: never in the snapshot
    taken.wait()
    assert copy.is_pinned() and copy.device.type == "cpu"
    assert bool((copy == 1.0).all())
    assert bool((big == 3.0).all())

    store, model, optimizer = _store(tmp_path)
    model.to(cuda).to(memory_format=torch.channels_last)
    for state in optimizer.state.values():
        state["momentum_buffer"] = state["momentum_buffer"].to(cuda)
    store.info = DistInfo(0, 1, 0, cuda)
    weights = {k: v.cpu().clone() for k, v in model.state_dict().items()}
    store.save_epoch(Phase(0, 5, "dense", 0.0), {"epoch": 0, "val_top1": 0.5})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    store.wait()
    saved = load_checkpoint(tmp_path / "last.safetensors").weights
    assert all(torch.equal(weights[k], saved[k]) for k in weights)
    assert all(t.is_pinned() for t in store._host._buffers.values() if t.numel())
