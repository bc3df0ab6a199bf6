"""The compiled backends (`cpu`, `cuda`): thin calls into the `torch.ops.sam_kernels` custom ops
defined in csrc/register.cpp. The dispatcher picks the CPU or CUDA kernel from the tensors'
device; the fake (meta) implementations below let torch.compile trace through them."""
from typing import Sequence

import torch

from .. import _extension
from . import _checks, reference

Tensors = Sequence[torch.Tensor]


def _ops():
    return torch.ops.sam_kernels


# The C++ ops check every argument before they write (csrc/include/sam_kernels/list_checks.h),
# so the common case costs no Python walk over the lists; only a call they refuse is looked at
# again here, with nothing written yet:
# - a list the op only reads whose memory order differs from its partner's (a valid gradient
#   autograd produced, see _checks.aligned) is re-laid out and the call retried;
# - a wrong type gets a TypeError naming the argument (the dispatcher's names none).
# A call whose lists are all empty holds no tensor for the dispatcher to pick a kernel from: the
# reference backend validates it the same way and returns the (zero) result. Writes to tensors
# that require grad are refused as on every backend (the C++ Autograd kernel refuses leaves
# too); with grad mode off (the optimizers) that check costs nothing.
def _call(op: str, args: list, lists, read, scalar=None):
    """torch.ops.sam_kernels.<op>(*args). `lists`: (name, position) of every tensor-list
    argument, the first being the one the others pair with; `read`: positions of the lists
    the op only reads; `scalar`: (name, position, numel) of the device scalar."""
    named = [(name, args[i]) for name, i in lists]
    scalar_arg = None if scalar is None else (scalar[0], args[scalar[1]], scalar[2])
    if torch.is_grad_enabled() and op in _checks.WRITTEN:
        _checks.check_types(op, named, scalar_arg)
        _checks.check_grad_mode(op, named, None if scalar is None else scalar_arg[:2])
    try:
        return getattr(_ops(), op)(*args)
    except ValueError as exc:
        if "memory layout" not in str(exc) and "not dense" not in str(exc):
            raise
        first = args[lists[0][1]]
        retry = list(args)
        for i in read:
            retry[i] = _checks.aligned(first, args[i])
        if all(a is b for i in read for a, b in zip(retry[i], args[i])):
            raise  # nothing to re-lay out: the layout is wrong where the op writes
        return getattr(_ops(), op)(*retry)
    except (RuntimeError, TypeError):
        _checks.check_types(op, named, scalar_arg)  # raises the TypeError naming the argument
        raise


def sum_sq(xs: Tensors, weights: Tensors, eta: float) -> torch.Tensor:
    if not xs:
        _checks.check_types("sum_sq", [("xs", xs), ("weights", weights)])
        return reference.sum_sq(xs, weights, eta)
    return _call("sum_sq", [xs, weights, eta], [("xs", 0), ("weights", 1)], read=(1,))


def dot_sum_sq(a: Tensors, b: Tensors) -> torch.Tensor:
    if not a:
        _checks.check_types("dot_sum_sq", [("a", a), ("b", b)])
        return reference.dot_sum_sq(a, b)
    return _call("dot_sum_sq", [a, b], [("a", 0), ("b", 1)], read=(1,))


def perturb_(params: Tensors, dirs: Tensors, sum_sq: torch.Tensor, rho: float, eps: float,
             adaptive: bool, eta: float, backup: Tensors) -> None:
    _call("perturb_", [params, dirs, sum_sq, rho, eps, adaptive, eta, backup],
          [("params", 0), ("dirs", 1), ("backup", 7)], read=(1,), scalar=("sum_sq", 2, 1))


def restore_(params: Tensors, backup: Tensors) -> None:
    if not params:
        _checks.check_types("restore_", [("params", params), ("backup", backup)])
        return reference.restore_(params, backup)
    _call("restore_", [params, backup], [("params", 0), ("backup", 1)], read=(1,))


def orth_combine_(d: Tensors, m: Tensors, stats: torch.Tensor, gamma: float, eps: float) -> None:
    _call("orth_combine_", [d, m, stats, gamma, eps], [("d", 0), ("m", 1)], read=(1,),
          scalar=("stats", 2, 3))


def lerp_sum_sq_(ema: Tensors, g: Tensors, theta: float) -> torch.Tensor:
    if not ema:
        _checks.check_types("lerp_sum_sq_", [("ema", ema), ("g", g)])
        return reference.lerp_sum_sq_(ema, g, theta)
    return _call("lerp_sum_sq_", [ema, g, theta], [("ema", 0), ("g", 1)], read=(1,))


def axpby_(ys: Tensors, xs: Tensors, a: float, b: float) -> None:
    if not ys:
        _checks.check_types("axpby_", [("ys", ys), ("xs", xs)])
        return reference.axpby_(ys, xs, a, b)
    _call("axpby_", [ys, xs, a, b], [("ys", 0), ("xs", 1)], read=(1,))


def _factor_type(op: str, lists, name: str, factor) -> None:
    """A factor that is not a Tensor: the TypeError every backend raises (after the lists')."""
    if not isinstance(factor, torch.Tensor):
        _checks.check_types(op, lists)
        _checks.check_factor_tensor(op, name, factor, len(lists[0][1]), "cpu")


def scale_(xs: Tensors, factor: torch.Tensor) -> None:
    _factor_type("scale_", [("xs", xs)], "factor", factor)
    if not xs:
        _checks.check_types("scale_", [("xs", xs)])
        return reference.scale_(xs, factor)
    _call("scale_", [xs, factor], [("xs", 0)], read=(), scalar=("factor", 1, 0))


def add_scaled_(ys: Tensors, xs: Tensors, alpha: torch.Tensor) -> None:
    _factor_type("add_scaled_", [("ys", ys), ("xs", xs)], "alpha", alpha)
    if not ys:
        _checks.check_types("add_scaled_", [("ys", ys), ("xs", xs)])
        return reference.add_scaled_(ys, xs, alpha)
    _call("add_scaled_", [ys, xs, alpha], [("ys", 0), ("xs", 1)], read=(1,),
          scalar=("alpha", 2, 0))


def sum_sq_per_tensor(xs: Tensors) -> torch.Tensor:
    if not xs:
        _checks.check_types("sum_sq_per_tensor", [("xs", xs)])
        return reference.sum_sq_per_tensor(xs)
    return _call("sum_sq_per_tensor", [xs], [("xs", 0)], read=())


def _reduction(xs: Tensors, shape) -> torch.Tensor:
    device = xs[0].device if len(xs) else torch.device("cpu")
    return torch.empty(shape, dtype=_checks.reduction_dtype(xs), device=device)


# Fake (meta) kernels: output metadata for torch.compile, and the same argument checks as the
# C++ kernels. The checks matter outside tracing too: a list mixing 'meta' and CPU tensors
# dispatches to the Meta kernel, which must raise rather than return an uninitialised result.
def _fake_sum_sq(xs, weights, eta):
    _checks.check_sum_sq(xs, weights)
    return _reduction(xs, ())


def _fake_dot_sum_sq(a, b):
    _checks.check_dot_sum_sq(a, b)
    return _reduction(a, (3,))


def _fake_perturb(params, dirs, sum_sq, rho, eps, adaptive, eta, backup):
    _checks.check_perturb(params, dirs, sum_sq, backup)


def _fake_restore(params, backup):
    _checks.check_restore(params, backup)


def _fake_orth_combine(d, m, stats, gamma, eps):
    _checks.check_orth_combine(d, m, stats)


def _fake_lerp_sum_sq(ema, g, theta):
    _checks.check_lerp_sum_sq(ema, g)
    return _reduction(ema, ())


def _fake_axpby(ys, xs, a, b):
    _checks.check_axpby(ys, xs)


def _fake_scale(xs, factor):
    _checks.check_scale(xs, factor)


def _fake_add_scaled(ys, xs, alpha):
    _checks.check_add_scaled(ys, xs, alpha)


def _fake_sum_sq_per_tensor(xs):
    _checks.check_sum_sq_per_tensor(xs)
    return _reduction(xs, (len(xs),))


_FAKES = {"sum_sq": _fake_sum_sq, "dot_sum_sq": _fake_dot_sum_sq, "perturb_": _fake_perturb,
          "restore_": _fake_restore, "orth_combine_": _fake_orth_combine,
          "lerp_sum_sq_": _fake_lerp_sum_sq, "axpby_": _fake_axpby, "scale_": _fake_scale,
          "add_scaled_": _fake_add_scaled, "sum_sq_per_tensor": _fake_sum_sq_per_tensor}

# A sparse tensor anywhere in a call dispatches to the sparse key, which has no C++ kernel: run
# the checks there so the caller gets the same ValueError as from the other backends.
_SPARSE_KEYS = ("SparseCPU", "SparseCUDA", "SparseCsrCPU", "SparseCsrCUDA")
_library = None


def _sparse_kernel(name: str):
    def kernel(*args):
        _FAKES[name](*args)  # raises: some argument is not a dense tensor
        raise NotImplementedError(f"sam_kernels::{name} has no kernel for sparse tensors")
    return kernel


def _register_python_kernels() -> None:
    global _library
    _library = torch.library.Library("sam_kernels", "IMPL")
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"sam_kernels::{name}")(fake)
        for key in _SPARSE_KEYS:
            _library.impl(name, _sparse_kernel(name), key)


if _extension.load():
    _register_python_kernels()