"""Distributed checkpoints (`torch.distributed.checkpoint`, DCP) of sam_kernels optimizers.

`torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(model, optimizer)` cannot
take one of our optimizers directly: it initialises an empty optimizer by calling
`optimizer.step()` without a closure (ours need one), and it keeps only the "state" and
"param_groups" entries of `optimizer.state_dict()`, so an algorithm's own state (VaSSO's EMA,
step counters, schedulers) would be dropped without a word. Our optimizers therefore refuse
to be handed to DCP directly (a clear error, nothing changed), and these two functions do it
instead:

    from sam_kernels.checkpoint import get_optimizer_state_dict, set_optimizer_state_dict
    osd = get_optimizer_state_dict(model, optimizer)          # DCP layout + a "sam" entry
    dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=path)
    ...
    dcp.load(sd, checkpoint_id=path)                          # sd built the same way
    set_optimizer_state_dict(model, optimizer, sd["optim"])

The base optimizer's state goes through DCP unchanged (FQN keys, sharded DTensors, options such
as `full_state_dict`). The algorithm's own per-parameter state is stored under
`osd["sam"]["state"][fqn]`, as DTensors laid out like their parameter when the parameters are
DTensors (FSDP2/HSDP: resharded by DCP like the base state), and its other state under
`osd["sam"]["extra"]` (one opaque leaf: its layout may differ between a fresh optimizer and a
trained one). `dcp.load` fills only the keys of the template it is given, so
`get_optimizer_state_dict` of an optimizer that has not stepped yet (a fresh process resuming)
first creates every piece of its state (`optimizer.init_state()`: the base optimizer's, as DCP
does for any optimizer, and the algorithm's own, as zeros). FSDP1 flattens parameters:
its own per-parameter state is per rank only (`optimizer.state_dict()`); DCP of the base state
works there as with any optimizer.
"""
import io
from typing import Any, Dict, List

import torch

from .optim.base import SharpnessAwareOptimizer

__all__ = ["get_optimizer_state_dict", "set_optimizer_state_dict"]

OWN = "sam"


def _dcp():
    from torch.distributed.checkpoint import state_dict as dcp_state_dict
    return dcp_state_dict


def _check(model: torch.nn.Module, optimizer) -> List[str]:
    """The canonical name (as DCP writes it) of every parameter of the optimizer, in the order
    of its param groups (None for an FSDP1 FlatParameter: several parameters in one)."""
    if not isinstance(optimizer, SharpnessAwareOptimizer):
        raise TypeError(f"expected a sam_kernels optimizer, got {type(optimizer).__name__}; "
                        "use torch.distributed.checkpoint.state_dict for other optimizers")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be the nn.Module the optimizer trains, got {model!r}")
    name_of = {}
    for name, p in model.named_parameters():
        fqns = _dcp()._get_fqns(model, name)
        name_of[p] = next(iter(fqns)) if len(fqns) == 1 else None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = sum(p not in name_of for p in params)
    if missing:
        raise ValueError(f"{missing} of the optimizer's {len(params)} parameters are not "
                         "parameters of `model`; pass the model the optimizer trains")
    return [name_of[p] for p in params]


def get_optimizer_state_dict(model: torch.nn.Module, optimizer, *, options=None
                             ) -> Dict[str, Any]:
    """DCP's optimizer state dict of `optimizer.base_optimizer` (see
    `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`) plus a "sam" entry
    with the algorithm's own state. On an optimizer that has not stepped, every piece of
    state is created first (the template a fresh process passes to `dcp.load`)."""
    fqns = _check(model, optimizer)
    if not optimizer.state and not optimizer.base_optimizer.state:
        optimizer.init_state()
    own = optimizer.own_state_dict()
    osd = _dcp().get_optimizer_state_dict(model, optimizer.base_optimizer, options=options)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    full = bool(options is not None and options.full_state_dict)
    offload = bool(options is not None and options.cpu_offload)
    state: Dict[str, Dict[str, Any]] = {}
    for i, entries in own["state"].items():
        if fqns[i] is None:
            raise NotImplementedError(
                "this optimizer keeps per-parameter state of FSDP1 flat parameters, which has "
                "no per-parameter layout DCP could reshard; save it per rank with "
                "optimizer.state_dict() and load it with optimizer.load_state_dict()")
        state[fqns[i]] = {k: _as_global(v, params[i], full, offload) for k, v in entries.items()}
    packed = io.BytesIO()
    torch.save(own["extra"], packed)
    osd[OWN] = {"algorithm": own["algorithm"], "state": state, "extra": packed}
    return osd


def set_optimizer_state_dict(model: torch.nn.Module, optimizer, optim_state_dict: Dict[str, Any],
                             *, options=None) -> None:
    """Load what `get_optimizer_state_dict` produced (after `dcp.load` if it went to disk)."""
    fqns = _check(model, optimizer)
    sd = dict(optim_state_dict)
    own = sd.pop(OWN, None)
    if own is None:
        raise ValueError("the optimizer state dict has no 'sam' entry: it was not made by "
                         "sam_kernels.checkpoint.get_optimizer_state_dict, and loading it would "
                         "lose the algorithm's own state")
    if own.get("algorithm", type(optimizer).__name__) != type(optimizer).__name__:
        raise ValueError(f"this is a checkpoint of {own['algorithm']}, not of "
                         f"{type(optimizer).__name__}. Nothing was loaded")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    position = {f: i for i, f in enumerate(fqns)}
    unknown = sorted(set(own["state"]) - set(position))
    if unknown:
        raise ValueError(f"the 'sam' state names parameters this optimizer does not hold: "
                         f"{unknown[:5]}")
    extra = own["extra"]
    if isinstance(extra, io.BytesIO):
        extra.seek(0)
        extra = torch.load(extra, map_location="cpu", weights_only=False)
    state = {position[f]: {k: _as_local(v, params[position[f]]) for k, v in entries.items()}
             for f, entries in own["state"].items()}
    _dcp().set_optimizer_state_dict(model, optimizer.base_optimizer, sd, options=options)
    optimizer.param_groups = optimizer.base_optimizer.param_groups
    optimizer.load_own_state_dict({"state": state, "extra": extra})


def _as_global(value: Any, param: torch.Tensor, full: bool, offload: bool) -> Any:
    """An own-state tensor shaped like the parameter's local tensor, as DCP expects it: a
    DTensor laid out like `param` (or gathered, with full_state_dict)."""
    if not torch.is_tensor(value):
        return value
    value = value.detach().clone()
    from torch.distributed.tensor import DTensor
    if isinstance(param, DTensor) and value.shape == param.to_local().shape:
        value = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                   shape=param.shape, stride=param.stride())
        if full:
            value = value.full_tensor()
    return value.cpu() if offload else value


def _as_local(value: Any, param: torch.Tensor) -> Any:
    """The inverse of `_as_global` for the parameter `param` as it is sharded now."""
    if not torch.is_tensor(value):
        return value
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(value, DTensor):
        value = value.full_tensor() if not isinstance(param, DTensor) else \
            value.redistribute(param.device_mesh, param.placements).to_local()
    elif isinstance(param, DTensor) and value.shape == param.shape:
        value = distribute_tensor(value.to(param.device), param.device_mesh,
                                  param.placements).to_local()
    device = param.to_local().device if isinstance(param, DTensor) else param.device
    return value.to(device=device, copy=True)
