"""The `triton` backend: every primitive as one Triton launch per dtype group over the whole
tensor list (plus one finalize launch for reductions), on CUDA tensors, or on CPU tensors in the
Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).

The functions have the signatures of sam_kernels.ops.reference and are registered as
`torch.ops.sam_kernels_triton.*` custom ops with fake implementations, so torch.compile traces
through them. Elements per program: `set_block_size(n)`, `with block_size(n): ...`, or
$SAM_KERNELS_TRITON_BLOCK (see utils.DEFAULT_BLOCK). Launch plans (device tables) are cached:
cache_info(), clear_cache(); the ones a captured CUDA graph reads stay alive until
release_graph_tables(). See docs/triton.md.
"""
from typing import List, Sequence

import torch

from .. import _checks
from . import elementwise, reductions
from .utils import (BLOCK_ENV_VAR, DEFAULT_BLOCK, block_size, cache_info, clear_cache,
                    get_block_size, interpreting, release_graph_tables, set_block_size)

Tensors = Sequence[torch.Tensor]
NAMESPACE = "sam_kernels_triton"

__all__ = ["sum_sq", "dot_sum_sq", "perturb_", "restore_", "orth_combine_", "lerp_sum_sq_",
           "axpby_", "scale_", "add_scaled_", "sum_sq_per_tensor", "block_size",
           "set_block_size", "get_block_size", "BLOCK_ENV_VAR",
           "DEFAULT_BLOCK", "cache_info", "clear_cache", "release_graph_tables", "interpreting"]


def _fake_reduction(xs: List[torch.Tensor], shape) -> torch.Tensor:
    device = xs[0].device if xs else torch.device("cpu")
    return torch.empty(shape, dtype=_checks.reduction_dtype(xs), device=device)


@torch.library.custom_op(f"{NAMESPACE}::sum_sq", mutates_args=())
def _sum_sq(xs: List[torch.Tensor], weights: List[torch.Tensor], eta: float) -> torch.Tensor:
    return reductions.sum_sq(xs, weights, eta)


# Fake kernels: output metadata for torch.compile, after the same checks as the real ones (a list
# mixing 'meta' and other tensors lands here and must raise, not return an uninitialised result).
@_sum_sq.register_fake
def _(xs, weights, eta):
    _checks.check_sum_sq(xs, weights)
    return _fake_reduction(xs, ())


@torch.library.custom_op(f"{NAMESPACE}::dot_sum_sq", mutates_args=())
def _dot_sum_sq(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
    return reductions.dot_sum_sq(a, b)


@_dot_sum_sq.register_fake
def _(a, b):
    _checks.check_dot_sum_sq(a, b)
    return _fake_reduction(a, (3,))


@torch.library.custom_op(f"{NAMESPACE}::lerp_sum_sq_", mutates_args=("ema",))
def _lerp_sum_sq_(ema: List[torch.Tensor], g: List[torch.Tensor], theta: float) -> torch.Tensor:
    return reductions.lerp_sum_sq_(ema, g, theta)


@_lerp_sum_sq_.register_fake
def _(ema, g, theta):
    _checks.check_lerp_sum_sq(ema, g)
    return _fake_reduction(ema, ())


@torch.library.custom_op(f"{NAMESPACE}::perturb_", mutates_args=("params", "backup"))
def _perturb_(params: List[torch.Tensor], dirs: List[torch.Tensor], sum_sq: torch.Tensor,
              rho: float, eps: float, adaptive: bool, eta: float,
              backup: List[torch.Tensor]) -> None:
    elementwise.perturb_(params, dirs, sum_sq, rho, eps, adaptive, eta, backup)


@torch.library.custom_op(f"{NAMESPACE}::restore_", mutates_args=("params",))
def _restore_(params: List[torch.Tensor], backup: List[torch.Tensor]) -> None:
    elementwise.restore_(params, backup)


@torch.library.custom_op(f"{NAMESPACE}::orth_combine_", mutates_args=("d",))
def _orth_combine_(d: List[torch.Tensor], m: List[torch.Tensor], stats: torch.Tensor,
                   gamma: float, eps: float) -> None:
    elementwise.orth_combine_(d, m, stats, gamma, eps)


@torch.library.custom_op(f"{NAMESPACE}::axpby_", mutates_args=("ys",))
def _axpby_(ys: List[torch.Tensor], xs: List[torch.Tensor], a: float, b: float) -> None:
    elementwise.axpby_(ys, xs, a, b)


@torch.library.custom_op(f"{NAMESPACE}::scale_", mutates_args=("xs",))
def _scale_(xs: List[torch.Tensor], factor: torch.Tensor) -> None:
    elementwise.scale_(xs, factor)


@torch.library.custom_op(f"{NAMESPACE}::add_scaled_", mutates_args=("ys",))
def _add_scaled_(ys: List[torch.Tensor], xs: List[torch.Tensor], alpha: torch.Tensor) -> None:
    elementwise.add_scaled_(ys, xs, alpha)


@torch.library.custom_op(f"{NAMESPACE}::sum_sq_per_tensor", mutates_args=())
def _sum_sq_per_tensor(xs: List[torch.Tensor]) -> torch.Tensor:
    return reductions.sum_sq_per_tensor(xs)


@_sum_sq_per_tensor.register_fake
def _(xs):
    _checks.check_sum_sq_per_tensor(xs)
    return _fake_reduction(xs, (len(xs),))


_scale_.register_fake(lambda xs, factor: _checks.check_scale(xs, factor))
_add_scaled_.register_fake(lambda ys, xs, alpha: _checks.check_add_scaled(ys, xs, alpha))
_perturb_.register_fake(
    lambda params, dirs, sum_sq, rho, eps, adaptive, eta, backup:
    _checks.check_perturb(params, dirs, sum_sq, backup))
_restore_.register_fake(lambda params, backup: _checks.check_restore(params, backup))
_orth_combine_.register_fake(
    lambda d, m, stats, gamma, eps: _checks.check_orth_combine(d, m, stats))
_axpby_.register_fake(lambda ys, xs, a, b: _checks.check_axpby(ys, xs))


# The backend contract (same signatures as sam_kernels.ops.reference). Before the custom op:
# argument types (the op's schema parser would raise an error naming no argument), tensors that
# require grad with grad mode on, and the read lists re-laid out where their memory order
# differs from the first list's (_checks.aligned); the rest of the checks run once per launch
# plan (utils.plan). The device scalar is not part of a plan's key, so its aliasing with a
# written tensor is looked at on every call (and then reported by the full checks, in order).
def _check_scalar_alias(op: str, check, written: Sequence[Tensors], scalar) -> None:
    if isinstance(scalar, torch.Tensor) and _checks.overlaps_any(written, scalar):
        check()


def sum_sq(xs: Tensors, weights: Tensors, eta: float) -> torch.Tensor:
    _checks.check_types("sum_sq", [("xs", xs), ("weights", weights)])
    weights = _checks.aligned(xs, weights) if weights else weights
    return _sum_sq(list(xs), list(weights), float(eta))


def dot_sum_sq(a: Tensors, b: Tensors) -> torch.Tensor:
    _checks.check_types("dot_sum_sq", [("a", a), ("b", b)])
    return _dot_sum_sq(list(a), _checks.aligned(a, b))


def perturb_(params: Tensors, dirs: Tensors, sum_sq: torch.Tensor, rho: float, eps: float,
             adaptive: bool, eta: float, backup: Tensors) -> None:
    _checks.check_types("perturb_", [("params", params), ("dirs", dirs), ("backup", backup)],
                        ("sum_sq", sum_sq, 1))
    _checks.check_grad_mode("perturb_", [("params", params), ("dirs", dirs), ("backup", backup)],
                            ("sum_sq", sum_sq))
    dirs = _checks.aligned(params, dirs)
    _check_scalar_alias("perturb_", lambda: _checks.check_perturb(params, dirs, sum_sq, backup),
                        [params, backup], sum_sq)
    _perturb_(list(params), list(dirs), sum_sq, float(rho), float(eps), bool(adaptive),
              float(eta), list(backup))


def restore_(params: Tensors, backup: Tensors) -> None:
    _checks.check_types("restore_", [("params", params), ("backup", backup)])
    _checks.check_grad_mode("restore_", [("params", params), ("backup", backup)])
    _restore_(list(params), _checks.aligned(params, backup))


def orth_combine_(d: Tensors, m: Tensors, stats: torch.Tensor, gamma: float, eps: float) -> None:
    _checks.check_types("orth_combine_", [("d", d), ("m", m)], ("stats", stats, 3))
    _checks.check_grad_mode("orth_combine_", [("d", d), ("m", m)], ("stats", stats))
    m = _checks.aligned(d, m)
    _check_scalar_alias("orth_combine_", lambda: _checks.check_orth_combine(d, m, stats), [d],
                        stats)
    _orth_combine_(list(d), list(m), stats, float(gamma), float(eps))


def lerp_sum_sq_(ema: Tensors, g: Tensors, theta: float) -> torch.Tensor:
    _checks.check_types("lerp_sum_sq_", [("ema", ema), ("g", g)])
    _checks.check_grad_mode("lerp_sum_sq_", [("ema", ema), ("g", g)])
    return _lerp_sum_sq_(list(ema), _checks.aligned(ema, g), float(theta))


def axpby_(ys: Tensors, xs: Tensors, a: float, b: float) -> None:
    _checks.check_types("axpby_", [("ys", ys), ("xs", xs)])
    _checks.check_grad_mode("axpby_", [("ys", ys), ("xs", xs)])
    _axpby_(list(ys), _checks.aligned(ys, xs), float(a), float(b))


def scale_(xs: Tensors, factor: torch.Tensor) -> None:
    _checks.check_types("scale_", [("xs", xs)])
    if not isinstance(factor, torch.Tensor):
        _checks.check_factor_tensor("scale_", "factor", factor, len(xs), "cpu")  # TypeError
    _checks.check_grad_mode("scale_", [("xs", xs)], ("factor", factor))
    _check_scalar_alias("scale_", lambda: _checks.check_scale(xs, factor), [xs], factor)
    _scale_(list(xs), factor)


def add_scaled_(ys: Tensors, xs: Tensors, alpha: torch.Tensor) -> None:
    _checks.check_types("add_scaled_", [("ys", ys), ("xs", xs)])
    if not isinstance(alpha, torch.Tensor):
        _checks.check_factor_tensor("add_scaled_", "alpha", alpha, len(ys), "cpu")  # TypeError
    _checks.check_grad_mode("add_scaled_", [("ys", ys), ("xs", xs)], ("alpha", alpha))
    xs = _checks.aligned(ys, xs)
    _check_scalar_alias("add_scaled_", lambda: _checks.check_add_scaled(ys, xs, alpha), [ys],
                        alpha)
    _add_scaled_(list(ys), xs, alpha)


def sum_sq_per_tensor(xs: Tensors) -> torch.Tensor:
    _checks.check_types("sum_sq_per_tensor", [("xs", xs)])
    return _sum_sq_per_tensor(list(xs))
