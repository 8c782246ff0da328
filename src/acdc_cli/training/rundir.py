"""The run directory: its default name, the checks before a new run writes into one (never overwriting a
non-empty folder without --force), the settings a run recorded there, and the lock that lets one process at a time
write it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from acdc_cli.config import Settings, read_toml
from acdc_cli.errors import AcdcError
from acdc_cli.files.atomic import remove_stale_temps

RUN_MARKER = "config.toml"


CHECKPOINTS = ("last.safetensors", "best_sparse.safetensors", "best_dense.safetensors")


def default_run_dir(settings: Settings) -> Path:
    return Path("runs") / f"{settings.preset or 'custom'}-{datetime.now():%Y%m%d-%H%M%S}"


def check_new_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse a ``--out`` that already holds something, unless --force; reads only, so that nothing is written into
    a folder that is refused."""
    if run_dir.exists() and not run_dir.is_dir():
        raise AcdcError(f"--out {run_dir} exists and is not a folder")
    if run_dir.exists() and not force and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise AcdcError(f"run dir {run_dir} is not empty; pass --resume {run_dir} to continue it or --force to overwrite")


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Make the folder of a new run: checked again (under the run lock, :func:`run_lock`, so no other process is
    writing it), and with --force emptied of a previous run's files."""
    check_new_run_dir(run_dir, force)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / WRITE_PROBE
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise AcdcError(f"cannot write to run dir {run_dir}: {exc.strerror or exc}") from None
    if force:
        for name in ("metrics.jsonl", *CHECKPOINTS):
            (run_dir / name).unlink(missing_ok=True)
        for state in run_dir.glob("last.state*.pt"):
            state.unlink()
        remove_stale_temps(run_dir)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)


LOCK_FILE = ".acdc.lock"


# the file prepare_run_dir writes and deletes to see that the folder is writable
WRITE_PROBE = ".acdc-write-test"


def holds_nothing(run_dir: Path) -> bool:
    """True when ``run_dir`` is missing or holds nothing but what acdc makes before a run writes anything (the lock
    file, the write probe): the state another rank may see while rank 0 prepares a new run there."""
    return not run_dir.is_dir() or all(p.name in (LOCK_FILE, WRITE_PROBE) for p in run_dir.iterdir())


# set by `acdc train --nproc` while it holds the run lock for its ranks: its PID
LAUNCHER_LOCK_ENV = "_ACDC_RUN_LOCK_LAUNCHER"


@contextlib.contextmanager
def run_lock(run_dir: Path, *, for_ranks: bool = False) -> Iterator[None]:
    """Hold the run dir for writing: an exclusive ``flock`` on ``RUN_DIR/.acdc.lock`` (which holds this process's
    PID) until the block ends. A second process is refused with one line naming the holder, so two runs never write
    one folder. ``for_ranks``: the ranks this process launches (``--nproc``) write under its lock, and rank 0
    taking this lock then finds its launcher holding it and goes on. Creates the folder, and removes it again when
    the block leaves nothing in it but the lock file (a run that failed before it started)."""
    run_dir = Path(run_dir)
    created = []  # the folders this call makes, innermost first
    missing = run_dir.absolute()
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AcdcError(f"cannot write to run dir {run_dir}: {exc.strerror or exc}") from None
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise AcdcError(f"cannot write {run_dir / LOCK_FILE}: {exc.strerror or exc}") from None
    launcher = os.environ.get(LAUNCHER_LOCK_ENV)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if not (holder and holder == launcher):
                raise AcdcError(f"run dir {run_dir} is in use by another acdc process (PID {holder or 'unknown'}, "
                                f"holding {LOCK_FILE}); one process writes a run at a time: wait for it to end, or "
                                "stop it (SIGTERM checkpoints it) and --resume") from None
            held = False  # our launcher holds it for us
        except OSError as exc:  # a file system without locks (some network mounts)
            print(f"note: cannot lock {run_dir / LOCK_FILE} ({exc.strerror or exc}); make sure no other acdc process "
                  "writes this run dir", file=sys.stderr)
            held = False
        if held:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            if for_ranks:
                os.environ[LAUNCHER_LOCK_ENV] = str(os.getpid())
        try:
            yield
        finally:
            if held and for_ranks:
                if launcher is None:
                    os.environ.pop(LAUNCHER_LOCK_ENV, None)
                else:
                    os.environ[LAUNCHER_LOCK_ENV] = launcher
    finally:
        if created and held and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            # unlinked while still held, so no other process can have taken the lock in between
            with contextlib.suppress(OSError):
                (run_dir / LOCK_FILE).unlink()
                for folder in created:  # and the parents made for it, unless something else went in
                    folder.rmdir()
        os.close(fd)  # releases the lock


def saved_settings(run_dir: Path) -> dict[str, Any]:
    """The settings a run dir was trained with (its config.toml), for ``--resume``."""
    marker = Path(run_dir) / RUN_MARKER
    if not Path(run_dir).is_dir() or not marker.is_file():
        raise AcdcError(f"{run_dir} is not an acdc run dir (expected {RUN_MARKER} and last.safetensors)")
    if not (Path(run_dir) / "last.safetensors").is_file():
        best = [Path(run_dir) / name for name in CHECKPOINTS[1:] if (Path(run_dir) / name).is_file()]
        if best:
            # --force would delete them: a new run from one keeps them
            starts = " or ".join(f"acdc train --from {shlex.quote(str(path))} --out NEW_DIR" for path in best)
            raise AcdcError(f"{run_dir} has no last.safetensors to resume (it stopped before writing one), but its "
                            f"best checkpoints are kept: start a new run from one with {starts}")
        raise AcdcError(f"{run_dir} has no checkpoint yet (stopped before its first one); start it again with --force")
    return read_toml(marker)
