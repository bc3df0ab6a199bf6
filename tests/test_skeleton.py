"""The step skeleton's rules, one matrix over every algorithm of the registry (tests/algorithms.py):
the transaction, skips, no-gradient steps, perturb=False, maximize, copies, hooks, foreign
checkpoints, seed construction, both closure contracts and the buffers held."""
import argparse
import copy
import pickle

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import sam_kernels as sk
from algorithms import ALGORITHMS, closure_for, data, held_buffers, loss_of, make, params

NAMES = list(ALGORITHMS)
SHAPES = ((7,), (3, 5), (1,))


def _snapshot(opt, ps):
    return copy.deepcopy(([p.detach() for p in ps], opt.state_dict()))


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _run(name, steps, fail_at=(), how="closure", **kw):
    """`steps` steps; at the steps in `fail_at` a failing attempt first (checked to change
    nothing), then the real step. Returns the weights and state after each step."""
    ps = params(*SHAPES)
    opt = make(name, ps, **kw)
    out = []
    for t, x in enumerate(data(ps, steps)):
        if t in fail_at:
            before = _snapshot(opt, ps)
            if how == "closure":  # the last pass raises
                calls = []

                def failing():
                    calls.append(1)
                    if len(calls) == sum(opt._ensure_plan().passes):
                        raise KeyError("boom")
                    return closure_for(opt, ps, x)()
                with pytest.raises(KeyError):
                    opt.step(failing)
            elif how == "nonfinite":  # skip_nonfinite skips it
                bad = [xi * float("nan") for xi in x]
                opt.step(closure_for(opt, ps, bad))
            assert not opt.perturbed
            assert _same(before, _snapshot(opt, ps)), f"{name}: step {t} changed something"
        opt.step(closure_for(opt, ps, x))
        out.append(_snapshot(opt, ps))
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["closure", "nonfinite"])
def test_failed_or_skipped_step_changes_nothing(name, how):
    """One transaction: a step whose last pass raises, or that skip_nonfinite skips, leaves
    weights, own state, counters and schedules exactly as before; the run then continues as
    if it had never happened (bit for bit)."""
    kw = dict(skip_nonfinite=True) if how == "nonfinite" else {}
    expected = _run(name, 6, **kw)
    got = _run(name, 6, fail_at=(1, 2, 4), how=how, **kw)
    assert _same(expected, got)


@pytest.mark.parametrize("name", NAMES)
def test_step_without_gradients_is_a_no_op(name):
    ps = params(*SHAPES)
    opt = make(name, ps)
    before = _snapshot(opt, ps)
    opt.step(lambda: torch.zeros(()))  # a closure that produces no gradient
    assert _same(before[0], [p.detach() for p in ps]) and not opt.perturbed


@pytest.mark.parametrize("name", [n for n in NAMES if n != "MomentumSAM"])
def test_perturb_false_groups_stay_at_w(name):
    """A perturb=False group is left out of the perturbation by every algorithm."""
    ps = params(*SHAPES)
    opt = make(name, [dict(params=ps[:2]), dict(params=ps[2:], perturb=False)])
    seen = []
    for x in data(ps, 3):
        w = ps[2].detach().clone()

        def closure():
            seen.append(torch.equal(ps[2].detach(), w))
            return closure_for(opt, ps, x)()
        opt.step(closure)
    assert all(seen) and len(seen) >= 3


@pytest.mark.parametrize("name", NAMES)
def test_maximize_equals_minimizing_the_negated_loss(name):
    ps_max, ps_min = params(*SHAPES), params(*SHAPES)
    cls, hyper, _ = ALGORITHMS[name]
    o_max = cls(ps_max, torch.optim.SGD, lr=0.05, momentum=0.9, maximize=True, **hyper)
    o_min = cls(ps_min, torch.optim.SGD, lr=0.05, momentum=0.9, **hyper)
    for x in data(ps_max, 4):
        def neg():
            o_min.zero_grad()
            loss = -loss_of(ps_min, x)
            loss.backward()
            return loss
        o_max.step(closure_for(o_max, ps_max, x))
        o_min.step(neg)
    for a, b in zip(ps_max, ps_min):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_pickle_continue_bit_exactly(name):
    ps = params(*SHAPES)
    opt = make(name, ps)
    xs = data(ps, 5)
    for x in xs[:2]:
        opt.step(closure_for(opt, ps, x))
    ps2, opt2 = copy.deepcopy((ps, opt))
    ps3, opt3 = pickle.loads(pickle.dumps((ps, opt)))
    for x in xs[2:]:
        for p_, o in ((ps, opt), (ps2, opt2), (ps3, opt3)):
            o.step(closure_for(o, p_, x))
    for a, b, c in zip(ps, ps2, ps3):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_hooks_fire_once_per_step(name):
    ps = params(*SHAPES)
    opt = make(name, ps)
    fired = []
    handles = [register_optimizer_step_pre_hook(
                   lambda o, a, k: fired.append(("global", type(o).__name__))),
               opt.register_step_post_hook(lambda o, a, k: fired.append(("own", None))),
               opt.register_state_dict_post_hook(lambda o, sd: fired.append(("sd", None))),
               opt.register_load_state_dict_pre_hook(lambda o, sd: fired.append(("load", None)))]
    try:
        xs = data(ps, 2)
        opt.step(closure_for(opt, ps, xs[0]))
        assert fired == [("global", type(opt).__name__), ("own", None)]
        fired.clear()  # a hand-written step fires them once too
        if ALGORITHMS[name][0] is not sk.GAM:
            opt.zero_grad()
            if opt.needs_inner_pass():
                loss_of(ps, xs[1]).backward()
            opt.first_step(zero_grad=True)
            if opt.needs_perturbed_pass():
                loss_of(ps, xs[1]).backward()
            opt.second_step()
            assert fired == [("global", type(opt).__name__), ("own", None)]
        fired.clear()
        opt.load_state_dict(opt.state_dict())
        assert fired == [("sd", None), ("load", None)]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", NAMES)
def test_another_algorithms_checkpoint_is_refused(name):
    ps = params(*SHAPES)
    opt = make(name, ps)
    other = "FriendlySAM" if name != "FriendlySAM" else "LookSAM"
    o2 = make(other, params(*SHAPES))
    o2.step(closure_for(o2, o2.param_groups[0]["params"], data(ps, 1)[0]))
    before = _snapshot(opt, ps)
    with pytest.raises(ValueError, match=f"checkpoint of {other}.*Nothing was loaded"):
        opt.load_state_dict(o2.state_dict())
    assert _same(before, _snapshot(opt, ps))


@pytest.mark.parametrize("name", NAMES)
def test_seed_construction_form(name):
    """lk-eg's / BingcongLi's build_optimizer: params=, base_optimizer= (an instance),
    logger=, args= (fields the class does not read are ignored)."""
    cls, hyper, _ = ALGORITHMS[name]
    ps = params(*SHAPES)
    base = torch.optim.SGD(ps, lr=0.05, momentum=0.9)
    args = argparse.Namespace(epochs=3, lr=0.05, weight_decay=0.0, eps=1e-3)
    opt = cls(params=ps, base_optimizer=base, logger=object(), args=args, **hyper)
    opt.step(closure_for(opt, ps, data(ps, 1)[0]))
    assert opt.steps == 1


@pytest.mark.parametrize("name", [n for n in NAMES if ALGORITHMS[n][0] is not sk.MomentumSAM])
def test_backward_then_step_closure_is_the_seeds_loop(name):
    """loss.backward(); optimizer.step(closure): those gradients are pass 1, the closure runs
    only for the later passes — the same step as step(closure) alone."""
    ps_a, ps_b = params(*SHAPES), params(*SHAPES)
    oa, ob = make(name, ps_a), make(name, ps_b)
    for x in data(ps_a, 3):
        calls_a, calls_b = [], []
        oa.step(closure_for(oa, ps_a, x, calls_a))
        if not ob.needs_inner_pass():
            ob.step(closure_for(ob, ps_b, x, calls_b))
            continue
        ob.zero_grad()
        loss_of(ps_b, x).backward()
        calls_b.append(1)
        ob.step(closure_for(ob, ps_b, x, calls_b))
        assert len(calls_a) == len(calls_b)
    for a, b in zip(ps_a, ps_b):
        assert torch.equal(a, b)


def test_no_false_positive_after_another_optimizers_steps():
    """Warm up with SGD (its loop leaves gradients), then switch to SAM: step(closure) runs
    every pass itself."""
    ps = params(*SHAPES)
    sgd = torch.optim.SGD(ps, lr=0.01)
    xs = data(ps, 3)
    sgd.zero_grad()
    loss_of(ps, xs[0]).backward()
    sgd.step()  # gradients stay
    opt = make("SAM", ps)
    calls = []
    opt.step(closure_for(opt, ps, xs[1], calls))
    assert len(calls) == 2


def test_own_gradients_never_leak_into_the_next_pass_1():
    """davda54's README closure has no zero_grad inside: with step(closure) alone the last
    pass's gradients must not be added into the next step's pass 1."""
    ps_a, ps_b = params(*SHAPES), params(*SHAPES)
    oa, ob = make("SAM", ps_a), make("SAM", ps_b)
    for x in data(ps_a, 3):
        oa.step(closure_for(oa, ps_a, x))

        def no_zero():
            loss = loss_of(ps_b, x)
            loss.backward()
            return loss
        ob.step(no_zero)
        ob.zero_grad()
    for a, b in zip(ps_a, ps_b):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_buffers_held_between_steps(name):
    """The buffer table of docs/design.md, measured by walking the optimizer's tensors."""
    ps = params(*SHAPES)
    opt = make(name, ps)
    for x in data(ps, 4):
        opt.step(closure_for(opt, ps, x))
    assert held_buffers(opt) == ALGORITHMS[name][2]


@pytest.mark.parametrize("name", NAMES)
def test_non_dense_parameters_step_as_their_dense_copies(name):
    """Parameters that are non-contiguous views (torch optimizers accept them) give the same
    steps as contiguous copies of them."""
    base = params((6, 8), (5, 4))
    views = [torch.nn.Parameter(base[0].detach().clone()[:, ::2]),
             torch.nn.Parameter(base[1].detach().clone().t())]
    dense = [torch.nn.Parameter(v.detach().contiguous()) for v in views]
    assert not views[0].is_contiguous() and not views[1].is_contiguous()
    oa, ob = make(name, views), make(name, dense)
    for x in data(dense, 3):
        oa.step(closure_for(oa, views, x))
        ob.step(closure_for(ob, dense, x))
    for a, b in zip(views, dense):  # the same maths; sums may run in another memory order
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


def test_pytorch_optimizer_checkpoints_are_refused():
    """pytorch-optimizer 4.1's LookSAM/FriendlySAM keep their own per-parameter layouts: a
    checkpoint of theirs is refused, naming what was found, and loads nothing."""
    po = pytest.importorskip("pytorch_optimizer")
    for theirs, ours in ((po.LookSAM, "LookSAM"), (po.FriendlySAM, "FriendlySAM")):
        ps = params(*SHAPES)
        other = theirs(ps, torch.optim.SGD, lr=0.1)
        for step in range(2):
            x = data(ps, 1, seed=step)[0]

            def closure():
                other.zero_grad()
                loss = loss_of(ps, x)
                loss.backward()
                return loss
            other.step(closure)
        mine = make(ours, params(*SHAPES))
        before = _snapshot(mine, mine.param_groups[0]["params"])
        with pytest.raises(ValueError, match="checkpoint of pytorch-optimizer.*Nothing was loaded"):
            mine.load_state_dict(other.state_dict())
        assert _same(before, _snapshot(mine, mine.param_groups[0]["params"]))


def test_fuzz_findings_at_the_edges():
    """get_optimizer_state_dict with a model the optimizer does not train; params= given to
    sam_on_param_groups; interval=1 checkpoints its counters; a string learning rate."""
    from sam_kernels.checkpoint import get_optimizer_state_dict
    ps = params(*SHAPES)
    opt = make("SAM", ps)
    with pytest.raises(ValueError, match="not parameters of `model`"):
        get_optimizer_state_dict(torch.nn.Linear(2, 2), opt)
    with pytest.raises(TypeError, match="params= is not accepted"):
        sk.sam_on_param_groups(torch.nn.BatchNorm1d(3), params=ps)
    opt.step(closure_for(opt, ps, data(ps, 1)[0]))
    assert opt.state_dict()["sam"]["extra"]["steps"] == 1
    with pytest.raises(ValueError, match=r"Invalid lr value: 'a' \(a builtins.str"):
        sk.SAM(params((3,)), torch.optim.SGD, lr="a")


@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_looksam_fp16_gradients_give_finite_weights(granularity):
    """Issue 18: per-tensor LookSAM turned finite fp16 gradients into NaN weights (its norms
    were taken in fp16, where squares past 65504 overflow); they are fp64 sums now."""
    ps = [torch.nn.Parameter(torch.full((64,), 0.5, dtype=torch.float16)) for _ in range(2)]
    opt = sk.LookSAM(ps, torch.optim.SGD, k=2, rho=0.01, granularity=granularity, lr=1e-4)
    for _ in range(4):
        def closure():
            opt.zero_grad()
            loss = sum((p.float() * 300.0).sum() for p in ps)  # |g| = 300: g² overflows fp16
            loss.backward()
            return loss
        opt.step(closure)
    assert all(torch.isfinite(p).all() for p in ps)
    assert all(torch.isfinite(t).all() for s in opt.state.values() for t in s.values())
