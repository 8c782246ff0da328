"""Settings precedence and validation: defaults < preset < --config < env < flags < --set."""

import pytest
from pydantic import ValidationError

from acdc_cli.config import Settings, dump_toml, load_settings, parse_set
from acdc_cli.errors import AcdcError


def test_defaults_and_quickstart_preset():
    s = load_settings()
    assert s.preset == "quickstart"
    assert s.model.name == "digits-cnn" and s.data.name == "digits"
    assert s.sparsity.target == 0.9 and s.schedule.method == "acdc"


def test_precedence_layers(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[optim]\nlr = 0.3\nmomentum = 0.5\n[runtime]\nseed = 7\n")
    s = load_settings(preset="quickstart", config=cfg)
    assert (s.optim.lr, s.optim.momentum, s.runtime.seed) == (0.3, 0.5, 7)
    monkeypatch.setenv("ACDC_OPTIM__LR", "0.0123")
    monkeypatch.setenv("ACDC_RUNTIME__SEED", "9")
    s = load_settings(preset="quickstart", config=cfg)
    assert (s.optim.lr, s.optim.momentum, s.runtime.seed) == (0.0123, 0.5, 9)
    s = load_settings(preset="quickstart", config=cfg, flags={"runtime.seed": 11}, overrides=["optim.lr=0.02"])
    assert (s.optim.lr, s.runtime.seed) == (0.02, 11)


def test_env_list_value(monkeypatch):
    monkeypatch.setenv("ACDC_SPARSITY__EXCLUDE", '["classifier.*"]')
    assert load_settings().sparsity.exclude == ["classifier.*"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.nope=1", "nope"),
        ("nosuch.key=1", "nosuch"),
        ("optim.lr='fast'", "optim.lr"),
        ("sparsity.target=1.0", "sparsity.target"),
        ("sparsity.target=-0.1", "sparsity.target"),
        ("sparsity.structure='4:4'", "N:M"),
        ("sparsity.structure='2-4'", "sparsity.structure"),
        ("schedule.epochs=5", "exceed schedule.epochs"),
        ("schedule.method='magic'", "schedule.method"),
        ("runtime.device='tpu'", "runtime.device"),
        ("optim.milestones=[100]", "milestones"),
    ],
)
def test_invalid_overrides_name_the_key(override, fragment):
    with pytest.raises(AcdcError) as info:
        load_settings(overrides=[override])
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_unknown_env_keys_are_rejected(monkeypatch):
    monkeypatch.setenv("ACDC_OPTIM__NOPE", "1")
    with pytest.raises(AcdcError, match="ACDC_OPTIM__NOPE .*optim has no key 'nope'"):
        load_settings()
    monkeypatch.delenv("ACDC_OPTIM__NOPE")
    monkeypatch.setenv("acdc_runtime__seeds", "1")  # names are case-insensitive: a typo in lower case is caught too
    with pytest.raises(AcdcError, match="runtime has no key 'seeds'"):
        load_settings()


@pytest.mark.parametrize("name", ["ACDC_VENV", "ACDC_BOGUS", "ACDC_HOME__DIR", "ACDC_OPTIM", "ACDC_OPTIM_LR",
                                  "ACDC_GPU_CHECK_REHEARSAL", "_ACDC_COMPLETE"])
def test_variables_of_another_shape_are_not_settings(monkeypatch, name):
    """Only ACDC_<SECTION>__<KEY> of a known section is a setting: a wrapper script's ACDC_VENV, an unknown section
    or a single underscore is someone else's variable, and changes nothing."""
    monkeypatch.setenv(name, "0.5")
    monkeypatch.setenv("ACDC_OPTIM__LR", "0.0123")
    settings = load_settings()
    assert settings.optim.lr == 0.0123
    assert settings.model_dump() == load_settings(overrides=["optim.lr=0.0123"]).model_dump()


def test_env_list_value_that_is_not_json_is_one_line(monkeypatch):
    monkeypatch.setenv("ACDC_SPARSITY__EXCLUDE", "fc.*")
    with pytest.raises(AcdcError, match="ACDC_SPARSITY__EXCLUDE is not a JSON list"):
        load_settings()


def test_nm_structure_implies_target():
    s = load_settings(overrides=["sparsity.structure='2:4'"])
    assert s.sparsity.n_m == (2, 4) and s.sparsity.target == 0.5
    assert Settings(sparsity={"structure": "1:4"}).sparsity.target == 0.75
    # a target stated beside N:M must agree with it (0.9 used to become 0.5 silently)
    assert Settings(sparsity={"structure": "1:4", "target": 0.75}).sparsity.target == 0.75
    with pytest.raises(ValidationError, match="contradicts"):
        Settings(sparsity={"structure": "1:4", "target": 0.9})


def test_parse_set_reads_toml_values_or_strings():
    assert parse_set("optim.lr=0.02") == (["optim", "lr"], 0.02)
    assert parse_set("sparsity.exclude=['fc', 'conv1']") == (["sparsity", "exclude"], ["fc", "conv1"])
    assert parse_set("model.name=wrn-10-2") == (["model", "name"], "wrn-10-2")
    assert parse_set("optim.nesterov=false") == (["optim", "nesterov"], False)
    with pytest.raises(AcdcError):
        parse_set("optim.lr")
    with pytest.raises(AcdcError):
        parse_set("bad key=1")


def test_toml_round_trip(tmp_path):
    s = load_settings(overrides=["sparsity.exclude=['fc']", "optim.milestones=[5, 9]"])
    path = tmp_path / "saved.toml"
    path.write_text(s.to_toml())
    again = load_settings(config=path)
    assert again.model_dump() == s.model_dump()
    assert "[optim]" in dump_toml({"optim": {"lr": 0.1}})


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr=")
    with pytest.raises(AcdcError, match="not valid TOML"):
        load_settings(config=bad)
    with pytest.raises(AcdcError, match="not found"):
        load_settings(config=tmp_path / "missing.toml")


def test_data_dir_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(flags={"data.dir": "data/cifar"})
    assert s.data.dir == tmp_path / "data" / "cifar" and s.data.dir.is_absolute()


def test_non_ascii_strings_survive_the_toml_round_trip(tmp_path):
    s = load_settings(overrides=["data.dir='/tmp/dätä/😀'", "description='ünïcode ✓ 😀'"])
    path = tmp_path / "c.toml"
    path.write_text(s.to_toml(), encoding="utf-8")
    again = load_settings(config=path)
    assert again.data.dir == s.data.dir and again.description == s.description


@pytest.mark.parametrize("seed", ["-1", str(2**62), "18446744073709551615"])
def test_seed_bounds(seed):
    with pytest.raises(AcdcError, match="runtime.seed"):
        load_settings(overrides=[f"runtime.seed={seed}"])
