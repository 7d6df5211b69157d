// Host side of the fused BatchNorm ops: validation, layouts, allocation, params.
// Validation rules, exception types and messages match resnet_fused/_checks.py (values as
// C++ prints them: `Float`, not `torch.float32`).

#include "bn_act.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>

namespace resnet_fused {
namespace {

// ---------------------------------------------------------------- validation

bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_activation(const char* op, const char* name, const Tensor& t) {
  check_defined(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 4, op, "(): expected `", name,
                    "` to be a 4-D (N, C, H, W) tensor, got a ", t.dim(),
                    "-D tensor of shape ", t.sizes());
  TORCH_CHECK_TYPE(is_activation_dtype(t.scalar_type()), op, "(): expected `", name,
                   "` to have dtype float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

void check_like(const char* op, const char* name, const Tensor& t, const char* ref_name,
                const Tensor& ref) {
  check_defined(op, name, t);
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, "(): expected `", name, "` to have the shape of `",
                    ref_name, "` ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, "(): expected `", name,
                   "` to have the dtype of `", ref_name, "` (", ref.scalar_type(), "), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, "(): expected `", name,
                    "` on the device of `", ref_name, "` (", ref.device(), "), got ", t.device());
}

void check_per_channel(const char* op, const std::string& name, const OptionalTensor& t,
                       const char* ref_name, const Tensor& ref) {
  if (!t.has_value() || !t->defined()) return;
  const int64_t channels = ref.size(1);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, op, "(): expected `", name,
                    "` to be a 1-D tensor of ", channels, " elements (one per channel of `",
                    ref_name, "`), got shape ", t->sizes());
  TORCH_CHECK_TYPE(t->is_floating_point(), op, "(): expected `", name,
                   "` to be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == ref.device(), op, "(): expected `", name,
                    "` on the device of `", ref_name, "` (", ref.device(), "), got ", t->device());
}

bool defined(const OptionalTensor& t) { return t.has_value() && t->defined(); }

// A running statistic is updated in place: it needs a memory location per channel, which
// an expanded tensor (stride 0) does not have (_checks.check_running_stats_writable).
void check_running_stat_writable(const char* op, const char* name, const OptionalTensor& t) {
  TORCH_CHECK_VALUE(!defined(t) || t->size(0) <= 1 || t->stride(0) != 0, op, "(): expected `", name,
                    "` to hold one value per channel in memory (it is updated in place), got an expanded "
                    "tensor (stride 0)");
}

// Eager's rule for a training BatchNorm (_checks.check_eps); NaN passes, as there.
void check_training_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(!(eps <= 0.0), op, "(): expected `eps` to be positive in training, got ", eps);
}

void check_batch_size(const Tensor& input) {
  TORCH_CHECK_VALUE(input.size(0) * input.size(2) * input.size(3) != 1,
                    "Expected more than 1 value per channel when training, got input size ",
                    input.sizes());
}

void check_backend_dtype(const BnActKernels& kernels, const char* op, const Tensor& input) {
  TORCH_CHECK_TYPE(kernels.supports_float64 || input.scalar_type() != at::kDouble, op,
                   "(): the ", kernels.name,
                   " kernels do not support float64 `input`; use the reference backend");
}

// One BatchNorm branch of a fused op: its input, parameters and the statistics it
// normalizes with. `suffix` names its arguments ("" or "_d").
struct BranchArgs {
  const Tensor& input;
  const OptionalTensor& weight;
  const OptionalTensor& bias;
  const Tensor& mean;
  const Tensor& invstd;
  const char* suffix;
};

void check_branch(const BnActKernels& kernels, const char* op, const BranchArgs& b) {
  const std::string s = b.suffix;
  const std::string input_name = "input" + s;
  check_activation(op, input_name.c_str(), b.input);
  check_backend_dtype(kernels, op, b.input);
  check_defined(op, ("mean" + s).c_str(), b.mean);
  check_defined(op, ("invstd" + s).c_str(), b.invstd);
  check_per_channel(op, "weight" + s, b.weight, input_name.c_str(), b.input);
  check_per_channel(op, "bias" + s, b.bias, input_name.c_str(), b.input);
  check_per_channel(op, "mean" + s, b.mean, input_name.c_str(), b.input);
  check_per_channel(op, "invstd" + s, b.invstd, input_name.c_str(), b.input);
}

// ---------------------------------------------------------------- layouts and buffers

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "unreachable: unsupported dtype ", t);
  }
}

at::ScalarType accumulation_type(const Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// An activation made dense in the layout the kernels read, plus its geometry.
struct Activation {
  Tensor tensor;
  at::MemoryFormat format;
  ActivationGeometry geometry;
};

// `format` is the layout of the op's main input, which every other activation follows.
Activation dense_activation(const Tensor& t, at::MemoryFormat format) {
  Activation a{t.contiguous(format), format, {}};
  a.geometry.batch = t.size(0);
  a.geometry.channels = t.size(1);
  a.geometry.spatial = t.size(2) * t.size(3);
  a.geometry.layout = format == at::MemoryFormat::ChannelsLast ? Layout::kNHWC : Layout::kNCHW;
  a.geometry.dtype = to_dtype(t.scalar_type());
  return a;
}

Tensor empty_activation(const Activation& like) {
  return at::empty(like.tensor.sizes(), like.tensor.options().memory_format(like.format));
}

Tensor per_channel(const OptionalTensor& t, at::ScalarType acc) {
  return defined(t) ? in_dtype(*t, acc).contiguous() : Tensor();
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// Running statistics are updated in the accumulation type; a buffer of another dtype (or
// not contiguous) is updated through a copy that is written back.
struct RunningStat {
  Tensor user;
  Tensor acc;
  RunningStat(const OptionalTensor& t, at::ScalarType acc_type) {
    if (!defined(t)) return;
    user = *t;
    acc = in_dtype(user, acc_type).contiguous();
  }
  void* data() { return acc.defined() ? acc.mutable_data_ptr() : nullptr; }
  void write_back() {
    if (acc.defined() && !acc.is_same(user)) user.copy_(acc);
  }
};

// A BatchNorm branch ready for the kernels: dense input in the op's layout and
// accumulation-type per-channel arrays.
struct Branch {
  Activation x;
  Tensor weight, bias, mean, invstd;

  Branch(const BranchArgs& a, at::MemoryFormat format) : x(dense_activation(a.input, format)) {
    const auto acc = accumulation_type(a.input);
    weight = per_channel(a.weight, acc);
    bias = per_channel(a.bias, acc);
    mean = in_dtype(a.mean, acc).contiguous();
    invstd = in_dtype(a.invstd, acc).contiguous();
  }

  BnBranch view() const {
    BnBranch b;
    b.input = x.tensor.const_data_ptr();
    b.weight = ptr_or_null(weight);
    b.bias = ptr_or_null(bias);
    b.mean = mean.const_data_ptr();
    b.invstd = invstd.const_data_ptr();
    return b;
  }
};

Tensor run_forward(const BnActKernels& kernels, BnActForwardParams& p, const Activation& like) {
  Tensor out = empty_activation(like);
  p.geometry = like.geometry;
  p.out = out.mutable_data_ptr();
  if (p.geometry.numel() > 0) kernels.forward(p);
  return out;
}

// Gradients of one branch: grad_input (activation) plus grad_weight, grad_bias ([C], acc).
struct BranchGrads {
  Tensor input, weight, bias;

  explicit BranchGrads(const Branch& b)
      : input(empty_activation(b.x)),
        weight(at::empty({b.x.geometry.channels}, b.mean.options())),
        bias(at::empty({b.x.geometry.channels}, b.mean.options())) {}
};

void run_backward(const BnActKernels& kernels, BnActBackwardParams& p, const Tensor& like,
                  std::initializer_list<BranchGrads*> grads) {
  if (p.geometry.numel() == 0) {
    // Nothing to reduce or scale: the parameter gradients of an empty batch are 0.
    for (BranchGrads* g : grads) {
      g->weight.zero_();
      g->bias.zero_();
    }
    return;
  }
  Tensor scratch = workspace(kernels.backward_workspace(p.geometry, p.epilogue), like);
  p.workspace = scratch.numel() ? scratch.mutable_data_ptr() : nullptr;
  kernels.backward(p);
}

BnActBackwardParams backward_params(Epilogue epilogue, bool training, const Tensor& grad_out,
                                    const Branch& main, BranchGrads& grads) {
  BnActBackwardParams p;
  p.geometry = main.x.geometry;
  p.epilogue = epilogue;
  p.training = training;
  p.grad_out = grad_out.const_data_ptr();
  p.main = main.view();
  p.grad_input = grads.input.mutable_data_ptr();
  p.grad_weight = grads.weight.mutable_data_ptr();
  p.grad_bias = grads.bias.mutable_data_ptr();
  return p;
}

}  // namespace

// ---------------------------------------------------------------- ops

void check_defined(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), op, "(): expected `", name, "` to be a Tensor, got None");
}

std::tuple<Tensor, Tensor> batch_stats(const BnActKernels& kernels, const Tensor& input,
                                       const OptionalTensor& running_mean,
                                       const OptionalTensor& running_var, double momentum,
                                       double eps) {
  constexpr const char* op = "batch_stats";
  check_activation(op, "input", input);
  check_backend_dtype(kernels, op, input);
  check_per_channel(op, "running_mean", running_mean, "input", input);
  check_per_channel(op, "running_var", running_var, "input", input);
  TORCH_CHECK_VALUE(defined(running_mean) == defined(running_var), op,
                    "(): expected `running_mean` and `running_var` to be given together or both be None");
  // Each is updated in place; in _checks.check_running_stats_writable's order.
  TORCH_CHECK_VALUE(!defined(running_mean) || !running_mean->is_same(*running_var), op,
                    "(): expected `running_mean` and `running_var` to be two tensors (each is updated in "
                    "place), got one tensor for both");
  check_running_stat_writable(op, "running_mean", running_mean);
  check_running_stat_writable(op, "running_var", running_var);
  check_batch_size(input);
  check_training_eps(op, eps);
  c10::DeviceGuard guard(input.device());

  const Activation x = dense_activation(input, input.suggest_memory_format());
  const auto acc = accumulation_type(input);
  Tensor mean = at::empty({x.geometry.channels}, input.options().dtype(acc));
  Tensor invstd = at::empty({x.geometry.channels}, input.options().dtype(acc));
  if (x.geometry.numel() == 0) {
    // An empty batch: mean 0, variance 0; eager leaves the running statistics untouched.
    // (No channels: nothing to write; the kernels are called only for values.)
    mean.zero_();
    invstd.fill_(1.0 / std::sqrt(eps));
    return {mean, invstd};
  }
  RunningStat rmean(running_mean, acc), rvar(running_var, acc);
  Tensor scratch = workspace(kernels.batch_stats_workspace(x.geometry), input);
  BatchStatsParams p;
  p.geometry = x.geometry;
  p.input = x.tensor.const_data_ptr();
  p.mean = mean.mutable_data_ptr();
  p.invstd = invstd.mutable_data_ptr();
  p.running_mean = rmean.data();
  p.running_var = rvar.data();
  p.momentum = momentum;
  p.eps = eps;
  p.workspace = scratch.numel() ? scratch.mutable_data_ptr() : nullptr;
  kernels.batch_stats(p);
  rmean.write_back();
  rvar.write_back();
  return {mean, invstd};
}

Tensor bn_relu(const BnActKernels& kernels, const Tensor& input, const OptionalTensor& weight,
               const OptionalTensor& bias, const Tensor& mean, const Tensor& invstd,
               bool /*training: used by autograd only*/) {
  const BranchArgs args{input, weight, bias, mean, invstd, ""};
  check_branch(kernels, "bn_relu", args);
  c10::DeviceGuard guard(input.device());
  const Branch main(args, input.suggest_memory_format());
  BnActForwardParams p;
  p.epilogue = Epilogue::kRelu;
  p.main = main.view();
  return run_forward(kernels, p, main.x);
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_backward(const BnActKernels& kernels,
                                                    const Tensor& grad_out, const Tensor& input,
                                                    const OptionalTensor& weight,
                                                    const OptionalTensor& bias, const Tensor& mean,
                                                    const Tensor& invstd, bool training) {
  constexpr const char* op = "bn_relu_backward";
  const BranchArgs args{input, weight, bias, mean, invstd, ""};
  check_branch(kernels, op, args);
  check_like(op, "grad_out", grad_out, "input", input);
  c10::DeviceGuard guard(input.device());
  const Branch main(args, input.suggest_memory_format());
  const Tensor grad = grad_out.contiguous(main.x.format);
  BranchGrads grads(main);
  BnActBackwardParams p = backward_params(Epilogue::kRelu, training, grad, main, grads);
  run_backward(kernels, p, input, {&grads});
  return {grads.input, grads.weight, grads.bias};
}

Tensor bn_add_relu(const BnActKernels& kernels, const Tensor& input, const Tensor& residual,
                   const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& mean,
                   const Tensor& invstd, bool /*training: used by autograd only*/) {
  constexpr const char* op = "bn_add_relu";
  const BranchArgs args{input, weight, bias, mean, invstd, ""};
  check_branch(kernels, op, args);
  check_like(op, "residual", residual, "input", input);
  c10::DeviceGuard guard(input.device());
  const Branch main(args, input.suggest_memory_format());
  const Tensor dense_residual = residual.contiguous(main.x.format);
  BnActForwardParams p;
  p.epilogue = Epilogue::kAddRelu;
  p.main = main.view();
  p.residual = dense_residual.const_data_ptr();
  return run_forward(kernels, p, main.x);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_add_relu_backward(
    const BnActKernels& kernels, const Tensor& grad_out, const Tensor& input,
    const Tensor& residual, const OptionalTensor& weight, const OptionalTensor& bias,
    const Tensor& mean, const Tensor& invstd, bool training) {
  constexpr const char* op = "bn_add_relu_backward";
  const BranchArgs args{input, weight, bias, mean, invstd, ""};
  check_branch(kernels, op, args);
  check_like(op, "grad_out", grad_out, "input", input);
  check_like(op, "residual", residual, "input", input);
  c10::DeviceGuard guard(input.device());
  const Branch main(args, input.suggest_memory_format());
  const Tensor grad = grad_out.contiguous(main.x.format);
  const Tensor dense_residual = residual.contiguous(main.x.format);
  BranchGrads grads(main);
  Tensor grad_residual = empty_activation(main.x);
  BnActBackwardParams p = backward_params(Epilogue::kAddRelu, training, grad, main, grads);
  p.residual = dense_residual.const_data_ptr();
  p.grad_residual = grad_residual.mutable_data_ptr();
  run_backward(kernels, p, input, {&grads});
  return {grads.input, grad_residual, grads.weight, grads.bias};
}

Tensor dual_bn_add_relu(const BnActKernels& kernels, const Tensor& input,
                        const OptionalTensor& weight, const OptionalTensor& bias,
                        const Tensor& mean, const Tensor& invstd, const Tensor& input_d,
                        const OptionalTensor& weight_d, const OptionalTensor& bias_d,
                        const Tensor& mean_d, const Tensor& invstd_d,
                        bool /*training: used by autograd only*/) {
  constexpr const char* op = "dual_bn_add_relu";
  const BranchArgs args{input, weight, bias, mean, invstd, ""};
  const BranchArgs args_d{input_d, weight_d, bias_d, mean_d, invstd_d, "_d"};
  check_branch(kernels, op, args);
  check_branch(kernels, op, args_d);
  check_like(op, "input_d", input_d, "input", input);
  c10::DeviceGuard guard(input.device());
  const Branch main(args, input.suggest_memory_format());
  const Branch downsample(args_d, main.x.format);
  BnActForwardParams p;
  p.epilogue = Epilogue::kDualAddRelu;
  p.main = main.view();
  p.downsample = downsample.view();
  return run_forward(kernels, p, main.x);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dual_bn_add_relu_backward(
    const BnActKernels& kernels, const Tensor& grad_out, const Tensor& input,
    const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& mean,
    const Tensor& invstd, const Tensor& input_d, const OptionalTensor& weight_d,
    const OptionalTensor& bias_d, const Tensor& mean_d, const Tensor& invstd_d, bool training) {
  constexpr const char* op = "dual_bn_add_relu_backward";
  const BranchArgs args{input, weight, bias, mean, invstd, ""};
  const BranchArgs args_d{input_d, weight_d, bias_d, mean_d, invstd_d, "_d"};
  check_branch(kernels, op, args);
  check_branch(kernels, op, args_d);
  check_like(op, "grad_out", grad_out, "input", input);
  check_like(op, "input_d", input_d, "input", input);
  c10::DeviceGuard guard(input.device());
  const Branch main(args, input.suggest_memory_format());
  const Branch downsample(args_d, main.x.format);
  const Tensor grad = grad_out.contiguous(main.x.format);
  BranchGrads grads(main), grads_d(downsample);
  BnActBackwardParams p = backward_params(Epilogue::kDualAddRelu, training, grad, main, grads);
  p.downsample = downsample.view();
  p.grad_input_d = grads_d.input.mutable_data_ptr();
  p.grad_weight_d = grads_d.weight.mutable_data_ptr();
  p.grad_bias_d = grads_d.bias.mutable_data_ptr();
  run_backward(kernels, p, input, {&grads, &grads_d});
  return {grads.input, grads.weight, grads.bias, grads_d.input, grads_d.weight, grads_d.bias};
}

}  // namespace resnet_fused
