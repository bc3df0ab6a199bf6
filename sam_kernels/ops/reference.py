"""The reference backend: every primitive in plain PyTorch with `torch._foreach_*` ops.

It runs on any device, is the fallback when no compiled kernel exists, and is the oracle the
other backends are tested against. Element products are formed in the input dtype and summed
in fp32 (fp64 for fp64 inputs); the compiled kernels form them in fp32 as well, so for fp16/bf16
the two agree to the input precision, not bitwise.
"""
from collections import defaultdict
from typing import Dict, List, Sequence

import torch

from . import _checks

Tensors = Sequence[torch.Tensor]


def _device_type(xs: Tensors) -> str:
    return xs[0].device.type if len(xs) else "cpu"


def _by_dtype(xs: Tensors) -> Dict[torch.dtype, List[int]]:
    groups: Dict[torch.dtype, List[int]] = defaultdict(list)
    for i, t in enumerate(xs):
        groups[t.dtype].append(i)
    return groups


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sum_of_squares(xs: List[torch.Tensor], out: torch.Tensor) -> None:
    if xs:
        norms = torch._foreach_norm(xs, 2, dtype=_acc(xs[0].dtype))
        out.add_(torch.stack(norms).to(out.dtype).square().sum())


def sum_sq(xs: Tensors, weights: Tensors, eta: float) -> torch.Tensor:
    device = _device_type(xs)
    _checks.check_tensor_list("sum_sq", "xs", xs, device)
    if weights:
        _checks.check_tensor_list("sum_sq", "weights", weights, device)
        _checks.check_paired_lists("sum_sq", "xs", xs, "weights", weights)
    out = torch.zeros((), dtype=_checks.reduction_dtype(xs), device=xs[0].device if xs else None)
    for idx in _by_dtype(xs).values():
        group = [xs[i] for i in idx]
        if weights:
            scaled = torch._foreach_abs([weights[i] for i in idx])
            torch._foreach_add_(scaled, eta)
            torch._foreach_mul_(scaled, group)
            group = scaled
        _sum_of_squares(group, out)
    return out


def dot_sum_sq(a: Tensors, b: Tensors) -> torch.Tensor:
    device = _device_type(a)
    _checks.check_tensor_list("dot_sum_sq", "a", a, device)
    _checks.check_tensor_list("dot_sum_sq", "b", b, device)
    _checks.check_paired_lists("dot_sum_sq", "a", a, "b", b)
    dtype = _checks.reduction_dtype(a)
    out = torch.zeros(3, dtype=dtype, device=a[0].device if a else None)
    for idx in _by_dtype(a).values():
        ga, gb = [a[i] for i in idx], [b[i] for i in idx]
        acc = _acc(ga[0].dtype)
        # Signed sum with foreach ops only: sum(ab) = |max(ab, 0)|_1 - |min(ab, 0)|_1.
        prods = torch._foreach_mul(ga, gb)
        pos = torch._foreach_norm(torch._foreach_clamp_min(prods, 0.0), 1, dtype=acc)
        neg = torch._foreach_norm(torch._foreach_clamp_max(prods, 0.0), 1, dtype=acc)
        out[0] += (torch.stack(pos).sum() - torch.stack(neg).sum()).to(dtype)
        _sum_of_squares(ga, out[1])
        _sum_of_squares(gb, out[2])
    return out


def perturb_(params: Tensors, dirs: Tensors, sum_sq: torch.Tensor, rho: float, eps: float,
             adaptive: bool, eta: float, backup: Tensors) -> None:
    device = _device_type(params)
    _checks.check_tensor_list("perturb_", "params", params, device)
    _checks.check_tensor_list("perturb_", "dirs", dirs, device)
    _checks.check_paired_lists("perturb_", "params", params, "dirs", dirs)
    if backup:
        _checks.check_tensor_list("perturb_", "backup", backup, device)
        _checks.check_paired_lists("perturb_", "params", params, "backup", backup)
    _checks.check_scalar_tensor("perturb_", "sum_sq", sum_sq, 1, device)
    if not params:
        return
    if backup:
        torch._foreach_copy_(list(backup), list(params))
    for idx in _by_dtype(params).values():
        p = [params[i] for i in idx]
        d = [dirs[i] for i in idx]
        acc = _acc(p[0].dtype)
        scale = rho / (sum_sq.reshape(()).to(acc).sqrt() + eps)
        if adaptive:
            t = torch._foreach_abs(p)
            torch._foreach_add_(t, eta)
            torch._foreach_mul_(t, t)
            torch._foreach_mul_(t, d)
            d = t
        torch._foreach_add_(p, torch._foreach_mul(d, scale))


def restore_(params: Tensors, backup: Tensors) -> None:
    device = _device_type(params)
    _checks.check_tensor_list("restore_", "params", params, device)
    _checks.check_tensor_list("restore_", "backup", backup, device)
    _checks.check_paired_lists("restore_", "params", params, "backup", backup)
    if params:
        torch._foreach_copy_(list(params), list(backup))


def orth_combine_(d: Tensors, m: Tensors, stats: torch.Tensor, gamma: float, eps: float) -> None:
    device = _device_type(d)
    _checks.check_tensor_list("orth_combine_", "d", d, device)
    _checks.check_tensor_list("orth_combine_", "m", m, device)
    _checks.check_paired_lists("orth_combine_", "d", d, "m", m)
    _checks.check_scalar_tensor("orth_combine_", "stats", stats, 3, device)
    for idx in _by_dtype(d).values():
        gd = [d[i] for i in idx]
        gm = [m[i] for i in idx]
        s = stats.to(_acc(gd[0].dtype))
        m_norm, d_norm = s[1].sqrt(), s[2].sqrt()
        cos = s[0] / (m_norm * d_norm + eps)
        coef = cos * m_norm / (d_norm + eps)
        # d - gamma * (m - c * d) == (1 + gamma * c) * d - gamma * m
        torch._foreach_mul_(gd, 1 + gamma * coef)
        torch._foreach_add_(gd, gm, alpha=-gamma)


def lerp_sum_sq_(ema: Tensors, g: Tensors, theta: float) -> torch.Tensor:
    device = _device_type(ema)
    _checks.check_tensor_list("lerp_sum_sq_", "ema", ema, device)
    _checks.check_tensor_list("lerp_sum_sq_", "g", g, device)
    _checks.check_paired_lists("lerp_sum_sq_", "ema", ema, "g", g)
    out = torch.zeros((), dtype=_checks.reduction_dtype(ema), device=ema[0].device if ema else None)
    for idx in _by_dtype(ema).values():
        ge = [ema[i] for i in idx]
        torch._foreach_mul_(ge, 1.0 - theta)
        torch._foreach_add_(ge, [g[i] for i in idx], alpha=theta)
        _sum_of_squares(ge, out)
    return out


def axpby_(ys: Tensors, xs: Tensors, a: float, b: float) -> None:
    device = _device_type(ys)
    _checks.check_tensor_list("axpby_", "ys", ys, device)
    _checks.check_tensor_list("axpby_", "xs", xs, device)
    _checks.check_paired_lists("axpby_", "ys", ys, "xs", xs)
    if not ys:
        return
    if b == 0:  # y is not read (BLAS convention)
        torch._foreach_copy_(list(ys), list(xs))
        if a != 1:
            torch._foreach_mul_(list(ys), a)
        return
    if b != 1:
        torch._foreach_mul_(list(ys), b)
    torch._foreach_add_(list(ys), list(xs), alpha=a)
