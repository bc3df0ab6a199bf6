// The one CUDA multi-tensor mechanism every CUDA primitive runs on (after apex's and ATen's
// multi_tensor_apply, written for this library).
//
// A call gets up to kDepth paired tensor lists (tensor i of every list has the same dtype, shape
// and strides). Each tensor is cut into chunks of kChunkElems elements; one thread block
// processes one (tensor, chunk). The tensor addresses, sizes and each tensor's last block travel
// by value in the kernel arguments (TensorListMeta), so a launch needs no host->device copy; a
// block finds its tensor by a binary search of those block ends, so one launch covers every
// chunk of its tensors (no cap on the grid below the hardware's), and the host launches again
// only when a list has more tensors than one argument block holds.
// Tensors are grouped by dtype first (one instantiation per dtype), so a mixed fp32/bf16 list
// is fine.
//
// Each primitive is a functor (see ops_cuda.cu) that says which lists it reads and writes and
// what it does to one element; the harness does the loads and stores (16-byte vectors when every
// list of the chunk is 16-byte aligned, element by element otherwise), and for reductions a
// deterministic two-stage sum: one partial per block into a float64 buffer, then a one-block
// finalize kernel that adds the partials in a fixed order. No float atomics, so a reduction
// gives bitwise the same result on every run. Everything runs on the current CUDA stream, reads
// device scalars in the kernels and never synchronizes with the host.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "sam_kernels/list_checks.h"

// fp32, fp64, fp16 and bf16: the dtypes every primitive accepts (see check_tensor_list).
#define SAM_KERNELS_CUDA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace sam_kernels {
namespace cuda {

// ---- Tuning constants (rationale in docs/cuda.md, "Tuning") -----------------------------------
// 64 Ki elements per block: large enough that the per-block prologue (table lookups, scalar
// reads, the block reduction) is amortized over 32+ loop iterations per thread, small enough that
// a ResNet-50 (25.6 M elements, 161 tensors) still yields ~450 blocks, several waves on any GPU.
constexpr int64_t kChunkElems = int64_t(1) << 16;
// 512 threads: 16 warps per block, up to 4 resident blocks per SM on current GPUs; with 16-byte
// accesses per list this keeps enough bytes in flight per SM for a bandwidth-bound kernel.
constexpr int kBlockThreads = 512;
constexpr int kWarpSize = 32;
// Every thread moves one 16-byte vector per list per loop iteration (LDG.128/STG.128): 4 fp32,
// 8 fp16/bf16 or 2 fp64 elements. The scalar path keeps the same number of elements in flight.
constexpr int kVecBytes = 16;
// Kernel arguments are limited to 4 KiB on every toolkit and GPU (CUDA >= 12.1 on Volta+ allows
// 32 KiB, not used here: every launch would copy the whole struct). The table is sized to fit
// with room for the functor.
constexpr int kArgBytes = 4096;
constexpr int kFunctorArgBytes = 256;  // static_assert'ed per functor below
// Blocks of one launch: the grid's x limit. (A per-block map used to cap launches at 320
// blocks, fewer than an H100/H200 keeps resident: 132 SMs x 4 blocks of 512 threads.)
constexpr int64_t kMaxBlocksPerLaunch = 2147483647;

template <typename T>
constexpr int elems_per_vector() {
  return kVecBytes / static_cast<int>(sizeof(T));
}

constexpr int max_tensors_per_launch(int depth) {
  // per tensor: `depth` addresses, its numel, its block end and its position in the call's
  // lists; besides: first_block, n_tensors, the partials pointer and up to 8 bytes of padding
  // (depth 1: 158 tensors, 2: 119, 3: 95).
  return (kArgBytes - kFunctorArgBytes - 8 - 4 - 8 - 8) / (8 * (depth + 1) + 4 + 4);
}

// Kernel argument: what one launch processes.
template <int kDepth>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors_per_launch(kDepth);
  int64_t first_block;  // index of this launch's block 0 among all blocks of the call (partials)
  int32_t n_tensors;
  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  // blocks of slots 0..s together: slot s has blocks [block_end[s-1], block_end[s])
  int32_t block_end[kMaxTensors];
  // position of slot s's tensor in the call's lists (per-tensor factors, per-tensor sums)
  int32_t index[kMaxTensors];
};

// The slot of block `block`: the first s with block_end[s] > block (block_end increases).
template <int kDepth>
__device__ __forceinline__ int slot_of_block(const TensorListMeta<kDepth>& meta, int32_t block) {
  int lo = 0;
  int hi = meta.n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (meta.block_end[mid] > block) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// ---- Device side --------------------------------------------------------------------------------

// Sums v[k] over the block in a fixed tree order (warp shuffles, then one warp over the warp
// sums). The result is valid in thread 0. Must be called by every thread of the block.
template <typename T, int K>
__device__ __forceinline__ void block_sum(T (&v)[K]) {
  constexpr int kWarps = kBlockThreads / kWarpSize;
  __shared__ T warp_sums[K][kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
    }
    if (lane == 0) warp_sums[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      v[k] = lane < kWarps ? warp_sums[k][lane] : T(0);
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
      }
    }
  }
}

// Element i of a float32 or float64 device scalar tensor (a sum of squares, dot_sum_sq stats).
__device__ __forceinline__ double load_device_scalar(const void* p, bool is_double, int i) {
  return is_double ? static_cast<const double*>(p)[i]
                   : static_cast<double>(static_cast<const float*>(p)[i]);
}

template <typename T, int kDepth>
__device__ __forceinline__ bool all_aligned(T* const (&ptrs)[kDepth]) {
  bool aligned = true;
#pragma unroll
  for (int l = 0; l < kDepth; ++l) {
    aligned = aligned && reinterpret_cast<uintptr_t>(ptrs[l]) % kVecBytes == 0;
  }
  return aligned;
}

// One block = one chunk of one tensor of every list. The functor `Op` provides:
//   scalar_t, acc_t, kDepth (number of lists), kSums (values a reduction returns, 0 for none),
//   reads(l) / writes(l): whether list l is loaded / stored,
//   load_scalars(tensor): reads its device scalars once per thread (`tensor`: the position of
//     the block's tensor in the call's lists, for per-tensor factors),
//   operator()(scalar_t (&x)[kDepth], acc_t (&sums)[..]): one element of every list, in place.
template <typename Op>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_kernel(const TensorListMeta<Op::kDepth> meta, const Op op_arg,
                        double* __restrict__ partials) {
  using scalar_t = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  constexpr int kDepth = Op::kDepth;
  constexpr int kVec = elems_per_vector<scalar_t>();
  struct alignas(kVecBytes) Vec {
    scalar_t v[kVec];
  };

  const int32_t block = static_cast<int32_t>(blockIdx.x);
  const int slot = slot_of_block(meta, block);
  const int32_t chunk = block - (slot > 0 ? meta.block_end[slot - 1] : 0);
  const int64_t begin = static_cast<int64_t>(chunk) * kChunkElems;
  const int64_t remaining = meta.numel[slot] - begin;
  const int64_t n = remaining < kChunkElems ? remaining : kChunkElems;
  scalar_t* ptrs[kDepth];
#pragma unroll
  for (int l = 0; l < kDepth; ++l) {
    ptrs[l] = static_cast<scalar_t*>(meta.addresses[l][slot]) + begin;
  }

  Op op = op_arg;
  op.load_scalars(meta.index[slot]);
  acc_t sums[Op::kSums > 0 ? Op::kSums : 1] = {};

  if (all_aligned<scalar_t, kDepth>(ptrs)) {
    const int64_t n_vec = n / kVec;
    for (int64_t i = threadIdx.x; i < n_vec; i += kBlockThreads) {
      Vec r[kDepth] = {};
#pragma unroll
      for (int l = 0; l < kDepth; ++l) {
        if (op.reads(l)) r[l] = reinterpret_cast<const Vec*>(ptrs[l])[i];
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        scalar_t x[kDepth];
#pragma unroll
        for (int l = 0; l < kDepth; ++l) x[l] = r[l].v[j];
        op(x, sums);
#pragma unroll
        for (int l = 0; l < kDepth; ++l) {
          if (Op::writes(l)) r[l].v[j] = x[l];
        }
      }
#pragma unroll
      for (int l = 0; l < kDepth; ++l) {
        if (Op::writes(l)) reinterpret_cast<Vec*>(ptrs[l])[i] = r[l];
      }
    }
    // Tail of the last chunk of a tensor whose size is not a multiple of the vector width.
    for (int64_t i = n_vec * kVec + threadIdx.x; i < n; i += kBlockThreads) {
      scalar_t x[kDepth] = {};
#pragma unroll
      for (int l = 0; l < kDepth; ++l) {
        if (op.reads(l)) x[l] = ptrs[l][i];
      }
      op(x, sums);
#pragma unroll
      for (int l = 0; l < kDepth; ++l) {
        if (Op::writes(l)) ptrs[l][i] = x[l];
      }
    }
  } else {
    // Misaligned (e.g. a view starting at an odd element): element accesses, kVec independent
    // elements per thread per iteration, all loads issued before any store.
    for (int64_t base = 0; base < n; base += static_cast<int64_t>(kBlockThreads) * kVec) {
      scalar_t x[kVec][kDepth] = {};
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int64_t i = base + threadIdx.x + static_cast<int64_t>(j) * kBlockThreads;
        if (i < n) {
#pragma unroll
          for (int l = 0; l < kDepth; ++l) {
            if (op.reads(l)) x[j][l] = ptrs[l][i];
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int64_t i = base + threadIdx.x + static_cast<int64_t>(j) * kBlockThreads;
        if (i < n) {
          op(x[j], sums);
#pragma unroll
          for (int l = 0; l < kDepth; ++l) {
            if (Op::writes(l)) ptrs[l][i] = x[j][l];
          }
        }
      }
    }
  }

  if constexpr (Op::kSums > 0) {
    block_sum(sums);
    if (threadIdx.x == 0) {
      const int64_t block = meta.first_block + blockIdx.x;
#pragma unroll
      for (int k = 0; k < Op::kSums; ++k) {
        partials[block * Op::kSums + k] = static_cast<double>(sums[k]);
      }
    }
  }
}

// Stage two of a reduction: out[k] = sum over blocks b, in order, of partials[b * K + k].
template <typename out_t, int K>
__global__ void __launch_bounds__(kBlockThreads)
    finalize_sums(const double* __restrict__ partials, int64_t n_blocks, out_t* __restrict__ out) {
  double s[K] = {};
  for (int64_t b = threadIdx.x; b < n_blocks; b += kBlockThreads) {
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] += partials[b * K + k];
  }
  block_sum(s);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = static_cast<out_t>(s[k]);
  }
}

// ---- Host side ----------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};
template <typename Tag>
using tag_t = typename Tag::type;

template <int kDepth>
using TensorLists = std::array<at::TensorList, kDepth>;

inline int64_t count_chunks(at::TensorList xs) {
  int64_t chunks = 0;
  for (const auto& t : xs) chunks += (t.numel() + kChunkElems - 1) / kChunkElems;
  return chunks;
}

// The device of a call: that of the first tensor of the first non-empty list.
inline c10::Device call_device(std::initializer_list<at::TensorList> lists,
                               const at::Tensor* scalar = nullptr) {
  for (const auto& list : lists) {
    if (!list.empty()) return list[0].device();
  }
  TORCH_CHECK(scalar != nullptr, "sam_kernels: a CUDA kernel was called without any tensor");
  return scalar->device();
}

// check_tensor_list (shared with the CPU backend) plus: every tensor on the call's one device.
inline void check_list(const char* op, const char* name, at::TensorList xs, c10::Device device) {
  check_tensor_list(op, name, xs, c10::DeviceType::CUDA);
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK_VALUE(xs[i].device() == device, op, ": ", name, "[", i, "] is on ",
                      xs[i].device(), " but the call's first tensor is on ", device,
                      "; keep every tensor of a call on one device");
  }
}

inline void check_scalar(const char* op, const char* name, const at::Tensor& t, int64_t numel,
                         c10::Device device) {
  check_scalar_tensor(op, name, t, numel, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(),
                    " but the tensors are on ", device);
}

// Launches Op over the tensors `indices` (all of one dtype) of the lists, as many launches as
// the argument table needs. `first_block` numbers the blocks across launches (and calls of this
// function within one primitive), which is where each block's partial goes.
template <typename Op>
void launch_group(const TensorLists<Op::kDepth>& lists, const std::vector<size_t>& indices,
                  const Op& op, double* partials, int64_t& first_block) {
  constexpr int kDepth = Op::kDepth;
  using Meta = TensorListMeta<kDepth>;
  static_assert(sizeof(Op) <= kFunctorArgBytes, "functor too large for the kernel arguments");
  static_assert(sizeof(Meta) + sizeof(Op) + sizeof(double*) <= kArgBytes,
                "kernel arguments exceed 4 KiB");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  Meta meta;
  int tensors = 0;
  int64_t blocks = 0;
  auto launch = [&] {
    meta.first_block = first_block;
    meta.n_tensors = tensors;
    multi_tensor_kernel<Op><<<static_cast<unsigned int>(blocks), kBlockThreads, 0, stream>>>(
        meta, op, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    first_block += blocks;
    tensors = 0;
    blocks = 0;
  };

  for (const size_t i : indices) {
    const int64_t numel = lists[0][i].numel();
    if (numel == 0) continue;  // no block: its (possibly null) address is never read
    const int64_t chunks = (numel + kChunkElems - 1) / kChunkElems;
    TORCH_CHECK(chunks <= kMaxBlocksPerLaunch, "sam_kernels: a tensor of ", numel,
                " elements is larger than one CUDA launch covers (", kMaxBlocksPerLaunch,
                " chunks of ", kChunkElems, ")");
    if (blocks + chunks > kMaxBlocksPerLaunch) launch();
    for (int l = 0; l < kDepth; ++l) {
      // mutable_data_ptr for written lists (materializes lazily-cloned storage), const otherwise.
      meta.addresses[l][tensors] = Op::writes(l)
                                       ? lists[l][i].mutable_data_ptr()
                                       : const_cast<void*>(lists[l][i].const_data_ptr());
    }
    meta.numel[tensors] = numel;
    meta.index[tensors] = static_cast<int32_t>(i);
    blocks += chunks;
    meta.block_end[tensors] = static_cast<int32_t>(blocks);
    if (++tensors == Meta::kMaxTensors) launch();
  }
  if (tensors > 0) launch();
}

// Runs the functor built by make_op(TypeTag<scalar_t>{}) over paired lists, one dtype group
// after another (in order of first appearance). Reductions pass a buffer with
// count_chunks(lists[0]) * Op::kSums doubles.
template <int kDepth, typename MakeOp>
void multi_tensor_apply(const TensorLists<kDepth>& lists, const MakeOp& make_op,
                        double* partials = nullptr) {
  std::vector<at::ScalarType> dtypes;
  std::vector<std::vector<size_t>> groups;
  for (size_t i = 0; i < lists[0].size(); ++i) {
    const at::ScalarType dtype = lists[0][i].scalar_type();
    size_t g = 0;
    while (g < dtypes.size() && dtypes[g] != dtype) ++g;
    if (g == dtypes.size()) {
      dtypes.push_back(dtype);
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  int64_t first_block = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    SAM_KERNELS_CUDA_DISPATCH(dtypes[g], "sam_kernels_multi_tensor_apply", [&] {
      using Op = decltype(make_op(TypeTag<scalar_t>{}));
      static_assert(Op::kDepth == kDepth, "functor depth does not match the number of lists");
      launch_group<Op>(lists, groups[g], make_op(TypeTag<scalar_t>{}), partials, first_block);
    });
  }
}

// The first block (in the numbering of multi_tensor_apply: dtype groups in order of first
// appearance, tensors in list order within a group, empty tensors skipped) and the number of
// blocks of every tensor of `xs`, in list order: [first(0..n-1) | count(0..n-1)].
inline std::vector<int64_t> block_ranges(at::TensorList xs) {
  const size_t n = xs.size();
  std::vector<int64_t> ranges(2 * n, 0);
  std::vector<at::ScalarType> dtypes;
  for (size_t i = 0; i < n; ++i) {
    if (std::find(dtypes.begin(), dtypes.end(), xs[i].scalar_type()) == dtypes.end()) {
      dtypes.push_back(xs[i].scalar_type());
    }
  }
  int64_t next = 0;
  for (const at::ScalarType dtype : dtypes) {
    for (size_t i = 0; i < n; ++i) {
      if (xs[i].scalar_type() != dtype) continue;
      const int64_t chunks = (xs[i].numel() + kChunkElems - 1) / kChunkElems;
      ranges[i] = next;
      ranges[n + i] = chunks;
      next += chunks;
    }
  }
  return ranges;
}

// Stage two of a per-tensor reduction: block t sums the partials of tensor t (ranges as
// block_ranges, on the device) in a fixed order into out[t].
__global__ void __launch_bounds__(kBlockThreads)
    finalize_per_tensor(const double* __restrict__ partials, const int64_t* __restrict__ ranges,
                        int64_t n_tensors, double* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int64_t first = ranges[t];
  const int64_t count = ranges[n_tensors + t];
  double s[1] = {0.0};
  for (int64_t b = threadIdx.x; b < count; b += kBlockThreads) s[0] += partials[first + b];
  block_sum(s);
  if (threadIdx.x == 0) out[t] = s[0];
}

// A reduction: partials from multi_tensor_apply, then finalize_sums into a new tensor of
// `shape` (kSums values) on `device`, float64 if any input is float64 else float32.
template <int kSums, int kDepth, typename MakeOp>
at::Tensor multi_tensor_reduce(c10::Device device,
                               const TensorLists<kDepth>& lists, const MakeOp& make_op,
                               at::IntArrayRef shape) {
  const int64_t n_blocks = count_chunks(lists[0]);
  const auto options = at::TensorOptions().device(device);
  at::Tensor partials = at::empty({std::max<int64_t>(n_blocks, 1) * kSums},
                                  options.dtype(at::kDouble));
  multi_tensor_apply<kDepth>(lists, make_op, partials.mutable_data_ptr<double>());
  at::Tensor out = at::empty(shape, options.dtype(reduction_dtype(lists[0])));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sam_kernels_finalize_sums", [&] {
    finalize_sums<scalar_t, kSums><<<1, kBlockThreads, 0, stream>>>(
        partials.const_data_ptr<double>(), n_blocks, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace sam_kernels
