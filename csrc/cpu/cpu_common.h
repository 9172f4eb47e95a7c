// Helpers shared by the CPU kernels (csrc/cpu/*.cpp): the output allocator, the host view of the
// token layout, and the loop and vectorization helpers.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../common.h"

namespace fused_pool {

// The allocator of CPU outputs of [B, L, D] size (gradients of x, norm outputs, the weighted-layer
// output). A fresh 50 MB tensor costs ~12k page faults on first touch (~15 ms on a 2-core
// machine, more than the kernel that fills it), paid again at every training step since glibc
// returns such blocks to the kernel. So blocks of 16 MiB and more go on 2 MiB-aligned memory with
// a transparent-huge-page hint (~25 faults instead), and freed blocks are kept, like the CUDA
// caching allocator does, for the next output of the same size: at most FUSED_POOL_CPU_CACHE_MB
// (default 1024; 0 disables) are held. Allocations are reported to the torch profiler like the
// default CPU allocator's (bytes in use, and bytes reserved including the cache). Smaller blocks
// use torch's default CPU allocator.
class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHuge = size_t(2) << 20;
  static constexpr size_t kMinBytes = 8 * kHuge;

  c10::DataPtr allocate(size_t nbytes) override {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (nbytes >= kMinBytes) {
      const size_t rounded = (nbytes + kHuge - 1) / kHuge * kHuge;
      void* p = take_cached(rounded);
      if (p == nullptr && posix_memalign(&p, kHuge, rounded) == 0) {
        madvise(p, rounded, MADV_HUGEPAGE);
        std::lock_guard<std::mutex> lock(mutex_);
        reserved_ += rounded;
      }
      if (p != nullptr) {
        auto* ctx = new Block{p, rounded, this};
        report(p, static_cast<int64_t>(rounded));
        return {p, ctx, &release, c10::Device(c10::DeviceType::CPU)};
      }
    }
#endif
    return c10::GetCPUAllocator()->allocate(nbytes);
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
    HugePageAllocator* owner;
  };

  static size_t cache_limit() {
    static const size_t limit = [] {
      const char* v = std::getenv("FUSED_POOL_CPU_CACHE_MB");
      return static_cast<size_t>(v ? std::atoll(v) : 1024) << 20;
    }();
    return limit;
  }

  void* take_cached(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = cache_.find(bytes);
    if (it == cache_.end()) return nullptr;
    void* p = it->second;
    cache_.erase(it);
    cached_ -= bytes;
    return p;
  }

  void report(void* p, int64_t delta) {
    size_t in_use, reserved;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ = static_cast<size_t>(static_cast<int64_t>(in_use_) + delta);
      in_use = in_use_;
      reserved = reserved_;
    }
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, delta, in_use, reserved,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    HugePageAllocator* self = b->owner;
    self->report(b->ptr, -static_cast<int64_t>(b->bytes));
    bool keep;
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      keep = self->cached_ + b->bytes <= cache_limit();
      if (keep) {
        self->cache_.emplace(b->bytes, b->ptr);
        self->cached_ += b->bytes;
      } else {
        self->reserved_ -= b->bytes;
      }
    }
    if (!keep) std::free(b->ptr);
    delete b;
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> cache_;  // rounded size -> free block
  size_t cached_ = 0, in_use_ = 0, reserved_ = 0;
};

// An uninitialized contiguous CPU tensor from HugePageAllocator.
inline Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  // Never destroyed: tensors may outlive static destruction at interpreter exit.
  static HugePageAllocator* allocator = new HugePageAllocator();
  return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

// Features handled by one task: a block of D so each task's accumulators stay in L1.
constexpr int64_t kBlockD = 256;

// A token layout (see fill_token_layout) with cu_seqlens copied to the host and L the longest
// sequence.
struct Seqs {
  int64_t B = 0, L = 0, D = 0;
  int64_t sB = 0, sL = 0, sD = 1;
  const bool* mask = nullptr;
  int64_t mB = 0, mL = 0;
  std::vector<int64_t> cu;  // empty: padded layout

  int64_t start(int64_t b) const { return cu.empty() ? b * sB : cu[b] * sL; }
  int64_t len(int64_t b) const { return cu.empty() ? L : cu[b + 1] - cu[b]; }
  bool valid(int64_t b, int64_t j) const { return mask == nullptr || mask[b * mB + j * mL]; }
  int64_t count(int64_t b) const {
    if (mask == nullptr) return len(b);
    int64_t n = 0;
    for (int64_t j = 0; j < L; ++j) n += valid(b, j);
    return n;
  }
  // Calls f(j, offset of token j) for every valid token of sequence b, in token order.
  // Padded tokens are never touched.
  template <typename F>
  void for_each_valid(int64_t b, F&& f) const {
    const int64_t base = start(b), n = len(b);
    for (int64_t j = 0; j < n; ++j) {
      if (valid(b, j)) f(j, base + j * sL);
    }
  }
};

inline Seqs make_seqs(const Tensor& t, const OptTensor& mask, const OptTensor& cu_seqlens) {
  Seqs s;
  fill_token_layout(t, mask, cu_seqlens, &s);
  if (!cu_seqlens.has_value()) return s;
  const Tensor cu = cu_seqlens->to(at::kCPU, at::kLong).contiguous();
  const int64_t* c = cu.const_data_ptr<int64_t>();
  s.cu.assign(c, c + cu.numel());
  int64_t lmax = 0;
  for (int64_t b = 0; b < s.B; ++b) {
    // The Python layer checks cu_seqlens; check anyway so bad offsets never read out of bounds.
    TORCH_CHECK(s.cu[b] >= 0 && s.cu[b] <= s.cu[b + 1] && s.cu[b + 1] <= t.size(0),
                "fused_pool: cu_seqlens must be non-decreasing within [0, T]");
    lmax = std::max(lmax, s.cu[b + 1] - s.cu[b]);
  }
  s.L = lmax;
  return s;
}

// Writes zero rows of a packed output that no sequence covers (only reachable if cu_seqlens
// does not start at 0 or end at T, which the Python layer rejects outside torch.compile).
template <typename T>
inline void zero_uncovered_rows(const Seqs& s, int64_t total_rows, T* out) {
  if (s.cu.empty()) return;
  const int64_t first = s.B > 0 ? s.cu[0] : total_rows;
  const int64_t last = s.B > 0 ? s.cu[s.B] : total_rows;
  std::fill(out, out + first * s.D, T(0));
  std::fill(out + last * s.D, out + total_rows * s.D, T(0));
}

// sum_{i < n} f(i) with 16 independent partial sums combined pairwise: the compiler vectorizes
// the lanes (a plain `s += f(i)` loop is a serial float dependency chain), and the rounding
// error grows like n / 16 + log 16 rather than n.
template <typename acc, typename F>
inline acc lane_sum(int64_t n, F&& f) {
  constexpr int64_t W = 16;
  acc lanes[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    for (int64_t k = 0; k < W; ++k) lanes[k] += f(i + k);
  }
  for (int64_t k = 0; i + k < n; ++k) lanes[k] += f(i + k);
  for (int64_t w = W / 2; w > 0; w /= 2) {
    for (int64_t k = 0; k < w; ++k) lanes[k] += lanes[k + w];
  }
  return lanes[0];
}

// Per-feature sums over a sequence's tokens, two-level: tokens accumulate into `part`, which is
// added into `total` every kFlush tokens, so long sequences keep float32 sums accurate
// (error ~ (kFlush + n / kFlush) eps instead of n eps).
template <typename acc>
struct TokenSum {
  static constexpr int64_t kFlush = 64;
  acc total[kBlockD] = {}, part[kBlockD] = {};
  int64_t pending = 0;

  template <typename T, typename St>
  void add(const T* row, St stride, int64_t w, acc scale = acc(1)) {
    for (int64_t i = 0; i < w; ++i) part[i] += scale * static_cast<acc>(row[i * stride]);
    if (++pending == kFlush) flush(w);
  }
  void flush(int64_t w) {
    for (int64_t i = 0; i < w; ++i) {
      total[i] += part[i];
      part[i] = 0;
    }
    pending = 0;
  }
};

// Feature strides: kernels index rows as `row[i * st]` with `st = stride_of(unit, sD)`. Under
// `unit_stride(sD == 1, f)` the contiguous case gets a compile-time 1, so its loops vectorize;
// other strides still work, element by element.
using Unit = std::true_type;
using Strided = std::false_type;
inline constexpr std::integral_constant<int64_t, 1> stride_of(Unit, int64_t) { return {}; }
inline int64_t stride_of(Strided, int64_t stride) { return stride; }

template <typename F>
inline void unit_stride(bool contiguous, F&& f) {
  if (contiguous) {
    f(Unit{});
  } else {
    f(Strided{});
  }
}

// Parallel loop over (b, block of D) tasks.
template <typename F>
inline void parallel_over_blocks(int64_t B, int64_t D, F&& f) {
  const int64_t nblk = std::max<int64_t>(1, ceil_div(D, kBlockD));
  at::parallel_for(0, B * nblk, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / nblk, d0 = (task % nblk) * kBlockD;
      f(b, d0, std::min(D, d0 + kBlockD));
    }
  });
}

}  // namespace fused_pool
