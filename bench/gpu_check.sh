#!/usr/bin/env bash
# The CUDA check is bench/gpu_check.py (its header says what it does); this wrapper keeps `bash bench/gpu_check.sh`.
exec python3 "$(dirname "$0")/gpu_check.py" "$@"
