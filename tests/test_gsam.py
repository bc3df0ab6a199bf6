"""GSAM against an independent per-tensor float64 implementation on a small conv net with
BatchNorm, on every (backend, device); alpha = 0 equals SAM; the three step APIs agree; the op
count per step does not grow with the number of parameter tensors and nothing is read on the
host; bad input raises and changes nothing; the DDP gradient average is bucketed."""
import collections
import copy
import math

import pytest
import torch
from algorithms import held_buffers
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sam_kernels import GSAM, SAM
from sam_kernels.optim.distributed import all_reduce_grads_
from sam_kernels.schedulers import LinearScheduler

STEPS = 20
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
}


# ---------------------------------------------------------------------- shared test pieces
class TinyConvNet(torch.nn.Module):
    """conv -> BatchNorm -> relu -> pool -> linear: 5 parameter tensors, 131 elements."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)  # BatchNorm follows
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_problem(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyConvNet().to(device)
    batches = [(torch.randn(8, 3, 6, 6, generator=gen).to(device),
                torch.randint(0, 3, (8,), generator=gen).to(device)) for _ in range(4)]
    return model, batches


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs, targets)


def grads_at_current_weights(model, x, y):
    """zero -> forward -> backward; (loss, float64 copies of the gradients)."""
    for p in model.parameters():
        p.grad = None
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.detach().double().clone() for p in model.parameters()]


def global_norm(ts):
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


def perturb_like_seed(model, weights, dirs, rho, adaptive, eta, eps):
    """w <- w + rho / (||T d|| + eps) * T^2 * d, per tensor, in float64."""
    ts = [(w.double().abs() + eta) if adaptive else torch.ones_like(w, dtype=torch.float64)
          for w in weights]
    scale = rho / (global_norm([t * d for t, d in zip(ts, dirs)]) + eps)
    with torch.no_grad():
        for p, w, t, d in zip(model.parameters(), weights, ts, dirs):
            p.copy_(w.double() + scale * t * t * d)


def orth_combine_like_seed(m, d, gamma, eps):
    """d - gamma * (m - cos * ||m|| * d / (||d|| + eps)), cos = <m,d> / (||d|| ||m|| + eps)."""
    inner = sum(float((a * b).sum()) for a, b in zip(m, d))
    m_norm, d_norm = global_norm(m), global_norm(d)
    cos = inner / (d_norm * m_norm + eps)
    return [di - gamma * (mi - cos * m_norm * di / (d_norm + eps)) for mi, di in zip(m, d)]


class FrozenBuffers:
    """Reference for 'BatchNorm statistics frozen': every buffer put back after the pass."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = [b.clone() for b in self.model.buffers()]

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, s in zip(self.model.buffers(), self.saved):
                b.copy_(s)


def set_final_grads(model, weights, grads):
    with torch.no_grad():
        for p, w, g in zip(model.parameters(), weights, grads):
            p.copy_(w)
            p.grad = g.to(p.dtype)


def assert_models_close(model, ref, rtol, atol):
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched while active (aten and sam_kernels custom ops)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def mlp(n_layers, device):
    layers = [torch.nn.Linear(5, 5) for _ in range(n_layers)]
    return torch.nn.Sequential(*layers).to(device)


def snapshot(model, opt):
    """Weights and buffers, gradients, base optimizer state tensors: copies."""
    return ([t.detach().clone() for t in model.state_dict().values()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [v.clone() for s in opt.base_optimizer.state.values() for v in s.values()
             if torch.is_tensor(v)])


def assert_unchanged(before, after):
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    for a, b in zip(before[1], after[1]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert len(before[2]) == len(after[2])
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2]))


# ---------------------------------------------------------------------- reference GSAM
def reference_gsam_step(model, base, x, y, rho, alpha, adaptive, eta=0.0, eps=1e-12):
    loss, g = grads_at_current_weights(model, x, y)
    weights = [p.detach().clone() for p in model.parameters()]
    perturb_like_seed(model, weights, g, rho, adaptive, eta, eps)
    with FrozenBuffers(model):
        _, g_p = grads_at_current_weights(model, x, y)
    set_final_grads(model, weights, orth_combine_like_seed(g, g_p, alpha, eps))
    base.step()
    return loss


@pytest.mark.parametrize("base_name, adaptive", [("sgd", False), ("adamw", True)],
                         ids=["sgd-sam", "adamw-asam"])
def test_gsam_matches_per_tensor_reference(backend_device, base_name, adaptive):
    backend, device = backend_device
    model, batches = make_problem(device)
    ref = copy.deepcopy(model)
    base_cls, base_kwargs = BASES[base_name]
    eta = 0.01 if adaptive else 0.0
    rho_max, rho_min, alpha = (0.5, 0.1, 0.3) if adaptive else (0.1, 0.02, 0.3)
    opt = GSAM(model.parameters(), base_cls(model.parameters(), **base_kwargs), model=model,
               gsam_alpha=alpha, adaptive=adaptive, eta=eta, backend=backend,
               rho_scheduler=LinearScheduler(T_max=STEPS, max_value=rho_max, min_value=rho_min))
    ref_base = base_cls(ref.parameters(), **base_kwargs)
    for k in range(STEPS):
        x, y = batches[k % len(batches)]
        opt.set_closure(loss_fn, x, y)
        outputs, loss = opt.step()
        rho_k = rho_max + (rho_min - rho_max) * k / STEPS
        ref_loss = reference_gsam_step(ref, ref_base, x, y, rho_k, alpha, adaptive, eta)
        assert outputs.shape == (8, 3) and not outputs.requires_grad
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert opt.update_rho_t() == pytest.approx(rho_max + (rho_min - rho_max) * (k + 1)
                                                   / STEPS)
    assert not opt.perturbed
    # measured: ~3e-7 relative after 20 steps; alpha off by 0.01 or rho_t one step late: >2e-3
    assert_models_close(model, ref, rtol=2e-5, atol=2e-6)
    # parameter-sized buffers between steps: the copy of w (the gradient at w is the pass's
    # own gradient tensor, taken over for the step)
    assert held_buffers(opt) == 1


def test_gsam_alpha_zero_equals_sam_step_for_step(backend_device):
    backend, device = backend_device
    model, batches = make_problem(device)
    twin = copy.deepcopy(model)
    base_cls, base_kwargs = BASES["sgd"]
    gsam = GSAM(model.parameters(), base_cls, model=model, gsam_alpha=0.0, rho=0.08,
                backend=backend, **base_kwargs)
    sam = SAM(twin.parameters(), base_cls, rho=0.08, backend=backend, model=twin, **base_kwargs)
    for k in range(6):
        x, y = batches[k % len(batches)]

        def closure(m=model, opt=gsam):
            opt.zero_grad()
            loss = loss_fn(m(x), y)
            loss.backward()
            return loss

        def twin_closure(m=twin, opt=sam):
            opt.zero_grad()
            loss = loss_fn(m(x), y)
            loss.backward()
            return loss

        assert torch.equal(gsam.step(closure), sam.step(twin_closure))
        for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
            assert torch.equal(a, b)


def test_three_step_apis_agree(backend_device):
    backend, device = backend_device
    model_a, batches = make_problem(device)
    model_b, model_c = copy.deepcopy(model_a), copy.deepcopy(model_a)
    base_cls, base_kwargs = BASES["adamw"]
    opts = [GSAM(m.parameters(), base_cls, m, 0.2, None, rho=0.1, backend=backend, **base_kwargs)
            for m in (model_a, model_b, model_c)]
    for k in range(3):
        x, y = batches[k]
        opts[0].set_closure(loss_fn, x, y)
        _, loss_a = opts[0].step()

        def closure():
            opts[1].zero_grad()
            loss = loss_fn(model_b(x), y)
            loss.backward()
            return loss

        loss_b = opts[1].step(closure)
        with opts[2].pass_context():
            loss_c = loss_fn(model_c(x), y)
            loss_c.backward()
        opts[2].first_step(zero_grad=True)
        with opts[2].pass_context():  # BatchNorm frozen at w + e, as the other two APIs do
            loss_fn(model_c(x), y).backward()
        opts[2].second_step(zero_grad=True)
        assert torch.equal(loss_a, loss_b) and torch.equal(loss_b, loss_c.detach())
    for a, b, c in zip(*(m.state_dict().values() for m in (model_a, model_b, model_c))):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_seed_style_closure_returning_outputs_and_loss(backend_device):
    backend, device = backend_device
    model, batches = make_problem(device)
    opt = GSAM(model.parameters(), torch.optim.SGD, model, 0.1, backend=backend, lr=0.1)
    x, y = batches[0]

    def seed_closure():
        opt.zero_grad()
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        return out, loss.detach()

    out, loss = opt.step(seed_closure)
    assert out.shape == (8, 3) and loss.ndim == 0


# ---------------------------------------------------------------------- kernel count, host reads
def _count_step_ops(n_layers, backend, device):
    model = mlp(n_layers, device)
    opt = GSAM(model.parameters(), torch.optim.SGD, model, 0.2, rho=0.05, backend=backend,
               lr=0.1, momentum=0.9, foreach=True)
    x = torch.randn(4, 5, device=device)
    counts = []
    for _ in range(2):  # the first SGD step creates its momentum buffers tensor by tensor
        model(x).square().mean().backward()
        with OpCounter() as c1:
            opt.first_step(zero_grad=True)
        model(x).square().mean().backward()
        with OpCounter() as c2:
            opt.second_step(zero_grad=True)
        counts.append(c1.ops + c2.ops)
    return counts[-1]


def test_ops_per_step_do_not_grow_with_tensor_count_and_no_host_reads(backend_device):
    backend, device = backend_device
    small, large = _count_step_ops(1, backend, device), _count_step_ops(6, backend, device)
    assert small == large, (small, large)
    assert not any("_local_scalar_dense" in op or "item" in op for op in small), small
    assert sum(small.values()) > 0


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(gsam_alpha=-0.1), ValueError, "Invalid alpha value: -0.1"),
    (dict(gsam_alpha=float("nan")), ValueError, "Invalid alpha value"),
    (dict(gsam_alpha=0.1, rho=-1.0), ValueError, "Invalid rho value"),
    (dict(gsam_alpha=0.1, perturb_eps=0.0), ValueError, "Invalid eps value"),
    (dict(gsam_alpha=0.1, eta=-0.5), ValueError, "Invalid eta value"),
    (dict(gsam_alpha=0.1, grad_reduce="max"), ValueError, "Invalid grad_reduce value"),
    (dict(gsam_alpha=0.1, rho_scheduler=0.05), TypeError, "rho_scheduler must have a step"),
    (dict(), TypeError, "GSAM needs alpha \\(the seed's gsam_alpha\\)"),
])
def test_invalid_hyper_parameters_raise(kwargs, error, match):
    model = TinyConvNet()
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.raises(error, match=match):
        GSAM(model.parameters(), torch.optim.SGD, model, lr=0.1, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_rho_scheduler_with_max_below_min_raises():
    with pytest.raises(ValueError, match="max_value=0.01 is below min_value=0.1"):
        LinearScheduler(T_max=100, max_value=0.01, min_value=0.1)


def test_scheduler_returning_a_negative_rho_raises_and_keeps_rho():
    class Bad:
        def step(self):
            return -1.0

    model = TinyConvNet()
    opt = GSAM(model.parameters(), torch.optim.SGD, model, 0.1, rho=0.05, lr=0.1)
    opt.rho_scheduler = Bad()
    with pytest.raises(ValueError, match="Invalid rho_t value: -1.0"):
        opt.update_rho_t()
    assert opt.rho_t == 0.05


def test_step_without_closure_or_set_closure_raises_and_changes_nothing():
    model, batches = make_problem("cpu")
    opt = GSAM(model.parameters(), torch.optim.SGD, model, 0.1, lr=0.1, momentum=0.9)
    loss_fn(model(batches[0][0]), batches[0][1]).backward()
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"before set_closure\(\)"):
        opt.step()
    assert_unchanged(before, snapshot(model, opt))
    assert not opt.perturbed


def test_set_closure_needs_the_model():
    p = torch.nn.Parameter(torch.randn(3))
    opt = GSAM([p], torch.optim.SGD, gsam_alpha=0.1, lr=0.1)
    with pytest.raises(ValueError, match="needs it"):
        opt.set_closure(loss_fn, torch.randn(1), torch.zeros(1))


def test_call_order_is_checked(backend_device):
    backend, device = backend_device
    model, batches = make_problem(device)
    opt = GSAM(model.parameters(), torch.optim.SGD, model, 0.1, backend=backend, lr=0.1)
    x, y = batches[0]
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    loss_fn(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="call second_step"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="call second_step"):
        opt.state_dict()


class Interrupted(Exception):
    pass


def test_exception_in_perturbed_pass_restores_weights(backend_device):
    backend, device = backend_device
    model, batches = make_problem(device)
    opt = GSAM(model.parameters(), torch.optim.SGD, model, 0.1, rho=0.5, backend=backend,
               lr=0.1, momentum=0.9)
    x, y = batches[0]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted  # e.g. Ctrl-C or an OOM during the pass at w + e
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    weights = [p.detach().clone() for p in model.parameters()]
    bn_stats = model.bn.running_mean.clone()
    with pytest.raises(Interrupted):
        opt.step(closure)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert not opt.perturbed and model.bn.track_running_stats
    assert not torch.equal(bn_stats, model.bn.running_mean)  # pass 1 did update them
    opt.set_closure(loss_fn, x, y)
    opt.step()  # usable afterwards


def test_state_dict_round_trip_keeps_rho_schedule_and_base_state():
    model, batches = make_problem("cpu")
    twin = copy.deepcopy(model)

    def build(m):
        return GSAM(m.parameters(), torch.optim.SGD, m, 0.2, lr=0.05, momentum=0.9,
                    rho_scheduler=LinearScheduler(T_max=10, max_value=0.1, min_value=0.01))

    opt, opt2 = build(model), build(twin)
    for k in range(3):
        opt.set_closure(loss_fn, *batches[k])
        opt.step()
        opt.update_rho_t()
    twin.load_state_dict(model.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save + torch.load
    assert opt2.rho_t == opt.rho_t and opt2.rho_scheduler.t == opt.rho_scheduler.t == 4
    for o, m in ((opt, model), (opt2, twin)):
        o.set_closure(loss_fn, *batches[3])
        o.step()
        o.update_rho_t()
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- DDP averaging
@pytest.fixture
def gloo_group(tmp_path):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_all_reduce_grads_is_bucketed_and_exact(gloo_group, monkeypatch):
    tensors = [torch.randn(7, 3), torch.randn(5, dtype=torch.float64), torch.randn(300),
               torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last),
               torch.randn(11, dtype=torch.float64), torch.randn(0)]
    expected = [t.clone() for t in tensors]
    calls = []
    real = gloo_group.all_reduce
    monkeypatch.setattr(gloo_group, "all_reduce",
                        lambda t, *a, **k: calls.append(t.numel()) or real(t, *a, **k))
    all_reduce_grads_(tensors, average=True, bucket_bytes=1024)  # fp32: 21 + 300 | 96 + 0
    # 2 fp32 buckets (the 1 KiB cap closes the first after 321 floats) + 1 fp64 bucket
    assert sorted(calls) == sorted([21 + 300, 96 + 0, 5 + 11])
    for t, e in zip(tensors, expected):  # one rank: the mean is the tensor itself
        assert torch.equal(t, e) and t.stride() == e.stride()


def test_gsam_under_single_rank_ddp_matches_plain(gloo_group):
    model, batches = make_problem("cpu")
    plain_model = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = GSAM(ddp.parameters(), torch.optim.SGD, ddp, 0.2, rho=0.05, lr=0.05, momentum=0.9)
    plain = GSAM(plain_model.parameters(), torch.optim.SGD, plain_model, 0.2, rho=0.05,
                 lr=0.05, momentum=0.9)
    assert opt._dist.name == "ddp" and plain._dist.name == "single"
    for k in range(3):
        for o in (opt, plain):
            o.set_closure(loss_fn, *batches[k])
            o.step()
    for a, b in zip(model.state_dict().values(), plain_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- GradScaler
def test_grad_scaler_run_equals_unscaled_run_and_skips_on_inf():
    model, batches = make_problem("cpu")
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled = GSAM(model.parameters(), torch.optim.SGD, model, 0.3, rho=0.1, lr=0.05,
                  momentum=0.9, grad_scaler=scaler)
    plain = GSAM(twin.parameters(), torch.optim.SGD, twin, 0.3, rho=0.1, lr=0.05, momentum=0.9)
    for k in range(3):  # power-of-two scaling and unscaling are exact
        scaled.set_closure(loss_fn, *batches[k])
        scaled.step()
        scaler.update()
        plain.set_closure(loss_fn, *batches[k])
        plain.step()
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    x, y = batches[3]
    calls = []

    def closure():
        calls.append(1)
        scaled.zero_grad()
        loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        if len(calls) == 2:  # an overflow in the pass at w + e
            model.fc.weight.grad[0, 0] = float("inf")
        return loss

    weights = [p.detach().clone() for p in model.parameters()]
    before = snapshot(model, scaled)
    scaled.step(closure)
    scaler.update()
    after = snapshot(model, scaled)
    # the update is skipped: weights and momentum as they were (pass 1 still moved the
    # BatchNorm statistics, as it would without SAM)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert len(before[2]) == 5 and all(torch.equal(a, b) for a, b in zip(before[2], after[2]))
    assert scaler.get_scale() == 2.0 ** 11
