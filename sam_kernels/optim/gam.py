"""GAM — gradient norm aware minimization (Zhang et al., CVPR 2023): four gradient evaluations
per step exactly as xxgege/GAM's code computes them (its paper's algorithm box differs)."""
from typing import Any, Dict, Tuple

from .base import Plan, SharpnessAwareOptimizer
from .gsam import matched
from .validation import check, check_choice, check_scheduler

#: the seed's hyper-parameters (read from its `args` namespace) and their defaults
DEFAULTS = dict(grad_rho=0.03, grad_norm_rho=0.2, grad_beta_1=0.1, grad_beta_2=0.9,
                grad_beta_3=0.9, grad_gamma=0.05)


class GAM(SharpnessAwareOptimizer):
    r"""GAM around any base optimizer. With T = |w| + eta in adaptive groups, else 1, norms
    over every parameter with a gradient, rho' = ``grad_rho``, rho = ``grad_norm_rho``:

    1. g0 = ∇L(w);  w1 = w + rho'·T²·g0/(‖T⊙g0‖ + eps)            (w kept)
    2. g1 = ∇L(w1); back to w; h0 = g1 − g0; w2 = w + rho·T²·h0/(‖T⊙h0‖ + eps)
    3. g2 = ∇L(w2); w3 = w2 + rho'·T²·g2/(‖T⊙g2‖ + eps)            (T at w2)
    4. g3 = ∇L(w3); m = g0 + |beta2|·g2, d = beta1·g1 + beta3·g3,
       cos = ⟨m, d⟩/(‖d‖‖m‖ + eps), grad = d − gamma·(m − cos·‖m‖·d/(‖d‖ + eps))
    then w restored, the gradients averaged across DDP ranks, the base step taken.
    Hand-written loops call first_step() … fourth_step(), one after each backward pass.
    ``grad_rho_scheduler`` / ``grad_norm_rho_scheduler`` replace the two radii (advanced by
    ``update_rho_t()``); ``args`` (the seed's namespace) supplies the six names above.
    """

    hyper = {"eps": ">0", "grad_rho": ">=0", "grad_norm_rho": ">=0", "grad_beta_1": "finite",
             "grad_beta_2": "finite", "grad_beta_3": "finite", "grad_gamma": ">=0"}
    group_hyper = {"adaptive": "bool", "eta": ">=0"}
    sync = "none"
    _seed_family = "gam"
    _seed_positional = ("model", "grad_rho_scheduler", "grad_norm_rho_scheduler", "adaptive",
                        "perturb_eps", "args", "grad_reduce")
    _seed_aliases = {"perturb_eps": "eps"}
    _seed_args = {k: k for k in DEFAULTS}

    def __init__(self, params, base_optimizer, *, grad_rho: float = 0.03,
                 grad_norm_rho: float = 0.2, grad_beta_1: float = 0.1, grad_beta_2: float = 0.9,
                 grad_beta_3: float = 0.9, grad_gamma: float = 0.05,
                 grad_rho_scheduler: Any = None, grad_norm_rho_scheduler: Any = None,
                 adaptive: bool = False, eta: float = 0.0, eps: float = 1e-12,
                 grad_reduce: str = "mean", **kwargs) -> None:
        self.grad_rho_scheduler = check_scheduler("grad_rho_scheduler", grad_rho_scheduler)
        self.grad_norm_rho_scheduler = check_scheduler("grad_norm_rho_scheduler",
                                                       grad_norm_rho_scheduler)
        self.grad_reduce = check_choice("grad_reduce", grad_reduce, ("mean", "sum"))
        hyper = dict(eps=eps, grad_rho=grad_rho, grad_norm_rho=grad_norm_rho,
                     grad_beta_1=grad_beta_1, grad_beta_2=grad_beta_2,
                     grad_beta_3=grad_beta_3, grad_gamma=grad_gamma)
        super().__init__(params, base_optimizer, dict(adaptive=adaptive, eta=eta), hyper,
                         **kwargs)
        self.update_rho_t()

    def update_rho_t(self) -> Tuple[float, float]:
        """Advance the schedulers given; returns (grad_rho, grad_norm_rho)."""
        if self.grad_rho_scheduler is not None:
            self.grad_rho = check("grad_rho", self.grad_rho_scheduler.step(), ">=0")
        if self.grad_norm_rho_scheduler is not None:
            self.grad_norm_rho = check("grad_norm_rho", self.grad_norm_rho_scheduler.step(),
                                       ">=0")
        return self.grad_rho, self.grad_norm_rho

    def third_step(self, zero_grad: bool = False) -> None:
        """After the backward pass at w2: m = g0 + |beta2|·g2, move to w3."""
        self._advance(2, zero_grad)

    def fourth_step(self, zero_grad: bool = False) -> None:
        """After the backward pass at w3: combine, restore w, average, base step."""
        self._advance(3, zero_grad)

    def _plan(self) -> Plan:
        return Plan((True, True, True, True))

    def _stage(self, k, slots) -> None:
        ops, held = self._ops(), self._held
        if k == 0:
            self._perturb(slots, self._weighted_sum_sq(slots), rho=self.grad_rho)
            held["g"] = ([p for s in slots for p in s.params], self._keep(slots))  # g0 → m
            return
        g0, grads = matched(self, slots, "GAM")
        if len(grads) != len(held["g"][0]):
            raise RuntimeError(f"{('', 'second', 'third')[k]}_step(): the parameters with a "
                               "gradient differ from those of the first pass; GAM needs the "
                               "gradients of every parameter it updates at all four points "
                               "(the weights were restored)")
        if k == 1:
            held["g1"] = self._keep(slots, steal=False, name="g1")
            kept = self._perturbed
            self._restore()  # h0 from w, the copy of w taken at stage 0 stays valid
            ops.axpby_(grads, g0, -1.0, 1.0)  # h0 = g1 − g0
            self._perturb(slots, self._weighted_sum_sq(slots), rho=self.grad_norm_rho,
                          keep_backup=False)
            self._perturbed = kept
        else:
            self._perturb(slots, self._weighted_sum_sq(slots), rho=self.grad_rho,
                          keep_backup=False)
            ops.axpby_(g0, grads, abs(self.grad_beta_2), 1.0)  # m = g0 + |β2|·g2

    def _combine(self, slots):
        m, d = matched(self, slots, "GAM")
        if len(d) != len(self._held["g"][0]):
            raise RuntimeError("fourth_step(): the parameters with a gradient differ from "
                               "those of the first pass (the weights were restored)")
        ops = self._ops()
        ops.axpby_(d, self._held["g1"], self.grad_beta_1, self.grad_beta_3)  # β1·g1 + β3·g3
        stats = self._global_sum(ops.dot_sum_sq(m, d))  # [⟨m, d⟩, ‖m‖², ‖d‖²]
        ops.orth_combine_(d, m, stats, self.grad_gamma, self.eps)
        return []

    def _extra_state(self) -> Dict[str, Any]:
        extra = {**super()._extra_state(), "grad_rho": self.grad_rho,
                 "grad_norm_rho": self.grad_norm_rho}
        for name in ("grad_rho_scheduler", "grad_norm_rho_scheduler"):
            if hasattr(getattr(self, name), "state_dict"):
                extra[name] = getattr(self, name).state_dict()
        return extra

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self.grad_rho = extra.get("grad_rho", self.grad_rho)
        self.grad_norm_rho = extra.get("grad_norm_rho", self.grad_norm_rho)
        for name in ("grad_rho_scheduler", "grad_norm_rho_scheduler"):
            sched = getattr(self, name)
            if name in extra and hasattr(sched, "load_state_dict"):
                sched.load_state_dict(extra[name])
