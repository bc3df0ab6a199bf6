"""Rho/LR schedulers: the seed's value sequences (hand-computed here) within [0, T_max], the
documented behaviour past T_max, positional and keyword arguments, and invalid input."""
import math

import pytest
import torch

from sam_kernels import schedulers
from sam_kernels.schedulers import (CosineScheduler, LinearScheduler, PolyScheduler,
                                    ProportionScheduler, SchedulerBase)


def run(scheduler, n):
    return [scheduler.step() for _ in range(n)]


def test_linear_with_warmup_and_hold_past_t_max():
    s = LinearScheduler(T_max=10, max_value=1.0, min_value=0.1, init_value=0.2, warmup_steps=4)
    # warmup 0.2 -> 1.0 over 4 steps; t == 4: max; then 1 - 0.9 * (t - 4) / 6 up to t = 10
    expected = [0.2, 0.4, 0.6, 0.8, 1.0, 0.85, 0.7, 0.55, 0.4, 0.25, 0.1, 0.1, 0.1]
    assert run(s, 13) == pytest.approx(expected, rel=1e-14, abs=1e-15)
    assert s.t == 13


def test_linear_without_warmup_starts_at_max():
    s = LinearScheduler(4, 2.0, 1.0)  # positional: T_max, max_value, min_value
    assert run(s, 6) == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0, 1.0], rel=1e-15)


def test_cosine_values_and_t_max_boundary():
    s = CosineScheduler(T_max=10, max_value=1.0, min_value=0.0, warmup_steps=2)
    values = run(s, 14)
    assert values[0] == 0.0 and values[1] == 0.5 and values[2] == 1.0   # warmup from 0
    # (cos(pi (t-2)/8) + 1) / 2: t=4 -> (sqrt(2)/2 + 1)/2, t=6 -> 1/2, t=8 -> (1 - sqrt(2)/2)/2
    assert values[4] == pytest.approx(0.8535533905932737, rel=1e-15)
    assert values[6] == pytest.approx(0.5, rel=1e-15)
    assert values[8] == pytest.approx(0.14644660940672624, rel=1e-14)
    assert values[10] == pytest.approx(0.0, abs=1e-16)                 # T_max: the minimum
    assert values[11:] == [values[10]] * 3                             # held, no climb back
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


def test_cosine_min_value_offset():
    s = CosineScheduler(T_max=4, max_value=3.0, min_value=1.0)
    # t=0: max; t=2: 1 + 2 * (cos(pi/2) + 1)/2 = 2; t=4: 1
    assert run(s, 6) == pytest.approx([3.0, 1 + (math.cos(math.pi / 4) + 1), 2.0,
                                       1 + (math.cos(3 * math.pi / 4) + 1), 1.0, 1.0],
                                      rel=1e-14)


def test_poly_values_keyword_and_positional_agree():
    by_keyword = PolyScheduler(T_max=16, max_value=1.0, min_value=0.0, poly_order=-0.5)
    by_position = PolyScheduler(16, 1.0, 0.0, 0.0, 0, None, -0.5)
    a, b = run(by_keyword, 19), run(by_position, 19)
    assert a == b
    # t = 0 is the end of a zero-length warmup -> max; then (t)^-0.5
    assert a[0] == 1.0 and a[1] == 1.0
    assert a[4] == pytest.approx(0.5) and a[9] == pytest.approx(1 / 3) and a[16] == 0.25
    assert a[17:] == [0.25, 0.25]                                       # held past T_max


def test_poly_with_warmup_and_min_value():
    s = PolyScheduler(T_max=20, max_value=2.0, min_value=1.0, warmup_steps=2, poly_order=-1.0)
    # warmup 0 -> 2 over 2 steps; then 1 + 1 / (t - 2)
    assert run(s, 7) == pytest.approx([0.0, 1.0, 2.0, 2.0, 1.5, 1 + 1 / 3, 1.25], rel=1e-15)


def test_scheduler_sets_lr_of_every_group():
    p, q = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q], "lr": 5.0}], lr=1.0)
    s = LinearScheduler(T_max=2, max_value=0.4, min_value=0.2, optimizer=opt)
    assert s.step() == 0.4
    assert [g["lr"] for g in opt.param_groups] == [0.4, 0.4]
    s.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.3])
    assert s.get_last_lr() == pytest.approx([0.3]) and s.lr() == pytest.approx(0.3)


def test_subclass_defines_step_func():
    class Constant(SchedulerBase):
        def step_func(self):
            return self.min_value

    s = Constant(T_max=3, max_value=5.0, min_value=2.0, warmup_steps=1)
    assert run(s, 5) == [0.0, 5.0, 2.0, 2.0, 2.0]
    with pytest.raises(NotImplementedError, match="step_func"):
        run(SchedulerBase(T_max=3, max_value=1.0), 2)


def test_proportion_follows_torch_lr_scheduler():
    p = torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.SGD([p], lr=0.1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.1 * t)
    rho = ProportionScheduler(lr_sched, max_lr=0.1, min_lr=0.0, max_value=0.5, min_value=0.1)
    got = []
    for t in range(5):
        got.append(rho.step())
        opt.step()
        lr_sched.step()
    # lr = 0.1 (1 - 0.1 t) -> rho = 0.1 + 0.4 (1 - 0.1 t)
    assert got == pytest.approx([0.5, 0.46, 0.42, 0.38, 0.34], rel=1e-12)


def test_proportion_follows_a_scheduler_of_this_module():
    lr_sched = CosineScheduler(T_max=4, max_value=1.0, min_value=0.0)
    rho = ProportionScheduler(lr_sched, 1.0, 0.0, 2.0, 1.0)
    got = []
    for _ in range(5):
        lr_sched.step()
        got.append(rho.step())
    assert got == pytest.approx([2.0, 1 + (math.cos(math.pi / 4) + 1) / 2, 1.5,
                                 1 + (math.cos(3 * math.pi / 4) + 1) / 2, 1.0], rel=1e-14)


def test_proportion_constant_lr_gives_max_value():
    p = torch.nn.Parameter(torch.randn(2))
    lr_sched = torch.optim.lr_scheduler.ConstantLR(torch.optim.SGD([p], lr=0.1), factor=1.0)
    rho = ProportionScheduler(lr_sched, 0.1, 0.1, 0.3, 0.3)
    assert run(rho, 3) == [0.3, 0.3, 0.3]


def test_state_dict_round_trip_continues_the_sequence():
    s = CosineScheduler(T_max=10, max_value=1.0, min_value=0.1, warmup_steps=3)
    run(s, 5)
    saved = s.state_dict()
    expected = run(s, 8)
    fresh = CosineScheduler(T_max=10, max_value=1.0, min_value=0.1, warmup_steps=3)
    fresh.load_state_dict(saved)
    assert run(fresh, 8) == expected


@pytest.mark.parametrize("kwargs, match", [
    (dict(T_max=10, max_value=0.1, min_value=0.5), "max_value=0.1 is below min_value=0.5"),
    (dict(T_max=5, max_value=1.0, warmup_steps=5), "Invalid T_max"),
    (dict(T_max=0, max_value=1.0), "Invalid T_max"),
    (dict(T_max=10, max_value=1.0, warmup_steps=-1), "Invalid warmup_steps"),
    (dict(T_max=10, max_value=float("nan")), "Invalid max_value"),
    (dict(T_max=10, max_value=1.0, init_value=float("inf")), "Invalid init_value"),
])
@pytest.mark.parametrize("cls", [LinearScheduler, CosineScheduler, PolyScheduler])
def test_invalid_bounds_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_invalid_poly_order_and_proportion_bounds_raise():
    with pytest.raises(ValueError, match="Invalid poly_order"):
        PolyScheduler(T_max=10, max_value=1.0, poly_order=0.5)
    lr_sched = LinearScheduler(T_max=10, max_value=1.0)
    with pytest.raises(ValueError, match="max_lr=0.0 is below min_lr=0.1"):
        ProportionScheduler(lr_sched, max_lr=0.0, min_lr=0.1, max_value=1.0, min_value=0.0)
    with pytest.raises(ValueError, match="max_value=0.1 is below min_value=0.2"):
        ProportionScheduler(lr_sched, max_lr=1.0, min_lr=0.0, max_value=0.1, min_value=0.2)
    with pytest.raises(ValueError, match="set max_value == min_value"):
        ProportionScheduler(lr_sched, max_lr=1.0, min_lr=1.0, max_value=0.2, min_value=0.1)
    with pytest.raises(TypeError, match="get_last_lr"):
        ProportionScheduler(object(), max_lr=1.0, min_lr=0.0, max_value=0.2, min_value=0.1)


def test_module_exports():
    assert set(schedulers.__all__) == {"SchedulerBase", "LinearScheduler", "CosineScheduler",
                                       "PolyScheduler", "ProportionScheduler"}
