"""``acdc report RUN_DIR...``: pictures of runs and a comparison of several, as PNGs and one self-contained
``report.html`` (every image inline, no script, no link outside the file), from what each run dir holds:
``config.toml``, ``metrics.jsonl`` and ``best_sparse.safetensors``.

Per run: top-1 and loss per epoch with the compressed phases shaded, the sparsity and LR per epoch, the per-layer
sparsity of the best sparse checkpoint, the mask change of each compressed phase. Several runs: their top-1 curves
together, and a table and plot of sparsity against the best sparse and best dense top-1 of each, with the paper's
number where the preset has one (the typical sparsity sweep).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acdc_cli.config import Settings, format_validation_error, load_settings, preset_label, read_toml
from acdc_cli.errors import AcdcError
from acdc_cli.files.atomic import atomic_write_bytes, atomic_write_text
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.models import create
from acdc_cli.paper import differing_settings, paper_reference
from acdc_cli.sparsity.rules import natural_key
from acdc_cli.sparsity.schedule import plan
from acdc_cli.training.metrics import best_rows, top1_key
from acdc_cli.version import __version__

# the shading of compressed phases and the colours of the curves, the same in every figure
_SPARSE_SHADE = "#f4a259"


_TOP1, _TRAIN, _TARGET, _LR = "#1f77b4", "#7f7f7f", "#d62728", "#2ca02c"


@dataclass
class Run:
    """One run dir, read."""

    path: Path
    label: str
    settings: Any  # acdc_cli.config.Settings
    rows: list[dict[str, Any]]
    top1_key: str  # val_top1, or test_top1 for a run without a validation split
    best_sparse: dict[str, Any] | None
    best_dense: dict[str, Any] | None
    layers: dict[str, float] | None  # zeros per masked weight of best_sparse.safetensors
    paper_top1: float | None  # the preset's paper number, if it has one
    paper_sparsity: float | None  # the sparsity the paper's number is at
    paper_note: str | None  # why the run is not the preset's experiment, when it is not
    files: list[Path] = field(default_factory=list)

    @property
    def target(self) -> float:
        return 0.0 if self.settings.schedule.method == "dense" else self.settings.sparsity.target

    def as_dict(self) -> dict[str, Any]:
        def best(row: dict[str, Any] | None) -> dict[str, Any] | None:
            if row is None:
                return None
            return {"epoch": row["epoch"], "top1": row[self.top1_key], "sparsity": row.get("sparsity")}

        s = self.settings
        return {
            "run_dir": str(self.path),
            "label": self.label,
            "preset": s.preset,
            "model": s.model.name,
            "dataset": s.data.name,
            "method": s.schedule.method,
            "structure": s.sparsity.structure,
            "target_sparsity": self.target,
            "epochs": s.schedule.epochs,
            "epochs_done": len(self.rows),
            "top1_metric": self.top1_key,
            "best_sparse": best(self.best_sparse),
            "best_dense": best(self.best_dense),
            "paper_top1": self.paper_top1,
            "paper_sparsity": self.paper_sparsity,
            "paper_note": self.paper_note,
            "best_sparse_layers": self.layers,
            "files": [str(p) for p in self.files],
        }


def _settings(path: Path):
    from pydantic import ValidationError

    config = path / "config.toml"
    if not path.is_dir() or not config.is_file():
        raise AcdcError(f"{path} is not an acdc run dir (expected config.toml and metrics.jsonl)")
    try:
        return Settings(**read_toml(config))
    except ValidationError as exc:
        raise AcdcError(f"{config}: {format_validation_error(exc)}") from None


def _model_order(arch: str, model_kwargs: dict[str, Any]) -> list[str]:
    """The model's parameter names in its own order (the file's is alphabetical), from a model built on the meta
    device (no memory, no weights); empty when it cannot be built."""
    import torch

    try:
        with torch.device("meta"):
            return [name for name, _ in create(arch, **model_kwargs).named_parameters()]
    except Exception:  # an architecture this acdc does not know: alphabetical order will do
        return []


def _layer_sparsity(path: Path) -> dict[str, float] | None:
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)  # weights come back with their masks applied
    order = {name: i for i, name in enumerate(_model_order(ckpt.arch, ckpt.model_kwargs))}
    names = sorted(ckpt.masks, key=lambda n: (order.get(n, len(order)), natural_key(n)))
    return {name: float((ckpt.weights[name] == 0).sum()) / max(ckpt.weights[name].numel(), 1) for name in names}


def _paper(settings) -> tuple[float | None, float | None, str | None]:
    """(the preset's paper top-1, the sparsity it is at, why this run is not that experiment or None)."""
    if not settings.preset:
        return None, None, None
    try:
        preset = load_settings(preset=settings.preset)
    except AcdcError:
        return None, None, None
    if preset.paper_top1 is None:
        return None, None, None
    _, note = paper_reference(settings, "test")
    sparsity = 0.0 if preset.schedule.method == "dense" else preset.sparsity.target
    return preset.paper_top1, sparsity, note


def read_run(path: Path, label: str) -> Run:
    settings = _settings(path)
    rows = sorted((r for r in read_jsonl(path / "metrics.jsonl") if type(r.get("epoch")) is int),
                  key=lambda r: r["epoch"])
    if not rows:
        raise AcdcError(f"{path}: no epoch has finished yet (metrics.jsonl holds no rows)")
    best_sparse, best_dense = best_rows(rows, settings.sparsity.target)
    paper, paper_sparsity, note = _paper(settings)
    return Run(path, label, settings, rows, top1_key(rows), best_sparse, best_dense,
               _layer_sparsity(path / "best_sparse.safetensors"), paper, paper_sparsity, note)


def _labels(paths: list[Path]) -> list[str]:
    """Short names that tell the runs apart: the folder's name, with its parent's when two share one."""
    names = [p.resolve().name or str(p) for p in paths]
    names = [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _file_stems(labels: list[str]) -> list[str]:
    """File-name-safe stems of the labels, distinct even where two labels differ only in characters replaced."""
    stems = [re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run" for label in labels]
    return [f"{stem}-{i + 1}" if stems.count(stem) > 1 else stem for i, stem in enumerate(stems)]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise AcdcError("acdc report draws with matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display, the same pictures on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _shade_compressed(ax, run: Run) -> None:
    last = run.rows[-1]["epoch"]
    for i, phase in enumerate(p for p in plan(run.settings) if p.kind == "sparse" and p.start <= last):
        ax.axvspan(phase.start - 0.5, min(phase.end, last + 1) - 0.5, color=_SPARSE_SHADE, alpha=0.18, lw=0,
                   label="compressed phase" if i == 0 else None)


# more points than a figure's pixels draw nothing more and make matplotlib slow: longer series are decimated
MAX_PLOTTED = 4_000


def plotted_every(rows: int) -> int:
    """1, or the stride that thins ``rows`` points to at most MAX_PLOTTED (the last point is always kept)."""
    return max(1, math.ceil(rows / MAX_PLOTTED))


def _series(run: Run, key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], r[key]) for r in run.rows if isinstance(r.get(key), (int, float))
              and not isinstance(r.get(key), bool)]
    every = plotted_every(len(points))
    if every > 1:
        points = points[::every] + ([points[-1]] if (len(points) - 1) % every else [])
    return [e for e, _ in points], [v for _, v in points]


def _legend(ax) -> None:
    # beside the axes, never over a curve
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _log_if_positive(ax, values: list[float]) -> None:
    # a loss falls by orders of magnitude: on a log scale the later epochs stay readable
    if values and min(values) > 0:
        ax.set_yscale("log")


def _save(fig, path: Path) -> Path:
    # drawn in memory, then written atomically: a full disk is one line and leaves no empty or torn PNG behind
    # (no "Software: matplotlib <url>" chunk: the files carry nothing but the picture)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _metric_name(run: Run) -> str:
    return "val" if run.top1_key == "val_top1" else "test"


def plot_top1_loss(run: Run, path: Path) -> Path:
    plt = _pyplot()
    split = _metric_name(run)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    try:
        _shade_compressed(top, run)
        _shade_compressed(bottom, run)
        epochs, values = _series(run, run.top1_key)
        top.plot(epochs, [100 * v for v in values], color=_TOP1, marker="o", ms=3, label=f"{split} top-1")
        epochs, values = _series(run, "train_top1")
        top.plot(epochs, [100 * v for v in values], color=_TRAIN, ls="--", lw=1, label="train top-1")
        for best, marker, name in ((run.best_sparse, "*", "best sparse"), (run.best_dense, "D", "best dense")):
            if best is not None:
                top.plot([best["epoch"]], [100 * best[run.top1_key]], marker=marker, ms=11 if marker == "*" else 7,
                         color="black", ls="none", label=f"{name}: {100 * best[run.top1_key]:.2f} % "
                                                         f"(epoch {best['epoch']})")
        top.set_ylabel("top-1 (%)")
        _legend(top)
        top.grid(alpha=0.3)
        top.set_title(f"{run.label}: {split} top-1 and loss per epoch")
        epochs, train_loss = _series(run, "train_loss")
        bottom.plot(epochs, train_loss, color=_TRAIN, marker="o", ms=3, label="train loss")
        epochs, eval_loss = _series(run, f"{split}_loss")
        if eval_loss:
            bottom.plot(epochs, eval_loss, color=_TOP1, lw=1, label=f"{split} loss")
        _log_if_positive(bottom, train_loss + eval_loss)
        bottom.set_ylabel("loss")
        bottom.set_xlabel("epoch")
        _legend(bottom)
        bottom.grid(alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_sparsity_lr(run: Run, path: Path) -> Path:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    try:
        _shade_compressed(top, run)
        _shade_compressed(bottom, run)
        epochs, values = _series(run, "target_sparsity")
        top.step(epochs, [100 * v for v in values], where="mid", color=_TARGET, ls="--", label="target")
        epochs, values = _series(run, "sparsity")
        top.plot(epochs, [100 * v for v in values], color=_TOP1, marker="o", ms=3, label="measured (all selected "
                                                                                          "weights)")
        top.set_ylabel("sparsity (%)")
        top.set_ylim(-3, 103)
        _legend(top)
        top.grid(alpha=0.3)
        top.set_title(f"{run.label}: sparsity and learning rate per epoch")
        epochs, values = _series(run, "lr")
        bottom.plot(epochs, values, color=_LR, marker="o", ms=3, label="LR (at the epoch's last step)")
        bottom.set_ylabel("learning rate")
        bottom.set_xlabel("epoch")
        _legend(bottom)
        bottom.grid(alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_layers(run: Run, path: Path) -> Path:
    plt = _pyplot()
    names = [n.removesuffix(".weight") for n in run.layers]
    values = [100 * v for v in run.layers.values()]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.24 * len(names) + 1.2)))
    try:
        bars = ax.barh(range(len(names)), values, color=_TOP1)
        # on a white patch: the target's dashed line passes behind the numbers
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7, padding=2,
                     bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()  # the first layer on top
        ax.axvline(100 * run.target, color=_TARGET, ls="--", zorder=0)
        ax.set_xlim(0, 106)
        ax.set_xlabel("sparsity (%)")
        epoch = run.best_sparse["epoch"] if run.best_sparse else "?"
        ax.set_title(f"{run.label}: per-layer sparsity of best_sparse (epoch {epoch})\n(dashed: the target, "
                     f"{100 * run.target:g} % overall)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _epochs_text(phase) -> str:
    return f"{phase.start}" if phase.end - phase.start == 1 else f"{phase.start}-{phase.end - 1}"


def mask_changes(run: Run) -> list[tuple[str, float]]:
    """(epochs of the phase, mask change against the previous compressed phase's masks) per compressed phase that
    has one (the first has no earlier masks to compare with)."""
    changes = []
    for phase in plan(run.settings):
        if phase.kind != "sparse":
            continue
        found = [r["mask_change"] for r in run.rows if phase.start <= r["epoch"] < phase.end
                 and isinstance(r.get("mask_change"), (int, float))]
        if found:
            changes.append((_epochs_text(phase), found[0]))
    return changes


def plot_mask_change(run: Run, changes: list[tuple[str, float]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(changes) + 2), 3.2))
    try:
        bars = ax.bar(range(len(changes)), [100 * v for _, v in changes], color=_SPARSE_SHADE)
        ax.bar_label(bars, labels=[f"{100 * v:.3g} %" for _, v in changes], fontsize=8)
        ax.set_ylim(0, 1.18 * max(100 * v for _, v in changes) or 1.0)  # room for the labels under the frame
        ax.set_xticks(range(len(changes)), [f"epoch{'s' * ('-' in p)} {p}" for p, _ in changes], rotation=30,
                      ha="right", fontsize=8)
        ax.set_ylabel("mask change (% of selected weights)")
        ax.set_title(f"{run.label}: masks changed at each compressed phase\n(against the previous compressed "
                     "phase's; the first has none to compare with)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_compare_top1(runs: list[Run], path: Path) -> Path:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    try:
        losses = []
        for i, run in enumerate(runs):
            epochs, values = _series(run, run.top1_key)
            top.plot(epochs, [100 * v for v in values], color=_run_color(i), marker="o", ms=2,
                     label=f"{run.label} ({100 * run.target:g} %)")
            epochs, values = _series(run, "train_loss")
            bottom.plot(epochs, values, color=_run_color(i), lw=1)
            losses += values
        _log_if_positive(bottom, losses)
        top.set_ylabel("top-1 (%)")
        top.set_title("top-1 and train loss per epoch, one line per run")
        _legend(top)
        top.grid(alpha=0.3)
        bottom.set_ylabel("train loss")
        bottom.set_xlabel("epoch")
        bottom.grid(alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _run_color(index: int) -> str:
    return f"C{index % 10}"


def plot_sparsity_vs_top1(runs: list[Run], path: Path) -> Path:
    """One colour per run (as in the curves): its best sparse top-1 (filled circle) and best dense top-1 (open
    square) at its target sparsity; the paper's number of a preset as a red star at the preset's sparsity."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for i, run in enumerate(runs):
            x = 100 * run.target
            if run.best_sparse is not None:
                ax.plot([x], [100 * run.best_sparse[run.top1_key]], marker="o", ms=8, color=_run_color(i), ls="none",
                        label=run.label)
            if run.best_dense is not None:
                ax.plot([x], [100 * run.best_dense[run.top1_key]], marker="s", ms=8, mfc="none", mew=1.5,
                        color=_run_color(i), ls="none", label=None if run.best_sparse is not None else run.label)
        papers = {(r.paper_sparsity, r.paper_top1, r.settings.preset) for r in runs if r.paper_top1 is not None}
        for i, (x, y, preset) in enumerate(sorted(papers)):
            ax.plot([100 * x], [100 * y], marker="*", ms=14, color=_TARGET, ls="none",
                    label="paper (preset's number)" if i == 0 else None)
            ax.annotate(preset, (100 * x, 100 * y), textcoords="offset points", xytext=(-8, 6), ha="right",
                        fontsize=7, color=_TARGET)
        # the marker shapes, explained once
        ax.plot([], [], marker="o", color="black", ls="none", label="best sparse")
        ax.plot([], [], marker="s", mfc="none", color="black", ls="none", label="best dense")
        ax.margins(x=0.15, y=0.15)
        ax.set_xlabel("target sparsity (%)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title("sparsity against top-1, best sparse and best dense of each run")
        _legend(ax)
        ax.grid(alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _best_text(run: Run, best: dict[str, Any] | None) -> str:
    return "-" if best is None else f"{_pct(best[run.top1_key])} (epoch {best['epoch']})"


def dataset_warning(runs: list[Run]) -> str | None:
    """One line when the compared runs were not all trained on one dataset (their top-1 are not comparable)."""
    names = sorted({run.settings.data.name for run in runs})
    if len(names) < 2:
        return None
    return (f"the runs compared were trained on different datasets ({', '.join(names)}): their top-1 numbers are "
            "not comparable")


def summary_rows(runs: list[Run]) -> list[list[str]]:
    """The comparison table: one row per run."""
    return [[run.label, run.settings.data.name, run.settings.model.name, preset_label(run.settings),
             run.settings.schedule.method,
             run.settings.sparsity.structure, _pct(run.target), f"{len(run.rows)} / {run.settings.schedule.epochs}",
             _best_text(run, run.best_sparse), _best_text(run, run.best_dense),
             _pct(run.paper_top1) + (f" (not this experiment: {_first_difference(run)})"
                                     if run.paper_top1 is not None and run.paper_note else "")]
            for run in runs]


def _first_difference(run: Run) -> str:
    """The first setting in which the run differs from its preset ("split" when only the split does)."""
    changed = differing_settings(run.settings, load_settings(preset=run.settings.preset))
    return f"{changed[0][0]} differs" if changed else "another split"


SUMMARY_HEADER = ["run", "data", "model", "preset", "method", "structure", "target sparsity", "epochs done",
                  "best sparse top-1", "best dense top-1", "paper top-1"]


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } code { background: #f3f3f3; padding: 0 0.2em; }
figure { margin: 1em 0; } img { max-width: 100%; } .note { color: #666; font-size: 0.9em; }
"""


def _run_section(run: Run, images: list[tuple[Path, str]], notes: list[str]) -> str:
    s = run.settings
    settings_rows = [
        ["run dir", str(run.path)], ["preset", preset_label(s)], ["model", s.model.name],
        ["dataset", f"{s.data.name} ({s.data.val_size} training images held out for validation)" if s.data.val_size
         else f"{s.data.name} (no validation split: top-1 on the test split)"],
        ["method", f"{s.schedule.method}, {s.sparsity.structure}, {s.sparsity.scope}, target {_pct(run.target)}"],
        ["epochs", f"{len(run.rows)} done of {s.schedule.epochs}"],
        ["optimizer", f"SGD lr {s.optim.lr:g} ({s.optim.lr_schedule}), momentum {s.optim.momentum:g}, "
                      f"weight decay {s.optim.weight_decay:g}, batch {s.data.batch_size}"],
        ["compressed phases (epochs)", ", ".join(_epochs_text(p) for p in plan(s) if p.kind == "sparse") or "none"],
        [f"best sparse ({_metric_name(run)} top-1)", _best_text(run, run.best_sparse)],
        [f"best dense ({_metric_name(run)} top-1)", _best_text(run, run.best_dense)],
    ]
    if run.paper_top1 is not None:
        paper = f"{_pct(run.paper_top1)} test top-1 at {_pct(run.paper_sparsity)}"
        settings_rows.append(["paper", paper + (f"; {run.paper_note}" if run.paper_note else "")])
    parts = [f"<h2>{html.escape(run.label)}</h2>",
             "<table><tbody>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                                        for k, v in settings_rows) + "</tbody></table>"]
    parts += [_img(path, alt) for path, alt in images]
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    return "\n".join(parts)


@dataclass
class Report:
    path: Path  # report.html
    figures: list[Path]
    runs: list[Run]
    warning: str | None = None  # the runs compared do not share a dataset

    def as_dict(self) -> dict[str, Any]:
        """What ``acdc report --json`` prints (besides its schema): the files and the comparison table."""
        return {"report": str(self.path), "files": [str(self.path), *map(str, self.figures)],
                "runs": [r.as_dict() for r in self.runs], "warning": self.warning}


def write_report(run_dirs: list[Path], out: Path | None = None) -> Report:
    """Read every run dir (all of them before anything is written), draw the figures into ``out`` and write
    ``out/report.html``. ``out`` defaults to RUN_DIR/report for one run and ./acdc-report for several."""
    if not run_dirs:
        raise AcdcError("acdc report needs at least one run dir")
    paths = [Path(p) for p in run_dirs]
    runs = [read_run(path, label) for path, label in zip(paths, _labels(paths))]
    out = Path(out) if out is not None else (paths[0] / "report" if len(paths) == 1 else Path("acdc-report"))
    if out.exists() and not out.is_dir():
        raise AcdcError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AcdcError(f"cannot write to {out}: {exc.strerror or exc}") from None

    sections, files = [], []
    if len(runs) > 1:
        compare = [(plot_compare_top1(runs, out / "compare-top1.png"), "top-1 and train loss per epoch, every run"),
                   (plot_sparsity_vs_top1(runs, out / "sparsity-vs-top1.png"), "sparsity against top-1")]
        files += [p for p, _ in compare]
        sections.append("<h2>comparison</h2>" + "".join(_img(p, alt) for p, alt in compare))
    for run, stem in zip(runs, _file_stems([r.label for r in runs])):
        images = [(plot_top1_loss(run, out / f"{stem}-top1-loss.png"), f"{run.label}: top-1 and loss per epoch"),
                  (plot_sparsity_lr(run, out / f"{stem}-sparsity-lr.png"), f"{run.label}: sparsity and LR")]
        notes = []
        if plotted_every(len(run.rows)) > 1:
            notes.append(f"{len(run.rows):,} rows: the charts plot every {plotted_every(len(run.rows))}-th of them")
        if run.layers:
            images.append((plot_layers(run, out / f"{stem}-layers.png"), f"{run.label}: per-layer sparsity"))
        else:
            notes.append("no per-layer chart: the run has no best_sparse.safetensors yet (no compressed epoch at the "
                         "target sparsity)")
        changes = mask_changes(run)
        if changes:
            images.append((plot_mask_change(run, changes, out / f"{stem}-mask-change.png"),
                           f"{run.label}: mask change per compressed phase"))
        else:
            notes.append("no mask-change chart: a mask change needs two compressed phases")
        run.files = [p for p, _ in images]
        files += run.files
        sections.append(_run_section(run, images, notes))

    warning = dataset_warning(runs)
    metric_note = ("Top-1 is measured on the validation images held out of the training split (test top-1 where a "
                   "run holds none out); the paper reports test top-1.")
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>acdc report: {html.escape(', '.join(r.label for r in runs))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>acdc report: {len(runs)} run{'s' if len(runs) > 1 else ''}</h1>",
        f'<p class="note">acdc {html.escape(__version__)}. {html.escape(metric_note)} Compressed phases are shaded '
        "orange.</p>",
        *([f'<p class="note"><strong>warning:</strong> {html.escape(warning)}</p>'] if warning else []),
        _table(SUMMARY_HEADER, summary_rows(runs)),
        *sections,
        "</body></html>",
    ])
    report = out / "report.html"

    atomic_write_text(report, page + "\n")
    return Report(report, files, runs, warning)
