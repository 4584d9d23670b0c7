// CUDA kernels of the fused linear + cross-entropy op: per-row statistics of a chunk of logits and the
// in-place logits -> gradient pass. Semantics are the kernel contract in csrc/megaclass_ops.cpp (the
// schema's only definition); the CPU kernel (lce_cpu.cpp) and the PyTorch twin (megaclass/ops) match it.
//
// Layout: logits [R, C_local] row-major. The statistics use one block per row (online max / sum of
// exponentials in each thread, then a block reduction); the gradient is elementwise once the row's
// shift is known, so it uses a 2-D grid (row x column tile) to fill the GPU even when R is small.
// Loads and stores are 16 bytes wide (4 fp32 or 8 bf16/fp16 values); a row that does not start on a
// 16-byte boundary (C_local not a multiple of the vector width) is split into an unaligned head, the
// aligned packs and a tail. Arithmetic is fp32 for every input dtype. Kernels run on the current stream
// and never synchronise with the host. The options (soft-capping z' = c·tanh(z/c), class weights w, the
// gradient's p coefficient) are runtime arguments: uniform branches, the same for every thread.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "lce.h"

namespace megaclass {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;
constexpr int kUnroll = 4;  // 16-byte packs in flight per thread and loop trip
constexpr int kGradThreads = 256;

// Sixteen bytes of T, loaded and stored as one vector access.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// A row as [head | aligned packs | tail]; the head brings the pointer to a 16-byte boundary.
struct RowParts {
  int64_t head, packs, tail;
};

template <typename T>
__device__ __forceinline__ RowParts row_parts(const T* row, int64_t cols) {
  constexpr int kV = Pack<T>::kSize;
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16);
  int64_t head = misalign ? (16 - misalign) / static_cast<int64_t>(sizeof(T)) : 0;
  head = head < cols ? head : cols;
  const int64_t packs = (cols - head) / kV;
  return {head, packs, cols - head - packs * kV};
}

// exp(from - to), with an empty partial (max = -inf) contributing 0 instead of exp(-inf + inf) = NaN.
__device__ __forceinline__ float rescale(float from, float to) {
  return from == -INFINITY ? 0.f : __expf(from - to);
}

struct Stats {
  float max, sumexp, sum;
};

// The loss options a kernel reads: softcap c (0: none) and 1/c, class weights (nullptr: all 1).
struct Options {
  float cap, inv;
  const float* w;
};

__device__ __forceinline__ float capped(float z, const Options& o) {
  return o.cap > 0.f ? o.cap * tanhf(z * o.inv) : z;
}

// The weight of column c (1 without class weights).
__device__ __forceinline__ float weight_of(const Options& o, int64_t c) {
  return o.w != nullptr ? o.w[c] : 1.f;
}

__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b) {
  const float m = fmaxf(a.max, b.max);
  return {m, a.sumexp * rescale(a.max, m) + b.sumexp * rescale(b.max, m), a.sum + b.sum};
}

// Online update with n values of columns [c0, c0 + n): one exp per value plus one rescale when the
// running max grows; the sum is weighted by the class weights when there are any.
template <int n>
__device__ __forceinline__ void absorb(Stats& st, const float (&z)[n], const Options& o, int64_t c0) {
  float m = z[0];
#pragma unroll
  for (int k = 1; k < n; ++k) m = fmaxf(m, z[k]);
  if (m > st.max) {
    st.sumexp *= rescale(st.max, m);
    st.max = m;
  }
  const float ref = st.max == -INFINITY ? 0.f : st.max;  // all values so far are -inf: their terms are 0
#pragma unroll
  for (int k = 0; k < n; ++k) {
    st.sumexp += __expf(z[k] - ref);
    st.sum += weight_of(o, c0 + k) * z[k];
  }
}

template <typename T>
__device__ __forceinline__ void to_float(const Pack<T>& p, float (&z)[Pack<T>::kSize], const Options& o) {
#pragma unroll
  for (int k = 0; k < Pack<T>::kSize; ++k) z[k] = capped(static_cast<float>(p.v[k]), o);
}

// Block-wide reductions: a warp shuffle tree, then every thread folds the per-warp partials, so the
// result is known to all threads. `scratch` holds one entry per warp and is reusable on return.
__device__ __forceinline__ Stats block_merge(Stats st, Stats* scratch) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const Stats other{__shfl_xor_sync(0xffffffffu, st.max, offset), __shfl_xor_sync(0xffffffffu, st.sumexp, offset),
                      __shfl_xor_sync(0xffffffffu, st.sum, offset)};
    st = merge(st, other);
  }
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = st;
  __syncthreads();
  Stats total = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / kWarp); ++w) total = merge(total, scratch[w]);
  __syncthreads();
  return total;
}

// Row statistics in one read of the row (store_exp = false).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    stats_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target, int64_t rows, int64_t cols,
                 int64_t class_start, Options o, float* __restrict__ out) {
  constexpr int kV = Pack<T>::kSize;
  __shared__ Stats scratch[kMaxThreads / kWarp];
  const int64_t r = blockIdx.x;
  const T* row = logits + r * cols;
  if (threadIdx.x == 0) {
    const int64_t c = target[r] - class_start;
    out[2 * rows + r] = (c >= 0 && c < cols) ? capped(static_cast<float>(row[c]), o) : 0.f;
  }
  Stats st{-INFINITY, 0.f, 0.f};
  const RowParts parts = row_parts(row, cols);
  if (threadIdx.x < parts.head) absorb<1>(st, {capped(static_cast<float>(row[threadIdx.x]), o)}, o, threadIdx.x);
  const auto* packs = reinterpret_cast<const Pack<T>*>(row + parts.head);
  for (int64_t base = threadIdx.x; base < parts.packs; base += int64_t{kUnroll} * blockDim.x) {
    Pack<T> p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t{u} * blockDim.x;
      if (i < parts.packs) p[u] = packs[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + int64_t{u} * blockDim.x < parts.packs) {
        float z[kV];
        to_float(p[u], z, o);
        absorb(st, z, o, parts.head + (base + int64_t{u} * blockDim.x) * kV);
      }
    }
  }
  if (threadIdx.x < parts.tail) {
    const int64_t c = parts.head + parts.packs * kV + threadIdx.x;
    absorb<1>(st, {capped(static_cast<float>(row[c]), o)}, o, c);
  }
  st = block_merge(st, scratch);
  if (threadIdx.x == 0) {
    out[r] = st.max;
    out[rows + r] = st.sumexp;
    out[3 * rows + r] = st.sum;
  }
}

// Row statistics that also overwrite the row with e = exp(z - max) (store_exp = true, no soft-capping by
// the contract): a first read finds max and Σ w·z, a second read writes e and sums it (in fp32, before
// rounding e to T).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    stats_store_exp_kernel(T* __restrict__ logits, const int64_t* __restrict__ target, int64_t rows, int64_t cols,
                           int64_t class_start, Options o, float* __restrict__ out) {
  constexpr int kV = Pack<T>::kSize;
  __shared__ Stats scratch[kMaxThreads / kWarp];
  const int64_t r = blockIdx.x;
  T* row = logits + r * cols;
  if (threadIdx.x == 0) {  // read before the barrier in block_merge, so before any thread overwrites the row
    const int64_t c = target[r] - class_start;
    out[2 * rows + r] = (c >= 0 && c < cols) ? static_cast<float>(row[c]) : 0.f;
  }
  const RowParts parts = row_parts(row, cols);
  auto* packs = reinterpret_cast<Pack<T>*>(row + parts.head);
  const int64_t tail_start = parts.head + parts.packs * kV;
  const int64_t stride = int64_t{kUnroll} * blockDim.x;

  // Pass 1: max and Σz (the sumexp slot stays 0 here and is filled by pass 2).
  Stats st{-INFINITY, 0.f, 0.f};
  auto take = [&st, &o](float z, int64_t c) {
    st.max = fmaxf(st.max, z);
    st.sum += weight_of(o, c) * z;
  };
  if (threadIdx.x < parts.head) take(static_cast<float>(row[threadIdx.x]), threadIdx.x);
  for (int64_t base = threadIdx.x; base < parts.packs; base += stride) {
    Pack<T> p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t{u} * blockDim.x;
      if (i < parts.packs) p[u] = packs[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t{u} * blockDim.x;
      if (i < parts.packs) {
#pragma unroll
        for (int k = 0; k < kV; ++k) take(static_cast<float>(p[u].v[k]), parts.head + i * kV + k);
      }
    }
  }
  if (threadIdx.x < parts.tail) take(static_cast<float>(row[tail_start + threadIdx.x]), tail_start + threadIdx.x);
  st = block_merge(st, scratch);  // sumexp is 0 everywhere, so merging only combines max and Σz
  const float ref = st.max == -INFINITY ? 0.f : st.max;

  // Pass 2: e = exp(z - max), written in place.
  float sumexp = 0.f;
  auto expo = [&sumexp, ref](float z) {
    const float e = __expf(z - ref);
    sumexp += e;
    return e;
  };
  if (threadIdx.x < parts.head) row[threadIdx.x] = T(expo(static_cast<float>(row[threadIdx.x])));
  for (int64_t base = threadIdx.x; base < parts.packs; base += stride) {
    Pack<T> p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t{u} * blockDim.x;
      if (i < parts.packs) p[u] = packs[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t{u} * blockDim.x;
      if (i < parts.packs) {
#pragma unroll
        for (int k = 0; k < kV; ++k) p[u].v[k] = T(expo(static_cast<float>(p[u].v[k])));
        packs[i] = p[u];
      }
    }
  }
  if (threadIdx.x < parts.tail) {
    T& z = row[tail_start + threadIdx.x];
    z = T(expo(static_cast<float>(z)));
  }
  const Stats total = block_merge(Stats{st.max, sumexp, 0.f}, scratch);
  if (threadIdx.x == 0) {
    out[r] = st.max;
    out[rows + r] = total.sumexp;
    out[3 * rows + r] = st.sum;
  }
}

// In place: g = (pc·p − k·w_c·(target_coef·[c = target − class_start] + uniform_coef))·(1 − (z'/cap)²),
// with p = exp(z' − shift) or, for stored exponentials, p = e·exp(−shift); pc = p_coef (nullptr: k).
// Block (r, tile) handles `tile_packs` packs of row r; tile 0 also takes the row's unaligned head and
// tail. A row with k = 0 and pc = 0 becomes exactly 0.
template <typename T>
__global__ void __launch_bounds__(kGradThreads)
    grad_kernel(T* __restrict__ logits, const int64_t* __restrict__ target, int64_t cols, int64_t class_start,
                const float* __restrict__ shift, const float* __restrict__ row_coef,
                const float* __restrict__ p_coef, float target_coef, float uniform_coef, bool stored_exp, Options o,
                int64_t tile_packs) {
  constexpr int kV = Pack<T>::kSize;
  const int64_t r = blockIdx.x;
  T* row = logits + r * cols;
  const float k = row_coef[r];
  const float pc = p_coef != nullptr ? p_coef[r] : k;
  const float s = shift[r];
  const float scale = stored_exp ? __expf(-s) : 0.f;
  const int64_t t = target[r] - class_start;  // outside [0, cols) when another rank owns the target
  auto grad = [=](float z, int64_t c) {
    if (k == 0.f && pc == 0.f) return 0.f;
    float chain = 1.f;
    if (o.cap > 0.f) {
      const float th = tanhf(z * o.inv);
      z = th * o.cap;
      chain = 1.f - th * th;
    }
    const float p = stored_exp ? z * scale : __expf(z - s);
    return (pc * p - k * weight_of(o, c) * ((c == t ? target_coef : 0.f) + uniform_coef)) * chain;
  };
  const RowParts parts = row_parts(row, cols);
  auto* packs = reinterpret_cast<Pack<T>*>(row + parts.head);
  if (blockIdx.y == 0) {
    const int64_t tail_start = parts.head + parts.packs * kV;
    if (threadIdx.x < parts.head) row[threadIdx.x] = T(grad(static_cast<float>(row[threadIdx.x]), threadIdx.x));
    if (threadIdx.x < parts.tail) {
      const int64_t c = tail_start + threadIdx.x;
      row[c] = T(grad(static_cast<float>(row[c]), c));
    }
  }
  for (int64_t tile = blockIdx.y; tile * tile_packs < parts.packs; tile += gridDim.y) {
    const int64_t base = tile * tile_packs + threadIdx.x;
    Pack<T> p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t{u} * blockDim.x;
      if (i < parts.packs) p[u] = packs[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t{u} * blockDim.x;
      if (i < parts.packs) {
        const int64_t c0 = parts.head + i * kV;
#pragma unroll
        for (int v = 0; v < kV; ++v) p[u].v[v] = T(grad(static_cast<float>(p[u].v[v]), c0 + v));
        packs[i] = p[u];
      }
    }
  }
}

// Calls f(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor: the only dtypes compiled.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:  // unreachable: check_logits_target admits only these three
      TORCH_CHECK_VALUE(false, op, ": logits must be float32, bfloat16 or float16, got ", dtype);
  }
}

int stats_threads(int64_t cols) {
  return cols >= 32768 ? kMaxThreads : cols >= 4096 ? 256 : 128;
}

Options make_options(double softcap, const std::optional<at::Tensor>& class_weight) {
  const float c = static_cast<float>(softcap);
  return {c, c > 0.f ? 1.f / c : 0.f, class_weight.has_value() ? class_weight->data_ptr<float>() : nullptr};
}

at::Tensor lce_chunk_stats_cuda(at::Tensor& logits, const at::Tensor& target, int64_t class_start, bool store_exp,
                                double softcap, const std::optional<at::Tensor>& class_weight) {
  constexpr const char* op = "lce_chunk_stats";
  check_logits_target(op, logits, target, c10::DeviceType::CUDA);
  check_options(op, logits, store_exp, softcap, class_weight);
  const Options o = make_options(softcap, class_weight);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), cols = logits.size(1);
  at::Tensor out = at::empty({4, rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return out;
  TORCH_CHECK_VALUE(rows <= INT32_MAX, op, ": at most 2^31 - 1 rows per chunk, got ", rows);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = stats_threads(cols);
  dispatch_dtype(logits.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if (store_exp) {
      stats_store_exp_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
          logits.data_ptr<T>(), target.data_ptr<int64_t>(), rows, cols, class_start, o, out.data_ptr<float>());
    } else {
      stats_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
          logits.data_ptr<T>(), target.data_ptr<int64_t>(), rows, cols, class_start, o, out.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void lce_chunk_grad_cuda(at::Tensor& logits, const at::Tensor& target, int64_t class_start, const at::Tensor& shift,
                         const at::Tensor& row_coef, double target_coef, double uniform_coef, bool stored_exp,
                         double softcap, const std::optional<at::Tensor>& class_weight,
                         const std::optional<at::Tensor>& p_coef) {
  constexpr const char* op = "lce_chunk_grad_";
  check_logits_target(op, logits, target, c10::DeviceType::CUDA);
  check_row_vector(op, "shift", shift, logits);
  check_row_vector(op, "row_coef", row_coef, logits);
  if (p_coef.has_value()) check_row_vector(op, "p_coef", *p_coef, logits);
  check_options(op, logits, stored_exp, softcap, class_weight);
  const Options o = make_options(softcap, class_weight);
  const float* pc = p_coef.has_value() ? p_coef->data_ptr<float>() : nullptr;
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), cols = logits.size(1);
  if (rows == 0 || cols == 0) return;
  TORCH_CHECK_VALUE(rows <= INT32_MAX, op, ": at most 2^31 - 1 rows per chunk, got ", rows);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(logits.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const int64_t tile_packs = int64_t{kUnroll} * kGradThreads;
    const int64_t max_packs = cols / Pack<T>::kSize;
    const int64_t tiles = std::max<int64_t>(1, std::min<int64_t>((max_packs + tile_packs - 1) / tile_packs, 65535));
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(tiles));
    grad_kernel<T><<<grid, kGradThreads, 0, stream>>>(
        logits.data_ptr<T>(), target.data_ptr<int64_t>(), cols, class_start, shift.data_ptr<float>(),
        row_coef.data_ptr<float>(), pc, static_cast<float>(target_coef), static_cast<float>(uniform_coef), stored_exp,
        o, tile_packs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace megaclass

TORCH_LIBRARY_IMPL(megaclass, CUDA, m) {
  m.impl("lce_chunk_stats", &megaclass::lce_chunk_stats_cuda);
  m.impl("lce_chunk_grad_", &megaclass::lce_chunk_grad_cuda);
}
