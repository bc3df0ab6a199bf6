"""Shared by tests/test_fsdp.py and bench/sharded.py: a small model with uneven and empty shards,
its data split over ranks, how to wrap it (FSDP2 `fully_shard`, HSDP, FSDP1), how to build every
algorithm the way the single-process references in test_sam/test_gsam/test_gam/test_vasso run
it, a collective counter, and the worker that runs many cases in one process group and saves
what each produced (the parent compares; see test_ddp.py for the pattern).

Everything here is written against the public API of sam_kernels plus one private attribute
read for inspection only (`_caches`: the persistent per-parameter buffers)."""
import io
import math
import os
import traceback

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import sam_kernels
from training_helpers import make_batches, manual_step

WORLD = 2
HSDP_SHAPE = (2, 2)  # (replicate, shard)
STEPS = 8
BATCH = 16  # 8 per rank on 2 ranks, 4 on 4: BatchNorm sees several samples everywhere
SCALE = 2.0 ** 12  # GradScaler's initial scale: scaling is exact in floating point
# the step whose LAST pass gets an inf on rank 0 only in the GradScaler runs: one in pass 1
# would reach every rank anyway (through the global perturbation norm and the weights it
# perturbs), so only the last pass shows whether the skip decision is shared. Step 2: every
# algorithm runs all its passes there (VaSSORe/VaSSOReMu are still warming up).
BAD_STEP = 2
MAX_NORM = 0.05  # below the final-gradient norms of these runs: clipping is active
LR, MOMENTUM = 0.1, 0.9

# VaSSORe / VaSSOReMu use criteria that decide from reduced gradient statistics (cosSim: a dot
# product and two norms; gSAMratio: a norm), so a rank deciding from its shard alone diverges
VASSO_RE = {"VaSSORe": ("cosSim", dict(c=0.3)), "VaSSOReMu": ("gSAMratio",
                                                            dict(lam=0.5, z=1.02, z_two=1.02))}
VASSO_WARMUP = 2  # tests/test_vasso.py's WARMUP (its oracle hard-codes it)
VASSO_BASE = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)  # test_vasso.BASE
ALGORITHMS = ("SAM", "ASAM", "GSAM", "GAM", "VaSSO", "VaSSORe", "VaSSOReMu")


# ----------------------------------------------------------------------------- model and data
class ShardNet(torch.nn.Module):
    """5 → 7 (BatchNorm) → 1 → 3. Over 2 ranks (Shard(0)): fc1/bn rows split 4 + 3, fc2 (one
    row) empty on rank 1, fc3 split 2 + 1. Under FSDP1 the flat slices are uneven and some
    empty. `ghost=k` (references only): BatchNorm normalises each of k equal chunks of the batch
    on its own, with its own running statistics (ghost_bn[r], weights shared with `bn`) — what
    k ranks each normalising their own shard of the batch compute."""

    def __init__(self, ghost=1):
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 7)
        self.bn = torch.nn.BatchNorm1d(7)
        self.fc2 = torch.nn.Linear(7, 1)
        self.fc3 = torch.nn.Linear(1, 3)
        self.ghost = ghost
        if ghost > 1:
            self.ghost_bn = torch.nn.ModuleList(torch.nn.BatchNorm1d(7) for _ in range(ghost))
            for b in self.ghost_bn:
                b.weight, b.bias = self.bn.weight, self.bn.bias

    def forward(self, x):
        h = self.fc1(x)
        if self.ghost == 1:
            h = self.bn(h)
        else:
            h = torch.cat([b(c) for b, c in zip(self.ghost_bn, h.chunk(self.ghost))])
        return self.fc3(torch.tanh(self.fc2(torch.tanh(h))))


PARAM_NAMES = ("fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias",
               "fc3.weight", "fc3.bias")


def fresh_model(ghost=1):
    torch.manual_seed(0)
    model = ShardNet().double()
    if ghost == 1:
        return model
    twin = ShardNet(ghost).double()
    twin.load_state_dict(model.state_dict(), strict=False)
    return twin


def full_batches(steps=STEPS):
    return make_batches(steps, batch=BATCH, n_in=5, n_out=3, dtype=torch.float64, seed=5)


def rank_batches(rank, world, steps=STEPS, skip=None):
    """Rank `rank`'s equal share of every batch (the step `skip` left out)."""
    return [(x.chunk(world)[rank], y.chunk(world)[rank])
            for t, (x, y) in enumerate(full_batches(steps)) if t != skip]


def clean(name):
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


# ----------------------------------------------------------------------------- wrapping
def make_mesh(kind, groups):
    """The device mesh of `kind` over this case's own process groups (see run_cases)."""
    from torch.distributed.device_mesh import DeviceMesh
    if kind == "hsdp":
        return DeviceMesh.from_group([groups["replicate"], groups["shard"]], "cpu",
                                     mesh=torch.arange(math.prod(HSDP_SHAPE)).view(HSDP_SHAPE),
                                     mesh_dim_names=("replicate", "shard"))
    return DeviceMesh.from_group(groups["world"], "cpu")


def wrap(model, kind, groups, raf=True):
    """kind: 'fsdp2' (1-D mesh), 'hsdp' (2-D mesh, replicate × shard), 'fsdp1' (use_orig_params)
    or 'fsdp1flat' (FlatParameter). Returns the module to train."""
    if kind in ("fsdp2", "hsdp"):
        from torch.distributed.fsdp import fully_shard
        mesh = make_mesh(kind, groups)
        for sub in (model.fc1, model.fc2, model.fc3):
            fully_shard(sub, mesh=mesh, reshard_after_forward=raf)
        fully_shard(model, mesh=mesh, reshard_after_forward=raf)
        return model
    if kind in ("fsdp1", "fsdp1flat"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        return FSDP(model, use_orig_params=(kind == "fsdp1"), device_id=torch.device("cpu"),
                    process_group=groups["world"],
                    auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}))
    raise ValueError(kind)


def local(t):
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state(module, kind):
    """Full (unsharded) parameters and this rank's buffers, by clean name, as plain tensors."""
    if kind.startswith("fsdp1"):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT, cfg):
            sd = module.state_dict()
    else:
        sd = module.state_dict()
    return {clean(k): (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in sd.items()}


def local_state(module):
    """This rank's local shards of the parameters and its buffers (for bit-exact resumes)."""
    return [local(t).detach().clone() for t in list(module.parameters()) +
            list(module.buffers())]


def local_params(module):
    """This rank's local shards of the parameters (copies)."""
    return [local(p).detach().clone() for p in module.parameters()]


def load_local_state(module, saved):
    with torch.no_grad():
        for t, s in zip(list(module.parameters()) + list(module.buffers()), saved):
            local(t).copy_(s)


# ----------------------------------------------------------------------------- optimizers
def vasso_groups(named, adaptive=False):
    """test_vasso.two_groups by name, so it also works on FSDP1's flat 1-D slices: the Linear
    weights in one group, biases and BatchNorm in the other (same hyper-parameters)."""
    big = [p for n, p in named if clean(n).startswith("fc") and clean(n).endswith("weight")]
    rest = [p for n, p in named if not (clean(n).startswith("fc") and
                                        clean(n).endswith("weight"))]
    return [dict(params=big, rho=0.5 if adaptive else 0.1, theta=0.4, adaptive=adaptive,
                 eta=0.01 if adaptive else 0.0),
            dict(params=rest, rho=0.05, theta=0.7, adaptive=False, eta=0.0)]


def build_optimizer(name, module, model=True, **opts):
    """Algorithm `name` over `module`'s parameters, configured as its reference in the parent
    runs it; `model=True` passes model=module. opts: grad_scaler=, max_grad_norm=, lr=."""
    named = list(module.named_parameters())
    params = [p for _, p in named]
    kw = dict(opts)
    if model:
        kw["model"] = module
    lr = kw.pop("lr", None)  # 0.0: a plain SGD with lr 0 (a step that must not move w)
    sgd = dict(lr=0.0) if lr == 0.0 else dict(lr=LR, momentum=MOMENTUM)
    if name == "SAM":
        return sam_kernels.SAM(params, torch.optim.SGD, rho=0.05, **sgd, **kw)
    if name == "ASAM":
        return sam_kernels.SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01,
                               **sgd, **kw)
    if name == "GSAM":
        return sam_kernels.GSAM(params, torch.optim.SGD, gsam_alpha=0.3, rho=0.05, **sgd, **kw)
    if name == "GAM":
        return sam_kernels.GAM(params, torch.optim.SGD, grad_rho=0.03, grad_norm_rho=0.05,
                               **sgd, **kw)
    base = dict(lr=0.0) if lr == 0.0 else VASSO_BASE
    if name == "VaSSO":
        return sam_kernels.VaSSO(vasso_groups(named), torch.optim.SGD, eps=1e-7, **base, **kw)
    criterion, ckw = VASSO_RE[name]
    return getattr(sam_kernels, name)(
        vasso_groups(named), torch.optim.SGD, eps=1e-7, criterion=criterion,
        warmup_steps=VASSO_WARMUP, generator=torch.Generator().manual_seed(3), **ckw, **base,
        **kw)


# ----------------------------------------------------------------------------- collectives
_NOT_COLLECTIVES = {"_c10d_functional.wait_tensor.default",
                    "_c10d_functional._wrap_tensor_autograd.default"}


class Collectives(TorchDispatchMode):
    """Records every collective dispatched while active as (op, group's ranks, elements).

    Ops on DTensors return NotImplemented first, so DTensor desugars them and the collectives it
    issues itself (clip_grad_norm_'s reduction, GradScaler's found_inf) come back through here;
    a plain mode would not see them (CommDebugMode does the same; it crashes in 2.13 on a
    second forward, hence this)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        if "c10d" in func.namespace and str(func) not in _NOT_COLLECTIVES:
            self.ops.append((str(func), _group_ranks(args), _numel(args)))
        return func(*args, **(kwargs or {}))


def _group_ranks(args):
    """The global ranks of the process group a collective runs on (a tuple), or None."""
    for a in args:
        pg = None
        if isinstance(a, torch.ScriptObject):
            try:
                pg = dist.ProcessGroup.unbox(a)
            except RuntimeError:
                continue
        elif isinstance(a, str) and a not in ("sum", "avg", "max", "min", "product"):
            try:
                pg = dist.distributed_c10d._resolve_process_group(a)
            except (ValueError, RuntimeError, KeyError):
                continue
        if pg is not None:
            return tuple(dist.get_process_group_ranks(pg))
    return None


def _numel(args):
    a = args[0] if args else None
    if isinstance(a, (list, tuple)):
        return sum(t.numel() for t in a if torch.is_tensor(t))
    return a.numel() if torch.is_tensor(a) else None


class PassCounter:
    """Counts forward passes of a module (one per forward+backward of a step)."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.n += 1


# ----------------------------------------------------------------------------- training
def inject_inf_on_rank0(module, rank, armed):
    """After a backward: on rank 0 only, an inf in its local shard of the first parameter that
    has a non-empty local gradient (the other rank's shards stay finite)."""
    if not armed or rank != 0:
        return
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None and local(p.grad).numel():
                local(p.grad).view(-1)[0] = float("inf")
                return


def train(module, opt, batches, api, rank=0, scaler=None, bad_step=None, count=False,
          on_step=None, micro=1, bad_pass=0):
    """Train with `api` ('closure' or 'manual'), each pass accumulating `micro` equal
    micro-batches (loss / micro each); in pass `bad_pass` of step `bad_step` rank 0's local
    gradient gets an inf. Returns per step (collectives, passes, inner pass ran) when
    `count`."""
    passes = PassCounter(module)
    log = []
    for t, (x, y) in enumerate(batches):
        state = {"pass": 0}

        def run_pass():
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                loss = loss_of(module, xm, ym) / micro
                (scaler.scale(loss) if scaler is not None else loss).backward()
            inject_inf_on_rank0(module, rank, t == bad_step and state["pass"] == bad_pass)
            state["pass"] += 1

        inner_before = getattr(opt, "inner_steps", None)
        passes.n = 0
        mode = Collectives() if count else None
        if mode is not None:
            mode.__enter__()
        try:
            if api == "closure":
                def closure():
                    opt.zero_grad()
                    run_pass()
                opt.step(closure)
            else:
                manual_step(opt, run_pass)
        finally:
            if mode is not None:
                mode.__exit__(None, None, None)
        if scaler is not None:
            scaler.update()
        if count:
            inner = None if inner_before is None else opt.inner_steps - inner_before == 1
            log.append((mode.ops, passes.n, inner))
        if on_step is not None:
            on_step(t, opt)
    return log


def loss_of(module, x, y):
    return torch.nn.functional.cross_entropy(module(x), y)


def scratch_summary(opt):
    """{buffer set: [(buffer elements, its parameter's local elements, data_ptr)]} of the
    optimizer's persistent per-parameter buffers (private: `_caches`)."""
    stores = {k: v for k, v in (getattr(opt, "_caches", {}) or {}).items() if k != "backup_lists"}
    return {name: [(b.numel(), local(p).numel(), b.data_ptr()) for p, b in store.items()]
            for name, store in stores.items()}


def handmade_sam(module, batches, global_norm, group, rho=0.05, eps=1e-12):
    """SAM written per tensor on FSDP2's local shards, the way a shard-unaware library would
    (global_norm=False: each rank normalises with its own shard's norm) or right (True: the
    shard sums of squares all-reduced). Checks the harness itself, independent of sam_kernels."""
    from sam_kernels import bn
    params = list(module.parameters())
    base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    for x, y in batches:
        base.zero_grad()
        loss_of(module, x, y).backward()
        with torch.no_grad():
            sq = torch.zeros((), dtype=torch.float64)
            for p in params:
                sq += (local(p.grad) ** 2).sum()
            if global_norm:
                dist.all_reduce(sq, group=group)
            scale = rho / (sq.sqrt() + eps)
            kept = [local(p).clone() for p in params]
            for p in params:
                local(p).add_(local(p.grad) * scale)
        base.zero_grad()
        bn.disable_running_stats(module)
        loss_of(module, x, y).backward()
        bn.enable_running_stats(module)
        with torch.no_grad():
            for p, k in zip(params, kept):
                local(p).copy_(k)
        base.step()


# ----------------------------------------------------------------------------- the worker
CASE_TIMEOUT_S = 30


def case_groups(world):
    """Fresh process groups for one case (every rank calls this in the same order). A case that
    fails on one rank only leaves the other blocked in a collective of *these* groups until
    CASE_TIMEOUT_S; the next case starts on new groups, so one failure cannot shift the
    pairing of later cases' collectives."""
    from datetime import timedelta
    timeout = timedelta(seconds=CASE_TIMEOUT_S)
    groups = {"world": dist.new_group(list(range(world)), timeout=timeout, backend="gloo")}
    if world == math.prod(HSDP_SHAPE):
        mesh = torch.arange(world).view(HSDP_SHAPE)
        rank = dist.get_rank()
        for dim, name in ((0, "replicate"), (1, "shard")):
            for ranks in (mesh.transpose(0, 1) if dim == 0 else mesh).tolist():
                g = dist.new_group(ranks, timeout=timeout, backend="gloo")
                if rank in ranks:
                    groups[name] = g
    return groups


def run_cases(rank, world, init_file, out_dir, cases, case_fn):
    """Process-group worker: runs every case (one dict each) through
    case_fn(case, rank, world, groups) and saves {case id: result or {'error': ...}} to
    out_dir/rank{rank}.pt."""
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    results = {}
    try:
        for case in cases:
            groups = case_groups(world)
            try:
                results[case["id"]] = case_fn(case, rank, world, groups)
            except Exception as exc:  # noqa: BLE001 -- reported per case in the parent
                results[case["id"]] = {"error": f"{type(exc).__name__}: {exc}",
                                       "traceback": traceback.format_exc(limit=8)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # saved: skip the interpreter teardown, where gloo's threads can abort


def save_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def max_rel_diff(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
               for x, y in zip(a, b))

