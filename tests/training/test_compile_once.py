"""Static shapes under torch.compile, and how often a run evaluates.

A compiled ``acdc train`` run (inductor on the CPU) whose training split ends in a short batch compiles its training
step exactly once: the loader drops the short batch, and the graphs are static, so no later batch, phase change or
evaluation pass makes a second (or a dynamic-shape) training graph. The validation forward is compiled too, one
static graph per batch size it sees. ``runtime.eval_every`` evaluates every N-th epoch and always the last epoch of
every phase; the other epochs write null for the val keys and change nothing else.
"""

from __future__ import annotations

import torch
from cli_helpers import needs_cpp_compiler
from rich.console import Console

from acdc_cli.config import load_settings
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.training import loop as train
from acdc_cli.training.checkpoints import state_path

DIGITS_TRAIN, BATCH, VAL, EVAL_BATCH = 1257, 64, 270, 100  # the quickstart's split; 1257 = 19 x 64 + 41


def _schedule(epochs: int, warmup: int = 1, compressed: int = 1, decompressed: int = 1, final: int = 1) -> list[str]:
    return [f"schedule.epochs={epochs}", f"schedule.warmup_epochs={warmup}", f"schedule.compressed_epochs={compressed}",
            f"schedule.decompressed_epochs={decompressed}", f"schedule.final_compressed_epochs={final}"]


def _settings(*overrides: str):
    return load_settings(overrides=["runtime.device='cpu'", "runtime.threads=1", "log.tensorboard=false",
                                    "log.progress=false", *overrides])


@needs_cpp_compiler
def test_a_compiled_run_with_a_short_last_batch_compiles_its_training_step_once(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    graphs: list[tuple[bool, tuple[int, ...], bool]] = []  # (grad mode, image batch shape, every size static)

    def inductor_recording(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
        images = [t for t in tensors if t.dim() == 4 and tuple(t.shape[1:]) == (1, 8, 8)]
        static = all(isinstance(size, int) for t in tensors for size in t.shape)
        graphs.append((torch.is_grad_enabled(), tuple(images[0].shape) if images else (), static))
        return compile_fx(gm, example_inputs)  # inductor, as torch.compile's default backend

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=inductor_recording, **kw))
    assert DIGITS_TRAIN % BATCH and VAL % EVAL_BATCH  # both splits end in a short batch
    # a dense epoch, then a compressed one: the mask change and two evaluation passes between training steps
    settings = _settings("runtime.compile=true", f"data.eval_batch_size={EVAL_BATCH}", *_schedule(2))
    torch._dynamo.reset()
    counters.clear()
    train.run(settings, tmp_path, console=Console(quiet=True))
    training = [g for g in graphs if g[0]]
    evaluation = [g for g in graphs if not g[0]]
    assert training == [(True, (BATCH, 1, 8, 8), True)], graphs
    # one static graph per evaluation batch size (100, and the short 70), however many epochs evaluate
    assert sorted(evaluation) == [(False, (VAL % EVAL_BATCH, 1, 8, 8), True), (False, (EVAL_BATCH, 1, 8, 8), True)]
    assert counters["stats"]["unique_graphs"] == len(graphs) == 3
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["phase"] for r in rows] == ["dense", "sparse"] and all(r["val_top1"] is not None for r in rows)


def _run_rows(path, *overrides: str) -> list[dict]:
    path.mkdir()
    train.run(_settings("runtime.deterministic=true", *overrides), path, console=Console(quiet=True))
    return read_jsonl(path / "metrics.jsonl")


def test_eval_every_evaluates_every_nth_epoch_and_each_phase_end(tmp_path, monkeypatch):
    # dense 0-2, compressed 3-4, dense 5, compressed 6-7: phases end at epochs 2, 4, 5 and 7
    schedule = _schedule(8, warmup=3, compressed=2, decompressed=1, final=2)
    every = _run_rows(tmp_path / "every", *schedule)
    passes: list[int] = []
    real_evaluate = train.evaluation.evaluate_sharded
    monkeypatch.setattr(train.evaluation, "evaluate_sharded", lambda *a, **kw: passes.append(1) or real_evaluate(*a, **kw))
    fourth = _run_rows(tmp_path / "fourth", *schedule, "runtime.eval_every=4")
    evaluated = [r["epoch"] for r in fourth if r["val_top1"] is not None]
    assert evaluated == [2, 3, 4, 5, 7] and len(passes) == 5  # epochs 4 and 8 counted from 1, and the phase ends
    for a, b in zip(every, fourth):
        skipped = b["epoch"] not in evaluated
        for key in ("val_loss", "val_top1", "val_top5"):
            assert (b[key] is None) if skipped else (b[key] == a[key]), (b["epoch"], key)
        # no evaluation changes training: the same weights, the same training metrics
        for key in ("train_loss", "train_top1", "sparsity", "lr", "phase"):
            assert b[key] == a[key], (b["epoch"], key)
    state = torch.load(state_path(tmp_path / "fourth"), weights_only=True)["progress"]
    assert state["best_sparse"]["epoch"] in (3, 4, 7) and state["best_dense"]["epoch"] in (2, 5)
