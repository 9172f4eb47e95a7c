// CPU kernels of the pooling operators (see fused_pool/_schema.py for the contract and
// fused_pool/backends/reference.py for the formulas each kernel implements).
//
// Every forward reads each valid token's row once, in token order, and never touches a padded
// one: work is split into (sequence, block of D) tasks with at::parallel_for, each keeping its
// accumulators (float, or double for double input) in a small stack array.
#include <algorithm>
#include <cstring>

#include "cpu_common.h"

namespace fused_pool {
namespace {

// ---------------------------------------------------------------------------------------------
// masked_mean:  out[b, d] = sum_{j valid} x[b, j, d] / n_b  (0 when n_b == 0)
// ---------------------------------------------------------------------------------------------
Tensor masked_mean_cpu(const Tensor& x, const OptTensor& mask, const OptTensor& cu_seqlens) {
  const Seqs s = make_seqs(x, mask, cu_seqlens);
  Tensor out = at::empty({s.B, s.D}, x.options());
  FP_DISPATCH(x.scalar_type(), "masked_mean_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    unit_stride(s.sD == 1, [&](auto unit) {
      const auto st = stride_of(unit, s.sD);
      parallel_over_blocks(s.B, s.D, [&](int64_t b, int64_t d0, int64_t d1) {
        TokenSum<acc> sum;
        const int64_t w = d1 - d0;
        int64_t n = 0;
        s.for_each_valid(b, [&](int64_t, int64_t off) {
          ++n;
          sum.add(xp + off + d0 * st, st, w);
        });
        sum.flush(w);
        const acc denom = static_cast<acc>(std::max<int64_t>(n, 1));
        for (int64_t i = 0; i < w; ++i) {
          op[b * s.D + d0 + i] = static_cast<scalar_t>(sum.total[i] / denom);
        }
      });
    });
  });
  return out;
}

// Writes sequence b's rows of a contiguous gradient: `valid_row(j, row)` for valid tokens,
// zeros for padded ones.
template <typename T, typename F>
void write_grad_rows(const Seqs& g, int64_t b, T* gx, F&& valid_row) {
  const int64_t base = g.start(b), n = g.len(b);
  for (int64_t j = 0; j < n; ++j) {
    T* row = gx + base + j * g.sL;
    if (g.valid(b, j)) {
      valid_row(j, row);
    } else {
      std::fill(row, row + g.D, T(0));
    }
  }
}

Tensor masked_mean_backward_cpu(const Tensor& grad_in, const OptTensor& mask,
                                const OptTensor& cu_seqlens, int64_t num_tokens) {
  const Tensor grad = grad_in.contiguous();
  const int64_t B = grad.size(0), D = grad.size(1);
  Tensor gx = empty_cpu(grad_x_shape(B, num_tokens, D, cu_seqlens.has_value()), grad.options());
  const Seqs g = make_seqs(gx, mask, cu_seqlens);
  FP_DISPATCH(grad.scalar_type(), "masked_mean_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* out = gx.mutable_data_ptr<scalar_t>();
    zero_uncovered_rows(g, num_tokens, out);
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> scaled(D);
      for (int64_t b = lo; b < hi; ++b) {
        const acc denom = static_cast<acc>(std::max<int64_t>(g.count(b), 1));
        for (int64_t d = 0; d < D; ++d) {
          scaled[d] = static_cast<scalar_t>(static_cast<acc>(gp[b * D + d]) / denom);
        }
        write_grad_rows(g, b, out, [&](int64_t, scalar_t* row) {
          std::copy(scaled.begin(), scaled.end(), row);
        });
      }
    });
  });
  return gx;
}

// ---------------------------------------------------------------------------------------------
// masked_extremum: max (largest) or min over valid tokens with its index; NaN wins, the lowest
// index wins ties; empty -> (0, -1).
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct ExtremumBlock {
  using acc = acc_t<scalar_t>;
  acc best[kBlockD];
  // Token index within the sequence; 32-bit so it vectorizes beside float values.
  int32_t arg[kBlockD];
  bool any = false;

  // Branch-free so the loop vectorizes: take v when it beats best (strictly: the earlier token
  // keeps ties), or when v is NaN and best is not (v != v is the NaN test).
  template <bool largest, typename St>
  void visit(const scalar_t* row, St stride, int64_t w, int32_t j) {
    if (!any) {
      for (int64_t i = 0; i < w; ++i) {
        best[i] = static_cast<acc>(row[i * stride]);
        arg[i] = j;
      }
      any = true;
      return;
    }
    for (int64_t i = 0; i < w; ++i) {
      const acc v = static_cast<acc>(row[i * stride]), cur = best[i];
      const bool better = largest ? v > cur : v < cur;
      const bool take = better | ((v != v) & (cur == cur));
      best[i] = take ? v : cur;
      arg[i] = take ? j : arg[i];
    }
  }
};

std::tuple<Tensor, Tensor> masked_extremum_cpu(const Tensor& x, const OptTensor& mask,
                                               const OptTensor& cu_seqlens, bool largest) {
  const Seqs s = make_seqs(x, mask, cu_seqlens);
  TORCH_CHECK(s.L < std::numeric_limits<int32_t>::max(),
              "fused_pool: sequences longer than "
              "2^31 - 1 tokens are not supported, got L = ",
              s.L);
  Tensor out = at::empty({s.B, s.D}, x.options());
  Tensor idx = at::empty({s.B, s.D}, x.options().dtype(at::kLong));
  FP_DISPATCH(x.scalar_type(), "masked_extremum_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    unit_stride(s.sD == 1, [&](auto unit) {
      const auto st = stride_of(unit, s.sD);
      parallel_over_blocks(s.B, s.D, [&](int64_t b, int64_t d0, int64_t d1) {
        ExtremumBlock<scalar_t> blk;
        const int64_t w = d1 - d0;
        s.for_each_valid(b, [&](int64_t j, int64_t off) {
          if (largest) {
            blk.template visit<true>(xp + off + d0 * st, st, w, j);
          } else {
            blk.template visit<false>(xp + off + d0 * st, st, w, j);
          }
        });
        for (int64_t i = 0; i < w; ++i) {
          op[b * s.D + d0 + i] = blk.any ? static_cast<scalar_t>(blk.best[i]) : scalar_t(0);
          ip[b * s.D + d0 + i] = blk.any ? blk.arg[i] : -1;
        }
      });
    });
  });
  return {out, idx};
}

// ---------------------------------------------------------------------------------------------
// masked_kmax: the k best valid values per feature (rank: NaN first, then value descending,
// then lower index), written in token order; unused slots 0 with index -1.
// ---------------------------------------------------------------------------------------------

// max/min ordering of the contract: NaN beats every number; among equal values the earlier
// (lower index) token keeps its place, so callers visit tokens in order and replace only on
// a strict win.
template <typename T>
inline bool beats(T a, T b, bool largest) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na || nb) return na && !nb;
  return largest ? a > b : a < b;
}

// a ranks after b (a is "worse") under the k-max order.
template <typename T>
inline bool ranks_after(T av, int64_t ai, T bv, int64_t bi) {
  if (beats(bv, av, true)) return true;
  if (beats(av, bv, true)) return false;
  return ai > bi;
}

// Small k: stream the tokens once, keeping k candidates per feature; a new token (always the
// highest index so far) enters only if it strictly beats the current worst candidate.
template <typename scalar_t, typename St>
void kmax_streaming(const Seqs& s, const scalar_t* xp, St st, int64_t k, int64_t b, int64_t d0,
                    int64_t d1, scalar_t* vp, int64_t* ip) {
  using acc = acc_t<scalar_t>;
  const int64_t w = d1 - d0;
  std::vector<acc> vals(k * w);
  std::vector<int64_t> ids(k * w);
  std::vector<int64_t> worst(w, 0);
  std::vector<acc> worst_val(w);  // vals[worst[i] * w + i], kept contiguous for the scan
  std::vector<uint8_t> hit(w);
  int64_t filled = 0;
  auto find_worst = [&](int64_t i) {
    int64_t wpos = 0;
    for (int64_t r = 1; r < k; ++r) {
      if (ranks_after(vals[r * w + i], ids[r * w + i], vals[wpos * w + i], ids[wpos * w + i])) {
        wpos = r;
      }
    }
    worst[i] = wpos;
    worst_val[i] = vals[wpos * w + i];
  };
  s.for_each_valid(b, [&](int64_t j, int64_t off) {
    const scalar_t* row = xp + off + d0 * st;
    if (filled < k) {
      for (int64_t i = 0; i < w; ++i) {
        vals[filled * w + i] = static_cast<acc>(row[i * st]);
        ids[filled * w + i] = j;
      }
      if (++filled == k) {
        for (int64_t i = 0; i < w; ++i) find_worst(i);
      }
      return;
    }
    // Once the candidates settle, few values enter: a vectorized, branch-free scan flags them
    // (same test as `beats`), and only flagged features take the slow path.
    int64_t hits = 0;
    for (int64_t i = 0; i < w; ++i) {
      const acc v = static_cast<acc>(row[i * st]), cur = worst_val[i];
      const bool h = (v > cur) | ((v != v) & (cur == cur));
      hit[i] = h;
      hits += h;
    }
    if (hits == 0) return;
    // Visit only the flagged features: eight flags per 64-bit word, skipped a word at a time.
    for (int64_t i0 = 0; i0 < w; i0 += 8) {
      uint64_t word = 0;
      std::memcpy(&word, hit.data() + i0, std::min<int64_t>(8, w - i0));
      while (word != 0) {
        const int64_t i = i0 + __builtin_ctzll(word) / 8;
        word &= word - 1;  // the flag byte is 0 or 1: clearing its lowest set bit clears it
        const int64_t r = worst[i];
        vals[r * w + i] = static_cast<acc>(row[i * st]);
        ids[r * w + i] = j;
        find_worst(i);
      }
    }
  });
  // Emit in token order: sort each feature's (index, value) pairs by index.
  std::vector<std::pair<int64_t, acc>> col(filled);
  for (int64_t i = 0; i < w; ++i) {
    for (int64_t r = 0; r < filled; ++r) col[r] = {ids[r * w + i], vals[r * w + i]};
    std::sort(col.begin(), col.end(),
              [](const auto& a, const auto& c) { return a.first < c.first; });
    for (int64_t r = 0; r < k; ++r) {
      const int64_t o = (b * k + r) * s.D + d0 + i;
      vp[o] = r < filled ? static_cast<scalar_t>(col[r].second) : scalar_t(0);
      ip[o] = r < filled ? col[r].first : -1;
    }
  }
}

// Large k: gather each feature's valid values and select with nth_element (O(n) per feature).
template <typename scalar_t>
void kmax_select(const Seqs& s, const scalar_t* xp, int64_t k, int64_t b, int64_t d0, int64_t d1,
                 scalar_t* vp, int64_t* ip) {
  using acc = acc_t<scalar_t>;
  const int64_t w = d1 - d0;
  std::vector<int64_t> tokens;
  std::vector<acc> rows;  // [n, w]
  s.for_each_valid(b, [&](int64_t j, int64_t off) {
    tokens.push_back(j);
    const scalar_t* row = xp + off + d0 * s.sD;
    for (int64_t i = 0; i < w; ++i) rows.push_back(static_cast<acc>(row[i * s.sD]));
  });
  const int64_t n = static_cast<int64_t>(tokens.size()), m = std::min(n, k);
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < w; ++i) {
    for (int64_t r = 0; r < n; ++r) order[r] = r;
    auto before = [&](int64_t a, int64_t c) {  // a ranks before c (positions are token order)
      return ranks_after(rows[c * w + i], c, rows[a * w + i], a);
    };
    if (m < n) std::nth_element(order.begin(), order.begin() + m, order.end(), before);
    std::sort(order.begin(), order.begin() + m);
    for (int64_t r = 0; r < k; ++r) {
      const int64_t o = (b * k + r) * s.D + d0 + i;
      vp[o] = r < m ? static_cast<scalar_t>(rows[order[r] * w + i]) : scalar_t(0);
      ip[o] = r < m ? tokens[order[r]] : -1;
    }
  }
}

std::tuple<Tensor, Tensor> masked_kmax_cpu(const Tensor& x, const OptTensor& mask,
                                           const OptTensor& cu_seqlens, int64_t k) {
  TORCH_CHECK(k >= 1, "masked_kmax: k must be at least 1, got ", k);
  const Seqs s = make_seqs(x, mask, cu_seqlens);
  Tensor values = at::empty({s.B, k, s.D}, x.options());
  Tensor idx = at::empty({s.B, k, s.D}, x.options().dtype(at::kLong));
  FP_DISPATCH(x.scalar_type(), "masked_kmax_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = values.mutable_data_ptr<scalar_t>();
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    unit_stride(s.sD == 1, [&](auto unit) {
      const auto st = stride_of(unit, s.sD);
      parallel_over_blocks(s.B, s.D, [&](int64_t b, int64_t d0, int64_t d1) {
        if (k <= 16) {
          kmax_streaming(s, xp, st, k, b, d0, d1, vp, ip);
        } else {
          kmax_select(s, xp, k, b, d0, d1, vp, ip);
        }
      });
    });
  });
  return {values, idx};
}

// grad_x[b, indices[b, r, d], d] += grad[b, r, d] for indices >= 0; zero elsewhere.
Tensor index_pool_backward_cpu(const Tensor& grad_in, const Tensor& indices_in,
                               const OptTensor& cu_seqlens, int64_t num_tokens) {
  const Tensor grad = grad_in.contiguous(), indices = indices_in.contiguous();
  const int64_t B = grad.size(0), K = grad.size(1), D = grad.size(2);
  Tensor gx = empty_cpu(grad_x_shape(B, num_tokens, D, cu_seqlens.has_value()), grad.options());
  const Seqs g = make_seqs(gx, std::nullopt, cu_seqlens);
  FP_DISPATCH(grad.scalar_type(), "index_pool_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    scalar_t* out = gx.mutable_data_ptr<scalar_t>();
    zero_uncovered_rows(g, num_tokens, out);
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const int64_t base = g.start(b), n = g.len(b);
        for (int64_t j = 0; j < n; ++j) {
          std::fill(out + base + j * g.sL, out + base + j * g.sL + D, scalar_t(0));
        }
        for (int64_t r = 0; r < K; ++r) {
          for (int64_t d = 0; d < D; ++d) {
            const int64_t j = ip[(b * K + r) * D + d];
            if (j < 0 || j >= n) continue;
            scalar_t& dst = out[base + j * g.sL + d];
            dst = static_cast<scalar_t>(static_cast<acc>(dst) +
                                        static_cast<acc>(gp[(b * K + r) * D + d]));
          }
        }
      }
    });
  });
  return gx;
}

// ---------------------------------------------------------------------------------------------
// masked_mean_max: cat([mean, max], -1) and the argmax, in one pass.
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> masked_mean_max_cpu(const Tensor& x, const OptTensor& mask,
                                               const OptTensor& cu_seqlens) {
  const Seqs s = make_seqs(x, mask, cu_seqlens);
  TORCH_CHECK(s.L < std::numeric_limits<int32_t>::max(),
              "fused_pool: sequences longer than "
              "2^31 - 1 tokens are not supported, got L = ",
              s.L);
  Tensor out = at::empty({s.B, 2 * s.D}, x.options());
  Tensor idx = at::empty({s.B, s.D}, x.options().dtype(at::kLong));
  FP_DISPATCH(x.scalar_type(), "masked_mean_max_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    unit_stride(s.sD == 1, [&](auto unit) {
      const auto st = stride_of(unit, s.sD);
      parallel_over_blocks(s.B, s.D, [&](int64_t b, int64_t d0, int64_t d1) {
        ExtremumBlock<scalar_t> blk;
        TokenSum<acc> sum;
        const int64_t w = d1 - d0;
        int64_t n = 0;
        s.for_each_valid(b, [&](int64_t j, int64_t off) {
          const scalar_t* row = xp + off + d0 * st;
          ++n;
          sum.add(row, st, w);
          blk.template visit<true>(row, st, w, j);
        });
        sum.flush(w);
        const acc denom = static_cast<acc>(std::max<int64_t>(n, 1));
        for (int64_t i = 0; i < w; ++i) {
          op[b * 2 * s.D + d0 + i] = static_cast<scalar_t>(sum.total[i] / denom);
          op[b * 2 * s.D + s.D + d0 + i] =
              blk.any ? static_cast<scalar_t>(blk.best[i]) : scalar_t(0);
          ip[b * s.D + d0 + i] = blk.any ? blk.arg[i] : -1;
        }
      });
    });
  });
  return {out, idx};
}

Tensor masked_mean_max_backward_cpu(const Tensor& grad_in, const Tensor& indices_in,
                                    const OptTensor& mask, const OptTensor& cu_seqlens,
                                    int64_t num_tokens) {
  const Tensor grad = grad_in.contiguous(), indices = indices_in.contiguous();
  const int64_t B = grad.size(0), D = indices.size(1);
  Tensor gx = empty_cpu(grad_x_shape(B, num_tokens, D, cu_seqlens.has_value()), grad.options());
  const Seqs g = make_seqs(gx, mask, cu_seqlens);
  FP_DISPATCH(grad.scalar_type(), "masked_mean_max_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    scalar_t* out = gx.mutable_data_ptr<scalar_t>();
    zero_uncovered_rows(g, num_tokens, out);
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> scaled(D);
      for (int64_t b = lo; b < hi; ++b) {
        const acc denom = static_cast<acc>(std::max<int64_t>(g.count(b), 1));
        for (int64_t d = 0; d < D; ++d) {
          scaled[d] = static_cast<scalar_t>(static_cast<acc>(gp[b * 2 * D + d]) / denom);
        }
        write_grad_rows(g, b, out, [&](int64_t, scalar_t* row) {
          std::copy(scaled.begin(), scaled.end(), row);
        });
        const int64_t base = g.start(b), n = g.len(b);
        for (int64_t d = 0; d < D; ++d) {
          const int64_t j = ip[b * D + d];
          if (j < 0 || j >= n) continue;
          scalar_t& dst = out[base + j * g.sL + d];
          dst = static_cast<scalar_t>(static_cast<acc>(dst) +
                                      static_cast<acc>(gp[b * 2 * D + D + d]));
        }
      }
    });
  });
  return gx;
}

// ---------------------------------------------------------------------------------------------
// attention_pool: softmax over valid tokens of scores[b, :, h], applied to the head's features,
// in one pass with an online softmax (running max m, running sum l, rescaled accumulators).
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> attention_pool_cpu(const Tensor& x, const Tensor& scores_in,
                                              const OptTensor& mask, const OptTensor& cu_seqlens) {
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
  m.impl("masked_mean", &masked_mean_cpu);
  m.impl("masked_mean_backward", &masked_mean_backward_cpu);
  m.impl("masked_extremum", &masked_extremum_cpu);
  m.impl("masked_kmax", &masked_kmax_cpu);
  m.impl("index_pool_backward", &index_pool_backward_cpu);
  m.impl("masked_mean_max", &masked_mean_max_cpu);
  m.impl("masked_mean_max_backward", &masked_mean_max_backward_cpu);
  m.impl("attention_pool", &attention_pool_cpu);
  m.impl("attention_pool_backward", &attention_pool_backward_cpu);
  m.impl("weighted_layer_pool", &weighted_layer_pool_cpu);
  m.impl("weighted_layer_pool_backward", &weighted_layer_pool_backward_cpu);
  m.impl("weighted_layer_mean", &weighted_layer_mean_cpu);
  m.impl("weighted_layer_mean_backward", &weighted_layer_mean_backward_cpu);
}

}  // namespace fused_pool
