#!/usr/bin/env bash
# The package on a second stack, as a user's cluster would have it: a fresh venv of another Python with
# the torch pinned in constraints/second_stack.txt (the newest the registry served), the package installed
# from this checkout with its test extra only (no diffusers, DeepSpeed or Ray), the core test subset, and
# the device check's dry mode taking diffusers from carried wheels (.whl/), beside the transformers and
# accelerate that the GPU image has (docs/GPU.md), as on that image.
#   scripts/second_stack.sh [PYTHON] [VENV] [TORCH]   (defaults: python3.12, .venv-py312, the pinned torch;
#                                                     TORCH=2.11.0 checks the floor of the range)
# This machine's pip configuration caps torch below that release; the venv's installs ignore it
# (PIP_CONFIG_FILE=/dev/null). About 5.5 GB of downloads (torch with its CUDA libraries) on a fresh cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN="${1:-python3.12}"
VENV="${2:-.venv-py312}"
CORE=(tests/test_config.py tests/test_extras.py tests/test_schedules.py tests/test_policies.py
      tests/test_predictors.py tests/test_mesh.py tests/test_engine.py tests/test_ulysses.py
      tests/test_weights_per_node.py tests/test_magi1.py tests/test_gpu_check.py)
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
[[ -x "$VENV/bin/python" ]] || "$PYBIN" -m venv "$VENV"
PY="$VENV/bin/python"
PINS=constraints/second_stack.txt
if [[ -n "${3:-}" ]]; then PINS="$(mktemp)"; echo "torch==$3" > "$PINS"; fi
"$PY" -m pip install -q -c "$PINS" torch
"$PY" -m pip install -q -c "$PINS" '.[test]'
"$PY" -m pip install -q -c "$PINS" transformers accelerate requests   # what the GPU image brings; diffusers stays absent
"$PY" - <<'PYEOF'
import importlib.util, sys, torch
present = [m for m in ("diffusers", "deepspeed", "ray") if importlib.util.find_spec(m)]
print(f"second stack: Python {sys.version.split()[0]}, torch {torch.__version__}; absent: diffusers, deepspeed, ray"
      if not present else f"second stack: unexpectedly present: {present}")
sys.exit(1 if present else 0)
PYEOF
PYV="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
bash scripts/gpu_wheels.sh "$PYV" >/dev/null
"$PY" -m pytest -p no:cacheprovider "${CORE[@]}"   # pyproject adds -q: one summary line
PYTHON="$PY" bash scripts/gpu_check.sh --dry "${OUT:-out/gpu_check_second_stack}"
