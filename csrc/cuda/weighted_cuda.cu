// CUDA kernels of the weighted pooling operators: attention_pool, weighted_layer_pool,
// weighted_layer_mean (see fused_pool/_schema.py for the contract,
// fused_pool/backends/reference/weighted.py for the formulas and csrc/cpu/weighted_cpu.cpp for
// the CPU twin).
//
// Kernel shapes as in pool_cuda.cu (their helpers are in cuda_common.cuh): a block per
// (sequence, feature chunk) for the attention and weighted_layer_mean forwards and the
// weighted_layer_mean backward; a warp per row for weighted_layer_pool, its backward and the
// first pass of the attention backward; a block per (sequence, head) for its second pass.
// Nothing synchronizes with the host: grids depend on shapes only, cu_seqlens and the layer
// weights stay on the device. Weight gradients are summed from per-block partials in block
// order: deterministic, no atomics.
#include "cuda_common.cuh"

namespace fused_pool {
namespace cuda {
namespace {

constexpr int kMaxLayers = 16;  // layers per launch of the weighted-layer kernels
constexpr int64_t kMaxPartialBlocks = 1024;

// ---------------------------------------------------------------------------------------------
// Softmax numerics in the accumulation type
// ---------------------------------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ A pos_inf() {
  return std::numeric_limits<A>::infinity();
}

__device__ __forceinline__ float exp_acc(float v) { return ::expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return ::exp(v); }
__device__ __forceinline__ float log_acc(float v) { return ::logf(v); }
__device__ __forceinline__ double log_acc(double v) { return ::log(v); }

// ---------------------------------------------------------------------------------------------
// attention_pool: softmax over valid tokens of scores[b, :, h], applied to the head's features,
// in one pass with an online softmax (running max m, running sum l, rescaled accumulators) per
// warp, merged across warps at the end. Head h owns features [h * Dh, (h + 1) * Dh).
// Scores are read in the accumulation type (converted once on the host side, a small tensor).
// A score of -inf contributes weight 0 (torch.softmax), all -inf gives NaN like torch; NaN
// propagates.
// ---------------------------------------------------------------------------------------------
template <typename A>
struct Online {
  A m, l;
  // Folds in a score v; returns (rescale of the previous accumulators, weight of v).
  __device__ __forceinline__ void add(A v, A* scale, A* p) {
    const A mnew = v > m ? v : m;  // a NaN score keeps m and yields p = NaN below
    *scale = m == -pos_inf<A>() ? A(0) : exp_acc(m - mnew);
    *p = v == -pos_inf<A>() ? A(0) : exp_acc(v - mnew);
    l = l * *scale + *p;
    m = mnew;
  }
};

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    attention_kernel(const T* __restrict__ x, SeqLayout s, const acc_t<T>* __restrict__ sc,
                     SeqLayout ss, int64_t Dh, int64_t nchunk, T* __restrict__ out,
                     acc_t<T>* __restrict__ lse) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t b = blockIdx.x / nchunk, chunk = blockIdx.x % nchunk;
  const int64_t d = lane_feature<T>(chunk);
  const int n = lane_count(d, s.D, V);
  const int64_t H = s.D / Dh;
  // All V features of this lane in one head (the common case): one exp per token, not V.
  const bool one_head = Dh % V == 0;
  const int64_t len = s.len(b), base = s.start(b), sbase = ss.start(b);
  int64_t head[V];
#pragma unroll
  for (int k = 0; k < V; ++k) head[k] = std::min<int64_t>((d + k) / Dh, H - 1);

  Online<A> st[V];
  A accum[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    st[k].m = -pos_inf<A>();
    st[k].l = A(0);
    accum[k] = A(0);
  }
  int64_t cnt = 0;
  for (int64_t j0 = threadIdx.y; j0 < len; j0 += int64_t(kTy) * kUnroll) {
    A v[kUnroll][V];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + int64_t(u) * kTy;
      ok[u] = j < len && s.valid(b, j) && n > 0;
      if (ok[u]) load_row<VEC>(x + base + j * s.sL, d, s.sD, n, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;
      const int64_t j = j0 + int64_t(u) * kTy;
      ++cnt;
      A scale0 = A(0), p0 = A(0);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k >= n) break;
        A scale, p;
        if (k == 0 || !one_head) {
          st[k].add(sc[sbase + j * ss.sL + head[k] * ss.sD], &scale, &p);
          scale0 = scale;
          p0 = p;
        } else {
          st[k] = st[0];
          scale = scale0;
          p = p0;
        }
        accum[k] = accum[k] * scale + p * v[u][k];
      }
    }
  }

  constexpr int W = kTx * V;
  __shared__ int64_t sh_cnt[kTy];
  __shared__ A sh_m[kTy][W], sh_l[kTy][W], sh_acc[kTy][W];
  const int f = threadIdx.x * V;
  if (threadIdx.x == 0) sh_cnt[threadIdx.y] = cnt;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sh_m[threadIdx.y][f + k] = st[k].m;
    sh_l[threadIdx.y][f + k] = st[k].l;
    sh_acc[threadIdx.y][f + k] = accum[k];
  }
  __syncthreads();
  if (threadIdx.y != 0 || n == 0) return;
  int64_t total = 0;
  for (int t = 0; t < kTy; ++t) total += sh_cnt[t];
  for (int k = 0; k < V; ++k) {
    if (k >= n) break;
    A m = -pos_inf<A>(), l = A(0), a = A(0);
    for (int t = 0; t < kTy; ++t) {
      if (sh_cnt[t] == 0) continue;
      const A m2 = sh_m[t][f + k];
      const A mm = m2 > m ? m2 : m;
      const A s1 = m == -pos_inf<A>() ? A(0) : exp_acc(m - mm);
      const A s2 = m2 == -pos_inf<A>() ? A(0) : exp_acc(m2 - mm);
      l = l * s1 + sh_l[t][f + k] * s2;
      a = a * s1 + sh_acc[t][f + k] * s2;
      m = mm;
    }
    out[b * s.D + d + k] = total > 0 ? static_cast<T>(a / l) : T(0);
    if ((d + k) % Dh == 0) {
      lse[b * H + head[k]] = total > 0 ? m + log_acc(l) : -pos_inf<A>();
    }
  }
}

std::tuple<Tensor, Tensor> attention_pool_cuda(const Tensor& x, const Tensor& scores_in,
                                               const OptTensor& mask,
                                               const OptTensor& cu_seqlens) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(scores_in.device() == x.device(), "attention_pool: scores must be on ", x.device());
  const auto acc_type = acc_scalar_type(x);
  const Tensor scores = scores_in.to(acc_type);
  Tensor cu, cu_s;  // keep the contiguous cu_seqlens alive until the launches
  const SeqLayout s = make_layout(x, mask, cu_seqlens, &cu);
  const SeqLayout ss = make_layout(scores, mask, cu_seqlens, &cu_s);  // sD: stride over heads
  const int64_t H = scores.size(-1);
  TORCH_CHECK(H >= 1 && s.D % H == 0, "attention_pool: D = ", s.D, " is not divisible by H = ", H);
  Tensor out = at::empty({s.B, s.D}, x.options());
  Tensor lse = at::empty({s.B, H}, x.options().dtype(acc_type));
  if (out.numel() == 0) return {out, lse};
  const int64_t Dh = s.D / H;
  FP_DISPATCH(x.scalar_type(), "fused_pool_cuda_attention", [&] {
    using A = acc_t<scalar_t>;
    int64_t nchunk;
    const int64_t blocks = pool_blocks<scalar_t>(s.B, s.D, &nchunk);
    const bool vec = can_vectorize<scalar_t>(x.const_data_ptr(), s.sD, {s.sB, s.sL});
    vec_switch(vec, [&](auto v) {
      attention_kernel<scalar_t, decltype(v)::value>
          <<<grid_dim(blocks), dim3(kTx, kTy), 0, stream()>>>(
              x.const_data_ptr<scalar_t>(), s, scores.const_data_ptr<A>(), ss, Dh, nchunk,
              out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<A>());
      FP_CUDA_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

// Backward, pass 1 (one warp per (row, head)): p = exp(s - lse),
//   gx[t]_h = p * g_h,  c[t, h] = <g_h, x[t]_h>  (stored in the scores-gradient buffer).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    attention_bwd_rows_kernel(const T* __restrict__ grad, const T* __restrict__ x, SeqLayout s,
                              const acc_t<T>* __restrict__ sc, SeqLayout ss,
                              const acc_t<T>* __restrict__ lse, int64_t H, int64_t rows,
                              T* __restrict__ gx, acc_t<T>* __restrict__ cbuf) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t item = int64_t(blockIdx.x) * kTy + threadIdx.y;
  if (item >= rows * H) return;
  const int64_t r = item / H, h = item % H, D = s.D, Dh = D / H;
  int64_t b, j;
  locate_row(s, r, &b, &j);
  const bool valid = b >= 0 && s.valid(b, j);
  T* grow = gx + r * D + h * Dh;
  A p = A(0);
  if (valid) p = exp_acc(sc[ss.start(b) + j * ss.sL + h * ss.sD] - lse[b * H + h]);
  const T* xrow = x + (valid ? s.start(b) + j * s.sL : 0) + h * Dh * s.sD;
  const T* grow_in = grad + (b >= 0 ? b : 0) * D + h * Dh;
  A dot = A(0);
  for (int64_t e = int64_t(threadIdx.x) * V; e < Dh; e += int64_t(kTx) * V) {
    const int n = lane_count(e, Dh, V);
    A gv[V], xv[V], o[V];
    if (valid) {
      load_row<VEC>(grow_in, e, 1, n, gv);
      load_row<VEC>(xrow, e, s.sD, n, xv);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (valid) {
        dot += gv[k] * xv[k];
        o[k] = static_cast<A>(static_cast<T>(p * gv[k]));
      } else {
        o[k] = A(0);
      }
    }
    store_row<VEC>(grow, e, n, o);
  }
  dot = warp_sum(dot);
  if (threadIdx.x == 0 && b >= 0) {
    cbuf[r * H + h] = valid ? dot : A(0);
  }
}

// Backward, pass 2 (one block per (b, h)): delta = sum_u p_u c_u, then
//   grad_s[t, h] = p_t (c_t - delta) for valid t, 0 otherwise (in place over c).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    attention_bwd_scores_kernel(const A* __restrict__ sc, SeqLayout ss,
                                const A* __restrict__ lse, SeqLayout gs_layout, int64_t H,
                                A* __restrict__ gs) {
  __shared__ A smem[32];
  const int64_t b = blockIdx.x / H, h = blockIdx.x % H;
  const int64_t len = ss.len(b), sb = ss.start(b) + h * ss.sD;
  const int64_t gb = gs_layout.start(b) + h * gs_layout.sD;
  const A l = lse[b * H + h];
  A part = A(0);
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    if (ss.valid(b, j)) part += exp_acc(sc[sb + j * ss.sL] - l) * gs[gb + j * gs_layout.sL];
  }
  const A delta = block_sum(part, smem);
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    A out = A(0);
    if (ss.valid(b, j)) out = exp_acc(sc[sb + j * ss.sL] - l) * (gs[gb + j * gs_layout.sL] - delta);
    gs[gb + j * gs_layout.sL] = out;
  }
}

std::tuple<Tensor, Tensor> attention_pool_backward_cuda(const Tensor& grad_in, const Tensor& x,
                                                        const Tensor& scores_in,
                                                        const OptTensor& mask,
                                                        const OptTensor& cu_seqlens,
                                                        const Tensor& out, const Tensor& lse_in) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc_type = acc_scalar_type(x);
  const Tensor grad = grad_in.contiguous(), lse = lse_in.to(acc_type).contiguous();
  const Tensor scores = scores_in.to(acc_type);
  Tensor cu, cu_s, cu_g;  // keep the contiguous cu_seqlens alive until the launches
  const SeqLayout s = make_layout(x, mask, cu_seqlens, &cu);
  const SeqLayout ss = make_layout(scores, mask, cu_seqlens, &cu_s);
  const int64_t H = scores.size(-1);
  TORCH_CHECK(H >= 1 && s.D % H == 0, "attention_pool: D = ", s.D, " is not divisible by H = ", H);
  const int64_t rows = cu_seqlens.has_value() ? x.size(0) : s.B * s.L;
  Tensor gx = at::empty(x.sizes(), x.options());
  // c, then the score gradient, in the accumulation type; cast to the scores' dtype at the end.
  // Zeroed: rows no sequence covers keep 0.
  Tensor gs =
      at::zeros(scores.sizes(), scores.options().memory_format(at::MemoryFormat::Contiguous));
  const SeqLayout gsl = make_layout(gs, mask, cu_seqlens, &cu_g);
  if (gx.numel() > 0) {
    FP_DISPATCH(x.scalar_type(), "fused_pool_cuda_attention_backward", [&] {
      using A = acc_t<scalar_t>;
      const int64_t Dh = s.D / H;
      const bool vec = Dh % kVec<scalar_t> == 0 &&
                       can_vectorize<scalar_t>(x.const_data_ptr(), s.sD, {s.sB, s.sL}) &&
                       can_vectorize<scalar_t>(grad.const_data_ptr(), 1, {s.D});
      TORCH_CHECK(ceil_div(rows * H, kTy) <= kMaxGridX, "attention_pool: too many rows");
      vec_switch(vec, [&](auto v) {
        attention_bwd_rows_kernel<scalar_t, decltype(v)::value>
            <<<grid_dim(ceil_div(rows * H, kTy)), dim3(kTx, kTy), 0, stream()>>>(
                grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), s,
                scores.const_data_ptr<A>(), ss, lse.const_data_ptr<A>(), H, rows,
                gx.mutable_data_ptr<scalar_t>(), gs.mutable_data_ptr<A>());
        FP_CUDA_LAUNCH_CHECK();
      });
      attention_bwd_scores_kernel<A><<<grid_dim(s.B * H), kThreads, 0, stream()>>>(
          scores.const_data_ptr<A>(), ss, lse.const_data_ptr<A>(), gsl, H,
          gs.mutable_data_ptr<A>());
      FP_CUDA_LAUNCH_CHECK();
    });
  }
  (void)out;
  return {gx, gs.to(scores_in.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Weighted layers: out = sum_i (w_i / S) layers[i]; the layer list is passed to kernels by value
// in chunks of kMaxLayers (pointers and strides), never stacked.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct LayerTable {
  const T* x[kMaxLayers];
  T* g[kMaxLayers];  // gradients (contiguous [B, L, D]); unused by forwards
  int64_t sB[kMaxLayers], sL[kMaxLayers], sD[kMaxLayers];
  int n;       // layers in this chunk
  int first;   // index of layer 0 of this chunk in the full list
};

template <typename T>
LayerTable<T> layer_table(const std::vector<Tensor>& layers, std::vector<Tensor>* grads,
                          int64_t first, bool* vec) {
  LayerTable<T> t{};
  t.first = static_cast<int>(first);
  t.n = static_cast<int>(std::min<int64_t>(kMaxLayers, layers.size() - first));
  for (int i = 0; i < t.n; ++i) {
    const Tensor& h = layers[first + i];
    t.x[i] = h.const_data_ptr<T>();
    t.g[i] = grads ? (*grads)[first + i].mutable_data_ptr<T>() : nullptr;
    t.sB[i] = h.stride(0);
    t.sL[i] = h.stride(1);
    t.sD[i] = h.stride(2);
    *vec = *vec && can_vectorize<T>(h.const_data_ptr(), h.stride(2), {h.stride(0), h.stride(1)});
  }
  return t;
}

// wn[i] = w[i] / S, wn[N] = S, summed in order in one thread (as the CPU kernel).
template <typename A>
__global__ void normalize_weights_kernel(const A* __restrict__ w, int64_t N, A* __restrict__ wn) {
  A total = A(0);
  for (int64_t i = 0; i < N; ++i) total += w[i];
  for (int64_t i = 0; i < N; ++i) wn[i] = w[i] / total;
  wn[N] = total;
}

// c[i] = sum over blocks of partial[blk, i] (one block per layer, fixed-order tree).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(const A* __restrict__ partial, int64_t nblocks, int64_t N,
                      A* __restrict__ c) {
  __shared__ A smem[32];
  const int64_t i = blockIdx.x;
  A v = A(0);
  for (int64_t t = threadIdx.x; t < nblocks; t += blockDim.x) v += partial[t * N + i];
  v = block_sum(v, smem);
  if (threadIdx.x == 0) c[i] = v;
}

// gw[j] = (c_j - sum_i wn_i c_i) / S.
template <typename A>
__global__ void weights_grad_kernel(const A* __restrict__ c, const A* __restrict__ wn, int64_t N,
                                    A* __restrict__ gw) {
  A dot = A(0);
  for (int64_t i = 0; i < N; ++i) dot += wn[i] * c[i];
  for (int64_t i = 0; i < N; ++i) gw[i] = (c[i] - dot) / wn[N];
}

// Normalized weights (acc type, [N + 1] with S last) of `weights` on the device.
Tensor normalized_weights(const Tensor& weights, at::ScalarType acc_type) {
  const Tensor w = weights.to(acc_type).contiguous();
  const int64_t N = w.numel();
  Tensor wn = at::empty({N + 1}, w.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "fused_pool_cuda_normalize_weights", [&] {
    normalize_weights_kernel<scalar_t><<<1, 1, 0, stream()>>>(w.const_data_ptr<scalar_t>(), N,
                                                               wn.mutable_data_ptr<scalar_t>());
    FP_CUDA_LAUNCH_CHECK();
  });
  return wn;
}

// The weight gradient from per-block partials [nblocks, N] of c_i, in the weights' dtype.
Tensor weights_grad(const Tensor& partial, int64_t nblocks, const Tensor& wn,
                    const Tensor& weights) {
  const int64_t N = wn.numel() - 1;
  Tensor c = at::empty({N}, wn.options());
  Tensor gw = at::empty({N}, wn.options());
  AT_DISPATCH_FLOATING_TYPES(wn.scalar_type(), "fused_pool_cuda_weights_grad", [&] {
    if (N > 0) {
      column_sum_kernel<scalar_t><<<grid_dim(N), kThreads, 0, stream()>>>(
          partial.const_data_ptr<scalar_t>(), nblocks, N, c.mutable_data_ptr<scalar_t>());
      FP_CUDA_LAUNCH_CHECK();
    }
    weights_grad_kernel<scalar_t><<<1, 1, 0, stream()>>>(
        c.const_data_ptr<scalar_t>(), wn.const_data_ptr<scalar_t>(), N,
        gw.mutable_data_ptr<scalar_t>());
    FP_CUDA_LAUNCH_CHECK();
  });
  return gw.to(weights.scalar_type());
}

std::vector<Tensor> check_layers(at::TensorList layers_in, const Tensor& weights,
                                 const char* op) {
  const std::vector<Tensor> layers(layers_in.begin(), layers_in.end());
  TORCH_CHECK(!layers.empty(), op, ": no layers");
  check_cuda(layers[0], "layers");
  for (const Tensor& h : layers) {
    TORCH_CHECK(h.device() == layers[0].device() && h.dim() == 3 &&
                    h.sizes() == layers[0].sizes() && h.scalar_type() == layers[0].scalar_type(),
                op, ": layers must be [B, L, D] tensors of one shape, dtype and device");
  }
  TORCH_CHECK(weights.device() == layers[0].device() && weights.numel() == int64_t(layers.size()),
              op, ": weights must be a [N] tensor on ", layers[0].device());
  return layers;
}

// Forward of weighted_layer_pool over rows (one warp per (b, j) row). With more than kMaxLayers
// layers, chunks accumulate in an acc-typed workspace (first: starts from 0; last: writes out).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    layer_pool_kernel(const __grid_constant__ LayerTable<T> t, const acc_t<T>* __restrict__ wn,
                      int64_t L, int64_t D, int64_t rows, acc_t<T>* __restrict__ ws, bool first,
                      bool last, T* __restrict__ out) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t r = int64_t(blockIdx.x) * kTy + threadIdx.y;
  if (r >= rows) return;
  const int64_t b = r / L, j = r % L;
  for (int64_t d = int64_t(threadIdx.x) * V; d < D; d += int64_t(kTx) * V) {
    const int n = lane_count(d, D, V);
    A a[V];
#pragma unroll
    for (int k = 0; k < V; ++k) a[k] = (first || k >= n) ? A(0) : ws[r * D + d + k];
    // Not unrolled: unrolled, the compiler hoists all 16 layers' loads and spills (ptxas -v);
    // __grid_constant__ lets the table be indexed in the parameter bank without a local copy.
#pragma unroll 1
    for (int i = 0; i < t.n; ++i) {
      A v[V];
      load_row<VEC>(t.x[i] + b * t.sB[i] + j * t.sL[i], d, t.sD[i], n, v);
      const A w = wn[t.first + i];
#pragma unroll
      for (int k = 0; k < V; ++k) a[k] += w * v[k];
    }
    if (last) {
      store_row<VEC>(out + r * D, d, n, a);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < n) ws[r * D + d + k] = a[k];
      }
    }
  }
}

Tensor weighted_layer_pool_cuda(at::TensorList layers_in, const Tensor& weights) {
  const auto layers = check_layers(layers_in, weights, "weighted_layer_pool");
  const c10::cuda::CUDAGuard guard(layers[0].device());
  const int64_t B = layers[0].size(0), L = layers[0].size(1), D = layers[0].size(2);
  const int64_t N = layers.size();
  const auto acc_type = acc_scalar_type(layers[0].scalar_type());
  Tensor out = at::empty({B, L, D}, layers[0].options());
  if (out.numel() == 0) return out;
  const Tensor wn = normalized_weights(weights, acc_type);
  Tensor ws;
  if (N > kMaxLayers) ws = at::empty({B, L, D}, layers[0].options().dtype(acc_type));
  const int64_t rows = B * L;
  FP_DISPATCH(layers[0].scalar_type(), "fused_pool_cuda_weighted_layer_pool", [&] {
    using A = acc_t<scalar_t>;
    for (int64_t first = 0; first < N; first += kMaxLayers) {
      bool vec = D % kVec<scalar_t> == 0;
      const auto t = layer_table<scalar_t>(layers, nullptr, first, &vec);
      vec_switch(vec, [&](auto v) {
        layer_pool_kernel<scalar_t, decltype(v)::value>
            <<<grid_dim(row_blocks(rows)), dim3(kTx, kTy), 0, stream()>>>(
                t, wn.const_data_ptr<A>(), L, D, rows,
                ws.defined() ? ws.mutable_data_ptr<A>() : nullptr,
                first == 0, first + kMaxLayers >= N, out.mutable_data_ptr<scalar_t>());
        FP_CUDA_LAUNCH_CHECK();
      });
    }
  });
  return out;
}

// Backward of weighted_layer_pool for one chunk of layers: grads_i = T(wn_i * g), and per-block
// partials of c_i = <g, layer_i>. A fixed grid (at most kMaxPartialBlocks blocks) strides over
// the rows, so the partial buffer stays small and the sum order depends on shapes only.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    layer_pool_bwd_kernel(LayerTable<T> t, const T* __restrict__ grad, int64_t gB, int64_t gL,
                          int64_t gD, const acc_t<T>* __restrict__ wn, int64_t L, int64_t D,
                          int64_t rows, int64_t N, acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ A smem[32];
  A c[kMaxLayers];
#pragma unroll
  for (int i = 0; i < kMaxLayers; ++i) c[i] = A(0);
  for (int64_t r0 = int64_t(blockIdx.x) * kTy; r0 < rows; r0 += int64_t(gridDim.x) * kTy) {
    const int64_t r = r0 + threadIdx.y;
    if (r >= rows) continue;
    const int64_t b = r / L, j = r % L;
    for (int64_t d = int64_t(threadIdx.x) * V; d < D; d += int64_t(kTx) * V) {
      const int n = lane_count(d, D, V);
      A g[V];
      load_row<VEC>(grad + b * gB + j * gL, d, gD, n, g);
#pragma unroll
      for (int i = 0; i < kMaxLayers; ++i) {
        if (i >= t.n) break;
        A v[V], o[V];
        load_row<VEC>(t.x[i] + b * t.sB[i] + j * t.sL[i], d, t.sD[i], n, v);
        const A w = wn[t.first + i];
        A dot = A(0);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          dot += g[k] * v[k];
          o[k] = w * g[k];
        }
        c[i] += dot;
        store_row<VEC>(t.g[i] + r * D, d, n, o);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxLayers; ++i) {
    if (i >= t.n) break;  // t.n is uniform across the block
    const A total = block_sum(c[i], smem);
    if (linear_tid() == 0) partial[int64_t(blockIdx.x) * N + t.first + i] = total;
  }
}

std::tuple<std::vector<Tensor>, Tensor> weighted_layer_pool_backward_cuda(
    const Tensor& grad, at::TensorList layers_in, const Tensor& weights) {
  const auto layers = check_layers(layers_in, weights, "weighted_layer_pool_backward");
  const c10::cuda::CUDAGuard guard(layers[0].device());
  TORCH_CHECK(grad.device() == layers[0].device() && grad.sizes() == layers[0].sizes(),
              "weighted_layer_pool_backward: grad must match the layers");
  const int64_t B = layers[0].size(0), L = layers[0].size(1), D = layers[0].size(2);
  const int64_t N = layers.size();
  const auto acc_type = acc_scalar_type(layers[0].scalar_type());
  std::vector<Tensor> grads;
  for (const Tensor& h : layers) grads.push_back(at::empty({B, L, D}, h.options()));
  const Tensor wn = normalized_weights(weights, acc_type);
  const int64_t rows = B * L;
  const int64_t nblocks = rows * D == 0 ? 0 : std::min(kMaxPartialBlocks, row_blocks(rows));
  Tensor partial = at::empty({std::max<int64_t>(nblocks, 1), N}, wn.options());
  if (nblocks > 0) {
    FP_DISPATCH(layers[0].scalar_type(), "fused_pool_cuda_weighted_layer_pool_backward", [&] {
      using A = acc_t<scalar_t>;
      for (int64_t first = 0; first < N; first += kMaxLayers) {
        bool vec = D % kVec<scalar_t> == 0 &&
                   can_vectorize<scalar_t>(grad.const_data_ptr(), grad.stride(2),
                                           {grad.stride(0), grad.stride(1)});
        const auto t = layer_table<scalar_t>(layers, &grads, first, &vec);
        vec_switch(vec, [&](auto v) {
          layer_pool_bwd_kernel<scalar_t, decltype(v)::value>
              <<<grid_dim(nblocks), dim3(kTx, kTy), 0, stream()>>>(
                  t, grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1),
                  grad.stride(2), wn.const_data_ptr<A>(), L, D, rows, N,
                  partial.mutable_data_ptr<A>());
          FP_CUDA_LAUNCH_CHECK();
        });
      }
    });
  }
  return {grads, weights_grad(partial, nblocks, wn, weights)};
}

// weighted_layer_mean forward (pooling shape): sum over valid tokens and layers of wn_i x_i,
// divided by n_b. More than kMaxLayers layers: chunks accumulate un-normalized totals in an
// acc-typed [B, D] workspace.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    layer_mean_kernel(const __grid_constant__ LayerTable<T> t, SeqLayout s,
                      const acc_t<T>* __restrict__ wn,
                      int64_t nchunk, acc_t<T>* __restrict__ ws, bool first, bool last,
                      T* __restrict__ out) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t b = blockIdx.x / nchunk, chunk = blockIdx.x % nchunk;
  const int64_t d = lane_feature<T>(chunk);
  const int n = lane_count(d, s.D, V);
  LaneSum<A, V> sum;
  sum.init();
  int64_t cnt = 0;
  for (int64_t j = threadIdx.y; j < s.L; j += kTy) {
    if (!s.valid(b, j)) continue;
    ++cnt;
    if (n == 0) continue;
#pragma unroll 1
    for (int i = 0; i < t.n; ++i) {  // not unrolled: see layer_pool_kernel
      A v[V];
      load_row<VEC>(t.x[i] + b * t.sB[i] + j * t.sL[i], d, t.sD[i], n, v);
      sum.add(v, wn[t.first + i]);
    }
    sum.token_done();
  }
  sum.flush();
  constexpr int W = kTx * V;
  __shared__ int64_t sh_cnt[kTy];
  __shared__ A sh_sum[kTy][W];
  const int f = threadIdx.x * V;
  if (threadIdx.x == 0) sh_cnt[threadIdx.y] = cnt;
#pragma unroll
  for (int k = 0; k < V; ++k) sh_sum[threadIdx.y][f + k] = sum.total[k];
  __syncthreads();
  if (threadIdx.y != 0 || n == 0) return;
  int64_t count = 0;
  for (int q = 0; q < kTy; ++q) count += sh_cnt[q];
  const A denom = static_cast<A>(std::max<int64_t>(count, 1));
  for (int k = 0; k < n; ++k) {
    A total = first ? A(0) : ws[b * s.D + d + k];
    for (int q = 0; q < kTy; ++q) total += sh_sum[q][f + k];
    if (last) {
      out[b * s.D + d + k] = static_cast<T>(total / denom);
    } else {
      ws[b * s.D + d + k] = total;
    }
  }
}

Tensor weighted_layer_mean_cuda(at::TensorList layers_in, const Tensor& weights,
                                const OptTensor& mask) {
  const auto layers = check_layers(layers_in, weights, "weighted_layer_mean");
  const c10::cuda::CUDAGuard guard(layers[0].device());
  Tensor cu;
  const SeqLayout s = make_layout(layers[0], mask, std::nullopt, &cu);
  const int64_t N = layers.size();
  const auto acc_type = acc_scalar_type(layers[0].scalar_type());
  Tensor out = at::empty({s.B, s.D}, layers[0].options());
  if (out.numel() == 0) return out;
  const Tensor wn = normalized_weights(weights, acc_type);
  Tensor ws;
  if (N > kMaxLayers) ws = at::empty({s.B, s.D}, layers[0].options().dtype(acc_type));
  FP_DISPATCH(layers[0].scalar_type(), "fused_pool_cuda_weighted_layer_mean", [&] {
    using A = acc_t<scalar_t>;
    int64_t nchunk;
    const int64_t blocks = pool_blocks<scalar_t>(s.B, s.D, &nchunk);
    for (int64_t first = 0; first < N; first += kMaxLayers) {
      bool vec = true;
      const auto t = layer_table<scalar_t>(layers, nullptr, first, &vec);
      vec_switch(vec, [&](auto v) {
        layer_mean_kernel<scalar_t, decltype(v)::value>
            <<<grid_dim(blocks), dim3(kTx, kTy), 0, stream()>>>(
                t, s, wn.const_data_ptr<A>(), nchunk,
                ws.defined() ? ws.mutable_data_ptr<A>() : nullptr,
                first == 0, first + kMaxLayers >= N, out.mutable_data_ptr<scalar_t>());
        FP_CUDA_LAUNCH_CHECK();
      });
    }
  });
  return out;
}

// weighted_layer_mean backward for one chunk of layers (pooling shape, every token visited):
//   grads_i[b, j] = valid ? T(wn_i g[b] / n_b) : 0,
//   c_i += sum_{j valid, d} (g[b, d] / n_b) x_i[b, j, d]   (= <g, mean_i>), per-block partials.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    layer_mean_bwd_kernel(LayerTable<T> t, SeqLayout s, const T* __restrict__ grad,
                          const int64_t* __restrict__ counts, const acc_t<T>* __restrict__ wn,
                          int64_t nchunk, int64_t N, acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ A smem[32];
  const int64_t b = blockIdx.x / nchunk, chunk = blockIdx.x % nchunk;
  const int64_t d = lane_feature<T>(chunk);
  const int n = lane_count(d, s.D, V);
  const A denom = static_cast<A>(std::max<int64_t>(counts[b], 1));
  A g[V], gn[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    g[k] = k < n ? static_cast<A>(grad[b * s.D + d + k]) : A(0);
    gn[k] = g[k] / denom;
  }
  A c[kMaxLayers];
#pragma unroll
  for (int i = 0; i < kMaxLayers; ++i) c[i] = A(0);
  for (int64_t j = threadIdx.y; j < s.L; j += kTy) {
    if (n == 0) break;
    const bool valid = s.valid(b, j);
#pragma unroll
    for (int i = 0; i < kMaxLayers; ++i) {
      if (i >= t.n) break;
      A o[V];
      if (valid) {
        A v[V];
        load_row<VEC>(t.x[i] + b * t.sB[i] + j * t.sL[i], d, t.sD[i], n, v);
        const A w = wn[t.first + i];
        A dot = A(0);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          dot += gn[k] * v[k];
          o[k] = w * g[k] / denom;
        }
        c[i] += dot;
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = A(0);
      }
      store_row<VEC>(t.g[i] + (b * s.L + j) * s.D, d, n, o);
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxLayers; ++i) {
    if (i >= t.n) break;  // t.n is uniform across the block
    const A total = block_sum(c[i], smem);
    if (linear_tid() == 0) partial[int64_t(blockIdx.x) * N + t.first + i] = total;
  }
}

std::tuple<std::vector<Tensor>, Tensor> weighted_layer_mean_backward_cuda(
    const Tensor& grad_in, at::TensorList layers_in, const Tensor& weights,
    const OptTensor& mask) {
  const auto layers = check_layers(layers_in, weights, "weighted_layer_mean_backward");
  const c10::cuda::CUDAGuard guard(layers[0].device());
  const Tensor grad = grad_in.contiguous();
  Tensor cu;
  const SeqLayout s = make_layout(layers[0], mask, std::nullopt, &cu);
  const int64_t B = s.B, L = s.L, D = s.D, N = layers.size();
  const auto acc_type = acc_scalar_type(layers[0].scalar_type());
  std::vector<Tensor> grads;
  for (const Tensor& h : layers) grads.push_back(at::empty({B, L, D}, h.options()));
  const Tensor wn = normalized_weights(weights, acc_type);
  int64_t nblocks = 0;
  Tensor partial;
  FP_DISPATCH(layers[0].scalar_type(), "fused_pool_cuda_weighted_layer_mean_backward", [&] {
    using A = acc_t<scalar_t>;
    int64_t nchunk = 0;
    nblocks = B * L * D == 0 ? 0 : pool_blocks<scalar_t>(B, D, &nchunk);
    partial = at::empty({std::max<int64_t>(nblocks, 1), N}, wn.options());
    if (nblocks == 0) return;
    const Tensor counts = valid_counts(s, grad);
    for (int64_t first = 0; first < N; first += kMaxLayers) {
      bool vec = D % kVec<scalar_t> == 0;
      const auto t = layer_table<scalar_t>(layers, &grads, first, &vec);
      vec_switch(vec, [&](auto v) {
        layer_mean_bwd_kernel<scalar_t, decltype(v)::value>
            <<<grid_dim(nblocks), dim3(kTx, kTy), 0, stream()>>>(
                t, s, grad.const_data_ptr<scalar_t>(), counts.const_data_ptr<int64_t>(),
                wn.const_data_ptr<A>(), nchunk, N, partial.mutable_data_ptr<A>());
        FP_CUDA_LAUNCH_CHECK();
      });
    }
  });
  return {grads, weights_grad(partial, nblocks, wn, weights)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool_cpp, CUDA, m) {
  m.impl("attention_pool", &attention_pool_cuda);
  m.impl("attention_pool_backward", &attention_pool_backward_cuda);
  m.impl("weighted_layer_pool", &weighted_layer_pool_cuda);
  m.impl("weighted_layer_pool_backward", &weighted_layer_pool_backward_cuda);
  m.impl("weighted_layer_mean", &weighted_layer_mean_cuda);
  m.impl("weighted_layer_mean_backward", &weighted_layer_mean_backward_cuda);
}

}  // namespace cuda
}  // namespace fused_pool
