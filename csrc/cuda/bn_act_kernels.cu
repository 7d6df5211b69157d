// CUDA kernels of the fused BatchNorm ops (docs/cuda_kernels.md has the design).
//
// Work mapping. A thread moves V values per access: one 16-byte vector (8 half/bfloat16
// or 4 float values) when the run length (C in channels_last, H*W in NCHW) is a
// multiple of V and every activation pointer is 16-byte aligned, else V = 1 (scalar).
//   channels_last  block (channel vectors, rows): a thread owns V adjacent channels of
//                  every (gridDim.y * blockDim.y)-th row, so a warp reads whole rows
//                  (or row segments of at least 256 bytes) and per-channel coefficients
//                  stay in registers for the thread's whole life.
//   NCHW           block (1, 256) per (channel, split of the channel's N*H*W values):
//                  threads stride over the split's vectors, plane by plane; the channel
//                  and its coefficients are uniform per block.
// Grids are at most one wave of the blocks each kernel keeps resident (its
// __launch_bounds__) where the shape allows (wave_grid_y: channels_last, and NCHW
// elementwise passes with C at most the resident blocks); NCHW reductions take the splits
// that fill their last wave (nchw_reduction_splits), over several waves. Every thread
// issues U independent loads per input before it uses the first.
//
// Reductions are two-level and deterministic: each block reduces its values in a fixed
// order (per-thread moments or plain float sums, then a shared-memory tree over the
// block's rows) into one partial per (split, channel) in the workspace; a finalize
// kernel merges a channel's partials in double, in a fixed order, and writes the results
// (batch_stats: mean, invstd, running statistics; backward: weight and bias gradients and
// the coefficients of the elementwise pass). The grid and vector width, hence the
// reduction order, are a function of the geometry, the device and the activations'
// 16-byte alignment: two runs on the same addresses' alignment agree bit for bit.
//
// Launches. On sm_90 and later every kernel is launched as a programmatic dependent of
// the kernel before it in the stream (launch_kernel): it may be scheduled while that one
// still runs, and it first waits, in await_stream_predecessor(), until the kernels before it
// have completed and their writes are visible. So an op's second and third kernels (and
// the next op's first) are resident when the one before ends, instead of being launched
// then: their start overlaps its end.
//
// Indices and offsets are 64-bit. The pre-activation is formed by one function with
// explicitly rounded operations (never contracted or reordered by nvcc), so the
// backward recomputes the forward's ReLU mask bit for bit instead of storing it.

#include "bn_act_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>

namespace resnet_fused::cuda {
namespace {

// ---------------------------------------------------------------- configuration

constexpr int kThreads = 256;             // threads per block of every streaming kernel
constexpr int64_t kRowTileVectors = 32;   // channel vectors per block along a channels_last row
// A finalize block: channels (x) by lanes (y) that each merge every kFinalizeLanes-th
// partial of their channel, kFinalizeBatch loads at a time, then merge across lanes. Many
// lanes and one batch for up to 512 partials (a wave of 3 blocks on up to 170 SMs) keep
// its serial chain of L2 round trips short: it is on every op's critical path.
constexpr int kFinalizeChannels = 8;
constexpr int kFinalizeLanes = 64;
constexpr int kFinalizeBatch = 8;
constexpr int kFinalizeThreads = kFinalizeChannels * kFinalizeLanes;
constexpr int64_t kMaxGridY = 65535;
// Values of one channel a reduction block may see: its float count stays exact (< 2^24).
constexpr int64_t kMaxSplitValues = int64_t{1} << 22;
constexpr int kMaxDevices = 64;

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// How a streaming kernel keeps HBM busy: the blocks it keeps resident per SM (the
// register cap of its __launch_bounds__; its grid is at most one wave of them where the
// shape allows, wave_grid_y) and the vectors a thread loads before it uses the first:
// 64 bytes in flight per thread at 3 or 4 resident blocks of 256 threads, 96 at 2, so
// 48-64 KB per SM (scalar accesses need more loads for the same bytes). A kernel that only reads needs twice that (read_only): by Little's law
// the bytes in flight are the read bandwidth times the latency, and where a kernel that
// writes as much as it reads gets half its traffic from fire-and-forget stores, every
// byte of a reduction is a load (batch_stats read at 73% of copy bandwidth with 64).
struct StreamConfig {
  int blocks_per_sm;
  int inputs;  // activations streamed in
  bool read_only = false;
  int max_unroll_8_lanes = 0;  // loads at most with 8-lane (16-bit) vectors; 0: no cap

  constexpr int unroll(int vec) const {
    const int loads = (vec == 1 ? 8 : blocks_per_sm >= 3 ? 4 : 6) * (read_only ? 2 : 1);
    const int u = loads / inputs > 1 ? loads / inputs : 1;
    return vec == 8 && max_unroll_8_lanes > 0 && u > max_unroll_8_lanes ? max_unroll_8_lanes : u;
  }
};

// The statistics kernel holds the rows it loaded beside 2V + 1 floats of moments: with
// 16-bit values (V = 8), six rows fit its 80 registers without a spill, eight do not.
constexpr StreamConfig kStatsConfig{3, 1, true, 6};
// input [+ residual | input_d]
constexpr StreamConfig forward_config(Epilogue e) {
  return {e == Epilogue::kDualAddRelu ? 3 : 4, e == Epilogue::kRelu ? 1 : 2};
}
// Backward reduce pass: grad_out, input [+ residual | input_d] (kAddRelu also writes
// grad_residual = g here).
constexpr StreamConfig backward_reduce_config(Epilogue e) {
  return e == Epilogue::kRelu ? StreamConfig{3, 2} : StreamConfig{2, 3};
}
// Backward elementwise pass: grad_out, input [+ input_d]; kAddRelu streams grad_residual
// (= g) and input instead, like kRelu.
constexpr StreamConfig backward_elementwise_config(Epilogue e) {
  return e == Epilogue::kDualAddRelu ? StreamConfig{2, 3} : StreamConfig{3, 2};
}

// Per-channel sums of the backward reduction: sum(g), sum(g * (x - mean)) and, for the
// downsample branch, sum(g * (x_d - mean_d)).
constexpr int num_sums(Epilogue e) { return e == Epilogue::kDualAddRelu ? 3 : 2; }
// Per-channel coefficients of the backward's elementwise pass: intercept, slope per branch.
constexpr int num_coefficients(Epilogue e) { return e == Epilogue::kDualAddRelu ? 4 : 2; }

// ---------------------------------------------------------------- element access

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
// bfloat16 is the top half of a float: widen by a shift of the raw bits.
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(v)) << 16);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// V values moved by one access (a single 16-byte instruction for a full vector). Loaded
// values stay in their own dtype in registers and are widened to float on use.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
  __device__ float operator[](int i) const {
    if constexpr (std::is_same_v<T, __nv_bfloat16> && V % 2 == 0) {
      // From the 32-bit word holding values i and i ^ 1 (little-endian: the even one in
      // its low half), one instruction each; per value, nvcc extracted, then shifted.
      uint32_t word;
      std::memcpy(&word, &v[i & ~1], sizeof word);
      return __uint_as_float(i & 1 ? word & 0xffff0000u : word << 16);
    } else {
      return to_float(v[i]);
    }
  }
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// The same through the read-only data path (ld.global.nc), for memory the kernel never
// writes. nvcc infers it by itself only where it can prove that, and an asm statement in
// the kernel (prefetch_l2) stops it from proving anything.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_read_only(const T* p) {
#ifdef __CUDA_ARCH__
  Pack<T, V> pack;
  if constexpr (sizeof(pack) == 16) {
    const uint4 word = __ldg(reinterpret_cast<const uint4*>(p));
    std::memcpy(&pack, &word, sizeof pack);
  } else if constexpr (sizeof(pack) == 8) {
    const uint2 word = __ldg(reinterpret_cast<const uint2*>(p));
    std::memcpy(&pack, &word, sizeof pack);
  } else if constexpr (sizeof(pack) == 4) {
    const unsigned int word = __ldg(reinterpret_cast<const unsigned int*>(p));
    std::memcpy(&pack, &word, sizeof pack);
  } else {
    static_assert(sizeof(pack) == 2, "a vector of 2, 4, 8 or 16 bytes");
    const unsigned short word = __ldg(reinterpret_cast<const unsigned short*>(p));
    std::memcpy(&pack, &word, sizeof pack);
  }
  return pack;
#else  // the CPU emulation has one kind of load
  return load<T, V>(p);
#endif
}

__device__ __forceinline__ uint32_t bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  if constexpr (sizeof(T) * V == 16) {
    // A full vector leaves as four 32-bit words in one st.global.v4: stored as a Pack, or
    // even as a uint4, it was cut by nvcc into four 32-bit stores in two of the four
    // unrolled stores of bn_act_forward_kernel<kRelu, NCHW> (CUDA 13.0, every dtype).
    constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
    uint32_t words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      words[w] = 0;
#pragma unroll
      for (int j = 0; j < kPerWord; ++j) words[w] |= bits_of(from_float<T>(in[w * kPerWord + j])) << (16 * j);
    }
#ifdef __CUDA_ARCH__
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(words[0]), "r"(words[1]), "r"(words[2]),
                 "r"(words[3])
                 : "memory");
#else  // the CPU emulation (tests/cuda_emulation)
    std::memcpy(p, words, sizeof words);
#endif
  } else {
    Pack<T, V> pack;
#pragma unroll
    for (int i = 0; i < V; ++i) pack.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Pack<T, V>*>(p) = pack;
  }
}

// ---------------------------------------------------------------- the math

// One BatchNorm's per-channel arrays (float32). weight null means 1, bias null means 0.
struct Branch {
  const float* weight;
  const float* bias;
  const float* mean;
  const float* invstd;
};

// pre = fma(x, scale, shift) with scale = weight * invstd, shift = bias - mean * scale.
__device__ __forceinline__ void channel_affine(const Branch& b, int64_t c, float& scale, float& shift) {
  const float weight = b.weight != nullptr ? b.weight[c] : 1.f;
  const float bias = b.bias != nullptr ? b.bias[c] : 0.f;
  scale = __fmul_rn(weight, b.invstd[c]);
  shift = __fmaf_rn(-b.mean[c], scale, bias);
}

// The pre-activation of the fused sum; `other` is the residual (kAddRelu) or the
// downsample input (kDualAddRelu). Shared verbatim by the forward and both backward passes.
template <Epilogue E>
__device__ __forceinline__ float preactivation(float x, float other, float scale, float shift, float scale_d,
                                               float shift_d) {
  float pre = __fmaf_rn(x, scale, shift);
  if constexpr (E == Epilogue::kAddRelu) pre = __fadd_rn(pre, other);
  if constexpr (E == Epilogue::kDualAddRelu) pre = __fadd_rn(pre, __fmaf_rn(other, scale_d, shift_d));
  return pre;
}

// NaN propagates, as in torch.relu.
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

template <typename T>
constexpr DType kDTypeOf = DType::kFloat32;
template <>
constexpr DType kDTypeOf<__half> = DType::kFloat16;
template <>
constexpr DType kDTypeOf<__nv_bfloat16> = DType::kBFloat16;

// largest_zero_output (bn_act_params.h) for T, exact in float.
template <typename T>
constexpr float kLargestZeroOutput = static_cast<float>(largest_zero_output(kDTypeOf<T>));

// The upstream gradient, 0 where the ReLU's output is <= 0: as torch.relu's backward
// (threshold_backward), so a NaN pre-activation passes it. The output as the forward
// stores it in T: a pre-activation that rounds to 0 there masks too.
template <typename T>
__device__ __forceinline__ float masked_gradient(float pre, float grad) {
  return pre <= kLargestZeroOutput<T> ? 0.f : grad;
}

// Per-lane affine maps of one branch: lane i holds channel walk.channel(i).
template <int V>
struct LaneAffine {
  float scale[V] = {}, shift[V] = {};

  template <typename Walk>
  __device__ void load(const Branch& b, const Walk& walk) {
#pragma unroll
    for (int i = 0; i < V; ++i) channel_affine(b, walk.channel(i), scale[i], shift[i]);
  }
};

// lanes[i] = values[walk.channel(i)] for a per-channel array.
template <int V, typename Walk>
__device__ __forceinline__ void load_lanes(const float* values, const Walk& walk, float (&lanes)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) lanes[i] = values[walk.channel(i)];
}

// ---------------------------------------------------------------- walks over an activation

// Everything a kernel needs to know about the activation's layout (filled by make_launch).
struct Shape {
  int64_t channels;         // C
  int64_t vectors;          // channels_last: vectors per row, C / V; NCHW: per plane, H*W / V
  int64_t rows;             // channels_last: N*H*W
  int64_t spatial;          // NCHW: H*W
  int64_t items;            // NCHW: vectors of one channel, N * vectors
  int64_t items_per_split;  // NCHW: vectors of one channel per block
  int64_t step_vectors;     // NCHW: kThreads % vectors, the in-plane part of a thread's step
  int64_t step_offset;      // NCHW: element offset of a step that stays in the plane
  int64_t wrap_offset;      // NCHW: extra offset when a step moves on to the next plane
};

template <Layout L, int V>
struct Walk;

// channels_last: a thread owns the V channels of one channel vector in every
// (gridDim.y * blockDim.y)-th row, starting from its row in the first block row.
template <int V>
struct Walk<Layout::kNHWC, V> {
  bool active;  // false for the block's threads past the last channel vector
  int64_t first_channel, row, rows, row_step, offset, offset_step;

  __device__ explicit Walk(const Shape& s) {
    const int64_t vector = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    active = vector < s.vectors;
    first_channel = vector * V;
    rows = s.rows;
    row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
    offset = row * s.channels + first_channel;
    offset_step = row_step * s.channels;
  }
  __device__ bool valid() const { return row < rows; }
  __device__ void next() {
    row += row_step;
    offset += offset_step;
  }
  __device__ int64_t channel(int lane) const { return first_channel + lane; }
};

// NCHW: block (channel, split) covers vectors [split * items_per_split, ...) of the
// channel's N planes; thread t takes every kThreads-th vector from the split's t-th.
template <int V>
struct Walk<Layout::kNCHW, V> {
  static constexpr bool active = true;
  int64_t channel_index, item, end, vector, offset;
  int64_t vectors, step_vectors, step_offset, wrap_offset;

  __device__ explicit Walk(const Shape& s)
      : vectors(s.vectors), step_vectors(s.step_vectors), step_offset(s.step_offset), wrap_offset(s.wrap_offset) {
    channel_index = blockIdx.x;
    const int64_t begin = static_cast<int64_t>(blockIdx.y) * s.items_per_split;
    end = min(s.items, begin + s.items_per_split);
    item = begin + threadIdx.y;
    const int64_t n = item / s.vectors;
    vector = item - n * s.vectors;
    offset = (n * s.channels + channel_index) * s.spatial + vector * V;
  }
  __device__ bool valid() const { return item < end; }
  __device__ void next() {
    item += kThreads;
    vector += step_vectors;
    offset += step_offset;
    if (vector >= vectors) {
      vector -= vectors;
      offset += wrap_offset;
    }
  }
  __device__ int64_t channel(int) const { return channel_index; }
};

// ---------------------------------------------------------------- reduction states

// Count, mean and sum of squared deviations of V channels (Chan et al. to merge).
template <typename Acc, int V>
struct Moments {
  Acc count = 0;
  Acc mean[V] = {};
  Acc m2[V] = {};

  template <int Slots>
  struct Shared {
    Acc count[Slots];
    Acc mean[V][Slots];
    Acc m2[V][Slots];
  };

  // U more rows (x[u][i] is a value of channel i) merge into the state as one partial
  // (Chan et al.): their own mean and squared deviations, as sums of (x - k) and (x - k)^2
  // with k = the channel's value in the first row. k is one of the values, so by
  // Cauchy-Schwarz U (mean - k)^2 <= (U - 1) m2, and m2 = sum((x - k)^2) - U (mean - k)^2
  // loses at most log2(U) bits. Per value: a subtract, an add and an FMA; a Welford update
  // per row costs two adds, two FMAs and a reciprocal, which made the bf16 statistics
  // kernel issue-bound (4.9 instructions per byte loaded). Channel by channel, so the
  // registers are the loaded rows and the state. U = 1 is a Welford update.
  template <int U, typename Values>
  __device__ __forceinline__ void add_rows(const Values (&x)[U]) {
    static_assert(std::is_same_v<Acc, float>, "streaming moments are float");
    const float total = count + U;
    const float weight = U == 1 ? __frcp_rn(total) : __fdiv_rn(U, total);  // of the new rows' mean
    const float cross = count * weight;        // count * U / total
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float k = x[0][i];
      float sum = 0.f, sum_squares = 0.f;
#pragma unroll
      for (int u = 1; u < U; ++u) {
        const float d = x[u][i] - k;
        sum = u == 1 ? d : sum + d;  // (0 + d would cost an add: -0 + 0 is +0)
        sum_squares = u == 1 ? d * d : __fmaf_rn(d, d, sum_squares);
      }
      const float shift = sum * (1.f / U);  // rows' mean - k
      const float rows_m2 = __fmaf_rn(-shift, sum, sum_squares);
      const float delta = (k + shift) - mean[i];
      mean[i] = __fmaf_rn(delta, weight, mean[i]);
      // delta * cross first: on a thread's first step cross is 0 and delta the raw mean,
      // whose square may overflow (Inf * 0 would be NaN).
      m2[i] += __fmaf_rn(delta * cross, delta, rows_m2);
    }
    count = total;
  }

  __device__ void merge(Acc other_count, const Acc (&other_mean)[V], const Acc (&other_m2)[V]) {
    if (other_count == Acc(0)) return;
    const Acc total = count + other_count;
    const Acc other_weight = other_count / total;
    const Acc cross = count * other_weight;  // count * other_count / total
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const Acc delta = other_mean[i] - mean[i];
      mean[i] += delta * other_weight;
      m2[i] += other_m2[i] + delta * delta * cross;
    }
    count = total;
  }

  // The V lanes hold one channel with equal counts (NCHW): merge them pairwise.
  __device__ Moments<Acc, 1> fold_lanes() const {
    Moments<Acc, V> m = *this;
    Acc n = count;
#pragma unroll
    for (int half = V / 2; half > 0; half /= 2) {
#pragma unroll
      for (int i = 0; i < half; ++i) {
        const Acc delta = m.mean[i + half] - m.mean[i];
        m.mean[i] += delta * Acc(0.5);
        m.m2[i] += m.m2[i + half] + delta * delta * (n * Acc(0.5));
      }
      n += n;
    }
    Moments<Acc, 1> folded;
    folded.count = n;
    folded.mean[0] = m.mean[0];
    folded.m2[0] = m.m2[0];
    return folded;
  }

  template <int Slots>
  __device__ void save(Shared<Slots>& s, int slot) const {
    s.count[slot] = count;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      s.mean[i][slot] = mean[i];
      s.m2[i][slot] = m2[i];
    }
  }
  template <int Slots>
  __device__ void merge_from(const Shared<Slots>& s, int slot) {
    Acc other_mean[V], other_m2[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      other_mean[i] = s.mean[i][slot];
      other_m2[i] = s.m2[i][slot];
    }
    merge(s.count[slot], other_mean, other_m2);
  }
};

template <typename Acc, int K>
struct Sums {
  Acc value[K] = {};

  template <int Slots>
  struct Shared {
    Acc value[K][Slots];
  };
  template <int Slots>
  __device__ void save(Shared<Slots>& s, int slot) const {
#pragma unroll
    for (int k = 0; k < K; ++k) s.value[k][slot] = value[k];
  }
  template <int Slots>
  __device__ void merge_from(const Shared<Slots>& s, int slot) {
#pragma unroll
    for (int k = 0; k < K; ++k) value[k] += s.value[k][slot];
  }
};

__device__ __forceinline__ int pow2_ceil(int n) { return n <= 1 ? 1 : 1 << (32 - __clz(n - 1)); }

// Merges the states of a block's rows (threadIdx.y) column by column (threadIdx.x) in a
// fixed tree order; row 0 ends up with the block's state. Every thread must call it, and
// a shared buffer serves one call (there is no barrier before the first save: a second
// call on the same buffer would need one).
template <int Slots, typename State>
__device__ void block_reduce_rows(State& state, typename State::template Shared<Slots>& shared) {
  const int width = blockDim.x, height = blockDim.y;
  const int x = threadIdx.x, y = threadIdx.y;
  state.save(shared, y * width + x);
  for (int half = pow2_ceil(height) / 2; half > 0; half /= 2) {
    __syncthreads();
    if (y < half && y + half < height) {
      state.merge_from(shared, (y + half) * width + x);
      state.save(shared, y * width + x);
    }
  }
}

// ---------------------------------------------------------------- programmatic dependent launch

// The first statement of every kernel, in every thread, before it touches global memory:
// waits until the kernels before it in the stream have completed and their writes are
// visible (griddepcontrol.wait; it returns at once after an ordinary launch), then lets the
// stream's next kernel be scheduled (griddepcontrol.launch_dependents: once every block of
// this grid has run it, the next kernel's blocks may take the room this one leaves; they
// wait here in turn). Waiting first keeps at most two grids of the stream resident, and
// makes a kernel launched early see exactly what an ordinary launch would: everything
// after this line is ordered after the kernels before it, whatever they were.
// No-ops below sm_90, whose kernels the host never launches early (launch_kernel).
__device__ __forceinline__ void await_stream_predecessor() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();
  cudaTriggerProgrammaticLaunchCompletion();
#endif
}

// ---------------------------------------------------------------- batch statistics

// Partial moments, one per (split, channel): mean and m2 are [splits][C], count [splits].
struct StatsPartials {
  float* mean;
  float* m2;
  float* count;
};

template <typename T, int V, Layout L>
__global__ void __launch_bounds__(kThreads, kStatsConfig.blocks_per_sm)
    batch_stats_kernel(const T* __restrict__ input, Shape shape, StatsPartials partials) {
  await_stream_predecessor();
  constexpr int U = kStatsConfig.unroll(V);
  Walk<L, V> walk(shape);
  Moments<float, V> moments;
  if (walk.active) {
    while (walk.valid()) {
      Pack<T, V> x[U];
      int rows = 0;  // the valid rows come first: a walk only moves forward
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (walk.valid()) {
          x[u] = load<T, V>(input + walk.offset);
          ++rows;
        }
        walk.next();
      }
      if (rows == U) {
        moments.add_rows(x);
      } else {  // a thread's last step, at most: row by row
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (u < rows) {
            const Pack<T, V> row[1] = {x[u]};
            moments.add_rows(row);
          }
        }
      }
    }
  }
  const int64_t C = shape.channels;
  const int64_t split = blockIdx.y;
  if constexpr (L == Layout::kNCHW) {
    Moments<float, 1> folded = moments.fold_lanes();
    __shared__ Moments<float, 1>::Shared<kThreads> shared;
    block_reduce_rows<kThreads>(folded, shared);
    if (threadIdx.y == 0) {
      partials.mean[split * C + walk.channel(0)] = folded.mean[0];
      partials.m2[split * C + walk.channel(0)] = folded.m2[0];
      if (blockIdx.x == 0) partials.count[split] = folded.count;
    }
  } else {
    __shared__ typename Moments<float, V>::template Shared<kThreads> shared;
    block_reduce_rows<kThreads>(moments, shared);
    if (threadIdx.y == 0 && walk.active) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        partials.mean[split * C + walk.channel(i)] = moments.mean[i];
        partials.m2[split * C + walk.channel(i)] = moments.m2[i];
      }
      // Every thread of a block row sees the same rows: thread (0, 0) has the count.
      if (blockIdx.x == 0 && threadIdx.x == 0) partials.count[split] = moments.count;
    }
  }
}

struct StatsFinalize {
  const float* mean;   // partials
  const float* m2;
  const float* count;
  int64_t splits, channels;
  float* out_mean;
  float* out_invstd;
  float* running_mean;  // may be null (then running_var is too)
  float* running_var;
  double momentum, eps;
};

// kFinalizeBatch partials of channel c (< channels), from partial `first` in steps of
// kFinalizeLanes; past the last split, zeros (a count of 0 adds nothing to the sums).
struct PartialBatch {
  float count[kFinalizeBatch], mean[kFinalizeBatch], m2[kFinalizeBatch];

  __device__ PartialBatch(const StatsFinalize& f, int64_t c, int64_t first) {
#pragma unroll
    for (int b = 0; b < kFinalizeBatch; ++b) {
      const int64_t s = first + b * kFinalizeLanes;
      const bool valid = s < f.splits;
      count[b] = valid ? f.count[s] : 0.f;
      mean[b] = valid ? f.mean[s * f.channels + c] : 0.f;
      m2[b] = valid ? f.m2[s * f.channels + c] : 0.f;
    }
  }
};

// Block (kFinalizeChannels, kFinalizeLanes). The partial moments (n_s, mean_s, m2_s) of a
// channel merge in one pass of plain sums in double, shifted by k = the first partial's
// mean: N = sum(n_s), S = sum(n_s (mean_s - k)), Q = sum(m2_s + n_s (mean_s - k)^2),
// each ending in a fixed tree over the lanes; then mean = k + S / N and
// m2 = Q - S^2 / N. That is Chan et al.'s merge without a serial chain of divisions, and
// with one round of loads. k is one partial's mean, so S^2 / N = N (mean - k)^2 <=
// (N / n_0) m2: the subtraction loses at most log2(2N / n_0 + 1) (about log2 of twice
// the splits) of double's 53 bits.
__global__ void __launch_bounds__(kFinalizeThreads, 2) batch_stats_finalize_kernel(StatsFinalize f) {
  await_stream_predecessor();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalizeChannels + threadIdx.x;
  const bool active = c < f.channels;
  const bool finalizes = threadIdx.y == 0 && active;  // the thread that writes channel c
  // The running statistics and k, loaded now: their round trip overlaps the partials'.
  const bool updates_running = finalizes && f.running_mean != nullptr;
  const float running_mean = updates_running ? f.running_mean[c] : 0.f;
  const float running_var = updates_running ? f.running_var[c] : 0.f;
  const double k = active ? f.mean[c] : 0.0;

  Sums<double, 3> sums;  // N, S, Q
  if (active) {
    for (int64_t first = threadIdx.y; first < f.splits; first += kFinalizeBatch * kFinalizeLanes) {
      const PartialBatch batch(f, c, first);
#pragma unroll
      for (int b = 0; b < kFinalizeBatch; ++b) {
        const double count = batch.count[b], spread = batch.mean[b] - k;
        sums.value[0] += count;
        sums.value[1] += count * spread;
        sums.value[2] += batch.m2[b] + count * spread * spread;
      }
    }
  }
  __shared__ Sums<double, 3>::Shared<kFinalizeThreads> shared;
  block_reduce_rows<kFinalizeThreads>(sums, shared);
  if (!finalizes) return;
  const double count = sums.value[0];
  const double shift = sums.value[1] / count;  // mean - k
  const double m2 = sums.value[2] - shift * sums.value[1];
  const double var = (m2 < 0 ? 0 : m2) / count;  // (rounding can leave m2 a hair below 0; NaN stays)
  const double mean = k + shift;
  f.out_mean[c] = static_cast<float>(mean);
  f.out_invstd[c] = static_cast<float>(1.0 / sqrt(var + f.eps));
  if (updates_running) {
    const double unbiased = var * count / (count - 1);
    f.running_mean[c] = static_cast<float>(f.momentum * mean + (1 - f.momentum) * running_mean);
    f.running_var[c] = static_cast<float>(f.momentum * unbiased + (1 - f.momentum) * running_var);
  }
}

// ---------------------------------------------------------------- one loop step's loads

__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifdef __CUDA_ARCH__
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else  // the CPU emulation touches the byte, so its address sanitizer checks the bounds
  (void)*static_cast<const volatile char*>(p);
#endif
}

// The vectors a streaming kernel loads in one loop step, U per input: the upstream
// gradient (backward passes), the input, and the other activation (residual or input_d)
// where the epilogue has one.
template <typename T, int V, int U>
struct StepLoads {
  Pack<T, V> g[U], x[U], o[U];
  int64_t offset[U];
  bool valid[U];

  // Asks L2 for the vectors of the walk's next step (a copy: the walk does not move),
  // holding no registers. A kernel does so before it loads its per-channel values: the
  // scale and shift they make are needed before the loop, so its first loads would
  // otherwise wait behind them, on every thread at once (a whole DRAM round trip where
  // they come from DRAM, as in the backward reduction, the first pass of its op).
  // (Loading the first step into registers there instead spilled in three fp16 kernels.)
  template <bool kGrad, bool kOther, typename Walk>
  __device__ static void prefetch(const T* grad, const T* input, const T* other, Walk walk) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (walk.valid()) {
        if constexpr (kGrad) prefetch_l2(grad + walk.offset);
        prefetch_l2(input + walk.offset);
        if constexpr (kOther) prefetch_l2(other + walk.offset);
      }
      walk.next();
    }
  }

  // kReadOnly: through the read-only path, for a kernel that writes none of these.
  template <bool kGrad, bool kOther, bool kReadOnly, typename Walk>
  __device__ void load(const T* grad, const T* input, const T* other, Walk& walk) {
    const auto vector = [](const T* p) {
      if constexpr (kReadOnly) return load_read_only<T, V>(p);
      else return ::resnet_fused::cuda::load<T, V>(p);
    };
#pragma unroll
    for (int u = 0; u < U; ++u) {
      valid[u] = walk.valid();
      offset[u] = walk.offset;
      if (valid[u]) {
        if constexpr (kGrad) g[u] = vector(grad + offset[u]);
        x[u] = vector(input + offset[u]);
        if constexpr (kOther) o[u] = vector(other + offset[u]);
      }
      walk.next();
    }
  }
  // The masked upstream gradient of lane i of vector u (recomputing the forward's mask).
  template <Epilogue E>
  __device__ float masked(int u, int i, const LaneAffine<V>& main, const LaneAffine<V>& down) const {
    const float other = E == Epilogue::kRelu ? 0.f : o[u][i];
    const float pre = preactivation<E>(x[u][i], other, main.scale[i], main.shift[i], down.scale[i], down.shift[i]);
    return masked_gradient<T>(pre, g[u][i]);
  }
};

// ---------------------------------------------------------------- forward

template <typename T>
struct ForwardArgs {
  const T* input;
  const T* other;  // residual (kAddRelu) or input_d (kDualAddRelu)
  T* out;
  Branch main, down;
};

template <typename T, int V, Epilogue E, Layout L>
__global__ void __launch_bounds__(kThreads, forward_config(E).blocks_per_sm)
    bn_act_forward_kernel(ForwardArgs<T> a, Shape shape) {
  await_stream_predecessor();
  constexpr int U = forward_config(E).unroll(V);
  constexpr bool kOther = E != Epilogue::kRelu;
  Walk<L, V> walk(shape);
  if (!walk.active) return;
  using Loads = StepLoads<T, V, U>;
  Loads::template prefetch<false, kOther>(nullptr, a.input, a.other, walk);  // before the per-channel loads
  LaneAffine<V> main, down;
  main.load(a.main, walk);
  if constexpr (E == Epilogue::kDualAddRelu) down.load(a.down, walk);

  while (walk.valid()) {
    Loads in;
    in.template load<false, kOther, false>(nullptr, a.input, a.other, walk);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!in.valid[u]) continue;
      float y[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float other = E == Epilogue::kRelu ? 0.f : in.o[u][i];
        y[i] = relu(preactivation<E>(in.x[u][i], other, main.scale[i], main.shift[i], down.scale[i], down.shift[i]));
      }
      store<T, V>(a.out + in.offset[u], y);
    }
  }
}

// ---------------------------------------------------------------- backward

template <typename T>
struct BackwardArgs {
  const T* grad_out;
  const T* input;
  const T* other;     // residual (kAddRelu) or input_d (kDualAddRelu)
  T* grad_input;
  T* grad_other;      // grad_residual (kAddRelu) or grad_input_d (kDualAddRelu)
  Branch main, down;
};

// grad_out, input [, other]: what a backward pass with loads like epilogue E's streams
// (kReadOnly: in a pass that writes none of them).
template <Epilogue E, bool kReadOnly, typename T, int V, int U, typename Walk>
__device__ __forceinline__ void load_backward_step(StepLoads<T, V, U>& in, const BackwardArgs<T>& a, Walk& walk) {
  in.template load<true, E != Epilogue::kRelu, kReadOnly>(a.grad_out, a.input, a.other, walk);
}
template <Epilogue E, typename T, int V, int U, typename Walk>
__device__ __forceinline__ void prefetch_backward_step(const BackwardArgs<T>& a, const Walk& walk) {
  StepLoads<T, V, U>::template prefetch<true, E != Epilogue::kRelu>(a.grad_out, a.input, a.other, walk);
}

// Pass 1: per (split, channel) partial sums of g, g * (x - mean) [, g * (x_d - mean_d)],
// written to partials[k][split][channel]; kAddRelu also writes grad_residual = g (exact in
// T: g is grad_out or 0), which saves its elementwise pass a third input: 7 activation
// passes in all instead of 8.
template <typename T, int V, Epilogue E, Layout L>
__global__ void __launch_bounds__(kThreads, backward_reduce_config(E).blocks_per_sm)
    bn_act_backward_reduce_kernel(BackwardArgs<T> a, Shape shape, float* __restrict__ partials) {
  await_stream_predecessor();
  constexpr int U = backward_reduce_config(E).unroll(V);
  constexpr int K = num_sums(E);
  Walk<L, V> walk(shape);
  Sums<float, K * V> sums;
  if (walk.active) {
    prefetch_backward_step<E, T, V, U>(a, walk);  // before the per-channel loads
    LaneAffine<V> main, down;
    float mean[V], mean_d[V];
    main.load(a.main, walk);
    load_lanes(a.main.mean, walk, mean);
    if constexpr (E == Epilogue::kDualAddRelu) {
      down.load(a.down, walk);
      load_lanes(a.down.mean, walk, mean_d);
    }
    while (walk.valid()) {
      StepLoads<T, V, U> in;
      load_backward_step<E, E != Epilogue::kAddRelu>(in, a, walk);  // kAddRelu writes grad_residual
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!in.valid[u]) continue;
        float grad_residual[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float g = grad_residual[i] = in.template masked<E>(u, i, main, down);
          sums.value[i] += g;
          sums.value[V + i] = __fmaf_rn(g, in.x[u][i] - mean[i], sums.value[V + i]);
          if constexpr (E == Epilogue::kDualAddRelu) {
            sums.value[2 * V + i] = __fmaf_rn(g, in.o[u][i] - mean_d[i], sums.value[2 * V + i]);
          }
        }
        if constexpr (E == Epilogue::kAddRelu) store<T, V>(a.grad_other + in.offset[u], grad_residual);
      }
    }
  }
  const int64_t C = shape.channels;
  const int64_t splits = gridDim.y, split = blockIdx.y;
  if constexpr (L == Layout::kNCHW) {
    Sums<float, K> folded;
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int i = 0; i < V; ++i) folded.value[k] += sums.value[k * V + i];
    }
    __shared__ typename Sums<float, K>::template Shared<kThreads> shared;
    block_reduce_rows<kThreads>(folded, shared);
    if (threadIdx.y == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) partials[(k * splits + split) * C + walk.channel(0)] = folded.value[k];
    }
  } else {
    __shared__ typename Sums<float, K * V>::template Shared<kThreads> shared;
    block_reduce_rows<kThreads>(sums, shared);
    if (threadIdx.y == 0 && walk.active) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int i = 0; i < V; ++i) partials[(k * splits + split) * C + walk.channel(i)] = sums.value[k * V + i];
      }
    }
  }
}

struct BackwardFinalize {
  const float* partials;  // [num_sums][splits][C]
  int64_t splits, channels;
  double reduce_size;
  bool training;
  Branch main, down;
  float* grad_weight;
  float* grad_bias;
  float* grad_weight_d;
  float* grad_bias_d;
  float* coefficients;  // [num_coefficients][C]: intercept, slope [, intercept_d, slope_d]
};

// One channel of a branch as the finalize needs it, loaded before the partials are
// reduced: the round trip of these loads overlaps theirs.
struct BranchChannel {
  float scale = 0.f, invstd = 0.f, mean = 0.f;

  __device__ BranchChannel(const Branch& b, int64_t c, bool load) {
    if (!load) return;
    float shift;
    channel_affine(b, c, scale, shift);
    invstd = b.invstd[c];
    mean = b.mean[c];
  }
};

// grad_bias = sum(g), grad_weight = invstd * sum(g * (x - mean)), and the coefficients of
// the elementwise pass, grad_x = fma(g, scale, fma(x, slope, intercept)):
//   training: slope = -scale * invstd^2 * sum(g * (x - mean)) / M,
//             intercept = -scale * sum(g) / M - mean * slope
//   eval:     both 0, which the elementwise pass does not read (grad_x = g * scale)
// Folding the mean into the intercept (in double) keeps a register per lane free; its
// rounding is the one the forward's shift = bias - mean * scale already has. (The CPU and
// Triton kernels keep the mean apart: fma(x - mean, k2, k1).)
__device__ void finalize_branch(const BackwardFinalize& f, const BranchChannel& b, int64_t c, double sum_g,
                                double sum_g_centered, float* grad_weight, float* grad_bias, float* intercepts,
                                float* slopes) {
  const double invstd = b.invstd;
  grad_bias[c] = static_cast<float>(sum_g);
  grad_weight[c] = static_cast<float>(sum_g_centered * invstd);
  double slope = 0, intercept = 0;
  if (f.training) {
    slope = -double(b.scale) * invstd * invstd * sum_g_centered / f.reduce_size;
    intercept = -double(b.scale) * sum_g / f.reduce_size - double(b.mean) * slope;
  }
  intercepts[c] = static_cast<float>(intercept);
  slopes[c] = static_cast<float>(slope);
}

template <Epilogue E>
__global__ void __launch_bounds__(kFinalizeThreads, 2) bn_act_backward_finalize_kernel(BackwardFinalize f) {
  await_stream_predecessor();
  constexpr int K = num_sums(E);
  const int64_t C = f.channels;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalizeChannels + threadIdx.x;
  const bool finalizes = threadIdx.y == 0 && c < C;  // the thread that writes channel c
  const BranchChannel main(f.main, c, finalizes);
  const BranchChannel down(f.down, c, finalizes && E == Epilogue::kDualAddRelu);
  Sums<double, K> sums;
  if (c < C) {
    for (int64_t first = threadIdx.y; first < f.splits; first += kFinalizeBatch * kFinalizeLanes) {
      float partial[kFinalizeBatch][K];
#pragma unroll
      for (int b = 0; b < kFinalizeBatch; ++b) {
        const int64_t s = first + b * kFinalizeLanes;
#pragma unroll
        for (int k = 0; k < K; ++k) partial[b][k] = s < f.splits ? f.partials[(k * f.splits + s) * C + c] : 0.f;
      }
#pragma unroll
      for (int b = 0; b < kFinalizeBatch; ++b) {
#pragma unroll
        for (int k = 0; k < K; ++k) sums.value[k] += partial[b][k];
      }
    }
  }
  __shared__ typename Sums<double, K>::template Shared<kFinalizeThreads> shared;
  block_reduce_rows<kFinalizeThreads>(sums, shared);
  if (!finalizes) return;
  finalize_branch(f, main, c, sums.value[0], sums.value[1], f.grad_weight, f.grad_bias, f.coefficients,
                  f.coefficients + C);
  if constexpr (E == Epilogue::kDualAddRelu) {
    finalize_branch(f, down, c, sums.value[0], sums.value[2], f.grad_weight_d, f.grad_bias_d,
                    f.coefficients + 2 * C, f.coefficients + 3 * C);
  }
}

// Pass 2: grad_input (and grad_input_d) from the coefficients. For kAddRelu the masked
// gradient g is grad_residual, written by pass 1: the pass streams it in place of
// grad_out, with input alone, as kRelu's does (and needs no mask). Eval (`coefficients`
// null): grad_x = scale * g alone; fma(x, 0, 0) would turn an Inf in x into a NaN.
template <typename T, int V, Epilogue E, Layout L>
__global__ void __launch_bounds__(kThreads, backward_elementwise_config(E).blocks_per_sm)
    bn_act_backward_elementwise_kernel(BackwardArgs<T> a, Shape shape, const float* __restrict__ coefficients) {
  await_stream_predecessor();
  constexpr int U = backward_elementwise_config(E).unroll(V);
  constexpr Epilogue kLoads = E == Epilogue::kAddRelu ? Epilogue::kRelu : E;  // what the pass streams
  if constexpr (E == Epilogue::kAddRelu) a.grad_out = a.grad_other;
  Walk<L, V> walk(shape);
  if (!walk.active) return;
  prefetch_backward_step<kLoads, T, V, U>(a, walk);  // before the per-channel loads
  const int64_t C = shape.channels;
  LaneAffine<V> main, down;
  const bool training = coefficients != nullptr;
  float intercept[V] = {}, slope[V] = {}, intercept_d[V] = {}, slope_d[V] = {};
  main.load(a.main, walk);
  if constexpr (E == Epilogue::kDualAddRelu) down.load(a.down, walk);
  if (training) {
    load_lanes(coefficients, walk, intercept);
    load_lanes(coefficients + C, walk, slope);
    if constexpr (E == Epilogue::kDualAddRelu) {
      load_lanes(coefficients + 2 * C, walk, intercept_d);
      load_lanes(coefficients + 3 * C, walk, slope_d);
    }
  }

  while (walk.valid()) {
    StepLoads<T, V, U> in;
    load_backward_step<kLoads, false>(in, a, walk);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!in.valid[u]) continue;
      float grad_x[V], grad_x_d[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        float g;
        if constexpr (E == Epilogue::kAddRelu) {
          g = in.g[u][i];
        } else {
          g = in.template masked<E>(u, i, main, down);
        }
        grad_x[i] = training ? __fmaf_rn(g, main.scale[i], __fmaf_rn(in.x[u][i], slope[i], intercept[i])) : __fmul_rn(g, main.scale[i]);
        if constexpr (E == Epilogue::kDualAddRelu) {
          grad_x_d[i] = training ? __fmaf_rn(g, down.scale[i], __fmaf_rn(in.o[u][i], slope_d[i], intercept_d[i]))
                                 : __fmul_rn(g, down.scale[i]);
        }
      }
      store<T, V>(a.grad_input + in.offset[u], grad_x);
      if constexpr (E == Epilogue::kDualAddRelu) store<T, V>(a.grad_other + in.offset[u], grad_x_d);
    }
  }
}

// ---------------------------------------------------------------- host: launch plans

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What the launches need to know of the current device, cached per device.
struct Device {
  int index = 0;
  int multiprocessors = 1;
  bool early_launch = false;  // sm_90 or later, and early_launch_allowed() (launch_kernel)
};

// RESNET_FUSED_PDL is not 0, and the driver records early launches in stream capture as
// programmatic graph edges (CUDA 12.3 and later: torch.cuda.graph must keep working).
bool early_launch_allowed() {
  static const bool allowed = [] {
    const char* value = std::getenv("RESNET_FUSED_PDL");
    int driver = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess) cudaGetLastError();
    return (value == nullptr || std::strcmp(value, "0") != 0) && driver >= 12030;
  }();
  return allowed;
}

Device current_device() {
  static std::atomic<int> cache[kMaxDevices];  // multiprocessors * 2 + early_launch; 0: not yet asked
  Device d;
  cudaGetDevice(&d.index);  // a failure surfaces as the launch error
  const bool cacheable = d.index >= 0 && d.index < kMaxDevices;
  int packed = cacheable ? cache[d.index].load(std::memory_order_relaxed) : 0;
  if (packed == 0) {
    int count = 0, major = 0;
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, d.index);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d.index);
    packed = std::max(count, 1) * 2 + (major >= 9 && early_launch_allowed() ? 1 : 0);
    // A failed query is cached too (one multiprocessor, no early launch): a workspace sized
    // before and a launch planned after a retry must never see different split counts.
    if (cacheable) cache[d.index].store(packed, std::memory_order_relaxed);
  }
  d.multiprocessors = packed / 2;
  d.early_launch = packed % 2 == 1;
  return d;
}

// Whether kKernel's code on `device` waits for its stream predecessor: it was compiled for
// a virtual architecture of sm_90 or later (await_stream_predecessor() is a no-op below). A
// build whose device code is compute_80 PTX, JIT-compiled for an sm_90 device, has none:
// its kernels must not start early. Cached per device.
template <auto kKernel>
bool waits_for_predecessor(int device) {
  static std::atomic<int8_t> cache[kMaxDevices];  // 1: no, 2: yes; 0: not yet asked
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    if (const int8_t cached = cache[device].load(std::memory_order_relaxed)) return cached == 2;
  }
  cudaFuncAttributes attributes{};
  const bool known = cudaFuncGetAttributes(&attributes, kKernel) == cudaSuccess;
  if (!known) cudaGetLastError();  // launched in order: its launch reports what is wrong, not this query
  const bool waits = known && attributes.ptxVersion >= 90;
  if (cacheable) cache[device].store(waits ? 2 : 1, std::memory_order_relaxed);
  return waits;
}

// Launches kKernel(args...) on `stream` (no dynamic shared memory); returns the launch
// error. Where the device and the kernel's code allow (Device::early_launch,
// waits_for_predecessor), as a programmatic dependent launch: the kernel may be scheduled
// before its stream predecessor completes, and waits for it in await_stream_predecessor().
template <auto kKernel, typename... Args>
cudaError_t launch_kernel(const Device& device, dim3 grid, dim3 block, cudaStream_t stream, const Args&... args) {
  if (!device.early_launch || !waits_for_predecessor<kKernel>(device.index)) {
    kKernel<<<grid, block, 0, stream>>>(args...);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kKernel, args...);
}

int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : dtype == DType::kFloat64 ? 8 : 2; }

// 16-byte vectors when the run length allows them; the pointers are checked at launch.
int nominal_vector(const ActivationGeometry& g) {
  const int vec = 16 / element_size(g.dtype);
  const int64_t run = g.layout == Layout::kNHWC ? g.channels : g.spatial;
  return run % vec == 0 ? vec : 1;
}

int launch_vector(const ActivationGeometry& g, std::initializer_list<const void*> activations) {
  const int vec = nominal_vector(g);
  const uintptr_t bytes = static_cast<uintptr_t>(vec) * element_size(g.dtype);
  for (const void* p : activations) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % bytes != 0) return 1;
  }
  return vec;
}

// channels_last blocks: up to kRowTileVectors channel vectors by as many rows as fit.
struct RowTiling {
  int64_t tiles;  // grid.x
  dim3 block;
};

RowTiling row_tiling(int64_t channels, int vec) {
  const int64_t vectors = channels / vec;
  const int64_t tiles = ceil_div(vectors, kRowTileVectors);
  const int width = static_cast<int>(ceil_div(vectors, tiles));
  return {tiles, dim3(width, kThreads / width)};
}

// Blocks of a kernel resident at once: `blocks_per_sm` on every SM.
int64_t resident_blocks(const Device& device, StreamConfig config) {
  return static_cast<int64_t>(device.multiprocessors) * config.blocks_per_sm;
}

// NCHW: the most splits of a channel that still give every thread U vectors.
int64_t nchw_most_splits(const ActivationGeometry& g, int vec, StreamConfig config) {
  return ceil_div(g.batch * (g.spatial / vec), kThreads * config.unroll(vec));
}

// grid.y of a launch that is one wave of `blocks_per_sm` blocks per SM, and no more
// blocks than there is work for.
int64_t wave_grid_y(const Device& device, const ActivationGeometry& g, int vec, StreamConfig config) {
  const int64_t capacity = resident_blocks(device, config);
  int64_t y;
  if (g.layout == Layout::kNHWC) {
    const RowTiling t = row_tiling(g.channels, vec);
    y = std::min(std::max<int64_t>(capacity / t.tiles, 1), ceil_div(g.reduce_size(), t.block.y * config.unroll(vec)));
  } else {
    y = std::min(std::max<int64_t>(capacity / g.channels, 1), nchw_most_splits(g, vec, config));
  }
  return std::clamp<int64_t>(y, 1, kMaxGridY);
}

// Splits per channel of an NCHW reduction, whose blocks are (channel, split) pairs: C * y
// blocks run in ceil(C * y / capacity) waves of 1/y of a channel's work each. One wave's
// y = capacity / C leaves a last wave nearly empty where C is a little above a multiple
// of the capacity (C = 512 on 396 slots: 1.29 waves of work in 2; 67% of copy bandwidth
// in the third GPU run), so y is the smallest within 3% of the fastest y up to
// 2 * ceil(capacity / C) + 2 and `most` (C = 512: 3, 4/3 of the waves' work).
int64_t nchw_reduction_splits(int64_t channels, int64_t capacity, int64_t most) {
  const auto waves_of_work = [&](int64_t y) { return static_cast<double>(ceil_div(channels * y, capacity)) / y; };
  const int64_t last = std::max<int64_t>(std::min(most, 2 * ceil_div(capacity, channels) + 2), 1);
  double best = waves_of_work(1);
  for (int64_t y = 2; y <= last; ++y) best = std::min(best, waves_of_work(y));
  int64_t y = 1;
  while (waves_of_work(y) > 1.03 * best) ++y;
  return y;
}

// Splits (grid.y) of a reduction: a function of the geometry and the device only, so the
// workspace size and the launch agree, and results are reproducible.
int64_t reduction_splits(const Device& device, const ActivationGeometry& g, StreamConfig config) {
  const int vec = nominal_vector(g);
  const int64_t y =
      g.layout == Layout::kNHWC
          ? wave_grid_y(device, g, vec, config)
          : nchw_reduction_splits(g.channels, resident_blocks(device, config), nchw_most_splits(g, vec, config));
  return std::min(std::max(y, ceil_div(g.reduce_size(), kMaxSplitValues)), kMaxGridY);
}

struct Launch {
  dim3 grid, block;
  Shape shape;
};

Launch make_launch(const ActivationGeometry& g, int vec, int64_t grid_y) {
  Launch l{};
  Shape& s = l.shape;
  s.channels = g.channels;
  if (g.layout == Layout::kNHWC) {
    const RowTiling t = row_tiling(g.channels, vec);
    s.vectors = g.channels / vec;
    s.rows = g.reduce_size();
    l.grid = dim3(static_cast<unsigned>(t.tiles), static_cast<unsigned>(grid_y));
    l.block = t.block;
  } else {
    s.spatial = g.spatial;
    s.vectors = g.spatial / vec;
    s.items = g.batch * s.vectors;
    s.items_per_split = ceil_div(s.items, grid_y);
    s.step_vectors = kThreads % s.vectors;
    s.step_offset = (kThreads / s.vectors) * g.channels * g.spatial + s.step_vectors * vec;
    s.wrap_offset = (g.channels - 1) * g.spatial;
    l.grid = dim3(static_cast<unsigned>(g.channels), static_cast<unsigned>(grid_y));
    l.block = dim3(1, kThreads);
  }
  return l;
}

// ---------------------------------------------------------------- host: dispatch

template <typename T>
struct Type {
  using type = T;
};

template <typename Fn>
cudaError_t with_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(Type<float>{});
    case DType::kFloat16: return fn(Type<__half>{});
    case DType::kBFloat16: return fn(Type<__nv_bfloat16>{});
    case DType::kFloat64: break;  // not a CUDA-backend dtype: the host refuses it (check_backend_dtype)
  }
  return cudaErrorInvalidValue;
}

template <typename Fn>
cudaError_t with_epilogue(Epilogue e, Fn&& fn) {
  switch (e) {
    case Epilogue::kRelu: return fn(std::integral_constant<Epilogue, Epilogue::kRelu>{});
    case Epilogue::kAddRelu: return fn(std::integral_constant<Epilogue, Epilogue::kAddRelu>{});
    case Epilogue::kDualAddRelu: return fn(std::integral_constant<Epilogue, Epilogue::kDualAddRelu>{});
  }
  return cudaErrorInvalidValue;
}

// Calls fn(layout, vector width) with both as compile-time constants.
template <typename T, typename Fn>
cudaError_t with_layout_and_vector(Layout layout, int vec, Fn&& fn) {
  using NHWC = std::integral_constant<Layout, Layout::kNHWC>;
  using NCHW = std::integral_constant<Layout, Layout::kNCHW>;
  using Vector = std::integral_constant<int, kVec<T>>;
  using Scalar = std::integral_constant<int, 1>;
  if (layout == Layout::kNHWC) return vec == 1 ? fn(NHWC{}, Scalar{}) : fn(NHWC{}, Vector{});
  return vec == 1 ? fn(NCHW{}, Scalar{}) : fn(NCHW{}, Vector{});
}

Branch branch_of(const BnBranch& b) {
  return {static_cast<const float*>(b.weight), static_cast<const float*>(b.bias), static_cast<const float*>(b.mean),
          static_cast<const float*>(b.invstd)};
}

dim3 finalize_grid(int64_t channels) { return dim3(static_cast<unsigned>(ceil_div(channels, kFinalizeChannels))); }

const dim3 kFinalizeBlock(kFinalizeChannels, kFinalizeLanes);

}  // namespace

// ---------------------------------------------------------------- entry points

size_t batch_stats_workspace_bytes(const ActivationGeometry& g) {
  if (g.channels == 0 || g.reduce_size() == 0) return 0;
  const int64_t splits = reduction_splits(current_device(), g, kStatsConfig);
  return sizeof(float) * static_cast<size_t>(splits * (2 * g.channels + 1));
}

cudaError_t launch_batch_stats(const BatchStatsParams& p, cudaStream_t stream) {
  const ActivationGeometry& g = p.geometry;
  if (g.channels == 0 || g.reduce_size() == 0) return cudaSuccess;
  const Device device = current_device();
  const int64_t C = g.channels;
  const int64_t splits = reduction_splits(device, g, kStatsConfig);
  float* workspace = static_cast<float*>(p.workspace);
  const StatsPartials partials{workspace, workspace + splits * C, workspace + 2 * splits * C};
  const cudaError_t error = with_dtype(g.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    const T* input = static_cast<const T*>(p.input);
    return with_layout_and_vector<T>(g.layout, launch_vector(g, {input}), [&](auto layout, auto vec) {
      constexpr Layout L = decltype(layout)::value;
      constexpr int V = decltype(vec)::value;
      const Launch l = make_launch(g, V, splits);
      return launch_kernel<batch_stats_kernel<T, V, L>>(device, l.grid, l.block, stream, input, l.shape, partials);
    });
  });
  if (error != cudaSuccess) return error;
  StatsFinalize f{};
  f.mean = partials.mean;
  f.m2 = partials.m2;
  f.count = partials.count;
  f.splits = splits;
  f.channels = C;
  f.out_mean = static_cast<float*>(p.mean);
  f.out_invstd = static_cast<float*>(p.invstd);
  f.running_mean = static_cast<float*>(p.running_mean);
  f.running_var = static_cast<float*>(p.running_var);
  f.momentum = p.momentum;
  f.eps = p.eps;
  return launch_kernel<batch_stats_finalize_kernel>(device, finalize_grid(C), kFinalizeBlock, stream, f);
}

cudaError_t launch_bn_act_forward(const BnActForwardParams& p, cudaStream_t stream) {
  const ActivationGeometry& g = p.geometry;
  if (g.numel() == 0) return cudaSuccess;
  const Device device = current_device();
  return with_dtype(g.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    ForwardArgs<T> a{};
    a.input = static_cast<const T*>(p.main.input);
    a.other = static_cast<const T*>(has_downsample(p.epilogue) ? p.downsample.input : p.residual);
    a.out = static_cast<T*>(p.out);
    a.main = branch_of(p.main);
    a.down = branch_of(p.downsample);
    const int vector = launch_vector(g, {a.input, a.other, a.out});
    return with_epilogue(p.epilogue, [&](auto epilogue) {
      constexpr Epilogue E = decltype(epilogue)::value;
      return with_layout_and_vector<T>(g.layout, vector, [&](auto layout, auto vec) {
        constexpr Layout L = decltype(layout)::value;
        constexpr int V = decltype(vec)::value;
        const Launch l = make_launch(g, V, wave_grid_y(device, g, V, forward_config(E)));
        return launch_kernel<bn_act_forward_kernel<T, V, E, L>>(device, l.grid, l.block, stream, a, l.shape);
      });
    });
  });
}

size_t bn_act_backward_workspace_bytes(const ActivationGeometry& g, Epilogue e) {
  if (g.numel() == 0) return 0;
  const int64_t splits = reduction_splits(current_device(), g, backward_reduce_config(e));
  return sizeof(float) * static_cast<size_t>((num_sums(e) * splits + num_coefficients(e)) * g.channels);
}

cudaError_t launch_bn_act_backward(const BnActBackwardParams& p, cudaStream_t stream) {
  const ActivationGeometry& g = p.geometry;
  if (g.numel() == 0) return cudaSuccess;
  const Device device = current_device();
  const int64_t C = g.channels;
  return with_dtype(g.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    BackwardArgs<T> a{};
    a.grad_out = static_cast<const T*>(p.grad_out);
    a.input = static_cast<const T*>(p.main.input);
    a.other = static_cast<const T*>(has_downsample(p.epilogue) ? p.downsample.input : p.residual);
    a.grad_input = static_cast<T*>(p.grad_input);
    a.grad_other = static_cast<T*>(has_downsample(p.epilogue) ? p.grad_input_d : p.grad_residual);
    a.main = branch_of(p.main);
    a.down = branch_of(p.downsample);
    const int vector = launch_vector(g, {a.grad_out, a.input, a.other, a.grad_input, a.grad_other});
    return with_epilogue(p.epilogue, [&](auto epilogue) {
      constexpr Epilogue E = decltype(epilogue)::value;
      const int64_t splits = reduction_splits(device, g, backward_reduce_config(E));
      float* partials = static_cast<float*>(p.workspace);
      float* coefficients = partials + num_sums(E) * splits * C;
      return with_layout_and_vector<T>(g.layout, vector, [&](auto layout, auto vec) {
        constexpr Layout L = decltype(layout)::value;
        constexpr int V = decltype(vec)::value;
        const Launch reduce = make_launch(g, V, splits);
        cudaError_t error = launch_kernel<bn_act_backward_reduce_kernel<T, V, E, L>>(device, reduce.grid, reduce.block,
                                                                                    stream, a, reduce.shape, partials);
        if (error != cudaSuccess) return error;

        BackwardFinalize f{};
        f.partials = partials;
        f.splits = splits;
        f.channels = C;
        f.reduce_size = static_cast<double>(g.reduce_size());
        f.training = p.training;
        f.main = a.main;
        f.down = a.down;
        f.grad_weight = static_cast<float*>(p.grad_weight);
        f.grad_bias = static_cast<float*>(p.grad_bias);
        f.grad_weight_d = static_cast<float*>(p.grad_weight_d);
        f.grad_bias_d = static_cast<float*>(p.grad_bias_d);
        f.coefficients = coefficients;
        error = launch_kernel<bn_act_backward_finalize_kernel<E>>(device, finalize_grid(C), kFinalizeBlock, stream, f);
        if (error != cudaSuccess) return error;

        const Launch elementwise = make_launch(g, V, wave_grid_y(device, g, V, backward_elementwise_config(E)));
        return launch_kernel<bn_act_backward_elementwise_kernel<T, V, E, L>>(
            device, elementwise.grid, elementwise.block, stream, a, elementwise.shape,
            p.training ? coefficients : nullptr);
      });
    });
  });
}

}  // namespace resnet_fused::cuda
