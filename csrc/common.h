// What the host code of the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) shares: the
// dtype dispatch, the accumulation types and the token layout's validation. Nothing CPU- or
// CUDA-specific belongs here: every .cu file includes it.
#pragma once

// Not <ATen/ATen.h>: it declares every ATen operator, and parsing it cost each translation unit
// ~3-8 s (seven of them, on every CI build). The kernels need Tensor and two factories.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fused_pool {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// float accumulation for half/bfloat16/float, double for double.
template <typename T>
using acc_t = at::opmath_type<T>;

#define FP_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The accumulation (and statistics) dtype of x: double for double, float for half/bfloat16/float
// (the twin of fused_pool._schema.acc_dtype).
inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}
inline at::ScalarType acc_scalar_type(const Tensor& x) {
  return acc_scalar_type(x.scalar_type());
}

// A norm's weight/bias as a contiguous accumulation-type vector on x's device (undefined when
// absent).
inline Tensor param_acc(const OptTensor& p, const Tensor& x) {
  if (!p.has_value()) return Tensor();
  return p->to(x.options().dtype(acc_scalar_type(x))).contiguous();
}

template <typename A>
const A* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

// Every tensor an op touches must live on the device of `x` (the Python layer checks this too;
// this is the last line of defence against reading another device's memory).
inline void check_same_device(const Tensor& x, const OptTensor& t, const char* what) {
  if (t.has_value()) {
    TORCH_CHECK(t->device() == x.device(), "fused_pool: ", what, " must be on ", x.device(),
                " like x, got ", t->device());
  }
}

// The residual of a fused residual-add norm is x's twin: same shape, dtype and device (the
// Python layer checks this too).
inline void check_residual(const Tensor& x, const Tensor& residual) {
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type() &&
                  residual.device() == x.device(),
              "fused_pool: residual must have the shape, dtype and device of x, got residual ",
              residual.scalar_type(), " ", residual.sizes(), " on ", residual.device(), " and x ",
              x.scalar_type(), " ", x.sizes(), " on ", x.device());
}

// Fills `s` (the CPU kernels' Seqs or the CUDA kernels' SeqLayout, which both have these
// fields) with the layout of `t` (x, or a gradient shaped like x) given mask/cu_seqlens, after
// checking shapes, dtypes and devices. Where sequence b's token j lives:
//   padded [B, L, D] (+ optional bool mask [B, L]): x + b*sB + j*sL + d*sD, valid where mask;
//   packed [T, D] + cu_seqlens [B + 1]:             x + (cu[b] + j)*sL + d*sD, all valid.
// Offsets are int64 so tensors past 2^31 elements index correctly. Packed input gets L = T, an
// upper bound of every length: cu_seqlens is not read here (it may be on the GPU). A template
// rather than a base struct of Seqs and SeqLayout: with SeqLayout derived from a base, nvcc 13.0
// generated different code for the masked InstanceNorm kernels, which take it by value.
template <typename Layout>
inline void fill_token_layout(const Tensor& t, const OptTensor& mask,
                              const OptTensor& cu_seqlens, Layout* s) {
  check_same_device(t, mask, "mask");
  check_same_device(t, cu_seqlens, "cu_seqlens");
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(t.dim() == 2, "fused_pool: packed input must be [T, D], got ", t.sizes());
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 1,
                "fused_pool: cu_seqlens must be a non-empty 1-D tensor");
    const auto dt = cu_seqlens->scalar_type();
    TORCH_CHECK(dt == at::kInt || dt == at::kLong, "fused_pool: cu_seqlens must be int32 or int64");
    s->B = cu_seqlens->numel() - 1;
    s->L = t.size(0);
    s->D = t.size(1);
    s->sL = t.stride(0);
    s->sD = t.stride(1);
  } else {
    TORCH_CHECK(t.dim() == 3, "fused_pool: padded input must be [B, L, D], got ", t.sizes());
    s->B = t.size(0);
    s->L = t.size(1);
    s->D = t.size(2);
    s->sB = t.stride(0);
    s->sL = t.stride(1);
    s->sD = t.stride(2);
    if (mask.has_value()) {
      TORCH_CHECK(mask->scalar_type() == at::kBool, "fused_pool: mask must be bool");
      TORCH_CHECK(mask->dim() == 2, "fused_pool: mask must be [B, L], got ", mask->sizes());
      s->mask = mask->const_data_ptr<bool>();
      s->mB = mask->stride(0);
      s->mL = mask->stride(1);
    }
  }
}

// Shape of a gradient of x: [B, num_tokens, D] (padded) or [num_tokens, D] (packed).
inline std::vector<int64_t> grad_x_shape(int64_t B, int64_t num_tokens, int64_t D, bool packed) {
  if (packed) return {num_tokens, D};
  return {B, num_tokens, D};
}

}  // namespace fused_pool
