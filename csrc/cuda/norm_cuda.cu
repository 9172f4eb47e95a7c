// CUDA kernels of the normalization operators (formulas: fused_pool/backends/reference.py; the
// CPU twins in csrc/cpu/norm_cpu.cpp).
//
// LayerNorm, RMSNorm and InstanceNorm are row norms: x seen as M rows of N elements (LayerNorm
// and RMSNorm: rows over x.shape[:-nd], InstanceNorm: rows (b, c) over the spatial dims). A
// group of G threads (a power of two, up to 512) normalizes one row; a block holds
// max(256, G) / G groups and walks rows with a grid-stride loop. Each thread keeps its slice
// of the row in registers (forward: 32 elements per thread, backward: 16 of x and 16 of the
// gradient), so a row of up to G * 32 = 16384 (forward) or 8192 (backward) elements is read
// from memory once; longer rows take the same code re-reading each pass from global memory
// (L2). Statistics are two-pass (mean, then the sum of squared deviations) in float32 (float64
// for float64), as the CPU kernel.
//
// Rows may be strided: the leading dims (up to kMaxLead after merging) and one stride for the
// normalized elements are handled in the kernel; anything else (normalized dims that do not
// merge into one stride) is made contiguous first, one documented copy. Outputs are contiguous.
//
// Weight/bias gradients are deterministic, without atomics: LayerNorm/RMSNorm blocks keep
// per-column sums over the rows they visit in registers and write one fp32 partial row per
// block ([grid, N]); InstanceNorm writes one partial per row ([B, C]); a second small kernel
// sums the partial rows in a fixed order.
//
// Masked InstanceNorm normalizes each (sequence, feature) over the sequence's valid tokens: a
// block of 32 x 8 threads owns one sequence and 32 * 16 bytes of features; the 8 thread rows
// walk the tokens (Welford per thread, merged in a fixed order), then a second pass writes the
// output. Padded positions are never read and output 0.
#include "cuda_common.cuh"

namespace fused_pool {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

template <typename A>
A* mut_ptr_or_null(Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<A>() : nullptr;
}

__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float sqrt_acc(float v) { return ::sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return ::sqrt(v); }

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The kernels' 1 / sqrt(var + eps) in the accumulation type, for rows with nothing to reduce.
double empty_rstd(const Tensor& x, double eps) {
  if (x.scalar_type() == at::kDouble) return 1.0 / std::sqrt(eps);
  return static_cast<double>(1.0f / std::sqrt(static_cast<float>(eps)));
}

// Sums `v` over the G threads of a group (G a power of two, groups aligned to G inside the
// block); every thread of the group gets the same value. Groups wider than a warp meet in
// `red` (one slot per warp of the block). Every thread of the block must call it (it may
// __syncthreads); the order is fixed, so results are deterministic. Reduces two values at once.
template <typename A>
__device__ __forceinline__ void group_sum2(A& u, A& v, int G, A* red) {
  const int width = G < 32 ? G : 32;
  for (int o = width >> 1; o > 0; o >>= 1) {
    u += __shfl_xor_sync(kFullMask, u, o);
    v += __shfl_xor_sync(kFullMask, v, o);
  }
  if (G <= 32) return;
  const int warp = threadIdx.x >> 5, nw = G >> 5, first = (threadIdx.x / G) * nw;
  __syncthreads();  // `red` may still be read by a previous call
  if ((threadIdx.x & 31) == 0) {
    red[2 * warp] = u;
    red[2 * warp + 1] = v;
  }
  __syncthreads();
  u = A(0);
  v = A(0);
  for (int w = 0; w < nw; ++w) {
    u += red[2 * (first + w)];
    v += red[2 * (first + w) + 1];
  }
}

template <typename A>
__device__ __forceinline__ A group_sum(A u, int G, A* red) {
  A unused = A(0);
  group_sum2(u, unused, G, red);
  return u;
}

// out[n] = sum_p part[p * N + n] for p = 0 .. P-1, in a fixed order (deterministic).
// Block (32, 8): 32 columns, 8 rows of partials visited in turn, then summed in row order.
template <typename A>
__global__ void __launch_bounds__(256)
    sum_partials_kernel(const A* __restrict__ part, int64_t P, int64_t N, A* __restrict__ out) {
  __shared__ A sh[8][33];
  const int64_t n = int64_t(blockIdx.x) * 32 + threadIdx.x;
  A s = A(0);
  if (n < N) {
    for (int64_t p = threadIdx.y; p < P; p += 8) s += part[p * N + n];
  }
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && n < N) {
    A t = A(0);
#pragma unroll
    for (int q = 0; q < 8; ++q) t += sh[q][threadIdx.x];
    out[n] = t;
  }
}

// Sums the rows of the contiguous partial buffer `part` ([P, N], float or double) into [N].
Tensor sum_partials(const Tensor& part, int64_t P, int64_t N) {
  Tensor out = at::empty({N}, part.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(part.scalar_type(), "fused_pool_sum_partials", [&] {
    sum_partials_kernel<scalar_t><<<grid_dim(ceil_div(N, 32)), dim3(32, 8), 0, stream()>>>(
        part.const_data_ptr<scalar_t>(), P, N, out.mutable_data_ptr<scalar_t>());
    FP_CUDA_LAUNCH_CHECK();
  });
  return out;
}

// The gradient of an optional parameter from its partial sums: summed, in the parameter's
// dtype and shape.
Tensor param_grad(const Tensor& part, int64_t P, int64_t N, const Tensor& param) {
  return sum_partials(part, P, N).to(param.scalar_type()).view(param.sizes());
}

// ---------------------------------------------------------------------------------------------
// Row norms (LayerNorm, RMSNorm, InstanceNorm)
// ---------------------------------------------------------------------------------------------

constexpr int kMaxLead = 4;          // leading dims handled in the kernel (after merging)
constexpr int kMaxRowThreads = 512;  // largest group (and block)
constexpr int kFwdElems = 32;        // row elements a thread keeps in registers, forward
constexpr int kBwdElems = 16;        // ... backward (of x and of the gradient each)
// K = elements / kVec chunks per thread; 2-byte types have the most elements per chunk.
static_assert(kBwdElems / (16 / 2) >= 2 && kFwdElems >= kBwdElems,
              "row_launch assumes at least two 16-byte chunks per thread");

// Offset of row r of a tensor whose leading dims (merged, row-major) have these sizes and
// strides; 0 dims: a single row at offset 0.
struct RowIndex {
  int nd = 0;
  int64_t size[kMaxLead] = {};
  int64_t stride[kMaxLead] = {};

  __device__ int64_t offset(int64_t r) const {
    int64_t off = 0;
    for (int d = nd - 1; d > 0; --d) {
      off += (r % size[d]) * stride[d];
      r /= size[d];
    }
    return nd > 0 ? off + r * stride[0] : 0;
  }
};

// A tensor seen as rows: its leading `lead` dims index rows, the rest are the row's elements
// at stride sN.
struct Rows {
  Tensor t;
  RowIndex idx;
  int64_t sN = 1;
};

// Dims [lo, hi) of t as (size, stride) pairs, size-1 dims dropped and dims that are contiguous
// with each other merged (the row-major order of the indices is kept).
std::vector<std::pair<int64_t, int64_t>> merged_dims(const Tensor& t, int64_t lo, int64_t hi) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = lo; d < hi; ++d) {
    if (t.size(d) == 1) continue;
    if (!dims.empty() && dims.back().second == t.stride(d) * t.size(d)) {
      dims.back().first *= t.size(d);
      dims.back().second = t.stride(d);
    } else {
      dims.emplace_back(t.size(d), t.stride(d));
    }
  }
  return dims;
}

// t as rows, without a copy when its normalized dims merge into one stride and its leading dims
// into at most kMaxLead; otherwise a contiguous copy (the one documented copy of these ops).
Rows as_rows(const Tensor& t, int64_t lead) {
  auto inner = merged_dims(t, lead, t.dim());
  auto outer = merged_dims(t, 0, lead);
  Rows r;
  r.t = t;
  if (inner.size() > 1 || outer.size() > static_cast<size_t>(kMaxLead)) {
    r.t = t.contiguous();
    inner = merged_dims(r.t, lead, r.t.dim());
    outer = merged_dims(r.t, 0, lead);
  }
  r.sN = inner.empty() ? 1 : inner[0].second;
  r.idx.nd = static_cast<int>(outer.size());
  for (size_t d = 0; d < outer.size(); ++d) {
    r.idx.size[d] = outer[d].first;
    r.idx.stride[d] = outer[d].second;
  }
  return r;
}

// Whether 16-byte accesses are safe for rows of length N: unit element stride, aligned base,
// every leading stride and N (the row stride of the contiguous output) multiples of kVec.
template <typename T>
bool rows_vectorizable(const Rows& r, int64_t N) {
  if (!can_vectorize<T>(r.t.const_data_ptr(), r.sN, {N})) return false;
  for (int d = 0; d < r.idx.nd; ++d) {
    if (r.idx.stride[d] % kVec<T> != 0) return false;
  }
  return true;
}

// Launch shape of the row kernels: G threads per row, enough for two 16-byte chunks each (two
// loads in flight per thread, half the threads to reduce over), at most kMaxRowThreads; blocks
// of max(256, G) threads. Every kernel keeps at least 2 chunks per thread (K >= 2), so rows are
// cached whenever G < kMaxRowThreads.
struct RowLaunch {
  int G = 1, threads = 256, rows_per_block = 256;
};

template <typename T>
RowLaunch row_launch(int64_t N) {
  const int64_t chunks = ceil_div(N, kVec<T>);
  int G = 1;
  while (int64_t(2) * G < chunks && G < kMaxRowThreads) G *= 2;
  RowLaunch l;
  l.G = G;
  l.threads = G > 256 ? G : 256;
  l.rows_per_block = l.threads / G;
  return l;
}

// Arguments of the row kernels. Parameters are per column (C == 0: LayerNorm/RMSNorm, w[n]) or
// per row channel (C > 0: InstanceNorm rows (b, c), w[r % C]).
template <typename A>
struct RowArgs {
  int64_t M = 0, N = 0, C = 0;
  int G = 1;
  RowIndex xi, gi;  // rows of x, and of the gradient (backward)
  int64_t xsN = 1, gsN = 1;
  const A* w = nullptr;
  const A* b = nullptr;
  A* mean = nullptr;  // forward output / backward input; null for RMSNorm
  A* rstd = nullptr;  // forward output / backward input
  A eps = A(0);
  bool centered = true;  // LayerNorm/InstanceNorm: x - mean; RMSNorm: x
  A* part_w = nullptr;   // backward: [gridDim.x, N] (C == 0) or [M] (C > 0); null: not wanted
  A* part_b = nullptr;
};

// y = (x - mean) * rstd * w + b per row (mean = 0 when not centered), with mean and rstd
// = 1 / sqrt(mean((x - mean)^2) + eps) saved. Thread `lane` of a group holds chunks
// k * G + lane (k < K) of kVec elements of each tile of G * K * kVec elements.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kMaxRowThreads)
    row_norm_forward_kernel(const T* __restrict__ x, T* __restrict__ y, RowArgs<acc_t<T>> a) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  constexpr int K = kFwdElems / V;
  __shared__ A red[2 * kMaxRowThreads / 32];
  const int G = a.G, lane = threadIdx.x & (G - 1), group = threadIdx.x / G;
  const int R = blockDim.x / G;
  const int64_t N = a.N, tile = int64_t(G) * K * V;
  const bool cached = N <= tile;  // the whole row stays in registers
  const A n_acc = static_cast<A>(N);

  for (int64_t base = int64_t(blockIdx.x) * R; base < a.M; base += int64_t(gridDim.x) * R) {
    const int64_t row = base + group;
    const bool valid = row < a.M;  // invalid groups still take part in the reductions
    const T* xr = x + (valid ? a.xi.offset(row) : 0);
    T* yr = y + (valid ? row * N : 0);
    // Elements of chunk k of the tile at t0 this thread owns (0 past the row or for no row).
    auto count = [&](int64_t t0, int k) -> int {
      const int64_t e = t0 + int64_t(k * G + lane) * V;
      return valid && e < N ? static_cast<int>(min64(V, N - e)) : 0;
    };
    A c[K][V];
    auto load = [&](int64_t t0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        load_row<VEC>(xr, t0 + int64_t(k * G + lane) * V, a.xsN, count(t0, k), c[k]);
      }
    };

    A sum = A(0);
    for (int64_t t0 = 0; t0 < N; t0 += tile) {
      load(t0);  // elements past the row load as 0
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int i = 0; i < V; ++i) sum += c[k][i];
      }
    }
    A mu = A(0);
    if (a.centered) mu = group_sum(sum, G, red) / n_acc;

    A ss = A(0);
    for (int64_t t0 = 0; t0 < N; t0 += tile) {
      if (!cached) load(t0);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int n = count(t0, k);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const A d = c[k][i] - mu;
          if (i < n) ss += d * d;
        }
      }
    }
    ss = group_sum(ss, G, red);
    const A rs = A(1) / sqrt_acc(ss / n_acc + a.eps);

    // InstanceNorm: one channel per row.
    A scale = rs, shift = A(0);
    if (a.C > 0 && valid) {
      const int64_t ch = row % a.C;
      if (a.w != nullptr) scale = a.w[ch] * rs;
      if (a.b != nullptr) shift = a.b[ch];
    }
    for (int64_t t0 = 0; t0 < N; t0 += tile) {
      if (!cached) load(t0);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int n = count(t0, k);
        if (n == 0) continue;
        const int64_t e = t0 + int64_t(k * G + lane) * V;
        A out[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          if (a.C > 0) {
            out[i] = (c[k][i] - mu) * scale + shift;
          } else {
            A v = (c[k][i] - mu) * rs;
            if (i < n && a.w != nullptr) v *= a.w[e + i];
            if (i < n && a.b != nullptr) v += a.b[e + i];
            out[i] = v;
          }
        }
        store_row<VEC>(yr, e, n, out);
      }
    }
    if (valid && lane == 0) {
      if (a.mean != nullptr) a.mean[row] = mu;
      a.rstd[row] = rs;
    }
  }
}

// dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat)) with gh = g * w (the mean(gh) term only
// when centered); dw = sum_rows g * xhat, db = sum_rows g.
// Per-column parameters (C == 0): each group sums g * xhat and g of its columns over the rows
// it visits (registers, or its partial row in global memory for rows too long to cache), and
// the block writes one partial row. Per-row channels (C > 0): the row sums are the partials.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kMaxRowThreads)
    row_norm_backward_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ gx,
                             RowArgs<acc_t<T>> a) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  constexpr int K = kBwdElems / V;
  __shared__ A red[2 * kMaxRowThreads / 32];
  extern __shared__ __align__(16) unsigned char combine_smem[];  // [R, N] when R > 1
  const int G = a.G, lane = threadIdx.x & (G - 1), group = threadIdx.x / G;
  const int R = blockDim.x / G;
  const int64_t N = a.N, tile = int64_t(G) * K * V;
  const bool cached = N <= tile;
  const A n_acc = static_cast<A>(N);
  const bool per_col = a.C == 0;
  A* const pw = per_col ? a.part_w : nullptr;
  A* const pb = per_col ? a.part_b : nullptr;
  // Partial row of this block when rows are not cached (then R == 1: G is kMaxRowThreads).
  const int64_t slot = int64_t(blockIdx.x) * N;

  // Columns this thread owns in the tile at t0, chunk k (independent of the row).
  auto cols = [&](int64_t t0, int k) -> int {
    const int64_t e = t0 + int64_t(k * G + lane) * V;
    return e < N ? static_cast<int>(min64(V, N - e)) : 0;
  };

  A dw[K][V], db[K][V];
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int i = 0; i < V; ++i) dw[k][i] = db[k][i] = A(0);
  }
  if (!cached) {
    for (int64_t t0 = 0; t0 < N; t0 += tile) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t e = t0 + int64_t(k * G + lane) * V;
        const int n = cols(t0, k);
        for (int i = 0; i < n; ++i) {
          if (pw != nullptr) pw[slot + e + i] = A(0);
          if (pb != nullptr) pb[slot + e + i] = A(0);
        }
      }
    }
  }

  for (int64_t base = int64_t(blockIdx.x) * R; base < a.M; base += int64_t(gridDim.x) * R) {
    const int64_t row = base + group;
    const bool valid = row < a.M;
    const T* xr = x + (valid ? a.xi.offset(row) : 0);
    const T* gr = g + (valid ? a.gi.offset(row) : 0);
    T* gxr = gx + (valid ? row * N : 0);
    const A mu = valid && a.centered ? a.mean[row] : A(0);
    const A rs = valid ? a.rstd[row] : A(0);
    A wc = A(1);  // InstanceNorm: this row's channel weight
    if (!per_col && valid && a.w != nullptr) wc = a.w[row % a.C];
    auto count = [&](int64_t t0, int k) -> int { return valid ? cols(t0, k) : 0; };
    A cx[K][V], cg[K][V];
    auto load = [&](int64_t t0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t e = t0 + int64_t(k * G + lane) * V;
        const int n = count(t0, k);
        load_row<VEC>(xr, e, a.xsN, n, cx[k]);
        load_row<VEC>(gr, e, a.gsN, n, cg[k]);
      }
    };

    // sg = sum gh, sgx = sum gh * xhat (per column: gh = g * w[n]; per row: gh = g, the channel
    // weight is applied below), plus the weight/bias partials.
    A sg = A(0), sgx = A(0);
    for (int64_t t0 = 0; t0 < N; t0 += tile) {
      load(t0);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int n = count(t0, k);
        const int64_t e = t0 + int64_t(k * G + lane) * V;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          if (i >= n) continue;
          const A xh = (cx[k][i] - mu) * rs;
          const A gv = cg[k][i];
          const A gh = per_col && a.w != nullptr ? gv * a.w[e + i] : gv;
          sg += gh;
          sgx += gh * xh;
          if (cached) {
            dw[k][i] += gv * xh;
            db[k][i] += gv;
          } else {
            if (pw != nullptr) pw[slot + e + i] += gv * xh;
            if (pb != nullptr) pb[slot + e + i] += gv;
          }
        }
      }
    }
    group_sum2(sg, sgx, G, red);
    const A ca = a.centered ? wc * sg / n_acc : A(0);
    const A cb = wc * sgx / n_acc;

    for (int64_t t0 = 0; t0 < N; t0 += tile) {
      if (!cached) load(t0);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int n = count(t0, k);
        if (n == 0) continue;
        const int64_t e = t0 + int64_t(k * G + lane) * V;
        A out[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const A xh = (cx[k][i] - mu) * rs;
          A wv = wc;
          if (per_col && a.w != nullptr) wv = i < n ? a.w[e + i] : A(0);
          out[i] = rs * (cg[k][i] * wv - ca - xh * cb);
        }
        store_row<VEC>(gxr, e, n, out);
      }
    }
    if (!per_col && valid && lane == 0) {
      if (a.part_w != nullptr) a.part_w[row] = sgx;
      if (a.part_b != nullptr) a.part_b[row] = sg;
    }
  }

  // Cached per-column sums: one partial row per block. Groups of a block (R > 1, short rows)
  // are first summed in group order through shared memory.
  if (!cached) return;
  auto flush = [&](A(&acc)[K][V], A* part) {
    if (R == 1) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t e = int64_t(k * G + lane) * V;
        const int n = cols(0, k);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          if (i < n) part[slot + e + i] = acc[k][i];
        }
      }
      return;
    }
    A* buf = reinterpret_cast<A*>(combine_smem);
    __syncthreads();  // the previous flush has read buf
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t e = int64_t(k * G + lane) * V;
      const int n = cols(0, k);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (i < n) buf[group * N + e + i] = acc[k][i];
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < N; e += blockDim.x) {
      A s = A(0);
      for (int q = 0; q < R; ++q) s += buf[q * N + e];
      part[slot + e] = s;
    }
  };
  if (pw != nullptr) flush(dw, pw);
  if (pb != nullptr) flush(db, pb);
}

// Forward of a row norm: rows over x's first `lead` dims; `channels` > 0 for InstanceNorm
// (per-row parameters, C = channels). Returns y (contiguous, x's shape and dtype) and the
// statistics shaped x.shape[:lead] (mean undefined when not centered).
std::tuple<Tensor, Tensor, Tensor> row_norm_forward(const Tensor& x, int64_t lead, int64_t channels,
                                                    const OptTensor& weight, const OptTensor& bias,
                                                    double eps, bool centered) {
  TORCH_CHECK(x.is_cuda(), "fused_pool: x must be a CUDA tensor, got ", x.device());
  check_same_device(x, weight, "weight");
  check_same_device(x, bias, "bias");
  TORCH_CHECK(lead >= 0 && lead <= x.dim(), "fused_pool: normalized_ndim out of range for x of ",
              "shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stat_shape = x.sizes().slice(0, lead);
  const int64_t M = c10::multiply_integers(stat_shape);
  const int64_t N = c10::multiply_integers(x.sizes().slice(lead));
  const auto stat_opts = x.options().dtype(acc_scalar_type(x));
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor mean = centered ? at::empty(stat_shape, stat_opts) : Tensor();
  Tensor rstd = at::empty(stat_shape, stat_opts);
  if (M == 0) return {y, mean, rstd};
  if (N == 0) {  // nothing to normalize: mean 0, rstd 1 / sqrt(eps), as the CPU kernel
    if (centered) mean.zero_();
    rstd.fill_(empty_rstd(x, eps));
    return {y, mean, rstd};
  }
  const Tensor w = param_acc(weight, x), b = param_acc(bias, x);
  const Rows xr = as_rows(x, lead);
  FP_DISPATCH(x.scalar_type(), "fused_pool_row_norm_forward", [&] {
    using A = acc_t<scalar_t>;
    const RowLaunch l = row_launch<scalar_t>(N);
    RowArgs<A> a;
    a.M = M;
    a.N = N;
    a.C = channels;
    a.G = l.G;
    a.xi = xr.idx;
    a.xsN = xr.sN;
    a.w = ptr_or_null<A>(w);
    a.b = ptr_or_null<A>(b);
    a.mean = mut_ptr_or_null<A>(mean);
    a.rstd = rstd.mutable_data_ptr<A>();
    a.eps = static_cast<A>(eps);
    a.centered = centered;
    const int64_t blocks = ceil_div(M, l.rows_per_block);
    const unsigned grid = grid_dim(min64(blocks, int64_t(num_sms()) * 4 * (2048 / l.threads)));
    vec_switch(rows_vectorizable<scalar_t>(xr, N), [&](auto vec) {
      row_norm_forward_kernel<scalar_t, decltype(vec)::value><<<grid, l.threads, 0, stream()>>>(
          xr.t.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), a);
      FP_CUDA_LAUNCH_CHECK();
    });
  });
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> row_norm_backward(const Tensor& grad, const Tensor& x,
                                                     int64_t lead, int64_t channels,
                                                     const OptTensor& weight, const OptTensor& bias,
                                                     const Tensor& mean_in, const Tensor& rstd_in,
                                                     bool centered) {
  TORCH_CHECK(x.is_cuda(), "fused_pool: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(grad.device() == x.device(), "fused_pool: grad must be on ", x.device(),
              " like x, got ", grad.device());
  TORCH_CHECK(grad.sizes() == x.sizes(), "fused_pool: grad of shape ", grad.sizes(),
              " does not match x of shape ", x.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "fused_pool: grad dtype ", grad.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  check_same_device(x, weight, "weight");
  check_same_device(x, bias, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = c10::multiply_integers(x.sizes().slice(0, lead));
  const int64_t N = c10::multiply_integers(x.sizes().slice(lead));
  Tensor gx = at::empty(x.sizes(), x.options());
  Tensor gw = weight.has_value() ? Tensor() : x.new_zeros({0});
  Tensor gb = bias.has_value() ? Tensor() : x.new_zeros({0});
  if (M == 0 || N == 0) {
    if (weight.has_value()) gw = at::zeros(weight->sizes(), weight->options());
    if (bias.has_value()) gb = at::zeros(bias->sizes(), bias->options());
    return {gx, gw, gb};
  }
  const auto acc = acc_scalar_type(x);
  const Tensor rstd = rstd_in.contiguous();
  const Tensor mean = centered ? mean_in.contiguous() : Tensor();
  TORCH_CHECK(rstd.device() == x.device() && rstd.scalar_type() == acc && rstd.numel() == M,
              "fused_pool: rstd must be a ", acc, " tensor of ", M, " elements on ", x.device());
  if (centered) {
    TORCH_CHECK(mean.device() == x.device() && mean.scalar_type() == acc && mean.numel() == M,
                "fused_pool: mean must be a ", acc, " tensor of ", M, " elements on ", x.device());
  }
  const Tensor w = param_acc(weight, x);
  const Rows xr = as_rows(x, lead), gr = as_rows(grad, lead);
  const bool per_col = channels == 0;
  FP_DISPATCH(x.scalar_type(), "fused_pool_row_norm_backward", [&] {
    using A = acc_t<scalar_t>;
    const RowLaunch l = row_launch<scalar_t>(N);
    const int64_t blocks = ceil_div(M, l.rows_per_block);
    // One wave of resident blocks: each sums many rows, so the partial buffer stays small.
    const unsigned grid = grid_dim(min64(blocks, int64_t(num_sms()) * (2048 / l.threads)));
    const auto opts = x.options().dtype(acc);
    const int64_t part_rows = per_col ? int64_t(grid) : M;
    const int64_t part_cols = per_col ? N : 1;
    Tensor pw = weight.has_value() ? at::empty({part_rows, part_cols}, opts) : Tensor();
    Tensor pb = bias.has_value() ? at::empty({part_rows, part_cols}, opts) : Tensor();
    RowArgs<A> a;
    a.M = M;
    a.N = N;
    a.C = channels;
    a.G = l.G;
    a.xi = xr.idx;
    a.xsN = xr.sN;
    a.gi = gr.idx;
    a.gsN = gr.sN;
    a.w = ptr_or_null<A>(w);
    a.mean = centered ? const_cast<A*>(mean.const_data_ptr<A>()) : nullptr;
    a.rstd = const_cast<A*>(rstd.const_data_ptr<A>());
    a.centered = centered;
    a.part_w = mut_ptr_or_null<A>(pw);
    a.part_b = mut_ptr_or_null<A>(pb);
    const bool combine = per_col && l.rows_per_block > 1 && (pw.defined() || pb.defined());
    const size_t smem = combine ? size_t(l.rows_per_block) * N * sizeof(A) : 0;
    const bool vec = rows_vectorizable<scalar_t>(xr, N) && rows_vectorizable<scalar_t>(gr, N);
    vec_switch(vec, [&](auto v) {
      row_norm_backward_kernel<scalar_t, decltype(v)::value><<<grid, l.threads, smem, stream()>>>(
          gr.t.const_data_ptr<scalar_t>(), xr.t.const_data_ptr<scalar_t>(),
          gx.mutable_data_ptr<scalar_t>(), a);
      FP_CUDA_LAUNCH_CHECK();
    });
    // Per column: sum the block partials [grid, N]; per channel: sum rows (b, c) over b.
    const int64_t P = per_col ? int64_t(grid) : M / channels;
    const int64_t width = per_col ? N : channels;
    if (weight.has_value()) gw = param_grad(pw, P, width, *weight);
    if (bias.has_value()) gb = param_grad(pb, P, width, *bias);
  });
  return {gx, gw, gb};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_cuda(const Tensor& x, int64_t nd,
                                                   const OptTensor& weight, const OptTensor& bias,
                                                   double eps) {
  return row_norm_forward(x, x.dim() - nd, 0, weight, bias, eps, true);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cuda(const Tensor& grad, const Tensor& x,
                                                            int64_t nd, const OptTensor& weight,
                                                            const OptTensor& bias,
                                                            const Tensor& mean,
                                                            const Tensor& rstd) {
  return row_norm_backward(grad, x, x.dim() - nd, 0, weight, bias, mean, rstd, true);
}

std::tuple<Tensor, Tensor> rms_norm_cuda(const Tensor& x, int64_t nd, const OptTensor& weight,
                                         double eps) {
  auto [y, mean, rstd] = row_norm_forward(x, x.dim() - nd, 0, weight, std::nullopt, eps, false);
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_cuda(const Tensor& grad, const Tensor& x, int64_t nd,
                                                  const OptTensor& weight, const Tensor& rstd) {
  auto [gx, gw, gb] =
      row_norm_backward(grad, x, x.dim() - nd, 0, weight, std::nullopt, Tensor(), rstd, false);
  return {gx, gw};
}

std::tuple<Tensor, Tensor, Tensor> instance_norm_cuda(const Tensor& x, const OptTensor& weight,
                                                      const OptTensor& bias, double eps) {
  TORCH_CHECK(x.dim() >= 3, "fused_pool: instance_norm expects x [B, C, *], got ", x.sizes());
  return row_norm_forward(x, 2, std::max<int64_t>(x.size(1), 1), weight, bias, eps, true);
}

std::tuple<Tensor, Tensor, Tensor> instance_norm_backward_cuda(const Tensor& grad, const Tensor& x,
                                                               const OptTensor& weight,
                                                               const OptTensor& bias,
                                                               const Tensor& mean,
                                                               const Tensor& rstd) {
  TORCH_CHECK(x.dim() >= 3, "fused_pool: instance_norm expects x [B, C, *], got ", x.sizes());
  return row_norm_backward(grad, x, 2, std::max<int64_t>(x.size(1), 1), weight, bias, mean, rstd,
                           true);
}

// ---------------------------------------------------------------------------------------------
// Fused residual add: the row norms of s = x + residual.
// ---------------------------------------------------------------------------------------------

// s = x + residual in the accumulation type (never rounded to x's dtype before the norm).
Tensor residual_sum(const Tensor& x, const Tensor& residual) {
  check_residual(x, residual);
  const auto acc = acc_scalar_type(x);
  return x.to(acc).add(residual.to(acc));
}

Tensor add_sum_grad(const Tensor& gs, const OptTensor& grad_sum, const Tensor& x) {
  Tensor out = gs;
  if (grad_sum.has_value()) out = out.add(grad_sum->to(gs.scalar_type()));
  return out.to(x.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_cuda(
    const Tensor& x, const Tensor& residual, int64_t nd, const OptTensor& weight,
    const OptTensor& bias, double eps, bool return_residual) {
  const Tensor s = residual_sum(x, residual);
  auto [y, mean, rstd] = row_norm_forward(s, s.dim() - nd, 0, weight, bias, eps, true);
  Tensor out = return_residual ? s.to(x.scalar_type()) : at::empty({0}, x.options());
  return {y.to(x.scalar_type()), out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> add_layer_norm_backward_cuda(
    const Tensor& grad, const OptTensor& grad_sum, const Tensor& x, const Tensor& residual,
    int64_t nd, const OptTensor& weight, const OptTensor& bias, const Tensor& mean,
    const Tensor& rstd) {
  const Tensor s = residual_sum(x, residual);
  auto [gs, gw, gb] = row_norm_backward(grad.to(s.scalar_type()), s, s.dim() - nd, 0, weight,
                                        bias, mean, rstd, true);
  return {add_sum_grad(gs, grad_sum, x), gw, gb};
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_cuda(const Tensor& x, const Tensor& residual,
                                                     int64_t nd, const OptTensor& weight,
                                                     double eps, bool return_residual) {
  const Tensor s = residual_sum(x, residual);
  auto [y, mean, rstd] = row_norm_forward(s, s.dim() - nd, 0, weight, std::nullopt, eps, false);
  Tensor out = return_residual ? s.to(x.scalar_type()) : at::empty({0}, x.options());
  return {y.to(x.scalar_type()), out, rstd};
}

std::tuple<Tensor, Tensor> add_rms_norm_backward_cuda(const Tensor& grad,
                                                      const OptTensor& grad_sum, const Tensor& x,
                                                      const Tensor& residual, int64_t nd,
                                                      const OptTensor& weight,
                                                      const Tensor& rstd) {
  const Tensor s = residual_sum(x, residual);
  auto [gs, gw, gb] = row_norm_backward(grad.to(s.scalar_type()), s, s.dim() - nd, 0, weight,
                                        std::nullopt, Tensor(), rstd, false);
  return {add_sum_grad(gs, grad_sum, x), gw};
}

// ---------------------------------------------------------------------------------------------
// Masked InstanceNorm: per (sequence, feature) over the valid tokens; padded outputs are 0.
// ---------------------------------------------------------------------------------------------

constexpr int kTX = 32;  // threads along features (each kVec features)
constexpr int kTY = 8;   // threads along tokens

// Tokens of sequence b: offset of token 0 in x (`s`), the output row of token 0 (outputs are
// contiguous, x's shape), the number of token slots. Packed offsets are clamped to [0, T] so
// invalid cu_seqlens (unchecked under torch.compile) never index out of bounds.
struct SeqSpan {
  int64_t x0, row0, len;
};

__device__ __forceinline__ SeqSpan seq_span(const SeqLayout& s, int64_t b, int64_t rows) {
  if (!s.packed()) return {b * s.sB, b * s.L, s.L};
  const int64_t lo = min64(max64(s.cu(b), 0), rows);
  const int64_t hi = min64(max64(s.cu(b + 1), lo), rows);
  return {lo * s.sL, lo, hi - lo};
}

// Packed input: rows before cu[0] or from cu[B] on belong to no sequence (only with cu_seqlens
// that do not start at 0 / end at T); the first and last sequences' blocks write them as 0.
template <typename T, bool VEC>
__device__ void zero_uncovered_rows_dev(const SeqLayout& s, int64_t b, int64_t rows, T* out,
                                        int64_t d, int n) {
  if (!s.packed()) return;
  using A = acc_t<T>;
  A zero[kVec<T>];
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) zero[i] = A(0);
  if (b == 0) {
    const int64_t first = min64(max64(s.cu(0), 0), rows);
    for (int64_t r = threadIdx.y; r < first; r += kTY) store_row<VEC>(out + r * s.D, d, n, zero);
  }
  if (b == s.B - 1) {
    const int64_t last = min64(max64(s.cu(s.B), 0), rows);
    for (int64_t r = last + threadIdx.y; r < rows; r += kTY) {
      store_row<VEC>(out + r * s.D, d, n, zero);
    }
  }
}

// grid (B, feature blocks), block (kTX, kTY). Mean and variance by Welford per thread over
// every kTY-th valid token, merged over the kTY threads in order (Chan et al.); then
// y = (x - mean) * rstd * w + b at valid tokens and 0 at padded ones.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kTX* kTY)
    masked_instance_norm_forward_kernel(const T* __restrict__ x, T* __restrict__ y, SeqLayout s,
                                        int64_t rows, const acc_t<T>* __restrict__ w,
                                        const acc_t<T>* __restrict__ bias, acc_t<T>* mean,
                                        acc_t<T>* rstd, acc_t<T> eps) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ A sh_mean[kTY][kTX * V], sh_m2[kTY][kTX * V];
  __shared__ int64_t sh_n[kTY];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b = blockIdx.x;
  const int64_t d = (int64_t(blockIdx.y) * kTX + tx) * V;
  const int n = d < s.D ? static_cast<int>(min64(V, s.D - d)) : 0;
  const SeqSpan sp = seq_span(s, b, rows);

  int64_t cnt = 0;
  A m[V], q[V];
#pragma unroll
  for (int i = 0; i < V; ++i) m[i] = q[i] = A(0);
  for (int64_t j = ty; j < sp.len; j += kTY) {
    if (!s.valid(b, j)) continue;  // padded tokens are never read
    ++cnt;
    const A inv = A(1) / static_cast<A>(cnt);
    A v[V];
    load_row<VEC>(x + sp.x0 + j * s.sL, d, s.sD, n, v);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const A delta = v[i] - m[i];
      m[i] += delta * inv;
      q[i] += delta * (v[i] - m[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    sh_mean[ty][tx * V + i] = m[i];
    sh_m2[ty][tx * V + i] = q[i];
  }
  if (tx == 0) sh_n[ty] = cnt;
  __syncthreads();
  if (ty == 0) {
    int64_t na = sh_n[0];
    for (int t = 1; t < kTY; ++t) {
      const int64_t nb = sh_n[t];
      if (nb == 0) continue;
      const int64_t nab = na + nb;
      const A f = static_cast<A>(nb) / static_cast<A>(nab);
      const A fa = static_cast<A>(na) * f;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A delta = sh_mean[t][tx * V + i] - m[i];
        m[i] += delta * f;
        q[i] += sh_m2[t][tx * V + i] + delta * delta * fa;
      }
      na = nab;
    }
    const A denom = static_cast<A>(max64(na, 1));
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const A rs = A(1) / sqrt_acc(q[i] / denom + eps);
      sh_mean[0][tx * V + i] = m[i];
      sh_m2[0][tx * V + i] = rs;
      if (i < n) {
        mean[b * s.D + d + i] = m[i];
        rstd[b * s.D + d + i] = rs;
      }
    }
  }
  __syncthreads();
  A mu[V], scale[V], shift[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    mu[i] = sh_mean[0][tx * V + i];
    scale[i] = sh_m2[0][tx * V + i];
    shift[i] = A(0);
    if (i < n && w != nullptr) scale[i] *= w[d + i];
    if (i < n && bias != nullptr) shift[i] = bias[d + i];
  }
  if (n > 0) {
    for (int64_t j = ty; j < sp.len; j += kTY) {
      A out[V];
      if (s.valid(b, j)) {
        load_row<VEC>(x + sp.x0 + j * s.sL, d, s.sD, n, out);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          // (x - mean) first: folding the mean into the shift cancels badly when rstd is large.
          out[i] = (out[i] - mu[i]) * scale[i] + shift[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = A(0);
      }
      store_row<VEC>(y + (sp.row0 + j) * s.D, d, n, out);
    }
    zero_uncovered_rows_dev<T, VEC>(s, b, rows, y, d, n);
  }
}

// dx = rstd * (w g - w mean(g) - xhat * w mean(g xhat)) over valid tokens, 0 at padded ones;
// the per-(sequence, feature) sums of g xhat and g are the weight/bias partials [B, D].
template <typename T, bool VEC>
__global__ void __launch_bounds__(kTX* kTY)
    masked_instance_norm_backward_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                         T* __restrict__ gx, SeqLayout s, SeqLayout gs,
                                         int64_t rows, const acc_t<T>* __restrict__ w,
                                         const acc_t<T>* __restrict__ mean,
                                         const acc_t<T>* __restrict__ rstd, acc_t<T>* part_w,
                                         acc_t<T>* part_b) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ A sh_g[kTY][kTX * V], sh_gx[kTY][kTX * V];
  __shared__ int64_t sh_n[kTY];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b = blockIdx.x;
  const int64_t d = (int64_t(blockIdx.y) * kTX + tx) * V;
  const int n = d < s.D ? static_cast<int>(min64(V, s.D - d)) : 0;
  const SeqSpan sp = seq_span(s, b, rows);
  const int64_t g0 = s.packed() ? sp.row0 * gs.sL : b * gs.sB;

  A mu[V], rs[V], wv[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    mu[i] = i < n ? mean[b * s.D + d + i] : A(0);
    rs[i] = i < n ? rstd[b * s.D + d + i] : A(0);
    wv[i] = i < n && w != nullptr ? w[d + i] : A(1);
  }
  int64_t cnt = 0;
  A sg[V], sgx[V];
#pragma unroll
  for (int i = 0; i < V; ++i) sg[i] = sgx[i] = A(0);
  for (int64_t j = ty; j < sp.len; j += kTY) {
    if (!s.valid(b, j)) continue;
    ++cnt;
    A xv[V], gv[V];
    load_row<VEC>(x + sp.x0 + j * s.sL, d, s.sD, n, xv);
    load_row<VEC>(g + g0 + j * gs.sL, d, gs.sD, n, gv);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      sg[i] += gv[i];
      sgx[i] += gv[i] * ((xv[i] - mu[i]) * rs[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    sh_g[ty][tx * V + i] = sg[i];
    sh_gx[ty][tx * V + i] = sgx[i];
  }
  if (tx == 0) sh_n[ty] = cnt;
  __syncthreads();
  if (ty == 0) {
    int64_t total = 0;
    for (int t = 0; t < kTY; ++t) total += sh_n[t];
    const A denom = static_cast<A>(max64(total, 1));
#pragma unroll
    for (int i = 0; i < V; ++i) {
      A tg = A(0), tgx = A(0);
      for (int t = 0; t < kTY; ++t) {
        tg += sh_g[t][tx * V + i];
        tgx += sh_gx[t][tx * V + i];
      }
      if (i < n) {
        if (part_w != nullptr) part_w[b * s.D + d + i] = tgx;
        if (part_b != nullptr) part_b[b * s.D + d + i] = tg;
      }
      sh_g[0][tx * V + i] = wv[i] * tg / denom;
      sh_gx[0][tx * V + i] = wv[i] * tgx / denom;
    }
  }
  __syncthreads();
  if (n == 0) return;
  A ca[V], cb[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    ca[i] = sh_g[0][tx * V + i];
    cb[i] = sh_gx[0][tx * V + i];
  }
  for (int64_t j = ty; j < sp.len; j += kTY) {
    A out[V];
    if (s.valid(b, j)) {
      A xv[V];
      load_row<VEC>(x + sp.x0 + j * s.sL, d, s.sD, n, xv);
      load_row<VEC>(g + g0 + j * gs.sL, d, gs.sD, n, out);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xh = (xv[i] - mu[i]) * rs[i];
        out[i] = rs[i] * (wv[i] * out[i] - ca[i] - xh * cb[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = A(0);
    }
    store_row<VEC>(gx + (sp.row0 + j) * s.D, d, n, out);
  }
  zero_uncovered_rows_dev<T, VEC>(s, b, rows, gx, d, n);
}

template <typename T>
dim3 masked_grid(const SeqLayout& s) {
  const int64_t fblocks = ceil_div(s.D, int64_t(kTX) * kVec<T>);
  TORCH_CHECK(s.B <= kMaxGridX && fblocks <= kMaxGridYZ,
              "fused_pool: masked_instance_norm: ", "too many sequences (", s.B, ") or features (",
              s.D, ") for one launch");
  return dim3(static_cast<unsigned>(s.B), static_cast<unsigned>(fblocks));
}

std::tuple<Tensor, Tensor, Tensor> masked_instance_norm_cuda(const Tensor& x, const OptTensor& mask,
                                                             const OptTensor& cu_seqlens,
                                                             const OptTensor& weight,
                                                             const OptTensor& bias, double eps) {
  TORCH_CHECK(x.is_cuda(), "fused_pool: x must be a CUDA tensor, got ", x.device());
  check_same_device(x, weight, "weight");
  check_same_device(x, bias, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor cu_keep;
  const SeqLayout s = make_layout(x, mask, cu_seqlens, &cu_keep);
  const int64_t rows = s.packed() ? x.size(0) : 0;
  const auto stat_opts = x.options().dtype(acc_scalar_type(x));
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor mean = at::empty({s.B, s.D}, stat_opts);
  Tensor rstd = at::empty({s.B, s.D}, stat_opts);
  if (s.D == 0) return {y, mean, rstd};
  if (s.B == 0) {  // packed rows that no sequence covers are 0
    if (y.numel() > 0) y.zero_();
    return {y, mean, rstd};
  }
  const Tensor w = param_acc(weight, x), bb = param_acc(bias, x);
  FP_DISPATCH(x.scalar_type(), "fused_pool_masked_instance_norm", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool vec = can_vectorize<scalar_t>(xp, s.sD, {s.sB, s.sL, s.D});
    vec_switch(vec, [&](auto v) {
      masked_instance_norm_forward_kernel<scalar_t, decltype(v)::value>
          <<<masked_grid<scalar_t>(s), dim3(kTX, kTY), 0, stream()>>>(
              xp, y.mutable_data_ptr<scalar_t>(), s, rows, ptr_or_null<A>(w), ptr_or_null<A>(bb),
              mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), static_cast<A>(eps));
      FP_CUDA_LAUNCH_CHECK();
    });
  });
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> masked_instance_norm_backward_cuda(
    const Tensor& grad, const Tensor& x, const OptTensor& mask, const OptTensor& cu_seqlens,
    const OptTensor& weight, const OptTensor& bias, const Tensor& mean_in, const Tensor& rstd_in) {
  TORCH_CHECK(x.is_cuda(), "fused_pool: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(grad.device() == x.device(), "fused_pool: grad must be on ", x.device(),
              " like x, got ", grad.device());
  TORCH_CHECK(grad.sizes() == x.sizes(), "fused_pool: grad of shape ", grad.sizes(),
              " does not match x of shape ", x.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "fused_pool: grad dtype ", grad.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  check_same_device(x, weight, "weight");
  check_same_device(x, bias, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor cu_keep, cu_keep_g;
  const SeqLayout s = make_layout(x, mask, cu_seqlens, &cu_keep);
  const SeqLayout gs = make_layout(grad, mask, cu_seqlens, &cu_keep_g);
  const int64_t rows = s.packed() ? x.size(0) : 0;
  Tensor gx = at::empty(x.sizes(), x.options());
  Tensor gw = weight.has_value() ? Tensor() : x.new_zeros({0});
  Tensor gb = bias.has_value() ? Tensor() : x.new_zeros({0});
  if (s.D == 0 || s.B == 0) {
    if (s.D > 0 && gx.numel() > 0) gx.zero_();  // packed rows no sequence covers
    if (weight.has_value()) gw = at::zeros(weight->sizes(), weight->options());
    if (bias.has_value()) gb = at::zeros(bias->sizes(), bias->options());
    return {gx, gw, gb};
  }
  const auto acc = acc_scalar_type(x);
  const Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  for (const Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == acc && t->numel() == s.B * s.D,
                "fused_pool: masked_instance_norm_backward: mean/rstd must be ", acc,
                " tensors of shape [", s.B, ", ", s.D, "] on ", x.device());
  }
  const Tensor w = param_acc(weight, x);
  Tensor pw = weight.has_value() ? at::empty({s.B, s.D}, x.options().dtype(acc)) : Tensor();
  Tensor pb = bias.has_value() ? at::empty({s.B, s.D}, x.options().dtype(acc)) : Tensor();
  FP_DISPATCH(x.scalar_type(), "fused_pool_masked_instance_norm_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const bool vec = can_vectorize<scalar_t>(xp, s.sD, {s.sB, s.sL, s.D}) &&
                     can_vectorize<scalar_t>(gp, gs.sD, {gs.sB, gs.sL});
    vec_switch(vec, [&](auto v) {
      masked_instance_norm_backward_kernel<scalar_t, decltype(v)::value>
          <<<masked_grid<scalar_t>(s), dim3(kTX, kTY), 0, stream()>>>(
              gp, xp, gx.mutable_data_ptr<scalar_t>(), s, gs, rows, ptr_or_null<A>(w),
              mean.const_data_ptr<A>(), rstd.const_data_ptr<A>(), mut_ptr_or_null<A>(pw),
              mut_ptr_or_null<A>(pb));
      FP_CUDA_LAUNCH_CHECK();
    });
  });
  if (weight.has_value()) gw = param_grad(pw, s.B, s.D, *weight);
  if (bias.has_value()) gb = param_grad(pb, s.B, s.D, *bias);
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool_cpp, CUDA, m) {
  m.impl("layer_norm", &layer_norm_cuda);
  m.impl("layer_norm_backward", &layer_norm_backward_cuda);
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
  m.impl("add_layer_norm", &add_layer_norm_cuda);
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("add_rms_norm_backward", &add_rms_norm_backward_cuda);
  m.impl("instance_norm", &instance_norm_cuda);
  m.impl("instance_norm_backward", &instance_norm_backward_cuda);
  m.impl("masked_instance_norm", &masked_instance_norm_cuda);
  m.impl("masked_instance_norm_backward", &masked_instance_norm_backward_cuda);
}

}  // namespace cuda
}  // namespace fused_pool
