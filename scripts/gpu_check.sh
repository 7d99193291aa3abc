#!/usr/bin/env bash
# The prepared device check: on one CUDA GPU, within 8 minutes; writes OUT/gpu_check.parquet,
# OUT/gpu_check.md (the table for docs/GPU.md) and OUT/plan_<selective>.yaml. `--dry` runs the same
# entry point on the CPU at toy sizes (make test does, so the script cannot rot).
#   scripts/gpu_check.sh [--dry] [OUT]        (OUT default: $OUT, else out/gpu_check)
# Runs from a bare checkout on an image with its own Python and torch: the project on PYTHONPATH (no
# install), missing packages from wheels carried in .whl/ (scripts/gpu_wheels.sh, docs/GPU.md), and a
# self-test of all that (scripts/gpu_prereqs.py) that prints what is missing in one line (exit 3)
# before anything is measured. PYTHON picks the interpreter (default .venv/bin/python, else python3).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY=()
if [[ "${1:-}" == "--dry" ]]; then DRY=(--dry); shift; fi
DEST="${1:-${OUT:-out/gpu_check}}"
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
SITE="$(mktemp -d "${TMPDIR:-/tmp}/scopevid-gpu-site.XXXXXX")"
trap 'rm -rf "$SITE"' EXIT
"$PY" scripts/gpu_prereqs.py --wheels "${GPU_CHECK_WHEELS:-$ROOT/.whl}" --site "$SITE" "${DRY[@]}"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# 8 minutes in all: the checks stop starting new work at 430 s; the hard stop leaves the table written so far
timeout -k 10 470 "$PY" scripts/gpu_check.py --out "$DEST" --budget-s 430 "${DRY[@]}"
