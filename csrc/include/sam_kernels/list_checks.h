// Argument checks shared by the compiled backends (host code only). Same rules, order and
// messages as sam_kernels/ops/_checks.py, which validates for the Python backends (that file's
// docstring lists the order). Types are checked in Python before the dispatcher parses the
// arguments; writes to leaves that require grad are refused by the ops' autograd kernel.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

namespace sam_kernels {

// A dtype as Python prints it ("torch.float32"), so every backend's messages are the same.
inline std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// The dtypes every primitive accepts: listed, so a new floating type (float8 variants, ...)
// is refused until a kernel exists for it.
inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Every tensor: strided (no sparse), on the expected device, of a supported dtype,
// non-overlapping and dense in memory (so the kernels can walk numel() elements from
// data_ptr()).
inline void check_tensor_list(const char* op, const char* name, at::TensorList xs,
                              c10::DeviceType device_type) {
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& t = xs[i];
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name, "[", i,
                      "] is not a dense (strided) tensor; sparse tensors are not supported");
    TORCH_CHECK_VALUE(t.device().type() == device_type, op, ": ", name, "[", i, "] is on ",
                      t.device(), " but this kernel runs on ",
                      c10::DeviceTypeName(device_type, /*lower_case=*/true),
                      " tensors; keep every tensor of a call on one device");
    TORCH_CHECK_VALUE(supported_dtype(t.scalar_type()), op, ": ", name, "[", i, "] has dtype ",
                      dtype_name(t.scalar_type()),
                      "; supported dtypes are float32, float64, float16 and bfloat16");
    TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), op, ": ", name, "[", i,
                      "] is not dense in memory (a view with gaps or overlaps); pass "
                      ".contiguous() tensors");
  }
}

// Same shape, same element order in memory: equal strides on every dim of size > 1 (a size-1
// dim's stride is never used; autograd may give a (5, 1) parameter a (1, 5)-strided gradient).
inline bool same_memory_order(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Two lists walked element by element together: same length, and pairwise the same dtype,
// shape and memory order (so element k of one is element k of the other in memory order).
inline void check_paired_lists(const char* op, const char* a_name, at::TensorList a,
                               const char* b_name, at::TensorList b) {
  TORCH_CHECK_VALUE(a.size() == b.size(), op, ": ", a_name, " has ", a.size(), " tensors but ",
                    b_name, " has ", b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK_VALUE(a[i].scalar_type() == b[i].scalar_type(), op, ": ", a_name, "[", i,
                      "] and ", b_name, "[", i, "] differ in dtype (",
                      dtype_name(a[i].scalar_type()), " vs ", dtype_name(b[i].scalar_type()),
                      ")");
    TORCH_CHECK_VALUE(a[i].sizes() == b[i].sizes(), op, ": ", a_name, "[", i, "] and ", b_name,
                      "[", i, "] differ in shape (", a[i].sizes(), " vs ", b[i].sizes(), ")");
    TORCH_CHECK_VALUE(a[i].numel() <= 1 || same_memory_order(a[i], b[i]), op, ": ", a_name,
                      "[", i, "] and ", b_name, "[", i, "] differ in memory layout (strides ",
                      a[i].strides(), " vs ", b[i].strides(), "); a list the op writes must "
                      "store its elements in ", a_name, "'s order (create it with "
                      "torch.empty_like)");
  }
}

// What every device scalar/factor argument must be: a dense float32/float64 tensor on the
// tensors' device, contiguous (the same rules and messages as _checks._check_device_float).
inline void check_device_float(const char* op, const char* name, const at::Tensor& t,
                               c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided &&
                        (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                    op, ": ", name, " must be a dense float32 or float64 tensor, got ",
                    dtype_name(t.scalar_type()), t.layout() == at::kStrided ? "" : " (sparse)");
  TORCH_CHECK_VALUE(t.device().type() == device_type, op, ": ", name, " is on ", t.device(),
                    " but the tensors are on ",
                    c10::DeviceTypeName(device_type, /*lower_case=*/true));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous; pass ", name,
                    ".contiguous()");
}

// A device scalar: sum_sq (1 element, shape () or (1,)) or stats (shape (3,)).
inline void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t,
                                int64_t numel, c10::DeviceType device_type) {
  const bool shape_ok = numel == 1 ? (t.dim() == 0 || (t.dim() == 1 && t.size(0) == 1))
                                   : (t.dim() == 1 && t.size(0) == numel);
  TORCH_CHECK_VALUE(shape_ok, op, ": ", name, " must have ", numel, " element(s) (",
                    numel == 1 ? std::string("shape () or (1,)")
                               : "shape (" + std::to_string(numel) + ",)",
                    "), got shape ", t.sizes());
  check_device_float(op, name, t, device_type);
}

// scale_/add_scaled_'s device factor: 0-d (one factor for every tensor) or shape (n,) (one per
// tensor of the n-tensor list); float32/float64, on the tensors' device, contiguous. Same rules
// and messages as _checks.check_factor_tensor.
inline void check_factor_tensor(const char* op, const char* name, const at::Tensor& t, int64_t n,
                                c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(t.dim() == 0 || (t.dim() == 1 && t.size(0) == n), op, ": ", name,
                    " must be a 0-d tensor (one factor for every tensor) or have one factor per "
                    "tensor (shape (", n, ",)), got shape ", t.sizes());
  check_device_float(op, name, t, device_type);
}

// ---- Aliasing ----------------------------------------------------------------------------------
// A list of a call for check_no_overlap: its argument name, its tensors, whether the op writes it.
struct NamedList {
  const char* name;
  at::TensorList xs;
  bool written;
};

// Bytes [lo, hi) the elements of a non-empty strided tensor lie in.
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {lo, lo + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// A tensor the op writes may share memory with no other argument, except with the very same
// tensor at the same position of a list the op only reads (axpby_(ys=[p], xs=[p]) is
// element-wise well defined; a repeated or shifted tensor is not, and would give each backend
// its own answer). Same algorithm as _checks.check_no_overlap, so both name the same pair:
// written spans sorted by (start, list, index) and swept, then every read tensor in argument
// order, then the scalar, looked up among the (now disjoint) written spans.
inline void check_no_overlap(const char* op, std::initializer_list<NamedList> lists,
                             const char* scalar_name = nullptr,
                             const at::Tensor* scalar = nullptr) {
  struct Entry {
    uintptr_t lo, hi;
    size_t pos, index;
    bool operator<(const Entry& o) const {
      return std::tie(lo, hi, pos, index) < std::tie(o.lo, o.hi, o.pos, o.index);
    }
  };
  const std::vector<NamedList> named(lists);
  std::vector<Entry> spans, reads;
  for (size_t pos = 0; pos < named.size(); ++pos) {
    for (size_t i = 0; i < named[pos].xs.size(); ++i) {
      const at::Tensor& t = named[pos].xs[i];
      if (t.numel() == 0) continue;
      const auto s = byte_span(t);
      (named[pos].written ? spans : reads).push_back({s.first, s.second, pos, i});
    }
  }
  if (spans.empty()) return;
  auto label = [&](const Entry& e) {
    return std::string(named[e.pos].name) + "[" + std::to_string(e.index) + "]";
  };
  auto fail = [&](const Entry& w, const Entry* other, const char* other_name) {
    std::string a = label(w), b;
    if (other == nullptr) {
      b = other_name;
    } else {
      b = label(*other);
      if (std::tie(other->pos, other->index) < std::tie(w.pos, w.index)) std::swap(a, b);
    }
    TORCH_CHECK_VALUE(false, op, ": ", a, " and ", b, " overlap in memory; ", op, " writes ",
                      named[w.pos].name, " in place, so a tensor it writes may share memory with "
                      "no other argument (only with itself at the same position of a list the "
                      "op only reads); pass distinct tensors: deduplicate the list, or .clone() "
                      "one of them");
  };
  std::sort(spans.begin(), spans.end());
  size_t widest = 0;
  for (size_t k = 1; k < spans.size(); ++k) {
    if (spans[k].lo < spans[widest].hi) fail(spans[widest], &spans[k], nullptr);
    if (spans[k].hi > spans[widest].hi) widest = k;
  }
  // The written span with the largest start below hi, if it reaches past lo.
  auto find = [&](uintptr_t lo, uintptr_t hi) -> const Entry* {
    auto it = std::lower_bound(spans.begin(), spans.end(), hi,
                               [](const Entry& e, uintptr_t v) { return e.lo < v; });
    if (it == spans.begin()) return nullptr;
    --it;
    return it->hi > lo ? &*it : nullptr;
  };
  for (const Entry& r : reads) {
    const Entry* w = find(r.lo, r.hi);
    if (w == nullptr) continue;
    const bool same = w->index == r.index && w->lo == r.lo &&
                      same_memory_order(named[w->pos].xs[w->index], named[r.pos].xs[r.index]);
    if (!same) fail(*w, &r, nullptr);
  }
  if (scalar != nullptr && scalar->numel() > 0) {
    const auto s = byte_span(*scalar);
    const Entry* w = find(s.first, s.second);
    if (w != nullptr) fail(*w, nullptr, scalar_name);
  }
}

// Reductions return float64 whatever the input dtypes: every term is squared and summed in
// float64, so finite fp32/fp16/bf16 inputs always give a finite result.
inline at::ScalarType reduction_dtype(at::TensorList) { return at::kDouble; }

}  // namespace sam_kernels
