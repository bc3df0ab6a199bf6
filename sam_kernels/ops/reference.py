"""The reference backend: every primitive in plain PyTorch with `torch._foreach_*` ops.

It runs on any device, is the fallback when no compiled kernel exists, and is the oracle the
other backends are tested against. It follows the compiled kernels' precision rules: element
maths in fp32 for fp32/fp16/bf16 tensors (fp16/bf16 are upcast to fp32 work copies and rounded
once when stored), in fp64 for fp64; sums in the same accumulation type. Results agree with the
compiled backends to rounding, not bitwise (the summation order differs).
"""
from collections import defaultdict
from typing import Dict, List, Sequence

import torch

from . import _checks

Tensors = Sequence[torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)


def _by_dtype(xs: Tensors) -> Dict[torch.dtype, List[int]]:
    groups: Dict[torch.dtype, List[int]] = defaultdict(list)
    for i, t in enumerate(xs):
        groups[t.dtype].append(i)
    return groups


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _upcast(xs: List[torch.Tensor]) -> List[torch.Tensor]:
    """fp32 copies of fp16/bf16 tensors (same layout); fp32/fp64 tensors as they are. To update
    in place, compute on the result and `_store` it back (a no-op for fp32/fp64)."""
    if not xs or xs[0].dtype not in _HALF:
        return xs
    work = [torch.empty_like(t, dtype=torch.float32) for t in xs]
    torch._foreach_copy_(work, xs)
    return work


def _store(xs: List[torch.Tensor], work: List[torch.Tensor]) -> None:
    """Writes fp32 work copies back into fp16/bf16 tensors (one rounding)."""
    if work is not xs:
        torch._foreach_copy_(xs, work)


def _sum_of_squares(xs: List[torch.Tensor], out: torch.Tensor) -> None:
    if xs:
        norms = torch._foreach_norm(xs, 2, dtype=_acc(xs[0].dtype))
        out.add_(torch.stack(norms).to(out.dtype).square().sum())


def sum_sq(xs: Tensors, weights: Tensors, eta: float) -> torch.Tensor:
    _checks.check_sum_sq(xs, weights)
    out = torch.zeros((), dtype=_checks.reduction_dtype(xs), device=xs[0].device if xs else None)
    for idx in _by_dtype(xs).values():
        group = [xs[i] for i in idx]
        if weights:
            scaled = torch._foreach_abs(_upcast([weights[i] for i in idx]))
            torch._foreach_add_(scaled, eta)
            torch._foreach_mul_(scaled, _upcast(group))
            group = scaled
        _sum_of_squares(group, out)
    return out


def dot_sum_sq(a: Tensors, b: Tensors) -> torch.Tensor:
    _checks.check_dot_sum_sq(a, b)
    dtype = _checks.reduction_dtype(a)
    out = torch.zeros(3, dtype=dtype, device=a[0].device if a else None)
    for idx in _by_dtype(a).values():
        ga, gb = [a[i] for i in idx], [b[i] for i in idx]
        acc = _acc(ga[0].dtype)
        # Signed sum with foreach ops only: sum(ab) = |max(ab, 0)|_1 - |min(ab, 0)|_1.
        prods = torch._foreach_mul(_upcast(ga), _upcast(gb))
        pos = torch._foreach_norm(torch._foreach_clamp_min(prods, 0.0), 1, dtype=acc)
        neg = torch._foreach_norm(torch._foreach_clamp_max(prods, 0.0), 1, dtype=acc)
        out[0] += (torch.stack(pos).sum() - torch.stack(neg).sum()).to(dtype)
        _sum_of_squares(ga, out[1])
        _sum_of_squares(gb, out[2])
    return out


def perturb_(params: Tensors, dirs: Tensors, sum_sq: torch.Tensor, rho: float, eps: float,
             adaptive: bool, eta: float, backup: Tensors) -> None:
    _checks.check_perturb(params, dirs, sum_sq, backup)
    if not params:
        return
    if backup:
        torch._foreach_copy_(list(backup), list(params))
    for idx in _by_dtype(params).values():
        p = [params[i] for i in idx]
        work = _upcast(p)
        d = _upcast([dirs[i] for i in idx])
        scale = rho / (sum_sq.reshape(()).to(_acc(p[0].dtype)).sqrt() + eps)
        if adaptive:
            t = torch._foreach_abs(work)
            torch._foreach_add_(t, eta)
            torch._foreach_mul_(t, t)
            torch._foreach_mul_(t, d)
            d = t
        torch._foreach_add_(work, torch._foreach_mul(d, scale))
        _store(p, work)


def restore_(params: Tensors, backup: Tensors) -> None:
    _checks.check_restore(params, backup)
    if params:
        torch._foreach_copy_(list(params), list(backup))


def orth_combine_(d: Tensors, m: Tensors, stats: torch.Tensor, gamma: float, eps: float) -> None:
    _checks.check_orth_combine(d, m, stats)
    for idx in _by_dtype(d).values():
        gd = [d[i] for i in idx]
        work = _upcast(gd)
        s = stats.to(_acc(gd[0].dtype))
        m_norm, d_norm = s[1].sqrt(), s[2].sqrt()
        cos = s[0] / (m_norm * d_norm + eps)
        coef = cos * m_norm / (d_norm + eps)
        # d - gamma * (m - c * d) == (1 + gamma * c) * d - gamma * m
        torch._foreach_mul_(work, 1 + gamma * coef)
        torch._foreach_add_(work, _upcast([m[i] for i in idx]), alpha=-gamma)
        _store(gd, work)


def lerp_sum_sq_(ema: Tensors, g: Tensors, theta: float) -> torch.Tensor:
    _checks.check_lerp_sum_sq(ema, g)
    out = torch.zeros((), dtype=_checks.reduction_dtype(ema), device=ema[0].device if ema else None)
    for idx in _by_dtype(ema).values():
        ge = [ema[i] for i in idx]
        work = _upcast(ge)
        torch._foreach_mul_(work, 1.0 - theta)
        torch._foreach_add_(work, _upcast([g[i] for i in idx]), alpha=theta)
        _store(ge, work)
        _sum_of_squares(ge, out)  # of the stored (rounded) values, as the kernels do
    return out


def axpby_(ys: Tensors, xs: Tensors, a: float, b: float) -> None:
    _checks.check_axpby(ys, xs)
    for idx in _by_dtype(ys).values():
        gy = [ys[i] for i in idx]
        gx = _upcast([xs[i] for i in idx])
        if b == 0:  # y is not read (BLAS convention)
            torch._foreach_copy_(gy, torch._foreach_mul(gx, a))
            continue
        work = _upcast(gy)
        torch._foreach_mul_(work, b)
        torch._foreach_add_(work, gx, alpha=a)
        _store(gy, work)
