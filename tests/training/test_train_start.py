"""The Python entry point of a run, ``acdc_cli.training.start``: the CLI's checks and one-line errors without Typer."""

import shutil
from pathlib import Path

import pytest
from cli_helpers import fails

from acdc_cli.config import load_settings
from acdc_cli.errors import AcdcError
from acdc_cli.training import start


def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``run_dir`` with its size and modification time: what a refused start must leave alone."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(quickstart_run, tmp_path) -> Path:
    return Path(shutil.copytree(quickstart_run, tmp_path / "run"))


def test_resume_refuses_a_changed_seed_as_the_cli_does(finished):
    settings = start.resolve_settings(resume=finished)
    changed = load_settings(base=settings.model_dump(mode="json"), overrides=["runtime.seed=7"])
    before = _files(finished)
    with pytest.raises(AcdcError) as refused:
        start.train(changed, out=finished, resume=True)
    assert _files(finished) == before
    message = str(refused.value)
    assert "\n" not in message and message.startswith("cannot change runtime.seed when resuming (")
    assert fails(["train", "--resume", finished, "--seed", "7"]) == f"error: {message}"
    assert _files(finished) == before


def test_resume_refuses_force_and_a_missing_run_dir(finished, tmp_path):
    settings = start.resolve_settings(resume=finished)
    with pytest.raises(AcdcError, match="in place; drop --out/--force"):
        start.train(settings, out=finished, resume=True, force=True)
    with pytest.raises(AcdcError, match="is not an acdc run dir"):
        start.train(settings, out=tmp_path / "nothing", resume=True)
    assert not (tmp_path / "nothing").exists()


def test_a_new_run_refuses_a_non_empty_run_dir_before_writing(finished):
    before = _files(finished)
    with pytest.raises(AcdcError, match="is not empty; pass --resume"):
        start.train(load_settings(), out=finished)
    assert _files(finished) == before


def test_nproc_ranks_resume_with_exactly_the_settings_that_differ(finished, tmp_path):
    """What --nproc hands each rank of a resumed run: --resume and a --set for every setting that differs from the
    run's own (labels such as preset are never --set)."""
    settings = start.resolve_settings(resume=finished)
    threads = (settings.runtime.threads or 1) + 1
    changed = settings.model_copy(update={"runtime": settings.runtime.model_copy(update={"threads": threads}),
                                          "log": settings.log.model_copy(update={"every_steps": 3})})
    assert start._rank_argv(settings, finished, True, None, tmp_path) == ["train", "--resume", str(finished)]
    assert start._rank_argv(changed, finished, True, None, tmp_path) == [
        "train", "--resume", str(finished), "--set", f"runtime.threads={threads}", "--set", "log.every_steps=3"]
