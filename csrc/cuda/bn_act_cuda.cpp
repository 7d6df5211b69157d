// CUDA backend: binds the op schemas to the CUDA kernels, on the current stream.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "../bn_act.h"
#include "bn_act_kernels.h"

namespace resnet_fused {
namespace {

void batch_stats(const BatchStatsParams& p) {
  C10_CUDA_CHECK(cuda::launch_batch_stats(p, c10::cuda::getCurrentCUDAStream()));
}

void forward(const BnActForwardParams& p) {
  C10_CUDA_CHECK(cuda::launch_bn_act_forward(p, c10::cuda::getCurrentCUDAStream()));
}

void backward(const BnActBackwardParams& p) {
  C10_CUDA_CHECK(cuda::launch_bn_act_backward(p, c10::cuda::getCurrentCUDAStream()));
}

constexpr BnActKernels kCudaKernels{
    "CUDA",
    /*supports_float64=*/false,
    cuda::batch_stats_workspace_bytes,
    batch_stats,
    forward,
    cuda::bn_act_backward_workspace_bytes,
    backward,
};

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) { register_bn_act_ops<kCudaKernels>(m); }

}  // namespace resnet_fused
