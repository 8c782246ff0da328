"""`acdc report`: two quickstart runs at different sparsities give report.html and the PNGs; the files exist and
decode as images, the HTML holds every image inline and references nothing outside itself, and the comparison
table holds the runs' real numbers."""

import base64
import html.parser
import io
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
from cli_helpers import fails, invoke, invoke_json, short_schedule, shows, trained
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from acdc_cli.commands import report as report_mod
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import MAX_ROWS_BYTES, read_jsonl

PER_RUN = ("top1-loss", "sparsity-lr", "layers", "mask-change")


@pytest.fixture(scope="module")
def half_sparse(tmp_path_factory):
    """The quickstart at 50 % instead of 90 %, in 6 epochs: dense 0-1, compressed 2, decompressed 3, compressed 4-5
    (two compressed phases, so a mask change)."""
    return trained(tmp_path_factory, "half", *short_schedule(6, 2, 1, 1, 2, 0, "sparsity.target=0.5"), folder="half")


class Refs(html.parser.HTMLParser):
    """Every tag and every attribute that can point somewhere."""

    def __init__(self):
        super().__init__()
        self.tags, self.refs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [value for name, value in attrs if name in ("src", "href", "srcset", "data", "action")]


def test_report_of_two_runs_writes_inline_html_and_pngs(quickstart_run, half_sparse, tmp_path):
    out = tmp_path / "report"
    result = invoke_json("report", quickstart_run, half_sparse, "-o", out)
    assert result["schema"] == "acdc.report/1" and result["report"] == str(out / "report.html")
    pngs = ["compare-top1.png", "sparsity-vs-top1.png"] + [f"{run}-{kind}.png" for run in ("run", "half")
                                                            for kind in PER_RUN]
    assert sorted(result["files"]) == sorted([str(out / "report.html"), *(str(out / p) for p in pngs)])
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.html", *pngs])
    images = {}
    for name in pngs:
        data = (out / name).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # a whole, undamaged PNG
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 200, name
        images[name] = data

    page = (out / "report.html").read_text()
    refs = Refs()
    refs.feed(page)
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(refs.tags)
    # every reference is inline data, and the inline images are the PNG files, byte for byte
    assert refs.refs and all(ref.startswith("data:image/png;base64,") for ref in refs.refs)
    inline = [base64.b64decode(ref.removeprefix("data:image/png;base64,")) for ref in refs.refs]
    assert sorted(inline) == sorted(images.values())
    text = page
    for ref in refs.refs:
        text = text.replace(ref, "")
    assert "http:" not in text and "https:" not in text and "//" not in text and "url(" not in text
    assert "@import" not in text


def test_report_table_holds_each_runs_best_sparse_and_dense(quickstart_run, half_sparse, tmp_path):
    runs = {r["label"]: r for r in invoke_json("report", quickstart_run, half_sparse, "-o", tmp_path)["runs"]}
    assert set(runs) == {"run", "half"}
    for run_dir, label, target, epochs in ((quickstart_run, "run", 0.9, 30), (half_sparse, "half", 0.5, 6)):
        row = runs[label]
        assert (row["target_sparsity"], row["epochs"], row["epochs_done"]) == (target, epochs, epochs)
        assert row["top1_metric"] == "val_top1" and row["paper_top1"] is None  # the quickstart has no paper number
        # the same epochs and numbers as the checkpoints training kept
        for key in ("best_sparse", "best_dense"):
            recorded = load_checkpoint(run_dir / f"{key}.safetensors").metrics
            assert row[key] == {"epoch": recorded["epoch"], "top1": recorded["val_top1"],
                                "sparsity": recorded["sparsity"]}, (label, key)
        # per-layer sparsity counted in best_sparse.safetensors: zeros of each masked weight
        tensors = load_file(run_dir / "best_sparse.safetensors")
        masked = [k.removeprefix("mask.") for k in tensors if k.startswith("mask.")]
        assert list(row["best_sparse_layers"]) == [f"features.{i}.weight" for i in (0, 3, 7, 10)] + [
            "classifier.1.weight", "classifier.4.weight"]  # the model's own order
        assert set(row["best_sparse_layers"]) == set(masked)
        for name, value in row["best_sparse_layers"].items():
            assert value == int((tensors[name] == 0).sum()) / tensors[name].numel()
        zeros = sum(int((tensors[n] == 0).sum()) for n in masked)
        assert zeros / sum(tensors[n].numel() for n in masked) == pytest.approx(target, abs=1e-4)


def test_one_run_reports_into_its_own_folder_and_prints_a_table(half_sparse, tmp_path):
    run = shutil.copytree(half_sparse, tmp_path / "a run")
    result = invoke("report", run, env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    assert (run / "report" / "report.html").is_file()
    assert sorted(p.name for p in (run / "report").glob("*.png")) == sorted(f"a_run-{k}.png" for k in PER_RUN)
    assert "…" not in result.stdout
    rows = read_jsonl(run / "metrics.jsonl")
    best = max((r for r in rows if r["phase"] == "sparse"), key=lambda r: r["val_top1"])
    assert shows(f"{100 * best['val_top1']:.2f} % (epoch {best['epoch']})", result.stdout)
    assert shows(f"wrote {run / 'report' / 'report.html'} and 4 PNGs beside it", result.stdout)


def test_a_run_still_in_its_first_phase_reports_what_it_has(half_sparse, tmp_path):
    """Two epochs done, both dense: no best sparse checkpoint and no mask change yet, said in the report."""
    run = shutil.copytree(half_sparse, tmp_path / "early")
    rows = read_jsonl(run / "metrics.jsonl")[:2]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "best_sparse.safetensors").unlink()
    report = invoke_json("report", run, "-o", tmp_path / "out")
    assert report["runs"][0]["best_sparse"] is None and report["runs"][0]["epochs_done"] == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["early-sparsity-lr.png", "early-top1-loss.png"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "no best_sparse.safetensors yet" in page and "a mask change needs two compressed phases" in page


def test_bad_report_inputs_are_one_line_and_write_nothing(half_sparse, tmp_path):
    out = tmp_path / "out"
    assert "is not an acdc run dir" in fails(["report", half_sparse, tmp_path / "nothing", "-o", out])
    empty = shutil.copytree(half_sparse, tmp_path / "empty")
    (empty / "metrics.jsonl").write_text("")
    assert "no epoch has finished yet" in fails(["report", empty, "-o", out])
    assert not out.exists()
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    assert "is not a folder" in fails(["report", half_sparse, "-o", a_file])
    assert a_file.read_text() == "keep"


def test_a_run_without_validation_split_is_reported_on_its_test_top1(tmp_path):
    """data.val_size = 0 (the paper's protocol): rows carry test_* keys, TensorBoard groups them under test/, and the
    report compares the best checkpoints by the test top-1 that chose them."""
    run = tmp_path / "run"
    result = invoke("train", "--out", run, *short_schedule(4, 1, 1, 1, 1, 0, "data.val_size=0",
                                                           "log.tensorboard=true"))
    assert result.exit_code == 0, result.output
    row = invoke_json("report", run, "-o", tmp_path / "out")["runs"][0]
    assert row["top1_metric"] == "test_top1"
    for key in ("best_sparse", "best_dense"):
        recorded = load_checkpoint(run / f"{key}.safetensors").metrics
        assert row[key]["epoch"] == recorded["epoch"] and row[key]["top1"] == recorded["test_top1"]
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    rows = read_jsonl(run / "metrics.jsonl")
    assert [e.value for e in acc.Scalars("test/top1")] == pytest.approx([r["test_top1"] for r in rows])
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("val/")]
    assert "test top-1" in (tmp_path / "out" / "report.html").read_text()


def test_runs_of_the_same_folder_name_keep_apart(half_sparse, tmp_path):
    a = shutil.copytree(half_sparse, tmp_path / "a" / "run")
    b = shutil.copytree(half_sparse, tmp_path / "b" / "run")
    report = invoke_json("report", a, b, "-o", tmp_path / "out")
    assert [r["label"] for r in report["runs"]] == ["a/run", "b/run"]
    names = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert {f"{stem}-{kind}.png" for stem in ("a_run", "b_run") for kind in PER_RUN} <= names


def _report_in_a_process(run, out):
    """``acdc report`` in its own process with a time limit: a reader that blocks on a FIFO or reads /dev/zero
    forever fails the test instead of hanging the suite or exhausting memory."""
    try:
        done = subprocess.run([sys.executable, "-m", "acdc_cli", "report", str(run), "-o", str(out)],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("acdc report did not finish within 300 s")
    return done.returncode, done.stderr.strip().splitlines()


@pytest.mark.parametrize("kind", ["device", "fifo", "too large"])
def test_hostile_metrics_files_end_in_one_line_quickly(half_sparse, tmp_path, kind):
    run = shutil.copytree(half_sparse, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    metrics.unlink()
    if kind == "device":
        metrics.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(metrics)
    else:  # sparse: its size is past the bound, its blocks are not on disk
        with open(metrics, "wb") as fh:
            fh.truncate(MAX_ROWS_BYTES + 1)
    code, lines = _report_in_a_process(run, tmp_path / "out")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert ("is not a regular file" if kind != "too large" else "more than any run writes") in lines[0]
    assert not (tmp_path / "out").exists()


def test_long_runs_are_plotted_decimated_and_say_so(half_sparse, tmp_path, monkeypatch):
    """Past MAX_PLOTTED rows a chart draws every k-th row (and the last), and the page says so; the table and the
    best checkpoints still come from every row."""
    monkeypatch.setattr(report_mod, "MAX_PLOTTED", 4)
    rows = read_jsonl(half_sparse / "metrics.jsonl")
    run = SimpleNamespace(rows=rows)
    epochs, values = report_mod._series(run, "train_loss")
    assert report_mod.plotted_every(6) == 2 and epochs == [0, 2, 4, 5]
    assert values == [rows[e]["train_loss"] for e in (0, 2, 4, 5)]
    report = invoke_json("report", half_sparse, "-o", tmp_path / "out")
    assert report["runs"][0]["epochs_done"] == 6
    assert "6 rows: the charts plot every 2-th of them" in (tmp_path / "out" / "report.html").read_text()


def test_runs_are_labelled_by_data_and_model_and_a_mixed_comparison_is_warned(quickstart_run, tmp_path):
    """A run that started from the quickstart but trains other data and model is not labelled "quickstart"; a report
    over runs on different datasets says their top-1 are not comparable, in the page, in --json and on stderr."""
    other = tmp_path / "synthetic-run"
    result = invoke("train", "--out", other, *short_schedule(2, 1, 1, 1, 1, 0, "data.name=synthetic",
                                                             "model.name=tiny-test", "data.synthetic_size=64",
                                                             "data.batch_size=16"))
    assert result.exit_code == 0, result.output
    result = invoke("report", quickstart_run, other, "--out", tmp_path / "report", "--json")
    assert result.exit_code == 0, result.output
    assert "warning: the runs compared were trained on different datasets (digits, synthetic)" in result.stderr
    data = json.loads(result.stdout)
    assert data["warning"].startswith("the runs compared were trained on different datasets")
    rows = {row[0]: dict(zip(report_mod.SUMMARY_HEADER, row)) for row in report_mod.summary_rows([report_mod.read_run(quickstart_run, "q"),
                                                                          report_mod.read_run(other, "s")])}
    assert (rows["q"]["data"], rows["q"]["model"], rows["q"]["preset"]) == ("digits", "digits-cnn", "quickstart")
    assert (rows["s"]["data"], rows["s"]["model"], rows["s"]["preset"]) == ("synthetic", "tiny-test",
                                                                           "- (started from quickstart)")
    page = (tmp_path / "report" / "report.html").read_text()
    assert "different datasets (digits, synthetic)" in page
    single = invoke("report", quickstart_run, "--out", tmp_path / "one", "--json")
    assert single.exit_code == 0 and json.loads(single.stdout)["warning"] is None and "warning" not in single.stderr
    # eval and inspect label the run as the report does; --json keeps the preset it started from
    for command in ("eval", "inspect"):
        for run, label in ((other, "tiny-test (- (started from quickstart))"), (quickstart_run, "(quickstart)")):
            shown = invoke(command, run / "best_sparse.safetensors")
            assert shown.exit_code == 0 and label in " ".join(shown.stdout.split()), (command, shown.stdout)
    assert invoke_json("eval", other / "best_sparse.safetensors")["preset"] == "quickstart"
