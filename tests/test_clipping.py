"""`max_grad_norm=`: the final gradient (after pass 2 / the decomposition) clipped by its global
L2 norm exactly as torch.nn.utils.clip_grad_norm_ would, on the device, for every algorithm."""
import copy

import pytest
import torch

from sam_kernels import SAM
from training_helpers import (ALGORITHMS, MLP, SCALE, HostReads, assert_same_tensors,
                              loss_fn, make_batches, make_closure, make_optimizer,
                              scaler_cpu)

MAX_NORM = 0.3  # below the gradient norms of the first steps, above some later ones


def train(name, batches, clip_in_base_hook=False, **kwargs):
    """Five steps with SGD + momentum in float64; optionally the oracle: no max_grad_norm,
    torch's clip_grad_norm_ in a pre-hook of the base optimizer (i.e. right before it steps,
    on the gradient it is given)."""
    torch.manual_seed(0)
    model = MLP().double()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if clip_in_base_hook:
        def clip(*_):
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        base.register_step_pre_hook(clip)
    opt = make_optimizer(name, model.parameters(), base, model=model, **kwargs)
    norms = []
    for x, y in batches:
        opt.step(make_closure(opt, model, x, y))
        norms.append(opt.last_grad_norm)
    return model, norms


@pytest.mark.parametrize("name", ALGORITHMS)
def test_clips_the_final_gradient_like_clip_grad_norm(name):
    batches = make_batches(5, dtype=torch.float64)
    ours, norms = train(name, batches, max_grad_norm=MAX_NORM)
    oracle, _ = train(name, batches, clip_in_base_hook=True)
    unclipped, _ = train(name, batches)
    for a, b in zip(ours.parameters(), oracle.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert any(float(n) > MAX_NORM for n in norms)  # clipping was active
    assert not torch.allclose(ours.fc1.weight, unclipped.fc1.weight)


def test_clipping_sees_unscaled_gradients_and_reads_nothing_on_host():
    """With a GradScaler the clip applies to the true (unscaled) gradient: the scaled run
    equals the unscaled one bit for bit. Clipping adds no host read."""
    batches = make_batches(4)
    runs = []
    for scaler in (None, scaler_cpu()):
        torch.manual_seed(0)
        model = MLP()
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                  max_grad_norm=MAX_NORM, grad_scaler=scaler)
        for x, y in batches:
            with HostReads() as reads:
                opt.step(make_closure(opt, model, x, y, scaler))
            assert reads.count == (1 if scaler is not None else 0)
            if scaler is not None:
                scaler.update()
        runs.append(model)
    assert_same_tensors(list(runs[1].parameters()), list(runs[0].parameters()), "weights")


@pytest.mark.parametrize("adaptive", [False, True])
def test_clipping_before_first_step_changes_nothing(adaptive):
    """davda54/sam #32: the perturbation rho·T²·g/‖T⊙g‖ does not depend on the length of g,
    so clipping g before first_step() leaves w + e as it was (up to eps and rounding); the
    place to clip is the final gradient, which is what max_grad_norm does."""
    torch.manual_seed(0)
    model = MLP().double()
    x, y = make_batches(1, dtype=torch.float64)[0]
    moved = []
    for clip in (False, True):
        twin = copy.deepcopy(model)
        opt = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, lr=0.1)
        loss_fn(twin, x, y).backward()
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 1e-3)
            assert norm > 1e-2  # a real cut
        opt.first_step()
        moved.append([p.detach().clone() for p in twin.parameters()])
        opt.second_step()
    for a, b in zip(*moved):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)  # eps / ‖g‖ ~ 1e-9


class OpCounter(HostReads):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return super().__torch_dispatch__(func, types, args, kwargs)


def count_step_ops(n_tensors):
    params = [torch.nn.Parameter(torch.randn(3 + i % 4, 2)) for i in range(n_tensors)]
    scaler = scaler_cpu()
    opt = SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, foreach=True,
              max_grad_norm=MAX_NORM, grad_scaler=scaler)
    for _ in range(2):  # the second step runs with warm momentum buffers
        scaler.scale(torch.ones(()))  # what scaler.scale(loss) does first: make the scale
        grads = [[torch.randn_like(p) * SCALE for p in params] for _ in range(2)]
        for p, g in zip(params, grads[0]):
            p.grad = g
        with OpCounter() as counter:
            opt.first_step()
            for p, g in zip(params, grads[1]):
                p.grad = g
            opt.second_step()
        scaler.update()
    return counter


def test_training_options_add_a_constant_number_of_dispatches():
    """Clipping and per-pass unscaling are multi-tensor too: what a step dispatches does not
    grow with the number of parameter tensors."""
    few, many = count_step_ops(3), count_step_ops(40)
    assert few.ops == many.ops
    assert many.ops.count("aten._amp_foreach_non_finite_check_and_unscale_") == 2
    assert many.count == 1  # the skip decision's one host read
