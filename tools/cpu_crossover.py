"""Where a second thread starts to pay in the CPU kernels: times SAM's fused ops (sum_sq,
perturb_ with a backup, restore_) on 128 equal fp32 tensors of a growing total size, single-
threaded vs on all intra-op threads, interleaved rep by rep, quiet and with busy processes
(bench/contention.py). The result sets kParallelMinBytes in csrc/cpu/multi_tensor_cpu.h.

    python tools/cpu_crossover.py [--busy 2] [--reps 200]
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.contention import Contention  # noqa: E402
from sam_kernels import ops  # noqa: E402

if "cpu" not in ops.available_backends("cpu"):  # (also loads the extension)
    sys.exit("the cpu backend is not built")
knob = torch.ops.sam_kernels._cpu_parallel_min_bytes
NEVER = 1 << 62


def sam_ops(params, grads, backup):
    s = ops.sum_sq(grads, backend="cpu")
    ops.perturb_(params, grads, s, 0.05, 1e-12, backup=backup, backend="cpu")
    ops.restore_(params, backup, backend="cpu")


def measure(total_bytes, reps):
    n = max(1, total_bytes // 4 // 128)
    params = [torch.randn(n) for _ in range(128)]
    grads = [torch.randn(n) for _ in range(128)]
    backup = [torch.empty(n) for _ in range(128)]
    # "1": single-threaded; "N": every call on all threads (no back-off); "N+b": all threads
    # with the stall back-off (threshold 1 byte), what the kernels do above the threshold.
    times = {"1": [], "N": [], "N+b": []}
    order = list(times)
    for r in range(reps):
        for key in order[r % 3:] + order[:r % 3]:
            knob({"1": NEVER, "N": 0, "N+b": 1}[key])
            t = time.perf_counter()
            sam_ops(params, grads, backup)
            times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def sweep(reps, label):
    print(f"{label}: load {os.getloadavg()}, {torch.get_num_threads()} threads")
    print(f"{'KiB/list':>9} {'1 thread us':>12} {'N threads us':>13} {'1/N':>6} "
          f"{'N+backoff us':>13} {'1/(N+b)':>8}")
    for kib in (256, 512, 1024, 2048, 4096, 8192, 32768):
        t = measure(kib * 1024, max(20, reps * 64 // max(kib, 64)))
        print(f"{kib:>9} {t['1'] * 1e6:>12.1f} {t['N'] * 1e6:>13.1f} {t['1'] / t['N']:>6.2f} "
              f"{t['N+b'] * 1e6:>13.1f} {t['1'] / t['N+b']:>8.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--busy", type=int, default=2)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    old = knob(-1)
    try:
        sweep(args.reps, "quiet")
        with Contention(args.busy):
            sweep(args.reps, f"{args.busy} busy processes")
    finally:
        knob(old)


if __name__ == "__main__":
    main()
