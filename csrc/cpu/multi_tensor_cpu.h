// The CPU multi-tensor mechanism every CPU kernel reuses: a tensor list is cut into work items of
// at most kChunkElems elements (never spanning two tensors), and the items are spread over the
// intra-op thread pool (OpenMP). Reductions write one partial per item and sum the partials in
// item order, so a result depends on the chunking only, never on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

namespace sam_kernels {
namespace cpu {

// 64 Ki elements: 256 KiB of fp32 per input, small enough to balance two to a few dozen threads
// over a ResNet's tensors, large enough that per-item overhead is noise.
constexpr int64_t kChunkElems = int64_t(1) << 16;

struct Chunk {
  int64_t tensor;  // index into the list
  int64_t begin;   // first element (in memory order) of this item
  int64_t size;    // number of elements
};

inline std::vector<Chunk> split_into_chunks(at::TensorList xs) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < xs.size(); ++t) {
    const int64_t n = xs[t].numel();
    for (int64_t begin = 0; begin < n; begin += kChunkElems) {
      chunks.push_back({static_cast<int64_t>(t), begin, std::min(kChunkElems, n - begin)});
    }
  }
  return chunks;
}

// Calls f(item_index, chunk) for every chunk, in parallel.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) f(k, chunks[k]);
  });
}

// Sum of term(0..n-1) in a fixed order over kLanes independent accumulators: deterministic, and
// the lanes let the compiler vectorise without reassociating floating-point additions.
template <typename acc_t, int kOut, typename Term>
inline void lane_sums(int64_t n, const Term& term, acc_t (&out)[kOut]) {
  constexpr int kLanes = 16;
  acc_t lanes[kOut][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      acc_t v[kOut];
      term(i + j, v);
      for (int o = 0; o < kOut; ++o) lanes[o][j] += v[o];
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    acc_t v[kOut];
    term(i, v);
    for (int o = 0; o < kOut; ++o) lanes[o][j] += v[o];
  }
  for (int o = 0; o < kOut; ++o) {
    acc_t total = 0;
    for (int j = 0; j < kLanes; ++j) total += lanes[o][j];
    out[o] = total;
  }
}

// Item partials (kOut values per item) summed in item order into a new tensor of kOut values.
template <int kOut>
at::Tensor sum_partials(const std::vector<double>& partials, at::ScalarType dtype,
                        at::IntArrayRef shape) {
  double total[kOut] = {};
  for (size_t k = 0; k < partials.size() / kOut; ++k) {
    for (int o = 0; o < kOut; ++o) total[o] += partials[k * kOut + o];
  }
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(at::kDouble));
  double* p = out.data_ptr<double>();
  for (int o = 0; o < kOut; ++o) p[o] = total[o];
  return out.to(dtype);
}

// Reads element i of a float32/float64 CPU tensor (a device scalar such as a sum of squares).
inline double read_scalar(const at::Tensor& t, int64_t i) {
  return t.scalar_type() == at::kDouble ? t.const_data_ptr<double>()[i]
                                        : static_cast<double>(t.const_data_ptr<float>()[i]);
}

}  // namespace cpu
}  // namespace sam_kernels

// fp32, fp64, fp16 and bf16: the dtypes every primitive accepts.
#define SAM_KERNELS_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
