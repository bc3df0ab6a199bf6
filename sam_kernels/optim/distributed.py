"""How an optimizer of the family runs across processes: one small strategy object per optimizer,
chosen once at construction from the parameters and `model=`, so that no algorithm file names
DDP or FSDP.

The interface (what `optim/base.py` calls):
- `local(p)` / `local_grad(p)`: the tensor the kernels work on — the parameter (its gradient)
  itself, or its local shard (FSDP2 DTensors);
- `global_sum_(t)`: a small device tensor of per-rank partial sums over the parameters, made
  into the sum over *all* of every parameter (an all-reduce over the ranks that hold different
  pieces; identity when each rank holds whole parameters);
- `agree_(t)`: statistics every rank must decide on alike (VaSSORe's criteria): the same
  global sums on every rank, bit for bit;
- `any_(flag)`: a 0-d 0/1 flag (GradScaler's inf/NaN) raised on any rank of the step, when
  `flags_agree(scaler)` says the ranks' flags may differ;
- `pass_context(per_rank)`: the context of one forward/backward pass whose gradients stay
  per-rank (DDP `no_sync`), else nothing;
- `average_grads_(grads, mean)`: per-rank final gradients averaged (or summed) across ranks.

The strategies and their rules (README, "DistributedDataParallel" and "Sharded training"):
- `Single`: one process, or any data parallelism done by hand (all identities).
- `DDP`: each rank holds whole parameters; pass 1 (every pass, for algorithms that combine
  several passes) runs under `no_sync` so each rank perturbs with its own gradient, the final
  gradients are averaged by DDP or by `average_grads_`.
- `Sharded` (FSDP2 `fully_shard`, HSDP, FSDP1): every pass is synchronised by FSDP (the
  gradients are the reduce-scattered global-batch gradient), and every statistic is summed
  over the shard group: a step equals the same algorithm run in one process on the whole batch.
"""
import contextlib
from typing import Any, List, Optional, Sequence

import torch

Tensors = List[torch.Tensor]

__all__ = ["Strategy", "Single", "DDP", "Sharded", "choose", "find_ddp", "find_fsdp",
           "all_reduce_grads_"]


def _dist():
    return torch.distributed


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without the distributed package
        return None
    return DTensor


class Strategy:
    """One process (or data parallelism the optimizer does not see): every operation is an
    identity."""

    name = "single"
    sharded = False

    def local(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def local_grad(self, p: torch.Tensor) -> torch.Tensor:
        return p.grad

    def global_sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def agree_(self, t: torch.Tensor) -> torch.Tensor:
        # data parallelism by hand: each rank holds whole parameters, but the ranks must
        # still decide alike (averaged over the default group)
        if _dist().is_available() and _dist().is_initialized():
            all_reduce_grads_([t], average=True)
        return t

    def any_(self, flag: torch.Tensor) -> torch.Tensor:
        return flag

    def flags_agree(self, scaler: Any) -> bool:
        """Whether a step's skip flags are already the same on every rank: those of `scaler`
        (None: no GradScaler) and skip_nonfinite's (from global norms)."""
        return True

    def pass_context(self, per_rank: bool):
        return contextlib.nullcontext()

    def average_grads_(self, grads: Tensors, mean: bool = True) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


Single = Strategy


class DDP(Strategy):
    """`model=` is (or wraps, via torch.compile) a DistributedDataParallel module."""

    name = "ddp"

    def __init__(self, module: torch.nn.parallel.DistributedDataParallel) -> None:
        self.module = module
        self.group = module.process_group

    def _active(self) -> bool:
        return _dist().is_available() and _dist().is_initialized()

    def agree_(self, t: torch.Tensor) -> torch.Tensor:
        # ranks that disagree would hang DDP (one runs a backward pass the others skip)
        if self._active():
            all_reduce_grads_([t], average=True, group=self.group)
        return t

    def any_(self, flag: torch.Tensor) -> torch.Tensor:
        if self._active():
            _dist().all_reduce(flag, op=_dist().ReduceOp.MAX, group=self.group)
        return flag

    def flags_agree(self, scaler: Any) -> bool:
        return not self._active()  # pass 1 (every pass for GSAM/GAM) ran per rank

    def pass_context(self, per_rank: bool):
        return self.module.no_sync() if per_rank and self._active() else \
            contextlib.nullcontext()

    def average_grads_(self, grads: Tensors, mean: bool = True) -> None:
        if self._active():
            all_reduce_grads_(grads, average=mean, group=self.group)


class Sharded(Strategy):
    """Parameters sharded across the ranks of `shard_group` (None: the default group); replicas
    of the shards (HSDP) hold identical pieces and are not summed over. `dtensor`: the
    parameters are DTensors (FSDP2), the kernels run on their local shards."""

    name = "sharded"
    sharded = True

    def __init__(self, kind: str, shard_group: Any, dtensor: bool) -> None:
        self.kind = kind
        self.shard_group = shard_group
        self.dtensor = dtensor

    def local(self, p: torch.Tensor) -> torch.Tensor:
        return p.to_local() if self.dtensor else p

    def local_grad(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        g = p.grad
        return g.to_local() if self.dtensor and g is not None else g

    def global_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.shard_group is not False:
            _dist().all_reduce(t, op=_dist().ReduceOp.SUM, group=self.shard_group)
        return t

    agree_ = global_sum_  # an all-reduce gives every rank the same bits

    def any_(self, flag: torch.Tensor) -> torch.Tensor:
        # over every rank (replicas too): they all take the same step
        _dist().all_reduce(flag, op=_dist().ReduceOp.MAX)
        return flag

    def flags_agree(self, scaler: Any) -> bool:
        # FSDP2: DTensor max-reduces GradScaler's found_inf over the shards itself; FSDP1's
        # ShardedGradScaler all-reduces it; a plain GradScaler on FSDP1's flat shards does not
        if scaler is None or self.dtensor:
            return True
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return isinstance(scaler, ShardedGradScaler)

    def __repr__(self) -> str:
        return f"Sharded({self.kind})"


# ---------------------------------------------------------------------- detection
def find_ddp(model: Optional[torch.nn.Module]):
    """The DistributedDataParallel module `model` is or wraps via torch.compile, else None."""
    while model is not None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model
        model = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    return None


def find_fsdp(model: Optional[torch.nn.Module]):
    """The outermost FSDP1 `FullyShardedDataParallel` module in `model` (also through
    torch.compile's wrapper), else None."""
    if model is None or not _dist().is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    model = getattr(model, "_orig_mod", model)
    for module in model.modules():
        if isinstance(module, FSDP):
            return module
    return None


def _mesh_shard_group(params: Sequence[torch.Tensor]):
    """The process group over the mesh dimensions the DTensor parameters are sharded on (a
    2-D HSDP mesh: the shard dimension only), checked to be one and the same for all."""
    from torch.distributed.tensor import Replicate, Shard
    layouts = set()
    for p in params:
        dims = []
        for dim, placement in enumerate(p.placements):
            if isinstance(placement, Shard):
                dims.append(dim)
            elif not isinstance(placement, Replicate):
                raise ValueError(f"a DTensor parameter has placement {placement!r}; sam_kernels "
                                 "supports parameters that are sharded (Shard) or replicated "
                                 "(Replicate) on each mesh dimension, as fully_shard makes them")
        layouts.add((p.device_mesh, tuple(dims)))
    if len(layouts) > 1:
        raise ValueError("the DTensor parameters are sharded over different device meshes or "
                         "mesh dimensions; one optimizer must hold parameters sharded alike "
                         "(use one optimizer per mesh)")
    mesh, dims = layouts.pop()
    if not dims:
        return False  # replicated everywhere: every rank holds whole parameters
    if len(dims) != 1:
        raise ValueError(f"DTensor parameters sharded over mesh dimensions {dims} of a "
                         f"{mesh.ndim}-D mesh are not supported; shard over one dimension "
                         "(FSDP or HSDP)")
    return mesh.get_group(dims[0])


def choose(params: Sequence[torch.Tensor], model: Optional[torch.nn.Module]) -> Strategy:
    """The strategy for an optimizer over `params` (all of its parameters) and `model=`.
    Raises when the parameters are distributed in a way it cannot see or does not support:
    never a silently wrong step."""
    DTensor = _dtensor_type()
    ddp = find_ddp(model)
    dtensors = [p for p in params if DTensor is not None and isinstance(p, DTensor)]
    if dtensors:
        if len(dtensors) != len(params):
            raise ValueError(
                f"{len(dtensors)} of the {len(params)} parameters are DTensors (FSDP2 "
                "fully_shard) and the others plain tensors; their gradients are reduced "
                "differently, so one optimizer cannot hold both: fully_shard the root module "
                "too, or use separate optimizers")
        if ddp is not None:
            raise ValueError("model= is DistributedDataParallel but the parameters are "
                             "DTensors (FSDP2); pass the fully_shard model (or no model=)")
        return Sharded("fsdp2", _mesh_shard_group(dtensors), dtensor=True)
    flattened = any(getattr(p, "_fsdp_flattened", False) for p in params)
    fsdp = find_fsdp(model)
    if flattened or fsdp is not None:
        if fsdp is None:
            raise ValueError(
                "the parameters belong to an FSDP (FullyShardedDataParallel) module: each rank "
                "holds a flat shard of them, and the optimizer must sum its norms over the "
                "shards. Pass the FSDP-wrapped model as model= (e.g. SAM(fsdp_model.parameters()"
                ", torch.optim.SGD, model=fsdp_model, ...))")
        from torch.distributed.fsdp import ShardingStrategy
        if fsdp.sharding_strategy == ShardingStrategy.NO_SHARD:
            return Sharded("fsdp1-no-shard", False, dtensor=False)
        # HYBRID_SHARD: process_group is the shard group (replicas hold identical shards)
        return Sharded("fsdp1", fsdp.process_group, dtensor=False)
    if ddp is not None:
        return DDP(ddp)
    return Single()


def all_reduce_grads_(grads: Tensors, average: bool = True, group: Any = None,
                      bucket_bytes: int = 32 << 20) -> None:
    """Sum (or average) tensors across the ranks of `group` in place, with one all_reduce per
    flat bucket of at most `bucket_bytes` per dtype, not one per tensor. Works on every
    backend (gloo has no ReduceOp.AVG, so the mean is a sum divided by the world size)."""
    from collections import defaultdict

    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    dist = _dist()
    world = dist.get_world_size(group)
    by_dtype = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    for same_dtype in by_dtype.values():
        bucket: Tensors = []
        size = 0
        for i, g in enumerate(same_dtype):
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= bucket_bytes or i == len(same_dtype) - 1:
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
                if average and world > 1:
                    flat.div_(world)
                torch._foreach_copy_(bucket, _unflatten_dense_tensors(flat, bucket))
                bucket, size = [], 0
