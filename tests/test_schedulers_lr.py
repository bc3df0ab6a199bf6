"""torch LR schedulers attached to the SAM-family object or to its base optimizer give the same
training (davda54/sam #28: both share the param-group dicts), and neither attachment warns
"lr_scheduler.step() before optimizer.step()" — with step(closure) or first/second_step."""
import warnings

import pytest
import torch
from torch.optim import lr_scheduler

from training_helpers import (ALGORITHMS, MLP, assert_same_tensors, make_batches, make_closure,
                              make_optimizer, manual_step, loss_fn)

STEPS = 6
SCHEDULERS = {
    "step": lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "cosine": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    "lambda": lambda opt: lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)),
    # cycles SGD's momentum too: reads optimizer.defaults through the SAM object
    "onecycle": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=STEPS),
    "sequential": lambda opt: lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt, 0.1, total_iters=2),
              lr_scheduler.ExponentialLR(opt, 0.8)], milestones=[2]),
    "plateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
}


def train(name, scheduler_name, attach_to, api):
    """STEPS steps with warnings turned into errors; returns weights and the lr sequence."""
    torch.manual_seed(0)
    model = MLP()
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                         model=model)
    sched = SCHEDULERS[scheduler_name](opt if attach_to == "sam" else opt.base_optimizer)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in make_batches(STEPS):
            if api == "closure":
                loss = opt.step(make_closure(opt, model, x, y))
            else:
                manual_step(opt, lambda: loss_fn(model, x, y).backward())
                loss = loss_fn(model, x, y).detach()
            if scheduler_name == "plateau":
                sched.step(float(-loss if loss is not None else 0.0))  # never improves
            else:
                sched.step()
            lrs.append([g["lr"] for g in opt.base_optimizer.param_groups])
    return list(model.parameters()), lrs


@pytest.mark.parametrize("api", ["closure", "manual"])
@pytest.mark.parametrize("scheduler_name", sorted(SCHEDULERS))
def test_attached_to_sam_or_base_trains_identically(scheduler_name, api):
    w_sam, lr_sam = train("SAM", scheduler_name, "sam", api)
    w_base, lr_base = train("SAM", scheduler_name, "base", api)
    assert lr_sam == lr_base
    assert len({tuple(v) for v in lr_sam}) > 1  # the schedule did change the lr
    assert_same_tensors(w_sam, w_base, "weights")


@pytest.mark.parametrize("api", ["closure", "manual"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_steps_its_scheduler_without_warnings(name, api):
    w_sam, lr_sam = train(name, "step", "sam", api)
    w_base, lr_base = train(name, "step", "base", api)
    assert lr_sam == lr_base == [[0.1], [0.05], [0.05], [0.025], [0.025], [0.0125]]
    assert_same_tensors(w_sam, w_base, "weights")
