// CPU kernels of the weighted pooling operators: attention_pool, weighted_layer_pool,
// weighted_layer_mean (see fused_pool/_schema.py for the contract and
// fused_pool/backends/reference/weighted.py for the formulas each kernel implements).
//
// Like the pooling kernels (pool_cpu.cpp), every forward reads each valid token's row once, in
// token order, and never touches a padded one. Layer-weight gradients are summed from
// fixed-size chunk partials in chunk order: deterministic, independent of the thread count.
#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_common.h"

namespace fused_pool {
namespace {

// ---------------------------------------------------------------------------------------------
// attention_pool: softmax over valid tokens of scores[b, :, h], applied to the head's features,
// in one pass with an online softmax (running max m, running sum l, rescaled accumulators).
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> attention_pool_cpu(const Tensor& x, const Tensor& scores_in,
                                              const OptTensor& mask, const OptTensor& cu_seqlens) {
  const auto acc_type = acc_scalar_type(x);
  // Scores ([B, L, H], a D/H-th of x) are read in the accumulation type: one small conversion
  // instead of a kernel per (x dtype, scores dtype) pair.
  const Tensor scores = scores_in.to(acc_type);
  const Seqs s = make_seqs(x, mask, cu_seqlens);
  const Seqs sc = make_seqs(scores, mask, cu_seqlens);  // sD: stride over heads
  const int64_t H = scores.size(-1);
  TORCH_CHECK(H >= 1 && s.D % H == 0, "attention_pool: D = ", s.D, " is not divisible by H = ", H);
  const int64_t Dh = s.D / H, nblk = std::max<int64_t>(1, ceil_div(Dh, kBlockD));
  Tensor out = at::empty({s.B, s.D}, x.options());
  Tensor lse = at::empty({s.B, H}, x.options().dtype(acc_type));
  FP_DISPATCH(x.scalar_type(), "attention_pool_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc* spp = scores.const_data_ptr<acc>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    acc* lp = lse.mutable_data_ptr<acc>();
    unit_stride(s.sD == 1, [&](auto unit) {
      const auto st = stride_of(unit, s.sD);
      at::parallel_for(0, s.B * H * nblk, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t task = lo; task < hi; ++task) {
          const int64_t b = task / (H * nblk), h = (task / nblk) % H;
          const int64_t d0 = h * Dh + (task % nblk) * kBlockD;
          const int64_t d1 = std::min(h * Dh + Dh, d0 + kBlockD), w = d1 - d0;
          acc accum[kBlockD] = {};
          acc m = -std::numeric_limits<acc>::infinity(), l = 0;
          int64_t n = 0;
          const int64_t sbase = sc.start(b) + h * sc.sD;
          s.for_each_valid(b, [&](int64_t j, int64_t off) {
            const acc v = spp[sbase + j * sc.sL];
            ++n;
            if (v > m) {  // a new running max: rescale what was accumulated so far
              const acc scale = std::exp(m - v);
              l *= scale;
              for (int64_t i = 0; i < w; ++i) accum[i] *= scale;
              m = v;
            }
            // A -inf score weighs 0 even while m is still -inf (exp(-inf - -inf) is NaN);
            // NaN scores propagate, as in torch.softmax.
            const acc p = v == -std::numeric_limits<acc>::infinity() ? acc(0) : std::exp(v - m);
            l += p;
            const scalar_t* row = xp + off + d0 * st;
            for (int64_t i = 0; i < w; ++i) accum[i] += p * static_cast<acc>(row[i * st]);
          });
          for (int64_t i = 0; i < w; ++i) {
            op[b * s.D + d0 + i] = n ? static_cast<scalar_t>(accum[i] / l) : scalar_t(0);
          }
          if (d0 == h * Dh) {
            lp[b * H + h] = n ? m + std::log(l) : -std::numeric_limits<acc>::infinity();
          }
        }
      });
    });
  });
  return {out, lse};
}

// grad_x[t]_h = p_t g_h;  grad_s[t, h] = p_t (c_t - sum_u p_u c_u),  c_t = <g_h, x[t]_h>.
// The sum is recomputed from x (not from the rounded output) in the first pass over tokens.
std::tuple<Tensor, Tensor> attention_pool_backward_cpu(const Tensor& grad_in, const Tensor& x,
                                                       const Tensor& scores_in,
                                                       const OptTensor& mask,
                                                       const OptTensor& cu_seqlens,
                                                       const Tensor& out, const Tensor& lse_in) {
  const auto acc_type = acc_scalar_type(x);
  const Tensor grad = grad_in.contiguous(), lse = lse_in.contiguous();
  const Tensor scores = scores_in.to(acc_type);
  const bool packed = cu_seqlens.has_value();
  const Seqs s = make_seqs(x, mask, cu_seqlens);
  const Seqs sc = make_seqs(scores, mask, cu_seqlens);
  const int64_t H = scores.size(-1), Dh = H ? s.D / H : 0;
  const int64_t num_tokens = packed ? x.size(0) : x.size(1);
  Tensor gx = empty_cpu(x.sizes(), x.options());
  // Written in the accumulation type, then cast to the scores' dtype (a [B, L, H] tensor).
  Tensor gs = at::zeros(scores.sizes(), scores.options());
  const Seqs g = make_seqs(gx, mask, cu_seqlens);
  const Seqs gsq = make_seqs(gs, mask, cu_seqlens);
  FP_DISPATCH(x.scalar_type(), "attention_pool_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const acc* spp = scores.const_data_ptr<acc>();
    const acc* lp = lse.const_data_ptr<acc>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    acc* gsp = gs.mutable_data_ptr<acc>();
    zero_uncovered_rows(g, num_tokens, gxp);
    at::parallel_for(0, s.B * H, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc> c, gh(Dh);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / H, h = task % H, len = s.len(b);
        for (int64_t e = 0; e < Dh; ++e) gh[e] = static_cast<acc>(gp[b * s.D + h * Dh + e]);
        const acc lse_bh = lp[b * H + h];
        c.assign(len, 0);
        acc delta = 0;
        const int64_t sbase = sc.start(b) + h * sc.sD, gbase = gsq.start(b) + h * gsq.sD;
        for (int64_t j = 0; j < len; ++j) {
          scalar_t* grow = gxp + g.start(b) + j * g.sL + h * Dh;
          if (!s.valid(b, j)) {
            std::fill(grow, grow + Dh, scalar_t(0));
            continue;
          }
          const acc p = std::exp(spp[sbase + j * sc.sL] - lse_bh);
          const scalar_t* row = xp + s.start(b) + j * s.sL + h * Dh * s.sD;
          const acc cj =
              lane_sum<acc>(Dh, [&](int64_t e) { return gh[e] * static_cast<acc>(row[e * s.sD]); });
          for (int64_t e = 0; e < Dh; ++e) grow[e] = static_cast<scalar_t>(p * gh[e]);
          c[j] = cj;
          delta += p * cj;
        }
        for (int64_t j = 0; j < len; ++j) {
          if (s.valid(b, j)) {
            const acc p = std::exp(spp[sbase + j * sc.sL] - lse_bh);
            gsp[gbase + j * gsq.sL] = p * (c[j] - delta);
          }
        }
      }
    });
  });
  (void)out;
  return {gx, gs.to(scores_in.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Weighted layers: out = sum_i (w_i / S) layers[i]; read through the list, never stacked.
// ---------------------------------------------------------------------------------------------

// w_i / S and S, in the accumulation type.
template <typename acc>
std::vector<acc> normalized_weights(const Tensor& weights, acc* total) {
  const Tensor w = weights.to(at::kCPU, at::kDouble).contiguous();
  const double* wp = w.const_data_ptr<double>();
  acc s = 0;
  std::vector<acc> out(w.numel());
  for (int64_t i = 0; i < w.numel(); ++i) s += static_cast<acc>(wp[i]);
  for (int64_t i = 0; i < w.numel(); ++i) out[i] = static_cast<acc>(wp[i]) / s;
  *total = s;
  return out;
}

// (c_j - sum_i wn_i c_i) / S as a tensor of the weights' dtype.
template <typename acc>
Tensor weights_grad(const std::vector<acc>& c, const std::vector<acc>& wn, acc total,
                    const Tensor& weights) {
  acc dot = 0;
  for (size_t i = 0; i < c.size(); ++i) dot += wn[i] * c[i];
  Tensor gw = at::empty({static_cast<int64_t>(c.size())},
                        weights.options().dtype(at::kDouble).device(at::kCPU));
  double* p = gw.mutable_data_ptr<double>();
  for (size_t i = 0; i < c.size(); ++i) p[i] = static_cast<double>((c[i] - dot) / total);
  return gw.to(weights.options());
}

bool all_unit_stride(const std::vector<Seqs>& ls) {
  return std::all_of(ls.begin(), ls.end(), [](const Seqs& q) { return q.sD == 1; });
}

std::vector<Seqs> layer_seqs(const std::vector<Tensor>& layers, const OptTensor& mask) {
  std::vector<Seqs> out;
  for (const Tensor& h : layers) out.push_back(make_seqs(h, mask, std::nullopt));
  return out;
}

Tensor weighted_layer_pool_cpu(at::TensorList layers_in, const Tensor& weights) {
  const std::vector<Tensor> layers(layers_in.begin(), layers_in.end());
  TORCH_CHECK(!layers.empty(), "weighted_layer_pool: no layers");
  const auto ls = layer_seqs(layers, std::nullopt);
  const int64_t B = ls[0].B, L = ls[0].L, D = ls[0].D, N = layers.size();
  Tensor out = empty_cpu({B, L, D}, layers[0].options());
  FP_DISPATCH(layers[0].scalar_type(), "weighted_layer_pool_cpu", [&] {
    using acc = acc_t<scalar_t>;
    acc total;
    const auto wn = normalized_weights<acc>(weights, &total);
    std::vector<const scalar_t*> ptrs;
    for (const Tensor& h : layers) ptrs.push_back(h.const_data_ptr<scalar_t>());
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    unit_stride(all_unit_stride(ls), [&](auto unit) {
      at::parallel_for(0, B * L, 16, [&](int64_t lo, int64_t hi) {
        acc buf[kBlockD];
        for (int64_t r = lo; r < hi; ++r) {
          const int64_t b = r / L, j = r % L;
          for (int64_t d0 = 0; d0 < D; d0 += kBlockD) {
            const int64_t w = std::min(kBlockD, D - d0);
            std::fill(buf, buf + w, acc(0));
            for (int64_t i = 0; i < N; ++i) {
              const Seqs& q = ls[i];
              const auto st = stride_of(unit, q.sD);
              const scalar_t* row = ptrs[i] + b * q.sB + j * q.sL + d0 * st;
              for (int64_t e = 0; e < w; ++e) buf[e] += wn[i] * static_cast<acc>(row[e * st]);
            }
            for (int64_t e = 0; e < w; ++e) op[r * D + d0 + e] = static_cast<scalar_t>(buf[e]);
          }
        }
      });
    });
  });
  return out;
}

// Rows per partial-sum chunk: fixed, so the weight gradient does not depend on thread count.
constexpr int64_t kRowsPerChunk = 64;

std::tuple<std::vector<Tensor>, Tensor> weighted_layer_pool_backward_cpu(const Tensor& grad,
                                                                         at::TensorList layers_in,
                                                                         const Tensor& weights) {
  const std::vector<Tensor> layers(layers_in.begin(), layers_in.end());
  const auto ls = layer_seqs(layers, std::nullopt);
  const Seqs gq = make_seqs(grad, std::nullopt, std::nullopt);
  const int64_t B = ls[0].B, L = ls[0].L, D = ls[0].D, N = layers.size();
  std::vector<Tensor> grads;
  for (const Tensor& h : layers) grads.push_back(empty_cpu({B, L, D}, h.options()));
  Tensor gw;
  FP_DISPATCH(layers[0].scalar_type(), "weighted_layer_pool_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    acc total;
    const auto wn = normalized_weights<acc>(weights, &total);
    std::vector<const scalar_t*> ptrs;
    std::vector<scalar_t*> gptrs;
    for (int64_t i = 0; i < N; ++i) {
      ptrs.push_back(layers[i].const_data_ptr<scalar_t>());
      gptrs.push_back(grads[i].mutable_data_ptr<scalar_t>());
    }
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const int64_t rows = B * L, chunks = ceil_div(rows, kRowsPerChunk);
    std::vector<acc> partial(std::max<int64_t>(chunks, 1) * N, 0);
    unit_stride(all_unit_stride(ls) && gq.sD == 1, [&](auto unit) {
      const auto gst = stride_of(unit, gq.sD);
      at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t ch = lo; ch < hi; ++ch) {
          acc* part = partial.data() + ch * N;
          for (int64_t r = ch * kRowsPerChunk; r < std::min(rows, (ch + 1) * kRowsPerChunk); ++r) {
            const int64_t b = r / L, j = r % L;
            const scalar_t* grow = gp + b * gq.sB + j * gq.sL;
            for (int64_t i = 0; i < N; ++i) {
              const Seqs& q = ls[i];
              const auto st = stride_of(unit, q.sD);
              const scalar_t* row = ptrs[i] + b * q.sB + j * q.sL;
              scalar_t* out = gptrs[i] + r * D;
              part[i] += lane_sum<acc>(D, [&](int64_t d) {
                return static_cast<acc>(grow[d * gst]) * static_cast<acc>(row[d * st]);
              });
              for (int64_t d = 0; d < D; ++d) {
                out[d] = static_cast<scalar_t>(wn[i] * static_cast<acc>(grow[d * gst]));
              }
            }
          }
        }
      });
    });
    std::vector<acc> c(N, 0);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      for (int64_t i = 0; i < N; ++i) c[i] += partial[ch * N + i];
    }
    gw = weights_grad(c, wn, total, weights);
  });
  return {grads, gw};
}

Tensor weighted_layer_mean_cpu(at::TensorList layers_in, const Tensor& weights,
                               const OptTensor& mask) {
  const std::vector<Tensor> layers(layers_in.begin(), layers_in.end());
  const auto ls = layer_seqs(layers, mask);
  const int64_t B = ls[0].B, D = ls[0].D, N = layers.size();
  Tensor out = at::empty({B, D}, layers[0].options());
  FP_DISPATCH(layers[0].scalar_type(), "weighted_layer_mean_cpu", [&] {
    using acc = acc_t<scalar_t>;
    acc total;
    const auto wn = normalized_weights<acc>(weights, &total);
    std::vector<const scalar_t*> ptrs;
    for (const Tensor& h : layers) ptrs.push_back(h.const_data_ptr<scalar_t>());
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    unit_stride(all_unit_stride(ls), [&](auto unit) {
      parallel_over_blocks(B, D, [&](int64_t b, int64_t d0, int64_t d1) {
        TokenSum<acc> sum;
        const int64_t w = d1 - d0;
        int64_t n = 0;
        ls[0].for_each_valid(b, [&](int64_t j, int64_t) {
          ++n;
          for (int64_t i = 0; i < N; ++i) {
            const Seqs& q = ls[i];
            const auto st = stride_of(unit, q.sD);
            sum.add(ptrs[i] + q.start(b) + j * q.sL + d0 * st, st, w, wn[i]);
          }
        });
        sum.flush(w);
        const acc denom = static_cast<acc>(std::max<int64_t>(n, 1));
        for (int64_t e = 0; e < w; ++e) {
          op[b * D + d0 + e] = static_cast<scalar_t>(sum.total[e] / denom);
        }
      });
    });
  });
  return out;
}

std::tuple<std::vector<Tensor>, Tensor> weighted_layer_mean_backward_cpu(const Tensor& grad_in,
                                                                         at::TensorList layers_in,
                                                                         const Tensor& weights,
                                                                         const OptTensor& mask) {
  const Tensor grad = grad_in.contiguous();
  const std::vector<Tensor> layers(layers_in.begin(), layers_in.end());
  const auto ls = layer_seqs(layers, mask);
  const int64_t B = ls[0].B, L = ls[0].L, D = ls[0].D, N = layers.size();
  std::vector<Tensor> grads;
  for (const Tensor& h : layers) grads.push_back(empty_cpu({B, L, D}, h.options()));
  Tensor gw;
  FP_DISPATCH(layers[0].scalar_type(), "weighted_layer_mean_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    acc total;
    const auto wn = normalized_weights<acc>(weights, &total);
    std::vector<const scalar_t*> ptrs;
    std::vector<scalar_t*> gptrs;
    for (int64_t i = 0; i < N; ++i) {
      ptrs.push_back(layers[i].const_data_ptr<scalar_t>());
      gptrs.push_back(grads[i].mutable_data_ptr<scalar_t>());
    }
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const int64_t nblk = std::max<int64_t>(1, ceil_div(D, kBlockD));
    std::vector<acc> partial(B * nblk * N, 0);  // c_i per task, summed in task order below
    unit_stride(all_unit_stride(ls), [&](auto unit) {
      parallel_over_blocks(B, D, [&](int64_t b, int64_t d0, int64_t d1) {
        const int64_t w = d1 - d0;
        std::vector<TokenSum<acc>> sums(N);
        int64_t n = 0;
        ls[0].for_each_valid(b, [&](int64_t j, int64_t) {
          ++n;
          for (int64_t i = 0; i < N; ++i) {
            const Seqs& q = ls[i];
            const auto st = stride_of(unit, q.sD);
            sums[i].add(ptrs[i] + q.start(b) + j * q.sL + d0 * st, st, w);
          }
        });
        for (auto& t : sums) t.flush(w);
        const acc denom = static_cast<acc>(std::max<int64_t>(n, 1));
        acc* part = partial.data() + (b * nblk + d0 / kBlockD) * N;
        for (int64_t i = 0; i < N; ++i) {
          acc c = 0;
          for (int64_t e = 0; e < w; ++e) {
            c += static_cast<acc>(gp[b * D + d0 + e]) * (sums[i].total[e] / denom);
          }
          part[i] = c;
          for (int64_t j = 0; j < L; ++j) {
            scalar_t* row = gptrs[i] + (b * L + j) * D + d0;
            if (ls[0].valid(b, j)) {
              for (int64_t e = 0; e < w; ++e) {
                row[e] =
                    static_cast<scalar_t>(wn[i] * static_cast<acc>(gp[b * D + d0 + e]) / denom);
              }
            } else {
              std::fill(row, row + w, scalar_t(0));
            }
          }
        }
      });
    });
    std::vector<acc> c(N, 0);
    for (int64_t t = 0; t < B * nblk; ++t) {
      for (int64_t i = 0; i < N; ++i) c[i] += partial[t * N + i];
    }
    gw = weights_grad(c, wn, total, weights);
  });
  return {grads, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool_cpp, CPU, m) {
  m.impl("attention_pool", &attention_pool_cpu);
  m.impl("attention_pool_backward", &attention_pool_backward_cpu);
  m.impl("weighted_layer_pool", &weighted_layer_pool_cpu);
  m.impl("weighted_layer_pool_backward", &weighted_layer_pool_backward_cpu);
  m.impl("weighted_layer_mean", &weighted_layer_mean_cpu);
  m.impl("weighted_layer_mean_backward", &weighted_layer_mean_backward_cpu);
}

}  // namespace fused_pool
