"""Momentum-SAM (Becker et al., 2024): the perturbation follows the base optimizer's momentum,
which exists before the step's pass, so a step costs one forward-backward pass."""
from typing import Optional

import torch

from .base import Plan, SharpnessAwareOptimizer

#: where torch's optimizers keep their first moment (SGD; the Adam family)
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class MomentumSAM(SharpnessAwareOptimizer):
    r"""MSAM around a base optimizer with momentum (SGD with ``momentum > 0``, Adam, AdamW, …,
    or any optimizer with ``momentum_key=`` naming its state buffer).

    ``w̃ = w − rho·v/(‖v‖ + eps)`` with v the base optimizer's momentum (‖·‖ over every
    parameter that has one); one forward-backward at w̃ (BatchNorm statistics update: it is
    the only pass); exact restore; base step with that gradient. Before any momentum exists
    (the first step) the step is a plain base step. Hand-written loops call first_step()
    before the forward pass and second_step() after the backward.
    """

    hyper = {"eps": ">0", "momentum_key": "any"}
    group_hyper = {"rho": ">=0"}

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, eps: float = 1e-12,
                 momentum_key: Optional[str] = None, **kwargs) -> None:
        if momentum_key is not None and not isinstance(momentum_key, str):
            raise TypeError(f"momentum_key must be a string (a key of the base optimizer's "
                            f"per-parameter state), got {momentum_key!r}")
        super().__init__(params, base_optimizer, dict(rho=rho), dict(eps=eps,
                                                                    momentum_key=momentum_key),
                         **kwargs)

    def _check_groups(self) -> None:
        super()._check_groups()
        for group in self.param_groups:
            if isinstance(self.base_optimizer, torch.optim.SGD) and not \
                    self.momentum_key and not group.get("momentum", 0):
                raise ValueError("MomentumSAM perturbs along the base optimizer's momentum, "
                                 "but this SGD group has momentum=0; use SGD(..., "
                                 "momentum=0.9) or another base optimizer")
            if group.get("adaptive", False):
                raise ValueError("MomentumSAM has no adaptive (ASAM) neighbourhood; leave the "
                                 "group's 'adaptive' False")

    def _momentum(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        state = self.base_optimizer.state.get(p)
        if not state:
            return None
        keys = (self.momentum_key,) if self.momentum_key else MOMENTUM_KEYS
        for key in keys:
            if torch.is_tensor(state.get(key)):
                return self._dist.local(state[key])  # a DTensor's local shard under FSDP2
        raise RuntimeError(f"MomentumSAM: the base optimizer's state of a parameter has none "
                           f"of the keys {list(keys)} (it has {sorted(state)}); pass "
                           "momentum_key= naming its momentum buffer")

    def _plan(self) -> Plan:
        return Plan((False, True), inner=bool(self.base_optimizer.state))

    def _stage(self, k, slots) -> None:
        slots = self._perturbing(self._slots(self._momentum))
        if slots:  # w̃ = w − rho·v/(‖v‖ + eps): SAM's kernels with the sign flipped
            self._perturb(slots, self._weighted_sum_sq(slots), sign=-1.0)
