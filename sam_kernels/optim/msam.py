"""Momentum-SAM (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead", 2024): the perturbation follows the base optimizer's momentum, which
exists before the step's pass, so a step costs one forward-backward pass, like SGD."""
import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from .base import GradSlots, SharpnessAwareOptimizer, StepVar, check_nonnegative, \
    check_positive
from .closure import ClosureMixin
from .sam import perturbed_slots

#: where torch's optimizers keep their first moment (SGD; the Adam family)
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class MomentumSAM(ClosureMixin, SharpnessAwareOptimizer):
    r"""MSAM around a base optimizer that has momentum (SGD with ``momentum > 0``, Adam,
    AdamW, … or any optimizer with ``momentum_key=`` naming its state buffer).

    One step: ``w̃ = w − rho·v / (‖v‖ + eps)`` with v the base optimizer's momentum (SGD's
    ``momentum_buffer``, Adam's ``exp_avg``; ‖·‖ over every parameter that has one); one
    forward-backward at w̃ (BatchNorm running statistics update as usual: it is the step's only
    pass); exact restore; base step with that gradient. Parameters without momentum yet (the
    first step) are not moved: the first step is a plain base step.

    Args:
        params: parameters or param-group dicts (per-group keys: ``rho``, ``perturb``).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``**base_kwargs``) or
            an instance over the same parameters.
        rho: radius (>= 0). eps: added to the norm (> 0).
        momentum_key: the base optimizer's state key of the momentum (default: the first of
            ``MOMENTUM_KEYS`` present).
        model, backend, grad_scaler, max_grad_norm: as for SAM (the one pass is averaged by
            DDP; under AMP it is unscaled once).

    Steps (one pass each): ``step(closure)`` (returns the closure's loss, taken at w̃),
    ``set_closure(...)`` + ``step()``, or by hand::

        optimizer.first_step()              # w -> w̃, before the forward pass
        with optimizer.pass_context():
            loss_fn(model(x), y).backward()
        optimizer.second_step(zero_grad=True)   # restore, base step

    ``last_surrogate_gap`` stays None (there is no pass at w). ``steps`` counts steps,
    ``inner_steps`` those that were perturbed.
    """

    _nonnegative_group_keys = ("rho",)
    # no tensor state of its own (v is the base optimizer's); a non-empty key list makes a
    # skipped step (GradScaler, skip_nonfinite) put the counters back
    _amp_guarded_state = ("msam_counters",)
    steps = StepVar(0)
    inner_steps = StepVar(0)
    _started = StepVar(False)  # first_step() ran, second_step() pending

    def __init__(self, params: Iterable, base_optimizer: Any, rho: float = 0.05,
                 eps: float = 1e-12, momentum_key: Optional[str] = None,
                 model: Optional[torch.nn.Module] = None, backend: str = "auto",
                 grad_scaler: Optional[torch.amp.GradScaler] = None,
                 max_grad_norm: Optional[float] = None, **base_kwargs: Any) -> None:
        check_nonnegative("rho", rho)
        check_positive("eps", eps)
        if momentum_key is not None and not isinstance(momentum_key, str):
            raise TypeError(f"momentum_key must be a string (a key of the base optimizer's "
                            f"per-parameter state), got {momentum_key!r}")
        self.eps = float(eps)
        self.momentum_key = momentum_key
        defaults = dict(rho=rho, adaptive=False, eta=0.0)
        super().__init__(params, base_optimizer, defaults, backend=backend, model=model,
                         base_kwargs=base_kwargs, grad_scaler=grad_scaler,
                         max_grad_norm=max_grad_norm)

    def _check_groups(self) -> None:
        super()._check_groups()
        if isinstance(self.base_optimizer, torch.optim.SGD) and self.momentum_key is None:
            for group in self.param_groups:
                if not group.get("momentum", 0):
                    raise ValueError("MomentumSAM perturbs along the base optimizer's momentum, "
                                     "but this SGD group has momentum=0; use SGD(..., "
                                     "momentum=0.9) or another base optimizer")
        for group in self.param_groups:
            if group["adaptive"]:
                raise ValueError("MomentumSAM has no adaptive (ASAM) neighbourhood; leave the "
                                 "group's 'adaptive' False")

    def _momentum(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        state = self.base_optimizer.state.get(p)
        if not state:
            return None
        keys = (self.momentum_key,) if self.momentum_key is not None else MOMENTUM_KEYS
        for key in keys:
            v = state.get(key)
            if torch.is_tensor(v):
                return v
        raise RuntimeError(f"MomentumSAM: the base optimizer's state of a parameter has none "
                           f"of the keys {list(keys)} (it has {sorted(state)}); pass "
                           "momentum_key= naming its momentum buffer")

    def _momentum_slots(self) -> List[GradSlots]:
        slots = []
        for group in self.param_groups:
            params, bufs = [], []
            for p in group["params"]:
                v = self._momentum(p)
                if v is not None:
                    params.append(p)
                    bufs.append(v)
            if params:
                slots.append(GradSlots(group, params, bufs, self._locals(params)))
        return slots

    def _pass_is_per_rank(self) -> bool:
        return False  # the step's only pass: DDP averages it

    def pass_context(self, freeze_bn: Optional[bool] = None):
        # the only pass of a step: BatchNorm running statistics update in it by default
        return super().pass_context(freeze_bn=bool(freeze_bn))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w̃ = w − rho·v/(‖v‖ + eps), before the step's forward pass (no gradient is
        read)."""
        self._require_unperturbed("first_step()")
        if self._started:
            raise RuntimeError("first_step() was called twice; the order is first_step() -> "
                               "forward/backward at w̃ -> second_step()")
        self._check_groups()
        slots = perturbed_slots(self._momentum_slots())
        if slots:
            sum_sq = self._weighted_sum_sq(slots)
            # −rho per group: the same kernels as SAM's w + rho·d/(‖d‖ + eps)
            flipped = [dataclasses.replace(s, group={**s.group, "rho": -s.group["rho"]})
                       for s in slots]
            self._perturb(flipped, sum_sq, self.eps)
        self._started = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly and step the base optimizer with the gradient taken at w̃."""
        if not self._started:
            raise RuntimeError("second_step() was called without a preceding first_step(); "
                               "the order is first_step() -> forward/backward at w̃ -> "
                               "second_step()")
        self._unscale_grads()
        perturbed = self.perturbed
        if perturbed:
            self._restore()
        self._started = False
        self.steps += 1  # before: a skipped step puts the counters back
        self.inner_steps += int(perturbed)
        self._base_step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perturb along the momentum, one pass, restore, base step; returns the closure's
        result (its loss is at w̃)."""
        closure = self._closure_for_step(closure)
        self._require_unperturbed("step()")
        self.first_step()
        try:
            with self.pass_context():
                result = closure()
        except BaseException:
            self._started = False
            raise
        self.second_step()
        self.last_surrogate_gap = None
        return result

    def _abort_step(self) -> None:
        super()._abort_step()
        self._started = False

    def _extra_state(self) -> Dict[str, Any]:
        return {"steps": self.steps, "inner_steps": self.inner_steps}

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        self.steps = int(extra.get("steps", 0))
        self.inner_steps = int(extra.get("inner_steps", 0))
        self._started = False
