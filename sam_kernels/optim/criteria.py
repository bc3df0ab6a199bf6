"""VaSSORe's reuse criteria (lk-eg/Computationally-Efficient-SAM, solver/criteria_functions.py):
whether step t computes the inner (pass-1) gradient, decided from earlier steps only.

A criterion has `vote(t)` (a bool, a 0-d bool device tensor the optimizer reads once, or None
for "no information yet": recompute) and `observe(opt, params, grads)` (device statistics of
the outer gradient after the last pass of every step). What they change is replaced, never
written in place, so `snapshot()`/`restore()` are references and a failed step undoes them.
"""
import warnings
from typing import Any, Dict, Optional

import torch

from .validation import check, check_choice

CRITERIA = ("naive", "random", "gSAMflat", "gSAMsharp", "gSAMratio", "cosSim")
#: seed of the `random` criterion's generator when none is given: the same on every rank
DEFAULT_RANDOM_SEED = 0


class ReuseCriterion:
    name = ""
    default_warmup = 1
    _fields = ()  # the tensors/values it replaces (snapshot, checkpoint)

    def vote(self, t: int):
        raise NotImplementedError

    def observe(self, opt, params, grads) -> None:
        pass

    def snapshot(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self._fields}

    def restore(self, snap: Dict[str, Any]) -> None:
        for k, v in snap.items():
            setattr(self, k, v)

    def state_dict(self) -> Dict[str, Any]:
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.snapshot().items()}

    def load_state_dict(self, sd: Dict[str, Any], device) -> None:
        self.restore({k: (v.to(device=device, copy=True) if torch.is_tensor(v) else v)
                      for k, v in sd.items() if k in self._fields})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class NaiveCriterion(ReuseCriterion):
    """Recompute every k-th step: t % k == 0."""
    name = "naive"

    def __init__(self, k: int) -> None:
        self.k = k

    def vote(self, t: int) -> bool:
        return t % self.k == 0


class RandomCriterion(ReuseCriterion):
    """Recompute with probability p: u < p, u ~ U[0, 1) from a CPU generator (no device read).
    Seed it identically on every rank."""
    name = "random"

    def __init__(self, p: float, generator: Optional[torch.Generator]) -> None:
        self.p = p
        self.generator = generator if generator is not None else \
            torch.Generator().manual_seed(DEFAULT_RANDOM_SEED)

    def vote(self, t: int) -> bool:
        return torch.rand((), generator=self.generator, dtype=torch.float64).tolist() < self.p

    def snapshot(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state()}  # ~5 KB on the host

    def restore(self, snap: Dict[str, Any]) -> None:
        if "generator" in snap:
            self.generator.set_state(snap["generator"])

    def load_state_dict(self, sd, device) -> None:
        self.restore(sd)


class GradNormEMACriterion(ReuseCriterion):
    """gSAMflat / gSAMsharp / gSAMratio on the outer-gradient norm n and its running mean
    τ ← (1−λ)·τ + λ·n (τ from 0, no bias correction, fp64 on the device): flat recomputes when
    τ > φ·n, φ = (1−λ)·z + λ; sharp when τ < φ′·n, φ′ = (1−λ)/z + λ; ratio when either holds,
    with z_two in φ′."""
    default_warmup = 100
    _fields = ("flag", "tau")

    def __init__(self, name: str, lam: float, z: float, z_two: float) -> None:
        self.name, self.lam, self.flag, self.tau = name, lam, None, None
        self.phi = (1 - lam) * z + lam if name in ("gSAMflat", "gSAMratio") else None
        z_sharp = z_two if name == "gSAMratio" else z
        self.phi_prime = (1 - lam) / z_sharp + lam if name in ("gSAMsharp", "gSAMratio") \
            else None

    def vote(self, t: int):
        return self.flag

    def observe(self, opt, params, grads) -> None:
        norm = opt._dist.agree_(opt._ops().sum_sq(list(grads), [], 0.0)).to(torch.float64).sqrt()
        tau = torch.zeros_like(norm) if self.tau is None else self.tau
        self.tau = tau.mul(1 - self.lam).add_(norm, alpha=self.lam)
        flag = None if self.phi is None else self.tau > self.phi * norm
        if self.phi_prime is not None:
            sharp = self.tau < self.phi_prime * norm
            flag = sharp if flag is None else flag.logical_or_(sharp)
        self.flag = flag


class CosSimCriterion(ReuseCriterion):
    """Recompute when cos(g_out,t−1, g_out,t−2) ≤ c over all parameters (0/0 is NaN: no
    trigger); keeps the last outer gradient in state[p]['g_out_prev']."""
    name = "cosSim"
    _fields = ("flag",)

    def __init__(self, c: float) -> None:
        self.c, self.flag = c, None

    def vote(self, t: int):
        return self.flag

    def observe(self, opt, params, grads) -> None:
        prevs = []
        for p, g in zip(params, grads):
            buf = opt.state[p].get("g_out_prev")
            ok = buf is not None and buf.shape == g.shape and buf.dtype == g.dtype
            prevs.append(buf if ok else torch.zeros_like(g))  # restarts: no contribution
        stats = opt._dist.agree_(opt._ops().dot_sum_sq(list(grads), prevs)).to(torch.float64)
        self.flag = stats[0] / (stats[1].sqrt() * stats[2].sqrt()) <= self.c
        copies = opt._copies("g_out", params, list(grads))  # p.grad is the base step's
        for p, t in zip(params, copies):
            opt._put_state(p, "g_out_prev", t)


def make_criterion(criterion: str, *, k: Any = 2, p: Any = 0.5, lam: Any = 0.1, z: Any = 1.0,
                   z_two: Any = 0.5, c: Any = 0.0,
                   generator: Optional[torch.Generator] = None) -> ReuseCriterion:
    """Validate every criterion hyper-parameter and build the named criterion."""
    if criterion not in CRITERIA:
        hint = {"baseline": " (the seed's 'baseline' is plain VaSSO: use sam_kernels.VaSSO)",
                "schedule": " (the seed's 'schedule' alternates VaSSO and the base optimizer "
                            "by epoch: switch optimizers in your loop)"}.get(criterion, "")
        raise ValueError(f"Invalid criterion: {criterion!r}; choose one of {CRITERIA}{hint}")
    k, p = check("k", k, "int>=1"), check("p", p, "[0,1]")
    lam, z, z_two = check("lam", lam, "(0,1]"), check("z", z, ">0"), check("z_two", z_two, ">0")
    c = check("c", c, "finite")
    if generator is not None and not (isinstance(generator, torch.Generator)
                                      and generator.device.type == "cpu"):
        raise TypeError(f"generator must be a CPU torch.Generator (seeded identically on every "
                        f"rank), got {generator!r}")
    if criterion == "naive":
        return NaiveCriterion(k)
    if criterion == "random":
        return RandomCriterion(p, generator)
    if criterion == "cosSim":
        return CosSimCriterion(c)
    if criterion == "gSAMratio" and lam < 1 and z * z_two <= 1:
        warnings.warn(f"gSAMratio with z_two={z_two} <= 1/z={1 / z:.6g}: the band of outer-"
                      "gradient norms that skips the inner pass is empty, so every step "
                      "recomputes it; choose z_two > 1/z", UserWarning, stacklevel=4)
    return GradNormEMACriterion(criterion, lam, z, z_two)


__all__ = ["CRITERIA", "make_criterion", "check_choice"]
