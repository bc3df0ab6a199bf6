"""GAM — accelerated gradient-norm aware minimization (Zhang et al., CVPR 2023), four gradient
evaluations per step exactly as xxgege/GAM's code computes them (its paper's algorithm box
differs), with three parameter-sized buffers instead of the seed's six."""
import math
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch

from .base import (SharpnessAwareOptimizer, StepVar, Tensors, check_nonnegative,
                   check_positive)
from .closure import ClosureMixin
from .seed_compat import check_step_arguments
from .gsam import check_grad_reduce, scheduled_value

#: hyper-parameters read from the seed's `args` namespace when not given as keywords
_ARG_DEFAULTS = dict(grad_rho=0.03, grad_norm_rho=0.2, grad_beta_1=0.1, grad_beta_2=0.9,
                     grad_beta_3=0.9, grad_gamma=0.05)
_STAGES = ("none", "first_step()", "second_step()", "third_step()")


def check_finite(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or \
            not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number)")


class GAM(ClosureMixin, SharpnessAwareOptimizer):
    r"""GAM around any base optimizer: first-order flatness through four gradient evaluations.

    With T = |w| + eta in adaptive groups (the seed has eta = 0), else 1, norms over every
    parameter with a gradient, rho' = ``grad_rho`` and rho = ``grad_norm_rho``:

    1. g0 = ∇L(w);  w1 = w + rho'·T²·g0 / (‖T⊙g0‖ + eps)          (exact copy of w kept)
    2. g1 = ∇L(w1) (BatchNorm statistics frozen from here on); back to w exactly;
       h0 = g1 − g0;  w2 = w + rho·T²·h0 / (‖T⊙h0‖ + eps)
    3. g2 = ∇L(w2);  w3 = w2 + rho'·T²·g2 / (‖T⊙g2‖ + eps)       (T at w2)
    4. g3 = ∇L(w3);  m = g0 + |beta2|·g2,  d = beta1·g1 + beta3·g3,
       cos = ⟨m, d⟩ / (‖d‖‖m‖ + eps),  grad = d − gamma·(m − cos·‖m‖·d / (‖d‖ + eps))
    then w restored exactly, the gradients averaged across DDP ranks, the base step taken.

    Buffers: the kept weights, g0 (turned into m in place) and g1 — three parameter-sized
    buffers; h0 and d are formed in the gradient tensors.

    Args:
        params, base_optimizer, model, adaptive, eta, perturb_eps, grad_reduce, backend: as
            GSAM; everything after ``model`` is keyword-only.
        grad_rho, grad_norm_rho: rho' and rho (>= 0); replaced by the schedulers' values
            when ``grad_rho_scheduler`` / ``grad_norm_rho_scheduler`` are given.
        grad_beta_1, grad_beta_2, grad_beta_3: finite weights of g1, g2 (its absolute value)
            and g3.
        grad_gamma: weight of the orthogonal component (>= 0).
        grad_scaler, max_grad_norm: as for SAM (each of the four passes unscaled once).
        args: the seed's namespace; supplies any of the six names above it carries that is
            not given as a keyword (defaults 0.03, 0.2, 0.1, 0.9, 0.9, 0.05).

    Step APIs: ``set_closure(loss_fn, inputs, targets)`` + ``step()`` → ``(outputs, loss)`` of
    pass 1; ``step(closure)`` (torch contract); or by hand, one call after each backward pass
    (each pass inside ``with optimizer.pass_context():`` for DDP and BatchNorm):
    ``first_step()``, ``second_step()``, ``third_step()``, ``fourth_step()``.
    """

    _nonnegative_group_keys = ("eta",)
    _reduce_final_grads = True  # under DDP: every pass per-rank, the final gradient averaged
    # changed by steps: kept in a dict for torch.compile
    _stage = StepVar(0)
    _grad_params = StepVar()
    #: xxgege/GAM saves only its base optimizer's state dict: loaded as such
    _seed_family = "gam"

    def __init__(self, params: Iterable, base_optimizer: Any,
                 model: Optional[torch.nn.Module] = None, *,
                 grad_rho: Optional[float] = None, grad_norm_rho: Optional[float] = None,
                 grad_beta_1: Optional[float] = None, grad_beta_2: Optional[float] = None,
                 grad_beta_3: Optional[float] = None, grad_gamma: Optional[float] = None,
                 grad_rho_scheduler: Any = None, grad_norm_rho_scheduler: Any = None,
                 adaptive: bool = False, eta: float = 0.0, perturb_eps: float = 1e-12,
                 args: Any = None, grad_reduce: str = "mean", backend: str = "auto",
                 grad_scaler: Optional[torch.amp.GradScaler] = None,
                 max_grad_norm: Optional[float] = None, **base_kwargs: Any) -> None:
        given = dict(grad_rho=grad_rho, grad_norm_rho=grad_norm_rho, grad_beta_1=grad_beta_1,
                     grad_beta_2=grad_beta_2, grad_beta_3=grad_beta_3, grad_gamma=grad_gamma)
        hyper = {}
        for name, default in _ARG_DEFAULTS.items():
            from_args = getattr(args, name, None) if args is not None else None
            if given[name] is not None and from_args is not None and given[name] != from_args:
                raise ValueError(f"Invalid {name} value: {given[name]!r} given as a keyword "
                                 f"but args.{name} = {from_args!r}; give it once")
            hyper[name] = next(v for v in (given[name], from_args, default) if v is not None)
        for name in ("grad_beta_1", "grad_beta_2", "grad_beta_3"):
            check_finite(name, hyper[name])
        for name in ("grad_rho", "grad_norm_rho", "grad_gamma"):
            check_nonnegative(name, hyper[name])
        check_nonnegative("eta", eta)
        check_positive("perturb_eps", perturb_eps)
        for name, sched in (("grad_rho_scheduler", grad_rho_scheduler),
                            ("grad_norm_rho_scheduler", grad_norm_rho_scheduler)):
            if sched is not None and not callable(getattr(sched, "step", None)):
                raise TypeError(f"{name} must have a step() method returning rho, got "
                                f"{sched!r}")
        self.grad_rho = float(hyper["grad_rho"])
        self.grad_norm_rho = float(hyper["grad_norm_rho"])
        self.grad_beta_1 = float(hyper["grad_beta_1"])
        self.grad_beta_2 = float(hyper["grad_beta_2"])
        self.grad_beta_3 = float(hyper["grad_beta_3"])
        self.grad_gamma = float(hyper["grad_gamma"])
        self.perturb_eps = float(perturb_eps)
        self.grad_reduce = check_grad_reduce(grad_reduce)
        self.grad_rho_scheduler = grad_rho_scheduler
        self.grad_norm_rho_scheduler = grad_norm_rho_scheduler
        self.args = args
        defaults = dict(adaptive=bool(adaptive), eta=eta)
        super().__init__(params, base_optimizer, defaults, backend=backend, model=model,
                         base_kwargs=base_kwargs, grad_scaler=grad_scaler,
                         max_grad_norm=max_grad_norm)
        self._stage = 0  # manual steps done in this GAM step (valid while perturbed)
        self._grad_params: Tensors = []
        self.update_rho_t()

    @torch.no_grad()
    def update_rho_t(self) -> Tuple[float, float]:
        """Advance the schedulers (those given) and return (grad_rho, grad_norm_rho)."""
        if self.grad_rho_scheduler is not None:
            self.grad_rho = scheduled_value("grad_rho", self.grad_rho_scheduler.step())
        if self.grad_norm_rho_scheduler is not None:
            self.grad_norm_rho = scheduled_value("grad_norm_rho",
                                                 self.grad_norm_rho_scheduler.step())
        return self.grad_rho, self.grad_norm_rho

    # ------------------------------------------------------------------ the four stages
    def _require_stage(self, done: int, what: str) -> None:
        stage = self._stage if self.perturbed else 0
        if stage != done:
            raise RuntimeError(
                f"{what} was called out of order (last completed: {_STAGES[stage]}); a GAM "
                "step is backward at w -> first_step() -> backward -> second_step() -> "
                "backward -> third_step() -> backward -> fourth_step()")

    def _gradients(self, what: str):
        """Slots, flat params and grads of this pass; the parameters must be those of pass 1
        (every combination needs all four gradients of a parameter)."""
        slots = self._slots_with_grads()
        params = [p for s in slots for p in s.params]
        if [id(p) for p in params] != [id(p) for p in self._grad_params]:
            self._abort_step()
            raise RuntimeError(f"{what}: the parameters with a gradient differ from those of "
                               "the first pass; GAM needs the gradients of every parameter it "
                               "updates at all four points (the weights were restored)")
        self._unscale_grads()
        return slots, params, [g for s in slots for g in s.grads]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """After the backward pass at w: keep g0 and move to w1 = w + e0."""
        self._require_unperturbed("first_step()")
        self._check_groups()
        for name in ("grad_beta_1", "grad_beta_2", "grad_beta_3"):
            check_finite(name, getattr(self, name))
        for name in ("grad_rho", "grad_norm_rho", "grad_gamma"):
            check_nonnegative(name, getattr(self, name))
        self._grad_params = self._perturb_keeping_grads("g0_then_m", self.grad_rho,
                                                        self.perturb_eps)
        self._stage = 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """After the backward pass at w1: keep g1, go back to w, move to w2 = w + e12 along
        h0 = g1 − g0."""
        self._require_stage(1, "second_step()")
        slots, params, grads = self._gradients("second_step()")
        backend = self._ops()
        torch._foreach_copy_(self._scratch("g1", params), grads)
        kept = self._perturbed
        self._restore()
        backend.axpby_(grads, self._scratch("g0_then_m", params), -1.0, 1.0)  # h0 = g1 - g0
        self._perturb(slots, self._weighted_sum_sq(slots), self.perturb_eps,
                      rho=self.grad_norm_rho, keep_backup=False)
        self._perturbed = kept  # the copy of w taken in first_step stays valid
        self._stage = 2
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def third_step(self, zero_grad: bool = False) -> None:
        """After the backward pass at w2: m = g0 + |beta2|·g2, move to w3 = w2 + e(g2)."""
        self._require_stage(2, "third_step()")
        slots, params, grads = self._gradients("third_step()")
        self._perturb(slots, self._weighted_sum_sq(slots), self.perturb_eps, rho=self.grad_rho,
                      keep_backup=False)
        self._ops().axpby_(self._scratch("g0_then_m", params), grads, abs(self.grad_beta_2), 1.0)
        self._stage = 3
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def fourth_step(self, zero_grad: bool = False) -> None:
        """After the backward pass at w3: d = beta1·g1 + beta3·g3, remove gamma times the part
        of m orthogonal to d, restore w exactly, average across DDP ranks, base step."""
        self._require_stage(3, "fourth_step()")
        _, params, grads = self._gradients("fourth_step()")
        backend = self._ops()
        m = self._scratch("g0_then_m", params)
        backend.axpby_(grads, self._scratch("g1", params), self.grad_beta_1, self.grad_beta_3)
        stats = self._global_sum(backend.dot_sum_sq(m, grads))  # [⟨m, d⟩, ‖m‖², ‖d‖²]
        backend.orth_combine_(grads, m, stats, self.grad_gamma, self.perturb_eps)
        self._restore()
        self._stage = 0
        self._sync_grads(grads, self.grad_reduce)
        self._base_step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None, *args: Any,
             **seed_kwargs: Any) -> Any:
        """Four passes (BatchNorm statistics frozen after the first), combine, restore, base
        step. Without a closure runs the one from set_closure() and returns the first pass's
        ``(outputs, loss)``; with one returns what its first call returned. The seeds' step
        keywords (``epoch=``, ...) are ignored, as for SAM."""
        check_step_arguments(self, args, seed_kwargs)
        closure = self._closure_for_step(closure)
        self._require_unperturbed("step()")
        result = closure()
        self.first_step(zero_grad=True)
        with self._perturbed_pass():
            at_w_plus_e = closure()  # w + e along g0: the surrogate gap's point
            self.second_step(zero_grad=True)
            closure()
            self.third_step(zero_grad=True)
            closure()
        self.fourth_step()
        self._record_gap(result, at_w_plus_e)
        return result

    # ------------------------------------------------------------------ checkpointing
    def _extra_state(self) -> Dict[str, Any]:
        extra: Dict[str, Any] = {"grad_rho": self.grad_rho, "grad_norm_rho": self.grad_norm_rho}
        for name in ("grad_rho_scheduler", "grad_norm_rho_scheduler"):
            sched = getattr(self, name)
            if hasattr(sched, "state_dict"):
                extra[name] = sched.state_dict()
        return extra

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        self.grad_rho = extra.get("grad_rho", self.grad_rho)
        self.grad_norm_rho = extra.get("grad_norm_rho", self.grad_norm_rho)
        for name in ("grad_rho_scheduler", "grad_norm_rho_scheduler"):
            sched = getattr(self, name)
            if name in extra and hasattr(sched, "load_state_dict"):
                sched.load_state_dict(extra[name])

    def __repr__(self) -> str:
        return f"GAM(base_optimizer={self.base_optimizer!r}, grad_rho={self.grad_rho}, " \
               f"grad_norm_rho={self.grad_norm_rho}, backend={self.backend!r})"
