// The CPU multi-tensor mechanism every CPU kernel reuses.
//
// A call's tensors are laid end to end and cut into work items of kChunkElems elements (the
// last one shorter). An item is a list of pieces, each a contiguous run of one tensor, so many
// small tensors share an item and a large tensor spans several. Reductions keep one partial per
// item and sum the partials in item order, so a result depends only on the shapes in the call,
// never on the thread count, the schedule or which of the paths below ran it.
//
// Threads (chosen per call, here and nowhere else): a call whose list is smaller than
// parallel_min_bytes() runs on the calling thread alone; a larger one asks up to
// at::get_num_threads() - 1 helpers of our own pool to join. The caller never waits for a helper
// to start: it takes items from the shared counter itself, and waits only for items a helper
// has already claimed. A fork-join region (at::parallel_for, as before) waits for every thread
// it forked, so a helper descheduled by other processes stalled each op for a scheduler quantum
// (SAM on 128 x 8 Ki fp32 with `yes` x2 on the 2 cores: 21 ms vs 1.5 ms quiet). A helper can
// still be descheduled in the middle of an item it claimed; when the caller waits that long
// (kStall), the machine is busy and calls run single-threaded for kBackoff before trying again.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <pthread.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
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

// Lists smaller than this many bytes run on the calling thread alone; above it each thread gets
// at least this many bytes. Measured with tools/cpu_crossover.py (SAM's sum_sq + perturb_ with
// backup + restore_ on 128 fp32 tensors, medians of interleaved reps, 1 thread / 2 threads
// with the back-off below) on the 2-core AMD EPYC VM, 2026-12-06, shared with other engineers'
// builds and tests (no quiet machine was to be had):
//   load 2.4:               0.52 at 512 KiB per list, 0.58 at 1 MiB, 1.11 at 2 MiB,
//                           1.02 at 4 MiB, 1.63 at 8 MiB, 1.03 at 32 MiB;
//   load 5.6:               0.47, 0.66, 0.71, 1.19, 0.91, 1.33 (same sizes);
//   load 2.4 + `yes`-like x2: 0.98 at 512 KiB, 1.06, 1.01, 0.32 at 4 MiB, 0.76 at 8 MiB,
//                           1.00 at 32 MiB.
// A second thread starts to pay between 4 and 8 MiB on the least loaded machine and not below
// 32 MiB on a busy one (where the back-off brings it back to 1.0); 16 MiB keeps 4-8 MiB lists
// (where a busy machine lost most) on one thread. torch's own rule (at::internal::GRAIN_SIZE =
// 32768 elements = 128 KiB fp32) splits far smaller work than this.
constexpr int64_t kParallelMinBytes = int64_t(16) << 20;

// The threshold in force: kParallelMinBytes unless the tests or the crossover measurement set
// another (torch.ops.sam_kernels._cpu_parallel_min_bytes).
inline std::atomic<int64_t>& parallel_min_bytes() {
  static std::atomic<int64_t> value{kParallelMinBytes};
  return value;
}

// The size rule: threads for a call over `bytes` bytes of list and `items` work items. A
// threshold <= 0 means every call may use every thread (tests, measurements: no back-off).
inline int64_t threads_for(int64_t bytes, int64_t items) {
  const int64_t limit = std::min<int64_t>(at::get_num_threads(), items);
  if (limit <= 1 || at::in_parallel_region()) return 1;
  const int64_t min_bytes = parallel_min_bytes().load(std::memory_order_relaxed);
  if (min_bytes <= 0) return limit;
  return std::max<int64_t>(1, std::min<int64_t>(limit, bytes / min_bytes));
}

namespace detail {

using Clock = std::chrono::steady_clock;
// A wait this long for a claimed item is a descheduled helper (an item is 64 Ki elements:
// 20-100 us of work), not a slow one.
constexpr auto kStall = std::chrono::microseconds(1000);
// How long calls stay single-threaded after a stall: a few scheduler periods, so that probing
// a busy machine again costs a few percent at most.
constexpr auto kBackoff = std::chrono::milliseconds(250);
// A helper spins this long for the next call before it sleeps: an optimizer step's ops come
// back to back (~0.1 ms of Python between them), and waking a sleeping thread costs ~50 us.
constexpr auto kHelperSpin = std::chrono::microseconds(100);

inline std::atomic<int64_t>& backoff_until_ns() {
  static std::atomic<int64_t> value{0};
  return value;
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

inline bool backing_off() {
  return now_ns() < backoff_until_ns().load(std::memory_order_relaxed);
}

// One call's items, shared by the caller and the helpers that join it. Lives on the heap
// (shared_ptr) so a helper that wakes after the call returned still finds a valid counter
// (past the end: it runs nothing and never touches the caller's lambda).
struct Job {
  Job(int64_t n, int64_t helpers, const std::function<void(int64_t)>* fn)
      : n(n), fn(fn), helper_slots(helpers) {}
  const int64_t n;
  const std::function<void(int64_t)>* const fn;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int64_t> helper_slots;
  std::atomic<int64_t> threads_used{0};
  std::mutex error_mutex;
  std::exception_ptr error;
};

// Runs items until none is left; returns how many this thread ran.
inline int64_t drain(Job& job) {
  int64_t ran = 0;
  for (int64_t k = job.next.fetch_add(1, std::memory_order_relaxed); k < job.n;
       k = job.next.fetch_add(1, std::memory_order_relaxed)) {
    try {
      (*job.fn)(k);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job.error_mutex);
      if (!job.error) job.error = std::current_exception();
    }
#if defined(__SSE2__)
    _mm_sfence();  // streaming stores of the item visible before it counts as done
#endif
    job.done.fetch_add(1, std::memory_order_release);
    ++ran;
  }
  if (ran > 0) job.threads_used.fetch_add(1, std::memory_order_relaxed);
  return ran;
}

// Helper threads, created on first use (never more than the largest call asked for) and never
// destroyed: they sleep on a condition variable between calls, and the process may exit with
// them asleep. After fork() the child starts a new pool (its parent's threads do not exist
// there).
class Pool {
 public:
  static Pool& get() {
    static std::atomic<Pool*> instance{nullptr};
    static std::once_flag at_fork;
    std::call_once(at_fork, [] {
      pthread_atfork(nullptr, nullptr, [] { instance.store(nullptr); });
    });
    Pool* p = instance.load(std::memory_order_acquire);
    if (p == nullptr) {
      Pool* fresh = new Pool();
      if (instance.compare_exchange_strong(p, fresh)) {
        p = fresh;
      } else {
        delete fresh;  // another thread won; `p` holds its pool
      }
    }
    return *p;
  }

  // Runs fn(0..n-1) on the caller and up to `threads` - 1 helpers; returns how many threads ran
  // at least one item.
  int64_t run(int64_t n, int64_t threads, const std::function<void(int64_t)>& fn) {
    auto job = std::make_shared<Job>(n, threads - 1, &fn);
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int64_t>(workers_) < threads - 1) {
        std::thread([this] { work(); }).detach();
        ++workers_;
      }
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
      wake = sleepers_ > 0;
    }
    if (wake) wake_.notify_all();
    drain(*job);
    // Only items a helper has claimed are left: wait for them (spinning first).
    const int64_t ran_out = now_ns();
    for (int spins = 0; job->done.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 4096) {
#if defined(__SSE2__)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
    const int64_t end = now_ns();
    if (end - ran_out > std::chrono::nanoseconds(kStall).count()) {
      backoff_until_ns().store(end + std::chrono::nanoseconds(kBackoff).count(),
                               std::memory_order_relaxed);
    }
    if (job->error) std::rethrow_exception(job->error);
    return job->threads_used.load(std::memory_order_relaxed);
  }

 private:
  void work() {
    uint64_t seen = 0;
    for (;;) {
      const int64_t spin_until = now_ns() + std::chrono::nanoseconds(kHelperSpin).count();
      while (generation_.load(std::memory_order_acquire) == seen && now_ns() < spin_until) {
#if defined(__SSE2__)
        _mm_pause();
#endif
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleepers_;
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        --sleepers_;
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      // A late helper finds the counter past the end and goes back to sleep.
      if (job->helper_slots.fetch_sub(1, std::memory_order_relaxed) <= 0) continue;
      drain(*job);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;  // the latest call's (kept until the next: harmless, see Job)
  std::atomic<uint64_t> generation_{0};
  size_t workers_ = 0;
  int sleepers_ = 0;  // helpers waiting on wake_ (the caller skips the futex call when none)
};

}  // namespace detail

// Threads that ran at least one item of the latest multi-item call (tests of the rule).
inline std::atomic<int64_t>& last_call_threads() {
  static std::atomic<int64_t> value{0};
  return value;
}

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
      bytes_ += n * static_cast<int64_t>(xs[t].element_size());
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

  int64_t bytes() const { return bytes_; }

  // Calls item_fn(k) for every item, on threads_for() threads.
  template <typename F>
  void run(const F& item_fn) const {
    const int64_t n = items();
    int64_t threads = threads_for(bytes_, n);
    if (threads > 1 && parallel_min_bytes().load(std::memory_order_relaxed) > 0 &&
        detail::backing_off()) {
      threads = 1;
    }
    if (threads <= 1) {
      for (int64_t k = 0; k < n; ++k) item_fn(k);
      store_fence();
      if (n > 0) last_call_threads().store(1, std::memory_order_relaxed);
      return;
    }
    const std::function<void(int64_t)> fn = [&item_fn](int64_t k) { item_fn(k); };
    last_call_threads().store(detail::Pool::get().run(n, threads, fn),
                              std::memory_order_relaxed);
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

  // Streaming stores become visible to other threads only after a fence (the pool fences after
  // every item; the single-threaded path once at the end).
  static void store_fence() {
#if defined(__SSE2__)
    _mm_sfence();
#endif
  }

 private:
  std::vector<Piece> pieces_;
  std::vector<int64_t> item_begin_;  // item k = pieces_[item_begin_[k], item_begin_[k + 1])
  int64_t bytes_ = 0;
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
