"""Mixed precision with every algorithm: torch.amp.GradScaler (both passes scaled, each unscaled
once, inf/NaN in any pass skips the step bit-exactly and backs the scale off, no host reads
beyond GradScaler's own), bf16 autocast with bf16 parameters."""
import copy

import pytest
import torch

from sam_kernels import SAM
from training_helpers import (ALGORITHMS, MLP, SCALE, HostReads, InfInjector,
                              assert_same_tensors, loss_fn, make_batches, make_closure,
                              make_optimizer, manual_step, passes_per_step, scaler_cpu)


def one_step(opt, model, x, y, scaler, api):
    if api == "closure":
        opt.step(make_closure(opt, model, x, y, scaler))
    else:
        manual_step(opt, lambda: scaler.scale(loss_fn(model, x, y)).backward()
                    if scaler is not None else loss_fn(model, x, y).backward())
    if scaler is not None:
        scaler.update()


def build(name, scaler, base=torch.optim.AdamW, **base_kwargs):
    torch.manual_seed(0)
    model = MLP()
    opt = make_optimizer(name, model.parameters(), base, lr=0.01, model=model,
                         grad_scaler=scaler, **base_kwargs)
    return model, opt


@pytest.mark.parametrize("api", ["closure", "manual"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_scaled_passes_train_exactly_like_unscaled(name, api):
    """Loss scaling by a power of two and unscaling each pass once is exact: the weights and
    optimizer state equal those of a run without GradScaler bit for bit (a pass unscaled
    twice, or not at all, would be off by a factor SCALE)."""
    batches = make_batches(5)
    runs = []
    for scaler in (None, scaler_cpu()):
        model, opt = build(name, scaler)
        for x, y in batches:
            one_step(opt, model, x, y, scaler, api)
        runs.append((model, opt))
        if scaler is not None:
            assert scaler.get_scale() == SCALE  # no inf: no back-off
    (m0, o0), (m1, o1) = runs
    assert_same_tensors(list(m1.parameters()), list(m0.parameters()), "weights")
    assert_same_tensors(o1.state_dict()["state"], o0.state_dict()["state"], "base state")
    assert_same_tensors(o1.state_dict()["sam"], o0.state_dict()["sam"], "own state")


@pytest.mark.parametrize("where", ["first pass", "last pass"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_inf_in_a_pass_skips_the_step_bit_exactly(name, where):
    batches = make_batches(5)
    bad = 2  # a step that runs every pass (VaSSORe recomputes at even steps)
    scaler = scaler_cpu()
    model, opt = build(name, scaler)
    injector = InfInjector(model.fc1.weight)
    twin_model, twin = build(name, None)
    for t, (x, y) in enumerate(batches):
        injector.calls = 0
        if t == bad:
            injector.at = 0 if where == "first pass" else passes_per_step(name) - 1
            weights = copy.deepcopy(list(model.parameters()))
            state = copy.deepcopy(opt.state_dict())
            one_step(opt, model, x, y, scaler, "closure")
            assert injector.calls == passes_per_step(name)
            assert_same_tensors(list(model.parameters()), weights, "weights after skip")
            assert_same_tensors(opt.state_dict(), state, "optimizer state after skip")
            assert scaler.get_scale() == SCALE / 2  # backed off
            injector.at = None
            continue  # the twin never sees this batch
        one_step(opt, model, x, y, scaler, "closure")
        one_step(twin, twin_model, x, y, None, "closure")
    # the skipped step left no trace: what follows equals a run that never had it
    assert_same_tensors(list(model.parameters()), list(twin_model.parameters()), "weights")
    assert_same_tensors(opt.state_dict()["state"], twin.state_dict()["state"], "base state")


@pytest.mark.parametrize("base, kwargs, reads", [
    (torch.optim.SGD, dict(momentum=0.9), 1),
    (torch.optim.SGD, dict(momentum=0.9, fused=True), 0),
    (torch.optim.AdamW, dict(fused=True), 0),
], ids=["sgd", "sgd-fused", "adamw-fused"])
@pytest.mark.parametrize("inject", [False, True])
def test_host_reads_and_fused_base_skip_on_device(base, kwargs, reads, inject):
    """A step makes the one host read GradScaler.step() makes to decide on the skip, and none
    with a fused base optimizer, which skips on the device flag (its step counters too).
    (SGD: torch's foreach AdamW reads its step counters on the host by itself.)"""
    scaler = scaler_cpu()
    model, opt = build("SAM", scaler, base, **kwargs)
    injector = InfInjector(model.fc2.weight)
    batches = make_batches(3)
    for x, y in batches[:2]:
        injector.calls = 0
        one_step(opt, model, x, y, scaler, "closure")
    assert opt.base_optimizer.state  # warm state: moments and step counters exist
    weights = copy.deepcopy(list(model.parameters()))
    state = copy.deepcopy(opt.state_dict())
    injector.calls, injector.at = 0, (1 if inject else None)
    x, y = batches[2]
    with HostReads() as counter:
        opt.step(make_closure(opt, model, x, y, scaler))
    scaler.update()
    assert counter.count == reads
    if inject:
        assert_same_tensors(list(model.parameters()), weights, "weights after skip")
        assert_same_tensors(opt.state_dict(), state, "optimizer state after skip")
        assert scaler.get_scale() == SCALE / 2
    else:
        assert not torch.equal(model.fc1.weight, weights[0])


def test_disabled_scaler_is_a_no_op():
    batches = make_batches(3)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", enabled=False)):
        model, opt = build("SAM", scaler)
        for x, y in batches:
            one_step(opt, model, x, y, scaler, "closure")
        runs.append(model)
    assert_same_tensors(list(runs[0].parameters()), list(runs[1].parameters()), "weights")


def test_fp16_autocast_with_scaler_trains_like_float32():
    """The realistic recipe: fp16 autocast, fp32 master weights, scaled loss. Small gradients
    that would underflow in fp16 without scaling survive; the result tracks an fp32 run."""
    batches = make_batches(6)
    results = []
    for amp in (False, True):
        scaler = scaler_cpu() if amp else None
        model, opt = build("SAM", scaler)
        for x, y in batches:
            def closure():
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
                    loss = loss_fn(model, x, y)
                (scaler.scale(loss) if amp else loss).backward()
                return loss
            opt.step(closure)
            if amp:
                scaler.update()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(results[0], results[1])  # fp16 arithmetic did happen
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=5e-3)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_bf16_parameters_under_bf16_autocast(name):
    """bf16 weights and autocast: the perturbed passes see moved weights and the restore is
    exact (lr = 0 leaves every weight bit-identical)."""
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.0, model=model)
    start = copy.deepcopy(list(model.parameters()))
    seen = []
    for x, y in make_batches(3, dtype=torch.bfloat16):
        def closure():
            opt.zero_grad()
            seen.append(model.fc1.weight.detach().clone())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model, x, y)
            loss.backward()
            return loss
        opt.step(closure)
        assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in model.parameters())
    assert_same_tensors(list(model.parameters()), start, "bf16 weights after lr = 0 steps")
    assert any(not torch.equal(w, start[0]) for w in seen)  # some pass ran perturbed


def test_bf16_perturbation_matches_float64_reference():
    """SAM's move in bf16: e = rho·g/‖g‖ with the norm accumulated in fp32 over many elements,
    within one bf16 rounding of the float64 value."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3000, dtype=torch.bfloat16))
    v = torch.nn.Parameter(torch.randn(7, 5, dtype=torch.bfloat16))
    w.grad = torch.randn_like(w) * 3
    v.grad = torch.randn_like(v)
    opt = SAM([w, v], torch.optim.SGD, rho=0.5, lr=0.0)
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in (w, v)))
    expected = [(p.double() + 0.5 * p.grad.double() / norm) for p in (w, v)]
    opt.first_step()
    for p, e in zip((w, v), expected):
        torch.testing.assert_close(p.double(), e.to(torch.bfloat16).double(),
                                   rtol=2 ** -7, atol=1e-6)
    opt.second_step()


# ----------------------------------------------------------------------------- bad use
def test_missing_scaler_update_is_a_clear_error_and_changes_nothing():
    scaler = scaler_cpu()
    model, opt = build("SAM", scaler)
    (x, y), (x2, y2) = make_batches(2)
    opt.step(make_closure(opt, model, x, y, scaler))
    weights = copy.deepcopy(list(model.parameters()))
    with pytest.raises(RuntimeError, match=r"call scaler.update\(\) once after every"):
        opt.step(make_closure(opt, model, x2, y2, scaler))
    assert_same_tensors(list(model.parameters()), weights, "weights")
    assert not opt.perturbed


def test_invalid_training_options():
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        SAM(params, torch.optim.SGD, lr=0.1, grad_scaler="yes")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="Invalid max_grad_norm value"):
            SAM(params, torch.optim.SGD, lr=0.1, max_grad_norm=bad)


def test_scaled_clipped_skipping_step_on_every_backend(backend_device):
    """The whole AMP path (unscale per pass, clipping's fused norm, exact restore, skip) with
    each backend's kernels, on each device: a scaled run with an inf in one step equals an
    unscaled run that never saw that batch, bit for bit."""
    backend, device = backend_device
    batches = [(x.to(device), y.to(device)) for x, y in make_batches(4)]
    torch.manual_seed(0)
    model = MLP().to(device)
    twin_model = copy.deepcopy(model)
    scaler = torch.amp.GradScaler(device, init_scale=SCALE, growth_interval=10_000)
    opt, twin = (SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend,
                     model=m, max_grad_norm=0.3, grad_scaler=s)
                 for m, s in ((model, scaler), (twin_model, None)))
    injector = InfInjector(model.fc1.weight)
    for t, (x, y) in enumerate(batches):
        injector.calls, injector.at = 0, (1 if t == 2 else None)
        one_step(opt, model, x, y, scaler, "closure")
        if t != 2:
            one_step(twin, twin_model, x, y, None, "closure")
    assert scaler.get_scale() == SCALE / 2
    assert_same_tensors(list(model.parameters()), list(twin_model.parameters()), "weights")
