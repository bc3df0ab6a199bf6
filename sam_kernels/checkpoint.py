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
`osd["sam"]["extra"]`. `dcp.load` fills only what the template it is given holds: build the
template from an optimizer whose own state exists (VaSSO family: after its first step), or
load per rank with `optimizer.state_dict()` / `load_state_dict()`. FSDP1 flattens parameters:
its own per-parameter state is per rank only (`optimizer.state_dict()`); DCP of the base state
works there as with any optimizer.
"""
from typing import Any, Dict, List, Optional

import torch

__all__ = ["get_optimizer_state_dict", "set_optimizer_state_dict"]

OWN = "sam"


def _dcp():
    from torch.distributed.checkpoint import state_dict as dcp_state_dict
    return dcp_state_dict


def _check(optimizer) -> None:
    from .optim.base import SharpnessAwareOptimizer
    if not isinstance(optimizer, SharpnessAwareOptimizer):
        raise TypeError(f"expected a sam_kernels optimizer, got {type(optimizer).__name__}; "
                        "use torch.distributed.checkpoint.state_dict for other optimizers")


def _fqns(model: torch.nn.Module, optimizer) -> List[str]:
    """The canonical name (as DCP writes it) of every parameter of the optimizer, in the order
    of its param groups."""
    name_of = {}
    for name, p in model.named_parameters():
        fqns = _dcp()._get_fqns(model, name)
        if len(fqns) != 1:  # an FSDP1 FlatParameter: several parameters in one tensor
            name_of[p] = None
        else:
            name_of[p] = next(iter(fqns))
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in name_of:
                raise ValueError("a parameter of the optimizer is not a parameter of `model`; "
                                 "pass the model the optimizer trains")
            out.append(name_of[p])
    return out


def _own_entries(optimizer) -> Dict[int, Dict[str, Any]]:
    from .optim.base import _all_params
    params = _all_params(optimizer.param_groups)
    index = {p: i for i, p in enumerate(params)}
    return {index[p]: s for p, s in optimizer.state.items() if s and p in index}


def get_optimizer_state_dict(model: torch.nn.Module, optimizer, *, options=None
                             ) -> Dict[str, Any]:
    """DCP's optimizer state dict of `optimizer.base_optimizer` (see
    `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`) plus a "sam" entry
    with the algorithm's own state."""
    _check(optimizer)
    optimizer._require_unperturbed("get_optimizer_state_dict()")
    osd = _dcp().get_optimizer_state_dict(model, optimizer.base_optimizer, options=options)
    own = _own_entries(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    fqns = _fqns(model, optimizer) if own else []
    full = bool(options is not None and options.full_state_dict)
    offload = bool(options is not None and options.cpu_offload)
    state: Dict[str, Dict[str, Any]] = {}
    for i, entries in own.items():
        if fqns[i] is None:
            raise NotImplementedError(
                "this optimizer keeps per-parameter state of FSDP1 flat parameters, which has "
                "no per-parameter layout DCP could reshard; save it per rank with "
                "optimizer.state_dict() and load it with optimizer.load_state_dict()")
        state[fqns[i]] = {k: _as_global(v, params[i], full, offload) for k, v in entries.items()}
    osd[OWN] = {"state": state, "extra": optimizer._extra_state()}
    return osd


def set_optimizer_state_dict(model: torch.nn.Module, optimizer, optim_state_dict: Dict[str, Any],
                             *, options=None) -> None:
    """Load what `get_optimizer_state_dict` produced (after `dcp.load` if it went to disk)."""
    _check(optimizer)
    optimizer._require_unperturbed("set_optimizer_state_dict()")
    sd = dict(optim_state_dict)
    own = sd.pop(OWN, None)
    if own is None:
        raise ValueError("the optimizer state dict has no 'sam' entry: it was not made by "
                         "sam_kernels.checkpoint.get_optimizer_state_dict, and loading it would "
                         "lose the algorithm's own state")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    fqns = _fqns(model, optimizer) if own["state"] else []
    position = {f: i for i, f in enumerate(fqns)}
    unknown = sorted(set(own["state"]) - set(position))
    if unknown:
        raise ValueError(f"the 'sam' state names parameters this optimizer does not hold: "
                         f"{unknown[:5]}")
    loaded = {params[position[f]]: {k: _as_local(v, params[position[f]])
                                    for k, v in entries.items()}
              for f, entries in own["state"].items()}
    _dcp().set_optimizer_state_dict(model, optimizer.base_optimizer, sd, options=options)
    optimizer.param_groups = optimizer.base_optimizer.param_groups
    optimizer.state.clear()
    for p, entries in loaded.items():
        optimizer.state[p] = entries
    optimizer._load_extra_state(own["extra"])


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


def called_from_dcp() -> Optional[str]:
    """The DCP function calling into an optimizer method (a few frames up), else None."""
    import sys
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        if frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict":
            return frame.f_code.co_name
        frame = frame.f_back
    return None
