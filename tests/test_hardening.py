"""Optimizer-level hardening (issue 12): a failed step leaves nothing moved, duplicate
parameters, a rejected param group, hyper-parameter types, the three-pass trap of
`loss.backward(); step(closure)`, and `skip_nonfinite=True`."""
import copy

import numpy as np
import pytest
import torch

from sam_kernels import SAM
from training_helpers import (ALGORITHMS, BNNet, HostReads, InfInjector, assert_same_tensors,
                              loss_fn, make_batches, make_closure, make_optimizer,
                              passes_per_step)


class _FailOnCall:
    """A backend module whose `perturb_` raises from call number `n` on (from 1; the
    optimizer retries a call that raises ValueError once) and passes the earlier calls to
    the real backend."""

    def __init__(self, real, n):
        self._real, self._n, self.calls = real, n, 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def perturb_(self, *args):
        self.calls += 1
        if self.calls >= self._n:
            raise ValueError("injected failure")
        return self._real.perturb_(*args)


def test_failed_perturbation_of_a_later_group_leaves_every_weight_as_it_was(backend_device):
    """Issue 12 item 1: the first group's kernel ran, the second one raised; the first group
    must be put back, bit for bit, and the next step must equal an uninterrupted one."""
    backend, device = backend_device
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, device=device))
    w = torch.nn.Parameter(torch.randn(5, 3, device=device))
    x = torch.randn(3, 3, device=device)

    def build(a, w):
        return SAM([dict(params=[a]), dict(params=[w], rho=0.1)], torch.optim.SGD, lr=0.1,
                   backend=backend)

    def closure_for(opt, a, w):
        def closure():
            opt.zero_grad()
            loss = a.square().sum() + (w @ x).square().sum()
            loss.backward()
            return loss
        return closure

    twin_a, twin_w = (torch.nn.Parameter(t.detach().clone()) for t in (a, w))
    opt, twin = build(a, w), build(twin_a, twin_w)
    before = [a.detach().clone(), w.detach().clone()]
    opt._backend_module = _FailOnCall(opt._backend_module, 2)
    with pytest.raises(ValueError, match="injected failure"):
        opt.step(closure_for(opt, a, w))
    assert opt._backend_module.calls == 3  # the first group's kernel ran, the 2nd raised twice
    assert not opt.perturbed
    assert_same_tensors([a.detach(), w.detach()], before, "weights after the failed step")
    assert not opt.base_optimizer.state or all(not s for s in opt.base_optimizer.state.values())
    opt._backend_module = opt._backend_module._real
    for _ in range(2):
        opt.step(closure_for(opt, a, w))
        twin.step(closure_for(twin, twin_a, twin_w))
    assert_same_tensors([a.detach(), w.detach()], [twin_a.detach(), twin_w.detach()], "weights")


def test_duplicate_parameters_are_stepped_once(backend_device):
    """Issue 12 item 3: SAM([w, w, v]) equals SAM([w, v]); torch only warns."""
    backend, device = backend_device
    torch.manual_seed(0)
    w0, v0, x = (torch.randn(6, 5, device=device), torch.randn(5, device=device),
                 torch.randn(4, 6, device=device))
    runs = []
    for dup in (True, False):
        w, v = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(v0.clone())
        params = [w, w, v] if dup else [w, v]
        with pytest.warns(UserWarning, match="duplicate") if dup else _no_warning():
            opt = SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
        assert len(opt.param_groups[0]["params"]) == 2
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = (torch.tanh(x @ w) * v).sum()
                loss.backward()
                return loss
            opt.step(closure)
        runs.append([w.detach().clone(), v.detach().clone()])
    assert_same_tensors(runs[0], runs[1], "weights")
    assert not torch.equal(runs[1][0], w0)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", ALGORITHMS)
def test_rejected_param_group_is_not_added(name):
    """Issue 12 item 6: a group that fails validation (a negative eta; parameters on another
    device) raises and leaves the optimizer, the shared base optimizer and later steps as if
    it had never been offered."""
    model = BNNet().double()
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    groups_before = len(opt.param_groups)
    q = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    bad_groups = [{"params": [torch.nn.Parameter(torch.randn(2, device="meta"))]}]
    if type(opt).group_hyper.get("eta") == ">=0":
        bad_groups.append({"params": [q], "eta": -1.0})
    for bad in bad_groups:
        with pytest.raises(ValueError, match="Invalid eta value|several devices"):
            opt.add_param_group(bad)
        assert len(opt.param_groups) == groups_before
        assert len(opt.base_optimizer.param_groups) == groups_before
        assert opt._device == torch.device("cpu")
    x, y = make_batches(1, dtype=torch.float64)[0]
    opt.step(make_closure(opt, model, x, y))  # still steps
    opt.add_param_group({"params": [q]})  # a valid group is still accepted
    assert len(opt.param_groups) == groups_before + 1


def test_hyper_parameter_types():
    """Issue 12 item 9: real numbers of any kind (numpy scalars included) are accepted and
    mean the same as the float; tensors and bools are refused with a message naming the
    type."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    x = torch.randn(5, 4)
    runs = []
    for rho in (float(np.float32(0.05)), np.float32(0.05), np.float64(float(np.float32(0.05)))):
        w = torch.nn.Parameter(w0.clone())
        opt = SAM([w], torch.optim.SGD, rho=rho, lr=np.float32(0.1), eps=np.float64(1e-12))
        opt.step(make_closure_for(opt, w, x))
        runs.append(w.detach().clone())
    assert_same_tensors(runs[1], runs[0], "np.float32 rho")
    assert_same_tensors(runs[2], runs[0], "np.float64 rho")
    w = torch.nn.Parameter(w0.clone())
    with pytest.raises(ValueError, match=r"Invalid rho value: tensor\(0\.0500\) \(a torch\.Tensor"):
        SAM([w], torch.optim.SGD, rho=torch.tensor(0.05), lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid rho value: True \(a builtins\.bool"):
        SAM([w], torch.optim.SGD, rho=True, lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid rho value: '0\.05' \(a builtins\.str"):
        SAM([w], torch.optim.SGD, rho="0.05", lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid rho value: np.float32\(nan\) \(must be a finite number"):
        SAM([w], torch.optim.SGD, rho=np.float32("nan"), lr=0.1)


def make_closure_for(opt, w, x):
    def closure():
        opt.zero_grad()
        loss = torch.tanh(x @ w).square().sum()
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("name", ALGORITHMS)
def test_backward_before_step_closure_is_the_seeds_pass_1(name):
    """Issue 19: `loss.backward(); optimizer.step(closure)` (BingcongLi's train.py, davda54's
    README) takes those gradients as pass 1 and runs the closure only for the later passes:
    weights and BatchNorm statistics equal those of step(closure) alone (3 passes would move
    the statistics twice). A gradient cleared after the backward is no pass 1."""
    models = [BNNet().double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_optimizer(name, m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                           model=m) for m in models]
    batches = make_batches(4, dtype=torch.float64)
    for t, (x, y) in enumerate(batches):
        calls = []

        def counted(opt, model):
            inner = make_closure(opt, model, x, y)
            return lambda: calls.append(1) or inner()
        opts[0].step(counted(opts[0], models[0]))
        alone = len(calls)
        opts[1].zero_grad()
        loss_fn(models[1], x, y).backward()
        if t == 3:
            models[1].zero_grad(set_to_none=True)
        opts[1].step(counted(opts[1], models[1]))
        assert len(calls) - alone == alone - (t != 3)
        if t == 2:  # (at t = 3 the user's own forward moved the statistics once more)
            assert_same_tensors(models[0].state_dict(), models[1].state_dict(), "weights, BN")
    assert_same_tensors(list(models[0].parameters()), list(models[1].parameters()), "weights")


def test_a_hand_written_loop_is_not_refused():
    model = BNNet().double()
    opt = make_optimizer("SAM", model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    for x, y in make_batches(3, dtype=torch.float64):
        with opt.pass_context():
            loss_fn(model, x, y).backward()
        opt.first_step(zero_grad=True)
        with opt.pass_context():
            loss_fn(model, x, y).backward()
        opt.second_step()  # no zero_grad: the next step(closure) must still be allowed
    x, y = make_batches(1, dtype=torch.float64, seed=9)[0]
    opt.step(make_closure(opt, model, x, y))


def _build_nonfinite(name, skip):
    torch.manual_seed(0)
    model = BNNet().double()
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                         model=model, skip_nonfinite=skip)
    return model, opt


@pytest.mark.parametrize("where", ["first pass", "last pass"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_skip_nonfinite_skips_the_step_bit_exactly(name, where):
    """skip_nonfinite=True: a NaN gradient in any pass skips the update as the GradScaler
    path does (weights, base and own state bit-exact), counts it on the device, and what
    follows equals a run that never saw that batch."""
    batches = make_batches(5, dtype=torch.float64)
    bad = 2  # a step that runs every pass (VaSSORe recomputes at even steps)
    model, opt = _build_nonfinite(name, True)
    injector = NaNInjector(model.fc1.weight)
    twin_model, twin = _build_nonfinite(name, False)
    for t, (x, y) in enumerate(batches):
        injector.calls = 0
        if t == bad:
            injector.at = 0 if where == "first pass" else passes_per_step(name) - 1
            weights = copy.deepcopy(model.state_dict())
            state = copy.deepcopy(opt.state_dict())
            opt.step(make_closure(opt, model, x, y))
            assert injector.calls == passes_per_step(name)
            params = {k: v for k, v in model.state_dict().items() if "running" not in k
                      and "num_batches" not in k}
            assert_same_tensors(params, {k: weights[k] for k in params}, "weights after skip")
            assert_same_tensors(opt.state_dict(), state, "optimizer state after skip")
            assert int(opt.skipped_steps) == 1
            injector.at = None
            # BatchNorm statistics of the skipped forward passes are not the optimizer's;
            # give the twin the same ones
            twin_model.load_state_dict(model.state_dict())
            continue
        opt.step(make_closure(opt, model, x, y))
        twin.step(make_closure(twin, twin_model, x, y))
    assert int(opt.skipped_steps) == 1
    assert_same_tensors(model.state_dict(), twin_model.state_dict(), "model")
    assert_same_tensors(opt.state_dict()["state"], twin.state_dict()["state"], "base state")


def test_nonfinite_default_spreads_and_skip_costs_one_host_read():
    """The default (skip_nonfinite=False) does what torch optimizers do: one NaN in pass 1
    reaches every weight through the norm. With skip_nonfinite=True a step makes one host
    read (the skip decision), none with a fused base optimizer."""
    x, y = make_batches(1, dtype=torch.float64)[0]
    model, opt = _build_nonfinite("SAM", False)
    injector = NaNInjector(model.fc2.weight)
    injector.at = 0
    opt.step(make_closure(opt, model, x, y))
    assert all(torch.isnan(p).all() for p in (model.fc1.weight, model.fc2.weight))
    for kwargs, reads in ((dict(momentum=0.9), 1), (dict(momentum=0.9, fused=True), 0)):
        torch.manual_seed(0)
        model = BNNet().double()
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model,
                  skip_nonfinite=True, **kwargs)
        with HostReads() as counter:
            opt.step(make_closure(opt, model, x, y))
        assert counter.count == reads
        assert int(opt.skipped_steps) == 0


class NaNInjector(InfInjector):
    def __call__(self, grad):
        k, self.calls = self.calls, self.calls + 1
        return torch.full_like(grad, float("nan")) if k == self.at else grad
