"""GSAM — surrogate gap guided sharpness-aware minimization (Zhuang et al., ICLR 2022), as in
juntang-zhuang/GSAM."""
from typing import Any, Dict

from .base import SharpnessAwareOptimizer
from .validation import check, check_choice, check_scheduler


def matched(opt: SharpnessAwareOptimizer, slots, what: str):
    """The gradients kept at w (`_held['g']`) for the parameters of `slots`: every parameter
    with a gradient now needs one (the weights are restored when it has none)."""
    params, kept = opt._held["g"]
    at = dict(zip(params, kept))  # keyed by the tensors (torch.compile cannot trace id())
    now = [p for s in slots for p in s.params]
    if any(p not in at for p in now):
        raise RuntimeError(f"a parameter has a gradient at w + e but had none at w; {what} "
                           "needs both gradients of every parameter it updates (the weights "
                           "were restored)")
    return [at[p] for p in now], [g for s in slots for g in s.grads]


class GSAM(SharpnessAwareOptimizer):
    r"""GSAM: the SAM gradient minus ``alpha`` times the component of the gradient at w
    orthogonal to it.

    g = ∇L(w); ``w ← w + rho_t/(‖T⊙g‖ + eps) · T² · g`` (w kept; T = |w| + eta in adaptive
    groups, else 1); g_p = ∇L(w + e); over all parameters ``cos = ⟨g, g_p⟩/(‖g_p‖‖g‖ + eps)``,
    ``v = g − cos·‖g‖·g_p/(‖g_p‖ + eps)``, ``g_p ← g_p − alpha·v``; w restored; base step.
    Under DDP both passes stay per rank and the final gradient is averaged once
    (``grad_reduce='sum'`` sums it).

    ``rho_scheduler`` (anything with ``step()`` returning rho, e.g.
    ``sam_kernels.schedulers``) is stepped once here and by every ``update_rho_t()``; without
    one rho_t = ``rho``. The seed's positional order ``(params, base_optimizer, model,
    gsam_alpha, rho_scheduler, adaptive, perturb_eps)`` and its ``set_closure(loss_fn, inputs,
    targets)`` + ``step()`` API work as in the seed.
    """

    hyper = {"eps": ">0", "alpha": ">=0", "rho": ">=0"}
    group_hyper = {"adaptive": "bool", "eta": ">=0"}
    sync = "none"
    _seed_family = "gsam"
    _seed_positional = ("model", "gsam_alpha", "rho_scheduler", "adaptive", "perturb_eps")
    _seed_aliases = {"gsam_alpha": "alpha", "perturb_eps": "eps"}

    def __init__(self, params, base_optimizer, *, alpha: float = None, rho: float = 0.05,
                 rho_scheduler: Any = None, adaptive: bool = False, eta: float = 0.0,
                 eps: float = 1e-12, grad_reduce: str = "mean", **kwargs) -> None:
        if alpha is None:
            raise TypeError("GSAM needs alpha (the seed's gsam_alpha), the weight of the "
                            "orthogonal gradient component (>= 0; 0 gives SAM), e.g. "
                            "GSAM(..., alpha=0.1)")
        self.rho_scheduler = check_scheduler("rho_scheduler", rho_scheduler)
        self.grad_reduce = check_choice("grad_reduce", grad_reduce, ("mean", "sum"))
        super().__init__(params, base_optimizer, dict(adaptive=adaptive, eta=eta),
                         dict(eps=eps, alpha=alpha, rho=rho), **kwargs)
        self.rho_t = self.rho
        self.update_rho_t()

    def update_rho_t(self) -> float:
        """Advance the rho scheduler (if any); returns the rho the next step uses."""
        if self.rho_scheduler is not None:
            self.rho_t = check("rho_t", self.rho_scheduler.step(), ">=0")
        return self.rho_t

    def _stage(self, k, slots) -> None:
        check("rho_t", self.rho_t, ">=0")
        self._perturb(slots, self._weighted_sum_sq(slots), rho=self.rho_t)
        self._held["g"] = ([p for s in slots for p in s.params], self._keep(slots))

    def _combine(self, slots):
        g, g_p = matched(self, slots, "GSAM")
        stats = self._global_sum(self._ops().dot_sum_sq(g, g_p))  # [⟨g,g_p⟩, ‖g‖², ‖g_p‖²]
        self._ops().orth_combine_(g_p, g, stats, self.alpha, self.eps)
        return []

    def _extra_state(self) -> Dict[str, Any]:
        extra = {**super()._extra_state(), "rho_t": self.rho_t}
        if hasattr(self.rho_scheduler, "state_dict"):
            extra["rho_scheduler"] = self.rho_scheduler.state_dict()
        return extra

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self.rho_t = extra.get("rho_t", self.rho_t)
        if "rho_scheduler" in extra and hasattr(self.rho_scheduler, "load_state_dict"):
            self.rho_scheduler.load_state_dict(extra["rho_scheduler"])
