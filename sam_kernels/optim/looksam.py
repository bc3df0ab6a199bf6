"""LookSAM (Liu et al., CVPR 2022): the SAM gradient every k-th step, reused in between through
its component orthogonal to the plain gradient, so k − 1 of every k steps cost one pass."""
import torch

from .base import TWO_PASS, Plan, SharpnessAwareOptimizer, StepVar
from .gsam import matched
from .validation import check_choice

GV = "looksam_minus_gv"  # state[p]: −g_v (negated: c·g − g_s is what one axpby_ leaves)
GV_NORM = "looksam_gv_norm"  # state[p]: ‖g_v,i‖ (granularity 'tensor')


class LookSAM(SharpnessAwareOptimizer):
    r"""LookSAM around any base optimizer (‖·‖ global over parameters with a gradient).

    - Steps t = 0, k, 2k, … (t = completed steps) and any step before a g_v exists: g = ∇L(w);
      g_s = ∇L(w + e) (e as SAM's); keep ``g_v = g_s − ‖g_s‖·cos θ·g/(‖g‖ + eps)``,
      ``cos θ = ⟨g, g_s⟩/(‖g‖‖g_s‖ + eps)``; the base optimizer steps with g_s.
    - Other steps: one pass, g = ∇L(w); the base steps with ``g + alpha·‖g‖/(‖g_v‖ + eps)·g_v``.

    ``granularity='tensor'`` takes the norms and the cosine per parameter tensor (as
    pytorch-optimizer's LookSAM); the perturbation stays global. Under DDP every pass is
    averaged (g_v is the same on every rank).
    """

    hyper = {"eps": ">0", "k": "int>=1", "alpha": ">=0"}
    sync = "all"
    _state_keys = (GV, GV_NORM)
    _rule_vars = ("gv_sum_sq", "has_gv")
    gv_sum_sq, has_gv = StepVar(), StepVar(False)
    _exact_counters = True

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, k: int = 5,
                 alpha: float = 0.7, adaptive: bool = False, eta: float = 0.0,
                 eps: float = 1e-12, granularity: str = "global", **kwargs) -> None:
        self.granularity = check_choice("granularity", granularity, ("global", "tensor"))
        self.gv_sum_sq, self.has_gv = None, False
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive, eta=eta),
                         dict(eps=eps, k=k, alpha=alpha), **kwargs)
        self.gv_sum_sq = self._zeros()

    def _own_state_like(self, p):
        own = {GV: p.new_zeros(p.shape)}
        if self.granularity == "tensor":
            own[GV_NORM] = torch.zeros((), dtype=torch.float64, device=p.device)
        return own

    def _plan(self) -> Plan:
        sam_step = self.steps % self.k == 0 or not self.has_gv
        return TWO_PASS if sam_step else Plan((True, False), inner=False)

    def _stage(self, k, slots) -> None:
        if self._current.passes[1]:
            self._perturb(slots, self._weighted_sum_sq(slots))
            self._held["g"] = ([p for s in slots for p in s.params], self._keep(slots))

    def _combine(self, slots):
        if self._current.passes[1]:
            self._keep_gv(slots)
        else:
            self._reuse(slots)
        return []

    def _per_tensor(self, xs):
        return self._global_sum(self._ops().sum_sq_per_tensor(xs))

    def _keep_gv(self, slots) -> None:
        g, g_s = matched(self, slots, "LookSAM")
        params = [p for s in slots for p in s.params]
        for p in self.state:  # g_v of this step only
            if GV in self.state[p]:
                self._put_state(p, GV, None)
                self._put_state(p, GV_NORM, None)
        ops = self._ops()
        if self.granularity == "global":
            stats = self._global_sum(ops.dot_sum_sq(g, g_s))  # [⟨g, g_s⟩, ‖g‖², ‖g_s‖²]
            n_g, n_s = stats[1].sqrt(), stats[2].sqrt()
            self._scale(g, stats[0] / (n_g * n_s + self.eps) * n_s / (n_g + self.eps))
            ops.axpby_(g, g_s, -1.0, 1.0)  # c·g − g_s = −g_v
            self.gv_sum_sq = self._global_sum(ops.sum_sq(g, [], 0.0))
        else:
            both = self._copies("looksam_sum", params, g)  # g + g_s: per-tensor ⟨g, g_s⟩
            ops.axpby_(both, g_s, 1.0, 1.0)
            sq_g, sq_s, sq_b = (self._per_tensor(x) for x in (g, g_s, both))
            n_g, n_s = sq_g.sqrt(), sq_s.sqrt()
            cos = (sq_b - sq_g - sq_s) / 2 / (n_g * n_s + self.eps)
            self._scale(g, cos * n_s / (n_g + self.eps))
            ops.axpby_(g, g_s, -1.0, 1.0)
            for p, n in zip(params, self._per_tensor(g).sqrt().unbind()):
                self._put_state(p, GV_NORM, n)
        for p, t in zip(params, g):
            self._put_state(p, GV, t)
        self.has_gv = bool(params)

    def _reuse(self, slots) -> None:
        pairs = [(p, g) for s in slots for p, g in zip(s.params, s.grads)
                 if GV in self.state.get(p, {})]
        if not pairs:
            return
        ys = [g for _, g in pairs]
        xs = [self.state[p][GV] for p, _ in pairs]
        ops = self._ops()
        if self.granularity == "global":
            g_sq = self._global_sum(ops.sum_sq([g for s in slots for g in s.grads], [], 0.0))
            # perturb_ adds s·x, s = rho/(√X + eps) read on the device: rho = −alpha, eps = 0,
            # X = ((‖g_v‖ + eps)/‖g‖)² give s = −alpha·‖g‖/(‖g_v‖ + eps) (x = −g_v);
            # ‖g‖ = 0 gives X = inf, s = 0
            x = ((self.gv_sum_sq.sqrt() + self.eps) ** 2 / g_sq).to(g_sq.dtype)
            ops.perturb_(ys, xs, x, -self.alpha, 0.0, False, 0.0, [])
        else:
            n_g = self._per_tensor(ys).sqrt()
            n_v = torch.stack([self.state[p][GV_NORM].to(torch.float64) for p, _ in pairs])
            coef = -self.alpha * n_g / (n_v + self.eps)
            ops.add_scaled_(ys, xs, coef)
