"""SAM / ASAM against an independent per-tensor implementation, call order, bad input,
checkpointing, and what a step dispatches."""
import copy
import math

import pytest
import torch

from sam_kernels import SAM
from small_model import OpCounter, TinyNet, loss_fn, make_data
from small_model import params_of as _params


def split_groups(model, rho, adaptive, eta):
    """The ASAM recipe: biases and norm layers in a non-adaptive group."""
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 or n == "unused"]
    rest = [p for n, p in model.named_parameters() if not (p.dim() > 1 or n == "unused")]
    return [dict(params=decay, rho=rho, adaptive=adaptive, eta=eta),
            dict(params=rest, rho=rho * 0.5, adaptive=False, eta=0.0)]


# ----------------------------------------------------------------------------- the oracle
def reference_sam_run(model, groups_of, make_base, data, eps):
    """davda54's algorithm written per tensor in float64, with BatchNorm running statistics
    saved and put back around the perturbed pass."""
    groups = groups_of(model)
    base = make_base([dict(params=g["params"]) for g in groups])
    bn_buffers = [b for name, b in model.named_buffers()]
    for x, y in data:
        for p in model.parameters():
            p.grad = None
        loss_fn(model, x, y).backward()
        with torch.no_grad():
            sq = 0.0
            for g in groups:
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    t = (p.double().abs() + g["eta"]) if g["adaptive"] else 1.0
                    sq += float(((t * p.grad.double()) ** 2).sum())
            norm = math.sqrt(sq)
            old = {}
            for g in groups:
                scale = g["rho"] / (norm + eps)
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    t2 = (p.double().abs() + g["eta"]) ** 2 if g["adaptive"] else 1.0
                    old[p] = p.detach().clone()
                    p.copy_(p.double() + scale * t2 * p.grad.double())
        saved = [b.clone() for b in bn_buffers]
        for p in model.parameters():
            p.grad = None
        loss_fn(model, x, y).backward()
        with torch.no_grad():
            for b, s in zip(bn_buffers, saved):
                b.copy_(s)
            for p, w in old.items():
                p.copy_(w)
        base.step()
    return model


def our_sam_run(model, groups_of, make_base_cls, base_kwargs, data, eps, backend, api):
    opt = SAM(groups_of(model), make_base_cls, eps=eps, backend=backend, model=model,
              **base_kwargs)
    for x, y in data:
        if api == "closure":
            def closure():
                opt.zero_grad()
                loss = loss_fn(model, x, y)
                loss.backward()
                return loss
            opt.step(closure)
        else:
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.first_step(zero_grad=True)
            from sam_kernels import bn
            bn.disable_running_stats(model)
            loss_fn(model, x, y).backward()
            bn.enable_running_stats(model)
            opt.second_step(zero_grad=True)
    return model


VARIANTS = {
    "sam": lambda m: [dict(params=list(m.parameters()), rho=0.05, adaptive=False, eta=0.0)],
    "asam_eta0": lambda m: [dict(params=list(m.parameters()), rho=0.5, adaptive=True, eta=0.0)],
    "asam_eta0.01_mixed": lambda m: split_groups(m, rho=0.5, adaptive=True, eta=0.01),
}
BASES = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("base_name", sorted(BASES))
def test_matches_per_tensor_loop_float64(backend_device, variant, base_name):
    backend, device = backend_device
    steps, eps = 20, 1e-12
    torch.manual_seed(0)
    model = TinyNet().double().to(device)
    twin = copy.deepcopy(model)
    data = make_data(steps, torch.float64, device)
    base_cls, kwargs = BASES[base_name]
    groups_of = VARIANTS[variant]
    reference_sam_run(twin, groups_of, lambda groups: base_cls(groups, **kwargs), data, eps)
    our_sam_run(model, groups_of, base_cls, kwargs, data, eps, backend, api="closure")
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"{name} differs")
    assert torch.equal(model.unused, twin.unused)  # never had a gradient: never moved


def test_first_second_step_api_float32(backend_device):
    backend, device = backend_device
    torch.manual_seed(0)
    model = TinyNet().to(device)
    twin = copy.deepcopy(model)
    data = make_data(20, torch.float32, device)
    groups_of = VARIANTS["asam_eta0.01_mixed"]
    kwargs = dict(lr=0.05, momentum=0.9)
    reference_sam_run(twin, groups_of, lambda g: torch.optim.SGD(g, **kwargs), data, 1e-12)
    our_sam_run(model, groups_of, torch.optim.SGD, kwargs, data, 1e-12, backend, api="manual")
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} differs")


# ----------------------------------------------------------------------------- semantics
def test_step_returns_first_pass_loss_and_perturbs_at_the_right_point(backend_device):
    backend, device = backend_device
    w = _params((5,), device=device)[0]
    target = torch.randn(5, device=device)
    seen = []

    def closure():
        w.grad = None
        loss = ((w - target) ** 2).sum()
        seen.append(w.detach().clone())
        loss.backward()
        return loss.detach()

    start = w.detach().clone()
    opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.1, backend=backend)
    loss = opt.step(closure)
    g = 2 * (start.double() - target.double())
    e = 0.1 * g / g.norm()
    torch.testing.assert_close(loss, ((start - target) ** 2).sum())
    assert torch.equal(seen[0], start)
    torch.testing.assert_close(seen[1].double(), start.double() + e, rtol=1e-6, atol=1e-6)
    g_p = 2 * (start.double() + e - target.double())
    torch.testing.assert_close(w.detach().double(), start.double() - 0.1 * g_p,
                               rtol=1e-6, atol=1e-6)


def test_restore_is_exact_and_storage_is_stable(backend_device):
    backend, device = backend_device
    ps = _params((7, 3), (11,), (1,), device=device)
    before = [p.detach().clone() for p in ps]
    ptrs = [p.data_ptr() for p in ps]
    opt = SAM(ps, torch.optim.SGD, rho=0.3, lr=0.0, backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p) * 1e3
    opt.first_step()
    assert not any(torch.equal(p, b) for p, b in zip(ps, before))
    opt.second_step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))  # bitwise, lr = 0
    assert [p.data_ptr() for p in ps] == ptrs


def test_zero_gradient_gives_no_perturbation_and_no_nan(backend_device):
    backend, device = backend_device
    ps = _params((4, 4), (3,), device=device)
    before = [p.detach().clone() for p in ps]
    for adaptive in (False, True):
        opt = SAM(ps, torch.optim.SGD, rho=0.05, adaptive=adaptive, lr=0.1, backend=backend)
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.first_step()
        assert all(torch.equal(p, b) for p, b in zip(ps, before))
        opt.second_step()
        assert all(torch.equal(p, b) for p, b in zip(ps, before))


def test_missing_gradients(backend_device):
    """No grad in pass 1: not perturbed. Grad in pass 1 but not pass 2: still restored."""
    backend, device = backend_device
    a, b, c = _params((6,), (5,), (4,), device=device)
    opt = SAM([a, b, c], torch.optim.SGD, rho=0.2, lr=0.0, backend=backend)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    start = [t.detach().clone() for t in (a, b, c)]
    opt.first_step(zero_grad=True)
    assert not torch.equal(a, start[0]) and not torch.equal(b, start[1])
    assert torch.equal(c, start[2])
    a.grad = torch.randn_like(a)  # b gets no gradient at w+e
    opt.second_step()
    assert all(torch.equal(t, s) for t, s in zip((a, b, c), start))


def test_per_group_rho_and_shared_param_groups(backend_device):
    backend, device = backend_device
    a, b = _params((8,), (8,), device=device)
    opt = SAM([dict(params=[a], rho=0.1), dict(params=[b], rho=0.0)], torch.optim.SGD, lr=0.1,
              backend=backend)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["rho"] == 0.0
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    b0 = b.detach().clone()
    opt.first_step()
    assert torch.equal(b, b0)  # rho = 0: no move
    opt.second_step()
    opt.param_groups[0]["lr"] = 0.5  # seen by the base optimizer: same dicts
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_base_optimizer_instance(backend_device):
    backend, device = backend_device
    ps = _params((3, 3), (3,), device=device)
    base = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    opt = SAM(ps, base, rho=0.05, backend=backend)
    assert opt.base_optimizer is base and opt.param_groups is base.param_groups
    assert opt.param_groups[0]["rho"] == 0.05 and opt.param_groups[0]["momentum"] == 0.9


# ----------------------------------------------------------------------------- checkpointing
def test_resume_reproduces_uninterrupted_run_bit_exactly(backend_device):
    backend, device = backend_device
    torch.manual_seed(0)
    data = make_data(12, torch.float32, device)

    def make(model):
        return SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, backend=backend,
                   model=model)

    def train(model, opt, batches):
        for x, y in batches:
            def closure():
                opt.zero_grad()
                loss = loss_fn(model, x, y)
                loss.backward()
                return loss
            opt.step(closure)

    model = TinyNet().to(device)
    opt = make(model)
    train(model, opt, data[:6])
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, data[6:])

    resumed = TinyNet().to(device)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert len(opt2.base_optimizer.state) > 0  # AdamW moments came back (davda54/sam #73)
    train(resumed, opt2, data[6:])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(rho=-0.1), "Invalid rho value"),
    (dict(rho=float("nan")), "Invalid rho value"),
    (dict(eps=0.0), "Invalid eps value"),
    (dict(eps=-1e-12), "Invalid eps value"),
    (dict(eta=-0.01), "Invalid eta value"),
])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAM(_params((3,)), torch.optim.SGD, lr=0.1, **kwargs)


def test_invalid_group_value_is_caught_before_anything_moves(backend_device):
    backend, device = backend_device
    ps = _params((5,), device=device)
    with pytest.raises(ValueError, match="Invalid rho value"):
        SAM([dict(params=ps, rho=-1.0)], torch.optim.SGD, lr=0.1, backend=backend)
    opt = SAM(ps, torch.optim.SGD, lr=0.1, backend=backend)
    ps[0].grad = torch.randn_like(ps[0])
    opt.param_groups[0]["rho"] = -0.5  # e.g. a buggy scheduler
    before = ps[0].detach().clone()
    with pytest.raises(ValueError, match="Invalid rho value"):
        opt.first_step()
    assert torch.equal(ps[0], before) and not opt.perturbed


def test_call_order_errors_change_nothing(backend_device):
    backend, device = backend_device
    ps = _params((4,), device=device)
    opt = SAM(ps, torch.optim.SGD, lr=0.1, backend=backend)
    ps[0].grad = torch.randn_like(ps[0])
    before = ps[0].detach().clone()
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    assert torch.equal(ps[0], before)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    assert torch.equal(ps[0], before)
    opt.first_step()
    perturbed = ps[0].detach().clone()
    with pytest.raises(RuntimeError, match="while the weights are perturbed"):
        opt.first_step()
    assert torch.equal(ps[0], perturbed)
    with pytest.raises(RuntimeError, match="while the weights are perturbed"):
        opt.state_dict()
    opt.second_step()


def test_closure_failure_in_second_pass_restores_weights(backend_device):
    backend, device = backend_device
    ps = _params((6,), device=device)
    opt = SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom at w+e")
        opt.zero_grad()
        loss = (ps[0] ** 2).sum()
        loss.backward()
        return loss

    before = ps[0].detach().clone()
    with pytest.raises(KeyError, match="boom"):
        opt.step(closure)
    assert torch.equal(ps[0], before) and not opt.perturbed
    assert len(opt.base_optimizer.state) == 0  # the base optimizer never stepped


def test_base_instance_over_other_parameters():
    a, b = _params((3,), (3,))
    with pytest.raises(ValueError, match="different parameters"):
        SAM([a], torch.optim.SGD([a, b], lr=0.1))
    with pytest.raises(TypeError, match="extra keyword arguments"):
        SAM([a], torch.optim.SGD([a], lr=0.1), lr=0.2)
    with pytest.raises(TypeError, match="base_optimizer must be"):
        SAM([a], "sgd", lr=0.1)


def test_sparse_gradients_rejected_and_nothing_changes(backend_device):
    backend, device = backend_device
    emb = torch.nn.Embedding(10, 3, sparse=True).to(device)
    dense = torch.nn.Parameter(torch.randn(3, device=device))
    opt = SAM([dense, emb.weight], torch.optim.SGD, lr=0.1, backend=backend)
    (emb(torch.tensor([1, 2], device=device)).sum() + dense.sum()).backward()
    before = [dense.detach().clone(), emb.weight.detach().clone()]
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.first_step()
    assert torch.equal(dense, before[0]) and torch.equal(emb.weight, before[1])
    assert not opt.perturbed


def test_parameters_on_several_devices():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match="several devices"):
        SAM([a, b], torch.optim.SGD, lr=0.1)


# ----------------------------------------------------------------------------- dispatch counts
def _count_step_ops(n_tensors, backend, device, adaptive):
    ps = _params(*[(3 + i % 5, 2) for i in range(n_tensors)], device=device)
    opt = SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, foreach=True, adaptive=adaptive,
              backend=backend)
    for _ in range(2):  # the second step runs with warm state (momentum buffers exist)
        for p in ps:
            p.grad = torch.randn_like(p)
        with OpCounter() as counter:
            opt.first_step()
            opt.second_step()
    return counter.ops


@pytest.mark.parametrize("adaptive", [False, True])
def test_dispatches_bounded_and_no_host_reads(backend_device, adaptive):
    backend, device = backend_device
    few = _count_step_ops(3, backend, device, adaptive)
    many = _count_step_ops(40, backend, device, adaptive)
    assert len(few) == len(many), (few, many)
    assert len(many) < 40
    assert "aten._local_scalar_dense" not in many


def test_parameter_data_replaced_between_steps(backend_device):
    """Backup buffers are cached per parameter list; swapping a parameter's .data for a
    tensor of another shape must still give an exact restore."""
    backend, device = backend_device
    ps = _params((4, 3), (5,), device=device)
    opt = SAM(ps, torch.optim.SGD, rho=0.1, lr=0.0, backend=backend)
    for shape in [(4, 3), (2, 7)]:
        with torch.no_grad():
            ps[0].data = torch.randn(*shape, device=device)
        before = [p.detach().clone() for p in ps]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.first_step()
        assert not torch.equal(ps[0], before[0])
        opt.second_step()
        assert all(torch.equal(p, b) for p, b in zip(ps, before))
