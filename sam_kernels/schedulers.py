"""Step-wise value schedulers for rho (and the learning rate), as in juntang-zhuang/GSAM's
gsam/scheduler.py: within steps [0, T_max] every scheduler returns the seed's value sequence.

Deliberate differences from the seed (see docs/gsam_gam.md):
- past ``T_max`` the value holds at its ``T_max`` value (``min_value`` for Linear and Cosine),
  where the seed's linear schedule goes below ``min_value`` and its cosine climbs back up;
- every argument works by keyword and by position (the seed's ``PolyScheduler`` takes its first
  positional argument as ``poly_order``);
- invalid bounds raise ``ValueError`` instead of being accepted (or asserted away under -O);
- ``ProportionScheduler`` reads the learning rate of the first param group from a torch LR
  scheduler's ``get_last_lr()`` (the seed subtracts a float from the list it returns).
"""
import math
import numbers
from typing import Any, Dict, Optional

import torch

__all__ = ["SchedulerBase", "LinearScheduler", "CosineScheduler", "PolyScheduler",
           "ProportionScheduler"]


def _check_finite(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or \
            not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number)")
    return value


def _check_bounds(max_value: float, min_value: float) -> None:
    if max_value < min_value:
        raise ValueError(f"Invalid min_value/max_value: max_value={max_value!r} is below "
                         f"min_value={min_value!r}; the schedule decays from max_value to "
                         "min_value, so max_value >= min_value is required")


class _StateMixin:
    """get_last_lr()/lr() like torch's LR schedulers, and a state dict without the optimizer."""

    _last_value: float

    def get_last_lr(self):
        """The last value as a one-element list (torch.optim.lr_scheduler's API), so a
        ProportionScheduler can follow a scheduler of this module too."""
        return [self._last_value]

    def lr(self) -> float:
        return self._last_value

    def state_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("optimizer", "pytorch_lr_scheduler")}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.__dict__.update(state_dict)


class SchedulerBase(_StateMixin):
    """A value schedule over steps t = 0, 1, 2, ...: linear warmup from ``init_value`` to
    ``max_value`` over ``warmup_steps`` steps, ``max_value`` at t = warmup_steps, then
    ``step_func()`` up to t = T_max, then the T_max value held.

    Subclass it and define ``step_func(self)``, which reads ``self.t`` (in
    (warmup_steps, T_max]), ``self.warmup_steps``, ``self.total_steps`` (= T_max),
    ``self.max_value`` and ``self.min_value``, as with the seed.

    Args:
        T_max: the step at which the schedule ends (> warmup_steps).
        max_value: the value at the end of the warmup.
        min_value: the value the schedule decays to (<= max_value).
        init_value: the value at t = 0 when warming up.
        warmup_steps: number of linear warmup steps (>= 0).
        optimizer: if given, ``step()`` sets every param group's ``lr`` to the value (an LR
            schedule); otherwise it only returns the value (a rho schedule).
    """

    def __init__(self, T_max: float, max_value: float, min_value: float = 0.0,
                 init_value: float = 0.0, warmup_steps: float = 0,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        for name, value in (("T_max", T_max), ("max_value", max_value),
                            ("min_value", min_value), ("init_value", init_value),
                            ("warmup_steps", warmup_steps)):
            _check_finite(name, value)
        if warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps value: {warmup_steps!r} (must be >= 0)")
        if T_max <= warmup_steps:
            raise ValueError(f"Invalid T_max value: {T_max!r}; the schedule needs "
                             f"T_max > warmup_steps (= {warmup_steps!r})")
        _check_bounds(max_value, min_value)
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (something with "
                            f"param_groups) or None, got {optimizer!r}")
        self.t = 0
        self.min_value = min_value
        self.max_value = max_value
        self.init_value = init_value
        self.warmup_steps = warmup_steps
        self.total_steps = T_max
        self.optimizer = optimizer
        self._last_value = init_value

    def step(self) -> float:
        """The value at the current step t, then t += 1 (and every group's lr set to it when
        an optimizer was given)."""
        if self.t < self.warmup_steps:
            value = self.init_value + (self.max_value - self.init_value) * self.t / \
                self.warmup_steps
        elif self.t == self.warmup_steps:
            value = self.max_value
        elif self.t <= self.total_steps:
            value = self.step_func()
        else:
            value = self._value_at_end()
        self.t += 1
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = value
        self._last_value = value
        return value

    def _value_at_end(self) -> float:
        """step_func() evaluated at t = T_max: what the schedule holds after its end."""
        t = self.t
        self.t = self.total_steps
        try:
            return self.step_func()
        finally:
            self.t = t

    def step_func(self) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define step_func(), the value "
                                  "for warmup_steps < t <= T_max")


class LinearScheduler(SchedulerBase):
    """max_value + (min_value - max_value) · (t - W) / (T_max - W) after the warmup."""

    def step_func(self) -> float:
        return self.max_value + (self.min_value - self.max_value) * \
            (self.t - self.warmup_steps) / (self.total_steps - self.warmup_steps)


class CosineScheduler(SchedulerBase):
    """min_value + (max_value - min_value) · (cos(π (t - W) / (T_max - W)) + 1) / 2."""

    def step_func(self) -> float:
        phase = (self.t - self.warmup_steps) / (self.total_steps - self.warmup_steps) * math.pi
        return self.min_value + (self.max_value - self.min_value) * (math.cos(phase) + 1.0) / 2.0


class PolyScheduler(SchedulerBase):
    """min_value + (max_value - min_value) · (t - W) ** poly_order, poly_order <= 0.

    ``poly_order`` comes last, so positional arguments mean what they mean for the other
    schedulers (the seed takes it first)."""

    def __init__(self, T_max: float, max_value: float, min_value: float = 0.0,
                 init_value: float = 0.0, warmup_steps: float = 0,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 poly_order: float = -0.5) -> None:
        _check_finite("poly_order", poly_order)
        if poly_order > 0:
            raise ValueError(f"Invalid poly_order value: {poly_order!r} (must be <= 0 so that "
                             "the value decreases with the steps)")
        super().__init__(T_max, max_value, min_value, init_value, warmup_steps, optimizer)
        self.poly_order = poly_order

    def step_func(self) -> float:
        return self.min_value + (self.max_value - self.min_value) * \
            (self.t - self.warmup_steps) ** self.poly_order


class ProportionScheduler(_StateMixin):
    """A value that follows a learning-rate schedule proportionally:
    (value - min_value) / (max_value - min_value) = (lr - min_lr) / (max_lr - min_lr),
    and ``max_value`` when ``max_lr == min_lr`` (then ``max_value == min_value`` is required).

    ``pytorch_lr_scheduler`` is a ``torch.optim.lr_scheduler`` scheduler or one of this module
    (both have ``get_last_lr()``; the first group's lr is used), or any object with an
    ``optimizer`` whose first param group's ``lr`` is read. Step it after the LR scheduler.
    """

    def __init__(self, pytorch_lr_scheduler: Any, max_lr: float, min_lr: float,
                 max_value: float, min_value: float) -> None:
        for name, value in (("max_lr", max_lr), ("min_lr", min_lr), ("max_value", max_value),
                            ("min_value", min_value)):
            _check_finite(name, value)
        if max_lr < min_lr:
            raise ValueError(f"Invalid min_lr/max_lr: max_lr={max_lr!r} is below "
                             f"min_lr={min_lr!r}")
        _check_bounds(max_value, min_value)
        if max_lr == min_lr and max_value != min_value:
            raise ValueError(f"Invalid max_value/min_value: the lr bounds are equal "
                             f"({max_lr!r}), so the lr is constant and the value must be too; "
                             f"set max_value == min_value (got {max_value!r} and {min_value!r})")
        if not (hasattr(pytorch_lr_scheduler, "get_last_lr") or
                hasattr(getattr(pytorch_lr_scheduler, "optimizer", None), "param_groups")):
            raise TypeError(f"pytorch_lr_scheduler must have get_last_lr() or an optimizer "
                            f"with param_groups, got {pytorch_lr_scheduler!r}")
        self.t = 0
        self.pytorch_lr_scheduler = pytorch_lr_scheduler
        self.max_lr = max_lr
        self.min_lr = min_lr
        self.max_value = max_value
        self.min_value = min_value
        self._last_value = max_value

    def _current_lr(self) -> float:
        sched = self.pytorch_lr_scheduler
        if hasattr(sched, "get_last_lr"):
            lr = sched.get_last_lr()
            if isinstance(lr, (list, tuple)):
                lr = lr[0]
        else:
            lr = sched.optimizer.param_groups[0]["lr"]
        return float(lr)

    def step(self) -> float:
        self.t += 1
        if self.max_lr > self.min_lr:
            value = self.min_value + (self.max_value - self.min_value) * \
                (self._current_lr() - self.min_lr) / (self.max_lr - self.min_lr)
        else:
            value = self.max_value
        self._last_value = value
        return value
