"""Friendly SAM (Li et al., CVPR 2024; nblt/F-SAM): SAM along the gradient minus the momentum of
past gradients — its batch-specific part."""
from collections import defaultdict

from .base import SharpnessAwareOptimizer

M = "fsam_momentum"


class FriendlySAM(SharpnessAwareOptimizer):
    r"""F-SAM around any base optimizer.

    g = ∇L(w): on a parameter's first step ``m ← g``, ``d = g``; later ``d = g − sigma·m`` and
    ``m ← lmbda·m + (1 − lmbda)·g``; then SAM along d (``w ← w + rho·T²·d/(‖T⊙d‖ + eps)``),
    the pass at w + e, exact restore, base step. d is formed in the pass's gradients and the
    new m in the same tensors after the perturbation read them:
    ``m_new = (1 − λ)·d + (λ + σ(1 − λ))·m``.
    """

    group_hyper = {"rho": ">=0", "sigma": ">=0", "lmbda": "[0,1]", "adaptive": "bool",
                   "eta": ">=0"}
    _state_keys = (M,)

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, sigma: float = 1.0,
                 lmbda: float = 0.9, adaptive: bool = False, eta: float = 0.0,
                 eps: float = 1e-12, **kwargs) -> None:
        super().__init__(params, base_optimizer, dict(rho=rho, sigma=sigma, lmbda=lmbda,
                                                      adaptive=adaptive, eta=eta),
                         dict(eps=eps), **kwargs)

    def _own_state_like(self, p):
        return {M: p.new_zeros(p.shape)}

    def _stage(self, k, slots) -> None:
        slots = self._perturbing(slots)
        params = [p for s in slots for p in s.params]
        d = self._keep(slots)  # g, owned: becomes d, then the new m
        buckets = defaultdict(lambda: ([], []))
        i = 0
        for s in slots:
            for p in s.params:
                m = self.state[p].get(M)
                if m is not None and m.shape == d[i].shape:
                    buckets[(float(s.group["sigma"]), float(s.group["lmbda"]))][0].append(d[i])
                    buckets[(float(s.group["sigma"]), float(s.group["lmbda"]))][1].append(m)
                i += 1
        ops = self._ops()
        for (sigma, _), (ds, ms) in buckets.items():
            ops.axpby_(ds, ms, -sigma, 1.0)  # d = g − σ·m
        dirs, j = [], 0
        for s in slots:
            dirs.append(d[j:j + len(s.params)])
            j += len(s.params)
        self._perturb(slots, self._weighted_sum_sq(slots, dirs), dirs=dirs)
        for (sigma, lmbda), (ds, ms) in buckets.items():
            ops.axpby_(ds, ms, lmbda + sigma * (1.0 - lmbda), 1.0 - lmbda)  # the new m
        for p, t in zip(params, d):
            self._put_state(p, M, t)
