// Host side of the fused BatchNorm ops, shared by every compiled backend.
//
// A backend supplies only kernels (BnActKernels) that compute on the plain params
// structs of bn_act_params.h. Everything torch-facing — argument validation, layout
// normalization, allocation through the caching allocator, the device guard, running
// statistics in their own dtype — lives once in bn_act.cpp, and register_bn_act_ops()
// binds the schemas of ops.cpp to one backend's kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstddef>
#include <optional>
#include <tuple>

#include "bn_act_params.h"

namespace resnet_fused {

struct BnActKernels {
  const char* name;                   // for error messages: "CPU", "CUDA"
  bool supports_float64;
  // Bytes of scratch the kernel wants in params.workspace (allocated by the host).
  size_t (*batch_stats_workspace)(const ActivationGeometry&);
  void (*batch_stats)(const BatchStatsParams&);
  void (*forward)(const BnActForwardParams&);
  size_t (*backward_workspace)(const ActivationGeometry&, Epilogue);
  void (*backward)(const BnActBackwardParams&);
};

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// `t` in `dtype`, without an operator call when it already is: a no-op Tensor::to still
// dispatches, and the per-channel arguments of every op call took ~500 of them per
// ResNet-50 training step.
inline Tensor in_dtype(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// A required tensor argument given as None (an undefined tensor) is refused by name, as
// resnet_fused/_checks.py refuses it, before anything reads it.
void check_defined(const char* op, const char* name, const Tensor& t);

std::tuple<Tensor, Tensor> batch_stats(
    const BnActKernels& kernels, const Tensor& input, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, double momentum, double eps);

Tensor bn_relu(const BnActKernels& kernels, const Tensor& input, const OptionalTensor& weight,
               const OptionalTensor& bias, const Tensor& mean, const Tensor& invstd, bool training);

std::tuple<Tensor, Tensor, Tensor> bn_relu_backward(
    const BnActKernels& kernels, const Tensor& grad_out, const Tensor& input,
    const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& mean,
    const Tensor& invstd, bool training);

Tensor bn_add_relu(const BnActKernels& kernels, const Tensor& input, const Tensor& residual,
                   const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& mean,
                   const Tensor& invstd, bool training);

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_add_relu_backward(
    const BnActKernels& kernels, const Tensor& grad_out, const Tensor& input,
    const Tensor& residual, const OptionalTensor& weight, const OptionalTensor& bias,
    const Tensor& mean, const Tensor& invstd, bool training);

Tensor dual_bn_add_relu(const BnActKernels& kernels, const Tensor& input,
                        const OptionalTensor& weight, const OptionalTensor& bias,
                        const Tensor& mean, const Tensor& invstd, const Tensor& input_d,
                        const OptionalTensor& weight_d, const OptionalTensor& bias_d,
                        const Tensor& mean_d, const Tensor& invstd_d, bool training);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dual_bn_add_relu_backward(
    const BnActKernels& kernels, const Tensor& grad_out, const Tensor& input,
    const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& mean,
    const Tensor& invstd, const Tensor& input_d, const OptionalTensor& weight_d,
    const OptionalTensor& bias_d, const Tensor& mean_d, const Tensor& invstd_d, bool training);

// Binds every op of the schema set to `kernels` inside a TORCH_LIBRARY_IMPL block:
//   TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { register_bn_act_ops<kCpuKernels>(m); }
template <const BnActKernels& kernels>
void register_bn_act_ops(torch::Library& m) {
  m.impl("batch_stats", [](const Tensor& input, const OptionalTensor& running_mean,
                           const OptionalTensor& running_var, double momentum, double eps) {
    return batch_stats(kernels, input, running_mean, running_var, momentum, eps);
  });
  m.impl("bn_relu", [](const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                       const Tensor& mean, const Tensor& invstd, bool training) {
    return bn_relu(kernels, input, weight, bias, mean, invstd, training);
  });
  m.impl("bn_relu_backward",
         [](const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
            const OptionalTensor& bias, const Tensor& mean, const Tensor& invstd, bool training) {
           return bn_relu_backward(kernels, grad_out, input, weight, bias, mean, invstd, training);
         });
  m.impl("bn_add_relu",
         [](const Tensor& input, const Tensor& residual, const OptionalTensor& weight,
            const OptionalTensor& bias, const Tensor& mean, const Tensor& invstd, bool training) {
           return bn_add_relu(kernels, input, residual, weight, bias, mean, invstd, training);
         });
  m.impl("bn_add_relu_backward",
         [](const Tensor& grad_out, const Tensor& input, const Tensor& residual,
            const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& mean,
            const Tensor& invstd, bool training) {
           return bn_add_relu_backward(kernels, grad_out, input, residual, weight, bias, mean,
                                       invstd, training);
         });
  m.impl("dual_bn_add_relu",
         [](const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
            const Tensor& mean, const Tensor& invstd, const Tensor& input_d,
            const OptionalTensor& weight_d, const OptionalTensor& bias_d, const Tensor& mean_d,
            const Tensor& invstd_d, bool training) {
           return dual_bn_add_relu(kernels, input, weight, bias, mean, invstd, input_d, weight_d,
                                   bias_d, mean_d, invstd_d, training);
         });
  m.impl("dual_bn_add_relu_backward",
         [](const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
            const OptionalTensor& bias, const Tensor& mean, const Tensor& invstd,
            const Tensor& input_d, const OptionalTensor& weight_d, const OptionalTensor& bias_d,
            const Tensor& mean_d, const Tensor& invstd_d, bool training) {
           return dual_bn_add_relu_backward(kernels, grad_out, input, weight, bias, mean, invstd,
                                            input_d, weight_d, bias_d, mean_d, invstd_d, training);
         });
}

}  // namespace resnet_fused
