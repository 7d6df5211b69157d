// Baseline build of the CPU kernels (see bn_act_kernels_impl.h).
#include "bn_act_kernels_isa.h"

#define CPU_CAPABILITY DEFAULT
#include "bn_act_kernels_impl.h"
