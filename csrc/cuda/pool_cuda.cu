// CUDA kernels of the pooling operators: masked_mean, masked_extremum (max/min), masked_kmax,
// index_pool_backward, masked_mean_max (see fused_pool/_schema.py for the contract,
// fused_pool/backends/reference/pool.py for the formulas and csrc/cpu/pool_cpu.cpp for the CPU
// twin, whose tie-breaking, NaN handling and rounding order these kernels follow).
//
// Three kernel shapes (shared with weighted_cuda.cu, see cuda_common.cuh):
//   * pooling (forward of mean, max/min, mean_max): one block per (sequence, chunk of
//     kTx * kVec features), blockDim (kTx = 32, kTy = 8). A warp reads kVec consecutive
//     features per lane (16 bytes) of one token, so every row read is a 512-byte coalesced
//     access; the 8 warps take every 8th token, kUnroll tokens in flight each, and are combined
//     in a fixed order at the end.
//   * rows (gradients shaped like x): one warp per output row (padded (b, j), or packed row t
//     whose sequence is found by binary search on cu_seqlens).
//   * per-(b, d) threads (k-max, index scatter for large k).
// Nothing synchronizes with the host: grids depend on shapes only, cu_seqlens is read on the
// device.
#include "cuda_common.cuh"

namespace fused_pool {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Valid-token counts per sequence (mean backward, weighted_layer_mean backward).
// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) count_kernel(SeqLayout s, int64_t* counts) {
  __shared__ int64_t smem[32];
  const int64_t b = blockIdx.x;
  const int64_t len = s.len(b);
  int64_t n = 0;
  if (s.mask == nullptr) {
    n = linear_tid() == 0 ? len : 0;
  } else {
    for (int64_t j = linear_tid(); j < len; j += block_threads()) n += s.valid(b, j);
  }
  n = block_sum(n, smem);
  if (linear_tid() == 0) counts[b] = n;
}

}  // namespace

Tensor valid_counts(const SeqLayout& s, const Tensor& like) {
  Tensor counts = at::empty({s.B}, like.options().dtype(at::kLong));
  if (s.B > 0) {
    count_kernel<<<grid_dim(s.B), kThreads, 0, stream()>>>(s, counts.mutable_data_ptr<int64_t>());
    FP_CUDA_LAUNCH_CHECK();
  }
  return counts;
}

namespace {

// max/min ordering of the contract (as beats in cpu/pool_cpu.cpp): NaN beats every number;
// equal values do not beat each other (the caller decides ties by index).
template <typename A>
__device__ __forceinline__ bool beats_dev(A a, A b, bool largest) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && !nb;
  return largest ? a > b : a < b;
}

// A candidate of an arg-max/min reduction: value and token index, -1 for "no token".
template <typename A>
struct ValIdx {
  A v;
  int64_t i;
};

// Whether candidate a should be kept over b: any token beats "no token"; otherwise the better
// value (beats_dev), and among equal values (or two NaNs) the lower index.
template <typename A>
__device__ __forceinline__ bool keep_first(const ValIdx<A>& a, const ValIdx<A>& b, bool largest) {
  if (b.i < 0) return true;
  if (a.i < 0) return false;
  if (beats_dev(a.v, b.v, largest)) return true;
  if (beats_dev(b.v, a.v, largest)) return false;
  return a.i < b.i;
}

// ---------------------------------------------------------------------------------------------
// Pooling forward: mean, max, min, mean_max.
//   mean:     out[b, d] = sum_{j valid} x[b, j, d] / n_b  (0 when n_b == 0)
//   max/min:  out[b, d] = x[b, arg, d], arg the first best valid token (NaN wins), -1 if empty
//   mean_max: out[b] = cat(mean, max), indices of the max
// ---------------------------------------------------------------------------------------------
enum class Pool { kMean, kMax, kMin, kMeanMax };

template <typename T, bool VEC, Pool P>
__global__ void __launch_bounds__(kThreads)
    pool_kernel(const T* __restrict__ x, SeqLayout s, int64_t nchunk, T* __restrict__ out,
                int64_t out_row, int64_t* __restrict__ idx) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  constexpr bool kSum = P == Pool::kMean || P == Pool::kMeanMax;
  constexpr bool kExt = P != Pool::kMean;
  constexpr bool kLargest = P != Pool::kMin;
  const int64_t b = blockIdx.x / nchunk, chunk = blockIdx.x % nchunk;
  const int64_t d = lane_feature<T>(chunk);
  const int n = lane_count(d, s.D, V);
  const int64_t len = s.len(b), base = s.start(b);

  LaneSum<A, V> sum;
  sum.init();
  A best[V];
  int64_t arg[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    best[k] = A(0);
    arg[k] = -1;
  }
  int64_t cnt = 0;
  for (int64_t j0 = threadIdx.y; j0 < len; j0 += int64_t(kTy) * kUnroll) {
    A v[kUnroll][V];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + int64_t(u) * kTy;
      ok[u] = j < len && s.valid(b, j);
      if (ok[u] && n > 0) load_row<VEC>(x + base + j * s.sL, d, s.sD, n, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;
      const int64_t j = j0 + int64_t(u) * kTy;
      ++cnt;
      if constexpr (kSum) {
        sum.add(v[u]);
        sum.token_done();
      }
      if constexpr (kExt) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          // This warp visits tokens in increasing order: replace only on a strict win (or a
          // NaN over a number), so the earliest of equal values stays.
          const A cur = best[k], nv = v[u][k];
          const bool better = kLargest ? nv > cur : nv < cur;
          const bool take = cnt == 1 || better || (nv != nv && cur == cur);
          best[k] = take ? nv : cur;
          arg[k] = take ? j : arg[k];
        }
      }
    }
  }
  if constexpr (kSum) sum.flush();

  // Combine the kTy warps in warp order (fixed: deterministic).
  constexpr int W = kTx * V;
  __shared__ int64_t sh_cnt[kTy];
  __shared__ A sh_sum[kSum ? kTy : 1][kSum ? W : 1];
  __shared__ A sh_best[kExt ? kTy : 1][kExt ? W : 1];
  __shared__ int64_t sh_arg[kExt ? kTy : 1][kExt ? W : 1];
  const int f = threadIdx.x * V;
  if (threadIdx.x == 0) sh_cnt[threadIdx.y] = cnt;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if constexpr (kSum) sh_sum[threadIdx.y][f + k] = sum.total[k];
    if constexpr (kExt) {
      sh_best[threadIdx.y][f + k] = best[k];
      sh_arg[threadIdx.y][f + k] = arg[k];
    }
  }
  __syncthreads();
  if (threadIdx.y != 0 || n == 0) return;
  int64_t count = 0;
  for (int t = 0; t < kTy; ++t) count += sh_cnt[t];
  const A denom = static_cast<A>(std::max<int64_t>(count, 1));
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (k >= n) break;
    if constexpr (kSum) {
      A total = A(0);
      for (int t = 0; t < kTy; ++t) total += sh_sum[t][f + k];
      out[b * out_row + d + k] = static_cast<T>(total / denom);
    }
    if constexpr (kExt) {
      ValIdx<A> c{sh_best[0][f + k], sh_arg[0][f + k]};
      for (int t = 1; t < kTy; ++t) {
        const ValIdx<A> o{sh_best[t][f + k], sh_arg[t][f + k]};
        if (!keep_first(c, o, kLargest)) c = o;
      }
      const int64_t off = P == Pool::kMeanMax ? s.D : 0;
      out[b * out_row + off + d + k] = c.i >= 0 ? static_cast<T>(c.v) : T(0);
      idx[b * s.D + d + k] = c.i;
    }
  }
}

template <Pool P>
void launch_pool(const Tensor& x, const SeqLayout& s, Tensor& out, int64_t out_row,
                 int64_t* idx) {
  FP_DISPATCH(x.scalar_type(), "fused_pool_cuda_pool", [&] {
    int64_t nchunk;
    const int64_t blocks = pool_blocks<scalar_t>(s.B, s.D, &nchunk);
    const bool vec = can_vectorize<scalar_t>(x.const_data_ptr(), s.sD, {s.sB, s.sL});
    vec_switch(vec, [&](auto v) {
      pool_kernel<scalar_t, decltype(v)::value, P>
          <<<grid_dim(blocks), dim3(kTx, kTy), 0, stream()>>>(
              x.const_data_ptr<scalar_t>(), s, nchunk, out.mutable_data_ptr<scalar_t>(),
              out_row, idx);
      FP_CUDA_LAUNCH_CHECK();
    });
  });
}

Tensor masked_mean_cuda(const Tensor& x, const OptTensor& mask, const OptTensor& cu_seqlens) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor cu;
  const SeqLayout s = make_layout(x, mask, cu_seqlens, &cu);
  Tensor out = at::empty({s.B, s.D}, x.options());
  if (out.numel() == 0) return out;
  launch_pool<Pool::kMean>(x, s, out, s.D, nullptr);
  return out;
}

std::tuple<Tensor, Tensor> masked_extremum_cuda(const Tensor& x, const OptTensor& mask,
                                                const OptTensor& cu_seqlens, bool largest) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor cu;
  const SeqLayout s = make_layout(x, mask, cu_seqlens, &cu);
  Tensor out = at::empty({s.B, s.D}, x.options());
  Tensor idx = at::empty({s.B, s.D}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, idx};
  int64_t* ip = idx.mutable_data_ptr<int64_t>();
  if (largest) {
    launch_pool<Pool::kMax>(x, s, out, s.D, ip);
  } else {
    launch_pool<Pool::kMin>(x, s, out, s.D, ip);
  }
  return {out, idx};
}

std::tuple<Tensor, Tensor> masked_mean_max_cuda(const Tensor& x, const OptTensor& mask,
                                                const OptTensor& cu_seqlens) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor cu;
  const SeqLayout s = make_layout(x, mask, cu_seqlens, &cu);
  Tensor out = at::empty({s.B, 2 * s.D}, x.options());
  Tensor idx = at::empty({s.B, s.D}, x.options().dtype(at::kLong));
  if (idx.numel() == 0) return {out, idx};
  launch_pool<Pool::kMeanMax>(x, s, out, 2 * s.D, idx.mutable_data_ptr<int64_t>());
  return {out, idx};
}

// ---------------------------------------------------------------------------------------------
// Gradients shaped like x, one warp per row:
//   mean:     gx[b, j] = valid ? T(g[b] / n_b) : 0
//   index:    gx[b, j, d] = sum_{r: idx[b, r, d] == j} g[b, r, d], added in r order
//   mean_max: gx[b, j, d] = T(mean part) (+ g_max[b, d] when idx[b, d] == j)
// Rows no sequence covers (packed only) are zero.
// ---------------------------------------------------------------------------------------------
enum class Grad { kMean, kIndex, kMeanMax };

template <typename T, bool VEC, Grad G>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(SeqLayout g, int64_t rows, const T* __restrict__ grad,
                     const int64_t* __restrict__ counts, const int64_t* __restrict__ idx,
                     int64_t K, T* __restrict__ gx) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t r = int64_t(blockIdx.x) * kTy + threadIdx.y;
  if (r >= rows) return;
  const int64_t D = g.D;
  int64_t b, j;
  locate_row(g, r, &b, &j);
  const bool valid = b >= 0 && g.valid(b, j);
  A denom = A(1);
  if constexpr (G != Grad::kIndex) {
    if (valid) denom = static_cast<A>(std::max<int64_t>(counts[b], 1));
  }
  T* row = gx + r * D;
  for (int64_t d = int64_t(threadIdx.x) * V; d < D; d += int64_t(kTx) * V) {
    const int n = lane_count(d, D, V);
    A val[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      T v = T(0);
      if (k < n && b >= 0) {
        if constexpr (G == Grad::kMean) {
          if (valid) v = static_cast<T>(static_cast<A>(grad[b * D + d + k]) / denom);
        } else if constexpr (G == Grad::kMeanMax) {
          if (valid) v = static_cast<T>(static_cast<A>(grad[b * 2 * D + d + k]) / denom);
          if (idx[b * D + d + k] == j) {
            v = static_cast<T>(static_cast<A>(v) + static_cast<A>(grad[b * 2 * D + D + d + k]));
          }
        } else {
          for (int64_t q = 0; q < K; ++q) {
            const int64_t o = (b * K + q) * D + d + k;
            if (idx[o] == j) v = static_cast<T>(static_cast<A>(v) + static_cast<A>(grad[o]));
          }
        }
      }
      val[k] = static_cast<A>(v);  // exact: v is already rounded to T
    }
    store_row<VEC>(row, d, n, val);
  }
}

template <Grad G>
Tensor launch_grad_rows(const Tensor& grad, const SeqLayout& g, int64_t rows,
                        const int64_t* counts, const int64_t* idx, int64_t K, Tensor& gx) {
  if (gx.numel() == 0) return gx;
  FP_DISPATCH(grad.scalar_type(), "fused_pool_cuda_grad_rows", [&] {
    const bool vec = g.D % kVec<scalar_t> == 0;  // gx is contiguous: rows stay 16-byte aligned
    vec_switch(vec, [&](auto v) {
      grad_rows_kernel<scalar_t, decltype(v)::value, G>
          <<<grid_dim(row_blocks(rows)), dim3(kTx, kTy), 0, stream()>>>(
              g, rows, grad.const_data_ptr<scalar_t>(), counts, idx, K,
              gx.mutable_data_ptr<scalar_t>());
      FP_CUDA_LAUNCH_CHECK();
    });
  });
  return gx;
}

Tensor masked_mean_backward_cuda(const Tensor& grad_in, const OptTensor& mask,
                                 const OptTensor& cu_seqlens, int64_t num_tokens) {
  check_cuda(grad_in, "grad");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const Tensor grad = grad_in.contiguous();
  const int64_t B = grad.size(0), D = grad.size(1);
  Tensor gx = at::empty(grad_x_shape(B, num_tokens, D, cu_seqlens.has_value()), grad.options());
  Tensor cu;
  const SeqLayout g = make_layout(gx, mask, cu_seqlens, &cu);
  if (gx.numel() == 0) return gx;
  const Tensor counts = valid_counts(g, grad);
  const int64_t rows = cu_seqlens.has_value() ? num_tokens : B * num_tokens;
  return launch_grad_rows<Grad::kMean>(grad, g, rows, counts.const_data_ptr<int64_t>(), nullptr,
                                       0, gx);
}

Tensor masked_mean_max_backward_cuda(const Tensor& grad_in, const Tensor& indices_in,
                                     const OptTensor& mask, const OptTensor& cu_seqlens,
                                     int64_t num_tokens) {
  check_cuda(grad_in, "grad");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const Tensor grad = grad_in.contiguous(), indices = indices_in.contiguous();
  const int64_t B = grad.size(0), D = indices.size(1);
  Tensor gx = at::empty(grad_x_shape(B, num_tokens, D, cu_seqlens.has_value()), grad.options());
  Tensor cu;
  const SeqLayout g = make_layout(gx, mask, cu_seqlens, &cu);
  if (gx.numel() == 0) return gx;
  const Tensor counts = valid_counts(g, grad);
  const int64_t rows = cu_seqlens.has_value() ? num_tokens : B * num_tokens;
  return launch_grad_rows<Grad::kMeanMax>(grad, g, rows, counts.const_data_ptr<int64_t>(),
                                          indices.const_data_ptr<int64_t>(), 1, gx);
}

// Large k: zero gx, then one thread per (b, d) adds its k gradients in r order (the threads of
// one (b, d) column never share an address: no atomics, same rounding as the row kernel).
template <typename T>
__global__ void index_scatter_kernel(SeqLayout g, const T* __restrict__ grad,
                                     const int64_t* __restrict__ idx, int64_t K,
                                     T* __restrict__ gx) {
  using A = acc_t<T>;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= g.B * g.D) return;
  const int64_t b = t / g.D, d = t % g.D;
  const int64_t len = g.len(b), row0 = g.packed() ? g.cu(b) : b * g.L;
  for (int64_t q = 0; q < K; ++q) {
    const int64_t o = (b * K + q) * g.D + d;
    const int64_t j = idx[o];
    if (j < 0 || j >= len) continue;
    T& dst = gx[(row0 + j) * g.D + d];
    dst = static_cast<T>(static_cast<A>(dst) + static_cast<A>(grad[o]));
  }
}

constexpr int64_t kRowScanMaxK = 8;  // beyond: zero + scatter, O(1) per element instead of O(k)

Tensor index_pool_backward_cuda(const Tensor& grad_in, const Tensor& indices_in,
                                const OptTensor& cu_seqlens, int64_t num_tokens) {
  check_cuda(grad_in, "grad");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const Tensor grad = grad_in.contiguous(), indices = indices_in.contiguous();
  const int64_t B = grad.size(0), K = grad.size(1), D = grad.size(2);
  const auto shape = grad_x_shape(B, num_tokens, D, cu_seqlens.has_value());
  Tensor cu;
  if (K > kRowScanMaxK) {
    Tensor gx = at::zeros(shape, grad.options());
    const SeqLayout g = make_layout(gx, std::nullopt, cu_seqlens, &cu);
    if (gx.numel() == 0 || B * D == 0) return gx;
    FP_DISPATCH(grad.scalar_type(), "fused_pool_cuda_index_scatter", [&] {
      index_scatter_kernel<scalar_t><<<grid_dim(ceil_div(B * D, kThreads)), kThreads, 0,
                                       stream()>>>(g, grad.const_data_ptr<scalar_t>(),
                                                   indices.const_data_ptr<int64_t>(), K,
                                                   gx.mutable_data_ptr<scalar_t>());
      FP_CUDA_LAUNCH_CHECK();
    });
    return gx;
  }
  Tensor gx = at::empty(shape, grad.options());
  const SeqLayout g = make_layout(gx, std::nullopt, cu_seqlens, &cu);
  const int64_t rows = cu_seqlens.has_value() ? num_tokens : B * num_tokens;
  return launch_grad_rows<Grad::kIndex>(grad, g, rows, nullptr, indices.const_data_ptr<int64_t>(),
                                        K, gx);
}

// ---------------------------------------------------------------------------------------------
// masked_kmax: the k best valid values per feature (rank: NaN first, then value descending,
// then lower index), written in token order; unused slots 0 with index -1. One thread per
// (b, d) streams the tokens once, keeping its k candidates in the output tensors themselves
// (coalesced across d); a new token (always the highest index so far) enters only if it
// strictly beats the current worst candidate. Then the candidates are sorted by index.
// ---------------------------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ bool ranks_after(A av, int64_t ai, A bv, int64_t bi) {
  if (beats_dev(bv, av, true)) return true;
  if (beats_dev(av, bv, true)) return false;
  return ai > bi;
}

template <typename T>
__global__ void kmax_kernel(const T* __restrict__ x, SeqLayout s, int64_t k, T* __restrict__ vp,
                            int64_t* __restrict__ ip) {
  using A = acc_t<T>;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= s.B * s.D) return;
  const int64_t b = t / s.D, d = t % s.D;
  const int64_t len = s.len(b), base = s.start(b) + d * s.sD;
  T* vals = vp + b * k * s.D + d;  // slot r at vals[r * D]
  int64_t* ids = ip + b * k * s.D + d;
  const int64_t D = s.D;
  int64_t filled = 0, worst = 0;
  A worst_val = A(0);
  auto find_worst = [&]() {
    int64_t w = 0;
    A wv = static_cast<A>(vals[0]);
    int64_t wi = ids[0];
    for (int64_t r = 1; r < k; ++r) {
      const A v = static_cast<A>(vals[r * D]);
      const int64_t i = ids[r * D];
      if (ranks_after(v, i, wv, wi)) {
        w = r;
        wv = v;
        wi = i;
      }
    }
    worst = w;
    worst_val = wv;
  };
  for (int64_t j = 0; j < len; ++j) {
    if (!s.valid(b, j)) continue;
    const T raw = x[base + j * s.sL];
    if (filled < k) {
      vals[filled * D] = raw;
      ids[filled * D] = j;
      if (++filled == k) find_worst();
      continue;
    }
    const A v = static_cast<A>(raw);
    if ((v > worst_val) || (v != v && worst_val == worst_val)) {
      vals[worst * D] = raw;
      ids[worst * D] = j;
      find_worst();
    }
  }
  // Token order: insertion sort of the filled slots by index (indices are distinct).
  for (int64_t r = 1; r < filled; ++r) {
    const T v = vals[r * D];
    const int64_t i = ids[r * D];
    int64_t q = r - 1;
    while (q >= 0 && ids[q * D] > i) {
      vals[(q + 1) * D] = vals[q * D];
      ids[(q + 1) * D] = ids[q * D];
      --q;
    }
    vals[(q + 1) * D] = v;
    ids[(q + 1) * D] = i;
  }
  for (int64_t r = filled; r < k; ++r) {
    vals[r * D] = T(0);
    ids[r * D] = -1;
  }
}

std::tuple<Tensor, Tensor> masked_kmax_cuda(const Tensor& x, const OptTensor& mask,
                                            const OptTensor& cu_seqlens, int64_t k) {
  TORCH_CHECK(k >= 1, "masked_kmax: k must be at least 1, got ", k);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor cu;
  const SeqLayout s = make_layout(x, mask, cu_seqlens, &cu);
  Tensor values = at::empty({s.B, k, s.D}, x.options());
  Tensor idx = at::empty({s.B, k, s.D}, x.options().dtype(at::kLong));
  if (values.numel() == 0) return {values, idx};
  FP_DISPATCH(x.scalar_type(), "fused_pool_cuda_kmax", [&] {
    kmax_kernel<scalar_t><<<grid_dim(ceil_div(s.B * s.D, kThreads)), kThreads, 0, stream()>>>(
        x.const_data_ptr<scalar_t>(), s, k, values.mutable_data_ptr<scalar_t>(),
        idx.mutable_data_ptr<int64_t>());
    FP_CUDA_LAUNCH_CHECK();
  });
  return {values, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool_cpp, CUDA, m) {
  m.impl("masked_mean", &masked_mean_cuda);
  m.impl("masked_mean_backward", &masked_mean_backward_cuda);
  m.impl("masked_extremum", &masked_extremum_cuda);
  m.impl("masked_kmax", &masked_kmax_cuda);
  m.impl("index_pool_backward", &index_pool_backward_cuda);
  m.impl("masked_mean_max", &masked_mean_max_cuda);
  m.impl("masked_mean_max_backward", &masked_mean_max_backward_cuda);
}

}  // namespace cuda
}  // namespace fused_pool
