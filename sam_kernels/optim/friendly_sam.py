"""Friendly SAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024; nblt/F-SAM):
SAM perturbing along the gradient minus the momentum of past gradients — the batch-specific
part of the gradient — instead of the gradient itself."""
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .base import GradSlots, SharpnessAwareOptimizer, StepVar, Tensors, check_nonnegative, \
    check_positive
from .closure import ClosureMixin
from .sam import perturbed_slots

_M = "fsam_momentum"


def check_unit(name: str, value: Any) -> None:
    check_nonnegative(name, value)
    if value > 1:
        raise ValueError(f"Invalid {name} value: {value!r} (must be a number in [0, 1])")


class FriendlySAM(ClosureMixin, SharpnessAwareOptimizer):
    r"""F-SAM around any base optimizer.

    Per step, g = ∇L(w): on a parameter's first step ``m ← g`` and ``d = g``; later
    ``d = g − sigma·m_{t−1}`` and ``m_t = lmbda·m_{t−1} + (1 − lmbda)·g``; then SAM along d:
    ``w ← w + rho·T²·d / (‖T⊙d‖ + eps)`` (T = |w| + eta in adaptive groups, else 1; the norm
    over every parameter with a gradient), pass at w + e (BatchNorm running statistics
    frozen), exact restore, base step with that gradient.

    d is written into the gradients and m updated in two ``axpby_`` passes
    (g ← g − σ·m, then m ← (1−λ)·d + (λ + σ(1−λ))·m, which is λ·m + (1−λ)·g); the norm and
    the perturbation are SAM's kernels.

    Args:
        params: parameters or param-group dicts (per-group keys: ``rho``, ``sigma``, ``lmbda``,
            ``adaptive``, ``eta``, ``perturb``).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``**base_kwargs``) or
            an instance over the same parameters.
        rho: radius (>= 0). sigma: weight of the momentum removed (>= 0). lmbda: momentum
            decay, in [0, 1]. eps: added to the norm (> 0). adaptive, eta: ASAM's T.
        model, backend, grad_scaler, max_grad_norm: as for SAM (pass 1 per rank under DDP, so
            m is each rank's own momentum of its own gradients).

    Steps: ``step(closure)``, ``set_closure(...)`` + ``step()``, or first_step() /
    second_step() around your own passes, as SAM. ``steps`` and ``inner_steps`` (equal: every
    step runs both passes) count completed steps.
    """

    _nonnegative_group_keys = ("rho", "eta", "sigma")
    _amp_guarded_state = (_M,)
    steps = StepVar(0)
    inner_steps = StepVar(0)

    def __init__(self, params: Iterable, base_optimizer: Any, rho: float = 0.05,
                 sigma: float = 1.0, lmbda: float = 0.9, adaptive: bool = False,
                 eta: float = 0.0, eps: float = 1e-12, model: Optional[torch.nn.Module] = None,
                 backend: str = "auto", grad_scaler: Optional[torch.amp.GradScaler] = None,
                 max_grad_norm: Optional[float] = None, **base_kwargs: Any) -> None:
        check_nonnegative("rho", rho)
        check_nonnegative("sigma", sigma)
        check_unit("lmbda", lmbda)
        check_nonnegative("eta", eta)
        check_positive("eps", eps)
        self.eps = float(eps)
        defaults = dict(rho=rho, sigma=sigma, lmbda=lmbda, adaptive=bool(adaptive), eta=eta)
        super().__init__(params, base_optimizer, defaults, backend=backend, model=model,
                         base_kwargs=base_kwargs, grad_scaler=grad_scaler,
                         max_grad_norm=max_grad_norm)

    def _check_groups(self) -> None:
        super()._check_groups()
        for group in self.param_groups:
            check_unit("lmbda", group["lmbda"])

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Update m, turn the gradients at w into d, move to w + e along d."""
        self._require_unperturbed("first_step()")
        self._check_groups()
        slots = self._slots_with_grads()
        self._unscale_grads()
        slots = perturbed_slots(slots)
        self._direction(slots)
        self._perturb(slots, self._weighted_sum_sq(slots), self.eps)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly and step the base optimizer with the gradient taken at w + e."""
        self._require_perturbed("second_step()")
        self._unscale_grads()
        self._restore()
        self.steps += 1  # before: a skipped step puts the counters back with the momentum
        self.inner_steps += 1
        self._base_step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Pass at w, perturb along d, pass at w + e, restore, base step; returns what the
        call at w returned."""
        closure = self._closure_for_step(closure)
        self._require_unperturbed("step()")
        at_w = closure()
        self.first_step(zero_grad=True)
        with self._perturbed_pass():
            at_w_plus_e = closure()
        self.second_step()
        self._record_gap(at_w, at_w_plus_e)
        return at_w

    def _direction(self, slots: List[GradSlots]) -> None:
        """g ← d and m updated, per bucket of (sigma, lmbda); first steps: m ← g."""
        fresh: Tuple[Tensors, Tensors] = ([], [])
        buckets: Dict[Tuple[float, float], Tuple[Tensors, Tensors]] = \
            defaultdict(lambda: ([], []))
        for s in slots:
            key = (float(s.group["sigma"]), float(s.group["lmbda"]))
            for p, g in zip(s.params, s.grads):
                state = self.state[p]
                if _M not in state:
                    state[_M] = torch.zeros_like(g, memory_format=torch.preserve_format)
                    fresh[0].append(state[_M])
                    fresh[1].append(g)
                else:
                    buckets[key][0].append(state[_M])
                    buckets[key][1].append(g)
        ops = self._ops()
        for (sigma, lmbda), (ms, gs) in buckets.items():
            ops.axpby_(gs, ms, -sigma, 1.0)  # d = g − σ·m
            ops.axpby_(ms, gs, 1.0 - lmbda, lmbda + sigma * (1.0 - lmbda))  # m = λ·m + (1−λ)·g
        if fresh[0]:
            ops.axpby_(fresh[0], fresh[1], 1.0, 0.0)  # m = g (d = g)

    def _extra_state(self) -> Dict[str, Any]:
        return {"steps": self.steps, "inner_steps": self.inner_steps}

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        self.steps = int(extra.get("steps", 0))
        self.inner_steps = int(extra.get("inner_steps", 0))
