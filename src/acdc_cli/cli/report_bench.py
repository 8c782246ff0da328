"""``acdc report`` and ``acdc bench``: pictures and tables of runs, and speed measurements."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from acdc_cli.cli.common import (
    ConfigOpt,
    JsonOpt,
    PresetOpt,
    SetOpt,
    err_console,
    out_console,
    print_json,
    user_errors,
)
from acdc_cli.errors import AcdcError
from acdc_cli.schemas import BENCH_SCHEMA, REPORT_SCHEMA


@user_errors
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run dirs (`acdc train --out DIR`), finished or not.")],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Folder for report.html and the PNGs (default: RUN_DIR/report for one run, "
                                         "./acdc-report for several); files of an earlier report there are replaced."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pictures of runs, and a comparison of several: a self-contained report.html (images inline, nothing loaded
    from elsewhere) and the PNGs beside it.

    Per run: top-1 and train loss per epoch with the compressed phases shaded, sparsity and LR per epoch, the
    per-layer sparsity of best_sparse, the mask change of each compressed phase. With several runs (a sparsity
    sweep): their curves together and a sparsity-vs-top-1 table and plot with each run's best sparse and best dense
    top-1, and the paper's number where the preset has one. --json prints the table.
    """
    from acdc_cli.commands.report import SUMMARY_HEADER, summary_rows, write_report

    result = write_report(run_dirs, out)
    if result.warning:
        err_console(markup=False).print(f"warning: {result.warning}", highlight=False)
    if as_json:
        print_json(result.as_dict(), REPORT_SCHEMA)
        return
    from rich import box

    table = Table(title="acdc report", box=box.SIMPLE_HEAD)
    for col in SUMMARY_HEADER:
        # on a narrow terminal cells wrap, and a long word folds, rather than being cut to "quic…"
        table.add_column(col, justify="right" if "top-1" in col or col in ("target sparsity", "epochs done")
                         else "left", overflow="fold")
    for row in summary_rows(result.runs):
        table.add_row(*row)
    console = out_console(markup=False)  # run names and paths are text, never rich markup
    console.print(table)
    figures = len(result.figures)
    console.print(f"wrote {result.path} and {figures} PNG{'s' if figures != 1 else ''} beside it", highlight=False)


@user_errors
def bench(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    steps: Annotated[
        Optional[int], typer.Option("--steps", help="Timed training steps per mode (default 50); with --inference, "
                                                    "timed passes per model and batch size (default 20).")
    ] = None,
    warmup: Annotated[
        Optional[int], typer.Option("--warmup", help="Untimed steps first (absorbs torch.compile and cudnn autotuning; "
                                                     "default 10, with --inference 3).")
    ] = None,
    rounds: Annotated[
        Optional[int], typer.Option("--rounds", help="Alternating rounds of the step modes, each timing --steps steps "
                                                     "per mode (default 5; min and median reported).")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", "-b", help="Batch size (default: the preset's data.batch_size; "
                                                               "with --inference: 1 and this, default 64).")
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N (runtime.device).")] = None,
    inference: Annotated[
        Optional[Path],
        typer.Option("--inference", help="Instead: dense vs sparse inference throughput of this checkpoint or export "
                                         "(.safetensors or .onnx), at batch 1 and 64."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure a preset's training speed on this device, in one run, on synthetic data.

    Times the reference's step as the AC/DC reference code trains (fp32, NCHW, eager; weights re-masked before every
    forward, gradient-mask hooks, per-tensor SGD, weights re-masked after the step, two host syncs per step) against
    acdc's own step (bf16 autocast, channels_last and torch.compile as the settings say) and acdc's step at fp32/eager,
    in alternating rounds, with the ratio split into step path and precision/layout/compile; plus a training epoch
    through the preset's loader, the global mask update and the input pipeline alone. Without --preset it measures
    the quickstart, in seconds on any machine. Use --set runtime.compile=true to time the compiled step.

    With --inference FILE: images/s of the file's model with dense weights against its sparse weights, side by side
    (median of --steps timed passes): on CUDA with PyTorch's 2:4 sparse kernels for 2:4 Linear layers, on ONNX
    Runtime (CPU) for .onnx files; each layer says whether it ran a sparse kernel.
    """
    status_console = err_console() if as_json else out_console()
    if inference is not None:
        if preset or config or set_:
            raise AcdcError("--inference times the file's own model: drop --preset/--config/--set")
        from acdc_cli.commands.bench_inference import BATCH_SIZES, run_inference_bench
        from acdc_cli.commands.bench_inference import render as render_inference

        sizes = BATCH_SIZES if batch_size is None else tuple(dict.fromkeys((1, batch_size)))  # batch 1 once
        with status_console.status("acdc bench --inference") as status:
            result = run_inference_bench(inference, device, 20 if steps is None else steps,
                                         3 if warmup is None else warmup, sizes,
                                         status=lambda message: status.update(f"acdc bench --inference: {message}"))
        if as_json:
            print_json(result)
        else:
            render_inference(result, out_console())
        return
    from acdc_cli.commands.bench import STEP_ROUNDS, render, run_bench
    from acdc_cli.config import load_settings

    settings = load_settings(preset, config, set_, {"runtime.device": device})
    with status_console.status("acdc bench") as status:
        result = run_bench(settings, steps=50 if steps is None else steps, warmup=10 if warmup is None else warmup,
                           rounds=STEP_ROUNDS if rounds is None else rounds, batch_size=batch_size,
                           status=lambda message: status.update(f"acdc bench: {message}"))
    if as_json:
        print_json(result, BENCH_SCHEMA)
    else:
        render(result, out_console())
