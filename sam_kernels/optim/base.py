"""What every SAM-family optimizer shares: wrapping a base optimizer, gathering gradients,
perturbing and exactly restoring weights through the primitives, call-order checks, closures,
BatchNorm freezing and checkpointing. The algorithms (sam.py, gsam.py, ...) are short
compositions of these pieces; no method here loops arithmetic over parameters."""
import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .. import bn, ops
from ..ops import _registry

Tensors = List[torch.Tensor]


@dataclass
class GradSlots:
    """The parameters of one param group that have a gradient, with those gradients."""
    group: Dict[str, Any]
    params: Tensors
    grads: Tensors


def check_nonnegative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 \
            or not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number >= 0)")


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number > 0)")


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Base class of the SAM family. Subclasses define the step; see SAM for the pattern.

    `base_optimizer` is a torch.optim.Optimizer class (built here on our param groups with
    `base_kwargs`) or an instance over the same parameters. Either way both objects share the
    very same param-group dicts, so LR schedulers and GradScaler work on either object.
    """

    #: per-group hyper-parameters validated as >= 0 (subclasses extend)
    _nonnegative_group_keys: Tuple[str, ...] = ()

    def __init__(self, params: Iterable, base_optimizer: Any, defaults: Dict[str, Any], *,
                 backend: str = "auto", model: Optional[torch.nn.Module] = None,
                 base_kwargs: Optional[Dict[str, Any]] = None) -> None:
        _registry.validate_name(backend)
        base_kwargs = base_kwargs or {}
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base_optimizer is an optimizer instance, so its hyper-parameters are set "
                    f"already; got extra keyword arguments {sorted(base_kwargs)}. Pass them "
                    f"when building the base optimizer, or pass its class instead")
            _check_same_params(params, base_optimizer)
            super().__init__(base_optimizer.param_groups, defaults)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            super().__init__(params, defaults)
            base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass or "
                            f"instance, got {base_optimizer!r}")
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups  # one list of shared group dicts
        self.defaults.update(base_optimizer.defaults)
        self.backend = backend
        self.model = model
        self._check_groups()
        self._device = _single_device(self.param_groups)
        self._backups: Dict[torch.Tensor, torch.Tensor] = {}
        self._perturbed: Optional[Tuple[Tensors, Tensors]] = None  # (params, backups) if at w+e

    # ------------------------------------------------------------------ validation
    def _check_groups(self) -> None:
        for group in self.param_groups:
            for key in self._nonnegative_group_keys:
                check_nonnegative(key, group[key])

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # during torch.optim.Optimizer.__init__
            return super().add_param_group(param_group)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)
        self._check_groups()
        self._device = _single_device(self.param_groups)

    # ------------------------------------------------------------------ building blocks
    @property
    def perturbed(self) -> bool:
        """True between the perturbation and the restore of a step."""
        return self._perturbed is not None

    def _ops(self):
        """The primitives' backend module for this optimizer's parameters."""
        return _registry.resolve(self.backend, self._device or "cpu")

    def _slots_with_grads(self) -> List[GradSlots]:
        """Per param group, the parameters that have a gradient now (dense, on one device)."""
        slots = []
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse "
                                       "gradients (e.g. nn.Embedding(sparse=True))")
                params.append(p)
                grads.append(p.grad)
            if params:
                slots.append(GradSlots(group, params, grads))
        return slots

    def _weighted_sum_sq(self, slots: List[GradSlots], dirs: Optional[List[Tensors]] = None
                         ) -> torch.Tensor:
        """Σ over all slots of ‖T ⊙ d‖² with T = |w| + eta in adaptive groups, else 1.

        `dirs` defaults to the gradients. Slots sharing (adaptive, eta) go in one kernel."""
        dirs = dirs if dirs is not None else [s.grads for s in slots]
        buckets: Dict[Tuple[bool, float], Tuple[Tensors, Tensors]] = defaultdict(lambda: ([], []))
        for s, d in zip(slots, dirs):
            adaptive = bool(s.group["adaptive"])
            key = (adaptive, float(s.group["eta"]) if adaptive else 0.0)
            buckets[key][0].extend(d)
            buckets[key][1].extend(s.params)
        backend = self._ops()
        total = None
        for (adaptive, eta), (xs, ws) in buckets.items():
            part = backend.sum_sq(xs, ws if adaptive else [], eta)
            total = part if total is None else total + part
        if total is None:
            total = torch.zeros((), device=self._device)
        return total

    @torch.no_grad()
    def _perturb(self, slots: List[GradSlots], sum_sq: torch.Tensor, eps: float,
                 dirs: Optional[List[Tensors]] = None, rho: Optional[float] = None,
                 keep_backup: bool = True) -> None:
        """w ← w + ρ/(√sum_sq + eps) · T² · d for every slot (d defaults to the gradients; ρ to
        each group's 'rho'), first copying w into persistent backup buffers when keep_backup.
        Slots sharing (ρ, adaptive, eta) go in one kernel."""
        dirs = dirs if dirs is not None else [s.grads for s in slots]
        buckets: Dict[Tuple[float, bool, float], Tuple[Tensors, Tensors]] = \
            defaultdict(lambda: ([], []))
        for s, d in zip(slots, dirs):
            adaptive = bool(s.group["adaptive"])
            key = (float(s.group["rho"] if rho is None else rho), adaptive,
                   float(s.group["eta"]) if adaptive else 0.0)
            buckets[key][0].extend(s.params)
            buckets[key][1].extend(d)
        backend = self._ops()
        perturbed_params, backups = [], []
        for (r, adaptive, eta), (params, ds) in buckets.items():
            bufs = [self._backup_for(p) for p in params] if keep_backup else []
            backend.perturb_(params, ds, sum_sq, r, eps, adaptive, eta, bufs)
            perturbed_params.extend(params)
            backups.extend(bufs)
        if keep_backup:
            self._perturbed = (perturbed_params, backups)

    def _backup_for(self, p: torch.Tensor) -> torch.Tensor:
        buf = self._backups.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or \
                buf.device != p.device or buf.stride() != p.stride():
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            self._backups[p] = buf
        return buf

    @torch.no_grad()
    def _restore(self) -> None:
        """Copy the kept weights back, exactly, into every perturbed parameter."""
        params, backups = self._perturbed
        if params:
            self._ops().restore_(params, backups)
        self._perturbed = None

    def _require_unperturbed(self, what: str) -> None:
        if self._perturbed is not None:
            raise RuntimeError(f"{what} was called while the weights are perturbed (after "
                               "first_step and before second_step); call second_step() first")

    def _require_perturbed(self, what: str) -> None:
        if self._perturbed is None:
            raise RuntimeError(f"{what} was called without a preceding first_step(); the step "
                               "order is first_step() -> backward at w+e -> second_step()")

    @staticmethod
    def _require_closure(closure: Optional[Callable], cls_name: str) -> Callable:
        if closure is None:
            raise RuntimeError(
                f"{cls_name}.step() needs a closure that zeroes the gradients, runs the forward "
                "and backward pass and returns the loss, e.g. optimizer.step(closure); or call "
                "first_step() / second_step() around your own backward passes")
        return torch.enable_grad()(closure)

    @contextlib.contextmanager
    def _perturbed_pass(self):
        """Context of a forward/backward at perturbed weights: BatchNorm running statistics
        frozen when `model` was given; on an exception the weights are restored first."""
        if self.model is not None:
            bn.disable_running_stats(self.model)
        try:
            yield
        except BaseException:
            if self._perturbed is not None:
                self._restore()
            raise
        finally:
            if self.model is not None:
                bn.enable_running_stats(self.model)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state dict plus this optimizer's own persistent state under
        'sam' (momentum and the like survive a resume; davda54/sam #73)."""
        self._require_unperturbed("state_dict()")
        sd = self.base_optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(_all_params(self.param_groups))}
        own = {index[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
               for p, s in self.state.items() if s and id(p) in index}
        sd["sam"] = {"state": own, "extra": self._extra_state()}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._require_unperturbed("load_state_dict()")
        state_dict = dict(state_dict)
        own = state_dict.pop("sam", {"state": {}, "extra": {}})
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # torch builds new group dicts
        params = _all_params(self.param_groups)
        self.state = defaultdict(dict)
        for i, s in own["state"].items():
            p = params[int(i)]
            self.state[p] = {k: (v.to(device=p.device, copy=True) if torch.is_tensor(v) else v)
                             for k, v in s.items()}
        self._load_extra_state(own["extra"])

    def _extra_state(self) -> Dict[str, Any]:
        """Non-tensor-per-parameter state (step counters, schedulers); for subclasses."""
        return {}

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_optimizer={self.base_optimizer!r}, " \
               f"backend={self.backend!r})"


def _all_params(groups) -> Tensors:
    return [p for g in groups for p in g["params"]]


def _single_device(groups) -> Optional[torch.device]:
    devices = {p.device for p in _all_params(groups)}
    if len(devices) > 1:
        raise ValueError(f"parameters are on several devices ({sorted(map(str, devices))}); "
                         "one optimizer must hold parameters of one device — use one optimizer "
                         "per device (or wrap the model with DDP/FSDP)")
    return next(iter(devices), None)


def _check_same_params(params: Iterable, base: torch.optim.Optimizer) -> None:
    given = []
    for item in params if not isinstance(params, torch.Tensor) else [params]:
        given.extend(item["params"] if isinstance(item, dict) else [item])
    ours = {id(p) for p in given}
    theirs = {id(p) for p in _all_params(base.param_groups)}
    if ours != theirs:
        raise ValueError(f"the base optimizer instance holds different parameters than the ones "
                         f"given ({len(theirs)} vs {len(ours)} tensors, {len(ours ^ theirs)} "
                         "not in both); build both from the same parameters")
