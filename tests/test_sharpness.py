"""sam_kernels.sharpness against exact answers — a quadratic with a known spectrum, a small net's
full Hessian (torch.autograd.functional.hessian + eigvalsh), SAM's sharpness and m-sharpness
written out — and every optimizer's last_surrogate_gap."""
import copy

import pytest
import torch

import sam_kernels
from sam_kernels.sharpness import hessian_top_eigenvalue, sam_sharpness
from small_model import TinyNet, make_data
from training_helpers import HostReads


class Quadratic(torch.nn.Module):
    """L(w) = ½ (w − c)ᵀ A (w − c) through a (model, loss_fn) pair: the model returns w − c."""

    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))

    def forward(self, c):
        return self.w - c


def _spd(eigs):
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("eigs", [[5.0, 2.0, 1.0, 0.5, -0.3, 0.1, 0.0],
                                  [-4.0, 1.0, 0.5, 3.0]])
def test_top_eigenvalue_of_a_quadratic(eigs):
    """Largest magnitude, sign included (the second spectrum's is negative)."""
    a = _spd(eigs)
    model = Quadratic(len(eigs))
    c = torch.randn(len(eigs), dtype=torch.float64)

    def loss_fn(r, a_):
        return 0.5 * r @ a_ @ r
    res = hessian_top_eigenvalue(model, loss_fn, (c, a), iters=500, tol=1e-12)
    expected = max(eigs, key=abs)
    assert res.converged and res.iterations < 500
    assert abs(res.value - expected) < 1e-8 * abs(expected)
    # batches: the mean of two quadratics' Hessians
    b = _spd([1.0] * len(eigs))
    two = hessian_top_eigenvalue(model, loss_fn, [(c, a), (c, 3 * b)], iters=500, tol=1e-12)
    expected2 = float(max(torch.linalg.eigvalsh((a + 3 * b) / 2), key=abs))
    assert abs(two.value - expected2) < 1e-8 * abs(expected2)


def test_top_eigenvalue_of_a_small_net_matches_the_full_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2),
                                torch.nn.BatchNorm1d(2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    loss_fn = torch.nn.functional.cross_entropy
    _ = model(x)  # running statistics away from their defaults
    before = copy.deepcopy(model.state_dict())
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    for bn in ("eval", "train"):
        def full_loss(flat):
            tensors, i = {}, 0
            for (name, p), s in zip(model.named_parameters(), shapes):
                tensors[name] = flat[i:i + p.numel()].view(s)
                i += p.numel()
            was = model.training
            model.train(bn == "train")
            sam_kernels.bn.disable_running_stats(model)
            try:
                out = torch.func.functional_call(model, tensors, (x,))
            finally:
                sam_kernels.bn.enable_running_stats(model)
                model.train(was)
            return loss_fn(out, y)
        h = torch.autograd.functional.hessian(full_loss, flat0)
        eig = torch.linalg.eigvalsh(h)
        expected = float(eig[eig.abs().argmax()])
        res = hessian_top_eigenvalue(model, loss_fn, [(x, y)], iters=2000, tol=1e-10, bn=bn)
        assert res.converged
        assert abs(res.value - expected) < 1e-6 * abs(expected), (bn, res, expected)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers
    assert model.training


def _loss_at(model, x, y, params, shift=None):
    with torch.no_grad():
        saved = [p.clone() for p in params]
        if shift is not None:
            for p, s in zip(params, shift):
                p.add_(s)
        loss = float(torch.nn.functional.cross_entropy(model(x), y))
        for p, s in zip(params, saved):
            p.copy_(s)
    return loss


@pytest.mark.parametrize("m", [None, 3])
def test_sam_sharpness_and_m_sharpness(m):
    torch.manual_seed(0)
    model = TinyNet().double().eval()
    x, y = make_data(1, torch.float64, "cpu", batch=8)[0]
    params = [p for p in model.parameters()]
    rho = 0.1
    chunks = [(x, y)] if m is None else [(x[i:i + m], y[i:i + m]) for i in range(0, 8, m)]
    gaps = []
    for xc, yc in chunks:
        loss = torch.nn.functional.cross_entropy(model(xc), yc)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        e = [rho * g / norm for g in grads]
        gaps.append(_loss_at(model, xc, yc, params, e) - _loss_at(model, xc, yc, params))
    expected = sum(gaps) / len(gaps)
    before = [p.detach().clone() for p in params]
    model.train()
    got = sam_sharpness(model, torch.nn.functional.cross_entropy, (x, y), rho, m=m)
    assert abs(got - expected) < 1e-12 * max(1.0, abs(expected))
    assert got > 0  # an ascent step on a convex-ish loss
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and model.training
    if m is not None:  # m-sharpness is a different number from the whole-batch one
        assert abs(got - sam_sharpness(model, torch.nn.functional.cross_entropy, (x, y),
                                       rho)) > 1e-6


def test_bad_input():
    model = TinyNet()
    x, y = make_data(1, torch.float32, "cpu")[0]
    ce = torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match="Invalid bn value"):
        hessian_top_eigenvalue(model, ce, (x, y), bn="frozen")
    with pytest.raises(ValueError, match="Invalid iters value"):
        hessian_top_eigenvalue(model, ce, (x, y), iters=0)
    with pytest.raises(ValueError, match="batches is empty"):
        hessian_top_eigenvalue(model, ce, [])
    with pytest.raises(ValueError, match="Invalid rho value"):
        sam_sharpness(model, ce, (x, y), rho=-1.0)
    with pytest.raises(ValueError, match="Invalid m value"):
        sam_sharpness(model, ce, (x, y), rho=0.1, m=0)


# ----------------------------------------------------------------------------- surrogate gap
def _optimizers(model):
    ps = model.parameters
    sgd = dict(lr=0.05, momentum=0.9)
    return {
        "SAM": sam_kernels.SAM(ps(), torch.optim.SGD, rho=0.05, **sgd),
        "ASAM": sam_kernels.SAM(ps(), torch.optim.SGD, rho=0.5, adaptive=True, **sgd),
        "GSAM": sam_kernels.GSAM(ps(), torch.optim.SGD, gsam_alpha=0.3, rho=0.05, **sgd),
        "GAM": sam_kernels.GAM(ps(), torch.optim.SGD, grad_rho=0.03, grad_norm_rho=0.05, **sgd),
        "VaSSO": sam_kernels.VaSSO(ps(), torch.optim.SGD, rho=0.05, theta=0.5, **sgd),
        "VaSSORe": sam_kernels.VaSSORe(ps(), torch.optim.SGD, rho=0.05, theta=0.5,
                                       criterion="naive", k=2, **sgd),
        "LookSAM": sam_kernels.LookSAM(ps(), torch.optim.SGD, k=2, **sgd),
        "FriendlySAM": sam_kernels.FriendlySAM(ps(), torch.optim.SGD, **sgd),
        "MomentumSAM": sam_kernels.MomentumSAM(ps(), torch.optim.SGD, **sgd),
        "IntervalSAM": sam_kernels.SAM(ps(), torch.optim.SGD, interval=2, **sgd),
    }


@pytest.mark.parametrize("name", list(_optimizers(TinyNet())))
def test_last_surrogate_gap(name):
    """L(w + e) − L(w) from the losses the closure returned, as a device tensor read nowhere;
    None on steps without both passes (one-pass steps, MSAM)."""
    torch.manual_seed(0)
    model = TinyNet().double()
    opt = _optimizers(model)[name]
    data = make_data(4, torch.float64, "cpu")
    one_pass_steps = 0
    for t, (x, y) in enumerate(data):
        losses = []

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.detach())
            return loss.detach()
        with HostReads() as reads:
            opt.step(closure)
        assert reads.count == 0
        gap = opt.last_surrogate_gap
        if name == "MomentumSAM" or len(losses) < 2:
            assert gap is None, (name, t)
            one_pass_steps += 1
            continue
        assert torch.is_tensor(gap) and gap.shape == () and gap.device == losses[0].device
        assert float(gap) == float(losses[1] - losses[0])
        assert float(gap) != 0.0
    periodic = ("VaSSORe", "LookSAM", "IntervalSAM", "MomentumSAM")
    assert (one_pass_steps > 0) == (name in periodic)


# ----------------------------------------------------------------------------- issue 19
class _PartlyLinear(torch.nn.Module):
    """A loss (the model's output) that is non-linear in `w`, linear in `a` (its gradient is a
    constant, not connected to the graph), and does not use `unused` at all."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
        self.a = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
        self.unused = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))

    def forward(self, x):
        return (torch.tanh(x @ self.w) ** 2).mean() + 0.5 * self.a.sum()


def _explicit_top_eigenvalue(model, batches):
    """Largest-magnitude eigenvalue of the full Hessian (zero blocks included) of the mean loss,
    by torch.autograd.functional.hessian over the flattened parameters."""
    named = list(model.named_parameters())
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(flat):
        tensors, i = {}, 0
        for name, p in named:
            tensors[name] = flat[i:i + p.numel()].view(p.shape)
            i += p.numel()
        return sum(torch.func.functional_call(model, tensors, (x,)) for x, _ in batches) / \
            len(batches)
    h = torch.autograd.functional.hessian(loss, flat0)
    assert h.shape == (flat0.numel(), flat0.numel())
    eig = torch.linalg.eigvalsh(h)
    return float(eig[eig.abs().argmax()])


@pytest.mark.parametrize("n_batches", [1, 2], ids=["one-batch", "two-batches"])
def test_top_eigenvalue_with_an_unused_and_a_linear_parameter(n_batches):
    """Issue 19: the Hessian-vector product of a parameter the loss does not use (None) or is
    linear in (a gradient not connected to the graph) raised; both are zero blocks."""
    torch.manual_seed(3)
    model = _PartlyLinear()
    batches = [(torch.randn(8, 3, dtype=torch.float64), None) for _ in range(n_batches)]
    expected = _explicit_top_eigenvalue(model, batches)
    assert abs(expected) > 1e-3  # the non-linear part gives a non-zero eigenvalue
    before = [p.detach().clone() for p in model.parameters()]
    res = hessian_top_eigenvalue(model, lambda out, _: out, batches, iters=2000, tol=1e-12)
    assert res.converged
    assert abs(res.value - expected) < 1e-6 * abs(expected), (res, expected)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_top_eigenvalue_of_a_loss_linear_in_every_parameter_is_zero():
    model = _PartlyLinear()
    x = torch.randn(4, 3, dtype=torch.float64)
    res = hessian_top_eigenvalue(model, lambda out, _: out, (x, None),
                                 params=[model.a, model.unused])
    assert res == (0.0, 1, True)
