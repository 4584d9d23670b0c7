// megaclass._C: the per-chunk kernels of the fused linear + cross-entropy op. This file is the
// only definition of their schema (the authority for the CPU kernel in lce_cpu.cpp, the CUDA kernel in
// lce_cuda.cu and the PyTorch twin in megaclass/ops/kernels.py), and it checks their arguments.
//
// lce_chunk_stats(Tensor(a!) logits, Tensor target, int class_start, bool store_exp, float softcap=0.,
//                 Tensor? class_weight=None) -> Tensor
//   logits: [R, C_local], contiguous, fp32/bf16/fp16: this rank's classes [class_start, class_start + C_local)
//   target: [R] int64 global class ids; a target outside this shard (another rank's class, ignore_index)
//           contributes target logit 0
//   softcap: c > 0: every statistic is of the soft-capped logits z' = c·tanh(z/c) (Gemma 2); 0: z' = z.
//           logits keep the raw z (the gradient pass caps them again), so store_exp needs softcap 0.
//   class_weight: None, or contiguous fp32 [C_local]: row 3 is then Σ_c w_c·z'_c
//   returns fp32 [4, R]: row 0 = max_c z', row 1 = Σ_c exp(z' − max), row 2 = z'_target (0 if not in the
//           shard), row 3 = Σ_c z'_c (weighted: Σ_c w_c·z'_c); accumulated in fp32 for every input dtype.
//   store_exp: logits are overwritten with exp(z − max) (in their own dtype), so that the gradient pass
//           needs no exp of its own.
//
// lce_chunk_grad_(Tensor(a!) logits, Tensor target, int class_start, Tensor shift, Tensor row_coef,
//                 float target_coef, float uniform_coef, bool stored_exp, float softcap=0.,
//                 Tensor? class_weight=None, Tensor? p_coef=None) -> ()
//   In place, logits become the gradient of the loss with respect to the (raw) logits:
//     g[i,c] = (pc[i]·p[i,c] − k[i]·w_c·(target_coef·[c == target[i] − class_start] + uniform_coef)) · cap'[i,c]
//   with k = row_coef, pc = p_coef (None: pc = k), w = class_weight (None: 1),
//        p[i,c] = exp(z'[i,c] − shift[i])      if not stored_exp (shift = lse, the global log-sum-exp)
//        p[i,c] = e[i,c] · exp(−shift[i])      if stored_exp     (e = exp(z − max), shift = lse − max)
//        cap'[i,c] = 1 − (z'[i,c]/c)²          d z'/d z with softcap c > 0 (z' = c·tanh(z/c)), else 1.
//   shift, row_coef, p_coef: fp32 [R]; target_coef = 1 − ε, uniform_coef = ε / C_total (label smoothing ε).
//   Plain cross-entropy has pc = k; class weights and z-loss make pc[i] = k[i]·((1−ε)·w_{y_i} + (ε/C)·Σ_c w_c
//   + 2·z_loss·lse_i) (the caller knows w_{y_i}, Σ_c w_c and lse over all ranks). A row with row_coef 0 and
//   p_coef 0 (an ignored row) becomes exactly 0.
//
// lce_chunk_stats_grad_(Tensor(a!) logits, Tensor target, Tensor row_coef, float target_coef,
//                       float uniform_coef, float softcap=0., Tensor? class_weight=None, float lse_coef=0.)
//                       -> Tensor
//   Both of the above for a group of ONE rank (logits hold every class, class_start = 0): returns
//   lce_chunk_stats' [4, R], and turns logits in place into lce_chunk_grad_'s gradient with
//   shift = lse = max + log Σ exp(z' − max) and pc[i] = k[i]·((1−ε)·w_{y_i} + (ε/C)·Σ_c w_c + lse_coef·lse_i)
//   (lse_coef = 2·z_loss; pc = k exactly without class weights and z-loss), each row in one visit.
//   CPU only (the CUDA path runs the two).
//
// Shared argument checks (ValueError): class_weight a contiguous fp32 [C_local] tensor on logits' device;
// softcap finite and >= 0; store_exp / stored_exp only with softcap 0.
#include <Python.h>

#include <torch/library.h>

#include <cmath>
#include <optional>

#include "lce.h"

namespace megaclass {

void check_logits_target(const char* op, const at::Tensor& logits, const at::Tensor& target,
                         c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(logits.device().type() == device_type, op, ": logits must be a ", device_type,
                    " tensor, got one on ", logits.device());
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.is_contiguous(), op,
                    ": logits must be a contiguous [R, C_local] tensor, got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                    ": logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(target.device() == logits.device(), op, ": target is on ", target.device(),
                    " but logits on ", logits.device());
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == logits.size(0) &&
                        target.is_contiguous(),
                    op, ": target must be a contiguous int64 [R] tensor with R = ", logits.size(0), ", got ",
                    target.scalar_type(), " ", target.sizes());
}

void check_row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), op, ": ", name, " is on ", t.device(), " but logits on ",
                    logits.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == logits.size(0) && t.is_contiguous(),
                    op, ": ", name, " must be a contiguous float32 [R] tensor with R = ", logits.size(0), ", got ",
                    t.scalar_type(), " ", t.sizes());
}

void check_options(const char* op, const at::Tensor& logits, bool stored_exp, double softcap,
                   const std::optional<at::Tensor>& class_weight) {
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0: none), got ",
                    softcap);
  TORCH_CHECK_VALUE(!(stored_exp && softcap > 0), op,
                    ": stored exponentials cannot be combined with softcap (the gradient needs the capped logits)");
  if (class_weight.has_value()) {
    const at::Tensor& w = *class_weight;
    TORCH_CHECK_VALUE(w.device() == logits.device(), op, ": class_weight is on ", w.device(), " but logits on ",
                      logits.device());
    TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == logits.size(1) && w.is_contiguous(),
                      op, ": class_weight must be a contiguous float32 [C_local] tensor with C_local = ",
                      logits.size(1), ", got ", w.scalar_type(), " ", w.sizes());
  }
}

}  // namespace megaclass

// An importable (empty) Python module: importing megaclass._C loads this library, whose static
// initializers register the ops below with the dispatcher.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "megaclass kernels (torch.ops.megaclass)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(megaclass, m) {
  m.def(
      "lce_chunk_stats(Tensor(a!) logits, Tensor target, int class_start, bool store_exp, float softcap=0., "
      "Tensor? class_weight=None) -> Tensor");
  m.def(
      "lce_chunk_grad_(Tensor(a!) logits, Tensor target, int class_start, Tensor shift, Tensor row_coef, "
      "float target_coef, float uniform_coef, bool stored_exp, float softcap=0., Tensor? class_weight=None, "
      "Tensor? p_coef=None) -> ()");
  m.def(
      "lce_chunk_stats_grad_(Tensor(a!) logits, Tensor target, Tensor row_coef, float target_coef, "
      "float uniform_coef, float softcap=0., Tensor? class_weight=None, float lse_coef=0.) -> Tensor");
}
