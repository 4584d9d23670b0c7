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

// Soft-capping z' = c·tanh(z/c). Cap::kNone: logits as they are; kRaw: the row holds raw z, capped on
// every read; kCapped: the row already holds z' (the fused kernel caps it in place first), and only the
// gradient's chain factor d z'/d z = 1 − (z'/c)² is applied.
enum class Cap { kNone, kRaw, kCapped };

struct Softcap {
  float c, inv;  // c and 1/c (c > 0 when a Cap other than kNone is used)
};

template <Cap kCap>
inline Vec capped(const Vec& v, const Softcap& sc) {
  if constexpr (kCap == Cap::kRaw) {
    return (v * Vec(sc.inv)).tanh() * Vec(sc.c);
  } else {
    return v;
  }
}

template <Cap kCap>
inline float capped(float v, const Softcap& sc) {
  if constexpr (kCap == Cap::kRaw) {
    return sc.c * std::tanh(v * sc.inv);
  } else {
    return v;
  }
}

// Statistics of one row z[0, cols) (z' when soft-capped): out max, Σ exp(z − max), Σ w_c·z_c (w = class
// weights, or 1 when w is nullptr). With store_exp, z becomes exp(z − max) (kCap must be kNone or kCapped).
// `next`: the row to be visited next (or nullptr), fetched into cache during the exponentials, so that
// its first read overlaps this row's arithmetic instead of waiting on memory.
template <typename T, Cap kCap, bool kWeighted>
void row_stats(T* z, int64_t cols, bool store_exp, const Softcap& sc, const float* w, float& max_out,
               float& sumexp_out, float& sum_out, const T* next) {
  Vec m0(-kInf), m1(-kInf), s0(0.f), s1(0.f);
  int64_t c = 0;
  for (; c + kStep <= cols; c += kStep) {
    Vec a, b;
    load2(z + c, a, b);
    a = capped<kCap>(a, sc);
    b = capped<kCap>(b, sc);
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, b);
    if constexpr (kWeighted) {
      s0 = at::vec::fmadd(a, Vec::loadu(w + c), s0);
      s1 = at::vec::fmadd(b, Vec::loadu(w + c + Vec::size()), s1);
    } else {
      s0 += a;
      s1 += b;
    }
  }
  float m = hmax(at::vec::maximum(m0, m1));
  float sum = hsum(s0 + s1);
  for (int64_t k = c; k < cols; ++k) {
    const float v = capped<kCap>(static_cast<float>(z[k]), sc);
    m = std::max(m, v);
    sum += kWeighted ? w[k] * v : v;
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
    a = (capped<kCap>(a, sc) - vref).exp_u20();
    b = (capped<kCap>(b, sc) - vref).exp_u20();
    e0 += a;
    e1 += b;
    if (store_exp) store2(z + c, a, b);
  }
  float sumexp = hsum(e0 + e1);
  for (int64_t k = c; k < cols; ++k) {
    const float e = std::exp(capped<kCap>(static_cast<float>(z[k]), sc) - ref);
    sumexp += e;
    if (store_exp) z[k] = static_cast<T>(e);
  }
  max_out = m;
  sumexp_out = sumexp;
  sum_out = sum;
}

// The gradient coefficients of one row (the kernel contract's g = pc·p − k·w_c·(tc·[c = t] + uc)).
struct RowCoef {
  float pc, k, target_coef, uniform_coef;
};

// One row in place: g = pc·p − k·w_c·uc, then the target column t (from its original value in fp32, so
// that bf16/fp16 round once; `target_value`, when given, is that value unrounded); soft-capped rows also
// get the chain factor 1 − (z'/c)². p = e·scale (stored exponentials) or exp(z' − shift).
template <typename T, Cap kCap, bool kWeighted>
void row_grad(T* z, int64_t cols, int64_t t, float shift, const RowCoef& rc, bool stored_exp, const Softcap& sc,
              const float* w, const float* target_value = nullptr) {
  if (rc.k == 0.f && rc.pc == 0.f) {
    std::fill(z, z + cols, static_cast<T>(0.f));
    return;
  }
  const bool has_target = t >= 0 && t < cols;
  const float zt = !has_target ? 0.f : target_value != nullptr ? *target_value : static_cast<float>(z[t]);
  const float scale = stored_exp ? std::exp(-shift) : 0.f;
  const float offset = -rc.k * rc.uniform_coef;
  const Vec vpc(stored_exp ? rc.pc * scale : rc.pc), voff(offset), vshift(shift), vinv(sc.inv), one(1.f);
  auto grad = [&](Vec v, const float* wc) {
    Vec zc = v, chain = one;
    if constexpr (kCap == Cap::kRaw) {
      const Vec th = (v * vinv).tanh();
      zc = th * Vec(sc.c);
      chain = one - th * th;
    } else if constexpr (kCap == Cap::kCapped) {
      const Vec th = v * vinv;
      chain = one - th * th;
    }
    const Vec p = stored_exp ? zc : (zc - vshift).exp();
    Vec off = voff;
    if constexpr (kWeighted) off = off * Vec::loadu(wc);
    Vec g = at::vec::fmadd(p, vpc, off);
    if constexpr (kCap != Cap::kNone) g = g * chain;
    return g;
  };
  int64_t c = 0;
  for (; c + kStep <= cols; c += kStep) {
    Vec a, b;
    load2(z + c, a, b);
    store2(z + c, grad(a, w + c), grad(b, w + c + Vec::size()));
  }
  auto scalar = [&](float v, int64_t col, float target) {
    float zc = v, chain = 1.f;
    if constexpr (kCap == Cap::kRaw) {
      const float th = std::tanh(v * sc.inv);
      zc = th * sc.c;
      chain = 1.f - th * th;
    } else if constexpr (kCap == Cap::kCapped) {
      chain = 1.f - (v * sc.inv) * (v * sc.inv);
    }
    const float p = stored_exp ? zc * scale : std::exp(zc - shift);
    const float wc = kWeighted ? w[col] : 1.f;
    return (rc.pc * p - rc.k * wc * (target + rc.uniform_coef)) * chain;
  };
  for (; c < cols; ++c) z[c] = static_cast<T>(scalar(static_cast<float>(z[c]), c, 0.f));
  if (has_target) z[t] = static_cast<T>(scalar(zt, t, rc.target_coef));
}

// Σ_c w_c over the row (the class weights' total; cols when unweighted).
inline float weight_total(const float* w, int64_t cols) {
  if (w == nullptr) return static_cast<float>(cols);
  double total = 0;
  for (int64_t c = 0; c < cols; ++c) total += w[c];
  return static_cast<float>(total);
}

// A row of a group of one rank holds every class, so its lse is known as soon as its statistics are:
// the gradient is made in the same visit, while the row is still in cache (the separate gradient pass
// would bring it back from memory). Soft-capped rows are capped in place first (z ← z'), so tanh runs once
// per element; their gradient then needs z' rather than stored exponentials. zt: the raw target logit, or 0.
template <typename T, bool kCap, bool kWeighted>
void row_stats_grad(T* z, int64_t cols, int64_t t, float zt, float k, float target_coef, float uniform_coef,
                    float lse_coef, float weight_sum, const Softcap& sc, const float* w, float& max_out,
                    float& sumexp_out, float& sum_out, const T* next) {
  if constexpr (kCap) {
    int64_t c = 0;
    for (; c + kStep <= cols; c += kStep) {
      Vec a, b;
      load2(z + c, a, b);
      store2(z + c, capped<Cap::kRaw>(a, sc), capped<Cap::kRaw>(b, sc));
    }
    for (; c < cols; ++c) z[c] = static_cast<T>(capped<Cap::kRaw>(static_cast<float>(z[c]), sc));
  }
  constexpr Cap kRead = kCap ? Cap::kCapped : Cap::kNone;
  row_stats<T, kRead, kWeighted>(z, cols, /*store_exp=*/!kCap, sc, w, max_out, sumexp_out, sum_out, next);
  if (k == 0.f) {
    std::fill(z, z + cols, static_cast<T>(0.f));
    return;
  }
  const float log_sumexp = std::log(sumexp_out);
  const float lse = max_out + log_sumexp;
  const bool has_target = t >= 0 && t < cols;
  const float wt = kWeighted ? (has_target ? w[t] : 0.f) : 1.f;
  // p's coefficient: 1 for plain cross-entropy (exactly), else (1−ε)·w_t + (ε/C)·Σw + 2·z_loss·lse
  const float a = (kWeighted || lse_coef != 0.f) ? target_coef * wt + uniform_coef * weight_sum + lse_coef * lse : 1.f;
  const RowCoef rc{k * a, k, target_coef, uniform_coef};
  // the target column from the raw fp32 logit, in the form the row now holds (z' or exp(z − max))
  if constexpr (kCap) {
    const float value = capped<Cap::kRaw>(zt, sc);
    row_grad<T, Cap::kCapped, kWeighted>(z, cols, t, lse, rc, /*stored_exp=*/false, sc, w, &value);
  } else {
    const float value = std::exp(zt - max_out);
    row_grad<T, Cap::kNone, kWeighted>(z, cols, t, log_sumexp, rc, /*stored_exp=*/true, sc, w, &value);
  }
}

template <typename T, bool kCap, bool kWeighted>
void stats_grad_kernel(at::Tensor& logits, const at::Tensor& target, const at::Tensor& row_coef, float target_coef,
                       float uniform_coef, float lse_coef, const Softcap& sc, const float* w, at::Tensor& out) {
  const int64_t rows = logits.size(0), cols = logits.size(1);
  T* base = logits.data_ptr<T>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const float* kc = row_coef.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float weight_sum = weight_total(w, cols);
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* z = base + r * cols;
      const int64_t t = tgt[r];
      const float zt = (t >= 0 && t < cols) ? static_cast<float>(z[t]) : 0.f;
      o[2 * rows + r] = kCap ? (t >= 0 && t < cols ? capped<Cap::kRaw>(zt, sc) : 0.f) : zt;
      row_stats_grad<T, kCap, kWeighted>(z, cols, t, zt, kc[r], target_coef, uniform_coef, lse_coef, weight_sum, sc,
                                         w, o[r], o[rows + r], o[3 * rows + r], r + 1 < r1 ? z + cols : nullptr);
    }
  });
}

template <typename T, Cap kCap, bool kWeighted>
void stats_kernel(at::Tensor& logits, const at::Tensor& target, int64_t class_start, bool store_exp, const Softcap& sc,
                  const float* w, at::Tensor& out) {
  const int64_t rows = logits.size(0), cols = logits.size(1);
  T* base = logits.data_ptr<T>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* z = base + r * cols;
      const int64_t t = tgt[r] - class_start;
      // before z is overwritten
      o[2 * rows + r] = (t >= 0 && t < cols) ? capped<kCap>(static_cast<float>(z[t]), sc) : 0.f;
      row_stats<T, kCap, kWeighted>(z, cols, store_exp, sc, w, o[r], o[rows + r], o[3 * rows + r],
                                    r + 1 < r1 ? z + cols : nullptr);
    }
  });
}

template <typename T, Cap kCap, bool kWeighted>
void grad_kernel(at::Tensor& logits, const at::Tensor& target, int64_t class_start, const at::Tensor& shift,
                 const at::Tensor& row_coef, const float* p_coef, float target_coef, float uniform_coef,
                 bool stored_exp, const Softcap& sc, const float* w) {
  const int64_t rows = logits.size(0), cols = logits.size(1);
  T* base = logits.data_ptr<T>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const float* sh = shift.data_ptr<float>();
  const float* kc = row_coef.data_ptr<float>();
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const RowCoef rc{p_coef != nullptr ? p_coef[r] : kc[r], kc[r], target_coef, uniform_coef};
      row_grad<T, kCap, kWeighted>(base + r * cols, cols, tgt[r] - class_start, sh[r], rc, stored_exp, sc, w);
    }
  });
}

// Calls f(T{}, cap, weighted) with the compile-time variant for (dtype, soft-capping, class weights).
template <typename F>
void dispatch(at::ScalarType dtype, bool cap, bool weighted, F&& f) {
  auto by_flags = [&](auto tag) {
    using B = std::bool_constant<true>;
    using N = std::bool_constant<false>;
    if (cap) {
      return weighted ? f(tag, B{}, B{}) : f(tag, B{}, N{});
    }
    return weighted ? f(tag, N{}, B{}) : f(tag, N{}, N{});
  };
  switch (dtype) {
    case at::kFloat:
      return by_flags(float{});
    case at::kBFloat16:
      return by_flags(c10::BFloat16{});
    default:
      return by_flags(c10::Half{});  // the checks admit float32, bfloat16 and float16 only
  }
}

inline Softcap make_softcap(double softcap) {
  const float c = static_cast<float>(softcap);
  return {c, c > 0.f ? 1.f / c : 0.f};
}

inline const float* weight_ptr(const std::optional<at::Tensor>& class_weight) {
  return class_weight.has_value() ? class_weight->data_ptr<float>() : nullptr;
}

at::Tensor lce_chunk_stats_cpu(at::Tensor& logits, const at::Tensor& target, int64_t class_start, bool store_exp,
                               double softcap, const std::optional<at::Tensor>& class_weight) {
  constexpr const char* op = "lce_chunk_stats";
  check_logits_target(op, logits, target, c10::DeviceType::CPU);
  check_options(op, logits, store_exp, softcap, class_weight);
  at::Tensor out = at::empty({4, logits.size(0)}, logits.options().dtype(at::kFloat));
  const Softcap sc = make_softcap(softcap);
  dispatch(logits.scalar_type(), softcap > 0, class_weight.has_value(), [&](auto tag, auto cap, auto weighted) {
    constexpr Cap kCap = decltype(cap)::value ? Cap::kRaw : Cap::kNone;
    stats_kernel<decltype(tag), kCap, decltype(weighted)::value>(logits, target, class_start, store_exp, sc,
                                                                 weight_ptr(class_weight), out);
  });
  return out;
}

at::Tensor lce_chunk_stats_grad_cpu(at::Tensor& logits, const at::Tensor& target, const at::Tensor& row_coef,
                                    double target_coef, double uniform_coef, double softcap,
                                    const std::optional<at::Tensor>& class_weight, double lse_coef) {
  constexpr const char* op = "lce_chunk_stats_grad_";
  check_logits_target(op, logits, target, c10::DeviceType::CPU);
  check_row_vector(op, "row_coef", row_coef, logits);
  check_options(op, logits, false, softcap, class_weight);
  at::Tensor out = at::empty({4, logits.size(0)}, logits.options().dtype(at::kFloat));
  const Softcap sc = make_softcap(softcap);
  dispatch(logits.scalar_type(), softcap > 0, class_weight.has_value(), [&](auto tag, auto cap, auto weighted) {
    stats_grad_kernel<decltype(tag), decltype(cap)::value, decltype(weighted)::value>(
        logits, target, row_coef, static_cast<float>(target_coef), static_cast<float>(uniform_coef),
        static_cast<float>(lse_coef), sc, weight_ptr(class_weight), out);
  });
  return out;
}

void lce_chunk_grad_cpu(at::Tensor& logits, const at::Tensor& target, int64_t class_start, const at::Tensor& shift,
                        const at::Tensor& row_coef, double target_coef, double uniform_coef, bool stored_exp,
                        double softcap, const std::optional<at::Tensor>& class_weight,
                        const std::optional<at::Tensor>& p_coef) {
  constexpr const char* op = "lce_chunk_grad_";
  check_logits_target(op, logits, target, c10::DeviceType::CPU);
  check_row_vector(op, "shift", shift, logits);
  check_row_vector(op, "row_coef", row_coef, logits);
  if (p_coef.has_value()) check_row_vector(op, "p_coef", *p_coef, logits);
  check_options(op, logits, stored_exp, softcap, class_weight);
  const Softcap sc = make_softcap(softcap);
  const float* pc = p_coef.has_value() ? p_coef->data_ptr<float>() : nullptr;
  dispatch(logits.scalar_type(), softcap > 0, class_weight.has_value(), [&](auto tag, auto cap, auto weighted) {
    constexpr Cap kCap = decltype(cap)::value ? Cap::kRaw : Cap::kNone;
    grad_kernel<decltype(tag), kCap, decltype(weighted)::value>(logits, target, class_start, shift, row_coef, pc,
                                                                static_cast<float>(target_coef),
                                                                static_cast<float>(uniform_coef), stored_exp, sc,
                                                                weight_ptr(class_weight));
  });
}

}  // namespace
}  // namespace megaclass

TORCH_LIBRARY_IMPL(megaclass, CPU, m) {
  m.impl("lce_chunk_stats", &megaclass::lce_chunk_stats_cpu);
  m.impl("lce_chunk_grad_", &megaclass::lce_chunk_grad_cpu);
  m.impl("lce_chunk_stats_grad_", &megaclass::lce_chunk_stats_grad_cpu);
}
