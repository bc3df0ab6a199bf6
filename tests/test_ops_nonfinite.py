"""Issue 19 (fuzz findings): one definition on every backend, for non-finite and extreme input
too. Every backend that runs on CPU tensors (reference, cpu, triton under the interpreter) and
every dtype is compared with float64 maths written here, and with the reference backend, on
lists holding ±inf, NaN, values near the dtype's largest and smallest, and scalars that round to
0 in the element maths type:

- dot_sum_sq: exact ±inf where the sum is ±inf without inf − inf; NaN only for inf − inf,
  0·inf or a NaN input (the reference gave NaN for any inf);
- axpby_: ys is not read when b is 0 *in the compute type* (b = 1e-50 in fp32);
- orth_combine_: d − gamma·(m − c·d) in that order (the reference formed (1 + gamma·c)·d −
  gamma·m: inf or NaN where the exact result is finite);
- adaptive perturb_: p + ((t·d)·s)·t with t = |p| + eta (the reference formed t² first and
  overflowed from |p| ~ 1.8e19 in fp32; the kernels formed s·t first and overflowed for a large s).
"""
import math

import pytest
import torch

from sam_kernels import ops

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INF, NAN = math.inf, math.nan
#: Relative error allowed on finite results (1 ulp of the stored dtype, fp32 maths).
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2.0 ** -10,
        torch.bfloat16: 2.0 ** -7}


def _name(dtype):
    return str(dtype)[6:]


def _f64(t):
    """A float64 CPU copy (never a view: the tensor may be written afterwards)."""
    return t.detach().to("cpu", torch.float64, copy=True)


def _t(values, dtype, device):
    return torch.tensor(values, dtype=torch.float64).to(dtype).to(device)


def _same_class(got, want):
    """NaN where NaN, the same infinity where ±inf, finite where finite (elementwise)."""
    got, want = got.double().cpu(), want.double().cpu()
    return bool((torch.isnan(got) == torch.isnan(want)).all() and
                (torch.isposinf(got) == torch.isposinf(want)).all() and
                (torch.isneginf(got) == torch.isneginf(want)).all())


def assert_matches(got, want, rtol, what):
    """`got` equals `want` (float64) in class (NaN / +inf / -inf / finite) and, where finite,
    within rtol relative to |want|."""
    g, w = got.detach().double().cpu().reshape(-1), want.double().cpu().reshape(-1)
    assert _same_class(g, w), f"{what}: got {g.tolist()}, expected {w.tolist()}"
    fin = torch.isfinite(w)
    err = (g[fin] - w[fin]).abs()
    assert bool((err <= rtol * w[fin].abs()).all()), \
        f"{what}: got {g.tolist()}, expected {w.tolist()} (rtol {rtol})"


def _stored(values, dtype):
    """float64 values as the dtype stores them (out-of-range values become ±inf)."""
    return values.to(dtype).double()


# ---------------------------------------------------------------------------- dot_sum_sq
def _dot_cases(dtype):
    """(name, a, b) lists of values; the expected sums are the float64 sums of the products."""
    # fp64: products of its largest values overflow fp64 itself (each backend's products too)
    big = 1e150 if dtype == torch.float64 else float(torch.finfo(dtype).max)
    tiny = float(torch.finfo(dtype).smallest_normal)
    large = 40_000  # past torch's parallel grain: the reference's row path
    yield "inf-times-finite", [[1.0, INF, 2.0], [3.0]], [[3.0, 4.0, 5.0], [1.0]]
    yield "minus-inf", [[1.0, -INF], [2.0]], [[2.0, 3.0], [0.5]]
    yield "inf-across-tensors", [[INF, 1.0], [-2.0]], [[1.0, 1.0], [-INF]]
    yield "inf-minus-inf", [[INF, 1.0], [2.0]], [[1.0, 1.0], [-INF]]
    yield "zero-times-inf", [[0.0, 1.0]], [[INF, 1.0]]
    yield "nan", [[NAN, 1.0], [2.0]], [[1.0, 1.0], [3.0]]
    yield "largest", [[big, big, -big]], [[big, -big, -big]]
    yield "smallest", [[tiny, -tiny, 3 * tiny]], [[tiny, tiny, tiny]]
    yield "inf-in-a-large-tensor", [[1.0] * (large - 1) + [INF], [1.0]], \
        [[2.0] * large, [1.0]]
    yield "inf-minus-inf-large", [[1.0] * (large - 1) + [INF], [-INF]], \
        [[2.0] * large, [1.0]]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_dot_sum_sq_is_exact_on_non_finite_input(backend_device, dtype):
    backend, device = backend_device
    for name, a_vals, b_vals in _dot_cases(dtype):
        a = [_t(v, dtype, device) for v in a_vals]
        b = [_t(v, dtype, device) for v in b_vals]
        a64 = [_f64(x) for x in a]
        b64 = [_f64(y) for y in b]
        # float64 sums: exact for these products (no cancellation of finite parts), with
        # IEEE's inf / NaN rules (inf + inf = inf, inf - inf = NaN, 0·inf = NaN)
        want = torch.stack([sum((x * y).sum() for x, y in zip(a64, b64)),
                            sum((x * x).sum() for x in a64), sum((y * y).sum() for y in b64)])
        got = ops.dot_sum_sq(a, b, backend=backend)
        assert got.dtype == torch.float64
        assert_matches(got, want, 1e-12, f"dot_sum_sq {name} ({backend}, {_name(dtype)})")
        ref = ops.dot_sum_sq(a, b, backend="reference")
        assert_matches(got, ref, 1e-12, f"dot_sum_sq {name}: {backend} vs reference")


# ---------------------------------------------------------------------------- axpby_
# b as given, and whether it is 0 once converted to the compute type (fp32 for fp32/fp16/bf16).
B_VALUES = [(0.0, True, True), (1e-50, True, False), (-1e-46, True, False),
            (1e-45, False, False), (-1e-300, True, False)]


@pytest.mark.parametrize("b, zero_in_fp32, zero_in_fp64", B_VALUES,
                         ids=[repr(b[0]) for b in B_VALUES])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_axpby_does_not_read_ys_when_b_rounds_to_zero(backend_device, dtype, b, zero_in_fp32,
                                                       zero_in_fp64):
    backend, device = backend_device
    b_is_zero = zero_in_fp64 if dtype == torch.float64 else zero_in_fp32
    xs = [_t([1.0, -2.0, 0.5, 3.0], dtype, device), _t([-1.0] * 70_000, dtype, device)]
    ys = [_t([NAN, INF, -INF, 1.0], dtype, device), _t([NAN] * 70_000, dtype, device)]
    ys_before = [_f64(y) for y in ys]
    ops.axpby_(ys, xs, 0.5, b, backend=backend)
    for i, (y, x, y0) in enumerate(zip(ys, xs, ys_before)):
        x64 = _f64(x)
        want = 0.5 * x64 if b_is_zero else 0.5 * x64 + b * y0  # b·NaN, b·inf: NaN, ±inf
        assert_matches(y, _stored(want, dtype), RTOL[dtype],
                       f"axpby_ b={b!r} ys[{i}] ({backend}, {_name(dtype)})")
    # same result on the reference
    ref_ys = [_t(v.tolist(), dtype, device) for v in ys_before]
    ops.axpby_(ref_ys, xs, 0.5, b, backend="reference")
    for y, r in zip(ys, ref_ys):
        assert_matches(y, r.double(), RTOL[dtype], f"axpby_ b={b!r}: {backend} vs reference")


# ---------------------------------------------------------------------------- orth_combine_
def _orth_cases(dtype):
    """(name, d, m, stats, gamma): stats chosen so that c = 1 (eps = 0) unless said."""
    big = float(torch.finfo(dtype).max)
    near = big * 0.9
    # c·d cancels m exactly: d - gamma·(m - c·d) = d, while (1 + gamma·c)·d overflows
    yield "cancelling", [near, 1.0, -2.0], [near, 1.0, -2.0], [1.0, 1.0, 1.0], 0.5
    yield "cancelling-gamma2", [near, -near], [near, -near], [1.0, 1.0, 1.0], 2.0
    yield "c-overflows", [near, 1.0], [1.0, 1.0], [1e30, 1.0, 1.0], 0.5
    yield "inf-in-m", [1.0, 2.0], [INF, -INF], [1.0, 1.0, 1.0], 0.5
    yield "nan-in-d", [NAN, 2.0], [1.0, 1.0], [1.0, 1.0, 1.0], 0.5


def _orth_exact(d, m, c, gamma):
    """d - gamma·(m - c·d) in float64, in that order (the documented formula order)."""
    return d - gamma * (m - c * d)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_orth_combine_follows_one_formula_order(backend_device, dtype):
    backend, device = backend_device
    for name, d_vals, m_vals, stats_vals, gamma in _orth_cases(dtype):
        d, m = [_t(d_vals, dtype, device)], [_t(m_vals, dtype, device)]
        stats = torch.tensor(stats_vals, dtype=torch.float64, device=device)
        d64, m64 = _f64(d[0]), _f64(m[0])
        dot, m_sq, d_sq = stats_vals
        cos = dot / (math.sqrt(m_sq) * math.sqrt(d_sq))
        c = cos * math.sqrt(m_sq) / math.sqrt(d_sq)
        ref_d = [x.clone() for x in d]
        ops.orth_combine_(d, m, stats, gamma, 0.0, backend=backend)
        if dtype != torch.float64:  # c rounded to fp32, the maths in fp32, then stored
            c32 = float(torch.tensor(c, dtype=torch.float32))
            want = _orth_exact(d64.float(), m64.float(), c32, gamma).double()
        else:
            want = _orth_exact(d64, m64, c, gamma)
        assert_matches(d[0], _stored(want, dtype), RTOL[dtype],
                       f"orth_combine_ {name} ({backend}, {_name(dtype)})")
        ops.orth_combine_(ref_d, m, stats, gamma, 0.0, backend="reference")
        assert_matches(d[0], ref_d[0].double(), RTOL[dtype],
                       f"orth_combine_ {name}: {backend} vs reference")


# ---------------------------------------------------------------------------- perturb_
def _perturb_cases(dtype):
    """(name, p, d, s, eta): s is the scale rho / (√sum_sq + eps) (rho = 1, eps = 0)."""
    if dtype == torch.float64:
        huge = 1e155  # t² overflows fp64
    elif dtype == torch.float16:
        huge = 3e4
    else:
        huge = 2e19  # t² overflows fp32 (and bf16, computed in fp32)
    # s ~ 1/‖t·d‖ as SAM computes it: |t²·d·s| ~ t, finite
    yield "large-p", [huge, -1.5 * huge, 1.0], [1e-3, -2e-3, 0.5], None, 0.01
    # a large s with a tiny d: s·t·t overflows, s·t²·d is finite
    if dtype in (torch.float32, torch.bfloat16):
        yield "large-scale", [1e19, 2.0], [1e-30, 1e-30], 1e10, 0.0
    if dtype == torch.float64:
        yield "large-scale", [1e150, 2.0], [1e-200, 1e-200], 1e100, 0.0
    yield "inf-p", [INF, 1.0], [1.0, 1.0], 0.5, 0.0
    yield "nan-d", [1.0, 1.0], [NAN, 1.0], 0.5, 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_adaptive_perturb_does_not_overflow_in_an_intermediate(backend_device, dtype):
    backend, device = backend_device
    for name, p_vals, d_vals, s, eta in _perturb_cases(dtype):
        p, d = [_t(p_vals, dtype, device)], [_t(d_vals, dtype, device)]
        p64, d64 = _f64(p[0]), _f64(d[0])
        t = p64.abs() + eta
        if s is None:
            s = 1.0 / float(((t * d64) ** 2).sum().sqrt())
        # sum_sq with 1 / √sum_sq == s exactly enough (rho = 1, eps = 0)
        sum_sq = torch.tensor(1.0 / (s * s), dtype=torch.float64, device=device)
        s_used = 1.0 / math.sqrt(float(sum_sq))
        if dtype != torch.float64:
            s_used = float(torch.tensor(s_used, dtype=torch.float32))
        want = p64 + (t * d64 * s_used) * t  # exact in float64 for these values
        ref_p = [x.clone() for x in p]
        ops.perturb_(p, d, sum_sq, 1.0, 0.0, adaptive=True, eta=eta, backend=backend)
        assert_matches(p[0], _stored(want, dtype), 4 * RTOL[dtype],
                       f"perturb_ {name} ({backend}, {_name(dtype)})")
        ops.perturb_(ref_p, d, sum_sq, 1.0, 0.0, adaptive=True, eta=eta, backend="reference")
        assert_matches(p[0], ref_p[0].double(), 4 * RTOL[dtype],
                       f"perturb_ {name}: {backend} vs reference")


# ---------------------------------------------------------------------------- lerp_sum_sq_
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_lerp_with_theta_near_one_keeps_1_minus_theta_accurate(backend_device, dtype):
    """(1 - theta) is formed in float64 and rounded once, as the reference does: 1 - fl32(theta)
    in fp32 is 1.0014e-5 for theta = 0.99999 (0.14% off), which the property suite caught as a
    cpu result out of tolerance."""
    backend, device = backend_device
    theta = 0.99999
    ema = [_t([1.0, -3.0, 250.0], dtype, device)]
    g = [_t([0.0, 0.0, 0.0], dtype, device)]
    want = (1.0 - theta) * _f64(ema[0])
    out = ops.lerp_sum_sq_(ema, g, theta, backend=backend)
    assert_matches(ema[0], _stored(want, dtype), RTOL[dtype], f"lerp_sum_sq_ ({backend})")
    # Σ of the values as stored (the Triton interpreter truncates to bf16 instead of rounding)
    assert_matches(out, (_f64(ema[0]) ** 2).sum(), 1e-12, "lerp_sum_sq_ result")
