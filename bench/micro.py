"""Microbenchmark of the optimizer's per-step work on parameter-shape suites, and the check that
every implementation computes the same thing (so the timings compare like with like)."""
import gc
import math
from typing import Any, Dict, List, Optional, Sequence

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
    """GradSource whose sets can be re-pointed at new parameters and reset to pristine values
    (some implementations modify gradients in place)."""

    def __init__(self, params, sets: int = 2, seed: int = 1) -> None:
        super().__init__(params, sets, seed)
        self.pristine = [[g.clone() for g in s] for s in self.sets]

    def rebind(self, params) -> None:
        self.params = list(params)
        for s, clean in zip(self.sets, self.pristine):
            torch._foreach_copy_(s, clean)
        self.calls = 0


def measure_impl(impl: Impl, shapes, grads: _ResettableGrads, device: torch.device,
                 dtype: torch.dtype, base: BaseSpec, reps: int, warmup: int, budget_s: float,
                 count: bool = True) -> Dict[str, Any]:
    params = harness.make_params(shapes, device, dtype, seed=0)
    grads.rebind(params)
    opt = impl.build(params, base)
    probe = harness.Probe(device)
    opt.base_optimizer.step = probe.wrap("base", opt.base_optimizer.step)
    closure = probe.wrap("closure", grads.assign)

    def step():
        impl.run(opt, closure)

    # one timed step decides how many reps fit the budget
    first = harness.time_steps(step, probe, reps=1, warmup=warmup)
    reps = max(3, min(reps, int(budget_s / max(first.whole[0], 1e-9))))
    times = harness.time_steps(step, probe, reps=reps, warmup=0)
    row: Dict[str, Any] = {"impl": impl.label, "kind": impl.kind, "backend": impl.backend,
                           "reps": reps, "extra_s": harness.summary(times.extra),
                           "whole_s": harness.summary(times.whole),
                           "base_s": harness.summary(times.base)}
    if count:
        counter = harness.count_dispatch(step, probe)
        row["ops_per_step"] = counter.kernels
        row["host_reads_per_step"] = counter.host_reads
    row["finite"] = bool(all(torch.isfinite(p).all() for p in params))
    return row


def measure_suite(name: str, algos: Sequence[Algo], device: torch.device, dtype: torch.dtype,
                  reps: int, warmup: int, budget_s: float, shapes=None,
                  log=print) -> Dict[str, Any]:
    shapes = shapes if shapes is not None else suites.SUITES[name]()
    numel = suites.total_params(shapes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    load_before = harness.load_average()
    copy_s = harness.copy_seconds(numel, dtype, device, reps=max(reps, 10))
    bandwidth = 2 * numel * itemsize / copy_s
    base = BaseSpec()
    grads = _ResettableGrads(harness.make_params(shapes, device, dtype, seed=0))
    out: Dict[str, Any] = {"suite": name, "tensors": len(shapes), "params": numel,
                           "dtype": str(dtype).replace("torch.", ""), "copy_s": copy_s,
                           "copy_bandwidth_GBps": bandwidth / 1e9, "load_before": load_before,
                           "rows": [], "notes": {}}
    for algo in algos:
        impls, notes = implementations(algo, device)
        if notes:
            out["notes"][algo.name] = notes
        bytes_moved = algo.traffic_units * numel * itemsize
        floor_s = bytes_moved / bandwidth
        seed_row: Optional[Dict[str, Any]] = None
        for impl in impls:
            log(f"  {name:10s} {algo.name:6s} {impl.label} ...")
            try:
                row = measure_impl(impl, shapes, grads, device, dtype, base, reps, warmup,
                                   budget_s)
                gc.collect()  # free this implementation's state before the next one
            except Exception as exc:
                out["notes"].setdefault(algo.name, []).append(
                    f"{impl.label} failed: {type(exc).__name__}: {exc}")
                log(f"    failed: {type(exc).__name__}: {exc}")
                continue
            row.update(algo=algo.name, bytes=bytes_moved, floor_s=floor_s,
                       floor_ratio=row["extra_s"]["median"] / floor_s)
            if impl.kind == "seed":
                seed_row = row
            if seed_row is not None:
                row["speedup_extra"] = seed_row["extra_s"]["median"] / row["extra_s"]["median"]
                row["speedup_whole"] = seed_row["whole_s"]["median"] / row["whole_s"]["median"]
            out["rows"].append(row)
    del grads
    gc.collect()
    out["load_after"] = harness.load_average()
    return out
