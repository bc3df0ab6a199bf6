"""The reference backend: every primitive in plain PyTorch (`torch._foreach_*` for element-wise
work).

It runs on any device, is the fallback when no compiled kernel exists, and is the oracle the
other backends are tested against. It follows the compiled kernels' precision rules: element
maths in fp32 for fp32/fp16/bf16 tensors (fp16/bf16 are upcast to fp32 work copies and rounded
once when stored), in fp64 for fp64; every term of a reduction squared (or multiplied) and
summed in fp64, and the result is float64. Results agree with the compiled backends to
rounding, not bitwise (the summation order differs).

Reductions are thread-count independent: tensors below torch's parallel grain are reduced by
one foreach norm (torch sums each on one thread), larger CPU tensors are cut, in memory order,
into rows of `ROW` elements, each summed by one thread, and all partial sums are added in a
fixed order; the result depends only on the shapes. The op count stays constant in the number
of small tensors (large CPU tensors add a few ops each).
"""
from collections import defaultdict
from typing import Dict, List, Sequence

import torch

from . import _checks

Tensors = Sequence[torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)
_F64 = torch.float64
#: at::internal::GRAIN_SIZE: torch reduces a CPU tensor with fewer elements on one thread.
PARALLEL_MIN = 32768
#: Elements per row of a fixed-order sum: below PARALLEL_MIN, so torch sums one row on one
#: thread; a reduction over many rows is split across threads by rows only.
ROW = 16384


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


def _unaliased(written: Tensors, read: Tensors) -> List[torch.Tensor]:
    """`read` with a copy of each tensor that is the very tensor written at its position (the
    one aliasing the checks allow): these formulas take several passes, and the second would
    read what the first wrote."""
    return [r.clone() if r.numel() and r.data_ptr() == w.data_ptr() else r
            for w, r in zip(written, read)]


# ---------------------------------------------------------------------------- fixed-order sums
def _flat(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor in memory order, as a 1-d view."""
    return t.as_strided((t.numel(),), (1,))


def _row_sums(terms: torch.Tensor) -> torch.Tensor:
    """Sums of a 1-d float64 tensor's ROW-element rows (the last one shorter)."""
    n = terms.numel()
    full = n // ROW * ROW
    parts = [terms[:full].view(-1, ROW).sum(1)] if full else []
    if full < n:
        parts.append(terms[full:].sum().reshape(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _fixed_sum(parts: List[torch.Tensor], out: torch.Tensor) -> None:
    """out += the sum of the 1-d float64 `parts`, added in a fixed order."""
    if not parts:
        return
    v = torch.cat(parts) if len(parts) > 1 else parts[0]
    while v.numel() > 1:
        v = _row_sums(v)
    out.add_(v.reshape(()))


def _sq_terms(t: torch.Tensor) -> torch.Tensor:
    x = _flat(t).to(_F64)
    return x * x


def _one_thread(t: torch.Tensor) -> bool:
    """Whether torch reduces `t` in a fixed order whatever the thread count: on CPU, tensors
    below its parallel grain are summed by one thread; CUDA reductions have a fixed order."""
    return t.device.type != "cpu" or t.numel() < PARALLEL_MIN


def _sum_of_squares(xs: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """out += Σ x² in fp64: one foreach norm (fp64) over the tensors torch sums in a fixed
    order, fixed rows for the large CPU ones (a constant number of ops for small tensors)."""
    small = [t for t in xs if t.numel() and _one_thread(t)]
    parts = [torch.stack(torch._foreach_norm(small, 2, dtype=_F64)).square()] if small else []
    parts += [_row_sums(_sq_terms(t)) for t in xs if t.numel() and not _one_thread(t)]
    _fixed_sum(parts, out)


def _signed_sums(prods: List[torch.Tensor]) -> torch.Tensor:
    """Σ of each tensor in fp64 with foreach ops only: |max(x, 0)|_1 - |min(x, 0)|_1 (clamp
    keeps NaN; +inf lands in the first norm, -inf in the second, both give inf - inf = NaN)."""
    pos = torch.stack(torch._foreach_norm(torch._foreach_clamp_min(prods, 0.0), 1, dtype=_F64))
    neg = torch.stack(torch._foreach_norm(torch._foreach_clamp_max(prods, 0.0), 1, dtype=_F64))
    return pos - neg


def _dot(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
    """[Σ a·b] per tensor of one dtype group of tensors torch sums in a fixed order, as fp64,
    in a constant number of ops, with the kernels' IEEE result on non-finite input.

    Finite part: each tensor's finite values divided by their largest |value| (so the products,
    formed in the element maths type, cannot overflow fp32), scaled back in fp64 (~1e-7
    relative). Non-finite part: with a = a_c + α (a_c clamped to the finite range, α = a - a_c
    in {0, ±inf}), Σ α·b_c + a_c·β is exactly 0 for finite pairs and the IEEE product's ±inf or
    NaN (0·inf) otherwise, so the sum is ±inf, inf - inf = NaN, or NaN as the kernels' fp64
    sums are. (Dividing by a largest |value| of inf turned every inf into NaN.)"""
    a, b = _upcast(a), _upcast(b)
    big = torch.finfo(a[0].dtype).max
    tiny = torch.finfo(a[0].dtype).tiny

    def split(xs):
        clamped = torch._foreach_clamp_max(torch._foreach_clamp_min(xs, -big), big)
        excess = torch._foreach_sub(xs, clamped)  # 0, ±inf, or NaN
        finite = torch._foreach_sub(clamped, torch._foreach_clamp_max(
            torch._foreach_clamp_min(excess, -big), big))  # ±inf elements become 0
        return clamped, excess, finite

    a_c, alpha, a_f = split(a)
    b_c, beta, b_f = split(b)
    ma = torch._foreach_norm(a_f, float("inf"))
    mb = torch._foreach_norm(b_f, float("inf"))
    torch._foreach_clamp_min_(ma, tiny)
    torch._foreach_clamp_min_(mb, tiny)
    scaled = torch._foreach_mul(torch._foreach_div(a_f, ma), torch._foreach_div(b_f, mb))
    finite = _signed_sums(scaled) * torch.stack(ma).to(_F64) * torch.stack(mb).to(_F64)
    infinite = _signed_sums(torch._foreach_add(torch._foreach_mul(alpha, b_c),
                                               torch._foreach_mul(a_c, beta)))
    return finite + infinite


# ---------------------------------------------------------------------------- primitives
def sum_sq(xs: Tensors, weights: Tensors, eta: float) -> torch.Tensor:
    _checks.check_types("sum_sq", [("xs", xs), ("weights", weights)])
    weights = _checks.aligned(xs, weights) if weights else weights
    _checks.check_sum_sq(xs, weights)
    out = torch.zeros((), dtype=_F64, device=xs[0].device if xs else None)
    for idx in _by_dtype(xs).values():
        group = [xs[i] for i in idx]
        if weights:
            # (|w| + eta) · x in the element type (as the kernels), squared in fp64
            scaled = torch._foreach_abs(_upcast([weights[i] for i in idx]))
            torch._foreach_add_(scaled, eta)
            torch._foreach_mul_(scaled, _upcast(group))
            group = scaled
        _sum_of_squares(group, out)
    return out


def dot_sum_sq(a: Tensors, b: Tensors) -> torch.Tensor:
    _checks.check_types("dot_sum_sq", [("a", a), ("b", b)])
    b = _checks.aligned(a, b)
    _checks.check_dot_sum_sq(a, b)
    out = torch.zeros(3, dtype=_F64, device=a[0].device if a else None)
    dots = []
    for idx in _by_dtype(a).values():
        small = [i for i in idx if a[i].numel() and _one_thread(a[i])]
        if small:
            dots.append(_dot([a[i] for i in small], [b[i] for i in small]))
    for x, y in zip(a, b):
        if x.numel() and not _one_thread(x):
            dots.append(_row_sums(_flat(x).to(_F64) * _flat(y).to(_F64)))
    _fixed_sum(dots, out[0])
    _sum_of_squares(a, out[1])
    _sum_of_squares(b, out[2])
    return out


def _scale(sum_sq: torch.Tensor, rho: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """rho / (√sum_sq + eps) computed in fp64 (sum_sq may exceed fp32's range), then rounded to
    the element type's accumulation type, as the kernels do."""
    return (rho / (sum_sq.reshape(()).to(_F64).sqrt() + eps)).to(_acc(dtype))


def perturb_(params: Tensors, dirs: Tensors, sum_sq: torch.Tensor, rho: float, eps: float,
             adaptive: bool, eta: float, backup: Tensors) -> None:
    _checks.check_types("perturb_", [("params", params), ("dirs", dirs), ("backup", backup)],
                        ("sum_sq", sum_sq, 1))
    _checks.check_grad_mode("perturb_", [("params", params), ("dirs", dirs), ("backup", backup)],
                            ("sum_sq", sum_sq))
    dirs = _checks.aligned(params, dirs)
    _checks.check_perturb(params, dirs, sum_sq, backup)
    if not params:
        return
    dirs = _unaliased(params, dirs)
    if backup:
        torch._foreach_copy_(list(backup), list(params))
    for idx in _by_dtype(params).values():
        p = [params[i] for i in idx]
        work = _upcast(p)
        d = _upcast([dirs[i] for i in idx])
        scale = _scale(sum_sq, rho, eps, p[0].dtype)
        if adaptive:
            # p + ((t·d)·s)·t, t = |p| + eta (element_math.h perturbed): |s·t·d| <= rho when
            # sum_sq is Σ(t·d)², so no intermediate overflows unless the result does (t² first
            # overflowed fp32 from |p| ~ 1.8e19, s·t first for a large s)
            t = torch._foreach_abs(work)
            torch._foreach_add_(t, eta)
            step = torch._foreach_mul(t, d)
            torch._foreach_mul_(step, scale)
            torch._foreach_mul_(step, t)
        else:
            step = torch._foreach_mul(d, scale)
        torch._foreach_add_(work, step)
        _store(p, work)


def restore_(params: Tensors, backup: Tensors) -> None:
    _checks.check_types("restore_", [("params", params), ("backup", backup)])
    _checks.check_grad_mode("restore_", [("params", params), ("backup", backup)])
    backup = _checks.aligned(params, backup)
    _checks.check_restore(params, backup)
    # a tensor restored from itself is left as it is (copy_ of a tensor onto itself is a no-op)
    pairs = [(p, b) for p, b in zip(params, backup) if not (p.data_ptr() == b.data_ptr() and
                                                            p.numel())]
    if pairs:
        torch._foreach_copy_([p for p, _ in pairs], [b for _, b in pairs])


def _coefficient(stats: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """c = cos · ‖m‖ / (‖d‖ + eps) from stats in fp64 (the sums may exceed fp32's range), then
    rounded to the element type's accumulation type, as the kernels do."""
    s = stats.to(_F64)
    m_norm, d_norm = s[1].sqrt(), s[2].sqrt()
    cos = s[0] / (m_norm * d_norm + eps)
    return (cos * m_norm / (d_norm + eps)).to(_acc(dtype))


def orth_combine_(d: Tensors, m: Tensors, stats: torch.Tensor, gamma: float, eps: float) -> None:
    _checks.check_types("orth_combine_", [("d", d), ("m", m)], ("stats", stats, 3))
    _checks.check_grad_mode("orth_combine_", [("d", d), ("m", m)], ("stats", stats))
    m = _checks.aligned(d, m)
    _checks.check_orth_combine(d, m, stats)
    m = _unaliased(d, m)
    for idx in _by_dtype(d).values():
        gd = [d[i] for i in idx]
        work = _upcast(gd)
        coef = _coefficient(stats, eps, gd[0].dtype)
        # d - gamma * (m - c * d) in this order, each step rounded (element_math.h
        # orth_combined): (1 + gamma·c)·d - gamma·m overflows where this is finite
        t = torch._foreach_mul(work, coef)
        t = torch._foreach_sub(_upcast([m[i] for i in idx]), t)
        torch._foreach_mul_(t, gamma)
        torch._foreach_sub_(work, t)
        _store(gd, work)


def lerp_sum_sq_(ema: Tensors, g: Tensors, theta: float) -> torch.Tensor:
    _checks.check_types("lerp_sum_sq_", [("ema", ema), ("g", g)])
    _checks.check_grad_mode("lerp_sum_sq_", [("ema", ema), ("g", g)])
    g = _checks.aligned(ema, g)
    _checks.check_lerp_sum_sq(ema, g)
    g = _unaliased(ema, g)
    out = torch.zeros((), dtype=_F64, device=ema[0].device if ema else None)
    for idx in _by_dtype(ema).values():
        ge = [ema[i] for i in idx]
        work = _upcast(ge)
        torch._foreach_mul_(work, 1.0 - theta)  # 1 - theta in fp64, rounded once (as the kernels)
        # a separate product and sum, as the kernels (torch's add with alpha may fuse an FMA)
        torch._foreach_add_(work, torch._foreach_mul(_upcast([g[i] for i in idx]), theta))
        _store(ge, work)
    _sum_of_squares(ema, out)  # of the stored (rounded) values, as the kernels do
    return out


def axpby_(ys: Tensors, xs: Tensors, a: float, b: float) -> None:
    _checks.check_types("axpby_", [("ys", ys), ("xs", xs)])
    _checks.check_grad_mode("axpby_", [("ys", ys), ("xs", xs)])
    xs = _checks.aligned(ys, xs)
    _checks.check_axpby(ys, xs)
    xs = _unaliased(ys, xs)
    for idx in _by_dtype(ys).values():
        gy = [ys[i] for i in idx]
        gx = _upcast([xs[i] for i in idx])
        if _checks.rounds_to_zero(b, gy[0].dtype):  # y is not read (BLAS convention)
            torch._foreach_copy_(gy, torch._foreach_mul(gx, a))
            continue
        work = _upcast(gy)
        torch._foreach_mul_(work, b)
        # a separate product and sum, as the kernels (torch's add with alpha may fuse an FMA)
        torch._foreach_add_(work, torch._foreach_mul(gx, a))
        _store(gy, work)


def _factors(factor: torch.Tensor, idx: List[int], dtype: torch.dtype):
    """The factor(s) of the tensors `idx` in the element maths type: one 0-d tensor, or a list of
    0-d tensors (one per tensor) when `factor` is per tensor. Device tensors, never read here."""
    f = factor.to(_acc(dtype))
    if f.dim() == 0:
        return f
    every = f.unbind()  # one op, not one per tensor (the reference's op count stays constant)
    return [every[i] for i in idx]


def scale_(xs: Tensors, factor: torch.Tensor) -> None:
    _checks.check_types("scale_", [("xs", xs)])
    _checks.check_grad_mode("scale_", [("xs", xs)], ("factor", factor)
                            if isinstance(factor, torch.Tensor) else None)
    _checks.check_scale(xs, factor)
    for idx in _by_dtype(xs).values():
        group = [xs[i] for i in idx if xs[i].numel()]
        if not group:
            continue
        work = _upcast(group)
        # one foreach op: a 0-d factor, or one 0-d factor per tensor
        torch._foreach_mul_(work, _factors(factor, [i for i in idx if xs[i].numel()],
                                           group[0].dtype))
        _store(group, work)


def add_scaled_(ys: Tensors, xs: Tensors, alpha: torch.Tensor) -> None:
    _checks.check_types("add_scaled_", [("ys", ys), ("xs", xs)])
    _checks.check_grad_mode("add_scaled_", [("ys", ys), ("xs", xs)], ("alpha", alpha)
                            if isinstance(alpha, torch.Tensor) else None)
    xs = _checks.aligned(ys, xs)
    _checks.check_add_scaled(ys, xs, alpha)
    xs = _unaliased(ys, xs)
    for idx in _by_dtype(ys).values():
        idx = [i for i in idx if ys[i].numel()]
        if not idx:
            continue
        gy = [ys[i] for i in idx]
        # y + (alpha·x): the product rounded in the element maths type, then the sum (as the
        # kernels' add_scaled in element_math.h)
        step = torch._foreach_mul(_upcast([xs[i] for i in idx]),
                                  _factors(alpha, idx, gy[0].dtype))
        work = _upcast(gy)
        torch._foreach_add_(work, step)
        _store(gy, work)


def sum_sq_per_tensor(xs: Tensors) -> torch.Tensor:
    _checks.check_types("sum_sq_per_tensor", [("xs", xs)])
    _checks.check_sum_sq_per_tensor(xs)
    if not xs:
        return torch.zeros(0, dtype=_F64)
    zero = torch.zeros((), dtype=_F64, device=xs[0].device)
    small = [t for t in xs if t.numel() and _one_thread(t)]
    # one fp64 norm per tensor torch sums on one thread, squared; fixed rows for the others
    squares = iter(torch.stack(torch._foreach_norm(small, 2, dtype=_F64)).square().unbind()
                   if small else ())
    parts = []
    for t in xs:
        if not t.numel():
            parts.append(zero)
        elif _one_thread(t):
            parts.append(next(squares))
        else:
            total = zero.clone()
            _fixed_sum([_row_sums(_sq_terms(t))], total)
            parts.append(total)
    return torch.stack(parts)
