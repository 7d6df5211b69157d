// CPU kernels of the fused BatchNorm ops, compiled once per instruction set.
//
// Included by bn_act_kernels_{default,avx2,avx512}.cpp after they define CPU_CAPABILITY
// (and enable that instruction set); everything lands in namespace
// resnet_fused::cpu::CPU_CAPABILITY, and bn_act_kernels.cpp picks the build that matches
// the machine, as ATen's own DispatchStub does.
//
// An activation is walked as "runs" of contiguous values:
//   channels_last (kNHWC): one run per (n, h, w) row, C values, one channel per lane;
//   NCHW (kNCHW):          one run per (n, c) plane, H*W values, all of channel c.
// Inner loops are at::vec vectors of the accumulation type over a run; a run's tail goes
// through the same vector code with the lanes past it zeroed (masked loads in the AVX2 and
// AVX-512 builds, a zero-filled buffer in the baseline one), so every element of the
// forward and the backward passes sees identical arithmetic (the backward recomputes the
// ReLU mask instead of saving it).
//
// Reductions are deterministic and independent of the thread count: rows (or planes) are
// cut into fixed chunks, each reduced in blocks that fit in cache — a block's mean first,
// then its deviations from that mean and their squares, in the accumulation type
// (about_shift) — and blocks and chunks are merged in a fixed order in double (Chan et
// al.'s pairwise update).

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including bn_act_kernels_impl.h"
#endif

#include <algorithm>
#include <cstring>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace resnet_fused::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kBlockElements = 16384;  // values reduced in the accumulation type before a merge
constexpr int64_t kMinBlockRows = 16;      // wide channels_last rows: amortize a block's per-channel merge
constexpr int64_t kMaxChunks = 64;         // bounds the per-chunk partials of channels_last reductions
constexpr int64_t kGrainElements = 32768;  // elementwise work per parallel task

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Vectors of the accumulation type loaded from and stored to T.
template <typename T>
struct Lanes {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  static constexpr int64_t kSize = Vec::size();

  static Vec load(const T* p) {
    if constexpr (std::is_same_v<T, A>) {
      return Vec::loadu(p);
    } else {
      Vec v(A(0));
      at::vec::load_to_float(p, v);
      return v;
    }
  }
  static Vec load(const T* p, int64_t n) {
    if (n == kSize) return load(p);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    // These builds' float partial loads zero the lanes past n; the reduced-precision ones
    // leave them undefined in some torch releases (2.6's AVX2: NaN outputs), so those
    // lanes are zeroed after the conversion.
    if constexpr (std::is_same_v<T, A>) {
      return Vec::loadu(p, n);
    } else {
      return valid(std::get<0>(at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, n))), n);
    }
#else
    // The baseline's partial loads leave the other lanes undefined.
    T buffer[kSize] = {};
    std::copy(p, p + n, buffer);
    return load(buffer);
#endif
  }
  static void store(T* p, const Vec& v, int64_t n) {
    if constexpr (std::is_same_v<T, A>) {
      v.store(p, static_cast<int>(n));
    } else {
      // The conversion yields a full vector of T (twice kSize values); store it whole to
      // a buffer and copy the kSize that are ours: a fixed-size copy, unlike a partial
      // vector store, compiles to one move.
      T buffer[2 * kSize];
      at::vec::convert_from_float<T>(v, v).store(buffer);
      if (n == kSize) {
        std::memcpy(p, buffer, kSize * sizeof(T));
      } else {
        // n is in [0, kSize); the clamp tells GCC so (else -Wstringop-overflow reads a
        // negative n as a copy of 2^64 bytes)
        std::memcpy(p, buffer, static_cast<size_t>(std::clamp<int64_t>(n, 0, kSize)) * sizeof(T));
      }
    }
  }
  // Per-channel coefficient: one channel per lane (a channels_last row; arrays are padded
  // to whole vectors) or one channel broadcast to every lane (an NCHW plane).
  template <bool kPerLane>
  static Vec coeff(const A* p, int64_t j) {
    if constexpr (kPerLane) {
      return Vec::loadu(p + j);
    } else {
      return Vec(*p);
    }
  }
  // Lanes past the end of a run, zeroed: a reduction over a plane must not count them.
  static Vec valid(const Vec& v, int64_t n) { return n == kSize ? v : Vec::set(Vec(0), v, n); }
  static A sum(const Vec& v) {
    A values[kSize];
    v.store(values);
    A s = 0;
    for (int64_t i = 0; i < kSize; ++i) s += values[i];
    return s;
  }
};

// The mean and M2 (sum of squared deviations from the mean) of some values.
struct MeanM2 {
  double mean, m2;
};

// A block of n values is reduced about a shift, its mean as rounded in the accumulation
// type: sum_d = sum(x - shift) and sum_d2 = sum((x - shift)^2). Its mean is then
// shift + sum_d / n and its M2 sum_d2 - sum_d^2 / n, in double: the shift's rounding
// (2^-24 of the mean in float32) does not add n * (mean - shift)^2 to M2, which would be
// the whole variance of a constant channel and bias channels far from zero.
inline MeanM2 about_shift(double n, double shift, double sum_d, double sum_d2) {
  return {shift + sum_d / n, std::max(sum_d2 - sum_d * (sum_d / n), 0.0)};  // rounding below 0; NaN kept
}

// (count, mean, M2) of one channel, merged pairwise in double.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void merge(double n, const MeanM2& other) {
    if (n == 0) return;
    const double total = count + n;
    const double delta = other.mean - mean;
    mean += delta * (n / total);
    m2 += other.m2 + delta * delta * (count * n / total);
    count = total;
  }
};

// Moments of every channel of a channels_last reduction, where all channels have seen the
// same number of values: the merge weights are shared, and the loop over channels is a
// plain vectorizable one.
struct ChannelMoments {
  double count = 0;
  std::vector<double> mean, m2;
  explicit ChannelMoments(int64_t channels) : mean(channels, 0.0), m2(channels, 0.0) {}

  void merge(const ChannelMoments& o) {
    merge_each(o.count, [&](int64_t c) { return MeanM2{o.mean[c], o.m2[c]}; });
  }
  // Blocks of n values per channel, reduced about shifts (about_shift).
  template <typename A>
  void merge_about_shifts(double n, const A* shift, const A* sum_d, const A* sum_d2) {
    merge_each(n, [&](int64_t c) { return about_shift(n, shift[c], sum_d[c], sum_d2[c]); });
  }

 private:
  // other(c): the MeanM2 of channel c's n other values.
  template <typename Other>
  void merge_each(double n, Other&& other) {
    if (n == 0) return;
    const double total = count + n;
    const double mean_weight = n / total, m2_weight = count * n / total;
    const int64_t channels = static_cast<int64_t>(mean.size());
    for (int64_t c = 0; c < channels; ++c) {
      const MeanM2 o = other(c);
      const double delta = o.mean - mean[c];
      mean[c] += delta * mean_weight;
      m2[c] += o.m2 + delta * delta * m2_weight;
    }
    count = total;
  }
};

template <typename T>
const T* typed(const void* p) { return static_cast<const T*>(p); }
template <typename T>
T* typed(void* p) { return static_cast<T*>(p); }

// How a reduction over a channels_last activation is cut: rows into blocks (reduced in
// the accumulation type while in cache) and blocks into chunks (one parallel task each).
// The two reductions walk a chunk's blocks in loops of their own, not through a helper
// taking a lambda: the block's body would then read its pointers through the lambda's
// captures, reloaded at every vector store (tried: channels_last bf16 backward ~25% slower,
// docs/performance.md).
struct RowTiling {
  int64_t rows, rows_per_block, rows_per_chunk, chunks;
  explicit RowTiling(const ActivationGeometry& g) {
    rows = g.reduce_size();
    rows_per_block = std::max<int64_t>(kMinBlockRows, kBlockElements / std::max<int64_t>(g.channels, 1));
    const int64_t blocks = ceil_div(rows, rows_per_block);
    rows_per_chunk = ceil_div(blocks, std::min(blocks, kMaxChunks)) * rows_per_block;
    chunks = ceil_div(rows, rows_per_chunk);
  }
};

int64_t padded(int64_t channels, int64_t lanes) { return ceil_div(channels, lanes) * lanes + lanes; }

// ---------------------------------------------------------------- statistics

void finalize_channel(const BatchStatsParams& p, int64_t c, const Moments& m) {
  auto apply = [&](auto* mean, auto* invstd, auto* running_mean, auto* running_var) {
    using A = std::remove_pointer_t<decltype(mean)>;
    const double var = m.m2 / m.count;
    mean[c] = static_cast<A>(m.mean);
    invstd[c] = static_cast<A>(1.0 / std::sqrt(var + p.eps));
    if (running_mean != nullptr) {
      const double unbiased = var * m.count / (m.count - 1);
      running_mean[c] = static_cast<A>(p.momentum * m.mean + (1 - p.momentum) * running_mean[c]);
      running_var[c] = static_cast<A>(p.momentum * unbiased + (1 - p.momentum) * running_var[c]);
    }
  };
  if (p.geometry.dtype == DType::kFloat64) {
    apply(typed<double>(p.mean), typed<double>(p.invstd), typed<double>(p.running_mean),
          typed<double>(p.running_var));
  } else {
    apply(typed<float>(p.mean), typed<float>(p.invstd), typed<float>(p.running_mean),
          typed<float>(p.running_var));
  }
}

template <typename T>
void batch_stats_nhwc(const BatchStatsParams& p) {
  using L = Lanes<T>;
  using A = typename L::A;
  using Vec = typename L::Vec;
  const ActivationGeometry& g = p.geometry;
  const int64_t C = g.channels;
  const T* x = typed<T>(p.input);
  const RowTiling tiling(g);
  std::vector<ChannelMoments> partials(tiling.chunks, ChannelMoments(C));

  at::parallel_for(0, tiling.chunks, 1, [&, input = x](int64_t chunk_begin, int64_t chunk_end) {
    const T* const x = input;  // a local: see Operands
    std::vector<A> sums(padded(C, L::kSize)), m2s(padded(C, L::kSize)), block_means(padded(C, L::kSize));
    A *sum = sums.data(), *m2 = m2s.data(), *block_mean = block_means.data();  // sum: of x, then of x - block_mean
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t chunk_rows_end = std::min(tiling.rows, (chunk + 1) * tiling.rows_per_chunk);
      for (int64_t r0 = chunk * tiling.rows_per_chunk; r0 < chunk_rows_end; r0 += tiling.rows_per_block) {
        const int64_t r1 = std::min(chunk_rows_end, r0 + tiling.rows_per_block);
        std::fill(sums.begin(), sums.end(), A(0));
        std::fill(m2s.begin(), m2s.end(), A(0));
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t j = 0; j < C; j += L::kSize) {
            (L::load(x + r * C + j, std::min(L::kSize, C - j)) + Vec::loadu(sum + j)).store(sum + j);
          }
        }
        const A inv_rows = A(1) / static_cast<A>(r1 - r0);
        for (int64_t j = 0; j < C; j += L::kSize) {
          (Vec::loadu(sum + j) * Vec(inv_rows)).store(block_mean + j);
          Vec(0).store(sum + j);
        }
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t j = 0; j < C; j += L::kSize) {
            const Vec d = L::load(x + r * C + j, std::min(L::kSize, C - j)) - Vec::loadu(block_mean + j);
            (Vec::loadu(sum + j) + d).store(sum + j);
            at::vec::fmadd(d, d, Vec::loadu(m2 + j)).store(m2 + j);
          }
        }
        partials[chunk].merge_about_shifts(static_cast<double>(r1 - r0), block_mean, sum, m2);
      }
    }
  });

  ChannelMoments total(C);
  for (const ChannelMoments& part : partials) total.merge(part);
  for (int64_t c = 0; c < C; ++c) finalize_channel(p, c, Moments{total.count, total.mean[c], total.m2[c]});
}

// The values of one NCHW channel, N planes of H*W, cut into blocks of about kBlockElements:
// several whole planes when planes are small (7x7 at layer4), pieces of one plane when
// they are large, so that per-block work (a horizontal sum, a merge) stays rare.
struct PlaneBlock {
  int64_t plane_begin, plane_end;  // n range
  int64_t begin, end;              // element range within each plane
  int64_t count() const { return (plane_end - plane_begin) * (end - begin); }
};

template <typename Fn>
void for_each_plane_block(const ActivationGeometry& g, Fn&& fn) {
  const int64_t HW = g.spatial;
  if (HW >= kBlockElements) {
    for (int64_t n = 0; n < g.batch; ++n) {
      for (int64_t b0 = 0; b0 < HW; b0 += kBlockElements) fn(PlaneBlock{n, n + 1, b0, std::min(HW, b0 + kBlockElements)});
    }
  } else {
    const int64_t planes = kBlockElements / HW;
    for (int64_t n0 = 0; n0 < g.batch; n0 += planes) fn(PlaneBlock{n0, std::min(g.batch, n0 + planes), 0, HW});
  }
}

// Calls fn(offset, lanes) for every vector of channel c's values in `block`.
template <int64_t kSize, typename Fn>
void for_each_vector(const ActivationGeometry& g, int64_t c, const PlaneBlock& block, Fn&& fn) {
  for (int64_t n = block.plane_begin; n < block.plane_end; ++n) {
    const int64_t plane = (n * g.channels + c) * g.spatial;
    for (int64_t j = block.begin; j < block.end; j += kSize) fn(plane + j, std::min(kSize, block.end - j));
  }
}

template <typename T>
void batch_stats_nchw(const BatchStatsParams& p) {
  using L = Lanes<T>;
  using A = typename L::A;
  using Vec = typename L::Vec;
  const ActivationGeometry& g = p.geometry;
  const T* x = typed<T>(p.input);

  at::parallel_for(0, g.channels, 1, [&, input = x](int64_t c_begin, int64_t c_end) {
    const T* const x = input;  // a local: see Operands
    for (int64_t c = c_begin; c < c_end; ++c) {
      Moments moments;
      for_each_plane_block(g, [&](const PlaneBlock& block) {
        Vec sum(0);
        for_each_vector<L::kSize>(g, c, block, [&](int64_t i, int64_t lanes) { sum = sum + L::load(x + i, lanes); });
        const double n = static_cast<double>(block.count());
        const A block_mean = L::sum(sum) / static_cast<A>(block.count());
        Vec sum_d(0), m2(0);
        for_each_vector<L::kSize>(g, c, block, [&](int64_t i, int64_t lanes) {
          const Vec d = L::valid(L::load(x + i, lanes) - Vec(block_mean), lanes);
          sum_d = sum_d + d;
          m2 = at::vec::fmadd(d, d, m2);
        });
        moments.merge(n, about_shift(n, block_mean, L::sum(sum_d), L::sum(m2)));
      });
      finalize_channel(p, c, moments);
    }
  });
}

// ---------------------------------------------------------------- elementwise passes

// Per-channel coefficients of one BatchNorm branch in the accumulation type, padded to
// whole vectors:
//   forward:  pre    = fma(x, scale, shift)
//   backward: grad_x = fma(g, scale, fma(x - mean, k2, k1))
// Inner loops read them through Coefficients, raw pointers copied into locals: a vector
// store may alias anything as far as the compiler knows, which would otherwise reload
// every std::vector's data pointer at every step.
template <typename A>
struct Coefficients {
  const A *scale, *shift, *mean, *k1, *k2;
};

template <typename A>
struct BranchCoefficients {
  std::vector<A> scale, shift, mean, k1, k2;

  Coefficients<A> at(int64_t channel) const {
    return {&scale[channel], &shift[channel], &mean[channel], &k1[channel], &k2[channel]};
  }

  BranchCoefficients(const BnBranch& b, int64_t C, int64_t lanes)
      : scale(padded(C, lanes)), shift(padded(C, lanes)), mean(padded(C, lanes)),
        k1(padded(C, lanes)), k2(padded(C, lanes)) {
    const A* weight = typed<A>(b.weight);
    const A* bias = typed<A>(b.bias);
    const A* mu = typed<A>(b.mean);
    const A* invstd = typed<A>(b.invstd);
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = (weight ? weight[c] : A(1)) * invstd[c];
      shift[c] = (bias ? bias[c] : A(0)) - mu[c] * scale[c];
      mean[c] = mu[c];
    }
  }
};

// Every activation an op touches. Parallel loops copy it into a local first: a vector
// store may alias anything as far as the compiler knows, so pointers read through a
// lambda's captures would be reloaded at every step.
template <typename T>
struct Operands {
  const T* x;
  const T* x_d;       // kDualAddRelu
  const T* residual;  // kAddRelu
  const T* grad_out;  // backward
  T* out;             // forward
  T* grad_input;
  T* grad_input_d;
  T* grad_residual;

  static Operands forward(const BnActForwardParams& p) {
    return {typed<T>(p.main.input), typed<T>(p.downsample.input), typed<T>(p.residual), nullptr,
            typed<T>(p.out), nullptr, nullptr, nullptr};
  }
  static Operands backward(const BnActBackwardParams& p) {
    return {typed<T>(p.main.input), typed<T>(p.downsample.input), typed<T>(p.residual),
            typed<T>(p.grad_out), nullptr, typed<T>(p.grad_input), typed<T>(p.grad_input_d),
            typed<T>(p.grad_residual)};
  }
};

template <typename T>
struct Loaded {
  typename Lanes<T>::Vec x, x_d, residual;
};

template <typename T, Epilogue E>
Loaded<T> load_sources(const Operands<T>& s, int64_t i, int64_t n) {
  using L = Lanes<T>;
  const auto x = L::load(s.x + i, n);
  // Members an epilogue does not use repeat x (never read; avoids constructing zeros).
  const auto x_d = E == Epilogue::kDualAddRelu ? L::load(s.x_d + i, n) : x;
  const auto residual = E == Epilogue::kAddRelu ? L::load(s.residual + i, n) : x;
  return {x, x_d, residual};
}

// The pre-activation, shared verbatim by the forward and the backward's mask.
template <typename T, Epilogue E, bool kPerLane, typename A = acc_t<T>>
typename Lanes<T>::Vec preactivation(const Loaded<T>& v, const Coefficients<A>& main,
                                     const Coefficients<A>& downsample, int64_t j) {
  using L = Lanes<T>;
  auto pre = at::vec::fmadd(v.x, L::template coeff<kPerLane>(main.scale, j), L::template coeff<kPerLane>(main.shift, j));
  if constexpr (E == Epilogue::kAddRelu) pre = pre + v.residual;
  if constexpr (E == Epilogue::kDualAddRelu) {
    pre = pre + at::vec::fmadd(v.x_d, L::template coeff<kPerLane>(downsample.scale, j),
                               L::template coeff<kPerLane>(downsample.shift, j));
  }
  return pre;
}

template <typename T>
constexpr DType kDTypeOf = std::is_same_v<T, double> ? DType::kFloat64 : DType::kFloat32;
template <>
constexpr DType kDTypeOf<at::Half> = DType::kFloat16;
template <>
constexpr DType kDTypeOf<at::BFloat16> = DType::kBFloat16;

// The upstream gradient, 0 where the ReLU's output is <= 0: as torch.relu's backward
// (threshold_backward), so a NaN pre-activation passes it. The output as the forward
// stores it in T: a pre-activation that rounds to 0 there masks too.
template <typename T, typename Vec>
Vec masked_gradient(const Vec& pre, const Vec& grad) {
  using A = typename Vec::value_type;
  return Vec::blendv(grad, Vec(A(0)), pre <= Vec(static_cast<A>(largest_zero_output(kDTypeOf<T>))));
}

// Calls fn(per_lane, offset, length, channel) for every run, in parallel.
template <typename Fn>
void parallel_for_runs(const ActivationGeometry& g, Fn&& fn) {
  if (g.layout == Layout::kNHWC) {
    const int64_t C = g.channels;
    at::parallel_for(0, g.reduce_size(), ceil_div(kGrainElements, C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) fn(std::true_type{}, r * C, C, int64_t{0});
    });
  } else {
    const int64_t C = g.channels, HW = g.spatial;
    at::parallel_for(0, g.batch * C, ceil_div(kGrainElements, HW), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) fn(std::false_type{}, p * HW, HW, p % C);
    });
  }
}

template <typename T, Epilogue E>
void forward(const BnActForwardParams& p) {
  using L = Lanes<T>;
  using A = typename L::A;
  const ActivationGeometry& g = p.geometry;
  const BranchCoefficients<A> main(p.main, g.channels, L::kSize);
  const BranchCoefficients<A> downsample(E == Epilogue::kDualAddRelu ? p.downsample : p.main,
                                         g.channels, L::kSize);
  const Operands<T> operands = Operands<T>::forward(p);
  parallel_for_runs(g, [&](auto per_lane, int64_t offset, int64_t len, int64_t channel) {
    constexpr bool kPerLane = decltype(per_lane)::value;
    const Operands<T> s = operands;
    const Coefficients<A> cm = main.at(channel), cd = downsample.at(channel);
    for (int64_t j = 0; j < len; j += L::kSize) {
      const int64_t n = std::min(L::kSize, len - j);
      const auto v = load_sources<T, E>(s, offset + j, n);
      const auto pre = preactivation<T, E, kPerLane>(v, cm, cd, j);
      L::store(s.out + offset + j, at::vec::maximum(pre, typename L::Vec(0)), n);
    }
  });
}

// ---------------------------------------------------------------- backward

// Per-channel sums of the backward reduction: sum(g), sum(g * (x - mean)) and, for the
// downsample branch, sum(g * (x_d - mean_d)).
struct GradSums {
  std::vector<double> g, g_centered, g_centered_d;
  explicit GradSums(int64_t C) : g(C, 0.0), g_centered(C, 0.0), g_centered_d(C, 0.0) {}
};

// total[0:n] += part[0:n], in double: a plain loop the compiler vectorizes.
template <typename A>
void accumulate(double* __restrict total, const A* __restrict part, int64_t n) {
  for (int64_t i = 0; i < n; ++i) total[i] += static_cast<double>(part[i]);
}

template <typename T, Epilogue E, bool kPerLane, typename A = acc_t<T>>
struct ReduceStep {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  // Accumulates one vector of a run into (sum_g, sum_gc, sum_gc_d). With a residual, also
  // writes grad_residual = g: the elementwise pass then reads it back instead of
  // recomputing the mask from grad_out and the residual (one tensor less to read).
  static void run(const Operands<T>& io, const Coefficients<A>& main, const Coefficients<A>& downsample,
                  int64_t i, int64_t n, int64_t j, Vec& sum_g, Vec& sum_gc, Vec& sum_gc_d) {
    const auto v = load_sources<T, E>(io, i, n);
    const Vec pre = preactivation<T, E, kPerLane>(v, main, downsample, j);
    const Vec g = masked_gradient<T>(pre, L::load(io.grad_out + i, n));
    if constexpr (E == Epilogue::kAddRelu) L::store(io.grad_residual + i, g, n);
    sum_g = sum_g + g;
    sum_gc = at::vec::fmadd(g, v.x - L::template coeff<kPerLane>(main.mean, j), sum_gc);
    if constexpr (E == Epilogue::kDualAddRelu) {
      sum_gc_d = at::vec::fmadd(g, v.x_d - L::template coeff<kPerLane>(downsample.mean, j), sum_gc_d);
    }
  }
};

template <typename T, Epilogue E>
void reduce_gradients_nhwc(const BnActBackwardParams& p, const Operands<T>& operands,
                           const BranchCoefficients<acc_t<T>>& main,
                           const BranchCoefficients<acc_t<T>>& downsample, GradSums& sums) {
  using L = Lanes<T>;
  using A = typename L::A;
  using Vec = typename L::Vec;
  const int64_t C = p.geometry.channels;
  const RowTiling tiling(p.geometry);
  std::vector<GradSums> partials(tiling.chunks, GradSums(C));

  at::parallel_for(0, tiling.chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    const int64_t width = padded(C, L::kSize);
    std::vector<A> sg(width), sgc(width), sgcd(width);
    const Operands<T> io = operands;
    const Coefficients<A> cm = main.at(0), cd = downsample.at(0);
    A *sum_g = sg.data(), *sum_gc = sgc.data(), *sum_gcd = sgcd.data();
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      GradSums& out = partials[chunk];
      const int64_t chunk_rows_end = std::min(tiling.rows, (chunk + 1) * tiling.rows_per_chunk);
      for (int64_t r0 = chunk * tiling.rows_per_chunk; r0 < chunk_rows_end; r0 += tiling.rows_per_block) {
        const int64_t r1 = std::min(chunk_rows_end, r0 + tiling.rows_per_block);
        std::fill(sg.begin(), sg.end(), A(0));
        std::fill(sgc.begin(), sgc.end(), A(0));
        std::fill(sgcd.begin(), sgcd.end(), A(0));
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t j = 0; j < C; j += L::kSize) {
            constexpr bool kDual = E == Epilogue::kDualAddRelu;
            Vec a = Vec::loadu(sum_g + j), b = Vec::loadu(sum_gc + j), d = kDual ? Vec::loadu(sum_gcd + j) : a;
            ReduceStep<T, E, true>::run(io, cm, cd, r * C + j, std::min(L::kSize, C - j), j, a, b, d);
            a.store(sum_g + j);
            b.store(sum_gc + j);
            if constexpr (kDual) d.store(sum_gcd + j);
          }
        }
        accumulate(out.g.data(), sum_g, C);
        accumulate(out.g_centered.data(), sum_gc, C);
        if constexpr (E == Epilogue::kDualAddRelu) accumulate(out.g_centered_d.data(), sum_gcd, C);
      }
    }
  });
  for (const GradSums& part : partials) {
    accumulate(sums.g.data(), part.g.data(), C);
    accumulate(sums.g_centered.data(), part.g_centered.data(), C);
    accumulate(sums.g_centered_d.data(), part.g_centered_d.data(), C);
  }
}

template <typename T, Epilogue E>
void reduce_gradients_nchw(const BnActBackwardParams& p, const Operands<T>& operands,
                           const BranchCoefficients<acc_t<T>>& main,
                           const BranchCoefficients<acc_t<T>>& downsample, GradSums& sums) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  const ActivationGeometry& g = p.geometry;
  at::parallel_for(0, g.channels, 1, [&](int64_t c_begin, int64_t c_end) {
    const Operands<T> io = operands;
    for (int64_t c = c_begin; c < c_end; ++c) {
      const Coefficients<acc_t<T>> cm = main.at(c), cd = downsample.at(c);
      for_each_plane_block(g, [&](const PlaneBlock& block) {
        Vec a(0), b(0), d(0);
        for_each_vector<L::kSize>(g, c, block, [&](int64_t i, int64_t lanes) {
          ReduceStep<T, E, false>::run(io, cm, cd, i, lanes, 0, a, b, d);
        });
        sums.g[c] += L::sum(a);
        sums.g_centered[c] += L::sum(b);
        sums.g_centered_d[c] += L::sum(d);
      });
    }
  });
}

// Writes grad_weight and grad_bias of a branch and fills its k1, k2 coefficients.
template <typename A>
void branch_gradients(BranchCoefficients<A>& coeffs, const BnBranch& branch, const std::vector<double>& sum_g,
                      const std::vector<double>& sum_gc, int64_t C, double reduce_size, bool training,
                      void* grad_weight, void* grad_bias) {
  const A* invstd = typed<A>(branch.invstd);
  for (int64_t c = 0; c < C; ++c) {
    typed<A>(grad_bias)[c] = static_cast<A>(sum_g[c]);
    typed<A>(grad_weight)[c] = static_cast<A>(sum_gc[c] * invstd[c]);
    if (training) {
      const double scale = coeffs.scale[c];
      coeffs.k1[c] = static_cast<A>(-scale * sum_g[c] / reduce_size);
      coeffs.k2[c] = static_cast<A>(-scale * double(invstd[c]) * invstd[c] * sum_gc[c] / reduce_size);
    }
  }
}

template <typename T, Epilogue E>
void backward(const BnActBackwardParams& p) {
  using L = Lanes<T>;
  using A = typename L::A;
  using Vec = typename L::Vec;
  const ActivationGeometry& g = p.geometry;
  const int64_t C = g.channels;
  BranchCoefficients<A> main(p.main, C, L::kSize);
  BranchCoefficients<A> downsample(E == Epilogue::kDualAddRelu ? p.downsample : p.main, C, L::kSize);
  const Operands<T> operands = Operands<T>::backward(p);

  GradSums sums(C);
  if (g.layout == Layout::kNHWC) {
    reduce_gradients_nhwc<T, E>(p, operands, main, downsample, sums);
  } else {
    reduce_gradients_nchw<T, E>(p, operands, main, downsample, sums);
  }
  const double M = static_cast<double>(g.reduce_size());
  branch_gradients(main, p.main, sums.g, sums.g_centered, C, M, p.training, p.grad_weight, p.grad_bias);
  if constexpr (E == Epilogue::kDualAddRelu) {
    branch_gradients(downsample, p.downsample, sums.g, sums.g_centered_d, C, M, p.training,
                     p.grad_weight_d, p.grad_bias_d);
  }

  // Eval: grad_x = scale * g alone. The batch terms are zero there, but (x - mean) * 0
  // would turn an Inf in x into a NaN gradient, where eager passes scale * g. The mode is
  // a compile-time constant of the loop: a branch on it per vector step cost bf16
  // channels_last bn_relu_backward ~8% (docs/performance.md).
  auto elementwise = [&](auto training) {
    parallel_for_runs(g, [&](auto per_lane, int64_t offset, int64_t len, int64_t channel) {
      constexpr bool kPerLane = decltype(per_lane)::value;
      const Operands<T> s = operands;
      const Coefficients<A> cm = main.at(channel), cd = downsample.at(channel);
      auto coeff = [](const A* a, int64_t j) { return L::template coeff<kPerLane>(a, j); };
      auto grad_x = [coeff](const Vec& grad, const Vec& x, const Coefficients<A>& c, int64_t j) {
        if constexpr (decltype(training)::value) {
          return at::vec::fmadd(grad, coeff(c.scale, j),
                                at::vec::fmadd(x - coeff(c.mean, j), coeff(c.k2, j), coeff(c.k1, j)));
        } else {
          return grad * coeff(c.scale, j);
        }
      };
      for (int64_t j = 0; j < len; j += L::kSize) {
        const int64_t n = std::min(L::kSize, len - j);
        const int64_t i = offset + j;
        Vec grad(0), x(0), x_d(0);
        if constexpr (E == Epilogue::kAddRelu) {
          grad = L::load(s.grad_residual + i, n);  // the masked gradient the reduction wrote
          x = L::load(s.x + i, n);
        } else {
          const auto v = load_sources<T, E>(s, i, n);
          const Vec pre = preactivation<T, E, kPerLane>(v, cm, cd, j);
          grad = masked_gradient<T>(pre, L::load(s.grad_out + i, n));
          x = v.x;
          x_d = v.x_d;
        }
        L::store(s.grad_input + i, grad_x(grad, x, cm, j), n);
        if constexpr (E == Epilogue::kDualAddRelu) L::store(s.grad_input_d + i, grad_x(grad, x_d, cd, j), n);
      }
    });
  };
  if (p.training) {
    elementwise(std::true_type{});
  } else {
    elementwise(std::false_type{});
  }
}

// ---------------------------------------------------------------- dispatch

template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat16: return fn(c10::Half{});
    case DType::kBFloat16: return fn(c10::BFloat16{});
    case DType::kFloat64: return fn(double{});
  }
}

template <typename Fn>
void dispatch_epilogue(Epilogue e, Fn&& fn) {
  switch (e) {
    case Epilogue::kRelu: return fn(std::integral_constant<Epilogue, Epilogue::kRelu>{});
    case Epilogue::kAddRelu: return fn(std::integral_constant<Epilogue, Epilogue::kAddRelu>{});
    case Epilogue::kDualAddRelu: return fn(std::integral_constant<Epilogue, Epilogue::kDualAddRelu>{});
  }
}

}  // namespace

void batch_stats(const BatchStatsParams& p) {
  dispatch_dtype(p.geometry.dtype, [&](auto t) {
    using T = decltype(t);
    if (p.geometry.layout == Layout::kNHWC) {
      batch_stats_nhwc<T>(p);
    } else {
      batch_stats_nchw<T>(p);
    }
  });
}

void bn_act_forward(const BnActForwardParams& p) {
  dispatch_dtype(p.geometry.dtype, [&](auto t) {
    dispatch_epilogue(p.epilogue, [&](auto e) { forward<decltype(t), decltype(e)::value>(p); });
  });
}

void bn_act_backward(const BnActBackwardParams& p) {
  dispatch_dtype(p.geometry.dtype, [&](auto t) {
    dispatch_epilogue(p.epilogue, [&](auto e) { backward<decltype(t), decltype(e)::value>(p); });
  });
}

}  // namespace resnet_fused::cpu::CPU_CAPABILITY
