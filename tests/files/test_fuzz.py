"""Property tests: the file readers (checkpoint loader, `inspect`, `eval`, the export loader) fed random, truncated
and mutated files. The only outcomes allowed: a correct result, or an AcdcError whose message is one line."""

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from acdc_cli.cli.app import app
from acdc_cli.commands.evaluate import eval_checkpoint
from acdc_cli.commands.export import export_checkpoint
from acdc_cli.commands.inspect_file import inspect_file
from acdc_cli.config import load_settings
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from acdc_cli.files.open import load as load_export
from acdc_cli.files.tensors import read_safetensors
from acdc_cli.models import create
from acdc_cli.sparsity.masks import compute_masks

# the profile's suppressions (conftest: no health check about speed) stay when a test adds its own
PROFILE_CHECKS = tuple(settings.default.suppress_health_check)
FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[*PROFILE_CHECKS, HealthCheck.function_scoped_fixture])



def test_no_hypothesis_test_can_fail_for_the_machine_being_slow():
    """On a loaded machine generation is slow: a health check about speed would fail a correct run."""
    speed = {HealthCheck.too_slow, HealthCheck.large_base_example, HealthCheck.data_too_large}
    assert speed <= set(settings.default.suppress_health_check) and settings.default.deadline is None
    assert speed <= set(FUZZ.suppress_health_check) and FUZZ.deadline is None


def _seed_files(folder: Path) -> dict[str, bytes]:
    """A small valid checkpoint (tiny-test, 2:4 masks, synthetic data so `eval` needs no files) and its exports."""
    torch.manual_seed(0)
    model = create("tiny-test", num_classes=10, in_channels=3)
    config = load_settings(overrides=[
        "data.name=synthetic", "data.synthetic_size=64", "data.eval_batch_size=64", "model.name=tiny-test",
        'sparsity.structure="2:4"', 'sparsity.include=["conv", "fc"]', "runtime.device=cpu",
    ]).model_dump(mode="json")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = compute_masks({n: weights[n] for n in ("conv.weight", "fc.weight")}, 0.5, "global", (2, 4))
    for name, mask in masks.items():
        weights[name] *= mask
    ckpt = folder / "ckpt.safetensors"
    save_checkpoint(ckpt, Checkpoint(weights=weights, masks=masks, arch="tiny-test",
                                     model_kwargs={"num_classes": 10, "in_channels": 3}, config=config,
                                     epoch=3, phase="sparse", metrics={"val_top1": 0.5}))
    files = {"checkpoint": ckpt}
    for fmt in ("sparse-24-bitmask", "sparse-bitmask", "dense"):
        files[fmt] = export_checkpoint(ckpt, folder / f"{fmt}.safetensors", fmt).path
    return {kind: path.read_bytes() for kind, path in files.items()}


class Seeds(dict):
    """The seed files by kind; a short repr keeps 20 kB of bytes out of hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"Seeds({sorted(self)})"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    return Seeds(_seed_files(tmp_path_factory.mktemp("seeds")))


def header_end(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


# text that is hard to print: newlines and other control characters, rich markup
TEXT = st.text(max_size=20) | st.sampled_from(["[/x]", "[bold]x", "a\nb", "\x1b[31m", "[link=file:///etc]x"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def damage(draw, blob: bytes) -> tuple:
    """One way of spoiling a valid file, as a short plan (so a failure report stays readable): random bytes, a
    truncation, changed bytes in the header or in the tensor data, a metadata value replaced by other JSON or text,
    or a tensor entry's dtype / shape / offsets replaced. ``spoil`` applies it."""
    end = header_end(blob)
    kind = draw(st.sampled_from(["random", "truncated", "header bytes", "data bytes", "metadata", "metadata deep",
                                 "tensor entry", "tensor name"]))
    if kind == "random":
        return kind, draw(st.binary(max_size=512))
    if kind == "truncated":
        return kind, draw(st.integers(0, len(blob) - 1))
    if kind in ("header bytes", "data bytes"):
        where = st.integers(0, end - 1) if kind == "header bytes" else st.integers(end, len(blob) - 1)
        return kind, draw(st.lists(st.tuples(where, st.integers(0, 255)), min_size=1, max_size=6))
    header = json.loads(blob[8:end])
    if kind == "metadata":
        field = draw(st.sampled_from(sorted(header["__metadata__"])))
        return kind, field, draw(TEXT | JSON_VALUES.map(json.dumps))
    if kind == "metadata deep":
        # one value somewhere inside a JSON metadata field (a layer's shape, a config key, ...)
        meta = header["__metadata__"]
        field = draw(st.sampled_from(sorted(k for k in meta if meta[k][:1] in ("{", "["))))
        node, path = json.loads(meta[field]), []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            node = node[key]
            path.append(key)
        return kind, field, path, draw(JSON_VALUES)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    if kind == "tensor name":
        # another tensor's name, that name as a mask, or any text: masks of biases, two names for one layer, ...
        other = draw(st.sampled_from(names))
        return kind, name, draw(st.sampled_from([other, f"mask.{other}", f"{other}.compressed"]) | TEXT)
    part = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = draw(st.one_of(
        st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XYZ"]),
        st.lists(st.integers(-3, 2**40), max_size=4),
        st.integers(-5, 10**12),
    ))
    return kind, name, part, value


def spoil(blob: bytes, plan: tuple) -> bytes:
    kind, *args = plan
    if kind == "random":
        return args[0]
    if kind == "truncated":
        return blob[: args[0]]
    if kind in ("header bytes", "data bytes"):
        data = bytearray(blob)
        for pos, value in args[0]:
            data[pos] = value
        return bytes(data)
    end = header_end(blob)
    header = json.loads(blob[8:end])
    if kind == "metadata":
        header["__metadata__"][args[0]] = args[1]
    elif kind == "metadata deep":
        field, path, value = args
        root = json.loads(header["__metadata__"][field])
        if path:
            node = root
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        else:
            root = value
        header["__metadata__"][field] = json.dumps(root)
    elif kind == "tensor name":
        header[args[1]] = header.pop(args[0])
    else:
        header[args[0]][args[1]] = args[2]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + blob[end:]


def fuzzed(tmp_path: Path, data, blob: bytes) -> Path:
    return write(tmp_path, spoil(blob, data.draw(damage(blob))))


def only_acdc_errors(func, *args):
    """Call ``func``: a result or an AcdcError with a message; anything else propagates and fails the test. (A
    message may quote a newline from the file: the CLI escapes it, which test_cli_fuzz checks.)"""
    try:
        result = func(*args)
    except AcdcError as exc:
        assert str(exc), repr(exc)
        event(f"{func.__name__}: AcdcError")
        return None
    event(f"{func.__name__}: result")
    return result


def write(tmp_path: Path, data: bytes, name: str = "fuzzed") -> Path:
    # tensors read from a safetensors file are memory-mapped: never rewrite a file whose tensors are still in use
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    return path


@FUZZ
@given(data=st.data())
def test_checkpoint_loader_fuzz(tmp_path, seeds, data):
    path = fuzzed(tmp_path, data, seeds["checkpoint"])
    raw = only_acdc_errors(read_safetensors, path)
    ckpt = only_acdc_errors(load_checkpoint, path)
    if ckpt is not None:
        assert raw is not None
        tensors, _ = raw
        # a correct result: every tensor of the file, each mask a bool tensor shaped like its weight
        assert set(ckpt.weights) | {f"mask.{n}" for n in ckpt.masks} == set(tensors)
        assert all(m.dtype == torch.bool and m.shape == ckpt.weights[n].shape for n, m in ckpt.masks.items())
        assert isinstance(ckpt.epoch, int) and isinstance(ckpt.config, dict)


@FUZZ
@given(data=st.data())
def test_inspect_fuzz(tmp_path, seeds, data):
    kind = data.draw(st.sampled_from(sorted(seeds)))
    path = fuzzed(tmp_path, data, seeds[kind])
    info = only_acdc_errors(inspect_file, path)
    if info is not None:
        json.dumps(info)  # what `acdc inspect --json` prints
        assert 0.0 <= info["sparsity"] <= 1.0 and info["size_bytes"] == path.stat().st_size


@FUZZ
@given(data=st.data())
def test_export_loader_fuzz(tmp_path, seeds, data):
    kind = data.draw(st.sampled_from(sorted(seeds)))
    path = fuzzed(tmp_path, data, seeds[kind])
    state = only_acdc_errors(load_export, path)
    if state is not None:
        assert all(isinstance(v, torch.Tensor) for v in state.values())


@settings(max_examples=30, deadline=None, suppress_health_check=[*PROFILE_CHECKS, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_eval_fuzz(tmp_path, seeds, data):
    path = fuzzed(tmp_path, data, seeds["checkpoint"])
    result = only_acdc_errors(eval_checkpoint, path)
    if result is not None:
        json.dumps(result)
        assert 0.0 <= result["top1"] <= result["top5"] <= 1.0


CLI_COMMANDS = [["inspect"], ["inspect", "--layers"], ["inspect", "--json"], ["eval"], ["eval", "--json"]]


@settings(max_examples=40, deadline=None, suppress_health_check=[*PROFILE_CHECKS, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_cli_fuzz(tmp_path, seeds, data):
    """What a user sees: `acdc inspect` / `acdc eval` exit 0 with their output, or 2 with one line on stderr."""
    kind = data.draw(st.sampled_from(sorted(seeds)))
    command = data.draw(st.sampled_from(CLI_COMMANDS))
    path = fuzzed(tmp_path, data, seeds[kind])
    result = CliRunner().invoke(app, [*command, str(path)])
    assert result.exit_code in (0, 2), repr(result.exception)
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    elif "--json" in command:
        json.loads(result.stdout)
    event(f"cli {command[0]}: exit {result.exit_code}")


def test_seed_files_load_correctly(seeds, tmp_path):
    """Undamaged, every reader gives the right answer (so a fuzz run that only ever errors would be noticed)."""
    expected = load_export(write(tmp_path, seeds["checkpoint"], "checkpoint"))
    for kind in ("sparse-24-bitmask", "sparse-bitmask", "dense"):
        got = load_export(write(tmp_path, seeds[kind], kind))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), kind
    assert inspect_file(tmp_path / "sparse-24-bitmask.safetensors")["structure_violations"] == []
    assert 0.0 <= eval_checkpoint(tmp_path / "checkpoint.safetensors")["top1"] <= 1.0


def with_metadata(blob: bytes, field: str, value: str) -> bytes:
    end = header_end(blob)
    header = json.loads(blob[8:end])
    header["__metadata__"][field] = value
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + blob[end:]


READERS = {"load_checkpoint": load_checkpoint, "inspect": inspect_file, "export.load": load_export,
           "eval": eval_checkpoint}


@pytest.mark.parametrize("kind,field", [("checkpoint", "config"), ("checkpoint", "model_kwargs"),
                                        ("checkpoint", "metrics"), ("sparse-bitmask", "layers"),
                                        ("sparse-bitmask", "tensors"), ("sparse-bitmask", "metrics")])
def test_deeply_nested_metadata_is_refused(seeds, tmp_path, kind, field):
    """JSON nested 100,000 deep would blow Python's recursion limit in json.loads."""
    path = write(tmp_path, with_metadata(seeds[kind], field, "[" * 100_000 + "]" * 100_000))
    for reader in READERS.values():
        with pytest.raises(AcdcError, match="nested deeper"):
            reader(path)
    # brackets inside a JSON string are text, not nesting
    shallow = write(tmp_path, with_metadata(seeds["checkpoint"], "preset", json.dumps("[" * 1000)), "shallow")
    assert load_checkpoint(shallow).extra["preset"] == "[" * 1000


@pytest.mark.parametrize("model_kwargs", [
    {"num_classes": -5, "in_channels": 3},
    {"num_classes": 10**12, "in_channels": 3},
    {"num_classes": 10, "in_channels": 10**8},
    {"num_classes": True, "in_channels": 3},
    {"num_classes": 10, "in_channels": 3, "dropout": 3},
    {"num_classes": 10, "in_channels": 3, "width": 2},
])
def test_metadata_asking_for_an_impossible_or_huge_model_is_refused(seeds, tmp_path, model_kwargs):
    """`eval` rebuilds the model from the file's metadata: checked on the meta device, nothing huge is allocated."""
    path = write(tmp_path, with_metadata(seeds["checkpoint"], "model_kwargs", json.dumps(model_kwargs)))
    with pytest.raises(AcdcError) as info:
        eval_checkpoint(path)
    assert "\n" not in str(info.value)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None,
          suppress_health_check=[*PROFILE_CHECKS, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_all_readers_fuzz_long(tmp_path, seeds, data):
    kind = data.draw(st.sampled_from(sorted(seeds)))
    path = fuzzed(tmp_path, data, seeds[kind])
    for reader in (load_checkpoint, inspect_file, load_export):
        only_acdc_errors(reader, path)
    if kind == "checkpoint":
        only_acdc_errors(eval_checkpoint, path)
    for command in CLI_COMMANDS:
        result = CliRunner().invoke(app, [*command, str(path)])
        assert result.exit_code in (0, 2), repr(result.exception)
        assert result.exit_code == 0 or len(result.stderr.strip().splitlines()) == 1, result.stderr


def _setting_keys() -> list[str]:
    from acdc_cli.config import Settings

    keys = [name for name, field in Settings.model_fields.items() if not hasattr(field.annotation, "model_fields")]
    for section, field in Settings.model_fields.items():
        if hasattr(field.annotation, "model_fields"):
            keys += [f"{section}.{name}" for name in field.annotation.model_fields]
    return keys


SET_VALUES = st.one_of(
    st.text(max_size=30),
    st.integers(-2**70, 2**70).map(str),
    st.floats().map(repr),
    st.sampled_from(["inf", "nan", "-0.0", "1e400", "true", "[]", "[[[[1]]]]", "{a = 1}", '"2:4"', "'x[/]y'",
                     "9" * 5000, "[" * 3000, "[" * 1500 + "]" * 1500]),
)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(_setting_keys()), raw=SET_VALUES)
def test_set_fuzz(key, raw):
    """`--set KEY=VALUE` with any value: settings, or an AcdcError of one line (never another exception)."""
    try:
        load_settings(overrides=[f"{key}={raw}"])
    except AcdcError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)
        event("AcdcError")
    else:
        event("settings")


@pytest.mark.parametrize("rules", [{"include": None}, {"exclude": None}, {"exclude": 3}, None, []])
def test_sparsity_rules_that_are_not_lists_are_one_line_or_the_defaults(seeds, tmp_path, rules):
    """Found by the long fuzz under CI=true: a dense export whose saved config had sparsity.exclude = null made
    `acdc inspect` raise TypeError. A checkpoint's config is checked on load (one line); an export's rules that are
    not lists (null, a number), or a sparsity section that is not a table, read as the defaults."""
    for kind in ("checkpoint", "dense"):
        blob = seeds[kind]
        config = json.loads(json.loads(blob[8:header_end(blob)])["__metadata__"]["config"])
        config["sparsity"] = rules if not isinstance(rules, dict) else {**config["sparsity"], **rules}
        path = write(tmp_path, with_metadata(blob, "config", json.dumps(config)), kind)
        if kind == "checkpoint":
            with pytest.raises(AcdcError, match="malformed metadata"):
                inspect_file(path)
        else:
            info = inspect_file(path)
            assert 0.0 <= info["sparsity"] <= 1.0 and json.dumps(info)


# ----------------------------------------------------------------------------------------------------------------
# the API's engine state: ACDC.load_state_dict fed mutated states of a real engine


def _engine_in_compressed_phase():
    from acdc_cli import ACDC

    torch.manual_seed(0)
    model = create("tiny-test", num_classes=10)
    engine = ACDC(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=4, sparsity=0.5, warmup_epochs=1,
                  compressed_epochs=1, decompressed_epochs=1, final_compressed_epochs=1)
    for epoch in range(4):
        engine.start_epoch(epoch)  # through a decompression: the state holds previous masks too
    return engine


ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                            max_size=2))


@st.composite
def odd_mask(draw, like: torch.Tensor):
    if not isinstance(like, torch.Tensor):  # an earlier mutation already made this entry something else
        return draw(ODD_VALUES)
    kind = draw(st.sampled_from(["values", "dtype", "shape", "not-a-tensor"]))
    if kind == "values":
        return torch.full(like.shape, draw(st.integers(0, 255)), dtype=torch.uint8)
    if kind == "dtype":
        return like.to(draw(st.sampled_from([torch.float32, torch.int64, torch.float16]))) * draw(
            st.sampled_from([1, 2, 0.5]))
    if kind == "shape":
        return like.flatten()[: draw(st.integers(0, max(like.numel() - 1, 0)))]
    return draw(ODD_VALUES)


@st.composite
def mutated_state(draw, state: dict) -> dict:
    state = dict(state)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(sorted(state) + ["unknown"]))
        # a table emptied by earlier drops is mutated as a whole value instead
        if field in ("masks", "previous_masks") and isinstance(state.get(field), dict) and state[field] \
                and draw(st.booleans()):
            masks = dict(state[field])
            name = draw(st.sampled_from(sorted(masks)))
            action = draw(st.sampled_from(["drop", "add", "change"]))
            if action == "drop":
                masks.pop(name)
            elif action == "add":
                masks[draw(st.text(max_size=8))] = masks[name]
            else:
                masks[name] = draw(odd_mask(masks[name]))
            state[field] = masks
        elif draw(st.booleans()):
            state.pop(field, None)
        else:
            state[field] = draw(ODD_VALUES)
    return state


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_engine_load_state_dict_fuzz(data):
    """A mutated state loads into a consistent engine (0/1 masks on every selected weight in a compressed phase), or
    is one AcdcError line that leaves the engine as it was."""
    engine = _engine_in_compressed_phase()
    good = engine.state_dict()
    before = {k: v.clone() for k, v in engine.masks.items()}
    state = data.draw(mutated_state(good))
    try:
        engine.load_state_dict(state)
    except AcdcError as exc:
        event("refused")
        assert "\n" not in str(exc) and str(exc)
        assert engine.state_dict()["epoch"] == good["epoch"] and engine.mask_change == good["mask_change"]
        assert set(engine.masks) == set(before) and all(torch.equal(engine.masks[k], before[k]) for k in before)
        return
    event("loaded")
    after = engine.state_dict()
    for key in ("masks", "previous_masks"):
        if after[key] is not None:
            assert set(after[key]) == set(engine.prunable)
            assert all(m.dtype == torch.bool and m.shape == engine.prunable[n].shape for n, m in after[key].items())
    change = after["mask_change"]
    assert change is None or 0 <= change <= 1
    assert after["epoch"] is None or 0 <= after["epoch"] < engine.plan[-1].end
