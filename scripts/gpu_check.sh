#!/usr/bin/env bash
# The prepared device check: on one CUDA GPU, about 5 minutes; writes OUT/gpu_check.parquet and
# OUT/gpu_check.md (the table for docs/GPU.md). `--dry` runs the same checks on the CPU at toy
# sizes (make test does, so the script cannot rot).
#   scripts/gpu_check.sh [--dry] [OUT]        (OUT default: out/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=()
if [[ "${1:-}" == "--dry" ]]; then DRY=(--dry); shift; fi
OUT="${1:-out/gpu_check}"
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
exec "$PY" scripts/gpu_check.py --out "$OUT" "${DRY[@]}"
