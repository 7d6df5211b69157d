// Stand-in for the CUDA header of the same name: see ../emulated_cuda.h.
#pragma once
#include "../emulated_cuda.h"
