"""Shared fixtures. The suite is hermetic: nothing from the caller's environment, terminal width or machine reaches a
test (see ``_hermetic``); the quickstart run and its 2:4 pruning are made once per session and shared."""

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import PINNED, invoke, invoke_json, torch_state_kept
from hypothesis import HealthCheck, core
from hypothesis import settings as hypothesis_settings

from acdc_cli import testing_hooks

# the tests' own models (tiny-test), which acdc does not ship: registered here for this process, and through
# support/sitecustomize.py for every Python process a test starts (the folder goes on their PYTHONPATH in _hermetic)
SUPPORT = Path(__file__).resolve().parent / "support"
sys.path.insert(0, str(SUPPORT))

from acdc_test_models import register_test_models  # noqa: E402

register_test_models()

# variables that change what acdc does: its settings, torchrun's process-group setup, the test fault hooks, the
# tracking services' (MLFLOW_TRACKING_URI alone turns MLflow on)
_CLEARED_PREFIXES = ("ACDC_", "_ACDC_", "TORCHELASTIC_", "MLFLOW_", "WANDB_")
_CLEARED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
# the caller's terminal: its size (the CLI run in this process gets a wide one from cli_helpers.invoke, a subprocess
# rich's fixed default for a pipe) and rich's overrides that make a pipe count as a colour terminal; nothing depends
# on the shell that started pytest
_TERMINAL_SIZE = ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


@pytest.fixture(scope="session", autouse=True)
def _hermetic():
    """The whole session runs without the caller's ACDC_* settings, torchrun variables, test hooks' variables or
    terminal size (subprocesses inherit the cleaned environment), and with the test models in every process it
    starts (support/ on PYTHONPATH, after the caller's entries).

    Session scope, so that session- and module-scoped runs (the quickstart) see the same environment as tests.
    """
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(_CLEARED_PREFIXES) or name in _CLEARED or name in _TERMINAL_SIZE:
                mp.delenv(name)
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(SUPPORT)])))
        yield


@pytest.fixture(autouse=True)
def _restore_process_state():
    """In-process runs set torch's thread count (runtime.threads) and deterministic mode, and the fault hooks count
    writes: each test starts from the same state."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    testing_hooks.reset()
    yield
    testing_hooks.reset()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def one_thread():
    """One torch thread: on a machine shared with other test runs, spinning OpenMP threads of several processes
    slow each other down several-fold; small passes gain little from a second thread."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """The README's quickstart (`acdc train --out DIR`), pinned to the CPU, deterministic algorithms and one thread
    so that its numbers mean the same on any machine (a CUDA machine would otherwise train on the GPU); returns
    DIR. What it printed is in DIR/../stdout.txt."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    with torch_state_kept():
        result = invoke("train", "--out", run_dir, *PINNED)
    assert result.exit_code == 0, result.output + repr(result.exception)
    (run_dir.parent / "stdout.txt").write_text(result.stdout)  # the rows and the summary panel it printed
    return run_dir


@pytest.fixture(scope="session")
def quickstart_24(quickstart_run, tmp_path_factory) -> tuple[Path, dict]:
    """`acdc prune best_dense.safetensors --structure 2:4 --json` of the quickstart: the file and its report."""
    out = tmp_path_factory.mktemp("prune24") / "p24.safetensors"
    report = invoke_json("prune", quickstart_run / "best_dense.safetensors", "--structure", "2:4", "-o", out)
    return out, report


# ----------------------------------------------------------------------------------------------------------------
# Hypothesis: the same examples on every CI run; elsewhere new ones each run, with the seed printed to repeat them

# Checks about speed (generation time, deadlines) measure the machine, not the code: on two busy cores they would fail
# a correct run, so neither profile has them; a test that adds its own suppressions keeps these (see FUZZ in test_fuzz)
SPEED_CHECKS = (HealthCheck.too_slow, HealthCheck.large_base_example, HealthCheck.data_too_large)
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None,
                                     suppress_health_check=SPEED_CHECKS)
hypothesis_settings.register_profile("dev", print_blob=True, deadline=None, suppress_health_check=SPEED_CHECKS)
_ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
hypothesis_settings.load_profile("ci" if _ON_CI else "dev")


def pytest_configure(config):
    if _ON_CI:
        return
    seed = config.getoption("hypothesis_seed", None)
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
        core.global_force_seed = seed
    config._acdc_hypothesis_seed = seed


def pytest_report_header(config):
    if _ON_CI:
        return "hypothesis: profile 'ci' (derandomized: the same examples every run)"
    seed = config._acdc_hypothesis_seed
    return f"hypothesis: profile 'dev', seed {seed} (repeat these examples with --hypothesis-seed={seed})"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _ON_CI and exitstatus:
        seed = config._acdc_hypothesis_seed
        terminalreporter.write_line(f"hypothesis seed of this run: {seed} (pytest --hypothesis-seed={seed})")
