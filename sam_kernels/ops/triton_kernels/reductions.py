"""The reducing primitives: sum_sq, dot_sum_sq and lerp_sum_sq_ (which also writes).

Two stages, no atomics: each program stores its block's partial sum(s) (fp64) in a buffer shared
by every dtype group of the call, then one finalize program adds the partials up in a fixed order.
The result is bitwise reproducible for a given block size."""
from typing import Sequence

import torch
import triton
import triton.language as tl

from .. import _checks
from . import blocks, element_math, utils
from .utils import device_function

Tensors = Sequence[torch.Tensor]


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _finalize_kernel(partials, n_partials, out, N_OUT: tl.constexpr, FBLOCK: tl.constexpr):
    """out[k] = Σ_i partials[i * N_OUT + k], in index order of FBLOCK-wide lanes."""
    for k in tl.static_range(N_OUT):
        acc = tl.full([FBLOCK], 0, tl.float64)
        # A while loop, not range(0, n_partials, FBLOCK): Triton 3.6's interpreter cannot take
        # a runtime bound for range() under numpy >= 2.4 (int() of a 1-element array).
        first = 0
        while first < n_partials:
            idx = first + tl.arange(0, FBLOCK)
            acc += tl.load(partials + idx * N_OUT + k, mask=idx < n_partials, other=0.0)
            first += FBLOCK
        tl.store(out + k, blocks.block_sum(acc, axis=0).to(out.dtype.element_ty))


@device_function
def _sum_sq_block(x_ptr, w_ptr, offsets, numel, eta, WEIGHTED: tl.constexpr, ACC: tl.constexpr,
                  MASKED: tl.constexpr):
    x = blocks.load(x_ptr, offsets, numel, MASKED).to(ACC)
    if WEIGHTED:
        w = blocks.load(w_ptr, offsets, numel, MASKED).to(ACC)
        squares = element_math.weighted_square(x, w, eta)
    else:
        squares = element_math.square_sum_term(x)
    return blocks.block_sum(squares, axis=0)


@triton.jit
def _sum_sq_kernel(table, n_tensors, partials, first_partial, eta: tl.float64,
                   WEIGHTED: tl.constexpr, N_LISTS: tl.constexpr, DTYPE: tl.constexpr,
                   ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor, start, numel = blocks.program_block(table, n_tensors, N_LISTS, BLOCK)
    x_ptr = blocks.list_ptr(table, n_tensors, 0, tensor, DTYPE, ALIGNED)
    if WEIGHTED:
        w_ptr = blocks.list_ptr(table, n_tensors, 1, tensor, DTYPE, ALIGNED)
    else:
        w_ptr = x_ptr
    offsets = start + tl.arange(0, BLOCK)
    eta_acc = blocks.scalar_arg(eta, ACC)
    if start + BLOCK <= numel:
        part = _sum_sq_block(x_ptr, w_ptr, offsets, numel, eta_acc, WEIGHTED, ACC, False)
    else:
        part = _sum_sq_block(x_ptr, w_ptr, offsets, numel, eta_acc, WEIGHTED, ACC, True)
    tl.store(partials + first_partial + tl.program_id(0), part.to(tl.float64))


@device_function
def _dot_sum_sq_block(a_ptr, b_ptr, offsets, numel, ACC: tl.constexpr, MASKED: tl.constexpr):
    # products and squares in fp64 (finite inputs give finite sums), as the C++/CUDA kernels
    a = blocks.load(a_ptr, offsets, numel, MASKED).to(tl.float64)
    b = blocks.load(b_ptr, offsets, numel, MASKED).to(tl.float64)
    return (blocks.block_sum(a * b, axis=0), blocks.block_sum(a * a, axis=0),
            blocks.block_sum(b * b, axis=0))


@triton.jit
def _dot_sum_sq_kernel(table, n_tensors, partials, first_partial, N_LISTS: tl.constexpr,
                       DTYPE: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr,
                       BLOCK: tl.constexpr):
    tensor, start, numel = blocks.program_block(table, n_tensors, N_LISTS, BLOCK)
    a_ptr = blocks.list_ptr(table, n_tensors, 0, tensor, DTYPE, ALIGNED)
    b_ptr = blocks.list_ptr(table, n_tensors, 1, tensor, DTYPE, ALIGNED)
    offsets = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        ab, aa, bb = _dot_sum_sq_block(a_ptr, b_ptr, offsets, numel, ACC, False)
    else:
        ab, aa, bb = _dot_sum_sq_block(a_ptr, b_ptr, offsets, numel, ACC, True)
    out = partials + 3 * (first_partial + tl.program_id(0))
    tl.store(out, ab.to(tl.float64))
    tl.store(out + 1, aa.to(tl.float64))
    tl.store(out + 2, bb.to(tl.float64))


@device_function
def _lerp_sum_sq_block(e_ptr, g_ptr, offsets, numel, keep, theta, DTYPE: tl.constexpr,
                       ACC: tl.constexpr, MASKED: tl.constexpr):
    e = blocks.load(e_ptr, offsets, numel, MASKED).to(ACC)
    g = blocks.load(g_ptr, offsets, numel, MASKED).to(ACC)
    stored = element_math.lerped(e, g, keep, theta).to(DTYPE)
    blocks.store(e_ptr, offsets, stored, numel, MASKED)
    # The norm is of the value as stored, so it matches the direction used afterwards.
    return blocks.block_sum(element_math.square_sum_term(stored), axis=0)


@triton.jit
def _lerp_sum_sq_kernel(table, n_tensors, partials, first_partial, keep: tl.float64,
                        theta: tl.float64,
                        N_LISTS: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                        ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor, start, numel = blocks.program_block(table, n_tensors, N_LISTS, BLOCK)
    e_ptr = blocks.list_ptr(table, n_tensors, 0, tensor, DTYPE, ALIGNED)
    g_ptr = blocks.list_ptr(table, n_tensors, 1, tensor, DTYPE, ALIGNED)
    offsets = start + tl.arange(0, BLOCK)
    theta_acc = blocks.scalar_arg(theta, ACC)
    keep_acc = blocks.scalar_arg(keep, ACC)
    if start + BLOCK <= numel:
        part = _lerp_sum_sq_block(e_ptr, g_ptr, offsets, numel, keep_acc, theta_acc, DTYPE, ACC,
                                  False)
    else:
        part = _lerp_sum_sq_block(e_ptr, g_ptr, offsets, numel, keep_acc, theta_acc, DTYPE, ACC,
                                  True)
    tl.store(partials + first_partial + tl.program_id(0), part.to(tl.float64))


@triton.jit
def _per_tensor_finalize_kernel(table, n_tensors, positions, partials, first_partial, out,
                                N_LISTS: tl.constexpr, BLOCK: tl.constexpr,
                                FBLOCK: tl.constexpr):
    """out[position of tensor k] = Σ of tensor k's program partials, in program order (one
    finalize program per tensor of the group)."""
    k = tl.program_id(0).to(tl.int64)
    numel = tl.load(table + N_LISTS * n_tensors + k)
    count = (numel + BLOCK - 1) // BLOCK
    first = first_partial + tl.load(positions + n_tensors + k)
    acc = tl.full([FBLOCK], 0, tl.float64)
    j = 0
    while j < count:
        idx = j + tl.arange(0, FBLOCK)
        acc += tl.load(partials + first + idx, mask=idx < count, other=0.0)
        j += FBLOCK
    tl.store(out + tl.load(positions + k), blocks.block_sum(acc, axis=0))


# ---------------------------------------------------------------------------- launchers
def _reduce(op: str, lists: Sequence[Tensors], check, n_out: int, kernel, *args,
            **constexprs) -> torch.Tensor:
    """`kernel(table, n_tensors, partials, first_partial, *args)` over each dtype group of the
    paired `lists` (validated by `check()`), then the finalize into a new tensor of `n_out`
    values (0-d when n_out == 1)."""
    shape = () if n_out == 1 else (n_out,)
    if not lists[0]:
        check()
        return torch.zeros(shape, dtype=_checks.REDUCTION_DTYPE)
    plan = utils.plan(op, lists, check)
    dtype = _checks.reduction_dtype(lists[0])
    with utils.device_guard(plan.device):
        n_partials = sum(g.table.n_programs for g in plan.groups)
        partials = torch.empty(max(n_partials, 1) * n_out, dtype=torch.float64,
                               device=plan.device)
        first = 0
        for group in plan.groups:
            group.launch(kernel, partials, first, *args, **constexprs)
            first += group.table.n_programs
        out = torch.empty(shape, dtype=dtype, device=plan.device)
        utils.launch(_finalize_kernel, 1, partials, n_partials, out, N_OUT=n_out,
                     FBLOCK=utils.FINALIZE_BLOCK, num_warps=4,
                     enable_fp_fusion=utils.FP_FUSION)
    return out


def sum_sq(xs: Tensors, weights: Tensors, eta: float) -> torch.Tensor:
    weighted = len(weights) > 0
    return _reduce("sum_sq", [xs, weights] if weighted else [xs],
                   lambda: _checks.check_sum_sq(xs, weights), 1, _sum_sq_kernel, float(eta),
                   WEIGHTED=weighted)


def dot_sum_sq(a: Tensors, b: Tensors) -> torch.Tensor:
    return _reduce("dot_sum_sq", [a, b], lambda: _checks.check_dot_sum_sq(a, b), 3,
                   _dot_sum_sq_kernel)


def lerp_sum_sq_(ema: Tensors, g: Tensors, theta: float) -> torch.Tensor:
    return _reduce("lerp_sum_sq_", [ema, g], lambda: _checks.check_lerp_sum_sq(ema, g), 1,
                   _lerp_sum_sq_kernel, 1.0 - float(theta), float(theta))


def sum_sq_per_tensor(xs: Tensors) -> torch.Tensor:
    """Per-program partials as sum_sq, then one finalize program per tensor (fixed order)."""
    check = lambda: _checks.check_sum_sq_per_tensor(xs)  # noqa: E731
    if not xs:
        check()
        return torch.zeros(0, dtype=_checks.REDUCTION_DTYPE)
    plan = utils.plan("sum_sq_per_tensor", [xs], check)
    with utils.device_guard(plan.device):
        n_partials = sum(g.table.n_programs for g in plan.groups)
        partials = torch.empty(max(n_partials, 1), dtype=torch.float64, device=plan.device)
        out = torch.zeros(len(xs), dtype=_checks.REDUCTION_DTYPE, device=plan.device)
        first = 0
        for group in plan.groups:
            group.launch(_sum_sq_kernel, partials, first, 0.0, WEIGHTED=False)
            utils.launch(_per_tensor_finalize_kernel, group.table.n_tensors, group.table.table,
                         group.table.n_tensors, group.positions[0], partials, first, out,
                         N_LISTS=group.n_lists, BLOCK=group.block, FBLOCK=utils.FINALIZE_BLOCK,
                         num_warps=4, enable_fp_fusion=utils.FP_FUSION)
            first += group.table.n_programs
    return out
