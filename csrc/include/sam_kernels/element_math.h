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

// sum_sq with weights: the element's contribution is ((|w| + eta) * x)^2.
template <typename T>
SK_HOST_DEVICE T weighted_square(T x, T w, T eta) {
  const T y = (sk_abs(w) + eta) * x;
  return y * y;
}

// perturb_: scale = rho / (sqrt(sum_sq) + eps), read from the device scalar by every thread.
template <typename T>
SK_HOST_DEVICE T perturb_scale(T sum_sq, T rho, T eps) {
  return rho / (sk_sqrt(sum_sq) + eps);
}

// perturb_: p + scale * T^2 * d with T = |p| + eta for adaptive (ASAM) groups, else 1.
template <typename T>
SK_HOST_DEVICE T perturbed(T p, T d, T scale, bool adaptive, T eta) {
  if (adaptive) {
    const T t = sk_abs(p) + eta;
    return p + scale * t * t * d;
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
template <typename T>
SK_HOST_DEVICE T orth_combined(T d, T m, T gamma, T c) {
  return d - gamma * (m - c * d);
}

// lerp_sum_sq_: (1 - theta) * ema + theta * g.
template <typename T>
SK_HOST_DEVICE T lerped(T ema, T g, T theta) {
  return (T(1) - theta) * ema + theta * g;
}

// axpby_: a * x + b * y; y is not read when b == 0 (BLAS convention), so stale NaN/inf buffer
// contents cannot leak into a copy-and-scale.
template <typename T>
SK_HOST_DEVICE T axpby(T x, T y, T a, T b) {
  return b == T(0) ? a * x : a * x + b * y;
}

}  // namespace sam_kernels
