// CPU kernels of the fused BatchNorm ops (at::parallel_for, at::vec inner loops).
// They compute on the plain params structs; csrc/bn_act.cpp validates and allocates.
#pragma once

#include "../bn_act_params.h"

namespace resnet_fused::cpu {

void batch_stats(const BatchStatsParams& p);
void bn_act_forward(const BnActForwardParams& p);
void bn_act_backward(const BnActBackwardParams& p);

}  // namespace resnet_fused::cpu
