#!/usr/bin/env bash
# GPU verification kit: one command on a machine with one NVIDIA GPU and its own Python, torch
# and Triton (nothing is downloaded). It builds the extension for this GPU's architecture only,
# runs `python -m sam_kernels.check`, the GPU tests (the op contract on the cuda/triton backends,
# tests/test_cuda.py, tests/test_triton.py), a short GPU benchmark, and reports the gap checks of
# issue 15 by name. Everything goes into OUT_DIR: gpu_check.log (all output), gpu_check.json
# (per step: budget, elapsed, status; per gap check: outcome), check.json, pytest.xml,
# pytest_ops.xml, build.log, bench.json, compile_anchor.json.
#
#   bash tools/gpu_check.sh OUT_DIR            # the real run (<= 8 minutes on an H100/H200)
#   bash tools/gpu_check.sh --dry-run [OUT_DIR] # here, without a GPU: checks that every step's
#                                               # command, file and test exists; prints the plan
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda when it has nvcc),
#   MAX_JOBS (default: the core count).
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:-}"
if [ -z "$out" ]; then
  if [ "$dry" = 1 ]; then out="$(mktemp -d)"; else
    echo "usage: bash tools/gpu_check.sh [--dry-run] OUT_DIR" >&2; exit 2; fi
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
log="$out/gpu_check.log"
: > "$log"
py="${PYTHON:-python3}"
start=$(date +%s)
total_budget=480
steps_file="$out/steps.tsv"
: > "$steps_file"
say() { echo "[gpu_check $(( $(date +%s) - start ))s] $*" | tee -a "$log"; }

# The gap checks of issue 15 (test file::name), reported one by one in gpu_check.json.
gap_tests=(
  "tests/test_cuda.py::test_lists_longer_than_one_launch"
  "tests/test_cuda.py::test_one_launch_covers_more_blocks_than_the_gpu_keeps_resident"
  "tests/test_cuda.py::test_misaligned_views_take_the_scalar_path"
  "tests/test_cuda.py::test_int64_indexing_past_2_31_elements"
  "tests/test_triton.py::test_no_host_synchronization_on_the_gpu"
  "tests/test_triton.py::test_triton_graph_survives_clear_cache"
  "tests/test_triton.py::test_triton_reductions_over_more_than_2_31_elements"
  "tests/test_triton.py::test_a_misaligned_view_costs_only_its_own_group_the_vector_path"
  "tests/test_triton.py::test_self_check_passes_for_the_cpu_backend"
  "tests/test_triton.py::test_self_check_fails_for_a_broken_backend"
)
test_files=(tests/test_cuda.py tests/test_triton.py tests/test_ops.py)
# -k for tests/test_ops.py: its cases on the GPU backends only (CPU ones run in CI)
ops_filter="cuda"

# Steps: name, budget in seconds, command. Budgets add up to <= 480 s (8 minutes). The gap
# checks run first (gpu_tests); the op contract on the GPU backends after them; the
# torch.compile anchor last (its own step, so a slow compile costs only its own row).
step_names=(environment build self_check gpu_tests ops_contract bench compile_anchor)
step_budgets=(30 130 40 130 40 50 60)
step_cmds=(
  "step_environment"
  "step_build"
  "$py -m sam_kernels.check --quick --json $out/check.json"
  "$py -m pytest -q -p no:cacheprovider -rs --junitxml=$out/pytest.xml tests/test_cuda.py tests/test_triton.py"
  "$py -m pytest -q -p no:cacheprovider -rs --junitxml=$out/pytest_ops.xml tests/test_ops.py -k $ops_filter"
  "$py bench/run.py --device cuda --suite resnet50 small2000 --algos sam gsam --reps 10 --budget 0.3 --no-e2e --no-plot --out $out/bench.json"
  "$py -m bench.compile_anchor --device cuda --suite resnet50 --algo sam --reps 10 --budget 0.3 --compile-budget 40 --out $out/compile_anchor.json"
)

missing_package_help() {
  cat <<EOF | tee -a "$log"
Missing Python package: $1. Nothing can be downloaded on this machine; carry a wheel:
  on a machine with internet access, for this Python ($($py -c 'import sys; print("cp%d%d" % sys.version_info[:2])' 2>/dev/null || echo '?')) and platform:
    pip download $1 --no-deps --only-binary=:all: --python-version $($py -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo 3.12) --platform manylinux2014_x86_64 -d wheels/
  put wheels/ in the repository (it travels with the working tree), then here:
    $py -m pip install --no-index --no-deps wheels/*.whl
EOF
}

step_environment() {
  "$py" - <<'PY' || return 1
import importlib.util, os, platform, sys
need = ["torch", "triton", "pytest", "numpy", "setuptools"]
optional = ["ninja", "pytorch_optimizer"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
for m in optional:
    if importlib.util.find_spec(m) is None:
        print(f"optional package {m} is not installed "
              f"({'slower serial build' if m == 'ninja' else 'its benchmark rows are left out'})")
if missing:
    print("MISSING " + " ".join(missing))
    sys.exit(1)
import torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
      f" triton {triton.__version__}, cores {os.cpu_count()}")
if not torch.cuda.is_available():
    print("torch sees no CUDA device"); sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
      f"{p.multi_processor_count} SMs")
PY
}

step_build() {
  local arch
  arch="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')" || return 1
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  say "build: TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)} CUDA_HOME=${CUDA_HOME:-?}"
  rm -f sam_kernels/_C*.so
  if ! TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" FORCE_CUDA=1 \
      "$py" setup.py -q build_ext --inplace > "$out/build.log" 2>&1; then
    tail -n 40 "$out/build.log" | tee -a "$log"
    say "build failed (full log: build.log)"
    return 1
  fi
  "$py" - <<'PY' || return 1
import sys
from sam_kernels.ops import _registry
for backend in ("cuda", "triton"):
    reason = _registry.unavailable_reason(backend, "cuda")
    print(f"backend {backend} on cuda: {'available' if reason is None else reason}")
    if reason is not None:
        sys.exit(1)
PY
}

run_step() {  # name budget command
  local name="$1" budget="$2" cmd="$3" t0 rc elapsed left
  left=$(( total_budget - ($(date +%s) - start) ))
  if [ "$left" -le 10 ]; then
    say "SKIP $name: the 8-minute budget is spent"
    printf '%s\t%s\t0\tskipped\n' "$name" "$budget" >> "$steps_file"
    return 0
  fi
  [ "$budget" -gt "$left" ] && budget="$left"
  say "step $name (budget ${budget}s): $cmd"
  t0=$(date +%s)
  if [ "${cmd#step_}" != "$cmd" ]; then
    ( export -f say missing_package_help step_environment step_build; export py out log start
      timeout "$budget" bash -c "$cmd" ) 2>&1 | tee -a "$log"
  else
    timeout "$budget" bash -c "export PYTHONPATH='$repo'\${PYTHONPATH:+:\$PYTHONPATH}; $cmd" 2>&1 \
      | tee -a "$log"
  fi
  rc=${PIPESTATUS[0]}
  elapsed=$(( $(date +%s) - t0 ))
  local status=passed
  if [ "$rc" = 124 ]; then status="timed out"; elif [ "$rc" != 0 ]; then status="failed (rc $rc)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$budget" "$elapsed" "$status" >> "$steps_file"
  say "step $name: $status in ${elapsed}s (budget ${budget}s)"
  return "$rc"
}

dry_run() {
  local ok=1 total=0 i
  say "dry run: plan (budgets add up to the 8-minute limit of a real run)"
  for i in "${!step_names[@]}"; do
    total=$(( total + step_budgets[i] ))
    printf '  %-12s %4ss  %s\n' "${step_names[$i]}" "${step_budgets[$i]}" "${step_cmds[$i]}" | tee -a "$log"
  done
  say "total budget ${total}s (limit ${total_budget}s)"
  [ "$total" -le "$total_budget" ] || { say "FAIL: budgets exceed ${total_budget}s"; ok=0; }
  command -v "$py" > /dev/null || { say "FAIL: $py not found"; ok=0; }
  command -v timeout > /dev/null || { say "FAIL: timeout (coreutils) not found"; ok=0; }
  for f in setup.py sam_kernels/check.py bench/run.py bench/compile_anchor.py csrc/cuda/ops_cuda.cu \
           csrc/cuda/multi_tensor_apply.cuh "${test_files[@]}"; do
    [ -f "$f" ] || { say "FAIL: missing $f"; ok=0; }
  done
  for flag in --compile-anchor --compile-suites --compile-algos --compile-budget --no-e2e; do
    grep -q -- "\"$flag\"" bench/run.py || { say "FAIL: bench/run.py has no $flag"; ok=0; }
  done
  for flag in --device --suite --algo --reps --budget --compile-budget --out; do
    grep -q -- "\"$flag\"" bench/compile_anchor.py || { say "FAIL: bench/compile_anchor.py has no $flag"; ok=0; }
  done
  for t in "${gap_tests[@]}"; do
    if ! grep -q "^def ${t#*::}(" "${t%%::*}" 2>/dev/null; then say "FAIL: gap check $t not found"; ok=0; fi
  done
  # the Python side of each step parses (argument names included) without a GPU
  if "$py" -c "import torch" 2> /dev/null; then
    PYTHONPATH="$repo" "$py" -m sam_kernels.check --help > /dev/null || { say "FAIL: sam_kernels.check --help"; ok=0; }
    "$py" -m py_compile bench/run.py bench/compile_anchor.py || { say "FAIL: bench/ does not compile"; ok=0; }
    PYTHONPATH="$repo" "$py" -c "import pytest" 2> /dev/null || { say "FAIL: pytest is not importable"; ok=0; }
  else
    say "note: $py has no torch here; skipped the --help checks (PYTHON=... to use another)"
  fi
  [ "$ok" = 1 ] && say "dry run OK: $out" || say "dry run FAILED"
  [ "$ok" = 1 ]
}

write_json() {
  PYTHONPATH="$repo" "$py" - "$out" "$start" "${gap_tests[@]}" <<'PY' | tee -a "$log"
import json, os, sys, time
import xml.etree.ElementTree as ET
out, start, gaps = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
steps = []
for line in open(os.path.join(out, "steps.tsv")):
    name, budget, elapsed, status = line.rstrip("\n").split("\t")
    steps.append({"step": name, "budget_s": int(budget), "elapsed_s": int(elapsed),
                  "status": status})
tests = {}
for xml in ("pytest.xml", "pytest_ops.xml"):
    path = os.path.join(out, xml)
    if not os.path.exists(path):
        continue
    for case in ET.parse(path).getroot().iter("testcase"):
        file = case.get("classname", "").replace(".", "/") + ".py"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped: " + (child.get("message") or "")[:200]
        tests[f"{file}::{case.get('name')}"] = outcome
gap = {}
for g in gaps:
    found = {k: v for k, v in tests.items() if k == g or k.startswith(g + "[")}
    gap[g] = found or "not run"
summary = {"passed": sum(v == "passed" for v in tests.values()),
           "failed": sorted(k for k, v in tests.items() if v == "failed"),
           "skipped": sum(v.startswith("skipped") for v in tests.values())}
try:
    import torch, triton
    machine = {"torch": torch.__version__, "cuda": torch.version.cuda,
               "triton": triton.__version__,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
except Exception as exc:
    machine = {"error": repr(exc)}
result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": int(time.time()) - start,
          "machine": machine, "steps": steps, "tests": summary, "gap_checks": gap}
for name in ("check.json", "bench.json", "compile_anchor.json"):
    path = os.path.join(out, name)
    if os.path.exists(path):
        result[name.split(".")[0]] = {"file": name}
json.dump(result, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print(f"gpu_check.json: steps {[(s['step'], s['status'], s['elapsed_s']) for s in steps]}; "
      f"tests {summary['passed']} passed, {len(summary['failed'])} failed, "
      f"{summary['skipped']} skipped")
PY
}

if [ "$dry" = 1 ]; then dry_run; exit $?; fi

say "GPU check of $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo 'this tree') into $out"
final=0
for i in "${!step_names[@]}"; do
  if ! run_step "${step_names[$i]}" "${step_budgets[$i]}" "${step_cmds[$i]}"; then
    final=1
    case "${step_names[$i]}" in
      environment)
        missing="$(grep -o 'MISSING .*' "$log" | tail -1 | cut -d' ' -f2-)"
        for m in $missing; do missing_package_help "$m"; done
        say "stopping: the environment cannot run the kit"; break ;;
      build) say "stopping: the build failed (fail fast)"; break ;;
    esac
  fi
done
write_json
say "done in $(( $(date +%s) - start ))s; exit status $final"
exit "$final"
