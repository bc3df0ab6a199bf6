"""Every algorithm of the registry resumes an FSDP2 job from a DCP checkpoint in *fresh
processes* (the way a preempted job resumes: the template passed to dcp.load comes from an
optimizer that never stepped), onto the same number of ranks (bit-exact) and onto one rank
(the same full-batch maths, to rounding)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from algorithms import ALGORITHMS, make
from test_dcp import _model  # the same small double MLP

STEPS, SPLIT = 5, 2
NAMES = list(ALGORITHMS)


def _shard(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    for m in (model[0], model[2], model):
        fully_shard(m, mesh=mesh)
    return model


def _batches(rank, world):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        y = torch.randn(8, 1, generator=g, dtype=torch.float64)
        out.append((x.chunk(world)[rank], y.chunk(world)[rank]))
    return out


def _train(opt, model, batches):
    for x, y in batches:
        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss
        opt.step(closure)


def _worker(rank, world, phase, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from sam_kernels.checkpoint import get_optimizer_state_dict, set_optimizer_state_dict
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init-{phase}", rank=rank,
                            world_size=world)
    results = {}
    try:
        batches = _batches(rank, world)
        for name in NAMES:
            model = _shard(_model(), world)
            opt = make(name, model.parameters())
            path = os.path.join(out_dir, f"ckpt-{name}")
            if phase == "save":
                _train(opt, model, batches[:SPLIT])
                dcp.save({"model": get_model_state_dict(model),
                          "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
                _train(opt, model, batches[SPLIT:])
            else:  # a fresh process: nothing has stepped
                sd = {"model": get_model_state_dict(model),
                      "optim": get_optimizer_state_dict(model, opt)}
                dcp.load(sd, checkpoint_id=path)
                set_model_state_dict(model, sd["model"])
                set_optimizer_state_dict(model, opt, sd["optim"])
                _train(opt, model, batches[SPLIT:])
            results[name] = ([p.full_tensor().clone() for p in model.parameters()],
                             (opt.steps, opt.inner_steps))
        dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"{phase}-rank{rank}.pt"))
        dist.destroy_process_group()
    os._exit(0)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp_resume")
    for phase, world in (("save", 2), ("same", 2), ("one", 1)):
        mp.spawn(_worker, args=(world, phase, str(out)), nprocs=world, join=True)
    return {phase: torch.load(out / f"{phase}-rank0.pt", weights_only=False)
            for phase in ("save", "same", "one")}


@pytest.mark.parametrize("name", NAMES)
def test_resume_in_fresh_processes(resumed, name):
    expected, counters = resumed["save"][name]
    same, same_counters = resumed["same"][name]
    one, one_counters = resumed["one"][name]
    assert counters == same_counters == one_counters == (STEPS, counters[1])
    for a, b, c in zip(expected, same, one):
        assert torch.equal(a, b), (name, (a - b).abs().max())
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-13)
