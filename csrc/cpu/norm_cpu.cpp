// CPU kernels of the normalization operators (formulas: fused_pool/backends/reference/norm.py).
//
// LayerNorm/RMSNorm/InstanceNorm normalize contiguous rows: each row is read from memory once
// (its second pass hits L1/L2), statistics are float32 (float64 for float64 input). A
// non-contiguous input is made contiguous first: rows of a strided norm input are rare, and one
// copy keeps every kernel a plain row loop. Weight/bias gradients are summed from fixed-size row
// chunks in chunk order, so they are deterministic and independent of the thread count.
#include "cpu_common.h"

namespace fused_pool {
namespace {

constexpr int64_t kRowsPerChunk = 32;

// Sums rows of a [chunks, n] partial buffer in chunk order into a tensor of `like`'s dtype.
template <typename acc>
Tensor reduce_partials(const std::vector<acc>& partial, int64_t chunks, int64_t n,
                       const Tensor& like) {
  Tensor out = at::zeros({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value));
  acc* o = out.mutable_data_ptr<acc>();
  at::parallel_for(0, n, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const acc* p = partial.data() + ch * n;
      for (int64_t i = lo; i < hi; ++i) o[i] += p[i];
    }
  });
  return out.to(like.options());
}

// ---------------------------------------------------------------------------------------------
// LayerNorm (centered) and RMSNorm over the last dims, as rows [M, N].
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> row_norm_forward(const Tensor& x_in, int64_t nd,
                                                    const OptTensor& weight, const OptTensor& bias,
                                                    double eps, bool centered) {
  const Tensor x = x_in.contiguous();
  const auto stat_shape = x.sizes().slice(0, x.dim() - nd);
  const int64_t N = c10::multiply_integers(x.sizes().slice(x.dim() - nd));
  const int64_t M = N ? x.numel() / N : c10::multiply_integers(stat_shape);
  Tensor y = empty_cpu(x.sizes(), x.options());
  Tensor mean = at::empty(stat_shape, x.options().dtype(acc_scalar_type(x)));
  Tensor rstd = at::empty(stat_shape, x.options().dtype(acc_scalar_type(x)));
  const Tensor w = param_acc(weight, x), bb = param_acc(bias, x);
  FP_DISPATCH(x.scalar_type(), "row_norm_forward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc* mp = mean.mutable_data_ptr<acc>();
    acc* rp = rstd.mutable_data_ptr<acc>();
    const acc* wp = ptr_or_null<acc>(w);
    const acc* bp = ptr_or_null<acc>(bb);
    const acc e = static_cast<acc>(eps);
    at::parallel_for(0, M, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = xp + r * N;
        const acc mu = centered
                           ? lane_sum<acc>(N, [&](int64_t i) { return static_cast<acc>(row[i]); }) /
                                 std::max<int64_t>(N, 1)
                           : acc(0);
        const acc ss = lane_sum<acc>(N, [&](int64_t i) {
          const acc v = static_cast<acc>(row[i]) - mu;
          return v * v;
        });
        const acc rs = acc(1) / std::sqrt(ss / std::max<int64_t>(N, 1) + e);
        scalar_t* out = yp + r * N;
        for (int64_t i = 0; i < N; ++i) {
          acc v = (static_cast<acc>(row[i]) - mu) * rs;
          if (wp) v *= wp[i];
          if (bp) v += bp[i];
          out[i] = static_cast<scalar_t>(v);
        }
        mp[r] = mu;
        rp[r] = rs;
      }
    });
  });
  return {y, mean, rstd};
}

// dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat))  (the mean term only when centered);
// dw = sum_rows g * xhat; db = sum_rows g.
std::tuple<Tensor, Tensor, Tensor> row_norm_backward(const Tensor& grad_in, const Tensor& x_in,
                                                     int64_t nd, const OptTensor& weight,
                                                     const OptTensor& bias, const Tensor& mean_in,
                                                     const Tensor& rstd_in, bool centered) {
  const Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const Tensor mean = centered ? mean_in.contiguous() : Tensor(), rstd = rstd_in.contiguous();
  const int64_t N = c10::multiply_integers(x.sizes().slice(x.dim() - nd));
  const int64_t M = N ? x.numel() / N : 0;
  Tensor gx = empty_cpu(x.sizes(), x.options());
  const Tensor w = param_acc(weight, x);
  const int64_t chunks = ceil_div(M, kRowsPerChunk);
  Tensor gw = weight.has_value() ? Tensor() : x.new_zeros({0});
  Tensor gb = bias.has_value() ? Tensor() : x.new_zeros({0});
  FP_DISPATCH(x.scalar_type(), "row_norm_backward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const acc* mp = centered ? mean.const_data_ptr<acc>() : nullptr;
    const acc* rp = rstd.const_data_ptr<acc>();
    const acc* wp = ptr_or_null<acc>(w);
    std::vector<acc> pw(weight.has_value() ? chunks * N : 0, 0);
    std::vector<acc> pb(bias.has_value() ? chunks * N : 0, 0);
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t ch = lo; ch < hi; ++ch) {
        for (int64_t r = ch * kRowsPerChunk; r < std::min(M, (ch + 1) * kRowsPerChunk); ++r) {
          const scalar_t* row = xp + r * N;
          const scalar_t* grow = gp + r * N;
          const acc mu = mp ? mp[r] : acc(0), rs = rp[r];
          auto gh = [&](int64_t i) {
            const acc g = static_cast<acc>(grow[i]);
            return wp ? g * wp[i] : g;
          };
          auto xh = [&](int64_t i) { return (static_cast<acc>(row[i]) - mu) * rs; };
          const acc sum_g = centered ? lane_sum<acc>(N, gh) : acc(0);
          const acc sum_gx = lane_sum<acc>(N, [&](int64_t i) { return gh(i) * xh(i); });
          if (!pw.empty()) {
            acc* p = pw.data() + ch * N;
            for (int64_t i = 0; i < N; ++i) p[i] += static_cast<acc>(grow[i]) * xh(i);
          }
          if (!pb.empty()) {
            acc* p = pb.data() + ch * N;
            for (int64_t i = 0; i < N; ++i) p[i] += static_cast<acc>(grow[i]);
          }
          const acc a = centered ? sum_g / N : acc(0), c = sum_gx / N;
          scalar_t* out = gxp + r * N;
          for (int64_t i = 0; i < N; ++i)
            out[i] = static_cast<scalar_t>(rs * (gh(i) - a - xh(i) * c));
        }
      }
    });
    if (weight.has_value()) gw = reduce_partials(pw, chunks, N, *weight).view(weight->sizes());
    if (bias.has_value()) gb = reduce_partials(pb, chunks, N, *bias).view(bias->sizes());
  });
  return {gx, gw, gb};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_cpu(const Tensor& x, int64_t nd,
                                                  const OptTensor& weight, const OptTensor& bias,
                                                  double eps) {
  return row_norm_forward(x, nd, weight, bias, eps, true);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cpu(const Tensor& grad, const Tensor& x,
                                                           int64_t nd, const OptTensor& weight,
                                                           const OptTensor& bias,
                                                           const Tensor& mean, const Tensor& rstd) {
  return row_norm_backward(grad, x, nd, weight, bias, mean, rstd, true);
}

std::tuple<Tensor, Tensor> rms_norm_cpu(const Tensor& x, int64_t nd, const OptTensor& weight,
                                        double eps) {
  auto [y, mean, rstd] = row_norm_forward(x, nd, weight, std::nullopt, eps, false);
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_cpu(const Tensor& grad, const Tensor& x, int64_t nd,
                                                 const OptTensor& weight, const Tensor& rstd) {
  auto [gx, gw, gb] = row_norm_backward(grad, x, nd, weight, std::nullopt, Tensor(), rstd, false);
  return {gx, gw};
}

// ---------------------------------------------------------------------------------------------
// Fused residual add + LayerNorm/RMSNorm: the row norm of s = x + residual, s formed in the
// accumulation type. One pass over memory per row: x and residual are read once into a
// per-thread row buffer of s (acc type, L1/L2-resident for rows up to several thousand
// elements), the statistics and the output are computed from the buffer, y (and s, when
// return_residual) is written once: 3 (4) row transfers instead of the 5 of
// `F.layer_norm(x + residual)`. The backward recomputes s from x and residual rather than saving
// it (the forward then writes one tensor less): it reads x, residual and grad (and grad_sum)
// once and writes the gradient of s, which is the gradient of both x and residual.
// ---------------------------------------------------------------------------------------------

// Two 16-lane sums in one loop (see lane_sum): sum f(i) and sum g(i), over i < n.
template <typename acc, typename F, typename G>
inline void lane_sum2(int64_t n, F&& f, G&& g, acc& out_f, acc& out_g) {
  constexpr int64_t W = 16;
  acc a[W] = {}, b[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    for (int64_t k = 0; k < W; ++k) {
      a[k] += f(i + k);
      b[k] += g(i + k);
    }
  }
  for (int64_t k = 0; i + k < n; ++k) {
    a[k] += f(i + k);
    b[k] += g(i + k);
  }
  for (int64_t w = W / 2; w > 0; w /= 2) {
    for (int64_t k = 0; k < w; ++k) {
      a[k] += a[k + w];
      b[k] += b[k + w];
    }
  }
  out_f = a[0];
  out_g = b[0];
}

// Returns (y, s or a zero-size tensor, mean (undefined unless centered), rstd).
std::tuple<Tensor, Tensor, Tensor, Tensor> add_row_norm_forward(
    const Tensor& x_in, const Tensor& r_in, int64_t nd, const OptTensor& weight,
    const OptTensor& bias, double eps, bool return_residual, bool centered) {
  check_residual(x_in, r_in);
  const Tensor x = x_in.contiguous(), res = r_in.contiguous();
  const auto stat_shape = x.sizes().slice(0, x.dim() - nd);
  const int64_t N = c10::multiply_integers(x.sizes().slice(x.dim() - nd));
  const int64_t M = N ? x.numel() / N : c10::multiply_integers(stat_shape);
  Tensor y = empty_cpu(x.sizes(), x.options());
  Tensor s = return_residual ? empty_cpu(x.sizes(), x.options()) : at::empty({0}, x.options());
  const auto stat_opts = x.options().dtype(acc_scalar_type(x));
  Tensor mean = centered ? at::empty(stat_shape, stat_opts) : Tensor();
  Tensor rstd = at::empty(stat_shape, stat_opts);
  const Tensor w = param_acc(weight, x), bb = param_acc(bias, x);
  FP_DISPATCH(x.scalar_type(), "add_row_norm_forward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* sp = return_residual ? s.mutable_data_ptr<scalar_t>() : nullptr;
    acc* mp = centered ? mean.mutable_data_ptr<acc>() : nullptr;
    acc* rsp = rstd.mutable_data_ptr<acc>();
    const acc* wp = ptr_or_null<acc>(w);
    const acc* bp = ptr_or_null<acc>(bb);
    const acc e = static_cast<acc>(eps);
    const acc n_acc = static_cast<acc>(std::max<int64_t>(N, 1));
    at::parallel_for(0, M, 16, [&](int64_t lo, int64_t hi) {
      std::vector<acc> buf(N);  // s of the current row
      acc* sb = buf.data();
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* xr = xp + r * N;
        const scalar_t* rr = rp + r * N;
        // Pass 1 (memory): s = x + residual into the buffer, and its sum (LayerNorm) or sum of
        // squares (RMSNorm).
        const acc first = lane_sum<acc>(N, [&](int64_t i) {
          const acc v = static_cast<acc>(xr[i]) + static_cast<acc>(rr[i]);
          sb[i] = v;
          return centered ? v : v * v;
        });
        if (sp) {
          scalar_t* so = sp + r * N;
          for (int64_t i = 0; i < N; ++i) so[i] = static_cast<scalar_t>(sb[i]);
        }
        acc mu = acc(0), ss = first;
        if (centered) {  // two-pass variance from the buffer, as the plain LayerNorm kernel
          mu = first / n_acc;
          ss = lane_sum<acc>(N, [&](int64_t i) {
            const acc v = sb[i] - mu;
            return v * v;
          });
        }
        const acc rs = acc(1) / std::sqrt(ss / n_acc + e);
        scalar_t* out = yp + r * N;
        if (wp && bp) {
          for (int64_t i = 0; i < N; ++i)
            out[i] = static_cast<scalar_t>((sb[i] - mu) * rs * wp[i] + bp[i]);
        } else if (wp) {
          for (int64_t i = 0; i < N; ++i) out[i] = static_cast<scalar_t>((sb[i] - mu) * rs * wp[i]);
        } else if (bp) {
          for (int64_t i = 0; i < N; ++i) out[i] = static_cast<scalar_t>((sb[i] - mu) * rs + bp[i]);
        } else {
          for (int64_t i = 0; i < N; ++i) out[i] = static_cast<scalar_t>((sb[i] - mu) * rs);
        }
        if (mp) mp[r] = mu;
        rsp[r] = rs;
      }
    });
  });
  return {y, s, mean, rstd};
}

// ds = rstd * (gh - mean(gh) - xhat * mean(gh * xhat)) + grad_sum with gh = g * w and
// xhat = (s - mean) * rstd (the mean(gh) term only when centered); dw = sum_rows g * xhat,
// db = sum_rows g, from fixed 32-row chunk partials as row_norm_backward.
std::tuple<Tensor, Tensor, Tensor> add_row_norm_backward(
    const Tensor& grad_in, const OptTensor& grad_sum_in, const Tensor& x_in, const Tensor& r_in,
    int64_t nd, const OptTensor& weight, const OptTensor& bias, const Tensor& mean_in,
    const Tensor& rstd_in, bool centered) {
  check_residual(x_in, r_in);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "fused_pool: grad of shape ", grad_in.sizes(),
              " does not match x of shape ", x_in.sizes());
  if (grad_sum_in.has_value()) {
    TORCH_CHECK(grad_sum_in->sizes() == x_in.sizes(), "fused_pool: grad_sum of shape ",
                grad_sum_in->sizes(), " does not match x of shape ", x_in.sizes());
  }
  const Tensor x = x_in.contiguous(), res = r_in.contiguous();
  const Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const Tensor gsum = grad_sum_in.has_value() ? grad_sum_in->to(x.scalar_type()).contiguous()
                                              : Tensor();
  const Tensor mean = centered ? mean_in.contiguous() : Tensor(), rstd = rstd_in.contiguous();
  const int64_t N = c10::multiply_integers(x.sizes().slice(x.dim() - nd));
  const int64_t M = N ? x.numel() / N : 0;
  TORCH_CHECK(rstd.numel() == M && rstd.scalar_type() == acc_scalar_type(x),
              "fused_pool: rstd must be a ", acc_scalar_type(x), " tensor of ", M, " elements");
  if (centered) {
    TORCH_CHECK(mean.numel() == M && mean.scalar_type() == acc_scalar_type(x),
                "fused_pool: mean must be a ", acc_scalar_type(x), " tensor of ", M, " elements");
  }
  Tensor gs = empty_cpu(x.sizes(), x.options());
  const Tensor w = param_acc(weight, x);
  const int64_t chunks = ceil_div(M, kRowsPerChunk);
  Tensor gw = weight.has_value() ? Tensor() : x.new_zeros({0});
  Tensor gb = bias.has_value() ? Tensor() : x.new_zeros({0});
  FP_DISPATCH(x.scalar_type(), "add_row_norm_backward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* gsp = gsum.defined() ? gsum.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = gs.mutable_data_ptr<scalar_t>();
    const acc* mp = centered ? mean.const_data_ptr<acc>() : nullptr;
    const acc* rsp = rstd.const_data_ptr<acc>();
    const acc* wp = ptr_or_null<acc>(w);
    std::vector<acc> pw(weight.has_value() ? chunks * N : 0, 0);
    std::vector<acc> pb(bias.has_value() ? chunks * N : 0, 0);
    const acc n_acc = static_cast<acc>(std::max<int64_t>(N, 1));
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc> buf(2 * N);  // xhat and gh = g * w of the current row
      acc* xh = buf.data();
      acc* gh = xh + N;
      for (int64_t ch = lo; ch < hi; ++ch) {
        acc* pwc = pw.empty() ? nullptr : pw.data() + ch * N;
        acc* pbc = pb.empty() ? nullptr : pb.data() + ch * N;
        for (int64_t r = ch * kRowsPerChunk; r < std::min(M, (ch + 1) * kRowsPerChunk); ++r) {
          const scalar_t* xr = xp + r * N;
          const scalar_t* rr = rp + r * N;
          const scalar_t* gr = gp + r * N;
          const acc mu = mp ? mp[r] : acc(0), rs = rsp[r];
          // Pass 1 (memory): xhat and gh into the buffers, with sum gh and sum gh * xhat.
          acc sum_g, sum_gx;
          lane_sum2<acc>(
              N,
              [&](int64_t i) {
                const acc v = (static_cast<acc>(xr[i]) + static_cast<acc>(rr[i]) - mu) * rs;
                const acc g = static_cast<acc>(gr[i]);
                xh[i] = v;
                gh[i] = wp ? g * wp[i] : g;
                return gh[i];
              },
              [&](int64_t i) { return gh[i] * xh[i]; }, sum_g, sum_gx);
          // Pass 2 (cache): parameter partials and the gradient.
          if (pwc) {
            for (int64_t i = 0; i < N; ++i) pwc[i] += static_cast<acc>(gr[i]) * xh[i];
          }
          if (pbc) {
            for (int64_t i = 0; i < N; ++i) pbc[i] += static_cast<acc>(gr[i]);
          }
          const acc a = centered ? sum_g / n_acc : acc(0), c = sum_gx / n_acc;
          scalar_t* out = op + r * N;
          if (gsp) {
            const scalar_t* gsr = gsp + r * N;
            for (int64_t i = 0; i < N; ++i)
              out[i] = static_cast<scalar_t>(rs * (gh[i] - a - xh[i] * c) +
                                             static_cast<acc>(gsr[i]));
          } else {
            for (int64_t i = 0; i < N; ++i)
              out[i] = static_cast<scalar_t>(rs * (gh[i] - a - xh[i] * c));
          }
        }
      }
    });
    if (weight.has_value()) gw = reduce_partials(pw, chunks, N, *weight).view(weight->sizes());
    if (bias.has_value()) gb = reduce_partials(pb, chunks, N, *bias).view(bias->sizes());
  });
  return {gs, gw, gb};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_cpu(const Tensor& x,
                                                              const Tensor& residual, int64_t nd,
                                                              const OptTensor& weight,
                                                              const OptTensor& bias, double eps,
                                                              bool return_residual) {
  return add_row_norm_forward(x, residual, nd, weight, bias, eps, return_residual, true);
}

std::tuple<Tensor, Tensor, Tensor> add_layer_norm_backward_cpu(
    const Tensor& grad, const OptTensor& grad_sum, const Tensor& x, const Tensor& residual,
    int64_t nd, const OptTensor& weight, const OptTensor& bias, const Tensor& mean,
    const Tensor& rstd) {
  return add_row_norm_backward(grad, grad_sum, x, residual, nd, weight, bias, mean, rstd, true);
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_cpu(const Tensor& x, const Tensor& residual,
                                                    int64_t nd, const OptTensor& weight,
                                                    double eps, bool return_residual) {
  auto [y, s, mean, rstd] =
      add_row_norm_forward(x, residual, nd, weight, std::nullopt, eps, return_residual, false);
  return {y, s, rstd};
}

std::tuple<Tensor, Tensor> add_rms_norm_backward_cpu(const Tensor& grad, const OptTensor& grad_sum,
                                                     const Tensor& x, const Tensor& residual,
                                                     int64_t nd, const OptTensor& weight,
                                                     const Tensor& rstd) {
  auto [gs, gw, gb] = add_row_norm_backward(grad, grad_sum, x, residual, nd, weight, std::nullopt,
                                            Tensor(), rstd, false);
  return {gs, gw};
}

// ---------------------------------------------------------------------------------------------
// InstanceNorm: x [B, C, *] as rows [B*C, S] with per-channel weight and bias.
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> instance_norm_cpu(const Tensor& x_in, const OptTensor& weight,
                                                     const OptTensor& bias, double eps) {
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), S = c10::multiply_integers(x.sizes().slice(2));
  Tensor y = empty_cpu(x.sizes(), x.options());
  Tensor mean = at::empty({B, C}, x.options().dtype(acc_scalar_type(x)));
  Tensor rstd = at::empty({B, C}, x.options().dtype(acc_scalar_type(x)));
  const Tensor w = param_acc(weight, x), bb = param_acc(bias, x);
  FP_DISPATCH(x.scalar_type(), "instance_norm_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc* mp = mean.mutable_data_ptr<acc>();
    acc* rp = rstd.mutable_data_ptr<acc>();
    const acc* wp = ptr_or_null<acc>(w);
    const acc* bp = ptr_or_null<acc>(bb);
    at::parallel_for(0, B * C, 4, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = xp + r * S;
        const acc mu = lane_sum<acc>(S, [&](int64_t i) { return static_cast<acc>(row[i]); }) /
                       std::max<int64_t>(S, 1);
        const acc ss = lane_sum<acc>(S, [&](int64_t i) {
          const acc v = static_cast<acc>(row[i]) - mu;
          return v * v;
        });
        const acc rs = acc(1) / std::sqrt(ss / std::max<int64_t>(S, 1) + static_cast<acc>(eps));
        const acc scale = wp ? wp[r % C] * rs : rs;
        const acc shift = bp ? bp[r % C] : acc(0);
        scalar_t* out = yp + r * S;
        for (int64_t i = 0; i < S; ++i) {
          out[i] = static_cast<scalar_t>((static_cast<acc>(row[i]) - mu) * scale + shift);
        }
        mp[r] = mu;
        rp[r] = rs;
      }
    });
  });
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> instance_norm_backward_cpu(
    const Tensor& grad_in, const Tensor& x_in, const OptTensor& weight, const OptTensor& bias,
    const Tensor& mean_in, const Tensor& rstd_in) {
  const Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), S = c10::multiply_integers(x.sizes().slice(2));
  Tensor gx = empty_cpu(x.sizes(), x.options());
  const Tensor w = param_acc(weight, x);
  Tensor gw = weight.has_value() ? Tensor() : x.new_zeros({0});
  Tensor gb = bias.has_value() ? Tensor() : x.new_zeros({0});
  FP_DISPATCH(x.scalar_type(), "instance_norm_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const acc* mp = mean.const_data_ptr<acc>();
    const acc* rp = rstd.const_data_ptr<acc>();
    const acc* wp = ptr_or_null<acc>(w);
    std::vector<acc> row_gw(B * C, 0), row_gb(B * C, 0);  // per-row partials, [B, C]
    at::parallel_for(0, B * C, 4, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = xp + r * S;
        const scalar_t* grow = gp + r * S;
        const acc mu = mp[r], rs = rp[r], wc = wp ? wp[r % C] : acc(1);
        const acc sum_g = lane_sum<acc>(S, [&](int64_t i) { return static_cast<acc>(grow[i]); });
        const acc sum_gx = lane_sum<acc>(S, [&](int64_t i) {
          return static_cast<acc>(grow[i]) * (static_cast<acc>(row[i]) - mu) * rs;
        });
        row_gw[r] = sum_gx;
        row_gb[r] = sum_g;
        const acc a = wc * sum_g / std::max<int64_t>(S, 1);
        const acc c = wc * sum_gx / std::max<int64_t>(S, 1);
        scalar_t* out = gxp + r * S;
        for (int64_t i = 0; i < S; ++i) {
          const acc xh = (static_cast<acc>(row[i]) - mu) * rs;
          out[i] = static_cast<scalar_t>(rs * (wc * static_cast<acc>(grow[i]) - a - xh * c));
        }
      }
    });
    // Rows are [B, C]: sum over B in order per channel.
    if (weight.has_value()) gw = reduce_partials(row_gw, B, C, *weight);
    if (bias.has_value()) gb = reduce_partials(row_gb, B, C, *bias);
  });
  return {gx, gw, gb};
}

// ---------------------------------------------------------------------------------------------
// Masked InstanceNorm: per (sequence, feature) over valid tokens; padded outputs are 0.
// Each (sequence, block of D) task makes three passes over its valid tokens (mean, variance,
// output); the block of a sequence is small enough that passes two and three hit the cache.
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> masked_instance_norm_cpu(const Tensor& x, const OptTensor& mask,
                                                            const OptTensor& cu_seqlens,
                                                            const OptTensor& weight,
                                                            const OptTensor& bias, double eps) {
  const Seqs s = make_seqs(x, mask, cu_seqlens);
  const int64_t rows = cu_seqlens.has_value() ? x.size(0) : 0;
  Tensor y = empty_cpu(x.sizes(), x.options());
  const Seqs ys = make_seqs(y, mask, cu_seqlens);
  Tensor mean = at::empty({s.B, s.D}, x.options().dtype(acc_scalar_type(x)));
  Tensor rstd = at::empty({s.B, s.D}, x.options().dtype(acc_scalar_type(x)));
  const Tensor w = param_acc(weight, x), bb = param_acc(bias, x);
  FP_DISPATCH(x.scalar_type(), "masked_instance_norm_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc* mp = mean.mutable_data_ptr<acc>();
    acc* rp = rstd.mutable_data_ptr<acc>();
    const acc* wp = ptr_or_null<acc>(w);
    const acc* bp = ptr_or_null<acc>(bb);
    zero_uncovered_rows(ys, rows, yp);
    unit_stride(s.sD == 1, [&](auto unit) {
      const auto st = stride_of(unit, s.sD);
      parallel_over_blocks(s.B, s.D, [&](int64_t b, int64_t d0, int64_t d1) {
        const int64_t width = d1 - d0;
        TokenSum<acc> sum, sq;
        int64_t n = 0;
        s.for_each_valid(b, [&](int64_t, int64_t off) {
          ++n;
          sum.add(xp + off + d0 * st, st, width);
        });
        sum.flush(width);
        const acc denom = static_cast<acc>(std::max<int64_t>(n, 1));
        acc mu[kBlockD], centered[kBlockD];
        for (int64_t i = 0; i < width; ++i) mu[i] = sum.total[i] / denom;
        s.for_each_valid(b, [&](int64_t, int64_t off) {
          const scalar_t* row = xp + off + d0 * st;
          for (int64_t i = 0; i < width; ++i) {
            const acc v = static_cast<acc>(row[i * st]) - mu[i];
            centered[i] = v * v;
          }
          sq.add(centered, 1, width);
        });
        sq.flush(width);
        const acc* var = sq.total;
        acc scale[kBlockD], shift[kBlockD];
        for (int64_t i = 0; i < width; ++i) {
          const acc rs = acc(1) / std::sqrt(var[i] / denom + static_cast<acc>(eps));
          mp[b * s.D + d0 + i] = mu[i];
          rp[b * s.D + d0 + i] = rs;
          scale[i] = wp ? wp[d0 + i] * rs : rs;
          shift[i] = bp ? bp[d0 + i] : acc(0);
        }
        const int64_t len = ys.len(b);
        for (int64_t j = 0; j < len; ++j) {
          scalar_t* out = yp + ys.start(b) + j * ys.sL + d0;
          if (!s.valid(b, j)) {
            std::fill(out, out + width, scalar_t(0));
            continue;
          }
          const scalar_t* row = xp + s.start(b) + j * s.sL + d0 * st;
          for (int64_t i = 0; i < width; ++i) {
            // (x - mean) first: folding the mean into the shift cancels badly when rstd is large.
            out[i] = static_cast<scalar_t>((static_cast<acc>(row[i * st]) - mu[i]) * scale[i] +
                                           shift[i]);
          }
        }
      });
    });
  });
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> masked_instance_norm_backward_cpu(
    const Tensor& grad, const Tensor& x, const OptTensor& mask, const OptTensor& cu_seqlens,
    const OptTensor& weight, const OptTensor& bias, const Tensor& mean_in, const Tensor& rstd_in) {
  const Seqs s = make_seqs(x, mask, cu_seqlens);
  const Seqs gs = make_seqs(grad, mask, cu_seqlens);
  const Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t rows = cu_seqlens.has_value() ? x.size(0) : 0;
  Tensor gx = empty_cpu(x.sizes(), x.options());
  const Seqs go = make_seqs(gx, mask, cu_seqlens);
  const Tensor w = param_acc(weight, x);
  Tensor gw = weight.has_value() ? Tensor() : x.new_zeros({0});
  Tensor gb = bias.has_value() ? Tensor() : x.new_zeros({0});
  FP_DISPATCH(x.scalar_type(), "masked_instance_norm_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const acc* mp = mean.const_data_ptr<acc>();
    const acc* rp = rstd.const_data_ptr<acc>();
    const acc* wp = ptr_or_null<acc>(w);
    std::vector<acc> part_w(s.B * s.D, 0), part_b(s.B * s.D, 0);  // [B, D], summed over B
    zero_uncovered_rows(go, rows, gxp);
    unit_stride(s.sD == 1 && gs.sD == 1, [&](auto unit) {
      const auto st = stride_of(unit, s.sD);
      const auto gst = stride_of(unit, gs.sD);
      parallel_over_blocks(s.B, s.D, [&](int64_t b, int64_t d0, int64_t d1) {
        const int64_t width = d1 - d0;
        TokenSum<acc> tg, tgx;
        int64_t n = 0;
        const acc* mu = mp + b * s.D + d0;
        const acc* rs = rp + b * s.D + d0;
        acc gv[kBlockD], gxv[kBlockD];
        s.for_each_valid(b, [&](int64_t j, int64_t off) {
          const scalar_t* row = xp + off + d0 * st;
          const scalar_t* grow = gp + gs.start(b) + j * gs.sL + d0 * gst;
          ++n;
          for (int64_t i = 0; i < width; ++i) {
            const acc xh = (static_cast<acc>(row[i * st]) - mu[i]) * rs[i];
            gv[i] = static_cast<acc>(grow[i * gst]);
            gxv[i] = gv[i] * xh;
          }
          tg.add(gv, 1, width);
          tgx.add(gxv, 1, width);
        });
        tg.flush(width);
        tgx.flush(width);
        const acc* sum_g = tg.total;
        const acc* sum_gx = tgx.total;
        const acc denom = static_cast<acc>(std::max<int64_t>(n, 1));
        acc a[kBlockD], c[kBlockD], wv[kBlockD];
        for (int64_t i = 0; i < width; ++i) {
          part_w[b * s.D + d0 + i] = sum_gx[i];
          part_b[b * s.D + d0 + i] = sum_g[i];
          wv[i] = wp ? wp[d0 + i] : acc(1);
          a[i] = wv[i] * sum_g[i] / denom;
          c[i] = wv[i] * sum_gx[i] / denom;
        }
        const int64_t len = go.len(b);
        for (int64_t j = 0; j < len; ++j) {
          scalar_t* out = gxp + go.start(b) + j * go.sL + d0;
          if (!s.valid(b, j)) {
            std::fill(out, out + width, scalar_t(0));
            continue;
          }
          const scalar_t* row = xp + s.start(b) + j * s.sL + d0 * st;
          const scalar_t* grow = gp + gs.start(b) + j * gs.sL + d0 * gst;
          for (int64_t i = 0; i < width; ++i) {
            const acc xh = (static_cast<acc>(row[i * st]) - mu[i]) * rs[i];
            const acc g = static_cast<acc>(grow[i * gst]);
            out[i] = static_cast<scalar_t>(rs[i] * (wv[i] * g - a[i] - xh * c[i]));
          }
        }
      });
    });
    if (weight.has_value()) gw = reduce_partials(part_w, s.B, s.D, *weight);
    if (bias.has_value()) gb = reduce_partials(part_b, s.B, s.D, *bias);
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool_cpp, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("add_layer_norm", &add_layer_norm_cpu);
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("add_rms_norm_backward", &add_rms_norm_backward_cpu);
  m.impl("instance_norm", &instance_norm_cpu);
  m.impl("instance_norm_backward", &instance_norm_backward_cpu);
  m.impl("masked_instance_norm", &masked_instance_norm_cpu);
  m.impl("masked_instance_norm_backward", &masked_instance_norm_backward_cpu);
}

}  // namespace fused_pool
