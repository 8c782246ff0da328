"""``acdc eval``, ``prune``, ``export`` and ``inspect``: the commands that read one checkpoint or export and
render what :mod:`acdc_cli.commands` returns."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from acdc_cli.cli.common import (
    DataOpt,
    JsonOpt,
    ModelOpt,
    NumClassesOpt,
    complete_from,
    err_console,
    out_console,
    print_json,
    user_errors,
)
from acdc_cli.errors import AcdcError
from acdc_cli.schemas import INSPECT_SCHEMA, PRUNE_SCHEMA

# what --format completes to, spelled here so that completing does not import torch (a test holds it to export's)
EXPORT_FORMATS = ("sparse-24-bitmask", "sparse-bitmask", "dense", "onnx")
CONV_LAYOUTS = ("native", "rows")


@user_errors
def eval_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint (`acdc train`, `acdc prune`) or an export of any format "
                                  "(`acdc export`: sparse-24-bitmask, sparse-bitmask, dense, onnx).")
    ],
    data_dir: Annotated[
        Optional[Path],
        typer.Option("--data-dir", "-d", help="Dataset folder (default: the one saved in the checkpoint; digits need none)."),
    ] = None,
    split: Annotated[
        Optional[str], typer.Option("--split", autocompletion=complete_from(("val", "test")), help="val (held out of the training split) or test (default: the "
                                                    "split the run measured every epoch: val, or test for a run "
                                                    "with data.val_size = 0).")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", "-b", min=1, help="Images per batch (default: data.eval_batch_size).")
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N (default: as trained).")] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--fp32", help="--amp: autocast on CUDA in the run's "
                                                    "runtime.amp (bf16 when off); --fp32: fp32 (default: the run's "
                                                    "runtime.eval_precision, fp32 unless it said amp; the CPU always "
                                                    "runs fp32).")] = None,
    data: DataOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Top-1, top-5 and loss of a checkpoint or export as saved, beside the paper's number when comparable.

    Evaluates the weights as saved (sparse or dense) in the run's evaluation precision (fp32 unless
    runtime.eval_precision said amp; --amp/--fp32 choose) and reports their sparsity over the prunable weights. An
    .onnx export runs on ONNX Runtime's CPU provider, so the file you ship is the one measured. The paper's top-1 and
    the difference are shown only when every setting that can change the result (all but output, logging, device,
    workers and the like) is still the preset's and the split is the test split; otherwise the output names the
    first setting that differs. Model and
    dataset are rebuilt from the file's own metadata: no preset or flag is needed. Accuracies and sparsity are
    fractions in [0, 1] in --json output.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from acdc_cli.commands.evaluate import eval_checkpoint

    console = err_console()
    progress = None
    if console.is_terminal:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        progress.start()
    try:
        result = eval_checkpoint(checkpoint, split, data_dir, batch_size, device, progress, amp, data)
    finally:
        if progress is not None:
            progress.stop()
    if as_json:
        print_json(result)
        return
    # strings from the file's metadata and paths are shown as they are, never read as rich markup
    table = Table(title=escape(f"acdc eval: {checkpoint}"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    label = result["preset_label"] or result["preset"] or "no preset"
    table.add_row("model", escape(f"{result['arch']} ({label}), "
                                  f"{_epochs_done(result['epoch'])}, {result['phase']}"))
    table.add_row("file", escape(f"{result['kind']} ({result['format']}, {result['weights_dtype']} weights)"))
    table.add_row("split", f"{result['split']}, {result['images']:,} images on {result['device']}")
    table.add_row("precision", result["precision"])
    table.add_row("top-1", _pct(result["top1"]))
    table.add_row("top-5", _pct(result["top5"]))
    table.add_row("loss", f"{result['loss']:.4f}")
    table.add_row("sparsity", f"{_pct(result['sparsity'])} of prunable weights")
    table.add_row("FLOPs", escape(_flops_text(result["flops"], result["flops_note"])))
    recorded = result[f"recorded_{result['split']}_top1"]
    if recorded is not None:
        table.add_row(f"{result['split']} top-1 recorded in training", _pct(recorded))
    if result["paper_top1"] is not None:
        table.add_row("paper top-1", f"{_pct(result['paper_top1'])} ({100 * result['paper_diff']:+.2f} points)")
    console = out_console()
    console.print(table)
    if result["paper_note"] is not None:
        # on its own line: a table cell would fold the reason at the terminal's width
        console.print(escape(f"paper top-1 not shown: {result['paper_note']}"), highlight=False)


@user_errors
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint to prune.")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Pruned checkpoint to write (*.safetensors); its fine-tune settings go beside "
                                         "it as *.toml."),
    ],
    sparsity: Annotated[
        Optional[float],
        typer.Option("--sparsity", help="Fraction of the selected weights to prune, e.g. 0.9 (N:M implies its own)."),
    ] = None,
    structure: Annotated[
        str, typer.Option("--structure", help="unstructured, or N:M such as 2:4 (N kept of every M input channels).")
    ] = "unstructured",
    scope: Annotated[
        str, typer.Option("--scope", help="global: one magnitude threshold over all layers; uniform: per layer.")
    ] = "global",
    include: Annotated[
        Optional[list[str]],
        typer.Option("--include", help="Glob over module names to prune (repeatable; default: the checkpoint's rules)."),
    ] = None,
    exclude: Annotated[
        Optional[list[str]], typer.Option("--exclude", help="Glob over module names to keep dense (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT (and its .toml) if they exist.")] = False,
    model: ModelOpt = None,
    num_classes: NumClassesOpt = None,
    data: DataOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One-shot magnitude pruning with the training engine: unstructured (global or uniform) or N:M.

    Prunes the weights the rules select (the checkpoint's own include/exclude unless given). OUT holds the weights,
    the masks and the checkpoint's settings with these sparsity rules and a schedule that is compressed throughout
    (also written beside it as OUT.toml, to edit), so `acdc train --from OUT` fine-tunes with the masks held (change
    the length with --set schedule.epochs=E --set schedule.final_compressed_epochs=E).
    """
    from acdc_cli.commands.prune import prune_checkpoint

    result = prune_checkpoint(checkpoint, out, sparsity, structure, scope, include, exclude, force, model,
                              num_classes, data)
    if as_json:
        print_json(result.as_dict(), PRUNE_SCHEMA)
        return
    # paths and layer names are text, never rich markup
    table = Table(title=escape(f"pruned {checkpoint} ({result.structure}, {result.scope})"))
    for col in ("layer", "shape", "sparsity"):
        table.add_column(col, justify="right" if col == "sparsity" else "left")
    for layer in result.layers:
        kept = _pct(layer["sparsity"]) if "sparsity" in layer else f"[dim]dense: {escape(layer['kept_dense'])}[/]"
        table.add_row(escape(layer["name"]), "×".join(map(str, layer["shape"])), kept)
    console = out_console()
    console.print(table)
    console.print(f"sparsity {_pct(result.sparsity)} of the selected weights; wrote {result.path} and "
                  f"{result.config_path}", highlight=False, markup=False)
    console.print(f"fine-tune with the masks held: acdc train --from {shlex.quote(str(result.path))}", highlight=False,
                  markup=False)


@user_errors
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint to export.")],
    format_: Annotated[
        str,
        typer.Option("--format", "-f", autocompletion=complete_from(EXPORT_FORMATS),
                     help="sparse-24-bitmask (2:4 weights), sparse-bitmask (any sparsity), dense "
                                            "(a plain state dict, masks folded in) or onnx (for ONNX Runtime and "
                                            "TensorRT; needs the 'onnx' extra)."),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="The .safetensors file to write (.onnx for --format onnx), "
                                                         "or, for the safetensors formats, a directory (an existing "
                                                         "one, or a new path without a suffix or ending in /) that "
                                                         "gets model.safetensors and the config.json "
                                                         "compressed-tensors' from_pretrained reads.")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16 (onnx: float32).")] = "float32",
    opset: Annotated[Optional[int], typer.Option("--opset", help="onnx: ONNX opset (18 or newer; default: the "
                                                                 "exporter's).")] = None,
    batch: Annotated[Optional[str], typer.Option("--batch", help="onnx: 'dynamic' (default) or a fixed batch "
                                                                 "size.")] = None,
    input_size: Annotated[Optional[int], typer.Option("--input-size", help="onnx: side of the square input image "
                                                                           "(default: the model's, e.g. 224).")] = None,
    fold_bn: Annotated[bool, typer.Option("--fold-bn", help="onnx: fold BatchNorm into the preceding convs (zeros "
                                                            "stay zero; the 2:4 pattern is re-checked).")] = False,
    onnx_sparse: Annotated[
        Optional[bool],
        typer.Option("--onnx-sparse/--no-onnx-sparse",
                     help="onnx: write pruned layers over 2/3 zeros as ONNX sparse initializers (smaller file; "
                          "default: on for sparse checkpoints); --no-onnx-sparse: dense initializers, for runtimes "
                          "that do not read sparse ones (docs/files.md)."),
    ] = None,
    conv_layout: Annotated[
        Optional[str],
        typer.Option("--conv-layout", autocompletion=complete_from(CONV_LAYOUTS),
                     help="sparse-bitmask: native (default) stores conv weights in their own shape, which "
                          "compressed-tensors' ModelCompressor.decompress puts back into the model; rows as "
                          "(O, kh·kw·I) rows (a smaller bitmask; acdc restores the shape, so files only). "
                          "sparse-24-bitmask always uses rows."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
    model: ModelOpt = None,
    num_classes: NumClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a checkpoint as a sparse file that is really smaller, or as a dense state dict.

    sparse-24-bitmask and sparse-bitmask follow compressed-tensors (values + packed bitmask per layer; sparse-bitmask
    keeps conv weights in their own shape, 2:4 stores them as O×kh·kw·I rows); dense is a plain state dict with the
    masks folded in, which torchvision loads. Prints the mask statistics and the size against a dense export.

    With -o DIR (an existing directory, a new path without a suffix, or one ending in /) it writes
    DIR/model.safetensors and DIR/config.json, which compressed-tensors' ModelCompressor.from_pretrained(DIR) reads;
    its decompress(DIR, model) then restores the model exactly; acdc eval, inspect and bench --inference read DIR as
    its model.safetensors. A file export ends in .safetensors, an ONNX export in .onnx.

    onnx writes the model in eval mode (fp32, masks folded in, BatchNorm kept unless --fold-bn) with input `input`
    and output `logits`; it is written only after its initializers have been read back (pruned zeros intact) and
    ONNX Runtime's logits compared with PyTorch's.

    `acdc_cli.files.open.load(OUT)` turns any safetensors export back into the exact dense state dict.
    """
    from acdc_cli.commands.export import ONNX, export_checkpoint

    onnx_options = {"--opset": opset, "--batch": batch, "--input-size": input_size, "--fold-bn": fold_bn or None,
                    "--onnx-sparse/--no-onnx-sparse": onnx_sparse}
    if format_ == ONNX:
        if dtype != "float32" or conv_layout is not None:
            raise AcdcError("--format onnx writes float32 weights in their own shape (drop --dtype/--conv-layout; "
                            "TensorRT builds fp16 engines with --fp16)")
        from acdc_cli.commands.export_onnx import export_onnx

        _render_onnx_export(export_onnx(checkpoint, Path(out), opset, batch, input_size, fold_bn, force,
                                        model_name=model, num_classes=num_classes, sparse=onnx_sparse), as_json)
        return
    given = [flag for flag, value in onnx_options.items() if value is not None]
    if given:
        raise AcdcError(f"{given[0]} applies to --format onnx only")
    result = export_checkpoint(checkpoint, out, format_, dtype, force, model, num_classes,
                               conv_layout=conv_layout)
    summary = result.as_dict()
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"{result.format} export ({result.dtype})")
    for col in ("layer", "shape", "kept", "sparsity", "2:4", "dense", "stored"):
        # long layer names fold; the other columns never wrap
        table.add_column(col, justify="left" if col in ("layer", "shape", "2:4") else "right",
                         overflow="fold", no_wrap=col != "layer")
    for layer in result.layers:
        table.add_row(escape(layer.name), "×".join(map(str, layer.shape)), f"{layer.kept:,}", _pct(layer.sparsity),
                      _nm_text(layer.nm_valid), _size(layer.dense_bytes), _size(layer.stored_bytes))
    kept = sum(layer.kept for layer in result.layers)
    table.add_row("total", "", f"{kept:,}", _pct(result.sparsity), "", _size(sum(x.dense_bytes for x in result.layers)),
                  _size(sum(x.stored_bytes for x in result.layers)), style="bold")
    console = out_console()
    console.print(table)
    console.print(f"wrote {result.path}: {_size(result.size_bytes)}, {summary['ratio_to_dense']:.3f} × a dense export "
                  f"({_size(result.dense_bytes)})", highlight=False, markup=False)
    if result.config_path is not None:
        reader = ("compressed-tensors' ModelCompressor.from_pretrained reads the directory" if result.format != "dense"
                  else "the model's description and preprocessing (a dense export has nothing to decompress)")
        console.print(f"wrote {result.config_path}: {reader}", highlight=False, markup=False)


def _render_onnx_export(result, as_json: bool) -> None:
    if as_json:
        print_json(result.as_dict())
        return
    table = Table(title=f"onnx export (float32, opset {result.opset})")
    for col in ("initializer", "shape", "kept", "sparsity", "2:4", "as trained"):
        table.add_column(col, justify="right" if col in ("kept", "sparsity") else "left",
                         overflow="fold", no_wrap=col != "initializer")
    for layer in result.layers:
        same = "bit-exact" if layer.exact else ("zeros kept" if layer.zeros_kept else "[red]changed[/]")
        table.add_row(escape(layer.name), "×".join(map(str, layer.shape)), f"{layer.kept:,}", _pct(layer.sparsity),
                      _nm_text(layer.nm_valid), same)
    console = out_console()
    console.print(table)
    shape = "×".join(map(str, result.input_shape))
    console.print(f"wrote {escape(str(result.path))}: {_size(result.size_bytes)}, input [bold]input[/] {shape} -> "
                  f"[bold]logits[/], sparsity {_pct(result.sparsity)} ({escape(result.structure)})", highlight=False)
    if result.fold_bn:
        pattern = "2:4 kept in every 2:4 layer" if result.structure == "2:4" else "pruned zeros kept"
        console.print(f"folded {result.batchnorms_folded} of {result.batchnorms} BatchNorm layers into the conv "
                      f"before them (the others do not follow a conv); re-checked: {pattern}", highlight=False)
    console.print(f"ONNX Runtime (CPU) vs PyTorch: max |Δ logit| {result.max_abs_diff:.2e} "
                  f"(logits up to {result.max_abs_logit:.3g})", highlight=False)


@user_errors
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="A .safetensors file: acdc checkpoint, acdc export or plain state dict.")],
    layers: Annotated[bool, typer.Option("--layers", help="Also list every prunable layer.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """What is in a checkpoint or export: metadata, sparsity, N:M validity, bytes.

    Tells checkpoint, export and plain state dict apart; counts zeros in the file per prunable layer; checks N:M along
    input channels (the file's own N:M structure, else 2:4); compares the file's size with the same tensors stored
    dense. A layer that breaks the N:M structure the file claims is flagged.
    """
    from acdc_cli.commands.inspect_file import inspect_file

    info = inspect_file(file)
    if as_json:
        print_json(info, INSPECT_SCHEMA)
        return
    meta = info["metadata"]
    # strings from the file's metadata and paths are shown as they are, never read as rich markup
    table = Table(title=escape(f"acdc inspect: {file}"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("kind", escape(f"{info['kind']} ({info['format']})"))
    if info["kind"] != "state_dict":
        label = meta.get("preset_label") or meta.get("preset") or "no preset"
        table.add_row("model", escape(f"{meta.get('arch')} ({label}), "
                                      f"{_epochs_done(meta.get('epoch'))}, {meta.get('phase')}"))
        table.add_row("acdc version", escape(str(meta.get("acdc_version"))))
        metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
        keys = ("val_top1", "val_top5", "val_loss", "test_top1", "test_top5", "test_loss", "train_top1", "sparsity")
        shown = [f"{k} {metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float))]
        if shown:
            table.add_row("recorded metrics", ", ".join(shown))
    if info.get("dtype"):
        table.add_row("dtype", escape(str(info["dtype"])))
    table.add_row("structure", escape(str(info["structure"] or "-")))
    table.add_row("sparsity", f"{_pct(info['sparsity'])} of {info['prunable_weights']:,} prunable weights "
                              f"in {len(info['layers'])} layers")
    table.add_row("size", f"{_size(info['size_bytes'])}, {info['ratio_to_dense']:.3f} × the same stored dense "
                          f"({_size(info['dense_bytes'])})")
    table.add_row("FLOPs", escape(_flops_text(info["flops"], info["flops_note"])))
    if info["kind"] != "state_dict":
        table.add_row("preprocessing", escape(_preprocessing_text(info.get("preprocessing"))))
    console = out_console()
    console.print(table)
    if layers:
        detail = Table(title="prunable layers")
        nm = escape(info["layers"][0]["nm"]) if info["layers"] else "N:M"
        for col in ("layer", "shape", "sparsity", nm, "stored as", "stored"):
            detail.add_column(col, justify="right" if col in ("sparsity", "stored") else "left",
                              overflow="fold", no_wrap=col not in ("layer", "stored as"))
        for layer in info["layers"]:
            detail.add_row(escape(layer["name"]), "×".join(map(str, layer["shape"])), _pct(layer["sparsity"]),
                           _nm_text(layer["nm_valid"]), escape(layer["encoding"]),
                           _size(layer["stored_bytes"]))
        console.print(detail)
    if info["dense_layers"]:
        kept = ", ".join(f"{layer['name']} ({layer['reason']})" for layer in info["dense_layers"])
        console.print(f"left dense by rule: {escape(kept)}", highlight=False)
    for name in info["structure_violations"]:
        console.print(f"[bold red]warning:[/] {escape(name)} breaks the {escape(str(info['structure']))} structure "
                      "the file claims", highlight=False)
    for name in info["outside_mask"]:
        console.print(f"[bold red]warning:[/] {escape(name)} holds non-zero weights outside its mask; acdc reads "
                      "them as zeros (eval, export, prune and train --from apply the mask)", highlight=False)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _nm_text(valid: bool | None) -> str:
    if valid is None:
        return "n/a"  # the input channels are not a multiple of M
    return "[green]yes[/]" if valid else "[red]no[/]"


def _flops_text(flops: dict[str, Any] | None, note: str | None) -> str:
    """Inference multiply-accumulates per image as the paper counts them, or why there are none."""
    from acdc_cli.flops import si

    if flops is None:
        return f"- ({note})"
    shape = "×".join(map(str, flops["input_shape"]))
    return f"{si(flops['sparse'])} per {shape} image, {flops['ratio']:.4f} × dense ({si(flops['dense'])})"


def _preprocessing_text(pre: dict[str, Any] | None) -> str:
    """A file's recorded preprocessing in one line: what a reader does to an image before the model sees it."""
    if not pre:
        return "not recorded (a file from before acdc recorded it, or a state dict pruned without --data)"
    shape = "x".join(str(v) for v in pre.get("input_shape") or [])
    resize = (f"shorter side to {pre['resize_shorter_side']}, centre {pre['center_crop']}x{pre['center_crop']}; "
              if pre.get("resize_shorter_side") else "")

    def numbers(values: Any) -> str:  # from the file: a value that is not a number is shown as it is
        if not isinstance(values, list):
            return "not measured"
        return "[" + ", ".join(f"{v:.4f}" if isinstance(v, (int, float)) else repr(v) for v in values) + "]"

    return (f"{shape} {pre.get('channel_order')} ({pre.get('dataset')}); {resize}pixels / 255, minus mean "
            f"{numbers(pre.get('mean'))}, divided by std {numbers(pre.get('std'))}")


def _epochs_done(epoch: Any) -> str:
    """A checkpoint's ``epoch`` counts completed epochs; metrics.jsonl numbers epochs from 0 (epoch 6 done = 7)."""
    if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > 0:
        return f"after epoch {epoch - 1} ({epoch} done)"
    return f"epochs done: {epoch}"
