"""GAM against an independent per-tensor float64 implementation of the seed's four-pass step
(xxgege/GAM's code) on a small conv net with BatchNorm, on every (backend, device); the three
step APIs agree; three parameter-sized buffers; the op count per step does not grow with the
number of parameter tensors and nothing is read on the host; bad input raises and changes
nothing."""
import copy
from types import SimpleNamespace

import pytest
import torch
from algorithms import held_buffers

from sam_kernels import GAM
from sam_kernels.schedulers import CosineScheduler, LinearScheduler
from test_gsam import (BASES, STEPS, FrozenBuffers, Interrupted, OpCounter, assert_models_close,
                       assert_unchanged, grads_at_current_weights, loss_fn, make_problem, mlp,
                       orth_combine_like_seed, perturb_like_seed, set_final_grads, snapshot)

HYPER = dict(grad_beta_1=0.3, grad_beta_2=-0.7, grad_beta_3=0.8, grad_gamma=0.2)


def reference_gam_step(model, base, x, y, grad_rho, grad_norm_rho, adaptive, eta=0.0,
                       eps=1e-12, grad_beta_1=0.1, grad_beta_2=0.9, grad_beta_3=0.9,
                       grad_gamma=0.05):
    loss, g0 = grads_at_current_weights(model, x, y)
    w = [p.detach().clone() for p in model.parameters()]
    perturb_like_seed(model, w, g0, grad_rho, adaptive, eta, eps)                # w1
    with FrozenBuffers(model):
        _, g1 = grads_at_current_weights(model, x, y)
        h0 = [a - b for a, b in zip(g1, g0)]
        perturb_like_seed(model, w, h0, grad_norm_rho, adaptive, eta, eps)       # w2
        _, g2 = grads_at_current_weights(model, x, y)
        w2 = [p.detach().clone() for p in model.parameters()]
        perturb_like_seed(model, w2, g2, grad_rho, adaptive, eta, eps)           # w3
        _, g3 = grads_at_current_weights(model, x, y)
    m = [a + abs(grad_beta_2) * b for a, b in zip(g0, g2)]
    d = [grad_beta_1 * a + grad_beta_3 * b for a, b in zip(g1, g3)]
    set_final_grads(model, w, orth_combine_like_seed(m, d, grad_gamma, eps))
    base.step()
    return loss


@pytest.mark.parametrize("base_name, adaptive", [("sgd", False), ("adamw", True)],
                         ids=["sgd-sam", "adamw-asam"])
def test_gam_matches_per_tensor_reference(backend_device, base_name, adaptive):
    backend, device = backend_device
    model, batches = make_problem(device)
    ref = copy.deepcopy(model)
    base_cls, base_kwargs = BASES[base_name]
    eta = 0.01 if adaptive else 0.0
    scale = 4.0 if adaptive else 1.0  # ASAM's neighbourhood is measured relative to |w|
    opt = GAM(model.parameters(), base_cls(model.parameters(), **base_kwargs), model=model,
              grad_rho_scheduler=LinearScheduler(T_max=STEPS, max_value=0.06 * scale,
                                                 min_value=0.02 * scale),
              grad_norm_rho_scheduler=CosineScheduler(T_max=STEPS, max_value=0.2 * scale,
                                                      min_value=0.1 * scale),
              adaptive=adaptive, eta=eta, backend=backend, args=SimpleNamespace(**HYPER))
    ref_base = base_cls(ref.parameters(), **base_kwargs)
    ref_rho = LinearScheduler(T_max=STEPS, max_value=0.06 * scale, min_value=0.02 * scale)
    ref_norm_rho = CosineScheduler(T_max=STEPS, max_value=0.2 * scale, min_value=0.1 * scale)
    for k in range(STEPS):
        x, y = batches[k % len(batches)]
        opt.set_closure(loss_fn, x, y)
        outputs, loss = opt.step()
        ref_loss = reference_gam_step(ref, ref_base, x, y, ref_rho.step(), ref_norm_rho.step(),
                                      adaptive, eta, **HYPER)
        assert outputs.shape == (8, 3)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        opt.update_rho_t()
    assert not opt.perturbed
    assert_models_close(model, ref, rtol=2e-5, atol=2e-6)
    # parameter-sized buffers between steps: the copy of w and g1 (g0, turned into m, is the
    # first pass's own gradient tensor, taken over for the step)
    assert held_buffers(opt) == 2


def test_three_step_apis_agree(backend_device):
    backend, device = backend_device
    model_a, batches = make_problem(device)
    model_b, model_c = copy.deepcopy(model_a), copy.deepcopy(model_a)
    base_cls, base_kwargs = BASES["sgd"]
    opts = [GAM(m.parameters(), base_cls, m, grad_rho=0.05, grad_norm_rho=0.1, backend=backend,
                **HYPER, **base_kwargs) for m in (model_a, model_b, model_c)]
    for k in range(2):
        x, y = batches[k]
        opts[0].set_closure(loss_fn, x, y)
        _, loss_a = opts[0].step()

        def closure():
            opts[1].zero_grad()
            loss = loss_fn(model_b(x), y)
            loss.backward()
            return loss

        loss_b = opts[1].step(closure)
        manual = opts[2]
        with manual.pass_context():
            loss_c = loss_fn(model_c(x), y)
            loss_c.backward()
        for stage in (manual.first_step, manual.second_step, manual.third_step):
            stage(zero_grad=True)
            with manual.pass_context():  # BatchNorm frozen while perturbed
                loss_fn(model_c(x), y).backward()
        manual.fourth_step(zero_grad=True)
        assert torch.equal(loss_a, loss_b) and torch.equal(loss_b, loss_c.detach())
    for a, b, c in zip(*(m.state_dict().values() for m in (model_a, model_b, model_c))):
        assert torch.equal(a, b) and torch.equal(a, c)


def _count_step_ops(n_layers, backend, device):
    model = mlp(n_layers, device)
    opt = GAM(model.parameters(), torch.optim.SGD, model, backend=backend, lr=0.1,
              momentum=0.9, foreach=True)
    x = torch.randn(4, 5, device=device)
    for _ in range(2):  # the first SGD step creates its momentum buffers tensor by tensor
        counter = OpCounter()
        for stage in (opt.first_step, opt.second_step, opt.third_step, opt.fourth_step):
            model(x).square().mean().backward()
            with counter:
                stage(zero_grad=True)
    return counter.ops


def test_ops_per_step_do_not_grow_with_tensor_count_and_no_host_reads(backend_device):
    backend, device = backend_device
    small, large = _count_step_ops(1, backend, device), _count_step_ops(6, backend, device)
    assert small == large, (small, large)
    assert not any("_local_scalar_dense" in op or "item" in op for op in small), small
    assert sum(small.values()) > 0


def test_args_namespace_supplies_the_seed_names():
    p = torch.nn.Parameter(torch.randn(3))
    args = SimpleNamespace(grad_beta_1=0.2, grad_beta_2=0.5, grad_beta_3=0.6, grad_gamma=0.1,
                           grad_rho=0.04, unrelated=1)
    opt = GAM([p], torch.optim.SGD, args=args, grad_norm_rho=0.3, lr=0.1)
    assert (opt.grad_beta_1, opt.grad_beta_2, opt.grad_beta_3, opt.grad_gamma) == \
        (0.2, 0.5, 0.6, 0.1)
    assert (opt.grad_rho, opt.grad_norm_rho) == (0.04, 0.3)
    plain = GAM([p], torch.optim.SGD, lr=0.1)  # documented defaults
    assert (plain.grad_rho, plain.grad_norm_rho, plain.grad_beta_1, plain.grad_beta_2,
            plain.grad_beta_3, plain.grad_gamma) == (0.03, 0.2, 0.1, 0.9, 0.9, 0.05)
    assert opt.update_rho_t() == (0.04, 0.3)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(grad_beta_1=float("nan")), ValueError, "Invalid grad_beta_1 value: nan"),
    (dict(grad_beta_2=float("inf")), ValueError, "Invalid grad_beta_2 value: inf"),
    (dict(grad_beta_3=-float("inf")), ValueError, "Invalid grad_beta_3 value"),
    (dict(grad_gamma=float("inf")), ValueError, "Invalid grad_gamma value"),
    (dict(grad_gamma=-0.1), ValueError, "Invalid grad_gamma value"),
    (dict(grad_rho=-0.1), ValueError, "Invalid grad_rho value"),
    (dict(grad_norm_rho=float("nan")), ValueError, "Invalid grad_norm_rho value"),
    (dict(args=SimpleNamespace(grad_beta_1=float("nan"))), ValueError,
     "Invalid grad_beta_1 value"),
    (dict(grad_gamma=0.1, args=SimpleNamespace(grad_gamma=0.2)), ValueError, "give it once"),
    (dict(perturb_eps=0.0), ValueError, "Invalid eps value"),
    (dict(grad_reduce="avg"), ValueError, "Invalid grad_reduce value"),
    (dict(grad_rho_scheduler=0.05), TypeError, "grad_rho_scheduler must have a step"),
])
def test_invalid_hyper_parameters_raise(kwargs, error, match):
    model, _ = make_problem("cpu")
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.raises(error, match=match):
        GAM(model.parameters(), torch.optim.SGD, model, lr=0.1, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_non_finite_beta_set_later_raises_before_anything_changes():
    model, batches = make_problem("cpu")
    opt = GAM(model.parameters(), torch.optim.SGD, model, lr=0.1, momentum=0.9)
    opt.grad_beta_3 = float("nan")
    opt.set_closure(loss_fn, *batches[0])
    loss_fn(model(batches[0][0]), batches[0][1]).backward()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="Invalid grad_beta_3 value: nan"):
        opt.first_step()
    assert_unchanged(before, snapshot(model, opt))
    assert not opt.perturbed


def test_step_without_closure_or_set_closure_raises_and_changes_nothing():
    model, batches = make_problem("cpu")
    opt = GAM(model.parameters(), torch.optim.SGD, model, lr=0.1, momentum=0.9)
    loss_fn(model(batches[0][0]), batches[0][1]).backward()
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"before set_closure\(\)"):
        opt.step()
    assert_unchanged(before, snapshot(model, opt))


def test_call_order_is_checked(backend_device):
    backend, device = backend_device
    model, batches = make_problem(device)
    opt = GAM(model.parameters(), torch.optim.SGD, model, backend=backend, lr=0.1)
    x, y = batches[0]
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"out of order \(last completed: none\)"):
        opt.second_step()
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"last completed: first_step\(\)"):
        opt.third_step()
    with pytest.raises(RuntimeError, match="call second_step"):
        opt.first_step()
    opt.second_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"last completed: second_step\(\)"):
        opt.fourth_step()
    # a pass where a parameter has no gradient: clear error, weights back to w exactly
    loss_fn(model(x), y).backward()
    model.fc.bias.grad = None
    with pytest.raises(RuntimeError, match="differ from those of the first pass"):
        opt.third_step()
    assert not opt.perturbed
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_exception_in_a_later_pass_restores_weights(backend_device):
    backend, device = backend_device
    model, batches = make_problem(device)
    opt = GAM(model.parameters(), torch.optim.SGD, model, grad_rho=0.2, grad_norm_rho=0.5,
              backend=backend, lr=0.1, momentum=0.9)
    x, y = batches[0]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted  # during the pass at w2
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Interrupted):
        opt.step(closure)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert not opt.perturbed and model.bn.track_running_stats
    opt.set_closure(loss_fn, x, y)
    opt.step()  # a fresh step starts at first_step again
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_state_dict_round_trip_keeps_rho_schedules():
    model, batches = make_problem("cpu")
    twin = copy.deepcopy(model)

    def build(m):
        return GAM(m.parameters(), torch.optim.SGD, m, lr=0.05, momentum=0.9,
                   grad_rho_scheduler=LinearScheduler(T_max=10, max_value=0.1, min_value=0.01),
                   grad_norm_rho_scheduler=LinearScheduler(T_max=10, max_value=0.3))

    opt, opt2 = build(model), build(twin)
    for k in range(2):
        opt.set_closure(loss_fn, *batches[k])
        opt.step()
        opt.update_rho_t()
    twin.load_state_dict(model.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert (opt2.grad_rho, opt2.grad_norm_rho) == (opt.grad_rho, opt.grad_norm_rho)
    for o in (opt, opt2):
        o.set_closure(loss_fn, *batches[2])
        o.step()
    assert opt.update_rho_t() == opt2.update_rho_t() != (0.1, 0.3)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_grad_scaler_run_equals_unscaled_run():
    model, batches = make_problem("cpu")
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaled = GAM(model.parameters(), torch.optim.SGD, model, lr=0.05, momentum=0.9,
                 grad_scaler=scaler, **HYPER)
    plain = GAM(twin.parameters(), torch.optim.SGD, twin, lr=0.05, momentum=0.9, **HYPER)
    for k in range(2):  # each of the four passes unscaled once; power-of-two scaling is exact
        for o in (scaled, plain):
            o.set_closure(loss_fn, *batches[k])
            o.step()
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 10
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
