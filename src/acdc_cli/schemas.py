"""The ``schema`` name of every ``--json`` output, in one place.

A script checks the schema before reading the rest of the object; the number after the slash changes when a key
changes meaning or goes away, never when a key is added.
"""

TRAIN_SCHEMA = "acdc.train/1"

RESOLVED_SCHEMA = "acdc.resolved/1"  # train --dry-run, presets show

PRESETS_SCHEMA = "acdc.presets/1"

PRUNE_SCHEMA = "acdc.prune/1"

INSPECT_SCHEMA = "acdc.inspect/1"

EVAL_SCHEMA = "acdc.eval/2"  # /2: last_epoch went (epoch - 1)

EXPORT_SCHEMA = "acdc.export/1"  # every format, onnx included

REPORT_SCHEMA = "acdc.report/1"

BENCH_SCHEMA = "acdc.bench/1"

BENCH_INFERENCE_SCHEMA = "acdc.bench.inference/1"
