// CPU kernels of the fused linear + cross-entropy op (semantics: the header of megaclass_ops.cpp).
//
// Each row of a chunk is independent, so rows are split over threads (at::parallel_for, OpenMP). A row
// of C_local logits (200 KB at 50k fp32 classes) stays in the core's L2 cache between the two reads of
// the statistics pass (max and Σz, then exp), so each pass costs one trip to memory per element at most,
// and the exponentials are computed once: stored in place (store_exp) for the gradient pass.
// Arithmetic is fp32 (at::vec::Vectorized<float>, AVX2/AVX-512 when the build enables them) for every
// input dtype; bf16/fp16 are widened on load and rounded on store.

// The vector width follows the compiler's target (setup.py passes -march): ATen's headers pick their
// implementation from these macros.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "lce.h"

namespace megaclass {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kStep = 2 * Vec::size();  // elements per loop trip: two float vectors
constexpr float kInf = std::numeric_limits<float>::infinity();

template <typename T>
inline void load2(const T* p, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  } else {
    at::vec::load_to_float<T>(p, a, b);
  }
}

template <typename T>
inline void store2(T* p, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + Vec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, v);
}

// Rows per task: enough work per task to amortize the fork, at least one row.
inline int64_t grain(int64_t cols) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
}

// Statistics of one row z[0, cols): out[0] = max, out[1] = Σ exp(z − max), out[3] = Σ z (out[2] is set
// by the caller). With store_exp, z becomes exp(z − max). `next`: the row to be visited next (or
// nullptr), fetched into cache during the exponentials, so that its first read overlaps this row's
// arithmetic instead of waiting on memory.
template <typename T>
void row_stats(T* z, int64_t cols, bool store_exp, float& max_out, float& sumexp_out, float& sum_out,
               const T* next) {
  Vec m0(-kInf), m1(-kInf), s0(0.f), s1(0.f);
  int64_t c = 0;
  for (; c + kStep <= cols; c += kStep) {
    Vec a, b;
    load2(z + c, a, b);
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, b);
    s0 += a;
    s1 += b;
  }
  float m = hmax(at::vec::maximum(m0, m1));
  float sum = hsum(s0 + s1);
  for (int64_t k = c; k < cols; ++k) {
    const float v = static_cast<float>(z[k]);
    m = std::max(m, v);
    sum += v;
  }
  const float ref = m == -kInf ? 0.f : m;  // every value −inf (or no values): each term is exp(−inf) = 0
  const Vec vref(ref);
  Vec e0(0.f), e1(0.f);
  for (c = 0; c + kStep <= cols; c += kStep) {
    if (next != nullptr) {
      for (int64_t byte = 0; byte < kStep * static_cast<int64_t>(sizeof(T)); byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(next + c) + byte);
      }
    }
    Vec a, b;
    load2(z + c, a, b);
    a = (a - vref).exp_u20();
    b = (b - vref).exp_u20();
    e0 += a;
    e1 += b;
    if (store_exp) store2(z + c, a, b);
  }
  float sumexp = hsum(e0 + e1);
  for (int64_t k = c; k < cols; ++k) {
    const float e = std::exp(static_cast<float>(z[k]) - ref);
    sumexp += e;
    if (store_exp) z[k] = static_cast<T>(e);
  }
  max_out = m;
  sumexp_out = sumexp;
  sum_out = sum;
}

// A row of a group of one rank holds every class, so its lse is known as soon as its statistics are:
// the gradient g = k·(e / Σe − uniform) is made in the same visit, while the row is still in cache
// (the separate gradient pass would bring it back from memory). zt: the row's target logit, or 0.
template <typename T>
void row_stats_grad(T* z, int64_t cols, int64_t t, float zt, float k, float target_coef, float uniform_coef,
                    float& max_out, float& sumexp_out, float& sum_out, const T* next) {
  row_stats(z, cols, /*store_exp=*/true, max_out, sumexp_out, sum_out, next);
  if (k == 0.f) {
    std::fill(z, z + cols, static_cast<T>(0.f));
    return;
  }
  const float scale = 1.f / sumexp_out;
  const Vec vk(k * scale), voff(-k * uniform_coef);
  int64_t c = 0;
  for (; c + kStep <= cols; c += kStep) {
    Vec a, b;
    load2(z + c, a, b);
    store2(z + c, at::vec::fmadd(a, vk, voff), at::vec::fmadd(b, vk, voff));
  }
  for (; c < cols; ++c) z[c] = static_cast<T>(k * (static_cast<float>(z[c]) * scale - uniform_coef));
  if (t >= 0 && t < cols) {  // from the fp32 target logit, so that bf16/fp16 round once
    z[t] = static_cast<T>(k * (std::exp(zt - max_out) * scale - target_coef - uniform_coef));
  }
}

template <typename T>
void stats_grad_kernel(at::Tensor& logits, const at::Tensor& target, const at::Tensor& row_coef, float target_coef,
                       float uniform_coef, at::Tensor& out) {
  const int64_t rows = logits.size(0), cols = logits.size(1), ld = row_pitch(logits);
  T* base = logits.data_ptr<T>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const float* kc = row_coef.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* z = base + r * ld;
      const int64_t t = tgt[r];
      const float zt = (t >= 0 && t < cols) ? static_cast<float>(z[t]) : 0.f;
      o[2 * rows + r] = zt;
      row_stats_grad(z, cols, t, zt, kc[r], target_coef, uniform_coef, o[r], o[rows + r], o[3 * rows + r],
                     r + 1 < r1 ? z + ld : nullptr);
    }
  });
}

template <typename T>
void stats_kernel(at::Tensor& logits, const at::Tensor& target, int64_t class_start, bool store_exp, at::Tensor& out) {
  const int64_t rows = logits.size(0), cols = logits.size(1), ld = row_pitch(logits);
  T* base = logits.data_ptr<T>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* z = base + r * ld;
      const int64_t t = tgt[r] - class_start;
      o[2 * rows + r] = (t >= 0 && t < cols) ? static_cast<float>(z[t]) : 0.f;  // before z is overwritten
      row_stats(z, cols, store_exp, o[r], o[rows + r], o[3 * rows + r], r + 1 < r1 ? z + ld : nullptr);
    }
  });
}

// One row in place: g = k·(p − uniform) with p = e·scale (stored exponentials) or exp(z − shift); then the
// target column, from its original value in fp32 so that bf16/fp16 round once.
template <typename T>
void row_grad(T* z, int64_t cols, int64_t t, float shift, float k, float target_coef, float uniform_coef,
              bool stored_exp) {
  if (k == 0.f) {
    std::fill(z, z + cols, static_cast<T>(0.f));
    return;
  }
  const bool has_target = t >= 0 && t < cols;
  const float zt = has_target ? static_cast<float>(z[t]) : 0.f;
  const float scale = stored_exp ? std::exp(-shift) : 0.f;
  const float offset = -k * uniform_coef;
  const Vec vk(stored_exp ? k * scale : k), voff(offset), vshift(shift);
  int64_t c = 0;
  for (; c + kStep <= cols; c += kStep) {
    Vec a, b;
    load2(z + c, a, b);
    if (!stored_exp) {
      a = (a - vshift).exp();
      b = (b - vshift).exp();
    }
    store2(z + c, at::vec::fmadd(a, vk, voff), at::vec::fmadd(b, vk, voff));
  }
  auto p = [&](float v) { return stored_exp ? v * scale : std::exp(v - shift); };
  for (; c < cols; ++c) z[c] = static_cast<T>(k * (p(static_cast<float>(z[c])) - uniform_coef));
  if (has_target) z[t] = static_cast<T>(k * (p(zt) - target_coef - uniform_coef));
}

template <typename T>
void grad_kernel(at::Tensor& logits, const at::Tensor& target, int64_t class_start, const at::Tensor& shift,
                 const at::Tensor& row_coef, float target_coef, float uniform_coef, bool stored_exp) {
  const int64_t rows = logits.size(0), cols = logits.size(1), ld = row_pitch(logits);
  T* base = logits.data_ptr<T>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const float* sh = shift.data_ptr<float>();
  const float* kc = row_coef.data_ptr<float>();
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      row_grad(base + r * ld, cols, tgt[r] - class_start, sh[r], kc[r], target_coef, uniform_coef, stored_exp);
    }
  });
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      return f(c10::Half{});  // the checks admit float32, bfloat16 and float16 only
  }
}

at::Tensor lce_chunk_stats_cpu(at::Tensor& logits, const at::Tensor& target, int64_t class_start, bool store_exp) {
  check_logits_target("lce_chunk_stats", logits, target, c10::DeviceType::CPU);
  at::Tensor out = at::empty({4, logits.size(0)}, logits.options().dtype(at::kFloat));
  dispatch_dtype(logits.scalar_type(), [&](auto tag) {
    stats_kernel<decltype(tag)>(logits, target, class_start, store_exp, out);
  });
  return out;
}

at::Tensor lce_chunk_stats_grad_cpu(at::Tensor& logits, const at::Tensor& target, const at::Tensor& row_coef,
                                    double target_coef, double uniform_coef) {
  constexpr const char* op = "lce_chunk_stats_grad_";
  check_logits_target(op, logits, target, c10::DeviceType::CPU);
  check_row_vector(op, "row_coef", row_coef, logits);
  at::Tensor out = at::empty({4, logits.size(0)}, logits.options().dtype(at::kFloat));
  dispatch_dtype(logits.scalar_type(), [&](auto tag) {
    stats_grad_kernel<decltype(tag)>(logits, target, row_coef, static_cast<float>(target_coef),
                                     static_cast<float>(uniform_coef), out);
  });
  return out;
}

void lce_chunk_grad_cpu(at::Tensor& logits, const at::Tensor& target, int64_t class_start, const at::Tensor& shift,
                        const at::Tensor& row_coef, double target_coef, double uniform_coef, bool stored_exp) {
  constexpr const char* op = "lce_chunk_grad_";
  check_logits_target(op, logits, target, c10::DeviceType::CPU);
  check_row_vector(op, "shift", shift, logits);
  check_row_vector(op, "row_coef", row_coef, logits);
  dispatch_dtype(logits.scalar_type(), [&](auto tag) {
    grad_kernel<decltype(tag)>(logits, target, class_start, shift, row_coef, static_cast<float>(target_coef),
                               static_cast<float>(uniform_coef), stored_exp);
  });
}

}  // namespace
}  // namespace megaclass

TORCH_LIBRARY_IMPL(megaclass, CPU, m) {
  m.impl("lce_chunk_stats", &megaclass::lce_chunk_stats_cpu);
  m.impl("lce_chunk_grad_", &megaclass::lce_chunk_grad_cpu);
  m.impl("lce_chunk_stats_grad_", &megaclass::lce_chunk_stats_grad_cpu);
}
