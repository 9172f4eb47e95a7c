// CPU kernels of the pooling operators: masked_mean, masked_extremum (max/min), masked_kmax,
// index_pool_backward, masked_mean_max (see fused_pool/_schema.py for the contract and
// fused_pool/backends/reference/pool.py for the formulas each kernel implements).
//
// Every forward reads each valid token's row once, in token order, and never touches a padded
// one: work is split into (sequence, block of D) tasks with at::parallel_for, each keeping its
// accumulators (float, or double for double input) in a small stack array.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

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

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool_cpp, CPU, m) {
  m.impl("masked_mean", &masked_mean_cpu);
  m.impl("masked_mean_backward", &masked_mean_backward_cpu);
  m.impl("masked_extremum", &masked_extremum_cpu);
  m.impl("masked_kmax", &masked_kmax_cpu);
  m.impl("index_pool_backward", &index_pool_backward_cpu);
  m.impl("masked_mean_max", &masked_mean_max_cpu);
  m.impl("masked_mean_max_backward", &masked_mean_max_backward_cpu);
}

}  // namespace fused_pool
