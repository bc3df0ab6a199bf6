#!/usr/bin/env bash
# CI job: the Triton-interpreter tests under the oldest supported Triton (3.6, what the GPU image
# carries), so the kernels keep working across the supported range; the main suite runs on the
# newest (.venv). No GPU needed: TRITON_INTERPRET=1 runs the kernels on CPU tensors.
#
# Runs tests/test_triton.py and the triton cases of tests/test_ops.py from the checkout
# (PYTHONPATH; the compiled CPU backend is used when the checkout has one built for this torch).
# Environment:
#   SAM_KERNELS_TRITON36_VENV  venv to use (default: <repo>/.venv-triton36; created if missing)
# About 1-2 minutes to create the venv (torch CPU wheel + the 190 MB Triton wheel) and 1-2
# minutes of tests on 2 cores.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${SAM_KERNELS_TRITON36_VENV:-$repo/.venv-triton36}"
triton_version="3.6.0"
torch_version="2.13.0"
start=$(date +%s)
log() { echo "[triton-compat $(( $(date +%s) - start ))s] $*"; }

if ! "$venv/bin/python" -c "import sys, torch, triton; sys.exit(triton.__version__ != '$triton_version' or torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  log "creating $venv with torch==$torch_version (CPU) and triton==$triton_version"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$torch_version" \
    "triton==$triton_version" numpy pytest
fi
"$venv/bin/python" -c "import torch, triton; print(f'  torch {torch.__version__}, triton {triton.__version__}')"

cd "$repo"
log "running the Triton-interpreter tests"
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_ops.py \
  -k triton "$@"
log "PASS"
