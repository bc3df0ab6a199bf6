// The one registration file: op schemas, then each compiled backend's dispatch key.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(sam_kernels, m) {
  m.def("sum_sq(Tensor[] xs, Tensor[] weights, float eta) -> Tensor");
  m.def("dot_sum_sq(Tensor[] a, Tensor[] b) -> Tensor");
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] dirs, Tensor sum_sq, float rho, float eps, "
      "bool adaptive, float eta, Tensor(b!)[] backup) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backup) -> ()");
  m.def("orth_combine_(Tensor(a!)[] d, Tensor[] m, Tensor stats, float gamma, float eps) -> ()");
  m.def("lerp_sum_sq_(Tensor(a!)[] ema, Tensor[] g, float theta) -> Tensor");
  m.def("axpby_(Tensor(a!)[] ys, Tensor[] xs, float a, float b) -> ()");
}

#define SAM_KERNELS_REGISTER_BACKEND(KEY, ns)        \
  TORCH_LIBRARY_IMPL(sam_kernels, KEY, m) {          \
    m.impl("sum_sq", &sam_kernels::ns::sum_sq);      \
    m.impl("dot_sum_sq", &sam_kernels::ns::dot_sum_sq); \
    m.impl("perturb_", &sam_kernels::ns::perturb_);  \
    m.impl("restore_", &sam_kernels::ns::restore_);  \
    m.impl("orth_combine_", &sam_kernels::ns::orth_combine_); \
    m.impl("lerp_sum_sq_", &sam_kernels::ns::lerp_sum_sq_); \
    m.impl("axpby_", &sam_kernels::ns::axpby_);      \
  }

SAM_KERNELS_REGISTER_BACKEND(CPU, cpu)
#ifdef SAM_KERNELS_WITH_CUDA
SAM_KERNELS_REGISTER_BACKEND(CUDA, cuda)
#endif
