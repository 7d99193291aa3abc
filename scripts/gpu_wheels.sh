#!/usr/bin/env bash
# Run HERE, on a machine with a registry: download the wheels the device check needs beyond the GPU
# image's own packages (scripts/gpu_wheels.txt) into .whl/ (ignored by git), for the image's Python
# (default 3.12) on x86_64 Linux. Carry .whl/ with the checkout; scripts/gpu_check.sh unpacks them there.
#   scripts/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
PY="${PYTHON:-python3}"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl -r scripts/gpu_wheels.txt
ls -1 .whl
du -sh .whl
