#!/usr/bin/env bash
# Fresh machine -> .venv with the dependencies and sam_kernels built (C++ CPU kernels; the CUDA
# kernels too when torch has CUDA and nvcc is found). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q --disable-pip-version-check -r requirements-dev.txt
MAX_JOBS="${MAX_JOBS:-2}" pip install -q --disable-pip-version-check --no-build-isolation -e .
python - <<'PY'
import torch, sam_kernels.ops as ops
print(f"sam_kernels installed: torch {torch.__version__}; backends: {ops.backend_status()}")
PY
