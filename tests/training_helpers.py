"""Shared by the training-loop tests (AMP, DDP, accumulation, clipping, LR schedulers, BatchNorm,
Lightning, compile): every SAM-family algorithm this package has, built the same way, small
models and data, and the two ways of driving a step (closure, by hand)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sam_kernels

# name -> (class name, constructor keywords besides the base optimizer's). Small rho so that
# float32 runs stay close to float64 ones; the VaSSORe criterion `naive` with k = 2 makes
# steps alternate between computing and reusing the inner gradient.
_SPECS = {
    "SAM": ("SAM", dict(rho=0.05)),
    "ASAM": ("SAM", dict(rho=0.5, adaptive=True, eta=0.01)),
    "GSAM": ("GSAM", dict(gsam_alpha=0.3, rho=0.05)),
    "GAM": ("GAM", dict(grad_rho=0.03, grad_norm_rho=0.05)),
    "VaSSO": ("VaSSO", dict(rho=0.05, theta=0.5)),
    "VaSSORe": ("VaSSORe", dict(rho=0.05, theta=0.5, criterion="naive", k=2)),
    "VaSSOReMu": ("VaSSOReMu", dict(rho=0.05, theta=0.5, criterion="naive", k=2)),
}
#: the algorithms present in this build (the parametrization of every training-loop test)
ALGORITHMS = [name for name, (cls, _) in _SPECS.items() if hasattr(sam_kernels, cls)]
#: passes (forward+backward) in one step that computes everything, by class name
PASSES = {"GAM": 4}


def make_optimizer(name, params, base=torch.optim.SGD, **kwargs):
    """Algorithm `name` over `params`; kwargs: model=, backend=, grad_scaler=,
    max_grad_norm= and the base optimizer's hyper-parameters (or base= an instance)."""
    cls_name, hyper = _SPECS[name]
    return getattr(sam_kernels, cls_name)(params, base, **hyper, **kwargs)


def passes_per_step(name):
    return PASSES.get(name, 2)


class MLP(torch.nn.Module):
    """No BatchNorm: a big batch and its micro-batches give the same mean gradient."""

    def __init__(self, n_in=6, hidden=9, n_out=4):
        super().__init__()
        self.fc1 = torch.nn.Linear(n_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class BNNet(torch.nn.Module):
    def __init__(self, n_in=6, hidden=8, n_out=4, momentum=0.1):
        super().__init__()
        self.fc1 = torch.nn.Linear(n_in, hidden, bias=False)
        self.bn = torch.nn.BatchNorm1d(hidden, momentum=momentum)
        self.fc2 = torch.nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def make_batches(steps, batch=12, n_in=6, n_out=4, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, n_in, generator=g, dtype=dtype),
             torch.randint(0, n_out, (batch,), generator=g)) for _ in range(steps)]


def loss_fn(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def make_closure(opt, model, x, y, scaler=None):
    """The torch closure contract: zero, forward, backward (loss scaled when a GradScaler is
    given), return the loss."""
    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()
    return closure


_STAGES = ("first_step", "second_step", "third_step", "fourth_step")


def manual_step(opt, run_pass):
    """One step driven by hand: `run_pass()` runs a forward+backward, accumulating into
    `.grad`; every pass is wrapped in `opt.pass_context()`; pass 1 is left out when the
    optimizer says it reuses (VaSSORe)."""
    stages = _STAGES[:passes_per_step(type(opt).__name__)]
    needs_inner = getattr(opt, "needs_inner_pass", lambda: True)()
    opt.zero_grad()
    if needs_inner:
        with opt.pass_context():
            run_pass()
    opt.first_step(zero_grad=True)
    for stage in stages[1:]:
        with opt.pass_context():
            run_pass()
        getattr(opt, stage)(zero_grad=True)


def assert_same_tensors(a, b, what):
    """Bitwise equality of two lists/dicts of tensors and plain values (same dtype; NaN ==
    NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{what}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype, \
            f"{what}: {b!r} is not a {a.dtype} tensor"
        assert torch.equal(a, b) or (a.shape == b.shape and
                                     torch.equal(a.isnan(), b.isnan()) and
                                     torch.equal(a.nan_to_num(), b.nan_to_num())), \
            f"{what} differs"
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


SCALE = 2.0 ** 12  # a power of two: scaling and unscaling are exact in floating point


def scaler_cpu(**kwargs):
    return torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10_000, **kwargs)


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor value on the host (`.item()`, `bool(t)`, ...)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class InfInjector:
    """Backward hook on one parameter: replaces its gradient with +inf in pass `at` of the
    current step (passes counted from 0 since the last reset)."""

    def __init__(self, param):
        self.calls, self.at = 0, None
        param.register_hook(self)

    def __call__(self, grad):
        k, self.calls = self.calls, self.calls + 1
        return torch.full_like(grad, float("inf")) if k == self.at else grad
