"""What every SAM-family optimizer shares: wrapping a base optimizer, gathering gradients,
perturbing and exactly restoring weights through the primitives, call-order checks, closures,
BatchNorm freezing and checkpointing, and the training-loop machinery (GradScaler, DDP,
gradient clipping, LR-scheduler bookkeeping). The algorithms (sam.py, gsam.py, ...) are short
compositions of these pieces; no method here loops arithmetic over parameters.

The contract a step follows, whatever the algorithm (see SAM for the pattern):
- each method that consumes the gradients of a pass calls `_unscale_grads()` first (after its
  checks): with a GradScaler it unscales that pass's gradients and records its inf/NaN flag;
- `_perturb(...)` / `_restore()` move to and back from perturbed points;
- closures go through `_require_closure`: every call runs with DDP `no_sync` where the
  algorithm keeps per-rank gradients, and restores the weights if it raises; passes at
  perturbed weights run in `_perturbed_pass()` (BatchNorm running statistics frozen);
  `pass_context()` gives hand-written loops both;
- the step ends with `_base_step()` once the final gradient is in `p.grad`, w is restored
  and (GSAM/GAM) averaged over DDP ranks: clipping (`max_grad_norm`), the GradScaler skip,
  the base optimizer's step.
"""
import contextlib
import copy
import functools
import math
import numbers
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .. import bn
from ..ops import _registry
from . import distributed
from .seed_compat import adapt_closure, check_keywords, convert_seed_state_dict

Tensors = List[torch.Tensor]


@dataclass
class GradSlots:
    """The parameters of one param group that have a gradient, with those gradients.

    `params` are the parameter objects (keys of `state` and of the scratch buffers); `grads`
    and `locals` the tensors the kernels work on: the gradients and parameters themselves, or
    their local shards when the parameters are sharded DTensors (FSDP2). `locals=None`: the
    optimizer derives them from `params`."""
    group: Dict[str, Any]
    params: Tensors
    grads: Tensors
    locals: Optional[Tensors] = None


def _check_real(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> None:
    """Hyper-parameters are real numbers: Python ints/floats and numpy scalars (anything
    `numbers.Real` but bool). Tensors are refused: reading one would be a host sync."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name} value: {value!r} (a {type(value).__module__}."
                         f"{type(value).__qualname__}; must be a real number {rule}, e.g. a "
                         f"Python float)")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number {rule})")


def check_nonnegative(name: str, value: Any) -> None:
    _check_real(name, value, lambda v: v >= 0, ">= 0")


def check_positive(name: str, value: Any) -> None:
    _check_real(name, value, lambda v: v > 0, "> 0")


class StepVar:
    """An attribute that a step changes (declare it in the class body: ``steps = StepVar(0)``).

    Its value lives in the instance dict ``_step_vars``: torch.compile (2.13) silently drops
    plain attribute writes on optimizer objects made inside a compiled region, while writes
    into a dict the optimizer holds are replayed — so a compiled step keeps such state right.
    """

    def __init__(self, default: Any = None) -> None:
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get("_step_vars", {}).get(self.name, self.default)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__.setdefault("_step_vars", {})[self.name] = value


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Base class of the SAM family. Subclasses define the step; see SAM for the pattern.

    `base_optimizer` is a torch.optim.Optimizer class (built here on our param groups with
    `base_kwargs`) or an instance over the same parameters. Either way both objects share the
    very same param-group dicts, so LR schedulers work on either object.

    Training options every algorithm accepts (also through `**base_kwargs` of a subclass that
    does not name them): `grad_scaler=` a `torch.amp.GradScaler` (both passes scaled, each
    unscaled once, the update skipped when any pass has inf/NaN; call `scaler.update()` after
    each step, never `scaler.step(optimizer)`), `max_grad_norm=` (the final gradient is
    clipped to this global L2 norm before the base step) and `skip_nonfinite=` (a step whose
    gradients hold inf/NaN is skipped as the GradScaler path skips it; `skipped_steps`).
    How the optimizer runs across processes (single, DDP, FSDP2/HSDP, FSDP1) is decided once
    here from the parameters and `model=` (optim/distributed.py).
    """

    #: per-group hyper-parameters validated as >= 0 (subclasses extend)
    _nonnegative_group_keys: Tuple[str, ...] = ()
    #: True for algorithms that combine the gradients of several passes into the final one
    #: (GSAM, GAM): under DDP every pass then runs without synchronisation and the final
    #: gradient is averaged once (`_sync_grads`); otherwise only the last pass at the
    #: perturbed point is synchronised by DDP, and pass 1 stays per-rank.
    _reduce_final_grads: bool = False
    #: keys of `self.state[p]` that persist across steps and change before a step knows
    #: whether GradScaler found inf/NaN (e.g. VaSSO's EMA). With a GradScaler they are copied
    #: at the start of a step and put back, with `_extra_state()`, when the step is skipped.
    _amp_guarded_state: Tuple[str, ...] = ()

    # what a step changes on the object itself (see StepVar)
    _perturbed = StepVar()  # (params, backups) while at a perturbed point, else None
    _amp_passes = StepVar(0)  # passes unscaled in the current step
    _amp_snapshot = StepVar()  # guarded state copied at the start of an AMP step
    _opt_called = StepVar(False)  # read by torch LR schedulers
    _backward_seen = StepVar(False)  # a backward accumulated gradients since the last step
    #: steps skipped for inf/NaN gradients (GradScaler or skip_nonfinite): a device tensor
    #: (no host read; `int(opt.skipped_steps)`), None before the first guarded step
    skipped_steps = StepVar()
    #: L2 norm of the last final gradient before clipping (a device tensor; with
    #: max_grad_norm only)
    last_grad_norm = StepVar()
    #: L(w + e) − L(w) of the last step(closure) that ran both passes and whose closure
    #: returned losses (a device tensor, no host read; GSAM's surrogate gap), else None
    last_surrogate_gap = StepVar()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            cls.step = _dcp_tolerant(cls.__dict__["step"])

    def __init__(self, params: Iterable, base_optimizer: Any, defaults: Dict[str, Any], *,
                 backend: str = "auto", model: Optional[torch.nn.Module] = None,
                 base_kwargs: Optional[Dict[str, Any]] = None,
                 grad_scaler: Optional[torch.amp.GradScaler] = None,
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = False) -> None:
        self.__dict__.setdefault("_step_vars", {})  # made here, outside any compiled region
        _registry.validate_name(backend)
        base_kwargs = dict(base_kwargs or {})
        grad_scaler = base_kwargs.pop("grad_scaler", grad_scaler)
        max_grad_norm = base_kwargs.pop("max_grad_norm", max_grad_norm)
        skip_nonfinite = base_kwargs.pop("skip_nonfinite", skip_nonfinite)
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
        # an unknown keyword names itself and what each object takes
        check_keywords(type(self), base_optimizer, base_kwargs)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler (or None), got "
                            f"{grad_scaler!r}")
        if max_grad_norm is not None:
            check_positive("max_grad_norm", max_grad_norm)
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
        for group in self.param_groups:
            _dedupe(group)
        self.defaults.update(base_optimizer.defaults)
        self.backend = backend
        self.model = model
        # chosen once: inside a compiled step, walking the model's wrappers again trips dynamo
        # (the same module reached through two sources)
        self._dist = distributed.choose(_all_params(self.param_groups), model)
        self.grad_scaler = grad_scaler
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = skip_nonfinite
        self._check_groups()
        self._set_device()
        # containers made here, outside any compiled region (see StepVar): their contents
        # change in steps
        self._backup_lists: Dict[Tuple[int, ...], Tensors] = {}
        self._scratch_buffers: Dict[str, Dict[torch.Tensor, torch.Tensor]] = {}
        self._amp_views: List[_ScalerPass] = []  # one GradScaler key per pass of a step
        self._nonfinite_flags: Tensors = []  # per-pass flags of a skip_nonfinite step
        self._watch_backward(self.param_groups)

    # ------------------------------------------------------------------ validation
    def _check_groups(self) -> None:
        for group in self.param_groups:
            for key in self._nonnegative_group_keys:
                check_nonnegative(key, group[key])

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # during torch.optim.Optimizer.__init__
            super().add_param_group(param_group)
            _dedupe(self.param_groups[-1])
            return
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        n = len(self.param_groups)
        self.base_optimizer.add_param_group(param_group)
        # validated with the new group in place (subclasses check every group), and taken out
        # again if anything is wrong: a rejected group must not stay in the shared list
        try:
            _dedupe(self.param_groups[-1])
            self._check_groups()
            device, backend_module = self._resolve_device()
            strategy = distributed.choose(_all_params(self.param_groups), self.model)
        except BaseException:
            del self.param_groups[n:]
            raise
        self._device, self._backend_module, self._dist = device, backend_module, strategy
        self._watch_backward(self.param_groups[n:])

    def set_model(self, model: Optional[torch.nn.Module]) -> None:
        """Point the optimizer at the module the training loop runs (e.g. the DDP wrapper a
        framework made after the optimizer was built), and resolve the parameters' device and
        backend again (a trainer may have moved them since construction)."""
        self._require_unperturbed("set_model()")
        strategy = distributed.choose(_all_params(self.param_groups), model)
        self._set_device()
        self.model, self._dist = model, strategy

    def _set_device(self) -> None:
        self._device, self._backend_module = self._resolve_device()

    def _resolve_device(self):
        device = _single_device(self.param_groups)
        # resolved once, not per step: keeps the step free of host-side lookups that
        # torch.compile cannot trace
        return device, _registry.resolve(self.backend, device or "cpu")

    def _watch_backward(self, groups) -> None:
        """A hook on one parameter per group notes a backward pass that accumulates into its
        gradient, so that `step(closure)` can tell when the caller already ran pass 1 itself
        (see `_require_closure`). Sharded parameters get their gradients from FSDP, not from
        autograd accumulation: no hook fires there, and nothing is refused."""
        ref = weakref.ref(self)

        def seen(_param):
            owner = ref()
            if owner is not None:
                owner._backward_seen = True

        watched = self.__dict__.setdefault("_watched", [])
        for group in groups:
            for p in group["params"]:
                if p.requires_grad and hasattr(p, "register_post_accumulate_grad_hook"):
                    p.register_post_accumulate_grad_hook(seen)
                    watched.append(p)
                    break

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._backward_seen = False  # gradients cleared: what came before is not pass 1
        super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ building blocks
    @property
    def perturbed(self) -> bool:
        """True between the perturbation and the restore of a step."""
        return self._perturbed is not None

    def _ops(self):
        """The primitives' backend module for this optimizer's parameters."""
        return self._backend_module

    def _slots_with_grads(self) -> List[GradSlots]:
        """Per param group, the parameters that have a gradient now (dense, on one device)."""
        slots = []
        local_grad = self._dist.local_grad if self._dist.sharded else None
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse "
                                       "gradients (e.g. nn.Embedding(sparse=True))")
                params.append(p)
                grads.append(g if local_grad is None else local_grad(p))
            if params:
                slots.append(GradSlots(group, params, grads, self._locals(params)))
        return slots

    def _locals(self, params: Tensors) -> Tensors:
        """The tensors the kernels write for `params`: themselves, or their local shards."""
        if not self._dist.sharded:
            return params
        return [self._dist.local(p) for p in params]

    def _global_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Per-rank partial sums over the parameters (norms, dot products: put the scalars
        needed at one point in one tensor) → sums over every whole parameter, in place: one
        all-reduce over the shard group when the parameters are sharded, else nothing."""
        return self._dist.global_sum_(t)

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
            if adaptive:
                buckets[key][1].extend(self._slot_locals(s))
        backend = self._ops()
        total = None
        for (adaptive, eta), (xs, ws) in buckets.items():
            part = backend.sum_sq(xs, ws, eta)
            total = part if total is None else total + part
        if total is None:
            total = torch.zeros((), device=self._device)
        return self._global_sum(total)

    def _slot_locals(self, s: GradSlots) -> Tensors:
        return s.locals if s.locals is not None else self._locals(s.params)

    @torch.no_grad()
    def _perturb(self, slots: List[GradSlots], sum_sq: torch.Tensor, eps: float,
                 dirs: Optional[List[Tensors]] = None, rho: Optional[float] = None,
                 keep_backup: bool = True) -> None:
        """w ← w + ρ/(√sum_sq + eps) · T² · d for every slot (d defaults to the gradients; ρ to
        each group's 'rho'), first copying w into persistent backup buffers when keep_backup.
        Slots sharing (ρ, adaptive, eta) go in one kernel."""
        self._note_nonfinite(sum_sq)
        dirs = dirs if dirs is not None else [s.grads for s in slots]
        buckets: Dict[Tuple[float, bool, float], Tuple[Tensors, Tensors, Tensors]] = \
            defaultdict(lambda: ([], [], []))
        for s, d in zip(slots, dirs):
            adaptive = bool(s.group["adaptive"])
            key = (float(s.group["rho"] if rho is None else rho), adaptive,
                   float(s.group["eta"]) if adaptive else 0.0)
            buckets[key][0].extend(s.params)
            buckets[key][1].extend(self._slot_locals(s))
            buckets[key][2].extend(d)
        backend = self._ops()
        perturbed_params, backups = [], []
        try:
            for (r, adaptive, eta), (keys, params, ds) in buckets.items():
                bufs = self._backups_for(keys, params) if keep_backup else []
                try:
                    backend.perturb_(params, ds, sum_sq, r, eps, adaptive, eta, bufs)
                except ValueError:
                    # A parameter's .data was replaced (new shape/dtype/layout) since the
                    # buffers were cached; the kernels validate before writing, so rebuild and
                    # retry once.
                    if not keep_backup:
                        raise
                    self._backup_lists.clear()
                    bufs = self._backups_for(keys, params)
                    backend.perturb_(params, ds, sum_sq, r, eps, adaptive, eta, bufs)
                perturbed_params.extend(params)
                backups.extend(bufs)
        except BaseException:
            # a later bucket failed: the earlier ones are moved already, put them back
            if keep_backup and perturbed_params:
                backend.restore_(perturbed_params, backups)
            raise
        if keep_backup:
            self._perturbed = (perturbed_params, backups)

    def _perturb_keeping_grads(self, name: str, rho: float, eps: float) -> Tensors:
        """The first step of the algorithms that need the gradient at w again later (GSAM,
        GAM): copy it into the persistent buffers `name`, then move to w + e along it with
        radius `rho`. Returns the parameters that had a gradient."""
        slots = self._slots_with_grads()
        self._unscale_grads()
        params = self._keep_grads(name, slots)
        self._perturb(slots, self._weighted_sum_sq(slots), eps, rho=rho)
        return params

    def _keep_grads(self, name: str, slots: List[GradSlots]) -> Tensors:
        """Copy the gradients of `slots` into the persistent buffers `name` (one fused copy);
        returns the parameters they belong to."""
        params = [p for s in slots for p in s.params]
        grads = [g for s in slots for g in s.grads]
        torch._foreach_copy_(self._scratch(name, params, grads), grads)
        return params

    def _backups_for(self, keys: Tensors, params: Tensors) -> Tensors:
        """The persistent backup buffers of the parameters `keys` (shaped like `params`, their
        local tensors), as one list cached per parameter list: checking every buffer each step
        costs more host time than the copy itself on lists of thousands of small tensors."""
        key = tuple(map(id, keys))
        bufs = self._backup_lists.get(key)
        if bufs is None:
            bufs = self._scratch("backup", keys, params)
            self._backup_lists[key] = bufs
        return bufs

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

    def _require_closure(self, closure: Optional[Callable], cls_name: str) -> Callable:
        """`closure` wrapped so that every call runs as one pass of this step: with gradients
        enabled, under DDP's `no_sync` where the algorithm keeps per-rank gradients, and with
        the step undone (weights restored) if it raises. lk-eg's two-argument closure is
        accepted; other closures that need arguments raise with the fix."""
        closure = adapt_closure(closure, cls_name)
        if closure is None:
            raise RuntimeError(
                f"{cls_name}.step() needs a closure that zeroes the gradients, runs the forward "
                "and backward pass and returns the loss, e.g. optimizer.step(closure); or call "
                "first_step() / second_step() around your own backward passes")
        if self._backward_seen and self._perturbed is None and \
                any(p.grad is not None for p in self._watched):
            raise RuntimeError(
                f"{cls_name}.step(closure) found gradients from a backward pass run since the "
                "last step: step(closure) runs the closure for every pass itself (pass 1 at w "
                "included), so a loop that calls loss.backward() before step(closure) (the "
                "davda54/sam README pattern) would run 3 forward-backward passes per step and "
                "update BatchNorm statistics twice. Drop that first backward (the closure does "
                "it), or keep it and call first_step(zero_grad=True) / backward at w + e / "
                "second_step() instead; optimizer.zero_grad() before step(closure) discards "
                "those gradients")

        def one_pass():
            try:
                with torch.enable_grad(), self._pass_sync(), self._abort_on_error():
                    return closure()
            finally:
                self._backward_seen = False  # that backward was one of this step's passes
        return one_pass

    @contextlib.contextmanager
    def pass_context(self, freeze_bn: Optional[bool] = None):
        """Wrap each forward+backward pass of a hand-written step (first_step/second_step) in
        this; `step(closure)` does it for you. It applies what `model=` asks for:

        - DDP (`model` is DistributedDataParallel): `model.no_sync()` for the passes whose
          gradients stay per-rank — pass 1 of every algorithm, and every pass of those that
          average their final gradient themselves (GSAM, GAM);
        - BatchNorm running statistics frozen at perturbed weights (`freeze_bn=None`), or as
          `freeze_bn` says;
        - on an exception the weights are restored and the step abandoned.
        """
        freeze = self.model is not None and (self.perturbed if freeze_bn is None else freeze_bn)
        with self._pass_sync(), self._abort_on_error():
            if freeze:
                bn.disable_running_stats(self.model)
            try:
                yield
            finally:
                self._backward_seen = False  # that backward was one of this step's passes
                if freeze:
                    bn.enable_running_stats(self.model)

    def _perturbed_pass(self, freeze_bn: bool = True):
        """Context of a forward/backward at perturbed weights: BatchNorm running statistics
        frozen when `model` was given (and `freeze_bn`: a step whose only forward pass is this
        one may let it update them); on an exception the weights are restored first."""
        return self.pass_context(freeze_bn=freeze_bn)

    def _pass_sync(self):
        """DDP's `no_sync()` for a pass whose gradients stay per-rank, else nothing (the
        strategy decides: sharded training synchronises every pass)."""
        return self._dist.pass_context(per_rank=self._pass_is_per_rank())

    def _pass_is_per_rank(self) -> bool:
        """Whether the pass about to run keeps per-rank gradients under DDP: the final pass of
        SAM/ASAM/VaSSO (at w + e) is averaged by DDP, every other pass is per rank; algorithms
        whose step has one pass, or that need every pass averaged, say so here."""
        return not self.perturbed or self._reduce_final_grads

    @contextlib.contextmanager
    def _abort_on_error(self):
        try:
            yield
        except BaseException:
            self._abort_step()
            raise

    def _abort_step(self) -> None:
        """Undo a step that failed midway: exact weights back, guarded state back."""
        if self._perturbed is not None:
            self._restore()
        if self._amp_snapshot is not None:
            self._rollback_guarded_state()
        self._amp_passes = 0
        self._nonfinite_flags = []
        self._backward_seen = False

    # ------------------------------------------------------------------ end of a step
    @torch.no_grad()
    def _base_step(self) -> None:
        """The end of every step, once the final gradient is in `p.grad` and w is restored
        (and, for `_reduce_final_grads` algorithms, averaged over DDP ranks): clip it to
        `max_grad_norm`, skip the update if a GradScaler pass found inf/NaN, else step the
        base optimizer."""
        if self.max_grad_norm is not None or self.skip_nonfinite:
            self._final_grad_checks()
        # LR schedulers attached to this object (or the base) watch for a call of step();
        # first_step/second_step loops and skipped steps count as one (davda54/sam #28)
        self._opt_called = True
        self.base_optimizer._opt_called = True
        self._backward_seen = False
        found_inf = self._found_inf()
        self._amp_passes = 0
        if found_inf is not None:
            self.skipped_steps = found_inf.clone() if self.skipped_steps is None else \
                self.skipped_steps + found_inf
        if found_inf is None:
            self._amp_snapshot = None
            self.base_optimizer.step()
        elif getattr(self.base_optimizer, "_step_supports_amp_scaling", False) and \
                self._amp_snapshot is None:
            # torch's fused optimizers skip on the device flag: no host read at all
            base = self.base_optimizer
            base.found_inf = found_inf
            try:
                base.step()
            finally:
                del base.found_inf
        elif found_inf.item():  # the one host read GradScaler.step() makes as well
            self._rollback_guarded_state()
        else:
            self._amp_snapshot = None
            self.base_optimizer.step()

    def _final_grad_checks(self) -> None:
        """One fused norm of the final gradients, for both of: clipping them,
        g ← g · min(1, max_grad_norm / (‖g‖ + 1e-6)) as torch.nn.utils.clip_grad_norm_ (the
        factor stays on the device), and skip_nonfinite's check of the last pass."""
        grads = [g for s in self._slots_with_grads() for g in s.grads]
        # computed (and reduced) even when this rank has no gradient: an FSDP rank whose shards
        # are all empty still takes part in the all-reduce
        sum_sq = self._global_sum(self._ops().sum_sq(grads, [], 0.0) if grads else
                                  torch.zeros((), device=self._device))
        self._note_nonfinite(sum_sq)
        if self.max_grad_norm is not None:
            norm = sum_sq.sqrt()
            self.last_grad_norm = norm
            factor = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, factor)

    def _note_nonfinite(self, sum_sq: torch.Tensor) -> None:
        """With skip_nonfinite: record (on the device) whether a pass's norm is inf/NaN — the
        norm of a list is finite exactly when every element is (the kernels accumulate so
        that finite values do not overflow)."""
        if self.skip_nonfinite:
            flag = (~torch.isfinite(sum_sq)).to(torch.float32)
            self._nonfinite_flags = self._nonfinite_flags + [flag]

    # ------------------------------------------------------------------ GradScaler
    def _amp_enabled(self) -> bool:
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    def _guarding(self) -> bool:
        """Whether a step may be skipped (GradScaler or skip_nonfinite), so the state it
        changes before the decision must be kept to be put back."""
        return self._amp_enabled() or self.skip_nonfinite

    def _unscale_grads(self) -> None:
        """With a GradScaler: unscale the gradients of the pass that just ran, in place, and
        record whether they hold inf/NaN. Call it once per pass, first thing in each method
        that reads that pass's gradients (after its argument checks)."""
        if self.skip_nonfinite and self._amp_snapshot is None:
            self._snapshot_guarded_state()  # idempotent until the step ends
        if not self._amp_enabled():
            return
        if self._amp_passes == 0 and self._amp_snapshot is None:
            self._snapshot_guarded_state()
        while len(self._amp_views) <= self._amp_passes:
            self._amp_views.append(_ScalerPass(self))
        # GradScaler allows one unscale_ per optimizer and iteration; each pass of a step is
        # registered under its own key, and update() backs off if any of them found inf/NaN
        try:
            self.grad_scaler.unscale_(self._amp_views[self._amp_passes])
        except BaseException as exc:
            self._abort_step()
            if "already been called" not in str(exc):
                raise
            raise RuntimeError(f"{type(self).__name__}: the GradScaler already unscaled this "
                               "pass's gradients; call scaler.update() once after every "
                               "optimizer step (and never scaler.step(optimizer): the "
                               "optimizer steps itself with grad_scaler=)") from exc
        self._amp_passes += 1

    def _found_inf(self) -> Optional[torch.Tensor]:
        """1.0 if any pass of this step had inf/NaN gradients, else 0.0 (a device tensor), or
        None without a GradScaler and without skip_nonfinite."""
        if not self._guarding():
            return None
        flags: Tensors = []
        if self._amp_enabled():
            if self._amp_passes == 0:
                raise RuntimeError(f"{type(self).__name__} has a GradScaler but no pass of "
                                   "this step was unscaled; its step methods must call "
                                   "_unscale_grads() for each pass")
            flags = [t for view in self._amp_views[:self._amp_passes]
                     for t in self.grad_scaler._found_inf_per_device(view).values()]
        flags, self._nonfinite_flags = flags + self._nonfinite_flags, []
        # fused optimizers compare the flag with 1 exactly
        found = torch.clamp(torch.stack(flags).sum(), max=1.0) if flags else \
            torch.zeros((), device=self._device)  # no gradients at all (on this rank)
        if not self._dist.flags_agree(self.grad_scaler if self._amp_enabled() else None):
            # a pass that ran per rank (DDP), or a shard's own check (FSDP1 with a plain
            # GradScaler): an inf on one rank must skip the step on every rank, and back off
            # every rank's scale alike (update() reads the recorded flags)
            found = self._dist.any_(found)
            if flags:
                flags[0].copy_(found)
        return found

    def _snapshot_guarded_state(self) -> None:
        """With a GradScaler: copy what a skipped step must put back (`_amp_guarded_state`
        tensors and `_extra_state()`). Taken automatically when the first pass of a step is
        unscaled; a subclass that changes state earlier in a step (e.g. a decision taken
        before pass 1) calls it first. Idempotent until the step ends."""
        if not self._guarding() or not self._amp_guarded_state or \
                self._amp_snapshot is not None:
            return
        present = [(s, key) for s in self.state.values() for key in self._amp_guarded_state
                   if key in s]
        live = [s[key] for s, key in present]
        copies = self._scratch("amp_snapshot", live, live)  # keyed by the state tensors
        if live:
            self._ops().restore_(copies, live)  # copies ← live, one fused pass
        self._amp_snapshot = (present, copies, copy.deepcopy(self._extra_state()))

    def _rollback_guarded_state(self) -> None:
        if self._amp_snapshot is not None:
            present, copies, extra = self._amp_snapshot
            if present:
                self._ops().restore_([s[key] for s, key in present], copies)
            kept = {(id(s), key) for s, key in present}
            for s in self.state.values():  # state the skipped step created goes away
                for key in self._amp_guarded_state:
                    if key in s and (id(s), key) not in kept:
                        del s[key]
            self._load_extra_state(extra)
        self._amp_snapshot = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state dict plus this optimizer's own persistent state under
        'sam' (momentum and the like survive a resume; davda54/sam #73)."""
        _refuse_dcp("get_optimizer_state_dict")
        self._require_unperturbed("state_dict()")
        sd = self.base_optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(_all_params(self.param_groups))}
        own = {index[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
               for p, s in self.state.items() if s and id(p) in index}
        sd["sam"] = {"state": own, "extra": self._extra_state()}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Ours (see state_dict), a base optimizer's (our group keys filled in), or a seed's
        checkpoint of this algorithm family (converted, with a warning; see seed_compat)."""
        _refuse_dcp("set_optimizer_state_dict")
        self._require_unperturbed("load_state_dict()")
        state_dict = dict(convert_seed_state_dict(self, state_dict, self._from_seed))
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

    #: 'sam', 'gsam', 'gam' or 'vasso': which seeds' checkpoints load_state_dict converts
    _seed_family: Optional[str] = None

    def _from_seed(self, index: int, seed_state: Dict[str, Any]) -> Dict[str, Tuple[str, Any]]:
        """Our per-parameter persistent state from a seed's: {our key: (seed key, tensor)}."""
        return {}

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_optimizer={self.base_optimizer!r}, " \
               f"backend={self.backend!r})"

    # ------------------------------------------------------------------ scratch buffers, DDP
    # (added with GSAM/GAM: gradients kept across passes; per-rank gradients averaged once)
    def _scratch(self, name: str, params: Tensors, like: Optional[Tensors] = None) -> Tensors:
        """Persistent buffers, one per parameter of `params` (the key: local shard views are
        new objects on every call) and one set per `name` (e.g. a kept gradient), shaped like
        `like` (default: the parameters' local tensors); reallocated only when that shape,
        dtype or layout changes."""
        store = self.__dict__.setdefault("_scratch_buffers", {}).setdefault(name, {})
        like = self._locals(params) if like is None else like
        bufs = []
        for p, t in zip(params, like):
            buf = store.get(p)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or \
                    buf.device != t.device or buf.stride() != t.stride():
                buf = torch.empty_like(t, memory_format=torch.preserve_format)
                store[p] = buf
            bufs.append(buf)
        return bufs

    def _sync_grads(self, grads: Tensors, reduce: str = "mean") -> None:
        """The final gradients of an algorithm whose passes ran per rank (DDP), all-reduced
        across the ranks ('mean' or 'sum'); nothing when the passes were synchronised."""
        self._dist.average_grads_(grads, mean=(reduce == "mean"))

    def _agreed_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Statistics every rank must decide on alike (VaSSORe's criteria), in place: summed
        over the shards when sharded, averaged over DDP ranks (bit-identical everywhere)."""
        return self._dist.agree_(t)

    def _record_gap(self, at_w: Any, at_w_plus_e: Any) -> None:
        """last_surrogate_gap ← L(w + e) − L(w) from what two closure calls returned (a loss
        or the seed's (outputs, loss)); None when either is not a loss. Stays on the device."""
        losses = [r[-1] if isinstance(r, (tuple, list)) and r else r for r in (at_w, at_w_plus_e)]
        if all(torch.is_tensor(x) and x.numel() == 1 for x in losses):
            self.last_surrogate_gap = (losses[1].detach() - losses[0].detach()).reshape(())
        elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in losses):
            self.last_surrogate_gap = torch.tensor(float(losses[1]) - float(losses[0]))
        else:
            self.last_surrogate_gap = None


class _ScalerPass:
    """What GradScaler.unscale_ needs of an optimizer (its param groups), one object per pass
    of a step, so that each pass gets unscaled once and its inf/NaN flag kept apart."""

    def __init__(self, owner: "SharpnessAwareOptimizer") -> None:
        self._owner = owner

    @property
    def param_groups(self):
        return self._owner.param_groups


def _dcp_tolerant(step: Callable) -> Callable:
    """`step` of every algorithm class, made harmless for DCP's `_init_optim_state`: that calls
    `step()` without a closure after zeroing every gradient and learning rate, to create a
    torch optimizer's lazy state, and would leave the learning rates at 0 if our step raised.
    Then only a base optimizer without state yet steps (creating it, as DCP intends; one that
    has state is left alone: its momentum would decay); DCP's next call, `state_dict()`,
    refuses with what to use instead."""
    @functools.wraps(step)
    def guarded(self, closure=None, *args, **kwargs):
        if closure is None and not args and not kwargs:
            from ..checkpoint import called_from_dcp
            if called_from_dcp() == "_init_optim_state":
                return None if self.base_optimizer.state else self.base_optimizer.step()
        return step(self, closure, *args, **kwargs)
    return guarded


def _refuse_dcp(function: str) -> None:
    from ..checkpoint import called_from_dcp
    if called_from_dcp() is not None:
        raise TypeError(
            f"torch.distributed.checkpoint.state_dict.{function} would drop this optimizer's "
            f"own state (its state_dict's 'sam' entry); use sam_kernels.checkpoint.{function}"
            f"(model, optimizer, ...) instead, which goes through DCP for the base optimizer "
            f"and keeps the rest")


def _dedupe(group: Dict[str, Any]) -> None:
    """The same tensor twice in a group would be perturbed (and stepped) twice; torch only
    warns about it. Keep the first occurrence."""
    params = group["params"]
    unique = list(dict.fromkeys(params))
    if len(unique) != len(params):
        params[:] = unique


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
