"""The element maths of csrc/include/sam_kernels/element_math.h as Triton device functions, one
for one and in the same order, so the Triton kernels compute the formulas the C++ and CUDA
kernels compute. Arguments are in the accumulation type (fp32, or fp64 for fp64 data).

No libdevice (the interpreter has none): square roots and divisions of the scalar prologues use
the IEEE round-to-nearest forms (`sqrt_rn`/`div_rn` for fp32; fp64 ones are always exact) like
the C++ `sqrtf` and `/`, rather than Triton's fast fp32 defaults.
"""
import triton.language as tl

from .utils import device_function


@device_function
def sk_sqrt(x):
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@device_function
def sk_div(x, y):
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@device_function
def square_sum_term(v):
    """A reduction's term v², in fp64 whatever v's type (a finite fp32 gradient must give a
    finite norm; an fp32 square overflows from |v| ~ 1.8e19)."""
    v64 = v.to(tl.float64)
    return v64 * v64


@device_function
def weighted_square(x, w, eta):
    """sum_sq with weights: ((|w| + eta) * x)^2, the product in x's type, squared in fp64."""
    return square_sum_term((tl.abs(w) + eta) * x)


@device_function
def perturb_scale(sum_sq, rho, eps):
    """perturb_: rho / (sqrt(sum_sq) + eps)."""
    return sk_div(rho, sk_sqrt(sum_sq) + eps)


@device_function
def perturbed(p, d, scale, eta, ADAPTIVE: tl.constexpr):
    """perturb_: p + scale * T^2 * d with T = |p| + eta when ADAPTIVE, else T = 1."""
    if ADAPTIVE:
        # ((t * d) * scale) * t: no intermediate overflow unless the result overflows
        t = tl.abs(p) + eta
        return p + ((t * d) * scale) * t
    else:
        return p + scale * d


@device_function
def orth_coefficient(dot, m_sq, d_sq, eps):
    """orth_combine_: c = cos * |m| / (|d| + eps), cos = <m,d> / (|m| |d| + eps)."""
    m_norm = sk_sqrt(m_sq)
    d_norm = sk_sqrt(d_sq)
    cos = sk_div(dot, m_norm * d_norm + eps)
    return sk_div(cos * m_norm, d_norm + eps)


@device_function
def orth_combined(d, m, gamma, c):
    """orth_combine_: d - gamma * (m - c * d)."""
    return d - gamma * (m - c * d)


@device_function
def lerped(ema, g, keep, theta):
    """lerp_sum_sq_: (1 - theta) * ema + theta * g, keep = 1 - theta formed in fp64 on the host
    and rounded once."""
    return keep * ema + theta * g


@device_function
def axpby(x, y, a, b, B_IS_ZERO: tl.constexpr):
    """axpby_: a * x + b * y; y is not read when b == 0 (the caller passes no y then)."""
    if B_IS_ZERO:
        return a * x
    else:
        return a * x + b * y


@device_function
def scaled(x, factor):
    """scale_: factor * x."""
    return factor * x


@device_function
def add_scaled(y, x, alpha):
    """add_scaled_: y + alpha * x."""
    return y + alpha * x
