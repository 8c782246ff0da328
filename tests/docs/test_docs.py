"""Every shell command in README.md and docs/*.md is run by a test. The fenced ``bash`` blocks are collected; each
command is matched by exactly one rule below that says where it runs:

- ``here``: this file runs it as written, with the placeholders of the docs (``runs/<run>``, ``~/data/cifar``) made
  real (the quickstart's run dir, a temporary folder);
- ``plan``: a command that trains for hours on data this machine lacks: this file runs it with ``--dry-run`` added
  (the preset, flags and data path must resolve), and the named slow test trains it end to end;
- a test id (``tests/test_x.py::test_name``) that runs the command, or the command in the shape a test can run;
- ``.ci/run``: CI runs it as written.

A command no rule matches, a rule no command uses, or a test id that does not exist fails the suite, so the docs and
the tests cannot drift apart."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import PINNED, invoke, short_schedule

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.S | re.M)


def doc_commands() -> list[tuple[str, str]]:
    """(document, command) for every command line of every fenced shell block: continuations joined, comments and
    repeated whitespace dropped."""
    found = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    found.append((doc.relative_to(ROOT).as_posix(), re.sub(r"\s+", " ", line)))
    return found


# (pattern matched against the start of the command, where it runs); the first match wins
RULES: list[tuple[str, str]] = [
    (r"python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e '\.\[dev\]' && acdc train$", ".ci/run"),
    (r"pytest$", ".ci/run"),
    (r"pytest -m slow$", ".ci/run"),
    (r"pip install -e '\.\[dev\]'$", ".ci/run"),
    (r"acdc (train|eval|export) (--set data\.name=imagefolder --data-dir my_images |runs/mine/)",
     "tests/data/test_own_folder.py::test_the_readme_trains_evaluates_and_exports_a_folder_of_your_own"),
    (r"pytest -m gpu$", "tests/commands/test_bench.py::test_gpu_check_script_rehearses_on_the_cpu"),
    (r"pytest -m interop$", "tests/files/test_export.py::test_compressed_tensors_decompresses_rows_bit_exactly"),
    (r"acdc train --dry-run > my\.toml && acdc train --config my\.toml$", "here"),
    (r"acdc train (--preset [\w-]+ )?--dry-run", "here"),
    (r"acdc train --preset wrn-cifar100-95 --data-dir \S+ --out runs/wrn95$",
     "plan tests/training/test_paper_runs.py::test_wrn_cifar100_95_runs_end_to_end_and_ends_at_95_percent"),
    (r"acdc train --preset wrn-cifar100-95 --data-dir",
     "plan tests/training/test_paper_runs.py::test_wrn_cifar100_95_runs_end_to_end_and_ends_at_95_percent"),
    (r"acdc train --preset resnet20-cifar10-memorization-90 ",
     "plan tests/training/test_paper_runs.py::test_resnet20_memorization_logs_memorized_accuracy_every_epoch"),
    (r"acdc train --preset resnet50-imagenet-90-ftdense --from ",
     "plan tests/training/test_paper_runs.py::test_2of4_preset_end_to_end_then_ftdense_continues_the_cosine"),
    (r"acdc train --preset resnet50-imagenet-90 --data-dir \S+ --nproc 8 ",
     "plan tests/training/test_distributed.py::test_nproc_2_quickstart_agrees_with_single_process"),
    (r"acdc train --preset resnet50-imagenet-90 ",
     "plan tests/training/test_paper_runs.py::test_2of4_preset_end_to_end_then_ftdense_continues_the_cosine"),
    (r"acdc train --preset mobilenet-imagenet-75 ",
     "plan tests/models/test_model_families.py::test_family_trains_resumes_and_every_command_reads_its_files"),
    (r"acdc (eval|export|prune) (runs/<run>/|runs/wrn95/|best_dense|pruned24|model\.onnx)", "here"),
    (r"acdc (eval|export) runs/r18/",
     "tests/models/test_model_families.py::test_family_trains_resumes_and_every_command_reads_its_files"),
    (r"acdc export ckpt\.safetensors -f onnx .*--batch 1 --opset 18", "tests/files/test_onnx.py::test_fixed_batch_and_opset"),
    (r"trtexec ", "tests/gpu/test_gpu.py::test_tensorrt_builds_a_sparse_engine_from_the_2_4_export"),
    (r"torchrun --standalone ", "tests/training/test_distributed.py::test_nproc_2_quickstart_agrees_with_single_process"),
    (r"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 2 --nproc-per-node 8 --max-restarts \d+ .* "
     r"--auto-resume ",
     "tests/training/test_elastic.py::test_rank_0_killed_between_checkpoint_writes"),
    (r"torchrun --nnodes 2 .* --out ", "tests/docs/test_docs.py::test_two_torchrun_agents_train_and_resume_one_run"),
    (r"torchrun --nnodes 2 .* --resume ", "tests/docs/test_docs.py::test_two_torchrun_agents_train_and_resume_one_run"),
    (r"for s in 0\.8 0\.9 0\.95; do acdc train ",
     "tests/commands/test_report.py::test_report_of_two_runs_writes_inline_html_and_pngs"),
    (r"acdc report runs/s0\.8 ", "tests/commands/test_report.py::test_report_of_two_runs_writes_inline_html_and_pngs"),
    (r"acdc train --set model\.name=torchvision:resnet18 ",
     "tests/models/test_model_families.py::test_train_from_local_weights_and_its_one_line_errors"),
]


def rule_of(command: str) -> str | None:
    return next((where for pattern, where in RULES if re.match(pattern, command)), None)


COMMANDS = doc_commands()
HERE = [(doc, cmd) for doc, cmd in COMMANDS if rule_of(cmd) == "here"]
PLANNED = [(doc, cmd) for doc, cmd in COMMANDS if (rule_of(cmd) or "").startswith("plan ")]


def _test_exists(test_id: str) -> bool:
    path, name = test_id.split("::")
    file = ROOT / path
    return file.exists() and re.search(rf"^def {re.escape(name)}\(", file.read_text(), re.M) is not None


def test_every_doc_command_is_run_by_a_test():
    assert len(COMMANDS) > 20 and {doc for doc, _ in COMMANDS} >= {"README.md", "docs/files.md", "docs/clusters.md"}
    unmatched = [f"{doc}: {cmd}" for doc, cmd in COMMANDS if rule_of(cmd) is None]
    assert not unmatched, "commands no test runs (add a rule and a test):\n" + "\n".join(unmatched)
    used = {pattern for pattern, _ in RULES if any(re.match(pattern, cmd) for _, cmd in COMMANDS)}
    unused = set(dict(RULES)) - used
    assert not unused, f"rules for commands the docs no longer hold: {unused}"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci = {*ci_lines, *(part for line in ci_lines for part in line.split(" && "))}
    for doc, cmd in COMMANDS:
        where = rule_of(cmd).removeprefix("plan ")
        if where == ".ci/run":
            assert cmd in ci, f"{doc}: {cmd!r} is not a command of .ci/run"
        elif where != "here":
            assert _test_exists(where), f"{doc}: {cmd!r} names {where}, which does not exist"


def test_readme_setup_commands_are_the_ci_script():
    """README's two set-up commands are .ci/run's, exactly (and it runs nothing the README does not show but the
    slow pass)."""
    readme = [cmd for doc, cmd in COMMANDS if doc == "README.md"][:2]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [*readme, "pytest -m slow"]


@pytest.fixture
def places(quickstart_run, tmp_path, monkeypatch) -> dict[str, str]:
    """The docs' placeholders made real: a run dir is the quickstart's, data folders are an empty folder, and
    relative outputs land in a temporary working folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    return {"runs/<run>/": f"{quickstart_run}/", "runs/wrn95/": f"{quickstart_run}/", "~/data/cifar": "data",
            "~/data/imagenet": "data", "/data/imagenet": "data",
            " best_dense.safetensors": f" {quickstart_run}/best_dense.safetensors"}


def _acdc(command: str, places: dict[str, str], *extra: str):
    """One ``acdc ...`` command line (with ``> FILE`` redirection) in this process; asserts exit 0."""
    for placeholder, real in places.items():
        command = command.replace(placeholder, real)
    words = shlex.split(command)
    target = None
    if ">" in words:
        words, target = words[:words.index(">")], words[words.index(">") + 1]
    assert words[0] == "acdc", command
    with torch.random.fork_rng():
        result = invoke(*words[1:], *extra)
    assert result.exit_code == 0, f"{command}\n{result.output}{result.exception!r}"
    if target:
        Path(target).write_text(result.stdout)
    return result


def _run_here(command: str, places: dict[str, str], *extra: str) -> None:
    # the onnx commands need the optional extra; the suite installs nothing
    if "onnx" in command:
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    for part in command.split(" && "):
        _acdc(part, places, *extra)


# run in the order the docs give them: a command may read what an earlier one of its document wrote
@pytest.mark.parametrize(("doc", "command"), HERE, ids=[f"{d}:{c[:60]}" for d, c in HERE])
def test_doc_command_runs_as_written(doc, command, places):
    if command.endswith("acdc train --config my.toml"):
        # the quickstart trains in the slow pass (test below); here its plan must read back unchanged
        _acdc("acdc train --dry-run > my.toml", places)
        assert _acdc("acdc train --config my.toml --dry-run", places).stdout == Path("my.toml").read_text()
        return
    if "model.onnx" in command and not command.startswith("acdc export"):
        _run_here("acdc export runs/<run>/best_sparse.safetensors --format onnx -o model.onnx", places)
    if command.startswith("acdc export pruned24"):
        _run_here("acdc prune best_dense.safetensors --structure 2:4 -o pruned24.safetensors", places)
    _run_here(command, places)


@pytest.mark.slow
def test_dry_run_output_trains_as_a_config_file(places):
    """settings.md: `acdc train --dry-run > my.toml && acdc train --config my.toml`, the quickstart in full."""
    _acdc("acdc train --dry-run > my.toml", places)
    result = _acdc("acdc train --config my.toml --out run", places, *PINNED)
    assert "best sparse" in result.stdout.lower() and (Path("run") / "best_sparse.safetensors").exists()


@pytest.mark.parametrize(("doc", "command"), PLANNED, ids=[f"{d}:{c[:60]}" for d, c in PLANNED])
def test_long_training_command_resolves_its_plan(doc, command, places):
    """A paper run as the docs write it: preset, flags and paths resolve and plan (`--dry-run`); the run itself is
    trained, shortened, by the slow test its rule names."""
    _acdc(command, places, "--dry-run")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two torchrun agents of one process each, twice: a stopped 6-epoch run, then its resume
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two agents on the CPU need two cores")
def test_two_torchrun_agents_train_and_resume_one_run(tmp_path):
    """clusters.md's several-machines commands on one host: two torchrun agents meet at a c10d rendezvous, train
    one run dir together, and `--resume` under the same rendezvous continues it."""

    def agents(env: dict[str, str], *acdc_args: str) -> None:
        endpoint = f"127.0.0.1:{_free_port()}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "docs",
                   "-m", "acdc_cli", "train", *acdc_args]
        procs = [subprocess.Popen(command, cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=900) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]

    run = tmp_path / "run"
    # a scheduler's SIGTERM to rank 0 after epoch 2: both ranks stop at the same step with a checkpoint, exit 0
    agents({"_ACDC_TEST_SIGNAL": "SIGTERM@epoch=2,step=end,rank=0"}, "--out", str(run),
           *short_schedule(6, 1, 1, 1, 2), "--set", "runtime.device=cpu")
    stopped = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(stopped) < 6
    agents({}, "--resume", str(run))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in rows] == list(range(6))
    assert all(len(r["mask_checksums"]) == 2 for r in rows if r["mask_checksums"])


def test_api_doc_example_is_the_one_the_api_test_runs():
    """docs/api.md repeats the README's Python example, which tests/engine/test_api.py runs as written: they stay equal."""
    python = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
    readme = python.findall((ROOT / "README.md").read_text().split("## Python API", 1)[1])
    assert readme and python.findall((ROOT / "docs" / "api.md").read_text())[:1] == readme[:1]
