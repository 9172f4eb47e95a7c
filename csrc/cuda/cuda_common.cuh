// Helpers shared by the CUDA kernels (csrc/cuda/*.cu). It includes common.h and nothing of the
// CPU kernels:
//   * SeqLayout: the device-side token layout (padded [B, L, D] + optional bool mask, or packed
//     [T, D] + int32/int64 cu_seqlens read on the device, so no host synchronization), int64
//     offsets and strides;
//   * warp/block sums in a fixed order;
//   * 16-byte vectorized row loads/stores with a scalar fallback (odd strides or alignment);
//   * host helpers: the current stream, grid limits, launch checks;
//   * the block shape and helpers that pool_cuda.cu and weighted_cuda.cu both use.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "../common.h"

namespace fused_pool {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

// After every launch: surfaces launch errors (bad grid, too much shared memory) at once.
#define FP_CUDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

// Grid sizes: gridDim.x may reach 2^31 - 1, gridDim.y/z only 65535.
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;

inline unsigned grid_dim(int64_t n, int64_t limit = kMaxGridX) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(n, limit)));
}

// ---------------------------------------------------------------------------------------------
// Token layout
// ---------------------------------------------------------------------------------------------

// A token layout (see fill_token_layout in common.h) with cu_seqlens left on the device, int32
// or int64, so nothing synchronizes with the host. For packed input L is the number of rows T
// (an upper bound of every length: the longest sequence is not known on the host without a
// synchronization); kernels loop to len(b). Passed to kernels by value.
struct SeqLayout {
  int64_t B = 0, L = 0, D = 0;
  int64_t sB = 0, sL = 0, sD = 1;
  const bool* mask = nullptr;
  int64_t mB = 0, mL = 0;
  const int32_t* cu32 = nullptr;  // packed with int32 offsets
  const int64_t* cu64 = nullptr;  // packed with int64 offsets

  __host__ __device__ bool packed() const { return cu32 != nullptr || cu64 != nullptr; }
  // cu_seqlens[b] clamped to [0, T]: its values are not checked under torch.compile or CUDA
  // graph capture (that needs a host sync), and a bad offset must never read or write out of
  // bounds (as the CPU kernels' check and the Triton kernels' clamp).
  __device__ int64_t cu(int64_t b) const {
    const int64_t v = cu64 != nullptr ? cu64[b] : static_cast<int64_t>(cu32[b]);
    return v < 0 ? 0 : (v > L ? L : v);
  }
  // Offset (in elements) of token 0 of sequence b.
  __device__ int64_t start(int64_t b) const { return packed() ? cu(b) * sL : b * sB; }
  // Number of token slots of sequence b (padded: L, some maybe invalid); 0 where a bad
  // (decreasing) cu_seqlens would make it negative.
  __device__ int64_t len(int64_t b) const {
    if (!packed()) return L;
    const int64_t n = cu(b + 1) - cu(b);
    return n > 0 ? n : 0;
  }
  __device__ bool valid(int64_t b, int64_t j) const {
    return mask == nullptr || mask[b * mB + j * mL];
  }
  // Packed: the sequence that row r belongs to (binary search over cu_seqlens, O(log B)), or -1
  // for a row no sequence covers. Among empty sequences sharing an offset, the row belongs to
  // the last one starting there (the only one whose range [cu[b], cu[b + 1]) contains it).
  __device__ int64_t seq_of_row(int64_t r) const {
    int64_t lo = 0, hi = B + 1;  // first index with cu[index] > r lies in [lo, hi]
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (cu(mid) > r) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int64_t b = lo - 1;
    // The range check only matters for a bad (decreasing) cu_seqlens, where the search may land
    // on a sequence that does not contain r.
    return (b >= 0 && b < B && cu(b) <= r && r < cu(b + 1)) ? b : -1;
  }
};

// The layout of `t` (x, or a gradient shaped like x) given mask/cu_seqlens. `cu_keepalive`
// receives the contiguous cu_seqlens (a [B + 1] copy at most) so its memory outlives the launch.
inline SeqLayout make_layout(const Tensor& t, const OptTensor& mask, const OptTensor& cu_seqlens,
                             Tensor* cu_keepalive) {
  SeqLayout s;
  fill_token_layout(t, mask, cu_seqlens, &s);
  if (cu_seqlens.has_value()) {
    *cu_keepalive = cu_seqlens->contiguous();
    if (cu_keepalive->scalar_type() == at::kLong) {
      s.cu64 = cu_keepalive->const_data_ptr<int64_t>();
    } else {
      s.cu32 = cu_keepalive->const_data_ptr<int32_t>();
    }
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Warp and block reductions. Block helpers take any block shape (1-D, 2-D or 3-D; threads are
// numbered x fastest) whose thread count is a multiple of 32 (at most 1024), and `smem` holding
// 32 elements; every thread of the block must call them and gets the result. Reductions are in
// a fixed tree order, so results are deterministic run to run.
// ---------------------------------------------------------------------------------------------

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int linear_tid() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ int block_threads() { return blockDim.x * blockDim.y * blockDim.z; }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
  const int tid = linear_tid(), lane = tid & 31, warp = tid >> 5;
  const int nwarps = (block_threads() + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : A(0);
  return warp_sum(v);
}

// ---------------------------------------------------------------------------------------------
// Vectorized row access. A thread handles kVec<T> consecutive features (16 bytes); with
// `vec = true` they are one 16-byte load/store, else kVec<T> scalar accesses with the feature
// stride and a bound (the row tail, odd strides, unaligned views).
// ---------------------------------------------------------------------------------------------

template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T>
struct alignas(16) Pack {
  T v[kVec<T>];
};

// Whether every row start `base + k * stride` (k >= 0, for each stride given) is 16-byte
// aligned and features are unit-stride, i.e. whether `vec = true` is safe. D need not be a
// multiple of kVec: the tail is handled by the caller with `n < kVec`.
template <typename T>
inline bool can_vectorize(const void* base, int64_t sD, std::initializer_list<int64_t> strides) {
  if (sD != 1 || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  for (int64_t s : strides) {
    if (s % kVec<T> != 0) return false;
  }
  return true;
}

// Loads features [d, d + n) (n <= kVec<T>) of the row at `row` (element d = 0) into acc.
// Elements past n are set to 0. With VEC, n == kVec<T> takes one 16-byte load.
template <bool VEC, typename T, typename A>
__device__ __forceinline__ void load_row(const T* row, int64_t d, int64_t sD, int n,
                                         A (&out)[kVec<T>]) {
  if (VEC && n == kVec<T>) {
    const Pack<T> p = *reinterpret_cast<const Pack<T>*>(row + d);
#pragma unroll
    for (int k = 0; k < kVec<T>; ++k) out[k] = static_cast<A>(p.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec<T>; ++k) {
      out[k] = k < n ? static_cast<A>(row[(d + k) * sD]) : A(0);
    }
  }
}

// Stores features [d, d + n) of a row (contiguous output rows: unit feature stride).
template <bool VEC, typename T, typename A>
__device__ __forceinline__ void store_row(T* row, int64_t d, int n, const A (&in)[kVec<T>]) {
  if (VEC && n == kVec<T>) {
    Pack<T> p;
#pragma unroll
    for (int k = 0; k < kVec<T>; ++k) p.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Pack<T>*>(row + d) = p;
  } else {
#pragma unroll
    for (int k = 0; k < kVec<T>; ++k) {
      if (k < n) row[d + k] = static_cast<T>(in[k]);
    }
  }
}

// Calls f(std::true_type) when `vec`, f(std::false_type) otherwise: one kernel instantiation per
// access mode.
template <typename F>
inline void vec_switch(bool vec, F&& f) {
  if (vec) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// ---------------------------------------------------------------------------------------------
// The pooling kernels' shapes (pool_cuda.cu and weighted_cuda.cu): a pooling block is kTy warps
// of kTx lanes, each lane owning kVec<T> consecutive features of a chunk of
// chunk_width<T>() features; row kernels give each warp one output row.
// ---------------------------------------------------------------------------------------------

constexpr int kTx = 32;      // lanes along features (one warp)
constexpr int kTy = 8;       // warps along tokens
constexpr int kUnroll = 4;   // tokens a warp loads before accumulating them
constexpr int kFlush = 64;   // tokens per partial sum before it is added to the total
constexpr int kThreads = kTx * kTy;

template <typename T>
constexpr int64_t chunk_width() {
  return int64_t(kTx) * kVec<T>;
}

inline void check_cuda(const Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), "fused_pool (cpp, CUDA): ", what, " must be a CUDA tensor");
}

// Number of (sequence, feature chunk) blocks of a pooling kernel.
template <typename T>
inline int64_t pool_blocks(int64_t B, int64_t D, int64_t* nchunk) {
  *nchunk = ceil_div(D, chunk_width<T>());
  const int64_t blocks = B * *nchunk;
  TORCH_CHECK(blocks <= kMaxGridX, "fused_pool: B * ceil(D / ", chunk_width<T>(),
              ") must be below 2^31, got B = ", B, ", D = ", D);
  return blocks;
}

// Rows of an output shaped like x: B * L (padded) or T (packed).
inline int64_t row_blocks(int64_t rows) {
  const int64_t blocks = ceil_div(rows, kTy);
  TORCH_CHECK(blocks <= kMaxGridX, "fused_pool: too many rows: ", rows);
  return blocks;
}

// Where row r of an output shaped like x lies: its sequence b (-1: no sequence covers it, only
// possible for packed input) and its token j.
__device__ __forceinline__ void locate_row(const SeqLayout& s, int64_t r, int64_t* b, int64_t* j) {
  if (s.packed()) {
    *b = s.seq_of_row(r);
    *j = *b >= 0 ? r - s.cu(*b) : 0;
  } else {
    *b = r / s.L;
    *j = r % s.L;
  }
}

// Features [d, d + n) of this lane within a pooling block.
template <typename T>
__device__ __forceinline__ int64_t lane_feature(int64_t chunk) {
  return chunk * chunk_width<T>() + int64_t(threadIdx.x) * kVec<T>;
}

__device__ __forceinline__ int lane_count(int64_t d, int64_t D, int V) {
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(V, D - d)));
}

// Two-level per-feature sums (as TokenSum in cpu/cpu_common.h): tokens go into `part`, added
// into `total` every kFlush tokens, so long sequences keep float32 sums accurate.
template <typename A, int V>
struct LaneSum {
  A total[V], part[V];
  int pending;
  __device__ void init() {
#pragma unroll
    for (int k = 0; k < V; ++k) total[k] = part[k] = A(0);
    pending = 0;
  }
  __device__ void add(const A (&v)[V], A scale = A(1)) {
#pragma unroll
    for (int k = 0; k < V; ++k) part[k] += scale * v[k];
  }
  __device__ void token_done() {
    if (++pending == kFlush) flush();
  }
  __device__ void flush() {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      total[k] += part[k];
      part[k] = A(0);
    }
    pending = 0;
  }
};

// Valid-token counts per sequence ([B] int64 on s's device) for the mean, mean_max and
// weighted_layer_mean backwards. Defined in pool_cuda.cu, so that its kernel is compiled once
// and not into every .cu file that includes this header.
Tensor valid_counts(const SeqLayout& s, const Tensor& like);

}  // namespace cuda
}  // namespace fused_pool
