// CUDA kernels for every primitive: one functor per primitive on the harness of
// multi_tensor_apply.cuh, each applying the element maths of element_math.h (shared with the CPU
// backend, which runs the same functions on the host). Same semantics, checks and messages as
// csrc/cpu/ops_cpu.cpp.
#include <ATen/ATen.h>

#include "../ops.h"
#include "multi_tensor_apply.cuh"
#include "sam_kernels/element_math.h"
#include "sam_kernels/list_checks.h"

namespace sam_kernels {
namespace cuda {

namespace {

// Defaults for functors: every list is read, no device scalar to load.
struct ReadsEveryList {
  __device__ bool reads(int) const { return true; }
  __device__ void load_scalars(int) {}
};

// A float32/float64 device tensor of scalars, read inside the kernels (never on the host).
struct DeviceScalars {
  const void* data;
  bool is_double;
  explicit DeviceScalars(const at::Tensor& t)
      : data(t.const_data_ptr()), is_double(t.scalar_type() == at::kDouble) {}
  __device__ double operator[](int i) const { return load_device_scalar(data, is_double, i); }
};

// The reductions' functors sum in double (acc_t, the harness's type of `sums`): every term is
// squared in double (square_sum_term), so a finite fp32 gradient gives a finite norm; element
// maths runs in math_t as in the other functors.

// sum_sq. Lists: xs[, weights]. Σ x² or Σ ((|w| + eta) x)².
template <typename T, bool kWeighted>
struct SumSqOp : ReadsEveryList {
  using scalar_t = T;
  using acc_t = double;
  using math_t = at::opmath_type<T>;
  static constexpr int kDepth = kWeighted ? 2 : 1;
  static constexpr int kSums = 1;
  __host__ __device__ static constexpr bool writes(int) { return false; }

  math_t eta;
  explicit SumSqOp(double eta) : eta(static_cast<math_t>(eta)) {}

  __device__ void operator()(T (&x)[kDepth], acc_t (&sums)[kSums]) const {
    if constexpr (kWeighted) {
      sums[0] += weighted_square<math_t>(x[0], x[1], eta);
    } else {
      sums[0] += square_sum_term(x[0]);
    }
  }
};

// dot_sum_sq. Lists: a, b. [Σ a·b, Σ a², Σ b²].
template <typename T>
struct DotSumSqOp : ReadsEveryList {
  using scalar_t = T;
  using acc_t = double;
  static constexpr int kDepth = 2;
  static constexpr int kSums = 3;
  __host__ __device__ static constexpr bool writes(int) { return false; }

  __device__ void operator()(T (&x)[kDepth], acc_t (&sums)[kSums]) const {
    const double a = static_cast<double>(x[0]);
    const double b = static_cast<double>(x[1]);
    sums[0] += a * b;
    sums[1] += a * a;
    sums[2] += b * b;
  }
};

// perturb_. Lists: params (written), dirs[, backup (written, not read)].
template <typename T, bool kBackup>
struct PerturbOp {
  using scalar_t = T;
  using acc_t = at::opmath_type<T>;
  static constexpr int kDepth = kBackup ? 3 : 2;
  static constexpr int kSums = 0;
  __host__ __device__ static constexpr bool writes(int l) { return l == 0 || l == 2; }
  __device__ bool reads(int l) const { return l != 2; }

  DeviceScalars sum_sq;
  double rho, eps;  // the scale is computed in double from the float64 sum (as on the CPU)
  acc_t eta;
  bool adaptive;
  acc_t scale = 0;  // from sum_sq, set by load_scalars on the device

  PerturbOp(const at::Tensor& sum_sq, double rho, double eps, bool adaptive, double eta)
      : sum_sq(sum_sq), rho(rho), eps(eps), eta(static_cast<acc_t>(eta)), adaptive(adaptive) {}

  __device__ void load_scalars(int) {
    scale = static_cast<acc_t>(perturb_scale<double>(sum_sq[0], rho, eps));
  }
  __device__ void operator()(T (&x)[kDepth], acc_t (&)[1]) const {
    if constexpr (kBackup) x[2] = x[0];
    x[0] = static_cast<T>(perturbed<acc_t>(x[0], x[1], scale, adaptive, eta));
  }
};

// restore_. Lists: params (written, not read), backup. An exact copy.
template <typename T>
struct RestoreOp {
  using scalar_t = T;
  using acc_t = at::opmath_type<T>;
  static constexpr int kDepth = 2;
  static constexpr int kSums = 0;
  __host__ __device__ static constexpr bool writes(int l) { return l == 0; }
  __device__ bool reads(int l) const { return l == 1; }
  __device__ void load_scalars(int) {}

  __device__ void operator()(T (&x)[kDepth], acc_t (&)[1]) const { x[0] = x[1]; }
};

// orth_combine_. Lists: d (written), m. The coefficient comes from the device tensor stats.
template <typename T>
struct OrthCombineOp : ReadsEveryList {
  using scalar_t = T;
  using acc_t = at::opmath_type<T>;
  static constexpr int kDepth = 2;
  static constexpr int kSums = 0;
  __host__ __device__ static constexpr bool writes(int l) { return l == 0; }

  DeviceScalars stats;
  acc_t gamma;
  double eps;  // the coefficient is computed in double from the float64 stats (as on the CPU)
  acc_t coef = 0;  // from stats, set by load_scalars on the device

  OrthCombineOp(const at::Tensor& stats, double gamma, double eps)
      : stats(stats), gamma(static_cast<acc_t>(gamma)), eps(eps) {}

  __device__ void load_scalars(int) {
    coef = static_cast<acc_t>(orth_coefficient<double>(stats[0], stats[1], stats[2], eps));
  }
  __device__ void operator()(T (&x)[kDepth], acc_t (&)[1]) const {
    x[0] = static_cast<T>(orth_combined<acc_t>(x[0], x[1], gamma, coef));
  }
};

// lerp_sum_sq_. Lists: ema (written), g. Returns Σ ema² of the values as stored, so the norm
// matches the direction used afterwards.
template <typename T>
struct LerpSumSqOp : ReadsEveryList {
  using scalar_t = T;
  using acc_t = double;
  using math_t = at::opmath_type<T>;
  static constexpr int kDepth = 2;
  static constexpr int kSums = 1;
  __host__ __device__ static constexpr bool writes(int l) { return l == 0; }

  math_t theta;
  math_t keep;  // lerp_keep(theta): formed in double and rounded once
  explicit LerpSumSqOp(double theta)
      : theta(static_cast<math_t>(theta)), keep(static_cast<math_t>(lerp_keep(theta))) {}

  __device__ void operator()(T (&x)[kDepth], acc_t (&sums)[kSums]) const {
    x[0] = static_cast<T>(lerped<math_t>(x[0], x[1], keep, theta));
    sums[0] += square_sum_term(x[0]);
  }
};

// axpby_. Lists: ys (written; read only when b != 0), xs.
template <typename T>
struct AxpbyOp {
  using scalar_t = T;
  using acc_t = at::opmath_type<T>;
  static constexpr int kDepth = 2;
  static constexpr int kSums = 0;
  __host__ __device__ static constexpr bool writes(int l) { return l == 0; }
  __device__ bool reads(int l) const { return l == 1 || b != acc_t(0); }
  __device__ void load_scalars(int) {}

  acc_t a, b;
  AxpbyOp(double a, double b) : a(static_cast<acc_t>(a)), b(static_cast<acc_t>(b)) {}

  __device__ void operator()(T (&x)[kDepth], acc_t (&)[1]) const {
    x[0] = static_cast<T>(axpby<acc_t>(x[1], x[0], a, b));
  }
};

// scale_. Lists: xs (written). The factor is read on the device: factor[0] for a 0-d factor
// (stride 0), factor[tensor] for one per tensor (stride 1).
template <typename T>
struct ScaleOp : ReadsEveryList {
  using scalar_t = T;
  using acc_t = at::opmath_type<T>;
  static constexpr int kDepth = 1;
  static constexpr int kSums = 0;
  __host__ __device__ static constexpr bool writes(int l) { return l == 0; }

  DeviceScalars factor;
  int stride;
  acc_t f = 0;  // set by load_scalars on the device

  explicit ScaleOp(const at::Tensor& factor) : factor(factor), stride(factor.dim() == 0 ? 0 : 1) {}

  __device__ void load_scalars(int tensor) { f = static_cast<acc_t>(factor[tensor * stride]); }
  __device__ void operator()(T (&x)[kDepth], acc_t (&)[1]) const {
    x[0] = static_cast<T>(scaled<acc_t>(x[0], f));
  }
};

// add_scaled_. Lists: ys (written), xs. alpha as ScaleOp's factor.
template <typename T>
struct AddScaledOp : ReadsEveryList {
  using scalar_t = T;
  using acc_t = at::opmath_type<T>;
  static constexpr int kDepth = 2;
  static constexpr int kSums = 0;
  __host__ __device__ static constexpr bool writes(int l) { return l == 0; }

  DeviceScalars alpha;
  int stride;
  acc_t a = 0;  // set by load_scalars on the device

  explicit AddScaledOp(const at::Tensor& alpha) : alpha(alpha), stride(alpha.dim() == 0 ? 0 : 1) {}

  __device__ void load_scalars(int tensor) { a = static_cast<acc_t>(alpha[tensor * stride]); }
  __device__ void operator()(T (&x)[kDepth], acc_t (&)[1]) const {
    x[0] = static_cast<T>(add_scaled<acc_t>(x[0], x[1], a));
  }
};

}  // namespace

at::Tensor sum_sq(at::TensorList xs, at::TensorList weights, double eta) {
  const c10::Device device = call_device({xs, weights});
  check_list("sum_sq", "xs", xs, device);
  const bool weighted = !weights.empty();
  if (weighted) {
    check_list("sum_sq", "weights", weights, device);
    check_paired_lists("sum_sq", "xs", xs, "weights", weights);
  }
  const c10::cuda::CUDAGuard guard(device);
  if (weighted) {
    return multi_tensor_reduce<1, 2>(device, {xs, weights}, [&](auto tag) {
      return SumSqOp<tag_t<decltype(tag)>, true>(eta);
    }, {});
  }
  return multi_tensor_reduce<1, 1>(device, {xs}, [&](auto tag) {
    return SumSqOp<tag_t<decltype(tag)>, false>(eta);
  }, {});
}

at::Tensor dot_sum_sq(at::TensorList a, at::TensorList b) {
  const c10::Device device = call_device({a, b});
  check_list("dot_sum_sq", "a", a, device);
  check_list("dot_sum_sq", "b", b, device);
  check_paired_lists("dot_sum_sq", "a", a, "b", b);
  const c10::cuda::CUDAGuard guard(device);
  return multi_tensor_reduce<3, 2>(device, {a, b}, [](auto tag) {
    return DotSumSqOp<tag_t<decltype(tag)>>();
  }, {3});
}

void perturb_(at::TensorList params, at::TensorList dirs, const at::Tensor& sum_sq, double rho,
              double eps, bool adaptive, double eta, at::TensorList backup) {
  const c10::Device device = call_device({params, dirs, backup}, &sum_sq);
  check_list("perturb_", "params", params, device);
  check_list("perturb_", "dirs", dirs, device);
  check_paired_lists("perturb_", "params", params, "dirs", dirs);
  const bool keep_backup = !backup.empty();
  if (keep_backup) {
    check_list("perturb_", "backup", backup, device);
    check_paired_lists("perturb_", "params", params, "backup", backup);
  }
  check_scalar("perturb_", "sum_sq", sum_sq, 1, device);
  check_no_overlap("perturb_", {{"params", params, true}, {"dirs", dirs, false},
                                {"backup", backup, true}}, "sum_sq", &sum_sq);
  const c10::cuda::CUDAGuard guard(device);
  if (keep_backup) {
    multi_tensor_apply<3>({params, dirs, backup}, [&](auto tag) {
      return PerturbOp<tag_t<decltype(tag)>, true>(sum_sq, rho, eps, adaptive, eta);
    });
  } else {
    multi_tensor_apply<2>({params, dirs}, [&](auto tag) {
      return PerturbOp<tag_t<decltype(tag)>, false>(sum_sq, rho, eps, adaptive, eta);
    });
  }
}

void restore_(at::TensorList params, at::TensorList backup) {
  const c10::Device device = call_device({params, backup});
  check_list("restore_", "params", params, device);
  check_list("restore_", "backup", backup, device);
  check_paired_lists("restore_", "params", params, "backup", backup);
  check_no_overlap("restore_", {{"params", params, true}, {"backup", backup, false}});
  const c10::cuda::CUDAGuard guard(device);
  multi_tensor_apply<2>({params, backup}, [](auto tag) {
    return RestoreOp<tag_t<decltype(tag)>>();
  });
}

void orth_combine_(at::TensorList d, at::TensorList m, const at::Tensor& stats, double gamma,
                   double eps) {
  const c10::Device device = call_device({d, m}, &stats);
  check_list("orth_combine_", "d", d, device);
  check_list("orth_combine_", "m", m, device);
  check_paired_lists("orth_combine_", "d", d, "m", m);
  check_scalar("orth_combine_", "stats", stats, 3, device);
  check_no_overlap("orth_combine_", {{"d", d, true}, {"m", m, false}}, "stats", &stats);
  const c10::cuda::CUDAGuard guard(device);
  multi_tensor_apply<2>({d, m}, [&](auto tag) {
    return OrthCombineOp<tag_t<decltype(tag)>>(stats, gamma, eps);
  });
}

at::Tensor lerp_sum_sq_(at::TensorList ema, at::TensorList g, double theta) {
  const c10::Device device = call_device({ema, g});
  check_list("lerp_sum_sq_", "ema", ema, device);
  check_list("lerp_sum_sq_", "g", g, device);
  check_paired_lists("lerp_sum_sq_", "ema", ema, "g", g);
  check_no_overlap("lerp_sum_sq_", {{"ema", ema, true}, {"g", g, false}});
  const c10::cuda::CUDAGuard guard(device);
  return multi_tensor_reduce<1, 2>(device, {ema, g}, [&](auto tag) {
    return LerpSumSqOp<tag_t<decltype(tag)>>(theta);
  }, {});
}

void axpby_(at::TensorList ys, at::TensorList xs, double a, double b) {
  const c10::Device device = call_device({ys, xs});
  check_list("axpby_", "ys", ys, device);
  check_list("axpby_", "xs", xs, device);
  check_paired_lists("axpby_", "ys", ys, "xs", xs);
  check_no_overlap("axpby_", {{"ys", ys, true}, {"xs", xs, false}});
  const c10::cuda::CUDAGuard guard(device);
  multi_tensor_apply<2>({ys, xs}, [&](auto tag) {
    return AxpbyOp<tag_t<decltype(tag)>>(a, b);
  });
}

void scale_(at::TensorList xs, const at::Tensor& factor) {
  const c10::Device device = call_device({xs}, &factor);
  check_list("scale_", "xs", xs, device);
  check_factor_tensor("scale_", "factor", factor, static_cast<int64_t>(xs.size()),
                      c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(factor.device() == device, "scale_: factor is on ", factor.device(),
                    " but the tensors are on ", device);
  check_no_overlap("scale_", {{"xs", xs, true}}, "factor", &factor);
  const c10::cuda::CUDAGuard guard(device);
  multi_tensor_apply<1>({xs}, [&](auto tag) { return ScaleOp<tag_t<decltype(tag)>>(factor); });
}

void add_scaled_(at::TensorList ys, at::TensorList xs, const at::Tensor& alpha) {
  const c10::Device device = call_device({ys, xs}, &alpha);
  check_list("add_scaled_", "ys", ys, device);
  check_list("add_scaled_", "xs", xs, device);
  check_paired_lists("add_scaled_", "ys", ys, "xs", xs);
  check_factor_tensor("add_scaled_", "alpha", alpha, static_cast<int64_t>(ys.size()),
                      c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(alpha.device() == device, "add_scaled_: alpha is on ", alpha.device(),
                    " but the tensors are on ", device);
  check_no_overlap("add_scaled_", {{"ys", ys, true}, {"xs", xs, false}}, "alpha", &alpha);
  const c10::cuda::CUDAGuard guard(device);
  multi_tensor_apply<2>({ys, xs}, [&](auto tag) {
    return AddScaledOp<tag_t<decltype(tag)>>(alpha);
  });
}

at::Tensor sum_sq_per_tensor(at::TensorList xs) {
  const c10::Device device = call_device({xs});
  check_list("sum_sq_per_tensor", "xs", xs, device);
  const c10::cuda::CUDAGuard guard(device);
  const auto options = at::TensorOptions().device(device);
  const int64_t n = static_cast<int64_t>(xs.size());
  at::Tensor out = at::zeros({n}, options.dtype(at::kDouble));
  const int64_t n_blocks = count_chunks(xs);
  if (n_blocks == 0) return out;
  // stage one: one partial per block, as sum_sq
  at::Tensor partials = at::empty({n_blocks}, options.dtype(at::kDouble));
  multi_tensor_apply<1>({xs}, [](auto tag) {
    return SumSqOp<tag_t<decltype(tag)>, false>(0.0);
  }, partials.mutable_data_ptr<double>());
  // stage two: each tensor's blocks, from a table copied through pinned memory without
  // waiting for the GPU (the caching host allocator keeps the buffer until the copy is done)
  const std::vector<int64_t> ranges = block_ranges(xs);
  at::Tensor host = at::empty({2 * n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(ranges.begin(), ranges.end(), host.mutable_data_ptr<int64_t>());
  at::Tensor table = host.to(device, /*non_blocking=*/true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  finalize_per_tensor<<<static_cast<unsigned int>(n), kBlockThreads, 0, stream>>>(
      partials.const_data_ptr<double>(), table.const_data_ptr<int64_t>(), n,
      out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cuda
}  // namespace sam_kernels
