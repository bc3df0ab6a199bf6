"""What the seed repositories' training scripts need to swap our optimizers in: their
arguments to ``step`` (extra keywords, lk-eg's two-argument closure), their checkpoints (a
seed's ``state_dict`` is recognised and converted, or refused with a clear error) and one
message for every unknown constructor keyword.

The seeds: davda54/sam, BingcongLi/VaSSO, lk-eg/Computationally-Efficient-SAM,
juntang-zhuang/GSAM, xxgege/GAM. docs/vasso.md and docs/gsam_gam.md say what each accepts.
"""
import functools
import inspect
import types
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

#: what the seeds' training loops pass to ``step`` besides the closure (BingcongLi/VaSSO and
#: lk-eg ``utils/engine.py``); accepted and ignored
SEED_STEP_KEYWORDS = ("epoch", "step", "batch_idx", "model", "images", "targets", "criterion",
                      "train_data", "logger")
#: training options the base class takes from any subclass's ``**base_kwargs``
BASE_CLASS_KEYWORDS = ("grad_scaler", "max_grad_norm", "skip_nonfinite")


# ----------------------------------------------------------------------------- constructors
def own_keywords(cls: type) -> List[str]:
    """The keyword names ``cls(...)`` takes itself (not those it hands to the base optimizer)."""
    names = set(BASE_CLASS_KEYWORDS) | set(getattr(cls, "_keyword_aliases", {}))
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and \
                p.name not in ("self", "params", "base_optimizer"):
            names.add(p.name)
    return sorted(names)


def _base_keywords(base_optimizer: Any) -> Optional[List[str]]:
    """The keywords the base optimizer's class takes, or None when it takes any (**kwargs) or
    its signature cannot be read."""
    cls = base_optimizer if isinstance(base_optimizer, type) else type(base_optimizer)
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return sorted(p.name for p in params if p.kind != p.VAR_POSITIONAL and p.name != "params")


def check_keywords(cls: type, base_optimizer: Any, base_kwargs: Dict[str, Any]) -> None:
    """Raise TypeError for the keywords in `base_kwargs` (what ``cls`` did not take itself) that
    the base optimizer does not take either, naming them and what each object takes. Keywords
    the base optimizer does take are left to the base class (a class gets them; an instance
    refuses them: its hyper-parameters are set already)."""
    extra = [k for k in base_kwargs if k not in BASE_CLASS_KEYWORDS]
    is_optimizer = isinstance(base_optimizer, torch.optim.Optimizer) or (
        isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer))
    if not extra or not is_optimizer:
        return  # the base class says what base_optimizer must be
    name = cls.__name__
    accepted = _base_keywords(base_optimizer)
    is_class = isinstance(base_optimizer, type)
    if accepted is None and is_class:
        return  # it takes any keyword: the base optimizer judges them
    base_name = (base_optimizer if is_class else type(base_optimizer)).__name__
    known = set(accepted or ()) | (set() if is_class else set(getattr(base_optimizer,
                                                                       "defaults", {})))
    unknown = sorted(k for k in extra if k not in known)
    if not unknown:
        return
    if is_class:
        where = f"the base optimizer {base_name} takes {accepted}"
    else:
        where = (f"the base optimizer is an instance of {base_name}, so no keyword goes to it "
                 "(its hyper-parameters are set already)")
    raise TypeError(f"{name}() got unexpected keyword argument(s) {unknown}: neither {name} "
                    f"nor its base optimizer takes {'it' if len(unknown) == 1 else 'them'}. "
                    f"{name} takes {own_keywords(cls)}; {where}")


def from_seed_args(name: str, given: Any, default: Any, args: Any, seed_name: str) -> Any:
    """A hyper-parameter from the keyword `given` or from the seed's argparse namespace `args`
    (attribute `seed_name`): the keyword wins when it differs from its default; both given
    with different values raise."""
    from_args = getattr(args, seed_name, None) if args is not None else None
    if from_args is None:
        return given
    if given != default and given != from_args:
        raise ValueError(f"Invalid {name} value: {given!r} given as a keyword but "
                         f"args.{seed_name} = {from_args!r}; give it once")
    return from_args


# ----------------------------------------------------------------------------- step()
def check_step_arguments(opt: Any, extra_positional: Tuple[Any, ...],
                         kwargs: Dict[str, Any]) -> None:
    """step(closure, **kwargs): the keywords the seeds' training loops pass are accepted and
    ignored; anything else raises, naming the optimizer's own class."""
    name = type(opt).__name__
    if extra_positional:
        raise TypeError(f"{name}.step() takes one positional argument (the closure) but "
                        f"{1 + len(extra_positional)} were given")
    unknown = sorted(k for k in kwargs if k not in SEED_STEP_KEYWORDS)
    if unknown:
        raise TypeError(f"{name}.step() got unexpected keyword argument(s) {unknown}; it takes "
                        f"closure= and ignores the keywords the seeds' training loops pass "
                        f"({', '.join(SEED_STEP_KEYWORDS)})")


@functools.lru_cache(maxsize=256)
def _required_of_code(code: types.CodeType, n_defaults: int, n_kwdefaults: int, skip: int
                      ) -> Tuple[Tuple[str, ...], int]:
    names = code.co_varnames[skip:code.co_argcount]
    required = names[:max(len(names) - n_defaults, 0)]
    return tuple(required), max(code.co_kwonlyargcount - n_kwdefaults, 0)


def _required_arguments(closure: Callable) -> Optional[Tuple[Tuple[str, ...], int]]:
    """(names of the required positional parameters, number of required keyword-only ones),
    or None when the signature cannot be read. Plain functions, bound methods and callable
    objects are read from their code object (cached: no `inspect` per step)."""
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
    required = tuple(p.name for p in params if p.default is p.empty and
                     p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return required, sum(p.default is p.empty and p.kind == p.KEYWORD_ONLY for p in params)


def _is_lk_eg_closure(names: Tuple[str, ...]) -> bool:
    low = [n.lower() for n in names]
    return len(low) == 2 and "forward" in low[0] and ("backprop" in low[1] or
                                                      "backward" in low[1])


def adapt_closure(closure: Optional[Callable], cls_name: str) -> Optional[Callable]:
    """The closure as step() calls it, without arguments. lk-eg's
    ``closure(computeForward, computeBackprop)`` (two required parameters named so) is called
    as ``closure(True, True)``: every pass runs forward and backward, and a step that skips
    the pass at w does not call it (the seed's ``closure(False, False)`` does nothing). Other
    closures that require arguments raise with the one-line fix."""
    if closure is None:
        return None
    if not callable(closure):
        raise TypeError(f"{cls_name}.step(closure): the closure must be callable (zero the "
                        f"gradients, run forward and backward, return the loss), got "
                        f"{closure!r}")
    found = _required_arguments(closure)
    if found is None or found == ((), 0):
        return closure
    names, kwonly = found
    if not kwonly and _is_lk_eg_closure(names):
        return functools.partial(closure, True, True)
    shown = ", ".join(names) + (f" and {kwonly} keyword-only" if kwonly else "")
    raise TypeError(f"{cls_name}.step(closure): the closure requires arguments ({shown}), but "
                    f"step() calls it without any (torch's contract: zero the gradients, run "
                    f"forward and backward, return the loss). Bind them, e.g. "
                    f"optimizer.step(lambda: closure(...)); lk-eg's closure(computeForward, "
                    f"computeBackprop) is accepted as it is")


# ----------------------------------------------------------------------------- checkpoints
#: per-parameter keys of the seeds' state dicts that only live within one step (e or the kept
#: w / gradient): dropped on conversion — a checkpoint is saved between steps
_TRANSIENT = {"old_p": "davda54/sam SAM (kept w)", "e_w": "e (the perturbation)",
              "e_t": "e (the perturbation)", "old_g": "GSAM's gradient at w",
              "e_{t-1}": "lk-eg logging", "w_t": "lk-eg logging", "w_{t-1}": "lk-eg logging",
              "pert_t": "lk-eg logging", "pert_{t-1}": "lk-eg logging",
              "g_{t-1}": "lk-eg's second-to-last outer gradient"}
#: per-parameter keys that carry information across steps
_PERSISTENT = ("ema", "g_t")
SEED_STATE_KEYS = frozenset(_TRANSIENT) | frozenset(_PERSISTENT)


def identify_seed(keys: Iterable[str]) -> Optional[Tuple[str, str]]:
    """(family, seed) of a state dict whose per-parameter keys are `keys`, or None when none of
    them is a seed's. family: 'vasso', 'gsam' or 'sam'."""
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


def fill_group_keys(opt: Any, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Param groups saved without some of our per-group keys (a base optimizer's or a seed's
    checkpoint: torch replaces the groups by the saved ones) get them from the defaults, as
    add_param_group would."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list):
        return state_dict
    filled = []
    for g in groups:
        missing = {k: v for k, v in opt.defaults.items() if k not in g}
        filled.append({**missing, **g} if missing else g)
    return {**state_dict, "param_groups": filled}


def convert_seed_state_dict(opt: Any, state_dict: Dict[str, Any],
                            convert: Optional[Callable[[int, Dict[str, Any]],
                                                       Dict[str, Tuple[str, Any]]]] = None
                            ) -> Dict[str, Any]:
    """Our layout (base optimizer's state dict + 'sam') from `state_dict`, which may be ours, a
    base optimizer's, or a seed's (recognised by its per-parameter keys). A seed's is converted
    after checking that the seed's algorithm is this optimizer's (`opt._seed_family`), else
    ValueError; `convert(index, seed_state) -> {our key: (seed key, tensor)}` gives the
    optimizer's own persistent state (e.g. VaSSO's 'ema'); the per-step rest is dropped. A
    conversion warns, saying what was kept and dropped. Raises before anything is loaded."""
    if not isinstance(state_dict, dict) or "state" not in state_dict:
        return state_dict  # let torch's load_state_dict report it
    if "sam" in state_dict:
        return fill_group_keys(opt, state_dict)
    per_param = state_dict["state"]
    keys = set(k for s in per_param.values() if isinstance(s, dict) for k in s)
    found = identify_seed(keys)
    if found is None:  # a base optimizer's state dict (or GAM's seed, which saves only that)
        return fill_group_keys(opt, state_dict)
    family, seed = found
    name = type(opt).__name__
    mine = getattr(opt, "_seed_family", None)
    if family != mine:
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
        mine_i = convert(int(i), s) if convert is not None else {}
        if mine_i:
            own[int(i)] = {ours: t for ours, (_, t) in mine_i.items()}
            used.update(f"{seed_key} -> {ours}" for ours, (seed_key, _) in mine_i.items())
    consumed = {u.split(" -> ")[0] for u in used}
    dropped = sorted((keys & SEED_STATE_KEYS) - consumed)
    kept = sorted(used)
    warnings.warn(
        f"{name}.load_state_dict: converted a checkpoint of the seed {seed}: kept "
        f"{kept or 'nothing'}, dropped {dropped} (state of one step, or not used here). It "
        "holds no base-optimizer "
        f"state ({type(opt.base_optimizer).__name__}'s momentum etc. start afresh) and no "
        f"step counters (they start at 0), exactly as when the seed itself resumes from it",
        UserWarning, stacklevel=3)
    converted = {**state_dict, "state": base_state, "sam": {"state": own, "extra": {}}}
    return fill_group_keys(opt, converted)


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


class ReadOnlyAlias:
    """A seed's name for one of our attributes (declare in the class body:
    ``iteration_step_counter = ReadOnlyAlias("steps")``); assigning it raises."""

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
