"""The edge: how the seeds' training scripts and torch's conventions call the optimizers, mapped
onto the core classes' torch-style signatures, in one place for every class.

- Construction: the seeds' positional orders (GSAM's ``(params, base_optimizer, model,
  gsam_alpha, rho_scheduler, adaptive, perturb_eps)``), their keyword aliases (``gsam_alpha``,
  ``perturb_eps``, ``crt_*``), ``params=/base_optimizer=`` keywords, ``args=`` (an argparse
  namespace whose fields the seed's ``from_config`` reads) and ``logger=`` (accepted, unused).
  A class states `_seed_positional`, `_seed_aliases` and `_seed_args`; `accept_seed_calls`
  wraps its ``__init__``.
- step(): the keywords the seeds' loops pass (ignored), lk-eg's two-argument closure, the
  seed GSAM's ``set_closure`` API, the two closure contracts (see `check_given_pass`).
- Checkpoints: a seed's state dict converted (or refused), another algorithm's refused.

The seeds: davda54/sam, juntang-zhuang/GSAM, xxgege/GAM, BingcongLi/VaSSO,
lk-eg/Computationally-Efficient-SAM (docs/seeds.md).
"""
import functools
import inspect
import types
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

STAGE_NAMES = ("first_step", "second_step", "third_step", "fourth_step")
#: what the seeds' loops pass to step() besides the closure (BingcongLi, lk-eg); ignored
SEED_STEP_KEYWORDS = ("epoch", "step", "batch_idx", "model", "images", "targets", "criterion",
                      "train_data", "logger")
#: options of the base class every subclass passes through **kwargs
BASE_CLASS_KEYWORDS = ("backend", "model", "grad_scaler", "max_grad_norm", "skip_nonfinite")


# ----------------------------------------------------------------------------- construction
def accept_seed_calls(cls: type) -> None:
    """Wrap `cls.__init__` (if the class defines one) so that the seeds' call forms reach the
    core signature as keywords."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_seed_calls", False):
        return

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_seed_call_done", False):  # an inner super().__init__ call
            return init(self, *args, **kwargs)
        self.__dict__["_seed_call_done"] = True
        try:
            params, base, kwargs = _seed_to_keywords(type(self), args, kwargs)
            init(self, params, base, **kwargs)
        finally:
            self.__dict__.pop("_seed_call_done", None)

    __init__._seed_calls = True
    cls.__init__ = __init__


def _seed_to_keywords(cls: type, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    name = cls.__name__
    kwargs = dict(kwargs)
    head = list(args[:2])
    for key in ("params", "base_optimizer")[len(head):]:
        if key not in kwargs:
            raise TypeError(f"{name}() missing required argument: '{key}'")
        head.append(kwargs.pop(key))
    positional = getattr(cls, "_seed_positional", ())
    rest = args[2:]
    if len(rest) > len(positional):
        raise TypeError(f"{name}() takes params and base_optimizer positionally"
                        + (f" (then the seed's {', '.join(positional)})" if positional else "")
                        + f", but {len(args)} positional arguments were given; pass the "
                        "hyper-parameters as keywords")
    for key, value in zip(positional, rest):
        if key in kwargs:
            raise TypeError(f"{name}() got multiple values for argument '{key}'")
        kwargs[key] = value
    kwargs.pop("logger", None)  # the seeds log through it; we do not
    for alias, ours in getattr(cls, "_seed_aliases", {}).items():
        if alias in kwargs:
            value = kwargs.pop(alias)
            if ours in kwargs and kwargs[ours] != value:
                raise ValueError(f"Invalid {ours} value: {kwargs[ours]!r} given as {ours}= but "
                                 f"{value!r} as {alias}= (the seed's name for it); give it once")
            kwargs[ours] = value
    namespace = kwargs.pop("args", None)
    if namespace is not None:
        for field, ours in getattr(cls, "_seed_args", {}).items():
            value = getattr(namespace, field, None)
            if value is None:
                continue
            if ours in kwargs and kwargs[ours] != value:
                raise ValueError(f"Invalid {ours} value: {kwargs[ours]!r} given as a keyword "
                                 f"but args.{field} = {value!r}; give it once")
            kwargs[ours] = value
    return head[0], head[1], kwargs


def own_keywords(cls: type) -> List[str]:
    names = set(BASE_CLASS_KEYWORDS) | set(getattr(cls, "_seed_aliases", {})) | {"args", "logger"}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(inspect.unwrap(init)).parameters.values():
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and \
                    p.name not in ("self", "params", "base_optimizer", "group", "hyper"):
                names.add(p.name)
        if klass.__name__ == "SharpnessAwareOptimizer":
            break
    return sorted(names)


def _base_keywords(base_optimizer: Any) -> Optional[List[str]]:
    cls = base_optimizer if isinstance(base_optimizer, type) else type(base_optimizer)
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return sorted(p.name for p in params if p.kind != p.VAR_POSITIONAL and p.name != "params")


def check_keywords(cls: type, base_optimizer: Any, base_kwargs: Dict[str, Any]) -> None:
    """TypeError naming the keywords neither `cls` nor its base optimizer takes."""
    is_class = isinstance(base_optimizer, type)
    if not base_kwargs or not (isinstance(base_optimizer, torch.optim.Optimizer) or (
            is_class and issubclass(base_optimizer, torch.optim.Optimizer))):
        return
    accepted = _base_keywords(base_optimizer)
    if accepted is None and is_class:
        return
    known = set(accepted or ()) | (set() if is_class else set(base_optimizer.defaults))
    unknown = sorted(k for k in base_kwargs if k not in known)
    if not unknown:
        return
    name = cls.__name__
    base_name = (base_optimizer if is_class else type(base_optimizer)).__name__
    where = f"the base optimizer {base_name} takes {accepted}" if is_class else \
        (f"the base optimizer is an instance of {base_name}, so no keyword goes to it "
         "(its hyper-parameters are set already)")
    raise TypeError(f"{name}() got unexpected keyword argument(s) {unknown}: neither {name} "
                    f"nor its base optimizer takes {'it' if len(unknown) == 1 else 'them'}. "
                    f"{name} takes {own_keywords(cls)}; {where}")


class ReadOnlyAlias:
    """A seed's name for one of our attributes (``iteration_step_counter =
    ReadOnlyAlias("steps")``); assigning it raises."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        return self if obj is None else getattr(obj, self.target)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"{type(obj).__name__}.{self.name} is a read-only alias of "
                             f"{self.target} (the seed's name for it); the optimizer counts "
                             "its steps itself")


# ----------------------------------------------------------------------------- step()
def check_step_arguments(opt: Any, extra: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    name = type(opt).__name__
    if extra:
        raise TypeError(f"{name}.step() takes one positional argument (the closure) but "
                        f"{1 + len(extra)} were given")
    unknown = sorted(k for k in kwargs if k not in SEED_STEP_KEYWORDS)
    if unknown:
        raise TypeError(f"{name}.step() got unexpected keyword argument(s) {unknown}; it takes "
                        f"closure= and ignores the keywords the seeds' training loops pass "
                        f"({', '.join(SEED_STEP_KEYWORDS)})")


@functools.lru_cache(maxsize=256)
def _required_of_code(code: types.CodeType, n_defaults: int, n_kwdefaults: int, skip: int):
    names = code.co_varnames[skip:code.co_argcount]
    return tuple(names[:max(len(names) - n_defaults, 0)]), \
        max(code.co_kwonlyargcount - n_kwdefaults, 0)


def _required_arguments(closure: Callable) -> Optional[Tuple[Tuple[str, ...], int]]:
    """(required positional names, number of required keyword-only ones), read from the code
    object (cached: no `inspect` per step) where possible."""
    f, skip = closure, 0
    if isinstance(f, types.MethodType):
        f, skip = f.__func__, 1
    elif not isinstance(f, types.FunctionType) and \
            isinstance(getattr(type(f), "__call__", None), types.FunctionType):
        f, skip = type(f).__call__, 1
    if isinstance(f, types.FunctionType):
        return _required_of_code(f.__code__, len(f.__defaults__ or ()),
                                 len(f.__kwdefaults__ or {}), skip)
    try:
        params = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):
        return None
    return tuple(p.name for p in params if p.default is p.empty and
                 p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), \
        sum(p.default is p.empty and p.kind == p.KEYWORD_ONLY for p in params)


def resolve_closure(opt: Any, closure: Optional[Callable]) -> Optional[Callable]:
    """The closure step() calls without arguments: the given one, or set_closure()'s. lk-eg's
    ``closure(computeForward, computeBackprop)`` is called as ``closure(True, True)``."""
    name = type(opt).__name__
    if closure is None:
        return opt.__dict__.get("_stored_closure")
    if not callable(closure):
        raise TypeError(f"{name}.step(closure): the closure must be callable (zero the "
                        f"gradients, run forward and backward, return the loss), got "
                        f"{closure!r}")
    found = _required_arguments(closure)
    if found is None or found == ((), 0):
        return closure
    names, kwonly = found
    low = [n.lower() for n in names]
    if not kwonly and len(low) == 2 and "forward" in low[0] and \
            ("backprop" in low[1] or "backward" in low[1]):
        return functools.partial(closure, True, True)
    shown = ", ".join(names) + (f" and {kwonly} keyword-only" if kwonly else "")
    raise TypeError(f"{name}.step(closure): the closure requires arguments ({shown}), but "
                    f"step() calls it without any (torch's contract: zero the gradients, run "
                    f"forward and backward, return the loss). Bind them, e.g. "
                    f"optimizer.step(lambda: closure(...)); lk-eg's closure(computeForward, "
                    f"computeBackprop) is accepted as it is")


def _is_lightning_closure(closure: Any) -> bool:
    """A closure Lightning made (its Closure object, or its precision plugin's partial of a
    bound method around one)."""
    parts = [closure]
    if isinstance(closure, functools.partial):
        parts += [closure.func, *closure.args]
    parts += [getattr(p, "__self__", None) for p in list(parts)]
    return any(type(p).__module__.startswith(("lightning", "pytorch_lightning"))
               for p in parts if p is not None)


def check_given_pass(opt: Any, closure: Callable, given: bool, plan: Any) -> None:
    """step(closure) after a backward pass of the caller's (gradients produced since the last
    optimizer step): the seeds' contract takes them as pass 1. Refused where that would be
    wrong: a plan with no pass at w (the gradients would be dropped), and Lightning's
    accumulation (the earlier micro-batches' gradients are not a whole pass 1)."""
    if not given:
        return
    name = type(opt).__name__
    two_loops = (f"either run every pass in the closure (zero the gradients in it, and no "
                 f"backward before {name}.step(closure)), or run the backward at w yourself "
                 f"and let the closure run only the later passes (`loss.backward(); "
                 f"optimizer.step(closure)`, the seeds' loop)")
    if _is_lightning_closure(closure):
        raise RuntimeError(f"{name}.step(closure) was called by Lightning with gradients "
                           "already accumulated (Trainer(accumulate_grad_batches > 1)): a "
                           "SAM step needs the gradient at w of the whole batch before it "
                           "perturbs, and Lightning runs the last micro-batch inside the "
                           "closure. Use accumulate_grad_batches=1 (a larger batch), or "
                           "manual optimization with first_step()/second_step()")
    if not plan.passes[0]:
        raise RuntimeError(f"{name}.step(closure): gradients from a backward pass are there, "
                           f"but this step runs no pass at w (it reuses its perturbation), so "
                           f"they would be thrown away. Ask optimizer.needs_inner_pass() before "
                           f"the backward at w, or {two_loops}")


def set_closure(opt: Any, loss_fn: Callable[..., torch.Tensor], inputs: Any, targets: Any,
                **kwargs: Any) -> None:
    """The seed GSAM's API: step() then runs ``loss_fn(model(inputs), targets, **kwargs)``
    with a backward per pass and returns (outputs, loss) of the pass at w."""
    name = type(opt).__name__
    if opt.model is None:
        raise ValueError(f"{name}.set_closure() runs the model, so the optimizer needs it: "
                         f"{name}(..., model=model, ...)")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> loss, got {loss_fn!r}")
    model = opt.model

    def forward_backward() -> Tuple[Any, torch.Tensor]:
        opt.zero_grad()
        with torch.enable_grad():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets, **kwargs)
        (opt.grad_scaler.scale(loss) if opt._amp() else loss).backward()
        return outputs.detach() if torch.is_tensor(outputs) else outputs, loss.detach()

    opt.__dict__["_stored_closure"] = forward_backward


# ----------------------------------------------------------------------------- checkpoints
#: per-parameter keys of the seeds' state dicts that live within one step: dropped
_TRANSIENT = ("old_p", "e_w", "e_t", "old_g", "e_{t-1}", "w_t", "w_{t-1}", "pert_t",
              "pert_{t-1}", "g_{t-1}")
SEED_STATE_KEYS = frozenset(_TRANSIENT) | {"ema", "g_t"}
#: per-parameter keys of pytorch-optimizer 4.1's SAM family (its own layouts: refused)
_PYTORCH_OPTIMIZER = {"gv": "pytorch-optimizer LookSAM", "old_grad_p": "pytorch-optimizer "
                      "LookSAM", "momentum": "pytorch-optimizer FriendlySAM",
                      "sharpness": "pytorch-optimizer GAM", "grad": "pytorch-optimizer GAM"}


def identify_seed(keys: Iterable[str]) -> Optional[Tuple[str, str]]:
    keys = set(keys)
    if not keys & SEED_STATE_KEYS:
        return None
    if keys & {"e_t", "g_t", "g_{t-1}", "w_t", "pert_t"}:
        return "vasso", "lk-eg/Computationally-Efficient-SAM VaSSO/VaSSORe/VaSSOReMu"
    if "ema" in keys:
        return "vasso", "BingcongLi/VaSSO VASSO"
    if "old_g" in keys:
        return "gsam", "juntang-zhuang/GSAM GSAM"
    if "old_p" in keys:
        return "sam", "davda54/sam SAM"
    return "sam", "BingcongLi/VaSSO or lk-eg SAM"


def _fill_group_keys(opt: Any, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list):
        return state_dict
    return {**state_dict, "param_groups": [{**{k: v for k, v in opt.defaults.items()
                                               if k not in g}, **g} for g in groups]}


def convert_state_dict(opt: Any, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Our layout from `state_dict`: ours (another algorithm's refused), a base optimizer's,
    or a seed's of this algorithm (converted with a warning). Raises before loading."""
    name = type(opt).__name__
    if not isinstance(state_dict, dict) or "state" not in state_dict:
        return state_dict  # torch's load_state_dict reports it
    per_param = state_dict["state"]
    keys = {k for s in per_param.values() if isinstance(s, dict) for k in s}
    if "sam" in state_dict:
        saved = state_dict["sam"].get("algorithm")
        own_keys = {k for s in state_dict["sam"].get("state", {}).values() for k in s}
        foreign = own_keys - set(opt._state_keys)
        if (saved is not None and saved != name) or foreign:
            raise ValueError(f"{name}.load_state_dict: this is a checkpoint of "
                             f"{saved or 'another algorithm'} (its own state "
                             f"{sorted(own_keys) or 'none'}), not of {name}. Nothing was loaded")
        return _fill_group_keys(opt, state_dict)
    other = sorted({_PYTORCH_OPTIMIZER[k] for k in keys if k in _PYTORCH_OPTIMIZER})
    if "base_optimizer" in state_dict and not other:  # pytorch-optimizer saves its base's so
        group_keys = {k for g in state_dict.get("param_groups", []) for k in g}
        other = ["pytorch-optimizer FriendlySAM" if {"sigma", "lmbda"} <= group_keys else
                 "pytorch-optimizer (a SAM-family wrapper: its SAM, LookSAM, GSAM, ...)"]
    if other:
        raise ValueError(f"{name}.load_state_dict: this is a checkpoint of "
                         f"{', '.join(other)} "
                         f"(per-parameter keys {sorted(keys)}), whose state is laid out "
                         f"differently; it cannot be converted exactly. Nothing was loaded")
    found = identify_seed(keys)
    if found is None:  # a base optimizer's (or GAM's seed, which saves only that)
        return _fill_group_keys(opt, state_dict)
    family, seed = found
    if family != opt._seed_family:
        wanted = {"vasso": "VaSSO, VaSSORe or VaSSOReMu", "gsam": "GSAM", "sam": "SAM"}[family]
        raise ValueError(
            f"{name}.load_state_dict: this is a checkpoint of the seed {seed} (per-parameter "
            f"keys {sorted(keys & SEED_STATE_KEYS)}), not of {name}; load it into {wanted}. "
            "Nothing was loaded")
    base_state, own, used = {}, {}, set()
    for i, s in per_param.items():
        rest = {k: v for k, v in s.items() if k not in SEED_STATE_KEYS}
        if rest:
            base_state[i] = rest
        mine = opt._from_seed(int(i), s)
        if mine:
            own[int(i)] = {ours: t for ours, (_, t) in mine.items()}
            used.update(f"{seed_key} -> {ours}" for ours, (seed_key, _) in mine.items())
    consumed = {u.split(" -> ")[0] for u in used}
    warnings.warn(
        f"{name}.load_state_dict: converted a checkpoint of the seed {seed}: kept "
        f"{sorted(used) or 'nothing'}, dropped {sorted((keys & SEED_STATE_KEYS) - consumed)} "
        f"(state of one step, or not used here). It holds no base-optimizer state "
        f"({type(opt.base_optimizer).__name__}'s momentum etc. start afresh) and no step "
        f"counters (they start at 0), exactly as when the seed itself resumes from it",
        UserWarning, stacklevel=3)
    converted = {**state_dict, "state": base_state,
                 "sam": {"algorithm": name, "state": own, "extra": {}}}
    return _fill_group_keys(opt, converted)


def check_state_shape(opt: Any, index: int, key: str, value: Any) -> torch.Tensor:
    """A seed tensor for parameter `index`, checked against that parameter's shape."""
    params = [p for g in opt.param_groups for p in g["params"]]
    name = type(opt).__name__
    if index >= len(params):
        raise ValueError(f"{name}.load_state_dict: the checkpoint has state for parameter "
                         f"{index} but this optimizer has {len(params)} parameters. Nothing "
                         "was loaded")
    p = params[index]
    if not torch.is_tensor(value) or value.shape != p.shape:
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"{name}.load_state_dict: the checkpoint's '{key}' of parameter "
                         f"{index} has shape {shape} but the parameter has {tuple(p.shape)}: "
                         "a checkpoint of another model? Nothing was loaded")
    return value


def called_from_dcp() -> Optional[str]:
    """The torch DCP state-dict function calling into an optimizer method a few frames up,
    else None. Used only to refuse torch's DCP functions (they would drop the algorithm's own
    state), never to decide what a step does."""
    import sys
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        if frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict":
            return frame.f_code.co_name
        frame = frame.f_back
    return None


def refuse_dcp(function: str) -> None:
    if called_from_dcp() is not None:
        raise TypeError(
            f"torch.distributed.checkpoint.state_dict.{function} would drop this optimizer's "
            f"own state (its state_dict's 'sam' entry); use sam_kernels.checkpoint.{function}"
            f"(model, optimizer, ...) instead, which goes through DCP for the base optimizer "
            f"and keeps the rest")
