// Argument checks shared by the compiled backends (host code only). The messages follow the
// same template as sam_kernels/ops/_checks.py, which validates for the Python backends.
#pragma once

#include <ATen/ATen.h>

namespace sam_kernels {

// Every tensor: floating point, dense (no sparse), non-overlapping and dense in memory (so the
// kernels can walk numel() elements from data_ptr()), on the expected device.
inline void check_tensor_list(const char* op, const char* name, at::TensorList xs,
                              c10::DeviceType device_type) {
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& t = xs[i];
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name, "[", i,
                      "] is not a dense (strided) tensor; sparse tensors are not supported");
    TORCH_CHECK_VALUE(t.device().type() == device_type, op, ": ", name, "[", i, "] is on ",
                      t.device(), " but this kernel runs on ", c10::DeviceTypeName(device_type),
                      " tensors; keep every tensor of a call on one device");
    TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()) &&
                          t.scalar_type() != at::kFloat8_e4m3fn &&
                          t.scalar_type() != at::kFloat8_e5m2,
                      op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                      "; supported dtypes are float32, float64, float16 and bfloat16");
    TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), op, ": ", name, "[", i,
                      "] is not dense in memory (a view with gaps or overlaps); pass "
                      ".contiguous() tensors");
  }
}

// Two lists walked element by element together: same length, and pairwise the same dtype,
// shape and strides (so element k of one is element k of the other in memory order).
inline void check_paired_lists(const char* op, const char* a_name, at::TensorList a,
                               const char* b_name, at::TensorList b) {
  TORCH_CHECK_VALUE(a.size() == b.size(), op, ": ", a_name, " has ", a.size(), " tensors but ",
                    b_name, " has ", b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK_VALUE(a[i].scalar_type() == b[i].scalar_type(), op, ": ", a_name, "[", i,
                      "] and ", b_name, "[", i, "] differ in dtype (", a[i].scalar_type(),
                      " vs ", b[i].scalar_type(), ")");
    TORCH_CHECK_VALUE(a[i].sizes() == b[i].sizes(), op, ": ", a_name, "[", i, "] and ", b_name,
                      "[", i, "] differ in shape (", a[i].sizes(), " vs ", b[i].sizes(), ")");
    TORCH_CHECK_VALUE(a[i].numel() <= 1 || a[i].strides() == b[i].strides(), op, ": ", a_name,
                      "[", i, "] and ", b_name, "[", i, "] differ in memory layout (strides ",
                      a[i].strides(), " vs ", b[i].strides(), ")");
  }
}

inline void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t,
                                int64_t numel, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(t.numel() == numel, op, ": ", name, " must have ", numel,
                    " element(s), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
                    name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().type() == device_type, op, ": ", name, " is on ", t.device(),
                    " but the tensors are on ", c10::DeviceTypeName(device_type));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Reductions return float64 when any input is float64, else float32.
inline at::ScalarType reduction_dtype(at::TensorList xs) {
  for (const auto& t : xs) {
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

}  // namespace sam_kernels
