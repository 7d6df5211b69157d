// CUDA kernels of the fused BatchNorm ops, behind plain C++ entry points.
//
// Torch-free on purpose (CUDA runtime + bn_act_params.h only): nvcc never parses the
// torch or pybind11 headers, so each .cu compiles in seconds. csrc/cuda/bn_act_cuda.cpp
// binds these to the op schemas; csrc/bn_act.cpp validates, allocates (workspaces
// included, through torch's caching allocator) and sets the device.
//
// Every entry point enqueues on `stream` only: no host synchronization, no allocation,
// so the ops are CUDA-graph capturable. They return the first launch error (or
// cudaSuccess). Activations are float32, float16 or bfloat16; per-channel arrays are
// float32. The host skips these calls for empty tensors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "../bn_act_params.h"

namespace resnet_fused::cuda {

// Scratch of launch_batch_stats: per-block partial moments for the second-level reduce.
size_t batch_stats_workspace_bytes(const ActivationGeometry& geometry);
cudaError_t launch_batch_stats(const BatchStatsParams& params, cudaStream_t stream);

cudaError_t launch_bn_act_forward(const BnActForwardParams& params, cudaStream_t stream);

// Scratch of launch_bn_act_backward: per-block partial sums and per-channel coefficients.
size_t bn_act_backward_workspace_bytes(const ActivationGeometry& geometry, Epilogue epilogue);
cudaError_t launch_bn_act_backward(const BnActBackwardParams& params, cudaStream_t stream);

}  // namespace resnet_fused::cuda
