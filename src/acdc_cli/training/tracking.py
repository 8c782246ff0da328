"""Experiment tracking beside TensorBoard: MLflow (``log.mlflow_uri``) and Weights & Biases (``log.wandb``).

Each sink receives what TensorBoard receives, under the same tags and on the same step axis (metrics.py builds the
scalars once for all of them), the resolved settings as parameters / config when the run starts, and the run's
summary when it ends. The service's run id is recorded in ``RUN_DIR/tracking.json``, so that a resumed or restarted
run logs into the same MLflow run / W&B run. Rank 0 only (the MetricsLogger that owns the sinks lives there).

Tracking is never what stops a run: a sink whose service is down or refuses a write is dropped with one warning, and
the run, its checkpoints, metrics.jsonl and TensorBoard go on. Neither library is imported unless its service is
asked for, and a missing one is a one-line error before anything is written (:func:`check_installed`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from acdc_cli.config import flat_settings as all_settings
from acdc_cli.errors import AcdcError
from acdc_cli.files.atomic import atomic_write_text
from acdc_cli.files.jsonio import json_line, parse_json

if TYPE_CHECKING:
    from acdc_cli.config import Settings

TRACKING_FILE = "tracking.json"

# MLflow's HTTP client retries a refused connection 7 times with a doubling back-off (minutes before it gives up):
# a run would sit waiting for a dead server before its first step. Values the user exports win.
_MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

# MLflow's log_batch limits per request
_MLFLOW_MAX_PARAMS = 100
_MLFLOW_MAX_METRICS = 1000


def mlflow_uri(settings: Settings) -> str | None:
    """The MLflow tracking URI of the run: ``log.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``; None: no MLflow."""
    return settings.log.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_installed(settings: Settings) -> None:
    """A one-line error naming the extra when a tracking service is asked for and its library is not installed
    (looked up without importing it)."""
    uri = mlflow_uri(settings)
    if uri is not None and importlib.util.find_spec("mlflow") is None:
        source = "log.mlflow_uri" if settings.log.mlflow_uri else "MLFLOW_TRACKING_URI"
        raise AcdcError(f"{source} asks for MLflow tracking and mlflow is not installed: pip install 'acdc-cli[mlflow]'")
    if settings.log.wandb and importlib.util.find_spec("wandb") is None:
        raise AcdcError("log.wandb asks for Weights & Biases tracking and wandb is not installed: "
                        "pip install 'acdc-cli[wandb]'")


def flat_settings(settings: Settings) -> dict[str, str]:
    """The resolved settings as ``section.key`` -> text (strings as they are, anything else as JSON): MLflow's
    parameters."""
    return {name: value if isinstance(value, str) else json_line(value)
            for name, value in all_settings(settings).items()}


class Sink:
    """One tracking service's run. Any method may raise: :class:`Tracking` drops the sink then."""

    key = "tracking"  # its entry in tracking.json
    label = "tracking"  # its name for people
    run_id: str

    def log(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def summary(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, status: str) -> None:
        """``status``: FINISHED, FAILED or KILLED (a signal stopped the run, which may be resumed)."""
        raise NotImplementedError


class MlflowSink(Sink):
    key, label = "mlflow", "MLflow"

    def __init__(self, uri: str, settings: Settings, run_dir: Path, run_id: str | None):
        # the file store is deprecated in MLflow 3 and refuses to open unless asked: a file: URI the user gave asks
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        for name, value in _MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self._metric, self._param = Metric, Param
        self.client = MlflowClient(tracking_uri=uri)
        known: dict[str, str] = {}
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            known = self.client.get_run(run_id).data.params
        else:
            name = settings.log.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "acdc"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                         tags={"acdc.run_dir": str(run_dir.resolve())})
            run_id = run.info.run_id
        self.run_id = run_id
        # a parameter is written once in MLflow: a resumed run adds those its first part did not have (a setting
        # that may change on resume keeps its first value here; config.toml has the current one)
        params = [Param(k, v) for k, v in flat_settings(settings).items() if k not in known]
        for start in range(0, len(params), _MLFLOW_MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[start:start + _MLFLOW_MAX_PARAMS])

    def log(self, scalars: dict[str, float], step: int) -> None:
        now = _millis()
        metrics = [self._metric(k, float(v), now, step) for k, v in scalars.items()]
        for start in range(0, len(metrics), _MLFLOW_MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + _MLFLOW_MAX_METRICS])

    def summary(self, values: dict[str, float], step: int) -> None:
        self.log(values, step)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class WandbSink(Sink):
    key, label = "wandb", "W&B"

    def __init__(self, settings: Settings, run_dir: Path, run_id: str | None):
        import wandb

        log = settings.log
        self.run = wandb.init(
            project=log.wandb_project or os.environ.get("WANDB_PROJECT") or "acdc",
            entity=log.wandb_entity,
            name=log.wandb_name or os.environ.get("WANDB_NAME") or run_dir.name,
            tags=log.wandb_tags or None,
            dir=str(run_dir),
            id=run_id,
            resume="allow" if run_id is not None else None,
            # W&B would otherwise wrap stdout/stderr, under the rich console and the progress bar
            settings=wandb.Settings(console=os.environ.get("WANDB_CONSOLE", "off")),
        )
        # a resumed run may change log.* / runtime.* settings: the config shows the current ones
        self.run.config.update(settings.model_dump(mode="json"), allow_val_change=True)
        # points go on acdc's step axis, not W&B's own counter: a run resumed from its checkpoint logs again the
        # steps a crashed part logged after it, which W&B's monotonic step would drop
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run_id = self.run.id

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({**scalars, "step": step})

    def summary(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class Tracking:
    """The sinks of one run. Per-step points are gathered and sent once per step (the loss and the LR in one
    request); an epoch's scalars go at once. A sink that raises is dropped, with one warning on the console."""

    def __init__(self, sinks: list[Sink], console: Console):
        self.sinks = sinks
        self.console = console
        self._pending: dict[str, float] = {}
        self._pending_step = 0

    @classmethod
    def open(cls, settings: Settings, run_dir: Path, resume: bool, console: Console) -> Tracking | None:
        """The services ``settings`` ask for, each continuing the run it recorded in the run dir when ``resume``;
        None when none is asked for (nothing is imported then)."""
        uri = mlflow_uri(settings)
        if uri is None and not settings.log.wandb:
            return None
        check_installed(settings)
        run_dir = Path(run_dir)
        recorded = read_run_ids(run_dir) if resume else {}
        tracking = cls([], console)
        if uri is not None:
            tracking._start(MlflowSink, uri, settings, run_dir, recorded.get(MlflowSink.key))
        if settings.log.wandb:
            tracking._start(WandbSink, settings, run_dir, recorded.get(WandbSink.key))
        ids = {**recorded, **{sink.key: sink.run_id for sink in tracking.sinks}}
        if ids != recorded or not resume:
            atomic_write_text(run_dir / TRACKING_FILE, json_line(ids) + "\n")
        return tracking

    def _start(self, kind: type[Sink], *args: Any) -> None:
        try:
            self.sinks.append(kind(*args))
        except Exception as exc:  # any failure of the service or its library: the run goes on without it
            self._warn(kind.label, "cannot start", exc)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """One per-step point; sent with the others of its step when a later step's point (or an epoch) comes."""
        if self._pending and step != self._pending_step:
            self.flush()
        self._pending[tag] = value
        self._pending_step = step

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.flush()
        self._each("log", scalars, step)

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, {}
            self._each("log", pending, self._pending_step)

    def finish(self, summary: dict[str, float], step: int, status: str) -> None:
        self.flush()
        if summary:
            self._each("summary", summary, step)
        for sink in list(self.sinks):
            self._call(sink, "close", status)
        self.sinks = []

    def _each(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            self._call(sink, method, *args)

    def _call(self, sink: Sink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as exc:  # never the run's end: its checkpoints, metrics.jsonl and TensorBoard go on
            self.sinks.remove(sink)
            self._warn(sink.label, "stopped", exc)

    def _warn(self, label: str, what: str, exc: Exception) -> None:
        reason = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
        self.console.print(f"warning: {label} tracking {what} ({exc.__class__.__name__}: {reason}); the run goes on, "
                           "metrics.jsonl and TensorBoard keep everything", markup=False, highlight=False,
                           soft_wrap=True)


def read_run_ids(run_dir: Path) -> dict[str, str]:
    """The tracking runs recorded in ``run_dir`` (``{"mlflow": id, "wandb": id}``, those it has); a missing or
    unreadable file records none (the run then opens new ones, and says so through the services' own UIs)."""
    try:
        recorded = parse_json((Path(run_dir) / TRACKING_FILE).read_text())
    except (OSError, ValueError, AcdcError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {k: v for k, v in recorded.items() if k in ("mlflow", "wandb") and isinstance(v, str)}


def _millis() -> int:
    return int(time.time() * 1000)
