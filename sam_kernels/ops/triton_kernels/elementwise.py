"""The in-place primitives: perturb_, restore_, orth_combine_ and axpby_. One launch per dtype
group; scalars that come from earlier reductions (sum_sq, stats) are read from device memory by
every program, so nothing waits on the host."""
from typing import Sequence

import torch
import triton
import triton.language as tl

from .. import _checks
from . import blocks, element_math, utils
from .utils import device_function

Tensors = Sequence[torch.Tensor]


# ---------------------------------------------------------------------------- kernels
@device_function
def _perturb_block(p_ptr, d_ptr, b_ptr, offsets, numel, scale, eta, ADAPTIVE: tl.constexpr,
                   HAS_BACKUP: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                   MASKED: tl.constexpr):
    p = blocks.load(p_ptr, offsets, numel, MASKED)
    if HAS_BACKUP:
        blocks.store(b_ptr, offsets, p, numel, MASKED)
    d = blocks.load(d_ptr, offsets, numel, MASKED).to(ACC)
    new = element_math.perturbed(p.to(ACC), d, scale, eta, ADAPTIVE)
    blocks.store(p_ptr, offsets, new.to(DTYPE), numel, MASKED)


@triton.jit
def _perturb_kernel(table, n_tensors, sum_sq_ptr, rho: tl.float64, eps: tl.float64,
                    eta: tl.float64, ADAPTIVE: tl.constexpr, HAS_BACKUP: tl.constexpr,
                    N_LISTS: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor, start, numel = blocks.program_block(table, n_tensors, N_LISTS, BLOCK)
    p_ptr = blocks.list_ptr(table, n_tensors, 0, tensor, DTYPE, ALIGNED)
    d_ptr = blocks.list_ptr(table, n_tensors, 1, tensor, DTYPE, ALIGNED)
    if HAS_BACKUP:
        b_ptr = blocks.list_ptr(table, n_tensors, 2, tensor, DTYPE, ALIGNED)
    else:
        b_ptr = p_ptr
    # in fp64 from the float64 sum (which may exceed fp32's range), then rounded, as in C++/CUDA
    scale = element_math.perturb_scale(tl.load(sum_sq_ptr).to(tl.float64),
                                       blocks.scalar_arg(rho, tl.float64),
                                       blocks.scalar_arg(eps, tl.float64)).to(ACC)
    offsets = start + tl.arange(0, BLOCK)
    eta_acc = blocks.scalar_arg(eta, ACC)
    if start + BLOCK <= numel:
        _perturb_block(p_ptr, d_ptr, b_ptr, offsets, numel, scale, eta_acc, ADAPTIVE, HAS_BACKUP,
                       DTYPE, ACC, False)
    else:
        _perturb_block(p_ptr, d_ptr, b_ptr, offsets, numel, scale, eta_acc, ADAPTIVE, HAS_BACKUP,
                       DTYPE, ACC, True)


@triton.jit
def _restore_kernel(table, n_tensors, N_LISTS: tl.constexpr, DTYPE: tl.constexpr,
                    ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor, start, numel = blocks.program_block(table, n_tensors, N_LISTS, BLOCK)
    p_ptr = blocks.list_ptr(table, n_tensors, 0, tensor, DTYPE, ALIGNED)
    b_ptr = blocks.list_ptr(table, n_tensors, 1, tensor, DTYPE, ALIGNED)
    offsets = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        blocks.store(p_ptr, offsets, blocks.load(b_ptr, offsets, numel, False), numel, False)
    else:
        blocks.store(p_ptr, offsets, blocks.load(b_ptr, offsets, numel, True), numel, True)


@device_function
def _orth_combine_block(d_ptr, m_ptr, offsets, numel, gamma, coef, DTYPE: tl.constexpr,
                        ACC: tl.constexpr, MASKED: tl.constexpr):
    d = blocks.load(d_ptr, offsets, numel, MASKED).to(ACC)
    m = blocks.load(m_ptr, offsets, numel, MASKED).to(ACC)
    blocks.store(d_ptr, offsets, element_math.orth_combined(d, m, gamma, coef).to(DTYPE), numel,
                 MASKED)


@triton.jit
def _orth_combine_kernel(table, n_tensors, stats_ptr, stats_stride, gamma: tl.float64,
                         eps: tl.float64,
                         N_LISTS: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                         ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor, start, numel = blocks.program_block(table, n_tensors, N_LISTS, BLOCK)
    d_ptr = blocks.list_ptr(table, n_tensors, 0, tensor, DTYPE, ALIGNED)
    m_ptr = blocks.list_ptr(table, n_tensors, 1, tensor, DTYPE, ALIGNED)
    # in fp64 from the float64 stats (which may exceed fp32's range), then rounded, as in C++/CUDA
    coef = element_math.orth_coefficient(tl.load(stats_ptr).to(tl.float64),
                                         tl.load(stats_ptr + stats_stride).to(tl.float64),
                                         tl.load(stats_ptr + 2 * stats_stride).to(tl.float64),
                                         blocks.scalar_arg(eps, tl.float64)).to(ACC)
    offsets = start + tl.arange(0, BLOCK)
    gamma_acc = blocks.scalar_arg(gamma, ACC)
    if start + BLOCK <= numel:
        _orth_combine_block(d_ptr, m_ptr, offsets, numel, gamma_acc, coef, DTYPE, ACC, False)
    else:
        _orth_combine_block(d_ptr, m_ptr, offsets, numel, gamma_acc, coef, DTYPE, ACC, True)


@device_function
def _axpby_block(y_ptr, x_ptr, offsets, numel, a, b, B_IS_ZERO: tl.constexpr,
                 DTYPE: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):
    x = blocks.load(x_ptr, offsets, numel, MASKED).to(ACC)
    if B_IS_ZERO:
        y = x  # never read y (BLAS convention); the value is unused
    else:
        y = blocks.load(y_ptr, offsets, numel, MASKED).to(ACC)
    blocks.store(y_ptr, offsets, element_math.axpby(x, y, a, b, B_IS_ZERO).to(DTYPE), numel,
                 MASKED)


@triton.jit
def _axpby_kernel(table, n_tensors, a: tl.float64, b: tl.float64, B_IS_ZERO: tl.constexpr,
                  N_LISTS: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor, start, numel = blocks.program_block(table, n_tensors, N_LISTS, BLOCK)
    y_ptr = blocks.list_ptr(table, n_tensors, 0, tensor, DTYPE, ALIGNED)
    x_ptr = blocks.list_ptr(table, n_tensors, 1, tensor, DTYPE, ALIGNED)
    offsets = start + tl.arange(0, BLOCK)
    a_acc = blocks.scalar_arg(a, ACC)
    b_acc = blocks.scalar_arg(b, ACC)
    if start + BLOCK <= numel:
        _axpby_block(y_ptr, x_ptr, offsets, numel, a_acc, b_acc, B_IS_ZERO, DTYPE, ACC, False)
    else:
        _axpby_block(y_ptr, x_ptr, offsets, numel, a_acc, b_acc, B_IS_ZERO, DTYPE, ACC, True)


@device_function
def _factor(positions, tensor, factor_ptr, factor_stride, ACC: tl.constexpr):
    """The factor of the group's tensor `tensor`: factor[0] (stride 0, a 0-d factor) or
    factor[its position in the call] (per tensor), read in fp64 and rounded to ACC once."""
    pos = tl.load(positions + tensor)
    return tl.load(factor_ptr + pos * factor_stride).to(tl.float64).to(ACC)


@device_function
def _scale_block(x_ptr, offsets, numel, f, DTYPE: tl.constexpr, ACC: tl.constexpr,
                 MASKED: tl.constexpr):
    x = blocks.load(x_ptr, offsets, numel, MASKED).to(ACC)
    blocks.store(x_ptr, offsets, element_math.scaled(x, f).to(DTYPE), numel, MASKED)


@triton.jit
def _scale_kernel(table, n_tensors, positions, factor_ptr, factor_stride,
                  N_LISTS: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor, start, numel = blocks.program_block(table, n_tensors, N_LISTS, BLOCK)
    x_ptr = blocks.list_ptr(table, n_tensors, 0, tensor, DTYPE, ALIGNED)
    f = _factor(positions, tensor, factor_ptr, factor_stride, ACC)
    offsets = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _scale_block(x_ptr, offsets, numel, f, DTYPE, ACC, False)
    else:
        _scale_block(x_ptr, offsets, numel, f, DTYPE, ACC, True)


@device_function
def _add_scaled_block(y_ptr, x_ptr, offsets, numel, alpha, DTYPE: tl.constexpr,
                      ACC: tl.constexpr, MASKED: tl.constexpr):
    y = blocks.load(y_ptr, offsets, numel, MASKED).to(ACC)
    x = blocks.load(x_ptr, offsets, numel, MASKED).to(ACC)
    blocks.store(y_ptr, offsets, element_math.add_scaled(y, x, alpha).to(DTYPE), numel, MASKED)


@triton.jit
def _add_scaled_kernel(table, n_tensors, positions, alpha_ptr, alpha_stride,
                       N_LISTS: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                       ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor, start, numel = blocks.program_block(table, n_tensors, N_LISTS, BLOCK)
    y_ptr = blocks.list_ptr(table, n_tensors, 0, tensor, DTYPE, ALIGNED)
    x_ptr = blocks.list_ptr(table, n_tensors, 1, tensor, DTYPE, ALIGNED)
    alpha = _factor(positions, tensor, alpha_ptr, alpha_stride, ACC)
    offsets = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _add_scaled_block(y_ptr, x_ptr, offsets, numel, alpha, DTYPE, ACC, False)
    else:
        _add_scaled_block(y_ptr, x_ptr, offsets, numel, alpha, DTYPE, ACC, True)


# ---------------------------------------------------------------------------- launchers
def _checked_plan(op: str, lists: Sequence[Tensors], check, scalar=None):
    """The launch plan of the paired `lists` after every argument check (`check()` runs once per
    signature, see utils.plan); None when there is nothing to do. `scalar` = (name, tensor,
    numel): the device scalar the kernel reads, checked at every call since it is not part of
    the cached signature."""
    if not lists[0]:
        check()
        return None
    plan = utils.plan(op, lists, check)
    if scalar is not None:
        name, tensor, numel = scalar
        _checks.check_scalar_tensor(op, name, tensor, numel, plan.device.type)
        utils.check_scalar_device(op, name, tensor, plan.device)
    return plan


def _launch(plan, kernel, *args, **constexprs) -> None:
    """`kernel(table, n_tensors, *args)` once per dtype group of the plan."""
    with utils.device_guard(plan.device):
        for group in plan.groups:
            group.launch(kernel, *args, **constexprs)


def perturb_(params: Tensors, dirs: Tensors, sum_sq: torch.Tensor, rho: float, eps: float,
             adaptive: bool, eta: float, backup: Tensors) -> None:
    has_backup = len(backup) > 0
    plan = _checked_plan("perturb_", [params, dirs, backup] if has_backup else [params, dirs],
                         lambda: _checks.check_perturb(params, dirs, sum_sq, backup),
                         ("sum_sq", sum_sq, 1))
    if plan is not None:
        _launch(plan, _perturb_kernel, sum_sq, float(rho), float(eps), float(eta),
                ADAPTIVE=bool(adaptive), HAS_BACKUP=has_backup)


def restore_(params: Tensors, backup: Tensors) -> None:
    plan = _checked_plan("restore_", [params, backup],
                         lambda: _checks.check_restore(params, backup))
    if plan is not None:
        _launch(plan, _restore_kernel)


def orth_combine_(d: Tensors, m: Tensors, stats: torch.Tensor, gamma: float, eps: float) -> None:
    plan = _checked_plan("orth_combine_", [d, m], lambda: _checks.check_orth_combine(d, m, stats),
                         ("stats", stats, 3))
    if plan is not None:
        flat = stats.reshape(3)  # a view when it can be; the kernel reads flat[k * stride]
        _launch(plan, _orth_combine_kernel, flat, flat.stride(0), float(gamma), float(eps))


def axpby_(ys: Tensors, xs: Tensors, a: float, b: float) -> None:
    plan = _checked_plan("axpby_", [ys, xs], lambda: _checks.check_axpby(ys, xs))
    if plan is not None:
        a, b = float(a), float(b)
        with utils.device_guard(plan.device):
            for group in plan.groups:
                # b is "zero" (ys not read) when it is zero in the group's accumulation type,
                # as for the C++/CUDA kernels after their cast (b = 1e-50 is 0 in fp32)
                group.launch(_axpby_kernel, a, b, B_IS_ZERO=utils.rounds_to_zero(b, group.dtype))


def _factor_plan(op: str, lists: Sequence[Tensors], check, name: str, factor: torch.Tensor):
    """_checked_plan for scale_ / add_scaled_: the factor is checked at every call (it is not
    part of the cached signature)."""
    if not lists[0]:
        check()
        return None
    plan = utils.plan(op, lists, check)
    _checks.check_factor_tensor(op, name, factor, len(lists[0]), plan.device.type)
    utils.check_scalar_device(op, name, factor, plan.device)
    return plan


def _launch_with_factor(plan, kernel, factor: torch.Tensor) -> None:
    stride = 0 if factor.dim() == 0 else 1
    with utils.device_guard(plan.device):
        for group in plan.groups:
            group.launch(kernel, group.positions[0], factor, stride)


def scale_(xs: Tensors, factor: torch.Tensor) -> None:
    plan = _factor_plan("scale_", [xs], lambda: _checks.check_scale(xs, factor), "factor",
                        factor)
    if plan is not None:
        _launch_with_factor(plan, _scale_kernel, factor)


def add_scaled_(ys: Tensors, xs: Tensors, alpha: torch.Tensor) -> None:
    plan = _factor_plan("add_scaled_", [ys, xs], lambda: _checks.check_add_scaled(ys, xs, alpha),
                        "alpha", alpha)
    if plan is not None:
        _launch_with_factor(plan, _add_scaled_kernel, alpha)
