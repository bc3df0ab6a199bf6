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


# Before the dispatcher sees the arguments: types (it would raise a RuntimeError that names no
# argument), and lists the op only reads re-laid out where their memory order differs from the
# first list's (see _checks.aligned). A call whose lists are all empty holds no tensor for the
# dispatcher to pick a kernel from: the reference backend validates it the same way and returns
# the (zero) result. Writes to tensors that require grad are refused here as on every backend
# (the C++ Autograd kernel refuses leaves too, for direct torch.ops calls); the version counters
# and every value check are the C++ ops' (csrc/register.cpp, list_checks.h).
def sum_sq(xs: Tensors, weights: Tensors, eta: float) -> torch.Tensor:
    _checks.check_types("sum_sq", [("xs", xs), ("weights", weights)])
    if not xs:
        return reference.sum_sq(xs, weights, eta)
    return _ops().sum_sq(xs, _checks.aligned(xs, weights) if weights else weights, eta)


def dot_sum_sq(a: Tensors, b: Tensors) -> torch.Tensor:
    _checks.check_types("dot_sum_sq", [("a", a), ("b", b)])
    if not a:
        return reference.dot_sum_sq(a, b)
    return _ops().dot_sum_sq(a, _checks.aligned(a, b))


def perturb_(params: Tensors, dirs: Tensors, sum_sq: torch.Tensor, rho: float, eps: float,
             adaptive: bool, eta: float, backup: Tensors) -> None:
    _checks.check_types("perturb_", [("params", params), ("dirs", dirs), ("backup", backup)],
                        ("sum_sq", sum_sq, 1))
    _checks.check_grad_mode("perturb_", [("params", params), ("dirs", dirs), ("backup", backup)],
                            ("sum_sq", sum_sq))
    _ops().perturb_(params, _checks.aligned(params, dirs), sum_sq, rho, eps, adaptive, eta,
                    backup)


def restore_(params: Tensors, backup: Tensors) -> None:
    _checks.check_types("restore_", [("params", params), ("backup", backup)])
    _checks.check_grad_mode("restore_", [("params", params), ("backup", backup)])
    if not params:
        return reference.restore_(params, backup)
    _ops().restore_(params, _checks.aligned(params, backup))


def orth_combine_(d: Tensors, m: Tensors, stats: torch.Tensor, gamma: float, eps: float) -> None:
    _checks.check_types("orth_combine_", [("d", d), ("m", m)], ("stats", stats, 3))
    _checks.check_grad_mode("orth_combine_", [("d", d), ("m", m)], ("stats", stats))
    _ops().orth_combine_(d, _checks.aligned(d, m), stats, gamma, eps)


def lerp_sum_sq_(ema: Tensors, g: Tensors, theta: float) -> torch.Tensor:
    _checks.check_types("lerp_sum_sq_", [("ema", ema), ("g", g)])
    _checks.check_grad_mode("lerp_sum_sq_", [("ema", ema), ("g", g)])
    if not ema:
        return reference.lerp_sum_sq_(ema, g, theta)
    return _ops().lerp_sum_sq_(ema, _checks.aligned(ema, g), theta)


def axpby_(ys: Tensors, xs: Tensors, a: float, b: float) -> None:
    _checks.check_types("axpby_", [("ys", ys), ("xs", xs)])
    _checks.check_grad_mode("axpby_", [("ys", ys), ("xs", xs)])
    if not ys:
        return reference.axpby_(ys, xs, a, b)
    _ops().axpby_(ys, _checks.aligned(ys, xs), a, b)


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


_FAKES = {"sum_sq": _fake_sum_sq, "dot_sum_sq": _fake_dot_sum_sq, "perturb_": _fake_perturb,
          "restore_": _fake_restore, "orth_combine_": _fake_orth_combine,
          "lerp_sum_sq_": _fake_lerp_sum_sq, "axpby_": _fake_axpby}

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