#!/usr/bin/env bash
# CUDA compile job (no GPU needed): build sam_kernels with its CUDA kernels against a CUDA build
# of torch, fail on any compiler warning from our sources (csrc/), then check in Python that the
# extension loads and that every sam_kernels op has a kernel for the CUDA dispatch key.
#
# The build happens in a temporary copy of the checkout and is installed into a temporary
# --target directory, so neither the checkout (its editable CPU build) nor the venv changes.
# Environment:
#   SAM_KERNELS_CUDA_VENV   venv with the CUDA torch (default: <repo>/.venv-cuda; created if missing)
#   TORCH_CUDA_ARCH_LIST    default here "7.5;9.0": the oldest architecture torch 2.14+cu130
#                           supports and Hopper, to keep the job near 5 minutes on 2 cores. A
#                           user build defaults to every architecture torch ships (setup.py).
#   CUDA_HOME               default /usr/local/cuda;   MAX_JOBS   default 2
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${SAM_KERNELS_CUDA_VENV:-$repo/.venv-cuda}"
torch_version="2.14.1"
start=$(date +%s)
log() { echo "[cuda-compile $(( $(date +%s) - start ))s] $*"; }

if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version' or torch.version.cuda is None)" 2>/dev/null; then
  log "creating $venv with torch==$torch_version (CUDA build)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$torch_version" numpy ninja \
    "setuptools>=64" wheel
fi
"$venv/bin/pip" install -q --disable-pip-version-check ninja "setuptools>=64" wheel

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Working-tree copy (tracked and new files alike), without venvs, build outputs and binaries.
tar -C "$repo" --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude='*.so' \
  --exclude='*.egg-info' --exclude=__pycache__ -cf - . | (mkdir "$work/src" && tar -C "$work/src" -xf -)

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-7.5;9.0}"
log "building with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=$CUDA_HOME"
if ! (cd "$work/src" && FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" "$venv/bin/pip" install -v \
        --disable-pip-version-check --no-build-isolation --no-deps --target "$work/site" . \
        > "$work/build.log" 2>&1); then
  tail -n 60 "$work/build.log"
  log "FAIL: the build failed (last 60 lines above)"
  exit 1
fi
grep -E "sam_kernels: (CUDA|TORCH)" "$work/build.log" | sed 's/^ */  /' | sort -u
grep -E "^\s*\[[0-9]+/[0-9]+\] " "$work/build.log" | sed -E 's/^\s*(\[[0-9]+\/[0-9]+\]) (\S+).* -c (-c )?(\S+) .*/  \1 \2 \4/'
log "build done"

# Warnings located in our sources: gcc "csrc/x.cpp:12:3: warning", nvcc "csrc/x.cu(12): warning",
# nvcc's "detected during instantiation ... of csrc/..." notes under a warning in a torch header,
# and ptxas warnings about our kernels (mangled names contain sam_kernels).
warnings="$(grep -E "csrc/[^ :]+(:[0-9]+:[0-9]+: warning|\([0-9]+\): warning)|detected during.*csrc/|ptxas.*warning.*sam_kernels" "$work/build.log" || true)"
if [ -n "$warnings" ]; then
  echo "$warnings"
  log "FAIL: compiler warnings from csrc/ (above)"
  exit 1
fi
log "no compiler warnings from csrc/"

cd "$work"  # not the checkout: import the package just built, not the tree's copy
PYTHONPATH="$work/site" "$venv/bin/python" - <<'PY'
import importlib.util
import inspect
import sys

import torch

import sam_kernels
from sam_kernels import _extension, ops

print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}); sam_kernels from "
      f"{sam_kernels.__file__}")
if not _extension.load():
    sys.exit(f"FAIL: the extension did not load: {_extension.error()}")
print(f"  extension loaded: {importlib.util.find_spec('sam_kernels._C').origin}")

registered = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("sam_kernels::"))
primitives = sorted(name for name in ops.__all__
                    if inspect.isfunction(getattr(ops, name))
                    and getattr(ops, name).__module__ == ops.__name__)
missing_ops = sorted(set(primitives) - set(registered))
print(f"  {'op':<28}{'CPU':>5}{'CUDA':>6}")
failed = []
for op in registered:
    keys = {key: torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_kernels::{op}", key)
            for key in ("CPU", "CUDA")}
    print(f"  {'sam_kernels::' + op:<28}{'yes' if keys['CPU'] else 'NO':>5}"
          f"{'yes' if keys['CUDA'] else 'NO':>6}")
    # private introspection ops of the CPU threading rule (tests only) are CPU-only
    if not all(keys.values()) and not op.startswith("_cpu_"):
        failed.append(op)
if missing_ops:
    sys.exit(f"FAIL: primitives of sam_kernels.ops with no registered op: {missing_ops}")
if not registered or failed:
    sys.exit(f"FAIL: ops without a CPU and a CUDA kernel: {failed or 'no ops registered'}")
print(f"  every op ({len(registered)}) has a CUDA kernel; ops.backend_status(): "
      f"{ops.backend_status()['cuda']!r} on this machine")
PY
log "PASS"
