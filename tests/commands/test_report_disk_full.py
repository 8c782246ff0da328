"""``acdc report -o`` onto a full disk: one line, exit 2, and no empty or torn PNG left where a figure was being
written (matplotlib used to create the file, then fail with an OSError traceback)."""

from __future__ import annotations

import pytest
from cli_helpers import fails

from acdc_cli import testing_hooks


@pytest.mark.parametrize("name", ["*-top1-loss.png", "*-sparsity-lr.png", "report.html"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(quickstart_run, tmp_path, monkeypatch, name):
    out = tmp_path / "report"
    monkeypatch.setenv(testing_hooks.FAULT_ENV, f"fail@write:1:{name}")
    testing_hooks.reset()
    line = fails(["report", quickstart_run, "-o", out])
    assert line.startswith(f"error: cannot write {out}/") and line.endswith(": No space left on device"), line
    # the figures written before the failure are whole; the one that failed and everything after it are absent
    left = sorted(p.name for p in out.iterdir())
    assert all(not p.name.startswith(".") and p.stat().st_size > 0 for p in out.iterdir()), left
    assert not any(p.match(name) for p in out.iterdir()), left
    monkeypatch.delenv(testing_hooks.FAULT_ENV)
    testing_hooks.reset()
