// Element maths shared by every compiled backend.
//
// Each function is the formula of one primitive for a single element (or for the scalar
// prologue of a primitive), in the accumulation type `T` (float for fp16/bf16/fp32 data,
// double for fp64). The CPU kernels call these on the host; the CUDA kernels call the very
// same functions on the device, so the CPU test-suite executes the formulas the GPU compiles.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

#include <math.h>

namespace sam_kernels {

SK_HOST_DEVICE float sk_sqrt(float x) { return sqrtf(x); }
SK_HOST_DEVICE double sk_sqrt(double x) { return sqrt(x); }
SK_HOST_DEVICE float sk_abs(float x) { return fabsf(x); }
SK_HOST_DEVICE double sk_abs(double x) { return fabs(x); }

// Every reduction squares (or multiplies) its terms and sums them in double whatever the data
// type: an fp32 square overflows from |v| ~ 1.8e19, and a finite gradient must give a finite
// norm. Exact for fp16/bf16/fp32 values (their squares fit double's 53-bit mantissa).
template <typename T>
SK_HOST_DEVICE double square_sum_term(T v) {
  const double d = static_cast<double>(static_cast<float>(v));
  return d * d;
}
SK_HOST_DEVICE double square_sum_term(double v) { return v * v; }

// sum_sq with weights: the element's term ((|w| + eta) * x)^2, the product in T, squared in
// double (square_sum_term).
template <typename T>
SK_HOST_DEVICE double weighted_square(T x, T w, T eta) {
  return square_sum_term((sk_abs(w) + eta) * x);
}

// perturb_: scale = rho / (sqrt(sum_sq) + eps), read from the device scalar by every thread.
// The kernels evaluate it (and orth_coefficient) in double, from the float64 reductions, and
// round the result to the element maths type: sums beyond fp32's range still give a scale.
template <typename T>
SK_HOST_DEVICE T perturb_scale(T sum_sq, T rho, T eps) {
  return rho / (sk_sqrt(sum_sq) + eps);
}

// perturb_: p + scale * T^2 * d with T = |p| + eta for adaptive (ASAM) groups, else 1.
// Adaptive: evaluated as p + ((t * d) * scale) * t. With sum_sq = Σ (t d)^2 (how ASAM calls it)
// |(t * d) * scale| <= rho, so no intermediate overflows unless the result does; t * t first
// overflowed fp32 from |p| ~ 1.8e19, scale * t first for a large scale (tiny sum_sq).
template <typename T>
SK_HOST_DEVICE T perturbed(T p, T d, T scale, bool adaptive, T eta) {
  if (adaptive) {
    const T t = sk_abs(p) + eta;
    return p + ((t * d) * scale) * t;
  }
  return p + scale * d;
}

// orth_combine_: coefficient c of d in the projection of m, from stats = [<m,d>, |m|^2, |d|^2]:
// cos = <m,d> / (|m| |d| + eps);  c = cos * |m| / (|d| + eps).
template <typename T>
SK_HOST_DEVICE T orth_coefficient(T dot, T m_sq, T d_sq, T eps) {
  const T m_norm = sk_sqrt(m_sq);
  const T d_norm = sk_sqrt(d_sq);
  const T cos = dot / (m_norm * d_norm + eps);
  return cos * m_norm / (d_norm + eps);
}

// orth_combine_: d - gamma * (m - c * d), i.e. remove gamma times the part of m orthogonal to d.
// Every backend evaluates it in this order (c * d, m - that, gamma * that, d - that): the
// expanded (1 + gamma c) d - gamma m overflows (inf, or inf - inf = NaN) where this is finite.
template <typename T>
SK_HOST_DEVICE T orth_combined(T d, T m, T gamma, T c) {
  return d - gamma * (m - c * d);
}

// lerp_sum_sq_: (1 - theta) * ema + theta * g, with keep = 1 - theta formed by the caller in
// double and rounded once (1 - float(theta) in float is 0.14% off for theta = 0.99999).
template <typename T>
SK_HOST_DEVICE T lerped(T ema, T g, T keep, T theta) {
  return keep * ema + theta * g;
}

// keep = 1 - theta in double (rounded once when converted to the compute type): the one
// place every backend's lerp_sum_sq_ takes it from.
inline double lerp_keep(double theta) { return 1.0 - theta; }

// axpby_: a * x + b * y; y is not read when b == 0 (BLAS convention), so stale NaN/inf buffer
// contents cannot leak into a copy-and-scale.
template <typename T>
SK_HOST_DEVICE T axpby(T x, T y, T a, T b) {
  return b == T(0) ? a * x : a * x + b * y;
}

// scale_: factor * x.
template <typename T>
SK_HOST_DEVICE T scaled(T x, T factor) {
  return factor * x;
}

// add_scaled_: y + alpha * x (the product rounded, then the sum, unless the compiler fuses them).
template <typename T>
SK_HOST_DEVICE T add_scaled(T y, T x, T alpha) {
  return y + alpha * x;
}

}  // namespace sam_kernels
