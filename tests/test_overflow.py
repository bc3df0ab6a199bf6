"""fp32 gradients near 1e19: Σg² exceeds fp32's range (3.4e38). Every backend squares and sums
in fp64 and returns float64 (see docs/ops.md), so the norm is finite and the optimizers behave:
GSAM/GAM used to turn the weights into NaN even with lr=0, SAM/VaSSO silently skipped the
perturbation (a 0 scale from an inf norm)."""
import pytest
import torch

from sam_kernels.optim import GAM, GSAM, SAM, VaSSO

SCALE = 3e19  # |g| per element; Σg² over 40 elements ~ 4e40 > fp32 max


def _problem(device):
    torch.manual_seed(7)
    w = torch.nn.Parameter(torch.randn(8, 5, device=device))
    # loss = Σ c·w: the gradient is c wherever w is, fp32 values of magnitude ~SCALE
    c = (torch.randn(8, 5, dtype=torch.float64) * SCALE).to(torch.float32).to(device)
    return w, c


def _make(name, w, backend):
    if name == "SAM":
        return SAM([w], torch.optim.SGD, rho=0.05, backend=backend, lr=0.0)
    if name == "GSAM":
        return GSAM([w], torch.optim.SGD, None, 0.1, rho=0.05, backend=backend, lr=0.0)
    if name == "GAM":
        return GAM([w], torch.optim.SGD, backend=backend, lr=0.0)
    return VaSSO([w], torch.optim.SGD, rho=0.05, theta=1.0, backend=backend, lr=0.0)


@pytest.mark.parametrize("name", ["SAM", "GSAM", "GAM", "VaSSO"])
def test_huge_finite_gradients_give_finite_weights_and_a_real_perturbation(backend_device, name):
    backend, device = backend_device
    w, c = _problem(device)
    start = w.detach().clone()
    assert not torch.isfinite((c.double() ** 2).sum().float()), "the case must overflow fp32"
    opt = _make(name, w, backend)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(w.detach().clone())
        loss = (w * c).sum()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
        assert torch.isfinite(w).all(), f"{name}: non-finite weights after a step"
        # lr = 0: the base step moves nothing, and the perturbation is undone exactly
        assert torch.equal(w.detach(), start), f"{name}: weights moved with lr=0"
    perturbed = [p for p in seen if not torch.equal(p, start)]
    assert perturbed, f"{name}: no pass saw perturbed weights (the perturbation was skipped)"
    if name in ("SAM", "GSAM"):
        # e = rho · g / ‖g‖ with ‖g‖ from float64 maths (eps is negligible here)
        g = c.double().cpu()
        e = 0.05 * g / g.square().sum().sqrt()
        got = perturbed[0].double().cpu() - start.double().cpu()
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6)
