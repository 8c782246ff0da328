"""Fixtures the command tests share."""

import pytest


@pytest.fixture
def paper_preset(tmp_path, monkeypatch):
    """A preset folder holding 'digits-paper': the quickstart's experiment with a paper number of 0.95."""
    import acdc_cli.config as config

    folder = tmp_path / "presets"
    folder.mkdir()
    text = (config.presets_dir() / "quickstart.toml").read_text()
    (folder / "digits-paper.toml").write_text("paper_top1 = 0.95\n" + text)
    monkeypatch.setattr(config, "presets_dir", lambda: folder)
    return "digits-paper"
