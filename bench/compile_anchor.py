"""The torch.compile anchor: what a PyTorch user tries first — the SAM step written with
`torch._foreach_*` ops and compiled with `torch.compile` (inductor) — timed against sam_kernels
on the same parameter shapes.

Compiling is slow (on 2 CPU cores: about a minute for ResNet-50's 161 tensors, more than 15
minutes for 2000 tensors), so each (suite, algorithm) row runs in a child process with a
compile budget: past it the child is killed and the row says "compile did not finish in N s";
the benchmark never hangs. The child reports the compile time (the first step: tracing,
inductor code generation and its C++/Triton compilation, then the step itself) apart from the
step times, which it measures with bench/micro.py's interleaved rounds against sam_kernels on
the device's default backend, so the ratio comes from one run.

    python bench/run.py --compile-anchor [--compile-budget 300] [--suite resnet50] [--algos sam]
    python -m bench.compile_anchor --suite resnet50 --algo sam --budget 300   # one row

Algorithms it expresses: SAM, ASAM (eta = 0) and GSAM, with the hyper-parameters of
bench/algos.py. The foreach maths is checked (eagerly) against sam_kernels' reference backend
in the child before timing.
"""
import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
EXPRESSED = ("sam", "asam", "gsam")
EPS = 1e-12


# --- the foreach steps (eager functions; compiled once per process below) -------------------
def sam_first(params: List[torch.Tensor], grads: List[torch.Tensor], backups: List[torch.Tensor],
              rho: float, adaptive: bool) -> None:
    """backup <- w; w <- w + rho / (||T g|| + eps) * T^2 g, T = |w| (ASAM, eta = 0) or 1."""
    with torch.no_grad():
        if adaptive:
            scaled = torch._foreach_mul(grads, torch._foreach_abs(params))
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled)))
            step = torch._foreach_mul(torch._foreach_mul(params, params), grads)
        else:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            step = grads
        scale = rho / (norm + EPS)
        torch._foreach_copy_(backups, params)
        torch._foreach_add_(params, torch._foreach_mul(step, scale))


def gsam_first(params, grads, backups, grads_at_w, rho: float) -> None:
    """SAM's first step, keeping a copy of the gradient at w."""
    with torch.no_grad():
        torch._foreach_copy_(grads_at_w, grads)
    sam_first(params, grads, backups, rho, False)


def restore(params, backups) -> None:
    with torch.no_grad():
        torch._foreach_copy_(params, backups)


def gsam_second(params, grads, backups, grads_at_w, alpha: float) -> None:
    """g_p <- g_p - alpha (g - c g_p), c = <g, g_p> / |g_p|^2 (with sam_kernels' eps
    placement), then restore w."""
    with torch.no_grad():
        dot = torch.stack([(a * b).sum() for a, b in zip(grads_at_w, grads)]).sum()
        m_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads_at_w)))
        d_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        cos = dot / (m_norm * d_norm + EPS)
        c = cos * m_norm / (d_norm + EPS)
        torch._foreach_mul_(grads, 1 + alpha * c)
        torch._foreach_add_(grads, grads_at_w, alpha=-alpha)
        torch._foreach_copy_(params, backups)


class ForeachSAM(torch.optim.Optimizer):
    """The anchor as an optimizer with sam_kernels' step(closure) contract: `fns` are the step
    functions, compiled or eager."""

    def __init__(self, params, base_optimizer, algo: str, fns: Dict[str, Callable],
                 **kwargs: Any) -> None:
        from bench.algos import ALGOS
        hyper = dict(ALGOS[algo].ours_kwargs)
        super().__init__(params, dict(kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.algo, self.fns = algo, fns
        self.rho = float(hyper["rho"])
        self.adaptive = bool(hyper.get("adaptive", False))
        self.alpha = float(hyper.get("gsam_alpha", 0.0))
        self.params = [p for g in self.param_groups for p in g["params"]]
        self.backups = [torch.empty_like(p) for p in self.params]
        self.grads_at_w = [torch.empty_like(p) for p in self.params] if algo == "gsam" else []

    def step(self, closure: Callable[[], Any]) -> Any:
        loss = closure()
        grads = [p.grad for p in self.params]
        if self.algo == "gsam":
            self.fns["gsam_first"](self.params, grads, self.backups, self.grads_at_w, self.rho)
        else:
            self.fns["sam_first"](self.params, grads, self.backups, self.rho, self.adaptive)
        closure()
        grads = [p.grad for p in self.params]
        if self.algo == "gsam":
            self.fns["gsam_second"](self.params, grads, self.backups, self.grads_at_w,
                                    self.alpha)
        else:
            self.fns["restore"](self.params, self.backups)
        self.base_optimizer.step()
        return loss


EAGER = {"sam_first": sam_first, "gsam_first": gsam_first, "restore": restore,
         "gsam_second": gsam_second}


def compiled_fns() -> Dict[str, Callable]:
    return {name: torch.compile(fn) for name, fn in EAGER.items()}


def anchor_impl(algo: str, fns: Dict[str, Callable], label: str):
    from bench.algos import Impl, torch_contract
    return Impl(label, "anchor",
                lambda params, base: ForeachSAM(params, base.cls, algo, fns, **dict(base.kwargs)),
                torch_contract)


# --- the child: compile, verify, time ------------------------------------------------------
def child(suite: str, algo_name: str, device: str, dtype: str, reps: int, budget: float) -> None:
    from bench import harness, micro, suites
    from bench.algos import ALGOS, BaseSpec, benchmark_backends

    def emit(**record):
        print("ANCHOR " + json.dumps(record), flush=True)

    dev = torch.device(device)
    dt = getattr(torch, dtype)
    algo = ALGOS[algo_name]
    backend = benchmark_backends(dev)[-1] if dev.type == "cpu" else (
        "cuda" if "cuda" in benchmark_backends(dev) else benchmark_backends(dev)[-1])
    ours = algo.ours_impl(backend)
    # the foreach maths, eagerly, against sam_kernels' reference backend (fp64, 4 steps)
    check = micro.verify(algo, [algo.ours_impl("reference"),
                                anchor_impl(algo_name, EAGER, "foreach (eager)")], dev)
    emit(phase="verified", ok=check["ok"], rel_diff=check["rel_diff"], errors=check["errors"])
    fns = compiled_fns()
    shapes = suites.SUITES[suite]()
    grads = micro._ResettableGrads(harness.make_params(shapes, dev, dt, seed=0))
    runner = micro._build_runner(anchor_impl(algo_name, fns, "torch.compile foreach"), shapes,
                                 grads, dev, dt, BaseSpec())
    t0 = time.perf_counter()
    runner.step()  # compiles (first+second step functions), then runs
    if dev.type == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.step()  # the other gradient set: a recompile here would show
    if dev.type == "cuda":
        torch.cuda.synchronize()
    emit(phase="compiled", compile_s=compile_s, second_step_s=time.perf_counter() - t0)
    del runner
    # No dispatch counts here: under a TorchDispatchMode dynamo would compile the steps again
    # (the main benchmark reports sam_kernels' ops/step).
    harness.count_dispatch = lambda step, probe: SimpleNamespace(kernels=None, host_reads=None)
    rows, notes, copy_s = micro.measure_algo(
        algo, [anchor_impl(algo_name, fns, "torch.compile foreach"), ours], shapes, grads, dev,
        dt, reps, warmup=1, budget_s=budget, log=lambda *a: None)
    emit(phase="done", rows=rows, notes=notes, copy_s=copy_s, backend=backend,
         threads=torch.get_num_threads())


# --- the parent: one child per row, with a compile budget ----------------------------------
def run_row(suite: str, algo: str, device: str, dtype: str = "float32", reps: int = 10,
            budget: float = 1.0, compile_budget: float = 300.0, timing_budget: float = 300.0,
            threads: Optional[int] = None, log=print) -> Dict[str, Any]:
    """One anchor row in a child process. Returns a dict with status 'ok', 'compile timeout'
    (and the budget), 'failed' (and the error), plus the child's measurements."""
    cmd = [sys.executable, "-m", "bench.compile_anchor", "--child", "--suite", suite, "--algo",
           algo, "--device", device, "--dtype", dtype, "--reps", str(reps), "--budget",
           str(budget)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A cold compile, as a user's first run: fresh inductor and Triton caches for the child
    # (inductor's on-disk FX-graph cache would otherwise turn a second run into a cache hit).
    cache = tempfile.mkdtemp(prefix="sam_kernels_anchor_")
    env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
               TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    row: Dict[str, Any] = {"suite": suite, "algo": algo, "device": device,
                           "compile_budget_s": compile_budget, "cold_caches": True}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(ROOT), env=env, start_new_session=True)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    err: List[str] = []

    def pump(stream, sink):
        for line in stream:
            sink(line)
        if stream is proc.stdout:
            lines.put(None)
    threading.Thread(target=pump, args=(proc.stdout, lines.put), daemon=True).start()
    threading.Thread(target=pump, args=(proc.stderr, err.append), daemon=True).start()
    deadline = started + compile_budget
    phase = "compiling"
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.perf_counter()))
        except queue.Empty:
            line = ""
            if time.perf_counter() >= deadline:
                _kill(proc)
                if phase == "compiling":
                    row.update(status="compile timeout",
                               note=f"compile did not finish in {compile_budget:.0f} s")
                else:
                    row.update(status="timing timeout",
                               note=f"compiled, but timing did not finish in "
                                    f"{timing_budget:.0f} s")
                break
            continue
        if line is None:
            break
        if not line.startswith("ANCHOR "):
            continue
        record = json.loads(line[len("ANCHOR "):])
        if record["phase"] == "verified":
            row["verified"] = {k: record[k] for k in ("ok", "rel_diff", "errors")}
        elif record["phase"] == "compiled":
            row.update(compile_s=record["compile_s"], second_step_s=record["second_step_s"])
            phase = "timing"
            deadline = time.perf_counter() + timing_budget
            log(f"    compiled in {record['compile_s']:.1f} s")
        elif record["phase"] == "done":
            row.update({k: record[k] for k in ("rows", "notes", "copy_s", "backend", "threads")})
    proc.wait()
    shutil.rmtree(cache, ignore_errors=True)
    row["seconds"] = round(time.perf_counter() - started, 1)
    if "status" not in row:
        if proc.returncode == 0 and "rows" in row:
            row["status"] = "ok"
            _summarize(row)
        else:
            row.update(status="failed", note="".join(err)[-2000:])
    return row


def _kill(proc: subprocess.Popen) -> None:
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and inductor's compile workers
    except ProcessLookupError:
        pass


def _summarize(row: Dict[str, Any]) -> None:
    by_kind = {r["kind"]: r for r in row["rows"]}
    anchor, ours = by_kind.get("anchor"), by_kind.get("ours")
    if anchor and ours:
        for key in ("extra_s", "whole_s"):
            row[f"anchor_{key}"] = anchor[key]["median"]
            row[f"ours_{key}"] = ours[key]["median"]
            row[f"anchor_over_ours_{key.split('_')[0]}"] = (anchor[key]["median"] /
                                                            ours[key]["median"])


def table(rows: Sequence[Dict[str, Any]]) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1e3:.2f}"
    out = ["torch.compile anchor (foreach step compiled with inductor; child process per row):",
           f"{'suite':<10}{'algo':<6}{'compile s':>10}{'anchor extra ms':>17}"
           f"{'ours extra ms':>15}{'anchor/ours':>13}{'anchor whole':>14}{'ours whole':>12}"
           f"  backend / note"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"{r['suite']:<10}{r['algo']:<6}{'-':>10}{'-':>17}{'-':>15}{'-':>13}"
                       f"{'-':>14}{'-':>12}  {r.get('note', r['status'])[:200]}")
            continue
        verified = "" if r.get("verified", {}).get("ok") else "  (maths check FAILED)"
        out.append(f"{r['suite']:<10}{r['algo']:<6}{r['compile_s']:>10.1f}"
                   f"{ms(r.get('anchor_extra_s')):>17}{ms(r.get('ours_extra_s')):>15}"
                   f"{r.get('anchor_over_ours_extra', float('nan')):>12.2f}x"
                   f"{ms(r.get('anchor_whole_s')):>14}{ms(r.get('ours_whole_s')):>12}"
                   f"  sam_kernels[{r.get('backend')}]{verified}")
    return "\n".join(out)


def run_all(suites: Sequence[str], algos: Sequence[str], device: str, dtype: str, reps: int,
            budget: float, compile_budget: float, threads: Optional[int] = None,
            log=print) -> List[Dict[str, Any]]:
    rows = []
    for suite in suites:
        for algo in algos:
            if algo not in EXPRESSED:
                continue
            log(f"  compile anchor: {suite} {algo} (compile budget {compile_budget:.0f} s)")
            rows.append(run_row(suite, algo, device, dtype, reps, budget, compile_budget,
                                timing_budget=max(300.0, 20 * budget * 3), threads=threads,
                                log=log))
            log("    " + rows[-1]["status"] + (f": {rows[-1].get('note', '')[:300]}"
                                              if rows[-1]["status"] != "ok" else ""))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="resnet50")
    ap.add_argument("--algo", default="sam", choices=EXPRESSED)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=1.0,
                    help="seconds of timed steps per implementation (at least 3 steps)")
    ap.add_argument("--compile-budget", type=float, default=300.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the row as JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.suite, args.algo, args.device, args.dtype, args.reps, args.budget)
        return
    row = run_row(args.suite, args.algo, args.device, args.dtype, args.reps, args.budget,
                  args.compile_budget, threads=args.threads)
    print(table([row]))
    print(json.dumps({k: v for k, v in row.items() if k != "rows"}, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
