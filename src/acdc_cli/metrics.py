"""Where per-epoch metrics go: ``metrics.jsonl`` (one object per epoch), TensorBoard, and a console row."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console

from acdc_cli.errors import AcdcError

# console columns: key, header, width, format
_COLUMNS = [
    ("epoch", "epoch", 5, "{:d}"),
    ("phase", "phase", 6, "{}"),
    ("sparsity", "sparse", 6, "{:.3f}"),
    ("lr", "lr", 8, "{:.2e}"),
    ("train_loss", "t.loss", 7, "{:.4f}"),
    ("train_top1", "t.top1", 6, "{:.4f}"),
    ("val_loss", "v.loss", 7, "{:.4f}"),
    ("val_top1", "v.top1", 6, "{:.4f}"),
    ("val_top5", "v.top5", 6, "{:.4f}"),
    ("mask_change", "mask Δ", 6, "{:.4f}"),
    ("img_per_s", "img/s", 6, "{:.0f}"),
]


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN and infinity (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def json_line(value: Any) -> str:
    """``value`` as one line of strict JSON: a non-finite number is written as null, never as bare NaN."""
    return json.dumps(finite_or_null(value), allow_nan=False)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of ``path`` that is a JSON object (damaged lines skipped)."""
    return read_rows(path)[0]


def read_rows(path: Path) -> tuple[list[dict[str, Any]], list[bytes]]:
    """(every row of ``path`` that is a JSON object, every other non-empty line as its bytes): a line torn by a crash
    or damaged by hand costs that line alone."""
    path = Path(path)
    if not path.exists():
        return [], []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AcdcError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    rows, damaged = [], []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # not JSON or UTF-8, an int of over 4,300 digits, nesting too deep
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            damaged.append(line)
    return rows, damaged


class MetricsLogger:
    """Rank 0 only. On resume, rows past the checkpoint's epoch are dropped so the files match the run."""

    def __init__(self, run_dir: Path, console: Console, tensorboard: bool, per_layer: bool, start_epoch: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.console = console
        self.per_layer = per_layer
        rows, damaged = read_rows(self.path)
        if damaged:
            # kept beside the file, never dropped in silence: the rows around them are all still there
            aside = self.path.with_name(self.path.name + ".damaged")
            from acdc_cli.checkpoint import atomic_write_bytes

            try:
                previous = aside.read_bytes() if aside.exists() else b""
            except OSError as exc:
                raise AcdcError(f"cannot read {aside}: {exc.strerror or exc.__class__.__name__}") from None
            atomic_write_bytes(aside, previous + b"".join(line + b"\n" for line in damaged))
            console.print(f"note: {len(damaged)} damaged line(s) of {self.path} set aside in {aside}", markup=False,
                          highlight=False, soft_wrap=True)
        self.rows = [r for r in rows if type(r.get("epoch")) is int and r["epoch"] < start_epoch]
        self._write()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after its last checkpoint
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_epoch if start_epoch else None)
        self._header_printed = False

    def _write(self) -> None:
        # the whole file through a temp file and a rename (a few kB even for long runs): never a torn line
        from acdc_cli.checkpoint import atomic_write_text

        atomic_write_text(self.path, "".join(json_line(r) + "\n" for r in self.rows))

    def log_epoch(self, row: dict[str, Any], per_layer: dict[str, float] | None = None) -> None:
        self.rows.append(row)
        self._write()
        if self.writer is not None:
            step = row["epoch"]
            for key, value in row.items():
                if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    self.writer.add_scalar(f"acdc/{key}", value, step)
            self.writer.add_scalar("acdc/phase_sparse", 1.0 if row.get("phase") == "sparse" else 0.0, step)
            if self.per_layer and per_layer:
                for name, value in per_layer.items():
                    self.writer.add_scalar(f"sparsity/{name}", value, step)
            self.writer.flush()
        self._print_row(row)

    def _print_row(self, row: dict[str, Any]) -> None:
        if not self._header_printed:
            self.console.print(" ".join(f"{h:>{w}}" for _, h, w, _ in _COLUMNS), style="bold")
            self._header_printed = True
        cells = []
        for key, _, width, fmt in _COLUMNS:
            value = row.get(key)
            text = "-" if value is None else fmt.format(value)
            cells.append(f"{text:>{width}}")
        style = "cyan" if row.get("phase") == "sparse" else None
        self.console.print(" ".join(cells), style=style, highlight=False, markup=False)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
