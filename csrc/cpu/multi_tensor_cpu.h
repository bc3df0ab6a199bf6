// The CPU multi-tensor mechanism every CPU kernel reuses.
//
// A call's tensors are laid end to end and cut into work items of kChunkElems elements (the
// last one shorter). An item is a list of pieces, each a contiguous run of one tensor, so many
// small tensors share an item and a large tensor spans several. Items are handed out to the
// intra-op threads one at a time (dynamic scheduling: a thread that the OS delays does not hold
// the others up). Reductions keep one partial per item and sum the partials in item order, so a
// result depends only on the shapes in the call, never on the thread count or the schedule.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace sam_kernels {
namespace cpu {

// 64 Ki elements per item: a ResNet-50 makes ~400 items (enough to balance two to a few dozen
// threads), and per-item costs (one atomic, one partial) are noise next to 256 KiB of fp32.
constexpr int64_t kChunkElems = int64_t(1) << 16;

// Stores to a list of at least this many bytes bypass the caches (streaming stores) in the
// kernels that write a buffer without reading it (perturb_'s backup, restore_'s params): a normal
// store first reads the line it overwrites, so streaming saves a third of such a copy's memory
// traffic. Smaller lists are better served by the cache (restore_ reads the backup back soon, the
// base optimizer the params). Measured with the SAM step on the 2-core Zen 4 VM (32 MiB L3):
// cached stores win up to 6 MiB per list, tie at 8 MiB, streaming wins by 9-12% from 10 MiB.
constexpr int64_t kStreamingMinBytes = int64_t(8) << 20;

struct Piece {
  int64_t tensor;  // index into the call's lists
  int64_t begin;   // first element, in memory order
  int64_t size;    // number of elements
};

class WorkPlan {
 public:
  explicit WorkPlan(at::TensorList xs) {
    int64_t fill = 0;  // elements in the item being built
    item_begin_.push_back(0);
    for (size_t t = 0; t < xs.size(); ++t) {
      const int64_t n = xs[t].numel();
      for (int64_t begin = 0; begin < n;) {
        const int64_t size = std::min(n - begin, kChunkElems - fill);
        pieces_.push_back({static_cast<int64_t>(t), begin, size});
        begin += size;
        fill += size;
        if (fill == kChunkElems) {
          item_begin_.push_back(static_cast<int64_t>(pieces_.size()));
          fill = 0;
        }
      }
    }
    if (fill > 0) item_begin_.push_back(static_cast<int64_t>(pieces_.size()));
  }

  int64_t items() const { return static_cast<int64_t>(item_begin_.size()) - 1; }

  // Calls f(piece) for every piece of item k, in order.
  template <typename F>
  void for_each_piece(int64_t k, const F& f) const {
    for (int64_t i = item_begin_[k]; i < item_begin_[k + 1]; ++i) f(pieces_[i]);
  }

  // Calls item_fn(k) for every item, spread over the intra-op threads.
  template <typename F>
  void run(const F& item_fn) const {
    const int64_t n = items();
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
    if (threads <= 1 || at::in_parallel_region()) {
      for (int64_t k = 0; k < n; ++k) item_fn(k);
      store_fence();
      return;
    }
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < n;
           k = next.fetch_add(1, std::memory_order_relaxed)) {
        item_fn(k);
      }
      store_fence();
    });
  }

  // Reductions: item_fn(k, out) writes item k's kOut partial sums; returns the kOut totals,
  // partials summed in item order (in double).
  template <int kOut, typename F>
  std::array<double, kOut> sum_items(const F& item_fn) const {
    std::vector<std::array<double, kOut>> partials(items());
    run([&](int64_t k) { item_fn(k, partials[k].data()); });
    std::array<double, kOut> total{};
    for (const auto& p : partials) {
      for (int o = 0; o < kOut; ++o) total[o] += p[o];
    }
    return total;
  }

  // Streaming stores become visible to other threads only after a fence; every worker fences
  // once when it runs out of items (a few cycles, so unconditionally).
  static void store_fence() {
#if defined(__SSE2__)
    _mm_sfence();
#endif
  }

 private:
  std::vector<Piece> pieces_;
  std::vector<int64_t> item_begin_;  // item k = pieces_[item_begin_[k], item_begin_[k + 1])
};

// Raw data pointers of a list, read once on the calling thread (data_ptr() may materialise a
// copy-on-write storage, which must not happen concurrently).
inline std::vector<char*> data_pointers(at::TensorList xs) {
  std::vector<char*> ptrs(xs.size());
  for (size_t t = 0; t < xs.size(); ++t) ptrs[t] = static_cast<char*>(xs[t].data_ptr());
  return ptrs;
}

inline std::vector<const char*> const_data_pointers(at::TensorList xs) {
  std::vector<const char*> ptrs(xs.size());
  for (size_t t = 0; t < xs.size(); ++t) {
    ptrs[t] = static_cast<const char*>(xs[t].const_data_ptr());
  }
  return ptrs;
}

inline int64_t total_bytes(at::TensorList xs) {
  int64_t bytes = 0;
  for (const auto& t : xs) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  return bytes;
}

inline bool use_streaming_stores(at::TensorList written) {
  return total_bytes(written) >= kStreamingMinBytes;
}

// memcpy, or with streaming stores (SSE2, 16 bytes each; the unaligned ends copied normally).
// 32-byte AVX streaming stores were 1-3% faster in restore_ on the tuning machine: not worth a
// run-time CPU dispatch.
inline void copy_bytes(char* dst, const char* src, int64_t bytes, bool streaming) {
#if defined(__SSE2__)
  if (streaming && bytes >= 128) {
    const int64_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
    const int64_t end = head + ((bytes - head) & ~int64_t(63));
    std::memcpy(dst, src, head);
    for (int64_t i = head; i < end; i += 64) {  // one cache line per step
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
    std::memcpy(dst + end, src + end, bytes - end);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
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

// kOut totals as a new tensor of `dtype` and `shape` (a 0-d tensor or a vector of kOut).
template <size_t kOut>
at::Tensor totals_tensor(const std::array<double, kOut>& totals, at::ScalarType dtype,
                         at::IntArrayRef shape) {
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(at::kDouble));
  std::copy(totals.begin(), totals.end(), out.data_ptr<double>());
  return dtype == at::kDouble ? out : out.to(dtype);
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
