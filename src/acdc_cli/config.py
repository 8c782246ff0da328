"""One settings model shared by every subcommand.

Precedence, lowest first: field defaults < preset TOML (``--preset NAME`` or ``--config FILE``) < environment
``ACDC_<SECTION>__<KEY>`` < CLI flags and ``--set section.key=value``. Unknown keys are rejected everywhere.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, get_origin

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from acdc_cli.errors import AcdcError
from acdc_cli.sections import (
    DATASET_SPECIFIC,
    MAX_CONFIG_BYTES,
    DataSettings,
    LogSettings,
    ModelSettings,
    OptimSettings,
    RuntimeSettings,
    ScheduleSettings,
    SparsitySettings,
)


class Settings(BaseSettings):
    """Everything a run depends on. Saved as TOML in every run dir."""

    model_config = SettingsConfigDict(
        env_prefix="ACDC_", env_nested_delimiter="__", extra="forbid", validate_assignment=True, allow_inf_nan=False
    )

    preset: str | None = Field(None, description="name of the preset these settings came from")
    description: str = Field("", description="one line on what the preset reproduces")
    paper_top1: float | None = Field(None, ge=0, le=1, description="top-1 reported in the paper (fraction)")
    inferred: list[str] = Field(
        default_factory=list, description="settings (section.key) whose preset value is taken by analogy, not from "
        "a reference run script (docs/paper.md)"
    )
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    sparsity: SparsitySettings = Field(default_factory=SparsitySettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load() merges preset, environment and CLI layers itself, so the constructor sees one dict only
        return (init_settings,)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        s = self.schedule
        if s.method == "acdc":
            fixed = s.warmup_epochs + s.final_decompressed_epochs + s.final_compressed_epochs
            if fixed > s.epochs:
                raise ValueError(
                    f"schedule: warmup ({s.warmup_epochs}) + final decompressed ({s.final_decompressed_epochs}) + "
                    f"final compressed ({s.final_compressed_epochs}) epochs exceed schedule.epochs ({s.epochs})"
                )
        if isinstance(s.start_epoch, int) and s.start_epoch >= s.epochs:
            raise ValueError(f"schedule.start_epoch ({s.start_epoch}) must be below schedule.epochs ({s.epochs})")
        if s.method == "gmp":
            if not s.gmp_start_epoch <= s.gmp_end_epoch < s.epochs:
                raise ValueError(
                    f"schedule: gmp needs gmp_start_epoch <= gmp_end_epoch < epochs, got "
                    f"{s.gmp_start_epoch}, {s.gmp_end_epoch}, {s.epochs}"
                )
            if self.sparsity.n_m is not None:
                raise ValueError(f"gmp ramps the sparsity up gradually, which N:M ({self.sparsity.structure}) cannot "
                                 "do: its sparsity is fixed at 1 - N/M; use schedule.method acdc or an unstructured "
                                 "sparsity.structure")
            if self.sparsity.initial > self.sparsity.target:
                raise ValueError("sparsity.initial must not exceed sparsity.target for gmp")
        accumulation = self.optim.grad_accumulation
        if accumulation > 1 and self.runtime.checkpoint_every_steps % accumulation:
            raise ValueError(f"runtime.checkpoint_every_steps must be a multiple of optim.grad_accumulation "
                             f"({accumulation}): a checkpoint falls between two optimizer steps")
        if accumulation > 1 and self.runtime.nan_policy == "skip":
            raise ValueError("runtime.nan_policy 'skip' undoes one batch's step: it needs optim.grad_accumulation 1")
        unknown = [name for name in self.inferred if name not in setting_names()]
        if unknown:
            raise ValueError(f"inferred names '{unknown[0][:60]}', which is not a setting (section.key)")
        if any(m < 0 or m >= s.epochs for m in self.optim.milestones):
            raise ValueError(f"optim.milestones must lie in [0, {s.epochs}), got {self.optim.milestones}")
        return self

    def to_toml(self) -> str:
        """Every setting; one that is not set (None: TOML has no null) is a comment naming it."""
        return dump_toml(self.model_dump(mode="json"))


def setting_names() -> list[str]:
    """Every setting as ``section.key`` (or ``key`` at the top), in the order the settings are written."""
    names = []
    for name, field in Settings.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += [f"{name}.{key}" for key in field.annotation.model_fields]
        else:
            names.append(name)
    return names


# The settings that cannot change a number a run reports: where files go, what is logged, which device and how many
# workers or threads do the same arithmetic, when checkpoints are written, and labels. Every other setting is part of
# the experiment: the paper's figure is compared only with a run that matches its preset in all of them.
# (runtime.seed is here too: another seed is another draw of the same experiment, which the paper's figure is one of;
# data.decode reads the same images with another JPEG library.)
NOT_RESULT_SETTINGS = (
    "preset", "description", "paper_top1", "inferred",
    "data.dir", "data.eval_batch_size", "data.num_workers", "data.decode", "data.max_image_pixels", "data.download",
    "runtime.device", "runtime.seed", "runtime.channels_last", "runtime.compile", "runtime.threads",
    "runtime.deterministic", "runtime.checkpoint_every_steps", "runtime.checkpoint_every", "runtime.nan_policy",
    "runtime.max_skipped_steps", "runtime.auto_resume",
    "log",  # a whole section: TensorBoard, progress, MLflow, W&B
)


def is_result_setting(name: str) -> bool:
    """Whether ``section.key`` can change a number a run reports (see :data:`NOT_RESULT_SETTINGS`)."""
    return name not in NOT_RESULT_SETTINGS and name.partition(".")[0] not in NOT_RESULT_SETTINGS


def flat_settings(settings: Settings) -> dict[str, Any]:
    """``section.key`` (or ``key`` at the top) -> JSON value of every setting, in the order the settings are
    written."""
    dumped = settings.model_dump(mode="json")
    values = {}
    for name in setting_names():
        section, _, key = name.partition(".")
        values[name] = dumped[section][key] if key else dumped[section]
    return values


def result_settings(settings: Settings) -> dict[str, Any]:
    """``section.key`` -> value of every setting that can change a result (all but :data:`NOT_RESULT_SETTINGS`),
    in the order the settings are written."""
    return {name: value for name, value in flat_settings(settings).items() if is_result_setting(name)}


# ----------------------------------------------------------------------------------------------------------------
# loading


def presets_dir() -> Path:
    """Presets ship inside the wheel (acdc_cli/presets); an editable install reads the repo's presets/."""
    packaged = Path(__file__).parent / "presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def preset_label(settings: Settings) -> str:
    """The preset a run is, for reports and TensorBoard: its name when the run trains the preset's data and model;
    otherwise "-", with the preset it started from (a run on your own folder is not "quickstart")."""
    if not settings.preset:
        return "-"
    try:
        preset = load_settings(preset=settings.preset)
    except AcdcError:
        return settings.preset
    if (preset.data.name, preset.model.name) != (settings.data.name, settings.model.name):
        return f"- (started from {settings.preset})"
    return settings.preset


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)  # bounded: --config /dev/zero never ends
    except FileNotFoundError:
        raise AcdcError(f"config file not found: {path}") from None
    except OSError as exc:  # a folder, no permission, a symlink loop, ...
        raise AcdcError(f"cannot read config {path}: {exc.strerror or exc.__class__.__name__}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AcdcError(f"config {path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; a settings file is a few kB")
    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError:
        raise AcdcError(f"cannot read config {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise AcdcError(f"{path} is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise AcdcError(f"{path}: arrays or tables nested too deeply") from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise AcdcError(f"{path} is not valid TOML: {str(exc).split(':')[0]}") from None


def preset_path(name: str) -> Path:
    path = presets_dir() / f"{name}.toml"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `acdc presets` lists them"
        raise AcdcError(f"unknown preset '{name}'{hint}")
    return path


def parse_set(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value); the value is read as TOML, else kept as a string."""
    if "=" not in item:
        raise AcdcError(f"--set expects section.key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise AcdcError(f"--set: bad key '{key}' (expected section.key)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except ValueError:  # not TOML (TOMLDecodeError), or an integer of more than 4,300 digits: a string
        value = raw
    except RecursionError:
        raise AcdcError(f"--set {key}: value nested too deeply") from None
    return key.split("."), value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def merge_layer(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``. A layer that sets ``sparsity.structure`` without a target also drops the target of the
    layers below: that target was stated for another structure, and an N:M structure implies its own. Likewise a
    layer that names another ``data.name`` drops the held-out size, image size and mean/std stated below for the
    dataset it replaces (the quickstart's 270 validation images do not fit a folder of 72)."""
    top_rules = top.get("sparsity")
    base_rules = base.get("sparsity")
    if (isinstance(top_rules, dict) and "structure" in top_rules and "target" not in top_rules
            and isinstance(base_rules, dict) and "target" in base_rules):
        base = {**base, "sparsity": {k: v for k, v in base_rules.items() if k != "target"}}
    top_data, base_data = top.get("data"), base.get("data")
    if (isinstance(top_data, dict) and isinstance(base_data, dict) and "name" in top_data
            and top_data["name"] != base_data.get("name", "digits")):
        base = {**base, "data": {k: v for k, v in base_data.items() if k not in DATASET_SPECIFIC}}
    return _deep_merge(base, top)


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    for key in reversed(path):
        value = {key: value}
    return value  # type: ignore[return-value]


# ACDC_<SECTION>__<KEY>: the only shape of variable that is a setting; a wrapper script's ACDC_VENV or ACDC_HOME is not
_ENV_SETTING = re.compile(r"ACDC_([A-Za-z]+)__(\w+)", re.IGNORECASE)


def _env_value(name: str, raw: str, annotation: Any) -> Any:
    """A variable's text as the value of a field: JSON for a list (``'["fc.*"]'``), the text itself otherwise
    (pydantic reads "0.1", "true" and "5" as the field's type)."""
    if get_origin(annotation) not in (list, dict):
        return raw
    try:
        return json.loads(raw)
    except RecursionError:
        raise AcdcError("environment: an ACDC_* value is nested too deeply") from None
    except ValueError:
        raise AcdcError(f"environment: {name} is not a JSON list, e.g. {name}='[\"fc.*\"]'") from None


def _env_layer() -> dict[str, Any]:
    """The settings in ``ACDC_<SECTION>__<KEY>`` variables (names case-insensitive). A key that the section does not
    have is an error (a typo would otherwise be ignored); a variable of any other shape is not ours and is left
    alone."""
    sections = {name: field.annotation for name, field in Settings.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}
    layer: dict[str, Any] = {}
    for name, raw in sorted(os.environ.items()):
        match = _ENV_SETTING.fullmatch(name)
        if match is None or match.group(1).lower() not in sections:
            continue
        section, key = match.group(1).lower(), match.group(2).lower()
        field = sections[section].model_fields.get(key)
        if field is None:
            raise AcdcError(f"unknown setting in environment: {name} ({section} has no key '{key}'; see "
                            "`acdc presets show`)")
        layer.setdefault(section, {})[key] = _env_value(name, raw, field.annotation)
    return layer


def format_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "settings"
    if err["type"] == "extra_forbidden":
        return f"unknown setting '{loc}' (key '{err['loc'][-1]}' is not a field; see `acdc presets show`)"
    msg = err["msg"].removeprefix("Value error, ")
    return f"invalid setting {loc}: {msg}" if err["loc"] else f"invalid settings: {msg}"


def load_settings(
    preset: str | None = None,
    config: Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Settings:
    """Resolve settings from all layers; ``base`` (a saved run's config) sits below the preset. Without a preset, a
    config file or a base, the preset is the quickstart."""
    layer: dict[str, Any] = dict(base or {})
    if preset is None and config is None and base is None:
        preset = "quickstart"
    try:
        if preset is not None:
            layer = merge_layer(layer, read_toml(preset_path(preset)))
            layer["preset"] = preset
        if config is not None:
            layer = merge_layer(layer, read_toml(config))
        layer = merge_layer(layer, _env_layer())
        # flags and every --set form one layer: `--set sparsity.target=0.9 --set sparsity.structure=2:4` conflicts
        command_line: dict[str, Any] = {}
        for dotted, value in (flags or {}).items():
            if value is not None:
                command_line = _deep_merge(command_line, _nest(dotted.split("."), value))
        for item in overrides or []:
            path, value = parse_set(item)
            command_line = _deep_merge(command_line, _nest(path, value))
        return Settings(**merge_layer(layer, command_line))
    except ValidationError as exc:
        raise AcdcError(format_validation_error(exc)) from None
    except RecursionError:  # tables nested deeply in two layers at once (merging them recurses)
        raise AcdcError("settings nested too deeply") from None


def dump_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for our settings (scalars, lists of scalars, one level of tables); a key whose value is
    None (not set) is written as a comment, ``# key = (not set)``, so that every key shows."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            # JSON string escapes are TOML's, except surrogate pairs: keep non-ASCII characters as they are
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):  # optim.optimizer_args: an inline table
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def line(k: str, v: Any) -> str:
        return f"# {k} = (not set)" if v is None else f"{k} = {value(v)}"

    lines = [line(k, v) for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]"] + [line(k, v) for k, v in table.items()]
    return "\n".join(lines) + "\n"
