// Shared between the front file (megaclass_ops.cpp: schema + argument checks) and the kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace megaclass {

// Checks of the kernels' arguments (TORCH_CHECK_VALUE: ValueError in Python) naming the op and argument:
// logits a contiguous 2-D [R, C_local] tensor of `device_type` in float32/bfloat16/float16; target a
// contiguous int64 [R] on the same device.
void check_logits_target(const char* op, const at::Tensor& logits, const at::Tensor& target,
                         c10::DeviceType device_type);
// `t` a contiguous float32 [R] tensor on logits' device (shift, row_coef).
void check_row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits);
// softcap finite and >= 0, stored exponentials only without it, class_weight a contiguous fp32 [C_local] on
// logits' device (the options of the kernel contract in megaclass_ops.cpp).
void check_options(const char* op, const at::Tensor& logits, bool stored_exp, double softcap,
                   const std::optional<at::Tensor>& class_weight);

}  // namespace megaclass
