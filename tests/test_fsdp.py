"""Sharded training (FSDP2 `fully_shard`, HSDP, FSDP1) with every algorithm: 2 processes (HSDP: 4,
a 2 × 2 mesh), gloo on CPU, float64, a model with uneven and empty shards and BatchNorm, each
rank on its share of every batch. The rule under test (README, "Sharded training"): every pass
is synchronised by FSDP and every statistic is reduced over the shards, so a step equals the
same algorithm run in ONE process on the WHOLE batch — compared here with the independent
per-tensor float64 implementations of test_sam / test_gsam / test_gam / test_vasso run on the
full batch (BatchNorm normalising each rank's share on its own, as the ranks do).

One spawn per world size runs every case (fixtures below); each test then compares what the
ranks saved. A case that raised on a rank reports that rank's error and traceback."""
import collections
import functools
import math
import os
import re

import pytest
import torch
import torch.multiprocessing as mp

import fsdp_helpers as H
from test_gam import reference_gam_step
from test_gsam import reference_gsam_step
from test_sam import reference_sam_run
from test_vasso import WARMUP as VASSO_ORACLE_WARMUP
from test_vasso import oracle_run, two_groups

# Collectives one step adds to FSDP's own (FSDP's own = passes × what one forward+backward of
# plain SGD costs, measured in the same job). Each is one all-reduce of a small tensor over the
# shard group; several scalars needed at one point share one all-reduce.
EXTRA_COLLECTIVES = {
    "SAM": 1,    # the perturbation norm
    "ASAM": 1,   # the weighted perturbation norm
    "GSAM": 2,   # the perturbation norm; [<g, g_p>, |g|², |g_p|²] in one 3-element all-reduce
    "GAM": 4,    # three perturbation norms; one 3-element all-reduce for the decomposition
    "VaSSO": 1,  # |EMA|² fused with the EMA update
}


def extra_collectives(name, inner, next_inner):
    """Per step of VaSSORe (cosSim): the criterion's 3 statistics in one all-reduce, and |EMA|²
    when pass 1 ran (`inner`). VaSSOReMu (gSAMratio): the criterion's norm, |EMA|² when pass 1
    ran, and — at the end of a step followed by a reusing one (`next_inner` False) — the norm
    of the EMA updated from the outer gradient, which that step perturbs with."""
    if name == "VaSSORe":
        return 1 + (1 if inner else 0)
    if name == "VaSSOReMu":
        return 1 + (1 if inner else 0) + (0 if next_inner else 1)
    return EXTRA_COLLECTIVES[name]


AMP_EXTRA_PER_PASS = 1  # found_inf max-reduced once per unscaled pass (FSDP2: by DTensor)
AMP_EXTRA_PER_STEP = 0  # nothing more: that flag is already the same on every rank
CLIP_EXTRA = 1  # the clipping norm
RTOL, ATOL = 1e-12, 1e-13

APIS = ("closure", "manual")
WRAPS = {"fsdp2": ("fsdp2", True), "fsdp2-noreshard": ("fsdp2", False),
         "fsdp1": ("fsdp1", True)}
CLIPPED = ("SAM", "GSAM")
# FlatParameter mixes every tensor of an FSDP unit in one parameter, so per-group settings (the
# VaSSO references use two groups) cannot be expressed: the one-group algorithms run on it
FLAT_ALGORITHMS = ("SAM", "ASAM", "GSAM", "GAM")
RESUMED = [("SAM", "fsdp2"), ("GSAM", "fsdp2"), ("VaSSORe", "fsdp2"), ("SAM", "fsdp1"),
           ("VaSSO", "fsdp1")]
AMP = [(a, "fsdp2") for a in H.ALGORITHMS] + [(a, "fsdp1") for a in ("SAM", "GSAM", "VaSSO")]


def _train_id(algo, api, wrap, option=None):
    return "-".join(filter(None, ("train", algo, api, wrap, option)))


CASES2 = (
    [dict(id=f"sgd-{w}", kind="sgd", wrap=w) for w in WRAPS] +
    [dict(id="handmade-global", kind="handmade", global_norm=True),
     dict(id="handmade-local", kind="handmade", global_norm=False)] +
    [dict(id=_train_id(a, api, w), kind="train", algo=a, api=api, wrap=w, count=True)
     for a in H.ALGORITHMS for w in WRAPS for api in APIS] +
    [dict(id=_train_id("SAM", "closure", "fsdp2", "nomodel"), kind="train", algo="SAM",
          api="closure", wrap="fsdp2", model=False, count=True)] +
    [dict(id=_train_id(a, "closure", "fsdp1flat"), kind="train", algo=a, api="closure",
          wrap="fsdp1flat") for a in FLAT_ALGORITHMS] +
    [dict(id=_train_id(a, "closure", w, "clip"), kind="train", algo=a, api="closure", wrap=w,
          option="clip", count=True) for a in CLIPPED for w in ("fsdp2", "fsdp1")] +
    [dict(id=_train_id(a, "closure", w, o), kind="train", algo=a, api="closure", wrap=w,
          option=o, count=(o == "amp")) for a, w in AMP for o in ("amp", "skip")] +
    [dict(id=_train_id("SAM", "closure", "fsdp1", "amp-plain"), kind="train", algo="SAM",
          api="closure", wrap="fsdp1", option="amp-plain")] +
    [dict(id=_train_id(a, api, w, "accum"), kind="train", algo=a, api=api, wrap=w,
          option="accum") for a in ("SAM", "GSAM") for api, w in (("closure", "fsdp2"),
                                                                  ("manual", "fsdp1"))] +
    [dict(id="lastnorm", kind="lastnorm"), dict(id="restore-fsdp2", kind="restore", wrap="fsdp2"),
     dict(id="restore-fsdp1", kind="restore", wrap="fsdp1"),
     dict(id="backups", kind="backups")] +
    [dict(id=f"resume-{a}-{w}", kind="resume", algo=a, wrap=w) for a, w in RESUMED] +
    [dict(id=f"dcp-{a}", kind="dcp", algo=a) for a in ("VaSSO", "GSAM")] +
    [dict(id=f"nomodel-{w}", kind="nomodel", wrap=w) for w in ("fsdp1", "fsdp1flat")]
)
CASES4 = (
    [dict(id="sgd-hsdp", kind="sgd", wrap="hsdp")] +
    [dict(id=_train_id(a, "closure", "hsdp"), kind="train", algo=a, api="closure", wrap="hsdp",
          count=True) for a in H.ALGORITHMS] +
    [dict(id=_train_id("SAM", "manual", "hsdp"), kind="train", algo="SAM", api="manual",
          wrap="hsdp", count=True)]
)


# ----------------------------------------------------------------------------- the ranks' side
def _wrapped(case, groups):
    kind, raf = WRAPS.get(case.get("wrap"), (case.get("wrap", "fsdp2"), True))
    model = H.fresh_model()
    return H.wrap(model, kind, groups, raf), kind


def _scaler(kind):
    if kind.startswith("fsdp1"):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler("cpu", init_scale=H.SCALE, growth_interval=10_000)
    return torch.amp.GradScaler("cpu", init_scale=H.SCALE, growth_interval=10_000)


def run_case(case, rank, world, groups):
    kind_of = case["kind"]
    if kind_of == "sgd":  # FSDP's own collectives per forward+backward (+ a plain step)
        module, kind = _wrapped(case, groups)
        opt = torch.optim.SGD(module.parameters(), lr=H.LR)
        log = []
        for x, y in H.rank_batches(rank, world, steps=3):
            with H.Collectives() as mode:
                opt.zero_grad()
                H.loss_of(module, x, y).backward()
                opt.step()
            log.append(mode.ops)
        return {"log": log}
    if kind_of == "handmade":
        module, kind = _wrapped(dict(wrap="fsdp2"), groups)
        H.handmade_sam(module, H.rank_batches(rank, world), case["global_norm"],
                       groups["world"])
        return {"state": H.full_state(module, kind)}
    if kind_of == "train":
        module, kind = _wrapped(case, groups)
        option = case.get("option")
        scaler = _scaler(kind) if option == "amp" else \
            torch.amp.GradScaler("cpu", init_scale=H.SCALE, growth_interval=10_000) \
            if option == "amp-plain" else None
        opt = H.build_optimizer(case["algo"], module, model=case.get("model", True),
                                grad_scaler=scaler,
                                max_grad_norm=H.MAX_NORM if option == "clip" else None)
        batches = H.rank_batches(rank, world, skip=H.BAD_STEP if option == "skip" else None)
        log = H.train(module, opt, batches, case["api"], rank, scaler,
                      bad_step=H.BAD_STEP if option in ("amp", "amp-plain") else None,
                      count=case.get("count", False), micro=2 if option == "accum" else 1,
                      bad_pass=3 if case["algo"] == "GAM" else 1)
        return {"state": H.full_state(module, kind), "log": log,
                "scale": scaler.get_scale() if scaler is not None else None,
                "scratch": H.scratch_summary(opt)}
    if kind_of == "lastnorm":  # max_grad_norm's norm vs torch's on the DTensor gradients
        module, kind = _wrapped(dict(wrap="fsdp2"), groups)
        opt = H.build_optimizer("SAM", module, max_grad_norm=H.MAX_NORM)
        pairs = []
        for x, y in H.rank_batches(rank, world, steps=3):
            opt.zero_grad()
            with opt.pass_context():
                H.loss_of(module, x, y).backward()
            opt.first_step(zero_grad=True)
            with opt.pass_context():
                H.loss_of(module, x, y).backward()
            ours_input = [p.grad.detach().clone() for p in module.parameters()]
            theirs = torch.nn.utils.get_total_norm(ours_input)
            opt.second_step(zero_grad=True)
            ours = opt.last_grad_norm
            pairs.append((float(ours.full_tensor() if hasattr(ours, "full_tensor") else ours),
                          float(theirs.full_tensor() if hasattr(theirs, "full_tensor")
                                else theirs)))
        return {"pairs": pairs}
    if kind_of == "restore":  # lr = 0: a step must give back the very same bits
        module, kind = _wrapped(case, groups)
        opt = H.build_optimizer("SAM", module, lr=0.0)
        before = H.local_params(module)
        moved = []
        for x, y in H.rank_batches(rank, world, steps=3):
            opt.zero_grad()
            with opt.pass_context():
                H.loss_of(module, x, y).backward()
            opt.first_step(zero_grad=True)
            moved.append(any(not torch.equal(a, b) for a, b in
                             zip(H.local_params(module), before)))
            with opt.pass_context():
                H.loss_of(module, x, y).backward()
            opt.second_step(zero_grad=True)
        after = H.local_params(module)
        return {"moved": moved, "exact": all(torch.equal(a, b) for a, b in zip(after, before))}
    if kind_of == "backups":  # persistent buffers: one shard-sized set, stable storage
        module, kind = _wrapped(dict(wrap="fsdp2"), groups)
        opt = H.build_optimizer("SAM", module)
        seen = {}

        def on_step(t, opt):
            seen[t] = (H.scratch_summary(opt),
                       [H.local(p).data_ptr() for p in module.parameters()])
        H.train(module, opt, H.rank_batches(rank, world), "closure", on_step=on_step)
        return {"seen": seen, "n_params": len(list(module.parameters())),
                "local_numels": [H.local(p).numel() for p in module.parameters()]}
    if kind_of == "resume":  # per-rank state_dict()/load_state_dict() through torch.save
        batches = H.rank_batches(rank, world)
        module, kind = _wrapped(case, groups)
        opt = H.build_optimizer(case["algo"], module)
        H.train(module, opt, batches, "closure", rank)
        straight = H.local_state(module)
        module, kind = _wrapped(case, groups)
        opt = H.build_optimizer(case["algo"], module)
        H.train(module, opt, batches[:4], "closure", rank)
        saved = H.save_bytes((H.local_state(module), opt.state_dict()))
        module, kind = _wrapped(case, groups)
        opt = H.build_optimizer(case["algo"], module)
        weights, sd = torch.load(saved, weights_only=False)
        H.load_local_state(module, weights)
        opt.load_state_dict(sd)
        H.train(module, opt, batches[4:], "closure", rank)
        resumed = H.local_state(module)
        return {"exact": all(torch.equal(a, b) for a, b in zip(straight, resumed)),
                "moved": not all(torch.equal(a, b) for a, b in zip(straight, weights))}
    if kind_of == "dcp":  # distributed checkpoints: sam_kernels.checkpoint round trip
        from torch.distributed.checkpoint import state_dict as torch_dcp

        from sam_kernels.checkpoint import get_optimizer_state_dict, set_optimizer_state_dict
        batches = H.rank_batches(rank, world)
        module, kind = _wrapped(dict(wrap="fsdp2"), groups)
        opt = H.build_optimizer(case["algo"], module)
        H.train(module, opt, batches, "closure", rank)
        straight = H.local_state(module)
        module, kind = _wrapped(dict(wrap="fsdp2"), groups)
        opt = H.build_optimizer(case["algo"], module)
        H.train(module, opt, batches[:4], "closure", rank)
        opt.zero_grad(set_to_none=True)  # the usual moment to checkpoint
        lrs = [g["lr"] for g in opt.param_groups]
        refused = None
        try:  # torch's own function must refuse (it would call step() and drop own state)
            torch_dcp.get_optimizer_state_dict(module, opt)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            refused = str(exc)
        untouched = [g["lr"] for g in opt.param_groups] == lrs and \
            all(p.grad is None for p in module.parameters())
        osd = get_optimizer_state_dict(module, opt)
        weights = H.local_state(module)
        module, kind = _wrapped(dict(wrap="fsdp2"), groups)
        opt = H.build_optimizer(case["algo"], module)
        H.load_local_state(module, weights)
        set_optimizer_state_dict(module, opt, osd)
        H.train(module, opt, batches[4:], "closure", rank)
        resumed = H.local_state(module)
        return {"exact": all(torch.equal(a, b) for a, b in zip(straight, resumed)),
                "refused": refused, "untouched": untouched,
                "own_keys": sorted(osd.get("sam", {}).get("state", {}))}
    if kind_of == "nomodel":  # FSDP1 without model=: the optimizer cannot see the shards
        module, kind = _wrapped(case, groups)
        before = H.local_state(module)
        error = None
        try:
            opt = H.build_optimizer("SAM", module, model=False)
            H.train(module, opt, H.rank_batches(rank, world, steps=1), "closure", rank)
        except (ValueError, RuntimeError, TypeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        unchanged = all(torch.equal(a, b) for a, b in zip(before, H.local_state(module)))
        return {"error_message": error, "unchanged": unchanged}
    raise ValueError(kind_of)


def _worker(rank, world, init_file, out_dir, cases):
    H.run_cases(rank, world, init_file, out_dir, cases, run_case)


def _spawn(tmp_path_factory, world, cases, name):
    only = os.environ.get("SAM_KERNELS_FSDP_CASES")  # a regex over case ids, for debugging
    if only:
        cases = [c for c in cases if re.search(only, c["id"])]
    if not cases:
        return {}
    out = tmp_path_factory.mktemp(name)
    mp.spawn(_worker, args=(world, str(out / "store"), str(out), cases), nprocs=world,
             join=True)
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return {c["id"]: [res[c["id"]] for res in per_rank] for c in cases}


@pytest.fixture(scope="module")
def res2(tmp_path_factory):
    """{case id: [what rank r saved]} of the 2-process job."""
    return _spawn(tmp_path_factory, H.WORLD, CASES2, "fsdp2ranks")


@pytest.fixture(scope="module")
def res4(tmp_path_factory):
    """{case id: [what rank r saved]} of the 4-process HSDP job."""
    return _spawn(tmp_path_factory, 4, CASES4, "hsdp4ranks")


def ok(results, case_id):
    """The per-rank results of a case; fails with the first rank's error if any raised."""
    if case_id not in results:
        pytest.skip(f"case {case_id} not selected by SAM_KERNELS_FSDP_CASES")
    per_rank = results[case_id]
    for r, res in enumerate(per_rank):
        if "error" in res:
            pytest.fail(f"{case_id} raised on rank {r}: {res['error']}\n{res['traceback']}")
    return per_rank


# ----------------------------------------------------------------------------- the references
class ClippedSGD(torch.optim.SGD):
    """SGD that first clips the gradients of all its parameters with
    torch.nn.utils.clip_grad_norm_ (the single-process meaning of max_grad_norm)."""

    def __init__(self, params, max_norm=None, **kw):
        super().__init__(params, **kw)
        self.max_norm = max_norm

    def step(self, closure=None):
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]
                                            if p.grad is not None], self.max_norm)
        return super().step(closure)


@functools.lru_cache(maxsize=None)
def reference(algo, world=H.WORLD, skip=None, clip=None):
    """The algorithm in one process on the full batches (step `skip` left out), per tensor in
    float64. Returns {name: tensor}: parameters, and 'rank{r}.<buffer>' for the BatchNorm
    statistics rank r's share produced."""
    model = H.fresh_model(ghost=world)
    data = [b for t, b in enumerate(H.full_batches()) if t != skip]
    sgd = dict(lr=H.LR, momentum=H.MOMENTUM)
    if algo in ("SAM", "ASAM"):
        rho, adaptive, eta = (0.05, False, 0.0) if algo == "SAM" else (0.5, True, 0.01)
        reference_sam_run(
            model, lambda m: [dict(params=list(m.parameters()), rho=rho, adaptive=adaptive,
                                   eta=eta)],
            lambda groups: ClippedSGD(groups, clip, **sgd), data, eps=1e-12)
    elif algo in ("GSAM", "GAM"):
        base = ClippedSGD(model.parameters(), clip, **sgd)
        for x, y in data:
            if algo == "GSAM":
                reference_gsam_step(model, base, x, y, rho=0.05, alpha=0.3, adaptive=False)
            else:
                reference_gam_step(model, base, x, y, 0.03, 0.05, False)
    else:
        assert clip is None
        criterion, ckw = H.VASSO_RE.get(algo, ("naive", {"k": 1}))
        oracle_run(model, algo.lower(), criterion, ckw, data, eps=1e-7, seed=3)
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    for r, b in enumerate(model.ghost_bn):
        out[f"rank{r}.running_mean"] = b.running_mean.clone()
        out[f"rank{r}.running_var"] = b.running_var.clone()
    return out


def assert_matches_reference(per_rank, ref, what, buffers=True):
    for r, res in enumerate(per_rank):
        state = res["state"]
        for name in H.PARAM_NAMES:
            torch.testing.assert_close(state[name], ref[name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{what}, rank {r}, {name}: {m}")
        if buffers:  # BatchNorm statistics: this rank's share, frozen at perturbed weights
            for buf in ("running_mean", "running_var"):
                torch.testing.assert_close(state[f"bn.{buf}"], ref[f"rank{r}.{buf}"],
                                           rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{what}, rank {r}, bn.{buf}: {m}")
    start = H.fresh_model().state_dict()
    assert not torch.equal(per_rank[0]["state"]["fc1.weight"], start["fc1.weight"])  # trained


# ----------------------------------------------------------------------------- the harness itself
def test_reference_configuration_is_test_vasso_s():
    """vasso_groups (by name, for FSDP1's flat slices) builds what test_vasso.two_groups does,
    and the VaSSO oracle's warm-up is the one the optimizers here are given."""
    model = H.fresh_model()
    ours, theirs = H.vasso_groups(list(model.named_parameters())), two_groups(model)
    for a, b in zip(ours, theirs):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        assert {k: v for k, v in a.items() if k != "params"} == \
            {k: v for k, v in b.items() if k != "params"}
    assert H.VASSO_WARMUP == VASSO_ORACLE_WARMUP


@pytest.mark.parametrize("algo", H.ALGORITHMS)
def test_optimizers_match_their_references_in_one_process(algo):
    """Checks the harness: each optimizer as build_optimizer configures it, in one process on
    the full batch (BatchNorm per rank share), equals its reference — so a sharded run that
    differs from the reference differs because of sharding."""
    model = H.fresh_model(ghost=H.WORLD)
    H.train(model, H.build_optimizer(algo, model), H.full_batches(), "closure")
    ref = reference(algo)
    for name in H.PARAM_NAMES:
        torch.testing.assert_close(model.state_dict()[name], ref[name], rtol=RTOL, atol=ATOL)


def test_vassore_criteria_fire_both_ways_in_the_reference():
    """Within the run, the statistics-driven criteria both recompute and reuse after warm-up
    (else a rank deciding from its own shard would not be caught)."""
    for algo, (criterion, ckw) in H.VASSO_RE.items():
        decisions = oracle_run(H.fresh_model(ghost=H.WORLD), algo.lower(), criterion, ckw,
                               H.full_batches(), eps=1e-7, seed=3)
        after = decisions[H.VASSO_WARMUP + 1:]
        assert True in after and False in after, (algo, decisions)


def test_shard_aware_handmade_sam_matches_reference(res2):
    """Checks the harness, independent of sam_kernels: SAM on FSDP2's local shards with the
    shard sums of squares all-reduced equals the single-process full-batch reference."""
    assert_matches_reference(ok(res2, "handmade-global"), reference("SAM"), "handmade SAM")


def test_local_shard_norm_fails_the_check(res2):
    """The check can fail: normalising with each rank's own shard norm (what a shard-unaware
    SAM does) is far from the full-batch run."""
    per_rank = ok(res2, "handmade-local")
    ref = reference("SAM")
    gap = H.max_rel_diff([per_rank[0]["state"][n] for n in H.PARAM_NAMES],
                         [ref[n] for n in H.PARAM_NAMES])
    assert gap > 1e-3
    with pytest.raises(AssertionError):
        assert_matches_reference(per_rank, ref, "local-norm SAM", buffers=False)


# ----------------------------------------------------------------------------- the maths
@pytest.mark.parametrize(
    "algo, api, wrap",
    [(a, api, w) for a in H.ALGORITHMS for api in APIS for w in WRAPS] +
    # FlatParameter: step(closure) (the manual API differs in nothing the strategy sees)
    [(a, "closure", "fsdp1flat") for a in FLAT_ALGORITHMS])
def test_matches_single_process_full_batch(res2, algo, api, wrap):
    per_rank = ok(res2, _train_id(algo, api, wrap))
    assert_matches_reference(per_rank, reference(algo), f"{algo} {api} {wrap}")


def test_fsdp2_detected_without_model(res2):
    """FSDP2 needs no model=: the DTensor parameters say it (no BatchNorm freezing then, so
    the weights are compared, not the statistics)."""
    per_rank = ok(res2, _train_id("SAM", "closure", "fsdp2", "nomodel"))
    assert_matches_reference(per_rank, reference("SAM"), "SAM without model=", buffers=False)


@pytest.mark.parametrize("algo", H.ALGORITHMS)
def test_hsdp_matches_single_process_full_batch(res4, algo):
    """HSDP (2 replicas × 2 shards): statistics reduced over the shard dimension only."""
    per_rank = ok(res4, _train_id(algo, "closure", "hsdp"))
    assert_matches_reference(per_rank, reference(algo, world=4), f"{algo} HSDP")


def test_hsdp_manual_api(res4):
    assert_matches_reference(ok(res4, _train_id("SAM", "manual", "hsdp")),
                             reference("SAM", world=4), "SAM manual HSDP")


# ----------------------------------------------------------------------------- collectives
def _fsdp_per_pass(results, wrap, rank):
    """FSDP's own collectives for one forward+backward, as a Counter of (op, group's ranks,
    elements): plain SGD, after the lazy first step (HSDP's include the replicate all-reduce)."""
    logs = ok(results, f"sgd-{wrap}")[rank]["log"]
    per_step = [collections.Counter(ops) for ops in logs[1:]]
    assert all(c == per_step[0] for c in per_step), logs
    return per_step[0]


def _shard_group(rank, world):
    """The ranks holding the other shards of rank's parameters: all of them, or (HSDP) its row
    of the (replicate, shard) mesh."""
    if world == math.prod(H.HSDP_SHAPE):
        row = rank // H.HSDP_SHAPE[1]
        return tuple(range(row * H.HSDP_SHAPE[1], (row + 1) * H.HSDP_SHAPE[1]))
    return tuple(range(world))


def _check_collectives(results, case_id, algo, wrap, world, extra_per_pass=0, plus=0):
    """Every step after the first: exactly FSDP's own per pass (+ extra_per_pass) plus the
    algorithm's documented reductions (+ plus), the latter small all-reduces over the shard
    group."""
    for r, res in enumerate(ok(results, case_id)):
        fsdp = _fsdp_per_pass(results, wrap, r)
        log = res["log"]
        for t, (ops, passes, inner) in enumerate(log):
            if t == 0 or (algo == "VaSSOReMu" and t == len(log) - 1):
                continue  # FSDP's lazy initialisation; the next step unknown
            next_inner = log[t + 1][2] if t + 1 < len(log) else None
            expected = passes * (extra_per_pass) + plus + \
                extra_collectives(algo, inner, next_inner)
            counted = collections.Counter(ops)
            own = collections.Counter({k: n * passes for k, n in fsdp.items()})
            assert counted & own == own, f"{case_id} rank {r} step {t}: FSDP's own missing"
            ours = list((counted - own).elements())
            assert len(ours) == expected, (f"{case_id} rank {r} step {t}: {len(ours)} "
                                           f"collectives beyond FSDP's, expected {expected}: "
                                           f"{ours}")
            for name, group, numel in ours:
                assert "all_reduce" in name or "allreduce" in name, ours
                assert numel is not None and numel <= 3, ours  # small statistics only
            if extra_per_pass == 0:  # the optimizer's reductions: over the shard group
                assert all(group == _shard_group(r, world) for _, group, _ in ours), ours


@pytest.mark.parametrize("wrap", list(WRAPS))
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("algo", H.ALGORITHMS)
def test_collectives_per_step(res2, algo, api, wrap):
    _check_collectives(res2, _train_id(algo, api, wrap), algo, wrap, H.WORLD)


@pytest.mark.parametrize("algo", H.ALGORITHMS)
def test_hsdp_collectives_reduce_over_the_shard_dimension(res4, algo):
    _check_collectives(res4, _train_id(algo, "closure", "hsdp"), algo, "hsdp", 4)


@pytest.mark.parametrize("algo", CLIPPED)
def test_clipping_costs_one_collective(res2, algo):
    _check_collectives(res2, _train_id(algo, "closure", "fsdp2", "clip"), algo, "fsdp2",
                       H.WORLD, plus=CLIP_EXTRA)


@pytest.mark.parametrize("algo", ["SAM", "GSAM"])
def test_grad_scaler_costs_one_collective_per_pass(res2, algo):
    _check_collectives(res2, _train_id(algo, "closure", "fsdp2", "amp"), algo, "fsdp2",
                       H.WORLD, extra_per_pass=AMP_EXTRA_PER_PASS, plus=AMP_EXTRA_PER_STEP)


# ----------------------------------------------------------------------------- memory, restore
def test_backups_one_shard_sized_buffer_per_parameter_with_stable_storage(res2):
    for r, res in enumerate(ok(res2, "backups")):
        seen = res["seen"]
        first, last = seen[1], seen[max(seen)]
        assert "backup" in last[0], last[0]
        backups = last[0]["backup"]
        assert len(backups) == res["n_params"]  # one per parameter after many steps
        for buf_numel, local_numel, _ in backups:
            assert buf_numel == local_numel  # the shard, never the full parameter
        assert [ptr for *_, ptr in first[0]["backup"]] == [ptr for *_, ptr in backups]
        assert first[1] == last[1]  # the parameters' local storage never moves


@pytest.mark.parametrize("algo", H.ALGORITHMS)
def test_persistent_buffers_are_shard_sized(res2, algo):
    for wrap in WRAPS:
        for r, res in enumerate(ok(res2, _train_id(algo, "closure", wrap))):
            for name, bufs in res["scratch"].items():
                assert len(bufs) <= len(H.PARAM_NAMES), (wrap, name, len(bufs))
                for buf_numel, local_numel, _ in bufs:
                    assert buf_numel == local_numel, (wrap, r, name)


@pytest.mark.parametrize("wrap", ["fsdp2", "fsdp1"])
def test_restore_is_bit_exact(res2, wrap):
    for res in ok(res2, f"restore-{wrap}"):
        assert all(res["moved"])  # first_step really moved this rank's shard ...
        assert res["exact"]  # ... and lr = 0 gives back the very same bits


# ----------------------------------------------------------------------------- training loop
@pytest.mark.parametrize("algo, wrap", AMP)
def test_grad_scaler_inf_on_rank0_only_skips_everywhere(res2, algo, wrap):
    """rank 0's local gradient shard gets an inf in the last pass of BAD_STEP (FSDP2:
    GradScaler, FSDP1: ShardedGradScaler): every rank skips that step and backs off alike, and
    the weights are bit for bit those of the run without that batch (BatchNorm statistics are
    not: pass 1 of the skipped step updated them, as in any AMP loop)."""
    amp = ok(res2, _train_id(algo, "closure", wrap, "amp"))
    skip = ok(res2, _train_id(algo, "closure", wrap, "skip"))
    for r, (a, s) in enumerate(zip(amp, skip)):
        assert a["scale"] == H.SCALE / 2, (r, a["scale"])
        for name in H.PARAM_NAMES:
            assert torch.equal(a["state"][name], s["state"][name]), (r, name)
    assert_matches_reference(skip, reference(algo, skip=H.BAD_STEP), f"{algo} skip")


def test_plain_grad_scaler_with_fsdp1_skips_everywhere(res2):
    """FSDP1 with torch.amp.GradScaler (not ShardedGradScaler): the scaler itself does not
    reduce its inf flag over the ranks (plain tensors), so the optimizer must: rank 0 alone
    sees the inf (in the last pass), yet both ranks skip and back off."""
    amp = ok(res2, _train_id("SAM", "closure", "fsdp1", "amp-plain"))
    skip = ok(res2, _train_id("SAM", "closure", "fsdp1", "skip"))
    for r, (a, s) in enumerate(zip(amp, skip)):
        assert a["scale"] == H.SCALE / 2, (r, a["scale"])
        for name in H.PARAM_NAMES:
            assert torch.equal(a["state"][name], s["state"][name]), (r, name)


@pytest.mark.parametrize("wrap", ["fsdp2", "fsdp1"])
@pytest.mark.parametrize("algo", CLIPPED)
def test_max_grad_norm_equals_clip_grad_norm_on_the_full_model(res2, algo, wrap):
    per_rank = ok(res2, _train_id(algo, "closure", wrap, "clip"))
    assert_matches_reference(per_rank, reference(algo, clip=H.MAX_NORM), f"{algo} clip {wrap}")
    assert not torch.equal(per_rank[0]["state"]["fc1.weight"],
                           reference(algo)["fc1.weight"])  # clipping was active


@pytest.mark.parametrize("algo, api, wrap", [(a, api, w) for a in ("SAM", "GSAM")
                                              for api, w in (("closure", "fsdp2"),
                                                             ("manual", "fsdp1"))])
def test_gradient_accumulation(res2, algo, api, wrap):
    """Each pass accumulates two micro-batches (loss / 2 each): the full-batch reference whose
    BatchNorm normalises the 4 micro-batches on their own (world=4 ghost batches: rank r's
    micro-batches are chunks 2r and 2r + 1). Weights only: each rank's BatchNorm statistics
    saw its two micro-batches in turn."""
    per_rank = ok(res2, _train_id(algo, api, wrap, "accum"))
    assert_matches_reference(per_rank, reference(algo, world=4), f"{algo} accumulation",
                             buffers=False)


def test_last_grad_norm_equals_torch_on_dtensors(res2):
    for res in ok(res2, "lastnorm"):
        for ours, theirs in res["pairs"]:
            assert ours == pytest.approx(theirs, rel=1e-13)
            assert theirs > H.MAX_NORM


@pytest.mark.parametrize("algo, wrap", RESUMED)
def test_state_dict_resume_is_bit_exact(res2, algo, wrap):
    for res in ok(res2, f"resume-{algo}-{wrap}"):
        assert res["moved"] and res["exact"]


@pytest.mark.parametrize("algo", ["VaSSO", "GSAM"])
def test_distributed_checkpoint_round_trip(res2, algo):
    """sam_kernels.checkpoint.get/set_optimizer_state_dict carry every state (VaSSO's EMA on
    uneven and empty shards, GSAM's rho_t) and the resumed run is bit-exact; torch's own
    get_optimizer_state_dict refuses our optimizer, pointing there, and changes nothing
    (it would otherwise zero the learning rates and call step() without a closure)."""
    for res in ok(res2, f"dcp-{algo}"):
        assert res["exact"]
        assert res["refused"] is not None and "sam_kernels.checkpoint" in res["refused"], \
            res["refused"]
        assert res["untouched"]
        if algo == "VaSSO":  # the EMA of every parameter, also those with empty shards
            assert res["own_keys"] == sorted(H.PARAM_NAMES), res["own_keys"]


@pytest.mark.parametrize("wrap", ["fsdp1", "fsdp1flat"])
def test_fsdp1_without_model_raises_and_changes_nothing(res2, wrap):
    for res in ok(res2, f"nomodel-{wrap}"):
        message = res["error_message"]
        assert message is not None, "FSDP1 without model= must raise, not train silently"
        assert "FSDP" in message and "model=" in message, message
        assert res["unchanged"]


def test_case_ids_are_unique():
    for cases in (CASES2, CASES4):
        ids = [c["id"] for c in cases]
        assert len(ids) == len(set(ids))

