"""One validation rule set for every hyper-parameter of every class (and sam_kernels.sharpness).

Numbers are Python or numpy reals (never bool, never a tensor: reading one is a host sync);
integers are Python or numpy integers. One message template: ``Invalid <name> value: <value>
(must be <rule>)``, the form torch.optim uses, so tests match it by regex.
"""
import math
import numbers
from typing import Any, Callable, Dict, Tuple

#: rule name -> (test of a float, what the message says it must be)
_RULES: Dict[str, Tuple[Callable[[float], bool], str]] = {
    "finite": (lambda v: True, "a finite number"),
    ">=0": (lambda v: v >= 0, "a finite number >= 0"),
    ">0": (lambda v: v > 0, "a finite number > 0"),
    "[0,1]": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "(0,1]": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "[0,1)": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


def _fail(name: str, value: Any, rule: str) -> None:
    kind = "" if isinstance(value, (int, float)) and not isinstance(value, bool) else \
        f"a {type(value).__module__}.{type(value).__qualname__}; "
    raise ValueError(f"Invalid {name} value: {value!r} ({kind}must be {rule})")


def check(name: str, value: Any, rule: str) -> Any:
    """Validate `value` against `rule` (a key of the table above, 'int>=K' for an integer
    >= K, 'bool', or 'any'); returns it as a Python float/int/bool."""
    if rule == "any":
        return value
    if rule == "bool":
        if not isinstance(value, bool) and type(value).__name__ != "bool_":
            _fail(name, value, "True or False")
        return bool(value)
    if rule.startswith("int>="):
        low = int(rule[5:])
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            _fail(name, value, f"an integer >= {low}")
        return int(value)
    test, text = _RULES[rule]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, value, f"a real number: {text}")
    if not math.isfinite(value) or not test(float(value)):
        raise ValueError(f"Invalid {name} value: {value!r} (must be {text})")
    return float(value)


def check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"Invalid {name} value: {value!r} (must be one of {choices})")
    return value


def check_scheduler(name: str, scheduler: Any) -> Any:
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"{name} must have a step() method returning rho, got {scheduler!r}")
    return scheduler
