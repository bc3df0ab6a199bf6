// C++ CPU kernels for every primitive: the chunking of multi_tensor_cpu.h around the element
// maths of element_math.h (shared with CUDA).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstring>

#include "../ops.h"
#include "multi_tensor_cpu.h"
#include "sam_kernels/element_math.h"
#include "sam_kernels/list_checks.h"

namespace sam_kernels {
namespace cpu {

namespace {
constexpr auto kCPU = c10::DeviceType::CPU;

void check_list(const char* op, const char* name, at::TensorList xs) {
  check_tensor_list(op, name, xs, kCPU);
}
}  // namespace

at::Tensor sum_sq(at::TensorList xs, at::TensorList weights, double eta) {
  check_list("sum_sq", "xs", xs);
  const bool weighted = !weights.empty();
  if (weighted) {
    check_list("sum_sq", "weights", weights);
    check_paired_lists("sum_sq", "xs", xs, "weights", weights);
  }
  const auto chunks = split_into_chunks(xs);
  std::vector<double> partials(chunks.size());
  for_each_chunk(chunks, [&](int64_t k, const Chunk& c) {
    SAM_KERNELS_DISPATCH(xs[c.tensor].scalar_type(), "sum_sq", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x = xs[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      acc_t out[1];
      if (weighted) {
        const scalar_t* w = weights[c.tensor].const_data_ptr<scalar_t>() + c.begin;
        const acc_t e = static_cast<acc_t>(eta);
        lane_sums<acc_t>(c.size, [&](int64_t i, acc_t* v) {
          v[0] = weighted_square<acc_t>(x[i], w[i], e);
        }, out);
      } else {
        lane_sums<acc_t>(c.size, [&](int64_t i, acc_t* v) {
          const acc_t xi = x[i];
          v[0] = xi * xi;
        }, out);
      }
      partials[k] = out[0];
    });
  });
  return sum_partials<1>(partials, reduction_dtype(xs), {});
}

at::Tensor dot_sum_sq(at::TensorList a, at::TensorList b) {
  check_list("dot_sum_sq", "a", a);
  check_list("dot_sum_sq", "b", b);
  check_paired_lists("dot_sum_sq", "a", a, "b", b);
  const auto chunks = split_into_chunks(a);
  std::vector<double> partials(3 * chunks.size());
  for_each_chunk(chunks, [&](int64_t k, const Chunk& c) {
    SAM_KERNELS_DISPATCH(a[c.tensor].scalar_type(), "dot_sum_sq", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x = a[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      const scalar_t* y = b[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      acc_t out[3];
      lane_sums<acc_t>(c.size, [&](int64_t i, acc_t* v) {
        const acc_t xi = x[i];
        const acc_t yi = y[i];
        v[0] = xi * yi;
        v[1] = xi * xi;
        v[2] = yi * yi;
      }, out);
      for (int o = 0; o < 3; ++o) partials[3 * k + o] = out[o];
    });
  });
  return sum_partials<3>(partials, reduction_dtype(a), {3});
}

void perturb_(at::TensorList params, at::TensorList dirs, const at::Tensor& sum_sq, double rho,
              double eps, bool adaptive, double eta, at::TensorList backup) {
  check_list("perturb_", "params", params);
  check_list("perturb_", "dirs", dirs);
  check_paired_lists("perturb_", "params", params, "dirs", dirs);
  const bool keep_backup = !backup.empty();
  if (keep_backup) {
    check_list("perturb_", "backup", backup);
    check_paired_lists("perturb_", "params", params, "backup", backup);
  }
  check_scalar_tensor("perturb_", "sum_sq", sum_sq, 1, kCPU);
  const double s2 = read_scalar(sum_sq, 0);
  const auto chunks = split_into_chunks(params);
  for_each_chunk(chunks, [&](int64_t, const Chunk& c) {
    SAM_KERNELS_DISPATCH(params[c.tensor].scalar_type(), "perturb_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t scale = perturb_scale<acc_t>(static_cast<acc_t>(s2), static_cast<acc_t>(rho),
                                               static_cast<acc_t>(eps));
      const acc_t e = static_cast<acc_t>(eta);
      scalar_t* p = params[c.tensor].data_ptr<scalar_t>() + c.begin;
      const scalar_t* d = dirs[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      if (keep_backup) {
        std::memcpy(backup[c.tensor].data_ptr<scalar_t>() + c.begin, p,
                    c.size * sizeof(scalar_t));
      }
      if (adaptive) {
        for (int64_t i = 0; i < c.size; ++i) p[i] = perturbed<acc_t>(p[i], d[i], scale, true, e);
      } else {
        for (int64_t i = 0; i < c.size; ++i) p[i] = perturbed<acc_t>(p[i], d[i], scale, false, e);
      }
    });
  });
}

void restore_(at::TensorList params, at::TensorList backup) {
  check_list("restore_", "params", params);
  check_list("restore_", "backup", backup);
  check_paired_lists("restore_", "params", params, "backup", backup);
  const auto chunks = split_into_chunks(params);
  for_each_chunk(chunks, [&](int64_t, const Chunk& c) {
    const int64_t item = params[c.tensor].element_size();
    std::memcpy(static_cast<char*>(params[c.tensor].data_ptr()) + c.begin * item,
                static_cast<const char*>(backup[c.tensor].const_data_ptr()) + c.begin * item,
                c.size * item);
  });
}

void orth_combine_(at::TensorList d, at::TensorList m, const at::Tensor& stats, double gamma,
                   double eps) {
  check_list("orth_combine_", "d", d);
  check_list("orth_combine_", "m", m);
  check_paired_lists("orth_combine_", "d", d, "m", m);
  check_scalar_tensor("orth_combine_", "stats", stats, 3, kCPU);
  const double dot = read_scalar(stats, 0), m_sq = read_scalar(stats, 1),
               d_sq = read_scalar(stats, 2);
  const auto chunks = split_into_chunks(d);
  for_each_chunk(chunks, [&](int64_t, const Chunk& c) {
    SAM_KERNELS_DISPATCH(d[c.tensor].scalar_type(), "orth_combine_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t coef = orth_coefficient<acc_t>(static_cast<acc_t>(dot), static_cast<acc_t>(m_sq),
                                                 static_cast<acc_t>(d_sq), static_cast<acc_t>(eps));
      const acc_t g = static_cast<acc_t>(gamma);
      scalar_t* dp = d[c.tensor].data_ptr<scalar_t>() + c.begin;
      const scalar_t* mp = m[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      for (int64_t i = 0; i < c.size; ++i) dp[i] = orth_combined<acc_t>(dp[i], mp[i], g, coef);
    });
  });
}

at::Tensor lerp_sum_sq_(at::TensorList ema, at::TensorList g, double theta) {
  check_list("lerp_sum_sq_", "ema", ema);
  check_list("lerp_sum_sq_", "g", g);
  check_paired_lists("lerp_sum_sq_", "ema", ema, "g", g);
  const auto chunks = split_into_chunks(ema);
  std::vector<double> partials(chunks.size());
  for_each_chunk(chunks, [&](int64_t k, const Chunk& c) {
    SAM_KERNELS_DISPATCH(ema[c.tensor].scalar_type(), "lerp_sum_sq_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t th = static_cast<acc_t>(theta);
      scalar_t* e = ema[c.tensor].data_ptr<scalar_t>() + c.begin;
      const scalar_t* gp = g[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      acc_t out[1];
      lane_sums<acc_t>(c.size, [&](int64_t i, acc_t* v) {
        // The norm is of the value as stored, so it matches the direction used afterwards.
        const scalar_t stored = static_cast<scalar_t>(lerped<acc_t>(e[i], gp[i], th));
        e[i] = stored;
        const acc_t s = stored;
        v[0] = s * s;
      }, out);
      partials[k] = out[0];
    });
  });
  return sum_partials<1>(partials, reduction_dtype(ema), {});
}

void axpby_(at::TensorList ys, at::TensorList xs, double a, double b) {
  check_list("axpby_", "ys", ys);
  check_list("axpby_", "xs", xs);
  check_paired_lists("axpby_", "ys", ys, "xs", xs);
  const auto chunks = split_into_chunks(ys);
  for_each_chunk(chunks, [&](int64_t, const Chunk& c) {
    SAM_KERNELS_DISPATCH(ys[c.tensor].scalar_type(), "axpby_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t ca = static_cast<acc_t>(a), cb = static_cast<acc_t>(b);
      scalar_t* y = ys[c.tensor].data_ptr<scalar_t>() + c.begin;
      const scalar_t* x = xs[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      for (int64_t i = 0; i < c.size; ++i) y[i] = axpby<acc_t>(x[i], y[i], ca, cb);
    });
  });
}

}  // namespace cpu
}  // namespace sam_kernels
