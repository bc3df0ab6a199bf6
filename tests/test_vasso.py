"""VaSSO, VaSSORe and VaSSOReMu against an independent per-tensor float64 implementation of the
issue's formulas (every criterion, both ways), the equalities with SAM and VaSSO, bad input,
host reads and dispatch counts, checkpointing and a one-process torch.distributed group."""
import copy
import functools
import math
import warnings

import pytest
import torch

import small_model
from sam_kernels import GAM, GSAM, SAM, VaSSO, VaSSORe, VaSSOReMu
from small_model import OpCounter, loss_fn
from small_model import params_of as _params
from training_helpers import assert_same_tensors

CRITERIA = ("naive", "random", "gSAMflat", "gSAMsharp", "gSAMratio", "cosSim")
# settings under which every criterion fires both ways within the 32 steps of the tests
CRITERION_KWARGS = {
    "naive": dict(k=3),
    "random": dict(p=0.5),
    "gSAMflat": dict(lam=0.5, z=1.0),
    "gSAMsharp": dict(lam=0.5, z=1.0),
    "gSAMratio": dict(lam=0.5, z=1.1, z_two=1.1),
    "cosSim": dict(c=0.0),
}
STEPS = 32
WARMUP = 2


def only_some_under_interpreter(backend, device, case, kept):
    """The Triton interpreter runs ~1 ms per program instance: on it, keep the cases in
    `kept`, which exercise every kernel the others use (those differ from them only in
    host-side logic, tested on the other backends)."""
    if backend == "triton" and device == "cpu" and case not in kept:
        pytest.skip("Triton interpreter: the same kernels run in the kept cases")


# ----------------------------------------------------------------------------- a small model
# smaller than test_sam's: these tests run 32 steps for every criterion and backend
SHAPE = dict(in_ch=2, size=4, n_out=4)
TinyNet = functools.partial(small_model.TinyNet, channels=3, **SHAPE)
make_data = functools.partial(small_model.make_data, batch=6, **SHAPE)


def two_groups(model, adaptive=False):
    """Different rho and theta per group; the adaptive variant mixes ASAM and plain groups."""
    big = [p for n, p in model.named_parameters() if p.dim() > 1 or n == "unused"]
    rest = [p for n, p in model.named_parameters() if not (p.dim() > 1 or n == "unused")]
    return [dict(params=big, rho=0.5 if adaptive else 0.1, theta=0.4, adaptive=adaptive,
                 eta=0.01 if adaptive else 0.0),
            dict(params=rest, rho=0.05, theta=0.7, adaptive=False, eta=0.0)]


BASE = (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3))


# ----------------------------------------------------------------------------- the oracle
def oracle_run(model, algo, criterion, ckw, data, eps=1e-7, adaptive=False, seed=3):
    """The issue's algorithm, per tensor, in float64: returns the recompute decisions.

    BatchNorm statistics are saved and put back around the pass at w + e exactly when the
    step also ran the pass at w (one running-stat update per step)."""
    groups = two_groups(model, adaptive)
    base = BASE[0]([dict(params=g["params"]) for g in groups], **BASE[1])
    bn_buffers = list(model.buffers())
    group_of = {p: g for g in groups for p in g["params"]}
    warmup = 0 if algo == "vasso" else WARMUP
    gen = torch.Generator().manual_seed(seed)
    ema, e, outs, tau, decisions = {}, {}, [], 0.0, []
    lam = ckw.get("lam", 0.1)
    z, z_two = ckw.get("z", 1.0), ckw.get("z_two", 0.5)

    def tensor_t(p, g):
        return (p.detach().double().abs() + g["eta"]) if g["adaptive"] else 1.0

    def new_e(params):
        norm = math.sqrt(sum(float(((tensor_t(p, group_of[p]) * ema[p]) ** 2).sum())
                             for p in params))
        return {p: group_of[p]["rho"] * tensor_t(p, group_of[p]) ** 2 * ema[p] / (norm + eps)
                for p in params}

    def update_ema(grads):
        for p, g in grads.items():
            th = group_of[p]["theta"]
            ema[p] = g.clone() if p not in ema else (1 - th) * ema[p] + th * g

    def grads_at(x, y):
        for p in model.parameters():
            p.grad = None
        loss_fn(model, x, y).backward()
        return {p: p.grad.detach().double().clone() for p in model.parameters()
                if p.grad is not None}

    for t, (x, y) in enumerate(data):
        u = torch.rand((), generator=gen, dtype=torch.float64).item()
        if criterion == "naive":
            vote = t % ckw["k"] == 0
        elif criterion == "random":
            vote = u < ckw["p"]
        elif criterion in ("gSAMflat", "gSAMsharp", "gSAMratio") and outs:
            n = math.sqrt(sum(float((g ** 2).sum()) for g in outs[-1].values()))
            flat = tau > ((1 - lam) * z + lam) * n
            sharp = tau < ((1 - lam) / (z_two if criterion == "gSAMratio" else z) + lam) * n
            vote = {"gSAMflat": flat, "gSAMsharp": sharp, "gSAMratio": flat or sharp}[criterion]
        elif criterion == "cosSim" and len(outs) >= 2:
            a, b = outs[-1], outs[-2]
            dot = sum(float((a[p] * b[p]).sum()) for p in a)
            na = math.sqrt(sum(float((a[p] ** 2).sum()) for p in a))
            nb = math.sqrt(sum(float((b[p] ** 2).sum()) for p in a))
            vote = na * nb > 0 and dot / (na * nb) <= ckw["c"]
        else:
            vote = True
        recompute = algo == "vasso" or t <= warmup or vote
        decisions.append(recompute)
        if recompute:
            update_ema(grads_at(x, y))
            e = new_e([p for p in model.parameters() if p.grad is not None])
        elif algo == "vassoremu":
            update_ema(outs[-1])
            e = new_e(list(outs[-1]))
        elif adaptive:  # reuse: the stored d and its norm at the current weights
            e = new_e(list(e))
        with torch.no_grad():
            kept = {p: p.detach().clone() for p in e}
            for p, ep in e.items():
                p.copy_(p.double() + ep)
        saved = [b.clone() for b in bn_buffers]
        outs.append(grads_at(x, y))
        with torch.no_grad():
            if recompute:
                for b, s in zip(bn_buffers, saved):
                    b.copy_(s)
            for p, w in kept.items():
                p.copy_(w)
        n = math.sqrt(sum(float((g ** 2).sum()) for g in outs[-1].values()))
        tau = (1 - lam) * tau + lam * n
        base.step()
    return decisions


def our_run(model, algo, criterion, ckw, data, backend, eps=1e-7, adaptive=False, seed=3,
            api="closure", set_to_none=True):
    cls = {"vasso": VaSSO, "vassore": VaSSORe, "vassoremu": VaSSOReMu}[algo]
    kwargs = {} if algo == "vasso" else dict(criterion=criterion, warmup_steps=WARMUP,
                                             generator=torch.Generator().manual_seed(seed),
                                             **ckw)
    opt = cls(two_groups(model, adaptive), BASE[0], eps=eps, backend=backend, model=model,
              **kwargs, **BASE[1])
    decisions, calls = [], []
    for x, y in data:
        before = opt.inner_steps
        if api == "closure":
            def closure():
                calls.append(1)
                opt.zero_grad(set_to_none=set_to_none)
                loss = loss_fn(model, x, y)
                loss.backward()
                return loss
            opt.step(closure)
        else:  # manual loop, the documented way
            inner = opt.needs_inner_pass()
            if inner:
                opt.zero_grad()
                with opt.pass_context():
                    loss_fn(model, x, y).backward()
            opt.first_step(zero_grad=True)
            with opt.pass_context():  # BatchNorm frozen at w + e only if pass 1 ran
                loss_fn(model, x, y).backward()
            opt.second_step(zero_grad=True)
        decisions.append(opt.inner_steps - before == 1)
    assert opt.steps == len(data)
    if api == "closure":
        assert len(calls) == opt.steps + opt.inner_steps  # pass 1 skipped when reusing
    return opt, decisions


def assert_same_model(model, twin, rtol=1e-9, atol=1e-11):
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"{name} differs")


CASES = [("vasso", None)] + [(a, c) for a in ("vassore", "vassoremu") for c in CRITERIA]


@pytest.mark.parametrize("algo, criterion", CASES, ids=[f"{a}-{c}" for a, c in CASES])
def test_matches_per_tensor_oracle_float64(backend_device, algo, criterion):
    backend, device = backend_device
    torch.manual_seed(0)
    model = TinyNet().double().to(device)
    twin = copy.deepcopy(model)
    data = make_data(STEPS, torch.float64, device)
    ckw = CRITERION_KWARGS.get(criterion, {})
    expected = oracle_run(twin, algo, criterion, ckw, data)
    _, got = our_run(model, algo, criterion, ckw, data, backend)
    assert got == expected
    if algo != "vasso":  # the criterion fired both ways after the warm-up
        assert set(got[WARMUP + 1:]) == {True, False}, got
    assert_same_model(model, twin)
    assert torch.equal(model.unused, twin.unused)  # never had a gradient: never moved


@pytest.mark.parametrize("algo, criterion", [("vasso", None), ("vassore", "gSAMflat"),
                                             ("vassoremu", "naive")])
def test_adaptive_matches_oracle(backend_device, algo, criterion):
    backend, device = backend_device
    only_some_under_interpreter(backend, device, algo, {"vassore"})
    torch.manual_seed(0)
    model = TinyNet().double().to(device)
    twin = copy.deepcopy(model)
    data = make_data(STEPS, torch.float64, device)
    ckw = CRITERION_KWARGS.get(criterion, {})
    expected = oracle_run(twin, algo, criterion, ckw, data, adaptive=True)
    _, got = our_run(model, algo, criterion, ckw, data, backend, adaptive=True)
    assert got == expected and (algo == "vasso" or False in got)
    assert_same_model(model, twin)


@pytest.mark.parametrize("algo", ["vassore", "vassoremu"])
def test_manual_api_equals_step_closure(backend_device, algo):
    backend, device = backend_device
    only_some_under_interpreter(backend, device, algo, {"vassoremu"})
    torch.manual_seed(0)
    model = TinyNet().to(device)
    twin = copy.deepcopy(model)
    data = make_data(12, torch.float32, device)
    ckw = CRITERION_KWARGS["gSAMflat"]
    _, a = our_run(model, algo, "gSAMflat", ckw, data, backend)
    _, b = our_run(twin, algo, "gSAMflat", ckw, data, backend, api="manual")
    assert a == b and False in a
    for (name, x), y in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(x, y), name


def test_cossim_survives_zero_grad_without_set_to_none(backend_device):
    """The seed keeps an alias of p.grad as 'the last outer gradient'; zeroing in place
    (set_to_none=False) then makes both gradients the same tensor and cos = 1 forever."""
    backend, device = backend_device
    only_some_under_interpreter(backend, device, None, set())
    torch.manual_seed(0)
    model = TinyNet().double().to(device)
    twin, oracle_twin = copy.deepcopy(model), copy.deepcopy(model)
    data = make_data(STEPS, torch.float64, device)
    ckw = CRITERION_KWARGS["cosSim"]
    _, a = our_run(model, "vassore", "cosSim", ckw, data, backend, set_to_none=False)
    _, b = our_run(twin, "vassore", "cosSim", ckw, data, backend, set_to_none=True)
    expected = oracle_run(oracle_twin, "vassore", "cosSim", ckw, data)
    assert a == b == expected and set(a[WARMUP + 1:]) == {True, False}
    assert_same_model(model, oracle_twin)


# ----------------------------------------------------------------------------- equalities
def test_vasso_theta_one_equals_sam(backend_device):
    backend, device = backend_device
    torch.manual_seed(0)
    model = TinyNet().to(device)
    twin = copy.deepcopy(model)
    data = make_data(10, torch.float32, device)
    opts = [VaSSO(model.parameters(), torch.optim.SGD, rho=0.1, theta=1.0, eps=1e-7,
                  backend=backend, model=model, lr=0.1, momentum=0.9),
            SAM(twin.parameters(), torch.optim.SGD, rho=0.1, eps=1e-7, backend=backend,
                model=twin, lr=0.1, momentum=0.9)]
    for x, y in data:
        for m, opt in zip((model, twin), opts):
            def closure():
                opt.zero_grad()
                loss = loss_fn(m, x, y)
                loss.backward()
                return loss
            opt.step(closure)
    assert_same_model(model, twin, rtol=1e-6, atol=1e-7)


def test_vassore_naive_k1_equals_vasso(backend_device):
    backend, device = backend_device
    torch.manual_seed(0)
    model = TinyNet().to(device)
    twin = copy.deepcopy(model)
    data = make_data(10, torch.float32, device)
    opts = [VaSSORe(two_groups(model), torch.optim.SGD, criterion="naive", k=1, eps=1e-7,
                    backend=backend, model=model, lr=0.1),
            VaSSO(two_groups(twin), torch.optim.SGD, backend=backend, model=twin, lr=0.1)]
    for x, y in data:
        for m, opt in zip((model, twin), opts):
            def closure():
                opt.zero_grad()
                loss = loss_fn(m, x, y)
                loss.backward()
                return loss
            opt.step(closure)
    assert opts[0].inner_steps == opts[0].steps == 10
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_two_steps_follow_the_formula_every_dtype(backend_device, dtype):
    """Step 1: d = g1; step 2: d = (1−θ)·g1 + θ·g2; w + e observed between the steps (lr = 0,
    so w never moves): e = ρ·d/(‖d‖ + eps) over all tensors."""
    backend, device = backend_device
    ps = _params((7, 3), (130,), (1,), (0,), device=device, dtype=dtype)
    start = [p.detach().double().clone() for p in ps]
    opt = VaSSO(ps, torch.optim.SGD, rho=0.3, theta=0.25, lr=0.0, backend=backend)
    grads = [[torch.randn_like(p) for p in ps] for _ in range(2)]
    d = [g.double() for g in grads[0]]
    for step, gs in enumerate(grads):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        if step == 1:
            d = [0.75 * a + 0.25 * g.double() for a, g in zip(d, gs)]
        opt.first_step()
        norm = math.sqrt(sum(float((x ** 2).sum()) for x in d))
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-6)
        for p, w, x in zip(ps, start, d):
            torch.testing.assert_close(p.detach().double(), w + 0.3 * x / (norm + 1e-7),
                                       rtol=tol, atol=tol)
        opt.second_step()
        for p, w in zip(ps, start):
            assert torch.equal(p.detach().double(), w)  # exact restore (lr = 0)


def test_reuse_applies_the_stored_perturbation_exactly(backend_device):
    """lr = 0 keeps w fixed, so a reused step must see bit-for-bit the weights of the step
    that computed e; and no pass-1 closure call happens."""
    backend, device = backend_device
    w = _params((9,), device=device)[0]
    target = torch.randn(9, device=device)
    seen = []

    def closure():
        w.grad = None
        seen.append(w.detach().clone())
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss.detach()

    opt = VaSSORe([w], torch.optim.SGD, criterion="naive", k=3, warmup_steps=0, lr=0.0,
                  backend=backend)
    results = [opt.step(closure) for _ in range(6)]
    # steps 0..5 recompute at t % 3 == 0: calls (w, w+e) (w+e) (w+e) (w, w+e) (w+e) (w+e)
    assert len(seen) == 8 and opt.inner_steps == 2 and opt.steps == 6
    at_w_plus_e = [seen[1], seen[2], seen[3], seen[5], seen[6], seen[7]]
    assert torch.equal(at_w_plus_e[1], at_w_plus_e[0]) and torch.equal(at_w_plus_e[2],
                                                                        at_w_plus_e[0])
    assert not torch.equal(at_w_plus_e[0], seen[0])
    # the step returns the loss at w + e (the pass every step has)
    torch.testing.assert_close(results[1], ((at_w_plus_e[1] - target) ** 2).sum())


def test_batchnorm_stats_update_once_per_step(backend_device):
    backend, device = backend_device
    model = TinyNet().to(device)
    data = make_data(7, torch.float32, device)
    opt = VaSSORe(model.parameters(), torch.optim.SGD, criterion="naive", k=2, lr=0.1,
                  backend=backend, model=model)
    for x, y in data:
        def closure():
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            return loss
        opt.step(closure)
    assert opt.inner_steps < opt.steps
    assert int(model.bn.num_batches_tracked) == opt.steps


def test_set_closure_returns_outputs_and_loss(backend_device):
    backend, device = backend_device
    torch.manual_seed(0)
    model = TinyNet().to(device)
    twin = copy.deepcopy(model)
    data = make_data(6, torch.float32, device)
    opt = VaSSOReMu(model.parameters(), torch.optim.SGD, criterion="naive", k=2, lr=0.1,
                    backend=backend, model=model)
    ref = VaSSOReMu(twin.parameters(), torch.optim.SGD, criterion="naive", k=2, lr=0.1,
                    backend=backend, model=twin)
    crit = torch.nn.CrossEntropyLoss()
    for x, y in data:
        opt.set_closure(crit, x, y)
        outputs, loss = opt.step()
        assert outputs.shape == (6, 4) and loss.dim() == 0 and not loss.requires_grad

        def closure():
            ref.zero_grad()
            loss = crit(twin(x), y)
            loss.backward()
            return loss
        ref_loss = ref.step(closure)
        assert torch.equal(loss, ref_loss.detach())
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_parameters_without_gradients_are_skipped(backend_device):
    backend, device = backend_device
    a, b = _params((5,), (4,), device=device)
    b_start = b.detach().clone()
    opt = VaSSOReMu([a, b], torch.optim.SGD, criterion="naive", k=2, warmup_steps=0, lr=0.1,
                    backend=backend)
    for _ in range(5):
        def closure():
            opt.zero_grad()
            loss = (a ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
    assert torch.equal(b, b_start) and "ema" not in opt.state[b]


def test_closure_failure_in_reused_step_restores_weights(backend_device):
    backend, device = backend_device
    w = _params((6,), device=device)[0]
    opt = VaSSORe([w], torch.optim.SGD, criterion="naive", k=2, warmup_steps=0, lr=0.1,
                  backend=backend)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:  # the pass at w + e of step 1, which reuses e
            raise KeyError("boom at w+e")
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    before = w.detach().clone()
    with pytest.raises(KeyError, match="boom"):
        opt.step(closure)
    assert torch.equal(w, before) and not opt.perturbed and opt.steps == 1


def test_call_order_errors_change_nothing(backend_device):
    backend, device = backend_device
    w = _params((4,), device=device)[0]
    opt = VaSSORe([w], torch.optim.SGD, criterion="gSAMflat", lr=0.1, backend=backend)
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="without a closure"):
        opt.step()
    assert torch.equal(w, before) and opt.steps == 0
    opt.first_step()
    with pytest.raises(RuntimeError, match="while the weights are perturbed"):
        opt.first_step()
    opt.second_step()
    assert opt.steps == 1 and opt.inner_steps == 1


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", [VaSSO, VaSSORe, VaSSOReMu])
@pytest.mark.parametrize("kwargs, match", [
    (dict(theta=-0.1), "Invalid theta value"),
    (dict(theta=1.5), "Invalid theta value"),
    (dict(theta=float("nan")), "Invalid theta value"),
    (dict(rho=-0.1), "Invalid rho value"),
    (dict(eps=0.0), "Invalid eps value"),
    (dict(eta=-1.0), "Invalid eta value"),
])
def test_invalid_vasso_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(_params((3,)), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize("cls", [VaSSORe, VaSSOReMu])
@pytest.mark.parametrize("kwargs, err, match", [
    (dict(k=0), ValueError, "Invalid k value"),
    (dict(k=1.5), ValueError, "Invalid k value"),
    (dict(p=-0.1), ValueError, "Invalid p value"),
    (dict(p=1.01), ValueError, "Invalid p value"),
    (dict(criterion="gSAMNormEMA"), ValueError, "Invalid criterion"),
    (dict(lam=0.0), ValueError, r"Invalid lam value.*\(0, 1\]"),
    (dict(lam=1.2), ValueError, "Invalid lam value"),
    (dict(z=0.0), ValueError, "Invalid z value"),
    (dict(z_two=-1.0), ValueError, "Invalid z_two value"),
    (dict(c=float("inf")), ValueError, "Invalid c value"),
    (dict(warmup_steps=-1), ValueError, "Invalid warmup_steps value"),
    (dict(generator=42), TypeError, "CPU torch.Generator"),
])
def test_invalid_criterion_hyperparameters(cls, kwargs, err, match):
    p = _params((3,))[0]
    with pytest.raises(err, match=match):
        cls([p], torch.optim.SGD, lr=0.1, **kwargs)
    assert p.grad is None


def test_invalid_group_theta_is_caught_before_anything_moves(backend_device):
    backend, device = backend_device
    ps = _params((5,), device=device)
    with pytest.raises(ValueError, match="Invalid theta value"):
        VaSSORe([dict(params=ps, theta=2.0)], torch.optim.SGD, lr=0.1, backend=backend)
    opt = VaSSORe(ps, torch.optim.SGD, lr=0.1, backend=backend)
    ps[0].grad = torch.randn_like(ps[0])
    opt.param_groups[0]["theta"] = -0.5  # e.g. a buggy scheduler
    before = ps[0].detach().clone()
    with pytest.raises(ValueError, match="Invalid theta value"):
        opt.first_step()
    assert torch.equal(ps[0], before) and not opt.perturbed and "ema" not in opt.state[ps[0]]
    assert opt.inner_steps == 0


def test_gsam_ratio_empty_skip_band_warns():
    with pytest.warns(UserWarning, match="empty"):
        VaSSORe(_params((3,)), torch.optim.SGD, criterion="gSAMratio", lr=0.1)  # seed defaults
    with pytest.warns(UserWarning, match="empty"):
        VaSSOReMu(_params((3,)), torch.optim.SGD, criterion="gSAMratio", z=2.0, z_two=0.5,
                  lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VaSSORe(_params((3,)), torch.optim.SGD, criterion="gSAMratio", z=1.1, z_two=1.1, lr=0.1)
        VaSSORe(_params((3,)), torch.optim.SGD, criterion="gSAMflat", lr=0.1)


def test_set_closure_needs_model():
    opt = VaSSORe(_params((3,)), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="model"):
        opt.set_closure(torch.nn.functional.mse_loss, torch.randn(3), torch.randn(3))


# ----------------------------------------------------------------------------- host reads, ops
def _count_steps(cls, criterion, replicas, backend, device, steps=14):
    """Ops per step of first_step + second_step around given gradients (the passes are the
    user's), the decision taken inside the counted region. The parameters are `replicas`
    copies of three tensors with replicated gradients, so the criteria's cosines are the same
    and their norms scale alike: every run takes the same decisions."""
    torch.manual_seed(0)
    shapes = [(3, 2), (4, 2), (5, 2)]
    ps = _params(*(shapes * replicas), device=device)
    opt = cls(ps, torch.optim.SGD, lr=0.01, momentum=0.9, foreach=True, criterion=criterion,
              warmup_steps=WARMUP, backend=backend, **CRITERION_KWARGS[criterion])
    gen = torch.Generator().manual_seed(5)
    common = [torch.randn(s, generator=gen) for s in shapes]
    counts, decisions = [], []
    for _ in range(steps):
        # a common direction of random sign plus noise: cosines of either sign, norms
        # around their mean
        sign = 1.0 if torch.rand((), generator=gen) < 0.5 else -1.0
        inner, outer = ([(sign * c + 0.8 * torch.randn(c.shape, generator=gen)).to(device)
                         for c in common] * replicas for _ in range(2))
        inner, outer = [g.clone() for g in inner], [g.clone() for g in outer]
        with OpCounter() as counter:
            if opt.needs_inner_pass():
                for p, g in zip(ps, inner):
                    p.grad = g
            opt.first_step()
            for p, g in zip(ps, outer):
                p.grad = g
            opt.second_step()
        counts.append(counter.ops)
        decisions.append(opt.inner_steps)
    return counts, decisions


@pytest.mark.parametrize("cls", [VaSSORe, VaSSOReMu])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_host_reads_and_dispatches_per_step(backend_device, cls, criterion):
    backend, device = backend_device
    only_some_under_interpreter(backend, device, (cls, criterion), {
        (VaSSORe, "random"), (VaSSORe, "gSAMflat"), (VaSSOReMu, "cosSim")})
    few, decisions_few = _count_steps(cls, criterion, 1, backend, device)
    many, decisions = _count_steps(cls, criterion, 4 if backend == "triton" else 13, backend,
                                   device)
    assert decisions == decisions_few
    inner = [b - a for a, b in zip([0] + decisions, decisions)]
    assert set(inner[WARMUP + 1:]) == {0, 1}, inner  # both kinds of step are counted
    # the same ops, step by step, for 3 and for 39 (12) tensors
    assert few[1:] == many[1:]
    data_dependent = criterion not in ("naive", "random")
    for t, ops in enumerate(many):
        reads = ops.count("aten._local_scalar_dense")
        # VaSSORe reads when step t decides; VaSSOReMu at the end of step t for step t + 1
        decides_after_warmup = (t > WARMUP) if cls is VaSSORe else (t + 1 > WARMUP)
        assert reads == (1 if data_dependent and decides_after_warmup else 0), (t, reads)

# ----------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("algo, criterion", [("vassore", "random"), ("vassore", "gSAMratio"),
                                             ("vassoremu", "cosSim"), ("vassoremu", "random")])
def test_resume_reproduces_uninterrupted_run_bit_exactly(backend_device, algo, criterion):
    backend, device = backend_device
    only_some_under_interpreter(backend, device, (algo, criterion), {("vassoremu", "cosSim")})
    torch.manual_seed(0)
    data = make_data(20, torch.float32, device)
    cls = VaSSORe if algo == "vassore" else VaSSOReMu

    def make(model, seed=3):
        return cls(model.parameters(), torch.optim.AdamW, criterion=criterion,
                   warmup_steps=WARMUP, generator=torch.Generator().manual_seed(seed),
                   lr=0.01, backend=backend, model=model, **CRITERION_KWARGS[criterion])

    def train(model, opt, batches):
        out = []
        for x, y in batches:
            def closure():
                opt.zero_grad()
                loss = loss_fn(model, x, y)
                loss.backward()
                return loss
            before = opt.inner_steps
            opt.step(closure)
            out.append(opt.inner_steps - before)
        return out

    model = TinyNet().to(device)
    opt = make(model)
    train(model, opt, data[:9])
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    tail = train(model, opt, data[9:])

    resumed = TinyNet().to(device)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed, seed=99)  # the generator state comes from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    assert (opt2.steps, opt2.inner_steps) == (9, ckpt["opt"]["sam"]["extra"]["inner_steps"])
    assert train(resumed, opt2, data[9:]) == tail and 0 in tail and 1 in tail
    assert (opt2.steps, opt2.inner_steps) == (opt.steps, opt.inner_steps)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- distributed
def test_one_process_gloo_group_reduces_the_criterion(tmp_path, monkeypatch):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    torch.manual_seed(0)
    data = make_data(10, torch.float64, "cpu")
    runs = []
    for distributed in (False, True):
        model = TinyNet().double()
        model.load_state_dict(torch.load(tmp_path / "m.pt") if distributed else
                              model.state_dict())
        if not distributed:
            torch.save(model.state_dict(), tmp_path / "m.pt")
            runs.append(our_run(model, "vassore", "cosSim", CRITERION_KWARGS["cosSim"], data,
                                "reference")[1])
            runs.append(model.state_dict())
            continue
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                                world_size=1)
        try:
            monkeypatch.setattr(dist, "all_reduce", counting)
            decisions = our_run(model, "vassore", "cosSim", CRITERION_KWARGS["cosSim"], data,
                                "reference")[1]
        finally:
            dist.destroy_process_group()
        assert decisions == runs[0]
        assert calls == [3] * len(data)  # one reduction of [Σab, Σa², Σb²] per step
        for (name, a), b in zip(model.state_dict().items(), runs[1].values()):
            assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- failed steps
FAIL_CASES = [(VaSSO, None), (VaSSORe, "random"), (VaSSORe, "gSAMflat"), (VaSSOReMu, "cosSim"),
              (VaSSOReMu, "random")]
FAILURES = ("first call", "last call", "group value", "sparse gradient", "by hand at w + e")
FAIL_FROM = 3  # every step from this one first fails, then runs again


def _failing_run(cls, criterion, backend, failure, steps=11):
    """`steps` steps over three odd-shaped parameters. With `failure`, every step from
    FAIL_FROM on first fails that way and is checked to have changed nothing, then runs
    again. Returns (weights, optimizer state_dict) after every step, and which kinds of step
    (recomputing or reusing) failed."""
    torch.manual_seed(0)
    ps = _params((7,), (3, 5), (1,))
    gen = torch.Generator().manual_seed(11)
    xs = [[torch.randn(p.shape, generator=gen) for p in ps] for _ in range(steps)]
    kwargs = {} if cls is VaSSO else dict(
        criterion=criterion, warmup_steps=1, generator=torch.Generator().manual_seed(3),
        **CRITERION_KWARGS[criterion])
    opt = cls([dict(params=ps[:2]), dict(params=ps[2:], theta=0.7)], torch.optim.SGD,
              rho=0.2, theta=0.4, lr=0.1, momentum=0.9, backend=backend, **kwargs)

    def closure_for(x, fail_call=None, sparse=False):
        calls = []

        def closure():
            calls.append(1)
            if fail_call == len(calls) and not sparse:
                raise KeyError("boom")
            opt.zero_grad()
            loss = sum((torch.sin(p) * xi).sum() + 0.3 * (p ** 2).sum() for p, xi in zip(ps, x))
            loss.backward()
            if sparse and fail_call == len(calls):
                ps[1].grad = ps[1].grad.to_sparse()
            return loss
        return closure

    trace, failed_kinds = [], set()
    for t, x in enumerate(xs):
        if failure is not None and t >= FAIL_FROM:
            before = (copy.deepcopy([p.detach() for p in ps]), copy.deepcopy(opt.state_dict()))
            with pytest.raises((KeyError, ValueError, RuntimeError)):
                inner = opt.needs_inner_pass()  # in the step: undone with it
                failed_kinds.add(inner)
                if failure == "first call":
                    opt.step(closure_for(x, fail_call=1))
                elif failure == "last call":
                    opt.step(closure_for(x, fail_call=2 if inner else 1))
                elif failure == "sparse gradient":
                    opt.step(closure_for(x, fail_call=1, sparse=True))
                elif failure == "by hand at w + e":  # a hand-written pass in pass_context()
                    if inner:
                        closure_for(x)()
                    opt.first_step(zero_grad=True)
                    with opt.pass_context():
                        closure_for(x, fail_call=1)()
                else:  # a hand-written step whose first_step finds an invalid group value
                    if inner:
                        closure_for(x)()
                    opt.param_groups[1]["rho"] = -1.0
                    try:
                        opt.first_step()
                    finally:
                        opt.param_groups[1]["rho"] = 0.2
            assert not opt.perturbed
            assert_same_tensors(before[0], [p.detach() for p in ps], f"weights, step {t}")
            assert_same_tensors(before[1], opt.state_dict(), f"optimizer state, step {t}")
        opt.step(closure_for(x))
        trace.append((copy.deepcopy([p.detach() for p in ps]), copy.deepcopy(opt.state_dict())))
    return trace, failed_kinds


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("cls, criterion", FAIL_CASES,
                         ids=[f"{c.__name__}-{k}" for c, k in FAIL_CASES])
def test_failed_step_changes_nothing_and_the_run_continues_bit_exactly(backend_device, cls,
                                                                        criterion, failure):
    """A step that raises (closure in pass 1 or 2, an invalid group value, sparse gradients)
    leaves weights, EMA, counters, plan, decision and generator as they were; running it
    again gives exactly the uninterrupted run."""
    backend, device = backend_device
    if device != "cpu":
        pytest.skip("the rollback is host logic over the same primitives: CPU tensors suffice")
    only_some_under_interpreter(backend, device, (cls, criterion, failure),
                                {(VaSSOReMu, "cosSim", "last call")})
    expected, _ = _failing_run(cls, criterion, backend, None)
    got, failed_kinds = _failing_run(cls, criterion, backend, failure)
    if cls is not VaSSO:  # failures hit steps that recompute and steps that reuse
        assert failed_kinds == {True, False}
    for t, (a, b) in enumerate(zip(expected, got)):
        assert_same_tensors(a, b, f"step {t}")


# ----------------------------------------------------------------------------- .data replaced
def _shape_change_setup(cls, backend):
    torch.manual_seed(0)
    a, b = _params((5,), (3, 4))
    kwargs = {} if cls is VaSSO else dict(criterion="naive", k=2, warmup_steps=0)
    opt = cls([a, b], torch.optim.SGD, rho=0.3, theta=0.4, lr=0.05, backend=backend, **kwargs)
    seen = []  # (weights, gradients) in float64 after every call of the closure

    def step(x_scale):
        def closure():
            opt.zero_grad()
            loss = (torch.cos(a) * x_scale).sum() + (torch.sin(b) * x_scale).sum() + \
                0.5 * (a ** 2).sum() + (b ** 3).sum()
            loss.backward()
            seen.append(([a.detach().double().clone(), b.detach().double().clone()],
                         [a.grad.double().clone(), b.grad.double().clone()]))
            return loss
        opt.step(closure)
    return opt, a, b, seen, step


@pytest.mark.parametrize("cls, when", [(VaSSO, "recompute"), (VaSSORe, "recompute"),
                                       (VaSSORe, "reuse"), (VaSSOReMu, "recompute"),
                                       (VaSSOReMu, "reuse")])
def test_data_replaced_with_another_shape_restarts_that_ema(backend_device, cls, when):
    """A parameter whose .data gets another shape restarts its EMA: at a recompute step
    d = g for it (the others continue); at a reuse step it is left out of the perturbation
    (no stored d for it) and ‖d‖ is taken over the others."""
    backend, device = backend_device
    if device != "cpu":
        pytest.skip("host logic: CPU tensors suffice")
    only_some_under_interpreter(backend, device, (cls, when), {(VaSSOReMu, "reuse")})
    opt, a, b, seen, step = _shape_change_setup(cls, backend)
    rho, theta, eps = 0.3, 0.4, 1e-7
    for x_scale in (1.0, 2.0, -1.0)[:2 if when == "recompute" else 3]:
        step(x_scale)  # naive, k = 2: steps 0, 2 recompute, 1, 3 reuse
    b.data = torch.randn(4, 2)  # another shape

    def next_step_perturbation():
        ema_a = opt.state[a]["ema"].double().clone()
        w = [a.detach().double().clone(), b.detach().double().clone()]
        seen.clear()
        step(0.5)
        (p_a, p_b), _ = seen[-1]  # the weights at w + e
        return ema_a, w, [p_a - w[0], p_b - w[1]]

    if when == "recompute":  # b: d = g (restarted), a: the EMA continues
        ema_a, _, (e_a, e_b) = next_step_perturbation()
        assert len(seen) == 2
        _, (g_a, g_b) = seen[0]  # at w
        d_a, d_b = (1 - theta) * ema_a + theta * g_a, g_b
        norm = math.sqrt(float((d_a ** 2).sum() + (d_b ** 2).sum()))
        torch.testing.assert_close(e_a, rho * d_a / (norm + eps), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(e_b, rho * d_b / (norm + eps), rtol=1e-5, atol=1e-7)
    else:  # b has no stored d: not perturbed; ‖d‖ over a only
        ema_a, _, (e_a, e_b) = next_step_perturbation()
        assert len(seen) == 1
        torch.testing.assert_close(e_a, rho * ema_a / (ema_a.norm() + eps), rtol=1e-5,
                                   atol=1e-7)
        assert torch.equal(e_b, torch.zeros_like(e_b))
        assert "ema" not in opt.state[b]
        ema_a, _, (e_a, e_b) = next_step_perturbation()  # recomputes: d = g for b
        _, (g_a, g_b) = seen[0]
        d_a = (1 - theta) * ema_a + theta * g_a
        norm = math.sqrt(float((d_a ** 2).sum() + (g_b ** 2).sum()))
        torch.testing.assert_close(e_b, rho * g_b / (norm + eps), rtol=1e-5, atol=1e-7)
    assert b.shape == (4, 2) and torch.isfinite(b).all()


@pytest.mark.parametrize("cls", [SAM, GSAM, GAM, VaSSO, VaSSORe, VaSSOReMu])
def test_every_algorithm_keeps_training_after_data_gets_another_shape(cls):
    """One behaviour for all: the step after a parameter's .data changed shape runs, moves
    that parameter, and whatever state it has for it has the new shape."""
    torch.manual_seed(0)
    a, b = _params((5,), (3, 4), dtype=torch.float64)
    extra = {GSAM: dict(gsam_alpha=0.1), GAM: {}, SAM: {}}.get(cls, dict(theta=0.5))
    # no momentum: torch's SGD keeps a momentum buffer of the old shape and would raise
    opt = cls([a, b], torch.optim.SGD, lr=0.1, backend="reference", **extra)

    def closure():
        opt.zero_grad()
        loss = (torch.sin(a) ** 2).sum() + (torch.cos(b) * b).sum()
        loss.backward()
        return loss
    for _ in range(2):
        opt.step(closure)
    b.data = torch.randn(2, 7, dtype=torch.float64)
    before = b.detach().clone()
    for _ in range(3):
        opt.step(closure)
    assert not torch.equal(b, before) and torch.isfinite(b).all()
    for s in opt.state.values():
        for v in s.values():
            if torch.is_tensor(v) and v.dim() == 2:
                assert v.shape == (2, 7)
