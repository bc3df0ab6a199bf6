"""Distributed checkpoints (torch.distributed.checkpoint) of our optimizers under FSDP2, 2 gloo
ranks on CPU: `sam_kernels.checkpoint.get/set_optimizer_state_dict` round trip (in memory and
through dcp.save / dcp.load) resumes bit-exactly, own state (VaSSO's EMA) included; handing
one of our optimizers to torch's DCP functions directly raises and changes nothing."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._pytree import tree_map

import sam_kernels
from sam_kernels.checkpoint import get_optimizer_state_dict, set_optimizer_state_dict

WORLD = 2
STEPS, SPLIT = 5, 2  # train SPLIT steps, checkpoint, resume for the rest


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 1)).double()


def _shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _optimizer(name, model):
    base = dict(lr=0.1, momentum=0.9)
    if name == "SAM":
        return sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=0.1, **base)
    if name == "GSAM":
        return sam_kernels.GSAM(model.parameters(), torch.optim.SGD, model, 0.3, rho=0.1, **base)
    return sam_kernels.VaSSO(model.parameters(), torch.optim.SGD, rho=0.1, theta=0.5, **base)


def _batches(rank):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        y = torch.randn(8, 1, generator=g, dtype=torch.float64)
        out.append((x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]))
    return out


def _step(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss
    opt.step(closure)


def _copy(t):
    return t.detach().clone() if torch.is_tensor(t) else t


def _full(model):
    return [p.full_tensor().clone() for p in model.parameters()]


def _worker(rank, init_file, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.checkpoint.state_dict import \
        get_optimizer_state_dict as torch_get
    from torch.distributed.checkpoint.state_dict import \
        set_optimizer_state_dict as torch_set
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    results = {}
    try:
        batches = _batches(rank)
        for name in ("SAM", "GSAM", "VaSSO"):
            for via in ("memory", "disk"):
                model = _shard(_model())
                opt = _optimizer(name, model)
                for x, y in batches[:SPLIT]:
                    _step(opt, model, x, y)
                # DCP's state dicts hold the live tensors: copy them to keep this moment
                osd, msd = tree_map(_copy, (get_optimizer_state_dict(model, opt),
                                            get_model_state_dict(model)))
                if via == "disk":
                    path = os.path.join(out_dir, f"ckpt-{name}")
                    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
                for x, y in batches[SPLIT:]:
                    _step(opt, model, x, y)
                uninterrupted = _full(model)
                # a fresh model and optimizer resume from the checkpoint
                model2 = _shard(_model())
                opt2 = _optimizer(name, model2)
                if via == "disk":
                    # a template with the same own-state layout: one step on throwaway data
                    if name == "VaSSO":
                        _step(opt2, model2, *batches[0])
                    sd = {"model": get_model_state_dict(model2),
                          "optim": get_optimizer_state_dict(model2, opt2)}
                    dcp.load(sd, checkpoint_id=path)
                    msd, osd = sd["model"], sd["optim"]
                set_model_state_dict(model2, msd)
                set_optimizer_state_dict(model2, opt2, osd)
                for x, y in batches[SPLIT:]:
                    _step(opt2, model2, x, y)
                results[(name, via)] = (uninterrupted, _full(model2))
        # torch's own functions refuse our optimizer and change nothing (lr, grads)
        model = _shard(_model())
        opt = _optimizer("VaSSO", model)
        refused = []
        for call in (lambda: torch_get(model, opt),
                     lambda: torch_set(model, opt, get_optimizer_state_dict(model, opt))):
            try:
                call()
                refused.append("no error")
            except TypeError as exc:
                refused.append(str(exc))
        results["refused"] = refused
        results["lr"] = [g["lr"] for g in opt.param_groups]
        results["grads"] = [p.grad for p in model.parameters()]
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    os._exit(0)  # saved: skip the interpreter teardown, where gloo's threads can abort


@pytest.fixture(scope="module")
def dcp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("via", ["memory", "disk"])
@pytest.mark.parametrize("name", ["SAM", "GSAM", "VaSSO"])
def test_dcp_round_trip_resumes_bit_exactly(dcp_results, name, via):
    for res in dcp_results:
        uninterrupted, resumed = res[(name, via)]
        for a, b in zip(resumed, uninterrupted):
            assert torch.equal(a, b), (name, via, (a - b).abs().max())


def test_torch_dcp_functions_refuse_our_optimizers_and_change_nothing(dcp_results):
    for res in dcp_results:
        assert all("use sam_kernels.checkpoint" in msg for msg in res["refused"]), res["refused"]
        assert res["lr"] == [0.1]
        assert all(g is None for g in res["grads"])
