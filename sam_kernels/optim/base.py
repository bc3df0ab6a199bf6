"""The step skeleton every SAM-family optimizer runs on.

An algorithm is a subclass that states small rules, written only as calls to the primitives
(through `self._ops()`, so `backend=` governs the whole step):

- `_plan()`: the stages of the step about to run — one entry per call of first_step(),
  second_step(), ... (the last one finishes the step), True where a forward-backward pass
  runs before that stage — and whether the step counts as an inner step;
- `_stage(k, slots)`: what stage k (not the last) does with the gradients of the pass before
  it: form a direction and move the weights (`_perturb`), keep gradients (`_keep`);
- `_combine(slots)`: turn the last pass's gradients into the final gradient in `p.grad`;
- `_after_base_step()`: anything applied after the base optimizer's step (WSAM);
- class attributes: `hyper` / `group_hyper` (validation rules), `sync` (which passes DDP
  averages), `_rule_vars` (host state a failed step puts back and a checkpoint keeps).

The skeleton owns everything else, once for every algorithm: the order of the calls, the
passes and their contexts (DDP no_sync, BatchNorm freeze), GradScaler unscaling and skip
flags, `skip_nonfinite`, `maximize`, clipping, the distributed strategy, one transaction
(a step that fails or is skipped leaves weights, state, counters and schedules as before),
counters, checkpoints, hooks, pickling.

The transaction costs no parameter-sized copy: a rule never writes its persistent per-parameter
state in place during a step; it writes the new value into tensors the step owns (`_keep`:
the pass's gradients themselves when the step zeroes them anyway, else fresh tensors) and
stages it with `_put_state`; the commit after the base step swaps references.
"""
import contextlib
import copy
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.optim import optimizer as _torch_optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import bn
from ..ops import _checks, _registry
from . import compat, distributed
from .validation import check

Tensors = List[torch.Tensor]


@dataclass
class GradSlots:
    """The parameters of one param group that take part in a pass, with their gradients (or
    another per-parameter tensor a rule works on) and the tensors the kernels write (the
    parameters, or their local shards under FSDP2)."""
    group: Dict[str, Any]
    params: Tensors
    grads: Tensors
    locals: Tensors


@dataclass(frozen=True)
class Plan:
    """The stages of one step: `passes[k]` is True where a forward-backward pass runs before
    stage k; `inner` marks the step for the `inner_steps` counter."""
    passes: Tuple[bool, ...]
    inner: bool = True


TWO_PASS = Plan((True, True))


class _Counter:
    """steps / inner_steps: the host count, less the skips a fused base optimizer decided on
    the device (taken off when the counter is read: no host read per step)."""

    def __init__(self, raw: str) -> None:
        self.raw = raw

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        if obj is None:
            return self
        obj._settle()
        return getattr(obj, self.raw)

    def __set__(self, obj: Any, value: int) -> None:
        obj._settle()
        setattr(obj, self.raw, value)


class StepVar:
    """An attribute a step changes (``steps = StepVar(0)`` in a class body). Its value lives in
    the instance dict `_step_vars`: torch.compile replays writes into a dict the optimizer
    holds, while it drops plain attribute writes made inside a compiled region."""

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


# Any optimizer's step (ours or another's) ends "gradients produced since the last step":
# a loop that switches from SGD to SAM leaves SGD's gradients, which are not a pass 1.
_step_epoch = [0]


def _count_any_step(optimizer, args, kwargs) -> None:
    _step_epoch[0] += 1


register_optimizer_step_post_hook(_count_any_step)


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Base class of the SAM family: wraps a base optimizer (a ``torch.optim.Optimizer`` class,
    built here on our param groups with the remaining keywords, or an instance over the same
    parameters; both share one list of param-group dicts) and runs the step skeleton.

    Options every algorithm takes: ``backend`` ('auto', 'reference', 'cpu', 'cuda', 'triton'),
    ``model`` (BatchNorm freeze at perturbed points, DDP/FSDP detection, ``set_closure``),
    ``grad_scaler`` (a ``torch.amp.GradScaler``: every pass unscaled once, inf/NaN in any
    pass skips the step exactly; call ``scaler.update()`` after each step), ``max_grad_norm``
    (the final gradient clipped to this global L2 norm), ``skip_nonfinite`` (a step whose
    gradients hold inf/NaN is skipped as the GradScaler path skips it).
    """

    #: validation rules (see validation.check) of hyper-parameters kept as attributes and of
    #: those kept per param group
    hyper: Dict[str, str] = {"eps": ">0"}
    group_hyper: Dict[str, str] = {"rho": ">=0", "adaptive": "bool", "eta": ">=0"}
    #: which passes DDP averages: "final" (the pass before the last stage; the earlier ones
    #: stay per rank, as the seeds run them), "all", or "none" (every pass per rank, the final
    #: gradient averaged once by the skeleton)
    sync = "final"
    #: host state of the rule that a failed step puts back and a checkpoint keeps
    _rule_vars: Tuple[str, ...] = ()
    #: keys of the rule's own per-parameter state (`self.state[p]`)
    _state_keys: Tuple[str, ...] = ()
    #: True where the plan depends on the counters: a skipped step then reads its flag on the
    #: host to put them back (else a fused base optimizer skips on the device flag alone)
    _exact_counters = False
    #: which seeds' checkpoints load_state_dict converts ('sam', 'gsam', 'gam', 'vasso')
    _seed_family: Optional[str] = None

    _steps_raw = StepVar(0)
    _inner_raw = StepVar(0)
    _fused_skips = StepVar()  # [skipped, skipped inner] steps decided on the device only
    #: steps skipped for inf/NaN (a device tensor, no host read), None before the first
    skipped_steps = StepVar()
    #: L2 norm of the last final gradient before clipping (with max_grad_norm; on the device)
    last_grad_norm = StepVar()
    #: L(w + e) − L(w) of the last step(closure) that ran both (on the device), else None
    last_surrogate_gap = StepVar()
    _current = StepVar()  # the plan of the step in progress, None between steps
    _next = StepVar(0)  # index of the next stage of the step in progress
    _perturbed = StepVar()  # (params, backups) while the weights are moved
    _txn = StepVar()  # what the step in progress changed, to undo it
    _held = StepVar()  # tensors a rule keeps from one stage to the next (dropped at the end)
    _unscaled = StepVar(0)  # passes unscaled by the GradScaler in this step
    _flags = StepVar(())  # skip_nonfinite's per-pass flags
    _backward_epoch = StepVar(-1)  # _step_epoch when a backward last accumulated a gradient
    _opt_called = StepVar(False)  # read by torch LR schedulers

    #: completed steps (a skipped one does not count), and those whose plan was inner
    steps, inner_steps = _Counter("_steps_raw"), _Counter("_inner_raw")

    def _settle(self) -> None:
        """Steps a fused base optimizer skipped on the device flag were counted; take them
        off now (one host read when the counters are read, none per step)."""
        if self._fused_skips is not None:
            skipped, inner = (int(v) for v in self._fused_skips.tolist())
            self._fused_skips = None
            self._steps_raw -= skipped
            self._inner_raw -= inner

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        compat.accept_seed_calls(cls)

    def __init__(self, params: Iterable, base_optimizer: Any, group: Dict[str, Any],
                 hyper: Optional[Dict[str, Any]] = None, *, backend: str = "auto",
                 model: Optional[torch.nn.Module] = None,
                 grad_scaler: Optional[torch.amp.GradScaler] = None,
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = False,
                 **base_kwargs: Any) -> None:
        self.__dict__.setdefault("_step_vars", {})
        _registry.validate_name(backend)
        compat.check_keywords(type(self), base_optimizer, base_kwargs)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler (or None), got "
                            f"{grad_scaler!r}")
        if max_grad_norm is not None:
            max_grad_norm = check("max_grad_norm", max_grad_norm, ">0")
        skip_nonfinite = check("skip_nonfinite", skip_nonfinite, "bool")
        if "lr" in base_kwargs and not torch.is_tensor(base_kwargs["lr"]):
            check("lr", base_kwargs["lr"], ">=0")  # before torch's "'<' not supported ..."
        for name, value in (hyper or {}).items():
            setattr(self, name, check(name, value, self.hyper.get(name, "any")))
        group = {k: check(k, v, self.group_hyper.get(k, "any")) for k, v in group.items()}
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base_optimizer is an optimizer instance, so its hyper-parameters are set "
                    f"already; got extra keyword arguments {sorted(base_kwargs)}. Pass them "
                    f"when building the base optimizer, or pass its class instead")
            _check_same_params(params, base_optimizer)
            super().__init__(base_optimizer.param_groups, group)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            super().__init__(params, group)
            base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass or "
                            f"instance, got {base_optimizer!r}")
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups  # one list of shared group dicts
        for g in self.param_groups:
            _dedupe(g)
        self.defaults.update(base_optimizer.defaults)
        self.backend, self.model = backend, model
        self.grad_scaler, self.max_grad_norm = grad_scaler, max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self._check_groups()
        self._resolve(model)
        self._caches = {}
        self._watch_backward(self.param_groups)

    # ------------------------------------------------------------------ set-up
    def _resolve(self, model: Optional[torch.nn.Module]) -> None:
        """Device, backend module and distributed strategy, resolved once (not per step: a
        compiled step cannot trace the look-ups)."""
        params = _all_params(self.param_groups)
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"parameters are on several devices ({sorted(map(str, devices))}); "
                             "one optimizer must hold parameters of one device — use one "
                             "optimizer per device (or wrap the model with DDP/FSDP)")
        device = next(iter(devices), None)
        backend = _registry.resolve(self.backend, device or "cpu")
        self._dist = distributed.choose(params, model)
        self._device, self._backend_module = device, backend

    def _check_groups(self) -> None:
        for g in self.param_groups:
            for key, rule in self.group_hyper.items():
                if key in g:
                    check(key, g[key], rule)
            if "perturb" in g:
                check("perturb", g["perturb"], "bool")
        for key, rule in self.hyper.items():
            if key in self.__dict__:
                check(key, getattr(self, key), rule)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # during torch.optim.Optimizer.__init__
            super().add_param_group(param_group)
            _dedupe(self.param_groups[-1])
            return
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        n = len(self.param_groups)
        self.base_optimizer.add_param_group(param_group)
        try:  # a rejected group must not stay in the shared list
            _dedupe(self.param_groups[-1])
            self._check_groups()
            self._resolve(self.model)
        except BaseException:
            del self.param_groups[n:]
            self._resolve(self.model)
            raise
        self._watch_backward(self.param_groups[n:])

    def set_model(self, model: Optional[torch.nn.Module]) -> None:
        """Point the optimizer at the module the training loop runs (e.g. a DDP wrapper made
        after the optimizer), and resolve device and backend again (the parameters may have
        moved since construction)."""
        self._require_between_steps("set_model()")
        self._resolve(model)
        self.model = model

    def _watch_backward(self, groups) -> None:
        """A hook on one parameter per group notes that a backward pass accumulated into its
        gradient, so that step(closure) can tell a pass 1 the caller ran (the seeds' loops)."""
        ref = weakref.ref(self)

        def seen(_param):
            owner = ref()
            if owner is not None:
                owner._backward_epoch = _step_epoch[0]

        watched = self.__dict__.setdefault("_watched", [])
        for g in groups:
            p = next((p for p in g["params"] if p.requires_grad), None)
            if p is not None and hasattr(p, "register_post_accumulate_grad_hook"):
                p.register_post_accumulate_grad_hook(seen)
                watched.append(p)

    def backward_since_step(self) -> bool:
        """Whether a backward pass produced gradients since the last step of any optimizer
        (still there, not zeroed): step(closure) then takes them as pass 1."""
        return self._backward_seen()

    def _backward_seen(self) -> bool:
        """Gradients from a backward pass since the last step of any optimizer, still there."""
        return self._backward_epoch == _step_epoch[0] and \
            any(p.grad is not None for p in self.__dict__.get("_watched", ()))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._backward_epoch = -1
        super().zero_grad(set_to_none=set_to_none)

    def _ops(self):
        return self._backend_module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_optimizer={self.base_optimizer!r}, " \
               f"backend={self.backend!r})"

    # ------------------------------------------------------------------ the rules (defaults)
    def _plan(self) -> Plan:
        return TWO_PASS

    def _stage(self, k: int, slots: List[GradSlots]) -> None:
        raise NotImplementedError

    def _combine(self, slots: List[GradSlots]) -> Tensors:
        """Form the final gradient in the slots' grads (the last pass's gradients); returns
        any further tensors that must be averaged with them under sync='none'."""
        return []

    def _after_base_step(self) -> None:
        pass

    def _from_seed(self, index: int, seed_state: Dict[str, Any]) -> Dict[str, Tuple[str, Any]]:
        """Own state from a seed checkpoint's entry: {our key: (seed key, tensor)}."""
        return {}

    def set_closure(self, loss_fn: Callable[..., torch.Tensor], inputs: Any, targets: Any,
                    **kwargs: Any) -> None:
        """The seed GSAM's API: then ``outputs, loss = optimizer.step()`` runs every pass of
        ``loss_fn(model(inputs), targets, **kwargs)``; call it for every batch."""
        compat.set_closure(self, loss_fn, inputs, targets, **kwargs)

    def _step_result(self, results: List[Any]) -> Any:
        """What step(closure) returns: the first pass's result (the loss at w)."""
        return next((r for r in results if r is not None), None)

    # ------------------------------------------------------------------ the step
    @property
    def perturbed(self) -> bool:
        """True while the weights are moved away from w (between the stages of a step)."""
        return self._perturbed is not None

    def _ensure_plan(self) -> Plan:
        """The plan of the step in progress, made (once) when the step starts: a failed step
        undoes what making it changed (a criterion's draw, its decision)."""
        if self._current is None:
            for p in self.__dict__.pop("_template", ()):
                self.state.pop(p, None)
            self._begin_txn()  # the groups are checked at stage 0, before anything moves
            try:
                plan = self._plan()
            except BaseException:
                self._abort()
                raise
            self._current, self._next = plan, 0
        return self._current

    @torch.no_grad()
    def _advance(self, k: int, zero_grad: bool) -> None:
        """Stage k of the step (first_step() is 0): checks the call order, unscales the pass
        that ran before it, runs the rule; a failure undoes the whole step."""
        name = compat.STAGE_NAMES[k]
        if k == 0:
            self._require_between_steps(f"{name}()")
        plan = self._ensure_plan()
        if self._next != k or k >= len(plan.passes):
            done = compat.STAGE_NAMES[self._next - 1] + "()" if self._next else "none"
            order = " -> ".join(f"{n}()" for n in compat.STAGE_NAMES[:len(plan.passes)])
            raise RuntimeError(f"{name}() was called out of order (last completed: {done})"
                               + ("" if self._next else ", i.e. without a preceding "
                                  "first_step()") + f"; this step of {type(self).__name__} "
                               f"is {order}, each after its backward pass")
        last = k == len(plan.passes) - 1
        try:
            if k == 0 and not getattr(self, "_in_step", False):
                self._check_groups()  # step() checked them before its first pass
            slots = self._slots() if (plan.passes[k] or last) and \
                (not last or self._final_slots_needed()) else []
            if plan.passes[k]:
                self._consume_pass(slots)
            self._will_zero = zero_grad and not last and plan.passes[k + 1]
            if last:
                self._finish(slots)
            else:
                self._stage(k, slots)
                self._next = k + 1
        except BaseException:
            self._abort()
            raise
        if zero_grad and (last or plan.passes[k + 1]):
            self.zero_grad()

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """The first stage, after the backward pass at w (or, where the plan has no pass at w,
        before the step's only pass): typically move to w + e."""
        self._advance(0, zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """The next stage; on a two-stage step: restore w exactly, form the final gradient,
        take the base optimizer's step."""
        self._advance(1, zero_grad)

    def step(self, closure: Optional[Callable[[], Any]] = None, *args: Any,
             **seed_kwargs: Any) -> Any:
        """Run the whole step. ``closure`` zeroes the gradients, runs forward and backward and
        returns the loss; it is called once per pass (torch's and Lightning's contract). If a
        backward pass produced gradients since the last optimizer step (the seeds' loops:
        ``loss.backward(); optimizer.step(closure)``), those are pass 1 and the closure runs
        only for the later passes. Returns the loss at w (VaSSORe: at w + e)."""
        compat.check_step_arguments(self, args, seed_kwargs)
        closure = compat.resolve_closure(self, closure)
        if closure is None:
            return self._no_closure_step()
        self._require_between_steps("step()")
        self._in_step = True
        given = self._backward_seen()
        plan = self._ensure_plan()
        try:
            self._check_groups()  # before any pass runs
            compat.check_given_pass(self, closure, given, plan)
            if not given:
                self.zero_grad()  # this optimizer's last gradients never leak into pass 1
            results = []
            for k, runs_pass in enumerate(plan.passes):
                if runs_pass and not (k == 0 and given):
                    with torch.enable_grad(), self.pass_context():
                        results.append(closure())
                else:
                    results.append(None)
                self._advance(k, zero_grad=k < len(plan.passes) - 1)
        except BaseException:
            self._abort()
            raise
        finally:
            self._in_step = False
        self._record_gap(results, plan)
        return self._step_result(results)

    def _no_closure_step(self) -> None:
        """step() without any closure is an error, except from torch DCP's
        `_init_optim_state` (zero gradients, learning rates 0): then the state is created
        (`init_state`) and DCP's next call, state_dict(), refuses with what to use."""
        if compat.called_from_dcp() == "_init_optim_state":
            self.init_state()
            return None
        name = type(self).__name__
        raise RuntimeError(f"{name}.step() was called without a closure and before "
                           "set_closure(): it needs a closure that zeroes the gradients, runs "
                           "the forward and backward pass and returns the loss, e.g. "
                           "optimizer.step(closure); or call first_step() / second_step() "
                           "around your own backward passes")

    def _record_gap(self, results: List[Any], plan: Plan) -> None:
        """last_surrogate_gap ← L(w + e) − L(w) when the step's first two stages both ran
        the closure (the seeds' closures may return (outputs, loss)); stays on the device."""
        self.last_surrogate_gap = None
        if len(results) < 2 or results[0] is None or results[1] is None or \
                not plan.passes[0] or not plan.passes[1]:
            return
        losses = [r[-1] if isinstance(r, (tuple, list)) and r else r for r in results[:2]]
        if all(torch.is_tensor(x) and x.numel() == 1 for x in losses):
            self.last_surrogate_gap = (losses[1].detach() - losses[0].detach()).reshape(())
        elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in losses):
            self.last_surrogate_gap = torch.tensor(float(losses[1]) - float(losses[0]))

    @contextlib.contextmanager
    def pass_context(self, freeze_bn: Optional[bool] = None):
        """Wrap each forward+backward pass of a hand-written step in this (step(closure) does
        it for you): DDP's ``no_sync`` for the passes whose gradients stay per rank,
        BatchNorm running statistics frozen in every pass but the step's first (or as
        ``freeze_bn`` says), and the step undone if the pass raises."""
        plan = self._ensure_plan()
        k = self._next
        if k >= len(plan.passes) or not plan.passes[k]:
            raise RuntimeError(
                f"{type(self).__name__}: no forward-backward pass belongs here: this step "
                f"takes {'one pass' if sum(plan.passes) == 1 else 'its passes'} at the points "
                f"its stages set ({self._describe(plan)}); ask needs_perturbed_pass() / "
                "needs_inner_pass() before running a pass")
        last = not any(plan.passes[k + 1:])
        per_rank = self.sync == "none" or (self.sync == "final" and not last)
        freeze = self.model is not None and \
            (any(plan.passes[:k]) if freeze_bn is None else freeze_bn)
        try:
            with self._dist.pass_context(per_rank=per_rank):
                if freeze:
                    bn.disable_running_stats(self.model)
                try:
                    yield
                finally:
                    if freeze:
                        bn.enable_running_stats(self.model)
        except BaseException:
            self._abort()
            raise
        finally:
            self._backward_epoch = -1  # that backward was one of this step's passes

    @staticmethod
    def _describe(plan: Plan) -> str:
        return " -> ".join(("pass, " if p else "") + f"{n}()"
                           for p, n in zip(plan.passes, compat.STAGE_NAMES))

    def needs_perturbed_pass(self) -> bool:
        """Whether the step in progress (or about to start) runs a pass after first_step()."""
        plan = self._ensure_plan()
        return len(plan.passes) > 1 and plan.passes[1]

    def needs_inner_pass(self) -> bool:
        """Whether the step in progress (or about to start) computes the gradient at w (a
        pass before first_step()); taken once per step."""
        return self._ensure_plan().passes[0]

    def _require_between_steps(self, what: str) -> None:
        if self._perturbed is not None or (self._current is not None and self._next > 0):
            raise RuntimeError(f"{what} was called while the weights are perturbed (a step "
                               "is in progress: after first_step and before its last stage); "
                               "call second_step() first")

    # ------------------------------------------------------------------ building blocks
    def _slots(self, tensors: Optional[Callable[[torch.Tensor], Any]] = None
               ) -> List[GradSlots]:
        """Per param group, the parameters with a gradient (or with `tensors(p)` not None)."""
        local_grad = self._dist.local_grad if self._dist.sharded else None
        slots = []
        for g in self.param_groups:
            params, ts = [], []
            for p in g["params"]:
                t = tensors(p) if tensors is not None else p.grad
                if t is None:
                    continue
                if t.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse "
                                       "gradients (e.g. nn.Embedding(sparse=True))")
                params.append(p)
                ts.append(t if tensors is not None or local_grad is None else local_grad(p))
            if params:
                slots.append(GradSlots(g, params, ts, self._locals(params)))
        return slots

    def _locals(self, params: Tensors) -> Tensors:
        if not self._dist.sharded:
            return params
        return [self._dist.local(p) for p in params]

    def _global_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Per-rank partial sums → sums over every whole parameter (one all-reduce of a small
        tensor when the parameters are sharded)."""
        return self._dist.global_sum_(t)

    def _zeros(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self._device or "cpu")

    @staticmethod
    def _perturbing(slots: List[GradSlots]) -> List[GradSlots]:
        """The slots of groups that take part in the perturbation: a group with
        ``perturb=False`` (SAM-ON's, see sam_on.py) is left out of the norm and of e."""
        return [s for s in slots if s.group.get("perturb", True)]

    def _weighted_sum_sq(self, slots: List[GradSlots], dirs: Optional[List[Tensors]] = None,
                         adaptive: bool = True) -> torch.Tensor:
        """Σ over the perturbing slots of ‖T ⊙ d‖², T = |w| + eta in adaptive groups, else 1
        (d: the slots' grads by default), summed over shards; one kernel per (adaptive, eta)."""
        dirs = dirs if dirs is not None else [s.grads for s in slots]
        kept = [(s, d) for s, d in zip(slots, dirs) if s.group.get("perturb", True)]
        slots, dirs = [s for s, _ in kept], [d for _, d in kept]
        buckets: Dict[Tuple[bool, float], Tuple[Tensors, Tensors]] = defaultdict(lambda: ([], []))
        for s, d in zip(slots, dirs):
            ada = adaptive and bool(s.group.get("adaptive", False))
            key = (ada, float(s.group.get("eta", 0.0)) if ada else 0.0)
            buckets[key][0].extend(d)
            if ada:
                buckets[key][1].extend(s.locals)
        total = self._zeros()
        for (ada, eta), (xs, ws) in buckets.items():
            total = total + self._ops().sum_sq(xs, ws, eta)
        return self._global_sum(total)

    @torch.no_grad()
    def _perturb(self, slots: List[GradSlots], sum_sq: torch.Tensor,
                 dirs: Optional[List[Tensors]] = None, rho: Optional[float] = None,
                 sign: float = 1.0, keep_backup: bool = True) -> None:
        """w ← w + sign·ρ/(√sum_sq + eps) · T² · d for every slot (d: the slots' grads; ρ: each
        group's 'rho'), first copying w into persistent backups (the exact restore). One
        kernel per (ρ, adaptive, eta)."""
        self._note_nonfinite(sum_sq)
        dirs = dirs if dirs is not None else [s.grads for s in slots]
        kept = [(s, d) for s, d in zip(slots, dirs) if s.group.get("perturb", True)]
        slots, dirs = [s for s, _ in kept], [d for _, d in kept]
        buckets: Dict[tuple, Tuple[Tensors, Tensors, Tensors]] = defaultdict(lambda: ([], [], []))
        for s, d in zip(slots, dirs):
            ada = bool(s.group.get("adaptive", False))
            key = (sign * float(s.group["rho"] if rho is None else rho), ada,
                   float(s.group.get("eta", 0.0)) if ada else 0.0)
            buckets[key][0].extend(s.params)
            buckets[key][1].extend(s.locals)
            buckets[key][2].extend(d)
        moved, backups = [], []
        try:
            for (r, ada, eta), (keys, params, ds) in buckets.items():
                bufs = self._backups(keys, params) if keep_backup else []
                args = (ds, sum_sq, r, self.eps, ada, eta)
                try:
                    _on_params(self._ops().perturb_, params, *args, bufs)
                except ValueError:  # a parameter's .data changed since the buffers were made
                    if not keep_backup:
                        raise
                    bufs = self._backups(keys, params, check=True)
                    _on_params(self._ops().perturb_, params, *args, bufs)
                moved.extend(params)
                backups.extend(bufs)
        except BaseException:
            if moved and keep_backup:  # a later bucket failed: put the earlier ones back
                _on_params(self._ops().restore_, moved, backups)
            raise
        if keep_backup:
            self._perturbed = (moved, backups)

    def _backups(self, keys: Tensors, params: Tensors, check: bool = False) -> Tensors:
        """The persistent backup buffers of `keys` (shaped like `params`), one cached list per
        parameter list, not checked per step (that costs more host time than the copy on
        thousands of small tensors): the kernel refuses a stale one, then `check=True`."""
        cache = self._caches.setdefault("backup_lists", {})
        key = tuple(map(id, keys))
        if check or key not in cache:
            cache[key] = self._scratch("backup", keys, params)
        return cache[key]

    @torch.no_grad()
    def _restore(self) -> None:
        """Copy the kept weights back, exactly."""
        if self._perturbed is not None:
            params, backups = self._perturbed
            if params:
                _on_params(self._ops().restore_, params, backups)
            self._perturbed = None

    def _keep(self, slots: List[GradSlots], steal: bool = True, name: str = "kept") -> Tensors:
        """The gradients of the pass that just ran, owned by the step from now on: the
        gradient tensors themselves when the step zeroes them next anyway (p.grad is released;
        no copy), else copies in persistent buffers `name`. A rule may overwrite them and
        stage them as state (a buffer staged as state is replaced in the cache by the state
        tensor it supersedes: double buffering)."""
        grads = [g for s in slots for g in s.grads]
        params = [p for s in slots for p in s.params]
        if steal and self._will_zero and not self._dist.sharded and \
                all(g._base is None and p.grad is g for p, g in zip(params, grads)):
            for p in params:
                p.grad = None
            return grads
        return self._copies(name, params, grads)

    def _copies(self, name: str, params: Tensors, tensors: Tensors) -> Tensors:
        """Copies of `tensors` in the persistent buffers `name` (see _keep)."""
        copies = self._scratch(name, params, tensors)
        if copies:
            self._ops().restore_(copies, tensors)
        origin = self._txn.setdefault("cached", {})
        for c in copies:
            origin[c] = name
        return copies

    def _scratch(self, name: str, params: Tensors, like: Tensors) -> Tensors:
        """Persistent buffers `name`, one per parameter, shaped like `like` (reallocated only
        when that shape, dtype or layout changes): copies without a per-step allocation."""
        store = self._caches.setdefault(name, {})
        out = []
        for p, t in zip(params, like):
            b = store.get(p)
            if b is None or b.shape != t.shape or b.dtype != t.dtype or \
                    b.stride() != t.stride() or b.device != t.device:
                b = store[p] = torch.empty_like(t, memory_format=torch.preserve_format)
            out.append(b)
        return out

    def _put_state(self, p: torch.Tensor, key: str, value: Optional[torch.Tensor]) -> None:
        """state[p][key] ← value (None: removed) when the step commits."""
        self._txn["state"].append((p, key, value))

    def _scale(self, xs: Tensors, factor: torch.Tensor) -> None:
        if xs:
            self._ops().scale_(xs, factor)

    # ------------------------------------------------------------------ passes and the end
    def _consume_pass(self, slots: List[GradSlots]) -> None:
        """Once per pass, before a rule reads its gradients: GradScaler unscale (and its inf
        flag), maximize (the rule works on −g; the final gradient is turned back)."""
        if self._amp():
            views = self.__dict__.setdefault("_scaler_views", [])
            while len(views) <= self._unscaled:
                views.append(_ScalerPass(self))
            try:
                self.grad_scaler.unscale_(views[self._unscaled])
            except RuntimeError as exc:
                if "already been called" not in str(exc):
                    raise
                raise RuntimeError(f"{type(self).__name__}: the GradScaler already unscaled "
                                   "this pass's gradients; call scaler.update() once after "
                                   "every optimizer step (and never scaler.step(optimizer): "
                                   "the optimizer steps itself with grad_scaler=)") from exc
            self._unscaled += 1
        self._negate_maximized(slots)

    def _negate_maximized(self, slots: List[GradSlots]) -> None:
        flipped = [g for s in slots if s.group.get("maximize", False) for g in s.grads]
        if flipped:
            self._scale(flipped, torch.tensor(-1.0, device=flipped[0].device))

    def _final_slots_needed(self) -> bool:
        """Whether the last stage reads the gradients (not for plain SAM: the base optimizer
        reads them itself; listing thousands of them costs host time)."""
        return type(self)._combine is not SharpnessAwareOptimizer._combine or \
            self.max_grad_norm is not None or self.skip_nonfinite or self.sync == "none" or \
            any(g.get("maximize", False) for g in self.param_groups)

    def _finish(self, slots: List[GradSlots]) -> None:
        """The last stage: combine, restore w, average (sync='none'), negate back (maximize),
        clip, decide the skip, step the base optimizer, commit."""
        extra = self._combine(slots)
        self._restore()
        grads = [g for s in slots for g in s.grads]
        if self.sync == "none":
            self._dist.average_grads_(grads + list(extra),
                                      mean=getattr(self, "grad_reduce", "mean") == "mean")
        self._negate_maximized(slots)
        if self.max_grad_norm is not None or self.skip_nonfinite:
            sum_sq = self._global_sum(self._ops().sum_sq(grads, [], 0.0) if grads
                                      else self._zeros())
            self._note_nonfinite(sum_sq)
            if self.max_grad_norm is not None:
                norm = sum_sq.sqrt()
                self.last_grad_norm = norm
                if grads:
                    self._scale(grads, torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
        self._opt_called = True
        self.base_optimizer._opt_called = True
        found = self._found_inf()
        plan = self._current
        if found is not None:
            self.skipped_steps = found.clone() if self.skipped_steps is None else \
                self.skipped_steps + found
        manual = not getattr(self, "_in_step", False)
        if manual:  # first_step()/second_step() loops: the step hooks fire here, once
            _fire(self, _torch_optimizer._global_optimizer_pre_hooks,
                  self._optimizer_step_pre_hooks)
        if found is not None and not (self._txn["state"] or self._rule_vars or
                                     self._exact_counters) and \
                getattr(self.base_optimizer, "_step_supports_amp_scaling", False):
            # torch's fused optimizers skip on the device flag: no host read at all (the
            # counters then count the skipped step too)
            self.base_optimizer.found_inf = found
            try:
                self._base_step()
            finally:
                del self.base_optimizer.found_inf
            acc = torch.stack([found, found * float(plan.inner)])
            self._fused_skips = acc if self._fused_skips is None else self._fused_skips + acc
        elif found is not None and bool(found.item()):  # GradScaler.step() reads it too
            self._set_vars(self._txn["vars"])  # skipped: put everything back
            self._end_step()
        else:
            self._base_step()
            self._after_base_step()
        if self._current is not None:
            self._steps_raw += 1
            self._inner_raw += int(plan.inner)
            self._commit()
        if manual:
            _fire(self, self._optimizer_step_post_hooks,
                  _torch_optimizer._global_optimizer_post_hooks)

    def _base_step(self) -> None:
        """The base optimizer's step, with its own hooks but not torch's global step hooks:
        those fire once per step, for this optimizer."""
        base = self.base_optimizer
        raw = getattr(type(base).step, "__wrapped__", None)
        if raw is None or not getattr(type(base).step, "hooked", False):
            base.step()
            return
        for hook in list(base._optimizer_step_pre_hooks.values()):
            hook(base, (base,), {})
        raw(base)
        for hook in list(base._optimizer_step_post_hooks.values()):
            hook(base, (base,), {})

    # ------------------------------------------------------------------ skip decisions
    def _amp(self) -> bool:
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    def _note_nonfinite(self, sum_sq: torch.Tensor) -> None:
        """skip_nonfinite: a norm is finite exactly when every element is (the kernels
        accumulate so that finite values do not overflow)."""
        if self.skip_nonfinite:
            self._flags = tuple(self._flags) + ((~torch.isfinite(sum_sq)).to(torch.float32),)

    def _found_inf(self) -> Optional[torch.Tensor]:
        """1.0 if any pass had inf/NaN gradients, else 0.0 (device tensor); None when neither
        a GradScaler nor skip_nonfinite guards the step."""
        if not (self._amp() or self.skip_nonfinite):
            return None
        flags: Tensors = []
        if self._amp():
            views = self.__dict__.get("_scaler_views", [])[:self._unscaled]
            flags = [t for v in views
                     for t in self.grad_scaler._found_inf_per_device(v).values()]
        flags += list(self._flags)
        found = torch.clamp(torch.stack(flags).sum(), max=1.0) if flags else \
            torch.zeros((), device=self._device or "cpu")
        if not self._dist.flags_agree(self.grad_scaler if self._amp() else None):
            # a pass that ran per rank: an inf on one rank skips the step everywhere, and the
            # scales back off alike (update() reads the recorded flags)
            found = self._dist.any_(found)
            if flags:
                flags[0].copy_(found)
        return found

    # ------------------------------------------------------------------ the transaction
    def _vars(self) -> Dict[str, Any]:
        """The rule's host state (references: rules replace these values, never mutate)."""
        return {name: getattr(self, name) for name in ("_steps_raw", "_inner_raw") +
                self._rule_vars}

    def _set_vars(self, values: Dict[str, Any]) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def _begin_txn(self) -> None:
        self._txn = {"vars": self._vars(), "state": []}
        self._held = {}

    def _commit(self) -> None:
        origin = self._txn.get("cached", {})
        for p, key, value in self._txn["state"]:
            old = self.state[p].pop(key, None)
            if value is not None:
                self.state[p][key] = value
                name = origin.get(value)
                if name is not None:  # the superseded tensor becomes the next scratch
                    for cache, other in self._caches.items():
                        if cache not in ("backup", "backup_lists") and other.get(p) is old:
                            other.pop(p)
                    store = self._caches[name]
                    store[p] = old if old is not None and old is not value else \
                        torch.empty_like(value, memory_format=torch.preserve_format)
        self._end_step()

    def _abort(self) -> None:
        """Undo the step in progress: weights back exactly, staged state dropped, the rule's
        host state and counters back."""
        self._restore()
        if self._txn is not None:
            self._set_vars(self._txn["vars"])
        self._end_step()

    def _end_step(self) -> None:
        self._txn = self._current = self._held = None
        self._next, self._unscaled, self._flags = 0, 0, ()
        self._will_zero = False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state dict plus this optimizer's own state under 'sam'
        (per-parameter state by parameter index, and `_extra_state()`). torch's state-dict
        hooks registered on this optimizer fire as for any optimizer."""
        compat.refuse_dcp("get_optimizer_state_dict")
        self._require_between_steps("state_dict()")
        for hook in list(self._optimizer_state_dict_pre_hooks.values()):
            hook(self)
        sd = self.base_optimizer.state_dict()
        sd["sam"] = self.own_state_dict()
        for hook in list(self._optimizer_state_dict_post_hooks.values()):
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Ours (see state_dict), a base optimizer's, or a seed's checkpoint of this algorithm
        (converted, with a warning); another algorithm's is refused, loading nothing."""
        compat.refuse_dcp("set_optimizer_state_dict")
        self._require_between_steps("load_state_dict()")
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(compat.convert_state_dict(self, state_dict))
        own = state_dict.pop("sam", {"state": {}, "extra": {}})
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # torch builds new group dicts
        self.load_own_state_dict(own)
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    def own_state_dict(self) -> Dict[str, Any]:
        """This algorithm's own state (what the base optimizer's state dict lacks): its name,
        per-parameter state by parameter index (copies), and `extra` (counters, schedules).
        What state_dict() stores under 'sam'; sam_kernels.checkpoint uses it for DCP."""
        self._require_between_steps("own_state_dict()")
        index = {p: i for i, p in enumerate(_all_params(self.param_groups))}
        own = {index[p]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
               for p, s in self.state.items() if s and p in index}
        return {"algorithm": type(self).__name__, "state": own,
                "extra": copy.deepcopy(self._extra_state())}

    def load_own_state_dict(self, own: Dict[str, Any]) -> None:
        """Load what own_state_dict() returned (state keyed by parameter index)."""
        params = _all_params(self.param_groups)
        self.state = defaultdict(dict)
        for i, s in own["state"].items():
            p = params[int(i)]
            local = self._dist.local(p)
            self.state[p] = {k: (v.to(device=local.device, copy=True) if torch.is_tensor(v)
                                 else v) for k, v in s.items()}
        self._load_extra_state(own["extra"])
        self.__dict__.pop("_template", None)

    def _extra_state(self) -> Dict[str, Any]:
        """Checkpointed host state: the counters and the rule's `_rule_vars`."""
        return {"steps": self.steps, "inner_steps": self.inner_steps,
                **{k: getattr(self, k) for k in self._rule_vars}}

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        self._end_step()
        device = self._device or "cpu"
        self._fused_skips = None
        self._steps_raw = int(extra.get("steps", 0))
        self._inner_raw = int(extra.get("inner_steps", 0))
        self._set_vars({k: (v.to(device) if torch.is_tensor(v) else v)
                        for k, v in extra.items() if k in self._rule_vars})

    def _own_state_like(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The per-parameter state this algorithm keeps for `p` once it has stepped (zeros of
        the right shape): what `init_state()` creates for a checkpoint template."""
        return {}

    def init_state(self) -> None:
        """Create every piece of state a checkpoint of this optimizer holds, without a step:
        the base optimizer's (a step with zero gradients and learning rate 0, as DCP does for
        any optimizer) and this algorithm's own (zeros). What sam_kernels.checkpoint calls to
        build a template for `dcp.load` in fresh processes."""
        self._require_between_steps("init_state()")
        base = self.base_optimizer
        if not base.state:
            had = [(p, p.grad) for p in _all_params(self.param_groups)]
            lrs = [g.get("lr") for g in self.param_groups]
            try:
                for p, _ in had:
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
                for g in self.param_groups:
                    if "lr" in g:
                        g["lr"] = torch.tensor(0.0) if torch.is_tensor(g["lr"]) else 0.0
                self._base_step()
            finally:
                for g, lr in zip(self.param_groups, lrs):
                    if lr is not None:
                        g["lr"] = lr
                for p, grad in had:
                    p.grad = grad
        made = []
        for p in _all_params(self.param_groups):
            if p.requires_grad and not self.state.get(p):
                own = self._own_state_like(self._dist.local(p))
                if own:
                    self.state[p] = own
                    made.append(p)
        self._template = made  # zeros, not an algorithm's state: a step before a load drops it

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> Dict[str, Any]:
        """Everything (torch.optim keeps only defaults/state/groups, which loses the base
        optimizer); caches, hooks and the backend module are rebuilt on load."""
        if self._current is not None:
            raise RuntimeError(f"{type(self).__name__} cannot be copied or pickled in the "
                               "middle of a step; finish it first")
        state = dict(self.__dict__)
        for key in ("_watched", "_caches", "_backend_module", "_scaler_views", "_dist"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._caches = {}
        self._resolve(self.model)
        self._watch_backward(self.param_groups)


def _on_params(op: Callable, params: Tensors, *args: Any) -> None:
    """op(params, *args) for a kernel that writes `params`. A parameter that is a non-dense
    view (torch accepts those) is worked on in a dense copy, written back afterwards; the
    kernels refuse it before writing anything, so the common call costs nothing extra."""
    try:
        return op(params, *args)
    except ValueError:
        bad = [i for i, p in enumerate(params) if not _checks.dense(p)]
        if not bad:
            raise
    work = list(params)
    for i in bad:
        work[i] = params[i].detach().contiguous()
    op(work, *args)
    with torch.no_grad():
        for i in bad:
            params[i].copy_(work[i])


def _fire(opt: SharpnessAwareOptimizer, *hook_dicts) -> None:
    for hooks in hook_dicts:
        for hook in list(hooks.values()):
            hook(opt, (opt,), {})


class _ScalerPass:
    """What GradScaler.unscale_ needs of an optimizer, one object per pass of a step, so each
    pass is unscaled once and its inf/NaN flag kept apart."""

    def __init__(self, owner: SharpnessAwareOptimizer) -> None:
        self._owner = owner

    @property
    def param_groups(self):
        return self._owner.param_groups


def _dedupe(group: Dict[str, Any]) -> None:
    """The same tensor twice in a group would be perturbed (and stepped) twice."""
    params = group["params"]
    unique = list(dict.fromkeys(params))
    if len(unique) != len(params):
        params[:] = unique


def _all_params(groups) -> Tensors:
    return [p for g in groups for p in g["params"]]


def _check_same_params(params: Iterable, base: torch.optim.Optimizer) -> None:
    given = []
    for item in params if not isinstance(params, torch.Tensor) else [params]:
        given.extend(item["params"] if isinstance(item, dict) else [item])
    ours, theirs = {id(p) for p in given}, {id(p) for p in _all_params(base.param_groups)}
    if ours != theirs:
        raise ValueError(f"the base optimizer instance holds different parameters than the ones "
                         f"given ({len(theirs)} vs {len(ours)} tensors, {len(ours ^ theirs)} "
                         "not in both); build both from the same parameters")
