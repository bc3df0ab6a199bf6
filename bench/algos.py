"""The algorithms the harness measures and, for each, the implementations compared in one run:
the seed's per-tensor loop (bench/baselines.py), pytorch-optimizer where it has the algorithm
and is installed, and sam_kernels on every available backend (`reference` is the `_foreach`
version).

Adding an algorithm is one `Algo(...)` entry in ALGOS: the name of its sam_kernels class and
keyword arguments, a builder for its seed baseline, and the memory traffic of its fused pass
structure (for the byte floor). Each implementation is adapted to one step protocol: `run(opt,
closure)` performs one full optimizer step, where `closure()` stands in for zero_grad +
forward + backward and returns the loss.
"""
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import sam_kernels
from sam_kernels import ops

from . import baselines

Params = List[torch.nn.Parameter]


@dataclass(frozen=True)
class BaseSpec:
    """The base optimizer every implementation wraps (same class and hyper-parameters)."""
    cls: type = torch.optim.SGD
    kwargs: Tuple[Tuple[str, Any], ...] = (("lr", 0.01), ("momentum", 0.9))

    def instance(self, params: Params) -> torch.optim.Optimizer:
        return self.cls(params, **dict(self.kwargs))


# --- step protocols ----------------------------------------------------------------------
def torch_contract(opt, closure):
    """sam_kernels: `step(closure)` runs pass 1 itself (torch closure contract)."""
    return opt.step(closure)


def caller_runs_first_pass(opt, closure):
    """davda54 / VaSSO / pytorch-optimizer SAM: the caller's backward gives the gradient at w,
    then `step(closure)` perturbs, runs the closure at w+e, restores and steps."""
    closure()
    return opt.step(closure)


def tuple_closure(opt, closure):
    """GSAM / GAM seeds (and pytorch-optimizer GSAM): the closure returns (outputs, loss)."""
    return opt.step(lambda: (None, closure()))


@dataclass
class Impl:
    label: str
    kind: str  # 'seed' | 'pytorch-optimizer' | 'ours'
    build: Callable[[Params, BaseSpec], torch.optim.Optimizer]
    run: Callable[[Any, Callable], Any]
    backend: Optional[str] = None


@dataclass
class Algo:
    name: str
    title: str
    ours_class: str
    ours_kwargs: Dict[str, Any]
    seed: Optional[Impl]
    #: fused pass structure: (what, parameter-sized lists read, lists written)
    traffic: Tuple[Tuple[str, int, int], ...]
    grad_evals: int = 2
    pytorch_optimizer: List[Impl] = field(default_factory=list)

    @property
    def traffic_units(self) -> int:
        return sum(r + w for _, r, w in self.traffic)

    def ours_cls(self):
        return getattr(sam_kernels, self.ours_class, None)

    def ours_impl(self, backend: str) -> Impl:
        def build(params, base):
            return self.ours_cls()(params, base.cls, backend=backend, **self.ours_kwargs,
                                   **dict(base.kwargs))
        return Impl(f"sam_kernels[{backend}]", "ours", build, torch_contract, backend)


# --- pytorch-optimizer (what users would pick instead) -----------------------------------
def _pytorch_optimizer():
    try:
        import pytorch_optimizer
    except ImportError:
        return None
    return pytorch_optimizer


def _po_sam(rho: float, adaptive: bool) -> List[Impl]:
    po = _pytorch_optimizer()
    if po is None:
        return []

    def builder(foreach):
        return lambda params, base: po.SAM(params, base.cls, rho=rho, adaptive=adaptive,
                                           foreach=foreach, **dict(base.kwargs))
    return [Impl("pytorch-optimizer", "pytorch-optimizer", builder(None), caller_runs_first_pass),
            Impl("pytorch-optimizer foreach", "pytorch-optimizer", builder(True),
                 caller_runs_first_pass)]


def _po_gsam() -> List[Impl]:
    po = _pytorch_optimizer()
    if po is None:
        return []

    def builder(foreach):
        return lambda params, base: po.GSAM(
            params, base.instance(params), model=torch.nn.Module(),
            rho_scheduler=baselines.ConstantRho(0.05), alpha=0.4, foreach=foreach)
    return [Impl("pytorch-optimizer", "pytorch-optimizer", builder(None), tuple_closure),
            Impl("pytorch-optimizer foreach", "pytorch-optimizer", builder(True), tuple_closure)]


# --- seed baselines ----------------------------------------------------------------------
GAM_HYPER = dict(grad_rho=0.03, grad_norm_rho=0.2, grad_beta_1=0.1, grad_beta_2=0.9,
                 grad_beta_3=0.9, grad_gamma=0.05)


def _seed_gam(params, base):
    args = SimpleNamespace(**GAM_HYPER)
    return baselines.SeedGAM(params, base.instance(params), model=torch.nn.Module(),
                             grad_rho_scheduler=baselines.ConstantRho(args.grad_rho),
                             grad_norm_rho_scheduler=baselines.ConstantRho(args.grad_norm_rho),
                             args=args)


ALGOS: Dict[str, Algo] = {a.name: a for a in [
    Algo("sam", "SAM", "SAM", dict(rho=0.05),
         Impl("seed loop (davda54)", "seed",
              lambda params, base: baselines.DavdaSAM(params, base.cls, rho=0.05,
                                                      **dict(base.kwargs)),
              caller_runs_first_pass),
         traffic=(("sum_sq(g)", 1, 0), ("perturb_: w, g -> w, backup", 2, 2),
                  ("restore_: backup -> w", 1, 1)),
         pytorch_optimizer=_po_sam(0.05, adaptive=False)),
    Algo("asam", "ASAM (eta=0)", "SAM", dict(rho=0.5, adaptive=True),
         Impl("seed loop (davda54)", "seed",
              lambda params, base: baselines.DavdaSAM(params, base.cls, rho=0.5, adaptive=True,
                                                      **dict(base.kwargs)),
              caller_runs_first_pass),
         traffic=(("sum_sq(|w| g)", 2, 0), ("perturb_: w, g -> w, backup", 2, 2),
                  ("restore_: backup -> w", 1, 1)),
         pytorch_optimizer=_po_sam(0.5, adaptive=True)),
    Algo("gsam", "GSAM", "GSAM", dict(rho=0.05, gsam_alpha=0.4),
         Impl("seed loop (GSAM)", "seed",
              lambda params, base: baselines.SeedGSAM(
                  params, base.instance(params), model=torch.nn.Module(), gsam_alpha=0.4,
                  rho_scheduler=baselines.ConstantRho(0.05)),
              tuple_closure),
         traffic=(("sum_sq(g)", 1, 0), ("perturb_ keeping g: w, g -> w, backup, g_old", 2, 3),
                  ("dot_sum_sq(g_old, g_p)", 2, 0),
                  ("orth_combine_ + restore_: g_p, g_old, backup -> g_p, w", 3, 2)),
         pytorch_optimizer=_po_gsam()),
    Algo("gam", "GAM", "GAM", dict(GAM_HYPER),
         Impl("seed loop (GAM)", "seed", _seed_gam, tuple_closure),
         traffic=(("sum_sq(g0)", 1, 0), ("perturb_ keeping g0: w, g0 -> w1, backup, g0", 2, 3),
                  ("sum_sq(g1 - g0) keeping g1", 2, 1),
                  ("restore + perturb: backup, g1, g0 -> w2", 3, 1),
                  ("sum_sq(g2) + m = g0 + b2 g2", 2, 1), ("perturb_: w2, g2 -> w3", 2, 1),
                  ("stats of m, d = b1 g1 + b3 g3", 3, 0),
                  ("combine + restore: m, g1, g3, backup -> g, w", 4, 2)),
         grad_evals=4),
    Algo("vasso", "VaSSO", "VaSSO", dict(rho=0.05, theta=0.9),
         Impl("seed loop (VaSSO)", "seed",
              lambda params, base: baselines.SeedVaSSO(params, base.instance(params), rho=0.05,
                                                       theta=0.9),
              caller_runs_first_pass),
         traffic=(("lerp_sum_sq_: d, g -> d", 2, 1), ("perturb_: w, d -> w, backup", 2, 2),
                  ("restore_: backup -> w", 1, 1))),
]}
DEFAULT_ALGOS = ("sam", "gsam")  # the rows with goals; `--algos all` for the others


def benchmark_backends(device: torch.device) -> List[str]:
    """sam_kernels backends worth timing on `device`: every available one, except Triton on
    CPU tensors (the interpreter is a correctness tool, thousands of times slower)."""
    names = ops.available_backends(device)
    if device.type == "cpu":
        names = [n for n in names if n != "triton"]
    return names


def implementations(algo: Algo, device: torch.device) -> Tuple[List[Impl], List[str]]:
    """The implementations of `algo` to compare on `device`, and notes on what is missing."""
    impls, notes = [], []
    if algo.seed is not None:
        impls.append(algo.seed)
    po = list(algo.pytorch_optimizer)
    if device.type == "cuda":  # pytorch-optimizer already uses foreach on CUDA by default
        po = [i for i in po if "foreach" not in i.label]
    impls.extend(po)
    if algo.pytorch_optimizer == [] and algo.name in ("sam", "asam", "gsam") and \
            _pytorch_optimizer() is None:
        notes.append("pytorch-optimizer not installed (pip install pytorch-optimizer)")
    if algo.ours_cls() is None:
        notes.append(f"sam_kernels.{algo.ours_class} is not available in this version")
    else:
        impls.extend(algo.ours_impl(b) for b in benchmark_backends(device))
    return impls, notes
