// Entry points of the compiled backends, registered in csrc/register.cpp.
// Lists that the Python contract makes optional (`weights`, `backup`) are passed empty.
#pragma once

#include <ATen/ATen.h>

namespace sam_kernels {

#define SAM_KERNELS_DECLARE_BACKEND(ns)                                                      \
  namespace ns {                                                                            \
  at::Tensor sum_sq(at::TensorList xs, at::TensorList weights, double eta);                 \
  at::Tensor dot_sum_sq(at::TensorList a, at::TensorList b);                                \
  void perturb_(at::TensorList params, at::TensorList dirs, const at::Tensor& sum_sq,       \
                double rho, double eps, bool adaptive, double eta, at::TensorList backup);  \
  void restore_(at::TensorList params, at::TensorList backup);                              \
  void orth_combine_(at::TensorList d, at::TensorList m, const at::Tensor& stats,           \
                     double gamma, double eps);                                             \
  at::Tensor lerp_sum_sq_(at::TensorList ema, at::TensorList g, double theta);              \
  void axpby_(at::TensorList ys, at::TensorList xs, double a, double b);                    \
  void scale_(at::TensorList xs, const at::Tensor& factor);                                 \
  void add_scaled_(at::TensorList ys, at::TensorList xs, const at::Tensor& alpha);          \
  at::Tensor sum_sq_per_tensor(at::TensorList xs);                                          \
  }

SAM_KERNELS_DECLARE_BACKEND(cpu)
#ifdef SAM_KERNELS_WITH_CUDA
SAM_KERNELS_DECLARE_BACKEND(cuda)
#endif

#undef SAM_KERNELS_DECLARE_BACKEND

}  // namespace sam_kernels
