"""SAM-ON (Mueller et al., "Normalization Layers Are All That Sharpness-Aware Minimization
Needs", NeurIPS 2023): perturb only the parameters of the normalisation layers, with the norm
of the perturbation taken over those only. This builds the param groups; SAM, LookSAM,
and every other algorithm honour a group's ``perturb=False`` (left out of the norm and of
e, still stepped by the base optimizer)."""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from torch import nn

#: the module types whose parameters SAM-ON perturbs by default
NORM_TYPES: Tuple[Type[nn.Module], ...] = tuple(
    t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                getattr(nn, "RMSNorm", None), nn.LocalResponseNorm) if t is not None)


def sam_on_param_groups(model: nn.Module, rho: Optional[float] = None,
                        norm_types: Optional[Sequence[Type[nn.Module]]] = None,
                        **group_kwargs: Any) -> List[Dict[str, Any]]:
    """Two param groups of `model`: the parameters of its normalisation layers (BatchNorm,
    LayerNorm, GroupNorm, InstanceNorm, RMSNorm, or `norm_types`), perturbed, and every other
    parameter with ``perturb=False``. `rho` (if given) and `group_kwargs` (e.g.
    ``weight_decay``) go into both groups. A group with no parameters is left out; a model
    without normalisation parameters is an error (SAM-ON would be plain SGD).

    Example::

        groups = sam_on_param_groups(model, rho=0.5)
        optimizer = SAM(groups, torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sam_on_param_groups needs an nn.Module, got {model!r}")
    types = tuple(norm_types) if norm_types is not None else NORM_TYPES
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(f"norm_types must be nn.Module subclasses, got {norm_types!r}")
    norm_ids = set()
    for m in model.modules():
        if isinstance(m, types):
            norm_ids.update(id(p) for p in m.parameters(recurse=False))
    params = [p for p in model.parameters() if p.requires_grad]
    norm = [p for p in params if id(p) in norm_ids]
    rest = [p for p in params if id(p) not in norm_ids]
    if not norm:
        raise ValueError("the model has no trainable parameters in normalisation layers "
                         f"({', '.join(t.__name__ for t in types)}); SAM-ON perturbs only "
                         "those — pass norm_types= naming yours, or use plain SAM")
    if "params" in group_kwargs:
        raise TypeError("sam_on_param_groups() takes the model and picks the parameters itself; "
                        "params= is not accepted (build your own groups with perturb=True/False "
                        "to choose them)")
    extra = dict(group_kwargs)
    if rho is not None:
        extra["rho"] = rho
    groups = [dict(params=norm, perturb=True, **extra)]
    if rest:
        groups.append(dict(params=rest, perturb=False, **extra))
    return groups
