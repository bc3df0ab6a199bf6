#!/usr/bin/env bash
# Fresh machine -> .venv with the dependencies and sam_kernels built ahead of time (C++ CPU
# kernels; the CUDA kernels too when torch has CUDA and nvcc is found). Idempotent.
# Prints one line per phase with the elapsed time, and a heartbeat every 30 s during a long one;
# each phase's full output goes to .venv/setup-logs/ (shown when the phase fails).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
say() { echo "[setup $(( $(date +%s) - start ))s] $*"; }
# run_phase NAME "what" cmd...: runs cmd with its output in .venv/setup-logs/NAME.log;
# heartbeat while it runs.
run_phase() {
  local name="$1" log=".venv/setup-logs/$1.log" what="$2"; shift 2
  local t0=$(date +%s)
  say "$what ..."
  "$@" > "$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      say "  ... $name: $(( $(date +%s) - t0 ))s so far (load $(cut -d' ' -f1-3 /proc/loadavg); log $log)"
    fi
  done
  if ! wait "$pid"; then
    tail -n 40 "$log"
    say "FAILED: $what (last 40 lines above; full log $log)"
    exit 1
  fi
  say "done: $what in $(( $(date +%s) - t0 ))s"
}

say "load average $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
mkdir -p .venv/setup-logs
. .venv/bin/activate
run_phase deps "installing requirements-dev.txt (torch 2.13.0 CPU, triton, test and bench tools; ~1-3 min when new)" \
  pip install --disable-pip-version-check --progress-bar off -r requirements-dev.txt
run_phase build "compiling the kernels ahead of time and installing sam_kernels (editable; ~1-3 min on 2 cores, seconds when unchanged)" \
  env MAX_JOBS="${MAX_JOBS:-2}" pip install -v --disable-pip-version-check --no-build-isolation -e .
grep -hE "^\s*sam_kernels: " .venv/setup-logs/build.log | sed 's/^ */  /' | awk '!seen[$0]++' || true
python - <<'PY'
import torch, sam_kernels.ops as ops
print(f"sam_kernels installed: torch {torch.__version__}; backends:")
for name, status in ops.backend_status().items():
    print(f"  {name:<10} {status}")
PY
say "setup done (load average now $(cut -d' ' -f1-3 /proc/loadavg))"
