"""The seed repositories' training scripts with our optimizers swapped in: their constructor
keywords (VaSSO's crt*, args=, logger=), their arguments to step() (extra keywords, lk-eg's
two-argument closure), their counter names, their checkpoints — and a clear error, naming
the right class and keyword, for anything else.

The seed state dicts are built here from each seed's documented layout (a few lines that say
which per-parameter keys it keeps and how its param groups look), not from seed code."""
import argparse
import copy
import math
import warnings

import pytest
import torch

from sam_kernels import GAM, GSAM, SAM, VaSSO, VaSSORe, VaSSOReMu
from sam_kernels.optim.compat import SEED_STEP_KEYWORDS
from training_helpers import assert_same_tensors

CLASSES = [SAM, GSAM, GAM, VaSSO, VaSSORe, VaSSOReMu]
EXTRA = {GSAM: dict(gsam_alpha=0.1)}  # required keywords


def params(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64))
            for s in shapes]


def make(cls, ps, base=torch.optim.SGD, **kwargs):
    base_kw = dict(lr=0.1) if isinstance(base, type) else {}
    return cls(ps, base, backend="reference", **EXTRA.get(cls, {}), **base_kw, **kwargs)


def torch_closure(opt, ps, x):
    def closure():
        opt.zero_grad()
        loss = sum((torch.sin(p) * xi).sum() + 0.5 * (p ** 2).sum() for p, xi in zip(ps, x))
        loss.backward()
        return loss
    return closure


def data(ps, steps, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ps] for _ in range(steps)]


# ----------------------------------------------------------------------------- step()
@pytest.mark.parametrize("cls", CLASSES)
def test_step_takes_the_keywords_the_seed_loops_pass(cls):
    """BingcongLi's and lk-eg's loops call step(closure, epoch=..., step=..., batch_idx=...,
    model=..., [images=, targets=, criterion=,] train_data=..., logger=...)."""
    ps, twin = params((4,), (2, 3)), params((4,), (2, 3))
    opts = [make(cls, ps), make(cls, twin)]
    seed_kwargs = {k: object() for k in SEED_STEP_KEYWORDS}
    for x in data(ps, 3):
        opts[0].step(torch_closure(opts[0], ps, x), **seed_kwargs)
        opts[1].step(torch_closure(opts[1], twin, x))
    for a, b in zip(ps, twin):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", CLASSES)
def test_step_refuses_other_arguments_naming_its_own_class(cls):
    ps = params((4,))
    opt = make(cls, ps)
    closure = torch_closure(opt, ps, data(ps, 1)[0])
    before = ps[0].detach().clone()
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\.step\(\) got unexpected keyword "
                                        r"argument\(s\) \['epochs'\].*ignores.*epoch, step"):
        opt.step(closure, epochs=3)
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\.step\(\) takes one positional"):
        opt.step(closure, 3)
    assert torch.equal(ps[0], before)


def lk_eg_closure(opt, ps, x, returned):
    """lk-eg utils/engine.py's contract: forward when computeForward, zero_grad + backward
    when computeBackprop, (output, loss) returned when computeForward."""
    def closure(computeForward, computeBackprop):
        if computeForward:
            output = [torch.sin(p) * xi for p, xi in zip(ps, x)]
            loss = sum(o.sum() + 0.5 * (p ** 2).sum() for o, p in zip(output, ps))
        if computeBackprop:
            opt.zero_grad()
            loss.backward()
        if computeForward:
            returned.append(loss.detach())
            return output, loss
    return closure


@pytest.mark.parametrize("cls, kwargs", [(SAM, {}), (VaSSO, {}),
                                         (VaSSORe, dict(criterion="naive", k=2)),
                                         (VaSSOReMu, dict(crt="naive", crt_k=2))])
def test_lk_eg_two_argument_closure_equals_the_torch_closure(cls, kwargs):
    ps, twin = params((5,), (3, 2)), params((5,), (3, 2))
    a, b = make(cls, ps, **kwargs), make(cls, twin, **kwargs)
    for x in data(ps, 6):
        returned = []
        out, loss = a.step(lk_eg_closure(a, ps, x, returned), epoch=0, batch_idx=1)
        b.step(torch_closure(b, twin, x))
        # VaSSORe/VaSSOReMu return the pass at w + e (as lk-eg's step does), SAM/VaSSO at w
        assert torch.equal(loss.detach(), returned[-1 if cls in (VaSSORe, VaSSOReMu) else 0])
    for p, q in zip(ps, twin):
        assert torch.equal(p, q)
    if cls in (VaSSORe, VaSSOReMu):
        assert a.inner_steps == b.inner_steps == 4  # steps 0, 1 (warm-up), 2, 4


@pytest.mark.parametrize("cls", [SAM, GSAM, VaSSORe])
def test_closure_that_needs_other_arguments_shows_the_fix(cls):
    ps = params((3,))
    opt = make(cls, ps)
    before = ps[0].detach().clone()
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\.step\(closure\): the closure "
                                        r"requires arguments \(x, y\).*lambda: closure"):
        opt.step(lambda x, y: None)
    with pytest.raises(TypeError, match="must be callable"):
        opt.step(3)
    assert torch.equal(ps[0], before) and not opt.perturbed


def test_seed_counter_names_are_read_only_aliases():
    ps = params((4,))
    opt = make(VaSSORe, ps, criterion="naive", k=3, warmup_steps=0)
    for x in data(ps, 7):
        opt.step(torch_closure(opt, ps, x))
    assert (opt.steps, opt.inner_steps) == (7, 3)  # t = 0, 3, 6 recompute
    assert opt.iteration_step_counter == 7
    assert opt.inner_gradient_calculation_counter == opt.inner_fwp_calculation_counter == 3
    for name in ("iteration_step_counter", "inner_gradient_calculation_counter",
                 "inner_fwp_calculation_counter"):
        with pytest.raises(AttributeError, match=f"VaSSORe.{name} is a read-only alias"):
            setattr(opt, name, 0)
    assert opt.steps == 7


# ----------------------------------------------------------------------------- constructors
def lk_eg_args(**over):
    """lk-eg configs/defaulf_cfg.py's namespace (the fields its optimizers and base read)."""
    ns = dict(rho=0.1, theta=0.4, crt="naive", crt_k=2, crt_p=0.5, lam=0.1, crt_z=1.0,
              z_two=0.5, crt_c=0.0, var_delta=1.0, epochs=200, extensive_metrics_mode=False,
              performance_scores_mode=False, lr=0.05, momentum=0.9, eps=None, betas=None)
    ns.update(over)
    return argparse.Namespace(**ns)


@pytest.mark.parametrize("criterion, seed_kw, ours_kw", [
    ("naive", dict(crt_k=3), dict(k=3)),
    ("random", dict(crt_p=0.3), dict(p=0.3)),
    ("gSAMratio", dict(crt_z=1.2, z_two=2.0, lam=0.3), dict(z=1.2, z_two=2.0, lam=0.3)),
    ("cosSim", dict(crt_c=0.2), dict(c=0.2)),
])
@pytest.mark.parametrize("way", ["keywords", "args"])
def test_seed_keyword_names_and_args_namespace(criterion, seed_kw, ours_kw, way):
    """lk-eg builds VASSORE(params=, base_optimizer=, logger=, args=); its keywords are crt,
    crt_k, crt_p, crt_z, z_two, lam, crt_c. Both ways give our optimizer with our names."""
    runs = []
    for how in ("ours", way):
        ps = params((4,), (3,))
        base = torch.optim.SGD(ps, lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        if how == "ours":
            opt = VaSSORe(ps, base, rho=0.1, theta=0.4, criterion=criterion, generator=gen,
                          warmup_steps=1, backend="reference", **ours_kw)
        elif how == "keywords":
            opt = VaSSORe(ps, base, rho=0.1, theta=0.4, crt=criterion, generator=gen,
                          warmup_steps=1, backend="reference", logger=object(), **seed_kw)
        else:
            opt = VaSSORe(params=ps, base_optimizer=base, logger=object(), generator=gen,
                          warmup_steps=1, backend="reference",
                          args=lk_eg_args(crt=criterion, **seed_kw))
        for x in data(ps, 8):
            opt.step(torch_closure(opt, ps, x))
        runs.append((opt.criterion, [p.detach() for p in ps], opt.inner_steps))
        assert opt.param_groups[0]["rho"] == 0.1 and opt.param_groups[0]["theta"] == 0.4
    (c1, w1, n1), (c2, w2, n2) = runs
    assert type(c1) is type(c2) and c1.name == c2.name == criterion
    assert vars(c1).keys() == vars(c2).keys()
    for k in vars(c1):
        if k not in ("generator", "flag", "tau", "_pending"):
            assert getattr(c1, k) == getattr(c2, k), k
    assert n1 == n2 and all(torch.equal(a, b) for a, b in zip(w1, w2))


def test_bingcongli_args_namespace_for_vasso():
    """BingcongLi builds VASSO(params=, base_optimizer=, args=) reading args.rho, args.theta;
    args.eps there is the base optimizer's (AdamW), never VaSSO's."""
    ps = params((4,))
    opt = VaSSO(params=ps, base_optimizer=torch.optim.SGD(ps, lr=0.1),
                args=argparse.Namespace(rho=0.2, theta=0.6, eps=1e-3, lr=0.1))
    assert opt.param_groups[0]["rho"] == 0.2 and opt.param_groups[0]["theta"] == 0.6
    assert opt.eps == 1e-7


def test_seed_names_given_twice_must_agree():
    ps = params((4,))
    base = torch.optim.SGD(ps, lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid criterion value: 'cosSim' given as "
                                         r"criterion= but 'naive' as crt="):
        VaSSORe(ps, base, criterion="cosSim", crt="naive")
    with pytest.raises(ValueError, match=r"Invalid k value: 4 given as a keyword but "
                                         r"args.crt_k = 2"):
        VaSSORe(ps, base, k=4, args=lk_eg_args())
    with pytest.raises(ValueError, match=r"Invalid rho value: 0.3 .* args.rho = 0.1"):
        VaSSO(ps, base, rho=0.3, args=lk_eg_args())
    VaSSORe(ps, base, k=2, crt_k=2, args=lk_eg_args())  # the same value twice is fine
    with pytest.raises(ValueError, match=r"'baseline'.*plain VaSSO: use sam_kernels.VaSSO"):
        VaSSORe(ps, base, args=lk_eg_args(crt="baseline"))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("base_kind", ["class", "instance"])
def test_unknown_keyword_names_it_and_the_valid_ones(cls, base_kind):
    ps = params((3,))
    base = torch.optim.SGD if base_kind == "class" else torch.optim.SGD(ps, lr=0.1)
    kw = dict(lr=0.1) if base_kind == "class" else {}
    with pytest.raises(TypeError) as info:
        cls(ps, base, **EXTRA.get(cls, {}), **kw, crt_q=1, rhoo=2)
    msg = str(info.value)
    assert msg.startswith(f"{cls.__name__}() got unexpected keyword argument(s) "
                          "['crt_q', 'rhoo']: neither")
    assert "'backend'" in msg and "'max_grad_norm'" in msg  # ours, listed
    if base_kind == "class":
        assert "the base optimizer SGD takes" in msg and "'momentum'" in msg
    else:
        assert "instance of SGD, so no keyword goes to it" in msg
    if cls is VaSSORe:
        assert "'crt_k'" in msg and "'criterion'" in msg


@pytest.mark.parametrize("cls", CLASSES)
def test_base_optimizer_keyword_with_an_instance_blames_the_instance(cls):
    """A keyword the base optimizer does take, given with an instance, is the one case where
    the message is about the base optimizer."""
    ps = params((3,))
    with pytest.raises(TypeError, match="base_optimizer is an optimizer instance, so its "
                                        r"hyper-parameters are set already.*\['momentum'\]"):
        cls(ps, torch.optim.SGD(ps, lr=0.1), **EXTRA.get(cls, {}), momentum=0.9)


# ----------------------------------------------------------------------------- checkpoints
# Each seed's torch.optim.Optimizer.state_dict(): {'state': {index: per-parameter state},
# 'param_groups': the groups it shares with its base optimizer}. The seeds' own state is in
# their wrapper's `state`, so none of them saves the base optimizer's state (momentum).
def seed_groups(opt, **extra):
    """The seed's param groups: the base optimizer's hyper-parameters + the seed's keys."""
    base_keys = opt.base_optimizer.defaults.keys()
    return [{**{k: g[k] for k in base_keys}, **extra, "params": list(range(len(g["params"])))}
            for g in opt.param_groups]


def bingcongli_vasso_sd(opt, emas, rho, theta):
    """BingcongLi solver/vasso.py: state[p] = {'ema', 'e_w' = ema·rho/(‖ema‖+1e-7)}."""
    norm = math.sqrt(sum(float((e ** 2).sum()) for e in emas))
    state = {i: {"ema": e.clone(), "e_w": e * rho / (norm + 1e-7)} for i, e in enumerate(emas)}
    return {"state": state, "param_groups": seed_groups(opt, rho=rho, theta=theta)}


def lk_eg_vassore_sd(opt, emas, g_t, g_prev, rho, theta):
    """lk-eg solver/vassore.py (cosSim): 'e_t' (zeros from the constructor, then e), 'ema',
    'g_t' (the last outer gradient), 'g_{t-1}' (the one before)."""
    norm = math.sqrt(sum(float((e ** 2).sum()) for e in emas))
    state = {i: {"e_t": e * rho / (norm + 1e-16), "ema": e.clone(), "g_t": g.clone(),
                 "g_{t-1}": h.clone()} for i, (e, g, h) in enumerate(zip(emas, g_t, g_prev))}
    return {"state": state, "param_groups": seed_groups(opt, rho=rho, theta=theta)}


def test_bingcongli_vasso_checkpoint_is_converted():
    """The seed's 'ema' becomes ours (not the base optimizer's), 'e_w' is dropped, and the run
    continues exactly like ours with that EMA (base SGD without momentum: no base state)."""
    ps = params((4,), (2, 3))
    ref = make(VaSSO, ps, rho=0.2, theta=0.4)
    xs = data(ps, 6)
    for x in xs[:3]:
        ref.step(torch_closure(ref, ps, x))
    weights = [p.detach().clone() for p in ps]
    emas = [ref.state[p]["ema"].clone() for p in ps]
    sd = bingcongli_vasso_sd(ref, emas, rho=0.2, theta=0.4)

    twin = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = make(VaSSO, twin, rho=0.9, theta=0.9)
    with pytest.warns(UserWarning, match=r"converted a checkpoint of the seed BingcongLi/VaSSO "
                                         r"VASSO: kept \['ema -> ema'\], dropped \['e_w'\].*"
                                         r"no base-optimizer state"):
        opt.load_state_dict(copy.deepcopy(sd))
    assert not opt.base_optimizer.state  # nothing landed there
    for p, e in zip(twin, emas):
        assert torch.equal(opt.state[p]["ema"], e) and "e_w" not in opt.state[p]
    g = opt.param_groups[0]
    assert (g["rho"], g["theta"], g["adaptive"], g["eta"]) == (0.2, 0.4, False, 0.0)
    for x in xs[3:]:
        ref.step(torch_closure(ref, ps, x))
        opt.step(torch_closure(opt, twin, x))
    for p, q in zip(ps, twin):
        assert torch.equal(p, q)


def test_lk_eg_cossim_checkpoint_is_converted():
    ps = params((4,), (3,))
    opt = make(VaSSORe, ps, criterion="cosSim", rho=0.1, theta=0.4)
    g = torch.Generator().manual_seed(2)
    emas, g_t, g_prev = ([torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ps]
                         for _ in range(3))
    sd = lk_eg_vassore_sd(opt, emas, g_t, g_prev, rho=0.1, theta=0.4)
    with pytest.warns(UserWarning, match=r"lk-eg.*kept \['ema -> ema', 'g_t -> g_out_prev'\], "
                                         r"dropped \['e_t', 'g_\{t-1\}'\]"):
        opt.load_state_dict(sd)
    for p, e, gt in zip(ps, emas, g_t):
        assert torch.equal(opt.state[p]["ema"], e) and torch.equal(opt.state[p]["g_out_prev"], gt)
    assert (opt.steps, opt.inner_steps) == (0, 0)  # the seed saves no counters either
    for x in data(ps, 4):
        opt.step(torch_closure(opt, ps, x))
    assert opt.steps == 4
    # the same checkpoint in a VaSSORe without cosSim keeps only the EMA
    other = make(VaSSOReMu, params((4,), (3,)), criterion="naive")
    with pytest.warns(UserWarning, match=r"kept \['ema -> ema'\], dropped \['e_t', 'g_t', "):
        other.load_state_dict(lk_eg_vassore_sd(opt, emas, g_t, g_prev, rho=0.1, theta=0.4))
    assert all("g_out_prev" not in s for s in other.state.values())


def test_davda54_sam_checkpoint_is_converted_and_groups_completed():
    """davda54 sam.py: state[p] = {'old_p'}; groups carry rho, adaptive and the base's keys
    (no eta): loading it used to leave groups without 'eta' and every later step raised."""
    ps = params((4,), (3,))
    opt = make(SAM, ps, rho=0.05, momentum=0.9)
    sd = {"state": {i: {"old_p": p.detach().clone()} for i, p in enumerate(ps)},
          "param_groups": seed_groups(opt, rho=0.07, adaptive=False)}
    with pytest.warns(UserWarning, match=r"davda54/sam SAM: kept nothing, dropped \['old_p'\]"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["rho"] == 0.07 and opt.param_groups[0]["eta"] == 0.0
    assert not opt.base_optimizer.state
    for x in data(ps, 2):
        opt.step(torch_closure(opt, ps, x))
    assert all(torch.isfinite(p).all() for p in ps)


def test_gsam_seed_checkpoint_and_gam_seed_checkpoint():
    ps = params((4,), (3,))
    gsam = make(GSAM, ps)
    sd = {"state": {i: {"old_g": torch.ones_like(p), "e_w": torch.ones_like(p)}
                    for i, p in enumerate(ps)}, "param_groups": seed_groups(gsam)}
    with pytest.warns(UserWarning, match=r"juntang-zhuang/GSAM.*dropped \['e_w', 'old_g'\]"):
        gsam.load_state_dict(sd)
    gsam.step(torch_closure(gsam, ps, data(ps, 1)[0]))

    # xxgege/GAM's state_dict() is its base optimizer's: momentum comes back, groups get ours
    ps2 = params((4,), (3,))
    base = torch.optim.SGD(ps2, lr=0.1, momentum=0.9)
    for p in ps2:
        p.grad = torch.randn_like(p)
    base.step()
    saved = copy.deepcopy(base.state_dict())
    gam = make(GAM, params((4,), (3,)), momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a conversion: nothing to warn about
        gam.load_state_dict(saved)
    for i, p in enumerate(gam.param_groups[0]["params"]):
        assert torch.equal(gam.base_optimizer.state[p]["momentum_buffer"],
                           saved["state"][i]["momentum_buffer"])
    assert gam.param_groups[0]["adaptive"] is False and gam.param_groups[0]["eta"] == 0.0
    gam.step(torch_closure(gam, gam.param_groups[0]["params"], data(ps2, 1)[0]))


@pytest.mark.parametrize("cls, seed_state, match", [
    (SAM, {"ema": None, "e_w": None}, r"seed BingcongLi/VaSSO VASSO.*load it into VaSSO"),
    (GSAM, {"e_t": None, "ema": None}, r"seed lk-eg.*load it into VaSSO"),
    (VaSSO, {"old_p": None}, r"seed davda54/sam SAM.*load it into SAM"),
    (VaSSORe, {"old_g": None, "e_w": None}, r"juntang-zhuang/GSAM.*load it into GSAM"),
])
def test_another_algorithms_seed_checkpoint_raises_and_loads_nothing(cls, seed_state, match):
    ps = params((3,))
    opt = make(cls, ps)
    opt.step(torch_closure(opt, ps, data(ps, 1)[0]))
    before = copy.deepcopy(opt.state_dict())
    state = {0: {k: torch.zeros(3, dtype=torch.float64) for k in seed_state}}
    with pytest.raises(ValueError, match=match + r".*Nothing was loaded"):
        opt.load_state_dict({"state": state, "param_groups": seed_groups(opt, rho=9.0)})
    assert_same_tensors(before, opt.state_dict(), "state after the refused load")


def test_seed_checkpoint_of_another_model_raises():
    ps = params((4,), (3,))
    opt = make(VaSSO, ps)
    sd = bingcongli_vasso_sd(opt, [torch.ones(4, dtype=torch.float64),
                                   torch.ones(5, dtype=torch.float64)], rho=0.1, theta=0.4)
    with pytest.raises(ValueError, match=r"'ema' of parameter 1 has shape \(5,\) but the "
                                         r"parameter has \(3,\).*Nothing was loaded"):
        opt.load_state_dict(sd)
    assert not opt.state


def test_base_optimizer_checkpoint_loads_into_every_class():
    """A plain SGD state dict has none of our group keys; torch replaces the groups by the
    saved ones, so they are completed from the defaults (it used to fail at the next step)."""
    for cls in CLASSES:
        ps = params((4,))
        sgd = torch.optim.SGD(params((4,)), lr=0.3)
        opt = make(cls, ps)
        opt.load_state_dict(sgd.state_dict())
        assert opt.param_groups[0]["lr"] == 0.3
        opt.step(torch_closure(opt, ps, data(ps, 1)[0]))


# ----------------------------------------------------------------------------- schedules
def lk_eg_recomputes(criterion, counter, k=2):
    """lk-eg solver/criteria_functions.py: `iteration_step_counter` (completed steps, from 0)
    and WARMUP_CONSTANT = 1 for naive (its other criteria differ only in the trigger)."""
    return counter % k == 0 or counter <= 1


@pytest.mark.parametrize("warmup_steps, matches_seed", [(None, True), (0, False)])
def test_default_warm_up_counts_inner_passes_like_the_seed(warmup_steps, matches_seed):
    ps = params((3,))
    opt = make(VaSSORe, ps, criterion="naive", k=2, warmup_steps=warmup_steps)
    ours = []
    for x in data(ps, 24):
        ours.append(opt.needs_inner_pass())
        opt.step(torch_closure(opt, ps, x))
    seed = [lk_eg_recomputes("naive", t) for t in range(24)]
    assert sum(seed) == 13
    assert (ours == seed) is matches_seed
    assert opt.inner_steps == (13 if matches_seed else 12)


def test_sam_has_lk_eg_counter_names():
    """lk-eg's train.py reads both counters of any SAM-family optimizer after training."""
    ps = params((3,))
    opt = make(SAM, ps)
    for x in data(ps, 3):
        opt.step(torch_closure(opt, ps, x))
    assert opt.inner_gradient_calculation_counter == opt.inner_fwp_calculation_counter == 3
    with pytest.raises(AttributeError, match="read-only alias of steps"):
        opt.inner_fwp_calculation_counter = 0


# ----------------------------------------------------------------------------- the seeds' loops
def _lk_eg_epoch(opt, base, ps, xs, need_closure, calls):
    """lk-eg utils/engine.py train_one_epoch's pattern, written here: with a closure
    optimizer.step(closure, epoch=..., step=..., ...) (its closure(computeForward,
    computeBackprop)); without one, closure(True, True) then optimizer.step()."""
    for i, x in enumerate(xs):
        returned = []
        closure = lk_eg_closure(opt if need_closure else base, ps, x, returned)
        def counted(computeForward, computeBackprop, f=closure):  # noqa: N803 (the seed's)
            calls.append(1)
            return f(computeForward, computeBackprop)
        if need_closure:
            opt.step(counted, epoch=0, step=i, batch_idx=i, model=None, images=None,
                     targets=None, criterion=None, train_data=None, logger=None)
        else:
            counted(True, True)
            base.step()


@pytest.mark.parametrize("cls, kwargs", [(VaSSO, {}), (VaSSORe, dict(crt="naive", crt_k=1)),
                                         (VaSSOReMu, dict(crt="naive", crt_k=1))])
def test_lk_eg_crt_schedule_switches_from_sgd_without_a_false_refusal(cls, kwargs):
    """lk-eg's --crt schedule: SGD epochs (the base optimizer's own loop leaves its gradients),
    then the SAM optimizer over the same base optimizer. Every SAM step runs both passes
    itself and equals the step of an optimizer whose gradients were cleared before it."""
    ps, twin = params((4,), (2, 3)), params((4,), (2, 3))
    xs = data(ps, 3)
    runs = []
    for p_, clear in ((ps, False), (twin, True)):
        base = torch.optim.SGD(p_, lr=0.05, momentum=0.9)
        opt = cls(params=p_, base_optimizer=base, logger=object(),
                  args=lk_eg_args(**{"rho": 0.1, "theta": 0.4, **kwargs}), backend="reference")
        calls = []
        _lk_eg_epoch(opt, base, p_, xs, False, calls)  # an SGD epoch
        if clear:
            opt.zero_grad()
        calls.clear()
        _lk_eg_epoch(opt, base, p_, xs, True, calls)  # then the SAM epochs
        _lk_eg_epoch(opt, base, p_, xs, False, [])
        _lk_eg_epoch(opt, base, p_, xs, True, calls)
        runs.append(calls)
    assert len(runs[0]) == len(runs[1]) == 2 * 2 * len(xs)
    assert_same_tensors(list(ps), list(twin), "weights")


def test_bingcongli_loop_backward_then_step_closure():
    """BingcongLi/VaSSO utils/engine.py's pattern: forward, optimizer.zero_grad(),
    loss.backward(), optimizer.step(closure, epoch=..., ...) with a closure that returns
    nothing: 2 passes per step (the closure once), the same weights as step(closure) alone."""
    ps, twin = params((5,), (3, 2)), params((5,), (3, 2))
    a, b = make(VaSSO, ps, rho=0.1, theta=0.4), make(VaSSO, twin, rho=0.1, theta=0.4)
    for x in data(ps, 4):
        calls = []

        def closure():
            calls.append(1)
            loss = sum((torch.sin(p) * xi).sum() + 0.5 * (p ** 2).sum() for p, xi in zip(ps, x))
            loss.backward()
        loss = sum((torch.sin(p) * xi).sum() + 0.5 * (p ** 2).sum() for p, xi in zip(ps, x))
        a.zero_grad()
        loss.backward()
        a.step(closure, epoch=0, step=0, batch_idx=0, model=None, train_data=None, logger=None)
        assert len(calls) == 1
        b.step(torch_closure(b, twin, x))
    assert_same_tensors(list(ps), list(twin), "weights")


def test_davda54_step_closure_variant():
    """davda54's README: loss.backward() at w, then optimizer.step(closure) whose closure has
    no zero_grad inside, then optimizer.zero_grad() — the same steps as first/second_step."""
    ps, twin = params((6,), (2, 2)), params((6,), (2, 2))
    a, b = make(SAM, ps, rho=0.1), make(SAM, twin, rho=0.1)
    for x in data(ps, 3):
        def loss_of(p_):
            return sum((torch.sin(p) * xi).sum() + 0.5 * (p ** 2).sum() for p, xi in zip(p_, x))

        def closure():
            loss = loss_of(ps)
            loss.backward()
            return loss
        loss_of(ps).backward()
        a.step(closure)
        a.zero_grad()
        loss_of(twin).backward()
        b.first_step(zero_grad=True)
        loss_of(twin).backward()
        b.second_step(zero_grad=True)
    assert_same_tensors(list(ps), list(twin), "weights")
