"""Microbenchmark of the optimizer's per-step work on parameter-shape suites, and the check that
every implementation computes the same thing (so the timings compare like with like)."""
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import harness, suites
from .algos import Algo, BaseSpec, Impl, implementations

TINY_SHAPES = suites.SUITES["tiny"]()


# --- equivalence -------------------------------------------------------------------------
def _quadratic_closure(params: Sequence[torch.Tensor], seed: int = 7):
    """A loss whose gradient depends on the weights (so the perturbation matters):
    L = Σ ½·a·w² + b·w, ∇L = a·w + b, with fixed random a > 0 and b."""
    gen = torch.Generator().manual_seed(seed)
    a = [(torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5).to(p) for p in params]
    b = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in params]

    def closure():
        loss = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
        with torch.no_grad():
            for p, ai, bi in zip(params, a, b):
                w = p.detach()
                p.grad = ai * w + bi  # a fresh tensor, as backward after zero_grad(None)
                loss += (0.5 * ai * w * w + bi * w).sum()
        return loss
    return closure


def verify(algo: Algo, impls: List[Impl], device: torch.device, steps: int = 4
           ) -> Dict[str, Any]:
    """Runs every implementation `steps` steps on the same fp64 problem from the same weights
    and returns each one's largest weight difference from the seed loop (relative to the
    largest weight change), plus whether all are within `tol`."""
    base = BaseSpec(torch.optim.SGD, (("lr", 0.1), ("momentum", 0.9)))
    init = harness.make_params(TINY_SHAPES, device, torch.float64, seed=3)
    results: Dict[str, torch.Tensor] = {}
    errors: Dict[str, str] = {}
    for impl in impls:
        params = [torch.nn.Parameter(p.detach().clone()) for p in init]
        try:
            opt = impl.build(params, base)
            closure = _quadratic_closure(params)
            for _ in range(steps):
                impl.run(opt, closure)
        except Exception as exc:  # report, do not hide: an API mismatch shows in the output
            errors[impl.label] = f"{type(exc).__name__}: {exc}"
            continue
        results[impl.label] = torch.cat([p.detach().flatten() for p in params])
    start = torch.cat([p.detach().flatten() for p in init])
    reference_label = next(iter(results), None)
    out: Dict[str, Any] = {"reference": reference_label, "steps": steps, "rel_diff": {},
                           "errors": errors}
    if reference_label is None:
        out["ok"] = False
        return out
    ref = results[reference_label]
    moved = (ref - start).abs().max().item()
    out["weight_change"] = moved
    for label, w in results.items():
        out["rel_diff"][label] = (w - ref).abs().max().item() / moved if moved else math.inf
    out["tol"] = 1e-6
    out["ok"] = moved > 0 and not errors and all(d <= out["tol"]
                                                 for d in out["rel_diff"].values())
    return out


# --- timing ------------------------------------------------------------------------------
class _ResettableGrads(harness.GradSource):
    """GradSource that can be reset to pristine values between rounds (some implementations
    modify gradients in place; without a reset the values would drift over many steps)."""

    def __init__(self, params, sets: int = 2, seed: int = 1) -> None:
        super().__init__(params, sets, seed)
        self.pristine = [[g.clone() for g in s] for s in self.sets]

    def reset(self) -> None:
        for s, clean in zip(self.sets, self.pristine):
            torch._foreach_copy_(s, clean)


@dataclass
class _Runner:
    """One implementation, built on its own parameters, ready to step."""
    impl: Impl
    params: List[torch.nn.Parameter]
    probe: harness.Probe
    step: Callable[[], Any]
    times: harness.StepTimes = field(default_factory=harness.StepTimes)


def _build_runner(impl: Impl, shapes, grads: _ResettableGrads, device: torch.device,
                  dtype: torch.dtype, base: BaseSpec) -> _Runner:
    params = harness.make_params(shapes, device, dtype, seed=0)
    opt = impl.build(params, base)
    probe = harness.Probe(device)
    opt.base_optimizer.step = probe.wrap("base", opt.base_optimizer.step)
    closure = probe.wrap("closure", grads.closure_for(params))
    return _Runner(impl, params, probe, lambda: impl.run(opt, closure))


def measure_algo(algo: Algo, impls: List[Impl], shapes, grads: _ResettableGrads,
                 device: torch.device, dtype: torch.dtype, reps: int, warmup: int,
                 budget_s: float, log=print) -> Tuple[List[Dict[str, Any]], List[str], float]:
    """Times every implementation of `algo` in interleaved rounds — each round runs one step
    of each implementation (in a rotating order) and one same-sized `copy_` — so load changes
    on a shared machine hit all of them alike. Returns the rows, failure notes, and the median
    copy time of these rounds (the byte floor's yardstick)."""
    base = BaseSpec()
    runners: List[_Runner] = []
    notes: List[str] = []
    slowest = 0.0
    for impl in impls:
        log(f"    {algo.name:6s} {impl.label}: build + warm-up")
        try:
            runner = _build_runner(impl, shapes, grads, device, dtype, base)
            sizing = harness.time_steps(runner.step, runner.probe, reps=1, warmup=warmup)
        except Exception as exc:  # reported in the notes, the other rows still run
            notes.append(f"{impl.label} failed: {type(exc).__name__}: {exc}")
            log(f"      failed: {type(exc).__name__}: {exc}")
            continue
        slowest = max(slowest, sizing.whole[0])
        runners.append(runner)
    reps = max(3, min(reps, int(budget_s / max(slowest, 1e-9))))
    numel = suites.total_params(shapes)
    copy = harness.CopyTimer(numel, dtype, device)
    copy_times = []
    for r in range(reps):
        grads.reset()
        k = r % len(runners) if runners else 0  # rotate who goes first
        for runner in runners[k:] + runners[:k]:
            t = harness.time_steps(runner.step, runner.probe, reps=1, warmup=0)
            for key in ("extra", "whole", "base"):
                getattr(runner.times, key).extend(getattr(t, key))
        copy_times.append(copy.time_once())
    rows = []
    for runner in runners:
        counter = harness.count_dispatch(runner.step, runner.probe)
        t = runner.times
        rows.append({"impl": runner.impl.label, "kind": runner.impl.kind,
                     "backend": runner.impl.backend, "reps": reps,
                     "extra_s": harness.summary(t.extra), "whole_s": harness.summary(t.whole),
                     "base_s": harness.summary(t.base), "ops_per_step": counter.kernels,
                     "host_reads_per_step": counter.host_reads,
                     "finite": bool(all(torch.isfinite(p).all() for p in runner.params))})
    del runners
    gc.collect()
    return rows, notes, statistics.median(copy_times)


def measure_suite(name: str, algos: Sequence[Algo], device: torch.device, dtype: torch.dtype,
                  reps: int, warmup: int, budget_s: float, shapes=None,
                  log=print, select: Optional[Callable[[Impl], bool]] = None) -> Dict[str, Any]:
    """Times every implementation of each of `algos` (those `select` keeps) on a suite."""
    started = time.perf_counter()
    shapes = shapes if shapes is not None else suites.SUITES[name]()
    numel = suites.total_params(shapes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    grads = _ResettableGrads(harness.make_params(shapes, device, dtype, seed=0))
    out: Dict[str, Any] = {"suite": name, "tensors": len(shapes), "params": numel,
                           "dtype": str(dtype).replace("torch.", ""),
                           "load_before": harness.load_average(), "rows": [], "notes": {},
                           "copy_s": {}}
    log(f"  suite {name}")
    for algo in algos:
        impls, notes = implementations(algo, device)
        impls = [i for i in impls if select is None or select(i)]
        rows, failures, copy_s = measure_algo(algo, impls, shapes, grads, device, dtype, reps,
                                              warmup, budget_s, log)
        if notes or failures:
            out["notes"][algo.name] = notes + failures
        out["copy_s"][algo.name] = copy_s
        bandwidth = 2 * numel * itemsize / copy_s
        bytes_moved = algo.traffic_units * numel * itemsize
        floor_s = bytes_moved / bandwidth
        seed_row = next((r for r in rows if r["kind"] == "seed"), None)
        for row in rows:
            row.update(algo=algo.name, bytes=bytes_moved, floor_s=floor_s,
                       copy_bandwidth_GBps=bandwidth / 1e9,
                       floor_ratio=row["extra_s"]["median"] / floor_s)
            if seed_row is not None:
                row["speedup_extra"] = seed_row["extra_s"]["median"] / row["extra_s"]["median"]
                row["speedup_whole"] = seed_row["whole_s"]["median"] / row["whole_s"]["median"]
            out["rows"].append(row)
    del grads
    gc.collect()
    out["copy_bandwidth_GBps"] = statistics.median(
        2 * numel * itemsize / c / 1e9 for c in out["copy_s"].values()) if out["copy_s"] else 0
    out["load_after"] = harness.load_average()
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out
