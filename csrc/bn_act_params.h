// Plain parameter structs shared by every compiled backend (CPU and CUDA).
//
// This header is deliberately free of torch, pybind11 and CUDA headers: the kernels
// only ever see raw pointers, sizes and enums, and the bindings (the only code that
// knows about at::Tensor) fill these structs after validating their arguments.
//
// Vocabulary
//   activation      an [N, C, H, W] tensor in one of two dense layouts (Layout).
//   reduce size     M = N * H * W, the number of values behind one channel's statistics.
//   branch          one BatchNorm feeding the fused sum: its input plus per-channel
//                   weight, bias, mean and inverse std. The forward pre-activation is
//                     pre = sum over branches of (x - mean) * invstd * weight + bias
//                           [+ residual]
//                   computed as fma(x, scale, shift) with scale = weight * invstd and
//                   shift = bias - mean * scale, and out = max(pre, 0).
//   accumulation    per-channel arrays (weight, bias, mean, invstd, running stats,
//   type            weight/bias gradients) are `double` for kFloat64 activations and
//                   `float` for every other dtype; activations are in their own dtype.
#pragma once

#include <cstddef>
#include <cstdint>

namespace resnet_fused {

enum class DType : int8_t { kFloat32, kFloat16, kBFloat16, kFloat64 };

// kNHWC: channels_last, C contiguous values per (n, h, w) row.
// kNCHW: torch.contiguous_format, H*W contiguous values per (n, c) plane.
enum class Layout : int8_t { kNCHW, kNHWC };

struct ActivationGeometry {
  int64_t batch = 0;     // N
  int64_t channels = 0;  // C
  int64_t spatial = 0;   // H * W
  Layout layout = Layout::kNHWC;
  DType dtype = DType::kFloat32;

  int64_t numel() const { return batch * channels * spatial; }
  int64_t reduce_size() const { return batch * spatial; }
};

// The largest pre-activation whose output, stored in `dtype` (rounded to nearest even), is 0:
// half the dtype's smallest subnormal, a tie that rounds to 0; 0 where the output keeps the
// accumulation type. Every backend's ReLU backward masks where pre <= this, so the mask
// follows the output as the forward stored it, exactly as torch.relu's backward does.
constexpr double largest_zero_output(DType dtype) {
  return dtype == DType::kFloat16 ? 0x1p-25 : dtype == DType::kBFloat16 ? 0x1p-134 : 0.0;
}

// The three fused tails of a residual block.
enum class Epilogue : int8_t {
  kRelu,          // relu(bn(x))                       BN1, BN2 of a block
  kAddRelu,       // relu(bn(x) + residual)            BN3 with an identity shortcut
  kDualAddRelu,   // relu(bn(x) + bn_d(x_d))           BN3 with a conv+BN downsample
};

inline bool has_downsample(Epilogue e) { return e == Epilogue::kDualAddRelu; }

struct BnBranch {
  const void* input = nullptr;   // activation, geometry.dtype
  const void* weight = nullptr;  // [C] accumulation type; null means 1
  const void* bias = nullptr;    // [C] accumulation type; null means 0
  const void* mean = nullptr;    // [C] accumulation type
  const void* invstd = nullptr;  // [C] accumulation type
};

// Per-channel batch mean and inverse std (biased variance), optionally folding
// the batch into running statistics exactly as eager BatchNorm does:
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)
struct BatchStatsParams {
  ActivationGeometry geometry;
  const void* input = nullptr;
  void* mean = nullptr;          // [C] out
  void* invstd = nullptr;        // [C] out
  void* running_mean = nullptr;  // [C] in/out, may be null
  void* running_var = nullptr;   // [C] in/out, may be null (null iff running_mean is)
  double momentum = 0.1;
  double eps = 1e-5;
  void* workspace = nullptr;     // backend scratch (CUDA: per-block partials)
};

struct BnActForwardParams {
  ActivationGeometry geometry;
  Epilogue epilogue = Epilogue::kRelu;
  BnBranch main;
  BnBranch downsample;             // kDualAddRelu only
  const void* residual = nullptr;  // kAddRelu only, same layout and dtype as main.input
  void* out = nullptr;
};

// Backward of BnActForwardParams. With g = 0 where the output (pre as stored in the input dtype) is <= 0,
// else grad_out (NaN passes), per branch:
//   grad_bias   = sum(g)
//   grad_weight = sum(g * (x - mean)) * invstd
//   training:   grad_x = scale * (g - sum(g) / M - (x - mean) * invstd^2 * sum(g * (x - mean)) / M)
//   eval:       grad_x = scale * g
// and grad_residual = g. The ReLU mask is recomputed from the saved inputs with the
// forward's exact arithmetic, so no activation beyond the inputs is kept alive.
struct BnActBackwardParams {
  ActivationGeometry geometry;
  Epilogue epilogue = Epilogue::kRelu;
  bool training = true;
  const void* grad_out = nullptr;
  BnBranch main;
  BnBranch downsample;
  const void* residual = nullptr;
  void* grad_input = nullptr;        // activation
  void* grad_weight = nullptr;       // [C] accumulation type
  void* grad_bias = nullptr;         // [C] accumulation type
  void* grad_residual = nullptr;     // kAddRelu
  void* grad_input_d = nullptr;      // kDualAddRelu
  void* grad_weight_d = nullptr;
  void* grad_bias_d = nullptr;
  void* workspace = nullptr;         // backend scratch (CUDA: per-block partials)
};

}  // namespace resnet_fused
