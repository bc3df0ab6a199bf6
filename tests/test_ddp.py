"""DistributedDataParallel with every algorithm: 2 processes, gloo on CPU, each on its own data
shard, against a single-process simulation of the per-rank rule:

- pass 1 runs under `model.no_sync()`: each rank perturbs with its own gradient;
- SAM/ASAM/VaSSO*: the last pass (at each rank's own w + e) is averaged by DDP, and every rank
  takes the same base step with that average;
- GSAM/GAM: every pass per rank, each rank forms its own final gradient, and those are averaged
  (one bucketed all-reduce) before the base step.

Both `step(closure)` and a hand-written loop with `pass_context()` are checked, and
`max_grad_norm` (clips the averaged gradient) and a GradScaler with an inf in one rank's pass 1
(every rank skips that step and backs off alike)."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training_helpers import (ALGORITHMS, MLP, SCALE, InfInjector, loss_fn, make_batches,
                              make_closure, make_optimizer, manual_step, scaler_cpu)

WORLD = 2
STEPS = 4
MAX_NORM = 0.2
BAD_STEP = 2  # every algorithm runs pass 1 in this step (VaSSORe recomputes at even steps)
#: (algorithm, api, option) runs done in the 2-process job; option: None, "clip" (max_grad_norm)
#: or "amp" (GradScaler; rank 0 alone gets an inf gradient in pass 1 of BAD_STEP)
RUNS = [(name, api, None) for name in ALGORITHMS for api in ("closure", "manual")] + \
       [(name, "closure", "clip") for name in ("SAM", "GSAM") if name in ALGORITHMS] + \
       [(name, "closure", "amp") for name in ALGORITHMS]


def shards(rank):
    """Rank `rank`'s half of every batch."""
    return [(x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])
            for x, y in make_batches(STEPS, dtype=torch.float64)]


def fresh_model():
    torch.manual_seed(0)
    return MLP().double()


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        results = {}
        for name, api, option in RUNS:
            model = fresh_model()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            scaler = scaler_cpu() if option == "amp" else None
            injector = InfInjector(model.fc1.weight)
            opt = make_optimizer(name, ddp.parameters(), torch.optim.SGD, lr=0.1,
                                 momentum=0.9, model=ddp, grad_scaler=scaler,
                                 max_grad_norm=MAX_NORM if option == "clip" else None)
            for t, (x, y) in enumerate(shards(rank)):
                injector.calls = 0
                injector.at = 0 if option == "amp" and rank == 0 and t == BAD_STEP else None
                if api == "closure":
                    opt.step(make_closure(opt, ddp, x, y, scaler))
                else:
                    manual_step(opt, lambda: loss_fn(ddp, x, y).backward())
                if scaler is not None:
                    scaler.update()
            results[(name, api, option)] = (
                [p.detach().clone() for p in model.parameters()],
                scaler.get_scale() if scaler is not None else None)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # saved: skip the interpreter teardown, where gloo's threads can abort


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Trains every run of RUNS once in a 2-process gloo job; {run: [weights of rank r]}."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    per_rank = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    return {run: [res[run] for res in per_rank] for run in RUNS}


def simulate(name, max_norm=None, skip_step=None):
    """The per-rank rule in one process, one model copy (and optimizer) per rank; the batch of
    `skip_step` left out."""
    model = fresh_model()
    ranks = [copy.deepcopy(model) for _ in range(WORLD)]
    data = [[b for t, b in enumerate(shards(r)) if t != skip_step] for r in range(WORLD)]
    steps = len(data[0])
    cls = type(make_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], torch.optim.SGD,
                              lr=0.1))
    if cls.sync == "none":  # every pass per rank, the final gradient averaged once
        # each rank forms its final gradient alone (an lr = 0 base keeps w); the mean of
        # those is clipped and applied by one base optimizer
        opts = [make_optimizer(name, m.parameters(), torch.optim.SGD, lr=0.0, model=m)
                for m in ranks]
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for t in range(steps):
            finals = []
            for m, opt, d in zip(ranks, opts, data):
                with torch.no_grad():
                    for p, q in zip(m.parameters(), model.parameters()):
                        p.copy_(q)
                opt.step(make_closure(opt, m, *d[t]))
                finals.append([p.grad.clone() for p in m.parameters()])
            for p, *g in zip(model.parameters(), *finals):
                p.grad = sum(g) / WORLD
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            base.step()
        return list(model.parameters())
    # lock-step: every rank's pass 1 and perturbation alone, then the last pass's gradients
    # averaged over the ranks (what DDP does) before each rank's second_step
    opts = [make_optimizer(name, m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                           model=m, max_grad_norm=max_norm) for m in ranks]
    for t in range(steps):
        for m, opt, d in zip(ranks, opts, data):
            opt.zero_grad()
            if opt.needs_inner_pass() if hasattr(opt, "needs_inner_pass") else True:
                loss_fn(m, *d[t]).backward()
            opt.first_step(zero_grad=True)
            loss_fn(m, *d[t]).backward()
        for ps in zip(*[m.parameters() for m in ranks]):
            mean = sum(p.grad for p in ps) / WORLD
            for p in ps:
                p.grad = mean.clone()
        for opt in opts:
            opt.second_step(zero_grad=True)
    for a, b in zip(ranks[0].parameters(), ranks[1].parameters()):
        assert torch.equal(a, b)
    return list(ranks[0].parameters())


@pytest.mark.parametrize("run", RUNS, ids=lambda r: "-".join(map(str, r)))
def test_ddp_matches_per_rank_simulation(ddp_results, run):
    name, api, option = run
    (rank0, scale0), (rank1, scale1) = ddp_results[run]
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)  # the replicas stayed identical
    if option == "amp":
        assert scale0 == scale1 == SCALE / 2  # both backed off, though one rank saw the inf
    expected = simulate(name, MAX_NORM if option == "clip" else None,
                        BAD_STEP if option == "amp" else None)
    for a, b in zip(rank0, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert not torch.equal(rank0[0], fresh_model().fc1.weight)  # it trained


def test_pass_one_really_is_per_rank(ddp_results):
    """A synchronised pass 1 (one perturbation from the global gradient) would give SAM on the
    whole batch; the DDP run is measurably different from that."""
    model = fresh_model()
    opt = make_optimizer("SAM", model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for x, y in make_batches(STEPS, dtype=torch.float64):
        opt.step(make_closure(opt, model, x, y))
    ddp_weights = ddp_results[("SAM", "closure", None)][0][0]
    gap = max((a - b).abs().max().item() for a, b in zip(ddp_weights, model.parameters()))
    assert gap > 1e-6
