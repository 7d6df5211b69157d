// Runs the CUDA kernels of csrc/cuda/bn_act_kernels.cu on the CPU (emulated_cuda.h) and
// checks them against float64 reference math: every op, both layouts, every dtype, odd
// shapes, misaligned pointers (the scalar fallback), empty-channel and one-value-per-plane
// cases, several emulated SM counts (so reductions merge many partials). Buffers are
// exactly the size the kernels may touch (AddressSanitizer reports any overrun), outputs
// are poisoned with NaN first (every element must be written), and each op runs twice
// (results must agree bit for bit). Prints one line per failed check; exit status 1 if any.
//
// Built and run by tests/test_cuda_build.py, which includes the kernel source here.

#include "bn_act_kernels_emulated.cpp"

#include <cinttypes>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>

namespace {

using namespace resnet_fused;

int failures = 0;
std::string current_case;
const char* filter = nullptr;  // run only the cases whose name contains this

void fail(const std::string& what) {
  if (++failures <= 40) std::printf("FAIL %s: %s\n", current_case.c_str(), what.c_str());
}

// ---------------------------------------------------------------- dtypes

template <typename T>
T to_dtype(double v);
template <>
float to_dtype<float>(double v) { return static_cast<float>(v); }
template <>
__half to_dtype<__half>(double v) { return __float2half_rn(static_cast<float>(v)); }
template <>
__nv_bfloat16 to_dtype<__nv_bfloat16>(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }

double to_double(float v) { return v; }
double to_double(__half v) { return __half2float(v); }
double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
constexpr DType kDType = std::is_same_v<T, float> ? DType::kFloat32 : std::is_same_v<T, __half> ? DType::kFloat16 : DType::kBFloat16;

// One rounding to T after float32 arithmetic, relative and absolute.
template <typename T>
constexpr double kRounding = std::is_same_v<T, float> ? 2e-6 : std::is_same_v<T, __half> ? 1.0 / 1024 : 1.0 / 128;
// The largest relative error of one round-to-nearest to T (half its epsilon); float32 results
// carry a few float32 operations' error instead.
template <typename T>
constexpr double kOneRounding = std::is_same_v<T, float> ? 1e-6 : std::is_same_v<T, __half> ? 1.0 / 2048 : 1.0 / 256;

// ---------------------------------------------------------------- buffers

// An activation buffer of exactly numel elements (after `shift` leading ones, which
// misalign the data for 16-byte vectors) in the given layout.
template <typename T>
struct Activation {
  int64_t n, c, s;
  Layout layout;
  std::unique_ptr<T[]> storage;
  T* data;

  Activation(int64_t n_, int64_t c_, int64_t s_, Layout l, int shift)
      : n(n_), c(c_), s(s_), layout(l), storage(new T[n_ * c_ * s_ + shift]), data(storage.get() + shift) {}
  int64_t numel() const { return n * c * s; }
  int64_t index(int64_t in, int64_t ic, int64_t is) const {
    return layout == Layout::kNHWC ? (in * s + is) * c + ic : (in * c + ic) * s + is;
  }
  T& at(int64_t in, int64_t ic, int64_t is) { return data[index(in, ic, is)]; }
  double get(int64_t in, int64_t ic, int64_t is) const { return to_double(data[index(in, ic, is)]); }
  void poison() {
    for (int64_t i = 0; i < numel(); ++i) data[i] = to_dtype<T>(std::numeric_limits<double>::quiet_NaN());
  }
  bool bitwise_equal(const Activation& o) const { return std::memcmp(data, o.data, sizeof(T) * numel()) == 0; }
};

struct Rng {
  std::mt19937_64 engine;
  explicit Rng(uint64_t seed) : engine(seed) {}
  double normal(double mean = 0, double std = 1) { return std::normal_distribution<double>(mean, std)(engine); }
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(engine); }
};

template <typename T>
void fill(Activation<T>& a, Rng& rng, double mean, double std) {
  for (int64_t i = 0; i < a.numel(); ++i) a.data[i] = to_dtype<T>(rng.normal(mean, std));
}

// |actual - expected| <= rel * |expected| + abs: one rounding to T of a value computed in
// float32 (abs: the float32 error of a result near 0 that cancels terms of size ~1).
void expect_within(const std::string& what, double actual, double expected, double rel, double abs) {
  if (!(std::fabs(actual - expected) <= rel * std::fabs(expected) + abs)) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s: got %.9g, expected %.9g (rel %.3g, abs %.3g)", what.c_str(), actual, expected,
                  rel, abs);
    fail(buf);
  }
}

void expect_close(const std::string& what, double actual, double expected, double tol) {
  if (!(std::fabs(actual - expected) <= tol * (1 + std::fabs(expected)))) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s: got %.9g, expected %.9g (tol %.3g)", what.c_str(), actual, expected, tol);
    fail(buf);
  }
}

struct Workspace {
  std::unique_ptr<unsigned char[]> bytes;
  explicit Workspace(size_t n) : bytes(n ? new unsigned char[n] : nullptr) {
    if (n) std::memset(bytes.get(), 0xff, n);  // NaN floats: a partial read before it is written shows
  }
  void* get() const { return bytes.get(); }
};

// ---------------------------------------------------------------- one case

ActivationGeometry geometry(int64_t n, int64_t c, int64_t s, Layout layout, DType dtype) {
  ActivationGeometry g;
  g.batch = n;
  g.channels = c;
  g.spatial = s;
  g.layout = layout;
  g.dtype = dtype;
  return g;
}

// Which of a branch's parameters exist: the ops take each one on its own.
struct Affine {
  bool weight = true, bias = true;
  bool full() const { return weight && bias; }
};

// The activation buffers of a case, as bits: one may be misaligned alone.
enum Operand : unsigned { kInput = 1, kOther = 2, kGradOut = 4, kOut = 8, kGradInput = 16, kGradOther = 32 };

struct Case {
  int64_t n, c, h, w;
  Layout layout;
  Epilogue epilogue;
  bool training, affine, running, misaligned;  // misaligned: every buffer
  int multiprocessors;
  Affine main_params{}, downsample_params{};  // with affine: which parameters each branch has
  unsigned misaligned_alone = 0;              // Operand bits: buffers misaligned by themselves
};

struct BranchData {
  std::vector<float> weight, bias, mean, invstd, running_mean, running_var;
  BnBranch view(const void* input) const {
    BnBranch b;
    b.input = input;
    b.weight = weight.empty() ? nullptr : weight.data();
    b.bias = bias.empty() ? nullptr : bias.data();
    b.mean = mean.data();
    b.invstd = invstd.data();
    return b;
  }
};

// Statistics of one branch (kernel in training, running statistics in eval), checked.
template <typename T>
void statistics(const Case& k, const ActivationGeometry& g, const Activation<T>& x, BranchData& b, double momentum,
                double eps, const char* name) {
  const int64_t C = k.c, M = k.n * k.h * k.w;
  if (!k.training) {
    b.mean = b.running_mean;
    b.invstd.resize(C);
    for (int64_t c = 0; c < C; ++c) b.invstd[c] = static_cast<float>(1.0 / std::sqrt(double(b.running_var[c]) + eps));
    return;
  }
  std::vector<float> rm = b.running_mean, rv = b.running_var;
  std::vector<float> mean(C), invstd(C);
  for (int run = 0; run < 2; ++run) {
    std::vector<float> m(C, NAN), is(C, NAN), rm_run = rm, rv_run = rv;
    Workspace ws(cuda::batch_stats_workspace_bytes(g));
    BatchStatsParams p;
    p.geometry = g;
    p.input = x.data;
    p.mean = m.data();
    p.invstd = is.data();
    p.running_mean = k.running ? rm_run.data() : nullptr;
    p.running_var = k.running ? rv_run.data() : nullptr;
    p.momentum = momentum;
    p.eps = eps;
    p.workspace = ws.get();
    if (cuda::launch_batch_stats(p, nullptr) != cudaSuccess) fail(std::string(name) + ": batch_stats launch error");
    if (run == 0) {
      mean = m, invstd = is, b.running_mean = rm_run, b.running_var = rv_run;
    } else if (std::memcmp(m.data(), mean.data(), 4 * C) || std::memcmp(is.data(), invstd.data(), 4 * C) ||
               std::memcmp(rm_run.data(), b.running_mean.data(), 4 * C)) {
      fail(std::string(name) + ": batch_stats not deterministic");
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0, sq = 0;
    for (int64_t n = 0; n < k.n; ++n)
      for (int64_t s = 0; s < k.h * k.w; ++s) sum += x.get(n, c, s);
    const double mu = sum / M;
    for (int64_t n = 0; n < k.n; ++n)
      for (int64_t s = 0; s < k.h * k.w; ++s) sq += (x.get(n, c, s) - mu) * (x.get(n, c, s) - mu);
    const double var = sq / M;
    const std::string ch = std::string(name) + " channel " + std::to_string(c);
    expect_close(ch + " mean", mean[c], mu, 1e-5);
    expect_close(ch + " invstd", invstd[c], 1 / std::sqrt(var + eps), 1e-5);
    if (k.running) {
      expect_close(ch + " running_mean", b.running_mean[c], momentum * mu + (1 - momentum) * rm[c], 1e-5);
      expect_close(ch + " running_var", b.running_var[c], momentum * var * M / (M - 1) + (1 - momentum) * rv[c], 1e-5);
    }
  }
  b.mean = mean;
  b.invstd = invstd;
}

// Random parameters of a branch, drawn per channel in one order: its weight and bias (those
// `params` has), then its running statistics, or with `given_statistics` the mean and
// invstd the kernels take (for checks that launch without batch statistics).
void randomize(BranchData& b, Rng& rng, int64_t C, Affine params, bool given_statistics) {
  std::vector<float>& first = given_statistics ? b.mean : b.running_mean;
  std::vector<float>& second = given_statistics ? b.invstd : b.running_var;
  for (int64_t c = 0; c < C; ++c) {
    if (params.weight) b.weight.push_back(static_cast<float>(rng.uniform(0.5, 1.5)));
    if (params.bias) b.bias.push_back(static_cast<float>(rng.normal(0, 0.5)));
    first.push_back(static_cast<float>(rng.normal(0, 0.3)));
    second.push_back(static_cast<float>(rng.uniform(0.5, 1.5)));
  }
}

double scale_of(const BranchData& b, int64_t c) { return (b.weight.empty() ? 1.0 : b.weight[c]) * b.invstd[c]; }
double normalized(const BranchData& b, int64_t c, double x) {
  return (x - b.mean[c]) * scale_of(b, c) + (b.bias.empty() ? 0.0 : b.bias[c]);
}

// The per-channel gradients a backward writes, of the main branch and of the downsample one.
struct ParamGrads {
  std::vector<float> weight, bias, weight_d, bias_d;
  explicit ParamGrads(int64_t C) : weight(C), bias(C), weight_d(C), bias_d(C) {}
  bool operator==(const ParamGrads&) const = default;
};

// One forward launch of epilogue e; `other` is the residual (add) or the downsample input (dual).
template <typename T>
void launch_forward(const ActivationGeometry& g, Epilogue e, const BranchData& main, const Activation<T>& x,
                    const BranchData& down, const Activation<T>& other, Activation<T>& out) {
  BnActForwardParams p;
  p.geometry = g;
  p.epilogue = e;
  p.main = main.view(x.data);
  if (e == Epilogue::kDualAddRelu) p.downsample = down.view(other.data);
  if (e == Epilogue::kAddRelu) p.residual = other.data;
  p.out = out.data;
  if (cuda::launch_bn_act_forward(p, nullptr) != cudaSuccess) fail("forward launch error");
}

// One backward launch; `grad_other` is grad_residual (add) or grad_input_d (dual).
template <typename T>
void launch_backward(const ActivationGeometry& g, Epilogue e, bool training, const Activation<T>& grad_out,
                     const BranchData& main, const Activation<T>& x, const BranchData& down,
                     const Activation<T>& other, Activation<T>& grad_x, Activation<T>& grad_other, ParamGrads& grads) {
  const bool dual = e == Epilogue::kDualAddRelu, add = e == Epilogue::kAddRelu;
  BnActBackwardParams p;
  p.geometry = g;
  p.epilogue = e;
  p.training = training;
  p.grad_out = grad_out.data;
  p.main = main.view(x.data);
  if (dual) p.downsample = down.view(other.data);
  if (add) p.residual = other.data;
  p.grad_input = grad_x.data;
  p.grad_weight = grads.weight.data();
  p.grad_bias = grads.bias.data();
  if (add) p.grad_residual = grad_other.data;
  if (dual) {
    p.grad_input_d = grad_other.data;
    p.grad_weight_d = grads.weight_d.data();
    p.grad_bias_d = grads.bias_d.data();
  }
  Workspace ws(cuda::bn_act_backward_workspace_bytes(g, e));
  p.workspace = ws.get();
  if (cuda::launch_bn_act_backward(p, nullptr) != cudaSuccess) fail("backward launch error");
}

template <typename T>
void run_case(const Case& k, uint64_t seed) {
  Rng rng(seed);
  const int64_t C = k.c, S = k.h * k.w, M = k.n * S;
  const bool dual = k.epilogue == Epilogue::kDualAddRelu, add = k.epilogue == Epilogue::kAddRelu;
  emulation::multiprocessors = k.multiprocessors;
  // A misaligned buffer starts one element past a 16-byte boundary: the kernels must take
  // their scalar path if any operand is.
  auto shift = [&](Operand o) { return k.misaligned || (k.misaligned_alone & o) ? 1 : 0; };
  const ActivationGeometry g = geometry(k.n, C, S, k.layout, kDType<T>);

  Activation<T> x(k.n, C, S, k.layout, shift(kInput)), other(k.n, C, S, k.layout, shift(kOther));
  Activation<T> grad_out(k.n, C, S, k.layout, shift(kGradOut));
  fill(x, rng, 0.3, 1.2);
  fill(other, rng, -0.2, 0.9);
  BranchData main, down;
  const Affine none{false, false};
  randomize(main, rng, C, k.affine ? k.main_params : none, false);
  randomize(down, rng, C, k.affine ? k.downsample_params : none, false);
  const double eps = 1e-5, eps_d = 1e-4;
  statistics(k, g, x, main, 0.1, eps, "main");
  if (dual) statistics(k, g, other, down, 0.2, eps_d, "downsample");

  // Reference pre-activation in double (from the float statistics the kernels use).
  auto pre = [&](int64_t n, int64_t c, int64_t s) {
    double v = normalized(main, c, x.get(n, c, s));
    if (add) v += other.get(n, c, s);
    if (dual) v += normalized(down, c, other.get(n, c, s));
    return v;
  };

  // ---- forward
  Activation<T> out(k.n, C, S, k.layout, shift(kOut)), out2(k.n, C, S, k.layout, shift(kOut));
  for (Activation<T>* o : {&out, &out2}) {
    o->poison();
    launch_forward(g, k.epilogue, main, x, down, other, *o);
  }
  if (!out.bitwise_equal(out2)) fail("forward not deterministic");
  for (int64_t n = 0; n < k.n; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s)
        expect_within("forward (" + std::to_string(n) + ", " + std::to_string(c) + ", " + std::to_string(s) + ")",
                      out.get(n, c, s), std::max(pre(n, c, s), 0.0), kOneRounding<T>, 2e-5);

  // ---- backward. The upstream gradient is 0 where the float pre-activation could fall on
  // the other side of 0 than the double one: no tolerance absorbs a flipped mask.
  for (int64_t n = 0; n < k.n; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s)
        grad_out.at(n, c, s) = to_dtype<T>(std::fabs(pre(n, c, s)) < 1e-3 ? 0.0 : rng.normal());
  Activation<T> gx(k.n, C, S, k.layout, shift(kGradInput)), go(k.n, C, S, k.layout, shift(kGradOther));
  Activation<T> gx2(k.n, C, S, k.layout, shift(kGradInput)), go2(k.n, C, S, k.layout, shift(kGradOther));
  ParamGrads grads(C), grads2(C);
  for (int run = 0; run < 2; ++run) {
    Activation<T>& grad_x = run ? gx2 : gx;
    Activation<T>& grad_other = run ? go2 : go;
    grad_x.poison();
    grad_other.poison();
    launch_backward(g, k.epilogue, k.training, grad_out, main, x, down, other, grad_x, grad_other, run ? grads2 : grads);
  }
  if (!gx.bitwise_equal(gx2) || !(grads == grads2) || (k.epilogue != Epilogue::kRelu && !go.bitwise_equal(go2))) {
    fail("backward not deterministic");
  }

  std::vector<double> sum_g(C), sum_gc(C), sum_gcd(C), abs_g(C), abs_gc(C), abs_gcd(C);
  auto masked = [&](int64_t n, int64_t c, int64_t s) { return pre(n, c, s) > 0 ? grad_out.get(n, c, s) : 0.0; };
  for (int64_t n = 0; n < k.n; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const double gm = masked(n, c, s);
        sum_g[c] += gm;
        sum_gc[c] += gm * (x.get(n, c, s) - main.mean[c]);
        abs_g[c] += std::fabs(gm);
        abs_gc[c] += std::fabs(gm * (x.get(n, c, s) - main.mean[c]));
        if (dual) {
          sum_gcd[c] += gm * (other.get(n, c, s) - down.mean[c]);
          abs_gcd[c] += std::fabs(gm * (other.get(n, c, s) - down.mean[c]));
        }
      }
  // Per-channel sums: float32 accumulation error relative to the sum of magnitudes (2e-6:
  // every case here passes at 2e-7; a dropped or doubly counted partial, or a 16-bit
  // intermediate, is orders of magnitude more).
  auto expect_sum = [&](const std::string& what, double actual, double expected, double magnitude) {
    if (!(std::fabs(actual - expected) <= 2e-6 * magnitude + 1e-6)) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "%s: got %.9g, expected %.9g", what.c_str(), actual, expected);
      fail(buf);
    }
  };
  for (int64_t c = 0; c < C; ++c) {
    const std::string ch = " channel " + std::to_string(c);
    expect_sum("grad_bias" + ch, grads.bias[c], sum_g[c], abs_g[c]);
    expect_sum("grad_weight" + ch, grads.weight[c], sum_gc[c] * main.invstd[c], abs_gc[c] * main.invstd[c]);
    if (dual) {
      expect_sum("grad_bias_d" + ch, grads.bias_d[c], sum_g[c], abs_g[c]);
      expect_sum("grad_weight_d" + ch, grads.weight_d[c], sum_gcd[c] * down.invstd[c], abs_gcd[c] * down.invstd[c]);
    }
  }
  auto grad_input = [&](const BranchData& b, double sg, double sgc, int64_t c, double gm, double xv) {
    const double invstd = b.invstd[c];
    double v = gm;
    if (k.training) v = gm - sg / M - (xv - b.mean[c]) * invstd * invstd * sgc / M;
    return v * scale_of(b, c);
  };
  // grad_x is float32 math rounded once to T: within one rounding of itself, plus the float32
  // error of a difference of terms, relative to the terms' magnitudes (|g|, the per-channel
  // sums over M, each carrying the 2e-6 of expect_sum, times |scale|).
  auto grad_terms = [&](const BranchData& b, double ag, double agc, int64_t c, double gm, double xv) {
    const double invstd = b.invstd[c];
    double t = std::fabs(gm);
    if (k.training) t += ag / M + std::fabs(xv - b.mean[c]) * invstd * invstd * agc / M;
    return t * std::fabs(scale_of(b, c));
  };
  for (int64_t n = 0; n < k.n; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const std::string at = " (" + std::to_string(n) + ", " + std::to_string(c) + ", " + std::to_string(s) + ")";
        const double gm = masked(n, c, s);
        const double xv = x.get(n, c, s);
        expect_within("grad_input" + at, gx.get(n, c, s), grad_input(main, sum_g[c], sum_gc[c], c, gm, xv),
                      kOneRounding<T>, 4e-6 * grad_terms(main, abs_g[c], abs_gc[c], c, gm, xv) + 1e-6);
        if (add && go.get(n, c, s) != gm) fail("grad_residual" + at + " is not the masked grad_out");
        if (dual) {
          const double ov = other.get(n, c, s);
          expect_within("grad_input_d" + at, go.get(n, c, s), grad_input(down, sum_g[c], sum_gcd[c], c, gm, ov),
                        kOneRounding<T>, 4e-6 * grad_terms(down, abs_g[c], abs_gcd[c], c, gm, ov) + 1e-6);
        }
        // The backward's mask is the forward's, bit for bit: grad_residual passes grad_out
        // exactly where the forward's output is positive (float32 output: out > 0 iff pre > 0).
        if (add && std::is_same_v<T, float>) {
          const double expected = out.get(n, c, s) > 0 ? grad_out.get(n, c, s) : 0.0;
          if (go.get(n, c, s) != expected) fail("backward mask differs from the forward's" + at);
        }
      }
}

// Statistics of N(center, spread) values of shape (N, C, S) on `multiprocessors` emulated
// SMs, merged from at least `min_partials` partials per channel, with `planted` values
// written over some. The tolerances are tests/test_cuda_ops.py's: mean to 1e-6, invstd to
// 1e-5, relative. A channel whose float64 mean is not finite (an Inf or a NaN planted)
// must get a non-finite mean and a NaN invstd: its whole output NaN, as eager's.
struct Planted {
  int64_t n, c, i;
  double value;
};

struct StatisticsCase {
  int64_t N = 16, C = 32, S = 144;
  int multiprocessors = 6;
  int64_t min_partials = 1;
  double center = 1000.0, spread = 3.0;  // far from zero: a float32 sum of squares would lose the variance
  std::vector<Planted> planted = {};
  const char* planted_what = "";  // for the case's name
};

template <typename T>
void check_statistics(Layout layout, const char* dtype, const StatisticsCase& k = {}) {
  char buf[192];
  std::snprintf(buf, sizeof buf, "%s %s statistics of N(%g, %g)%s (%" PRId64 ", %" PRId64 ", %" PRId64 ") sms=%d",
                dtype, layout == Layout::kNHWC ? "nhwc" : "nchw", k.center, k.spread, k.planted_what, k.N, k.C, k.S,
                k.multiprocessors);
  if (filter != nullptr && std::strstr(buf, filter) == nullptr) return;
  current_case = buf;
  const int before = failures;
  emulation::multiprocessors = k.multiprocessors;
  Rng rng(7);
  const int64_t N = k.N, C = k.C, S = k.S;
  Activation<T> x(N, C, S, layout, 0);
  fill(x, rng, k.center, k.spread);
  for (const Planted& v : k.planted) x.at(v.n, v.c, v.i) = to_dtype<T>(v.value);
  const ActivationGeometry g = geometry(N, C, S, layout, kDType<T>);
  std::vector<float> mean(C), invstd(C);
  const size_t workspace_bytes = cuda::batch_stats_workspace_bytes(g);  // partials: [splits][2C + 1] floats
  if (static_cast<int64_t>(workspace_bytes / sizeof(float) / (2 * C + 1)) < k.min_partials) fail("too few partials");
  Workspace ws(workspace_bytes);
  BatchStatsParams p;
  p.geometry = g;
  p.input = x.data;
  p.mean = mean.data();
  p.invstd = invstd.data();
  p.workspace = ws.get();
  if (cuda::launch_batch_stats(p, nullptr) != cudaSuccess) fail("launch error");
  for (int64_t c = 0; c < C; ++c) {
    const std::string channel = " of channel " + std::to_string(c);
    double sum = 0, sq = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < S; ++i) sum += x.get(n, c, i);
    const double mu = sum / (N * S);
    if (!std::isfinite(mu)) {
      if (std::isfinite(mean[c])) fail("finite mean" + channel);
      if (!std::isnan(invstd[c])) fail("invstd not NaN" + channel);
      continue;
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < S; ++i) sq += (x.get(n, c, i) - mu) * (x.get(n, c, i) - mu);
    // A variance past float's range: invstd 0, as eager and the CPU kernels give (not NaN).
    const double want_invstd =
        sq / (N * S) > std::numeric_limits<float>::max() ? 0.0 : 1 / std::sqrt(sq / (N * S) + p.eps);
    if (!(std::fabs(mean[c] - mu) <= 1e-6 * std::fabs(mu))) fail("mean" + channel);
    if (!(std::fabs(invstd[c] - want_invstd) <= 1e-5 * want_invstd)) fail("invstd" + channel);
  }
  std::printf("%s %s\n", failures == before ? "ok  " : "FAIL", buf);
}

// Each channel's first value 1000 std from the rest: the shift of the steps that start
// there lies far from their mean.
std::vector<Planted> outliers_first(int64_t channels, double value) {
  std::vector<Planted> planted;
  for (int64_t c = 0; c < channels; ++c) planted.push_back({0, c, 0, value});
  return planted;
}

const char* name(Layout l) { return l == Layout::kNHWC ? "nhwc" : "nchw"; }
const char* name(Epilogue e) {
  return e == Epilogue::kRelu ? "relu" : e == Epilogue::kAddRelu ? "add_relu" : "dual_add_relu";
}

std::string name(const Affine& a) { return a.weight ? (a.bias ? "wb" : "w") : (a.bias ? "b" : "none"); }

std::string misaligned_names(unsigned operands) {
  std::string names;
  for (const auto& [bit, what] : {std::pair{kInput, "input"}, {kOther, "other"}, {kGradOut, "grad_out"}, {kOut, "out"},
                                  {kGradInput, "grad_input"}, {kGradOther, "grad_other"}}) {
    if (operands & bit) names += std::string(" misaligned-") + what;
  }
  return names;
}

template <typename T>
void run(const Case& k, const char* dtype, uint64_t seed) {
  char buf[256];
  const std::string params = k.main_params.full() && k.downsample_params.full()
                                 ? ""
                                 : " params " + name(k.main_params) + "/" + name(k.downsample_params);
  std::snprintf(buf, sizeof buf, "%s %s %s (%" PRId64 ", %" PRId64 ", %" PRId64 ", %" PRId64 ") %s%s%s%s%s%s sms=%d",
                dtype, name(k.layout), name(k.epilogue), k.n, k.c, k.h, k.w, k.training ? "train" : "eval",
                k.affine ? "" : " no-affine", params.c_str(), k.running ? "" : " no-running",
                k.misaligned ? " misaligned" : "", misaligned_names(k.misaligned_alone).c_str(), k.multiprocessors);
  if (filter != nullptr && std::strstr(buf, filter) == nullptr) return;
  current_case = buf;
  const int before = failures;
  run_case<T>(k, seed);
  std::printf("%s %s\n", failures == before ? "ok  " : "FAIL", buf);
}

}  // namespace

// A geometry and what it is there to exercise.
struct Shape {
  int64_t n, c, h, w;
  bool nhwc, nchw;       // layouts to run
  int multiprocessors;    // emulated SMs: sets the number of splits a reduction merges
  bool float32_only = false;
};

// Eval backward of inputs holding an Inf or a NaN (input and, for the dual op, input_d):
// grad_x = scale * g alone, as eager's, where adding (x - mean) * 0 would give a NaN. -Inf
// masks its element (gradient 0), +Inf and NaN pass scale * g exactly, and no gradient
// anywhere is a NaN (every other value is finite).
void check_eval_backward_of_non_finite_inputs(Layout layout, Epilogue e) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "float32 %s %s eval backward of -Inf, +Inf and NaN inputs", name(layout), name(e));
  if (filter != nullptr && std::strstr(buf, filter) == nullptr) return;
  current_case = buf;
  const int before = failures;
  const Case k{2, 16, 3, 4, layout, e, false, true, true, false, 2};
  const bool dual = e == Epilogue::kDualAddRelu, add = e == Epilogue::kAddRelu;
  const int64_t N = k.n, C = k.c, S = k.h * k.w;
  emulation::multiprocessors = k.multiprocessors;
  const ActivationGeometry g = geometry(N, C, S, layout, DType::kFloat32);
  Rng rng(11);
  Activation<float> x(N, C, S, layout, 0), other(N, C, S, layout, 0), grad_out(N, C, S, layout, 0);
  fill(x, rng, 0.3, 1.2);
  fill(other, rng, -0.2, 0.9);
  fill(grad_out, rng, 2.0, 0.5);
  struct Poisoned { int64_t n, c, s; float value; Activation<float>* where; };
  const Poisoned poisoned[] = {{0, 1, 3, -INFINITY, &x}, {1, 4, 0, INFINITY, &x}, {1, 2, 7, NAN, &x},
                               {0, 5, 5, -INFINITY, &other}, {1, 7, 2, NAN, &other}};
  for (const Poisoned& v : poisoned) v.where->at(v.n, v.c, v.s) = v.value;
  BranchData main, down;
  randomize(main, rng, C, {}, false);
  randomize(down, rng, C, {}, false);
  statistics(k, g, x, main, 0.1, 1e-5, "main");
  statistics(k, g, other, down, 0.1, 1e-5, "downsample");

  Activation<float> gx(N, C, S, layout, 0), go(N, C, S, layout, 0);
  gx.poison();
  go.poison();
  ParamGrads grads(C);
  launch_backward(g, e, false, grad_out, main, x, down, other, gx, go, grads);

  for (int64_t i = 0; i < gx.numel(); ++i) {
    if (std::isnan(gx.data[i])) fail("a NaN in grad_input at flat index " + std::to_string(i));
    if ((add || dual) && std::isnan(go.data[i])) fail("a NaN in grad_other at flat index " + std::to_string(i));
  }
  for (const Poisoned& v : poisoned) {
    const int64_t n = v.n, c = v.c, s = v.s;
    double pre = normalized(main, c, x.get(n, c, s));
    if (add) pre += other.get(n, c, s);
    if (dual) pre += normalized(down, c, other.get(n, c, s));
    const float masked = pre <= 0 ? 0.f : grad_out.data[grad_out.index(n, c, s)];  // NaN passes
    const std::string at = " at (" + std::to_string(n) + ", " + std::to_string(c) + ", " + std::to_string(s) + ")";
    const float want = masked * (main.weight[c] * main.invstd[c]);
    if (gx.data[gx.index(n, c, s)] != want) fail("grad_input" + at);
    const float want_other = dual ? masked * (down.weight[c] * down.invstd[c]) : masked;
    if ((add || dual) && go.data[go.index(n, c, s)] != want_other) fail("grad_other" + at);
  }
  std::printf("%s %s\n", failures == before ? "ok  " : "FAIL", buf);
}

// The backward recomputes the forward's ReLU mask from the same inputs with the same
// arithmetic, bit for bit. With a second input that cancels x * scale + shift to within
// float32 rounding (the residual, or the downsample branch's normalized value) and an
// upstream gradient everywhere, the gradients must be masked exactly where the forward's
// output is not positive: a multiply-add fused in one pass and not in the other flips some
// of these signs. The evidence: grad_residual is the masked grad_out exactly; in eval,
// grad_input (scale * masked grad_out) is 0 exactly where masked.
void check_backward_mask_is_the_forwards(Layout layout, Epilogue e, bool training) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "float32 %s %s %s, a second input cancelling the pre-activation: the forward's mask",
                name(layout), name(e), training ? "train" : "eval");
  if (filter != nullptr && std::strstr(buf, filter) == nullptr) return;
  current_case = buf;
  const int before = failures;
  const bool dual = e == Epilogue::kDualAddRelu;
  const int64_t N = 4, C = 16, S = 64;
  emulation::multiprocessors = 3;
  const ActivationGeometry g = geometry(N, C, S, layout, DType::kFloat32);
  Rng rng(13);
  BranchData main, down;
  randomize(main, rng, C, {}, true);
  randomize(down, rng, C, {}, true);
  Activation<float> x(N, C, S, layout, 0), other(N, C, S, layout, 0), grad_out(N, C, S, layout, 0);
  fill(x, rng, 0.3, 1.2);
  fill(grad_out, rng, 0.0, 1.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const double cancel = -normalized(main, c, x.get(n, c, s));  // what the second term must be
        other.at(n, c, s) = static_cast<float>(
            dual ? down.mean[c] + (cancel - down.bias[c]) / scale_of(down, c) : cancel);
      }

  Activation<float> out(N, C, S, layout, 0), grad_x(N, C, S, layout, 0), grad_other(N, C, S, layout, 0);
  ParamGrads grads(C);
  launch_forward(g, e, main, x, down, other, out);
  launch_backward(g, e, training, grad_out, main, x, down, other, grad_x, grad_other, grads);

  int64_t positive = 0, mismatched = 0;
  for (int64_t i = 0; i < out.numel(); ++i) {
    const bool passes = out.data[i] > 0;
    positive += passes;
    if (!dual) mismatched += grad_other.data[i] != (passes ? grad_out.data[i] : 0.f);
    if (!training) mismatched += (grad_x.data[i] != 0.f) != passes;
  }
  if (mismatched) fail(std::to_string(mismatched) + " gradients masked unlike the forward's output");
  // Positive and non-positive outputs, in numbers (about 1 in 5 positive, most others
  // exactly 0): the pre-activations are rounding errors, as meant.
  if (positive < out.numel() / 10 || positive > out.numel() * 9 / 10) {
    fail(std::to_string(positive) + " of " + std::to_string(out.numel()) + " outputs positive: the inputs do not cancel");
  }
  std::printf("%s %s\n", failures == before ? "ok  " : "FAIL", buf);
}

// The mask is where the output, as stored in T, is <= 0 (eager's relu backward): in eval
// with x = 0, weight 1, mean 0, invstd 1 the pre-activation is the bias exactly. Half
// of T's smallest subnormal (2^-25 in float16, 2^-134 in bfloat16) rounds to 0, a tie to
// even, and is masked; the next float rounds up and passes; 1e-9 rounds to 0 in float16,
// not in bfloat16; -1e-9 is masked. Every epilogue (the other input 0).
template <typename T>
void check_mask_of_the_rounded_output(Layout layout, Epilogue e, const char* dtype) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "%s %s %s eval: the mask of the output rounded to 0", dtype, name(layout), name(e));
  if (filter != nullptr && std::strstr(buf, filter) == nullptr) return;
  current_case = buf;
  const int before = failures;
  const bool dual = e == Epilogue::kDualAddRelu, add = e == Epilogue::kAddRelu;
  const float tie = std::is_same_v<T, __half> ? std::ldexp(1.f, -25) : std::ldexp(1.f, -134);
  const float biases[] = {tie, std::nextafter(tie, 1.f), 1e-9f, -1e-9f};
  const bool passes[] = {false, true, std::is_same_v<T, __nv_bfloat16>, false};
  const int64_t N = 2, C = 4, S = 3;
  emulation::multiprocessors = 2;
  const ActivationGeometry g = geometry(N, C, S, layout, kDType<T>);
  BranchData main, down;
  for (int64_t c = 0; c < C; ++c) {
    for (BranchData* b : {&main, &down}) {
      b->weight.push_back(1.f);
      b->bias.push_back(b == &main ? biases[c] : 0.f);
      b->mean.push_back(0.f);
      b->invstd.push_back(1.f);
    }
  }
  Activation<T> x(N, C, S, layout, 0), other(N, C, S, layout, 0), grad_out(N, C, S, layout, 0);
  Activation<T> out(N, C, S, layout, 0), grad_x(N, C, S, layout, 0), grad_other(N, C, S, layout, 0);
  for (int64_t i = 0; i < x.numel(); ++i) {
    x.data[i] = other.data[i] = to_dtype<T>(0.0);
    grad_out.data[i] = to_dtype<T>(1.0);
  }
  ParamGrads grads(C);
  launch_forward(g, e, main, x, down, other, out);
  launch_backward(g, e, false, grad_out, main, x, down, other, grad_x, grad_other, grads);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        char bias[32];
        std::snprintf(bias, sizeof bias, "%a", biases[c]);  // 2^-25 and 2^-134 apart from 0
        const std::string at = " at channel " + std::to_string(c) + " (bias " + bias + ")";
        const double want = passes[c] ? 1.0 : 0.0;
        if ((out.get(n, c, s) > 0) != passes[c]) fail("output" + at);
        if (grad_x.get(n, c, s) != want) fail("grad_input" + at);
        if ((add || dual) && grad_other.get(n, c, s) != want) fail("grad_other" + at);
        if (grads.bias[c] != (passes[c] ? N * S : 0)) fail("grad_bias" + at);
        if (dual && grads.bias_d[c] != (passes[c] ? N * S : 0)) fail("grad_bias_d" + at);
      }
  std::printf("%s %s\n", failures == before ? "ok  " : "FAIL", buf);
}

int main(int argc, char** argv) {
  if (argc > 1) filter = argv[1];
  const Shape shapes[] = {
      {2, 16, 4, 4, true, true, 5},     // whole 16-byte vectors in both layouts
      {3, 19, 5, 7, true, true, 3},     // C and H*W odd: the scalar path in both layouts
      {5, 8, 1, 1, true, true, 5},      // H = W = 1: vectors along C, one value per plane
      {4, 1, 6, 6, true, true, 5},      // C = 1
      {9, 3, 5, 7, true, true, 2},      // NCHW: threads step across plane ends (scalar)
      {16, 4, 12, 12, true, true, 5},   // NCHW: threads step across plane ends (vectors)
      {2, 67, 3, 5, true, false, 3},    // channels_last: three channel tiles, scalar
      {2, 264, 2, 4, true, false, 5},   // channels_last: several tiles of whole vectors
      {2, 128, 48, 54, true, false, 40, true},  // more partials than finalize lanes (64): lanes merge several
      {1, 4, 1024, 272, true, false, 180, true},  // > 512 backward partials (relu): a lane loads in rounds
      // One SM: one-wave grids of 2-4 blocks, each thread walking many rows (channels_last)
      // or planes (NCHW).
      {32, 2, 32, 32, true, true, 1},
      // NCHW, 20 channels on 4 SMs: the reductions take 2-3 splits per channel, where one
      // block per channel would leave their last wave near empty.
      {5, 20, 64, 64, false, true, 4, true},
  };
  uint64_t seed = 1;
  for (const Shape& s : shapes) {
    for (Layout layout : {Layout::kNHWC, Layout::kNCHW}) {
      if (!(layout == Layout::kNHWC ? s.nhwc : s.nchw)) continue;
      for (Epilogue e : {Epilogue::kRelu, Epilogue::kAddRelu, Epilogue::kDualAddRelu}) {
        const Case train{s.n, s.c, s.h, s.w, layout, e, true, true, true, false, s.multiprocessors};
        run<float>(train, "float32", seed++);
        if (s.float32_only) continue;
        run<__half>(train, "float16", seed++);
        run<__nv_bfloat16>(train, "bfloat16", seed++);
      }
    }
  }
  // Eval mode (every dtype), no affine / no running statistics, misaligned pointers (the
  // scalar fallback of shapes that would take vectors), one SM.
  for (Layout layout : {Layout::kNHWC, Layout::kNCHW}) {
    for (Epilogue e : {Epilogue::kRelu, Epilogue::kAddRelu, Epilogue::kDualAddRelu}) {
      run<float>({3, 16, 4, 4, layout, e, false, true, true, false, 2}, "float32", seed++);
      run<__nv_bfloat16>({3, 16, 4, 4, layout, e, false, true, true, false, 2}, "bfloat16", seed++);
      run<__half>({4, 24, 4, 6, layout, e, false, true, true, true, 1}, "float16", seed++);
      run<__nv_bfloat16>({3, 16, 4, 4, layout, e, true, false, false, false, 2}, "bfloat16", seed++);
      run<__half>({4, 24, 4, 6, layout, e, true, true, true, true, 1}, "float16", seed++);
      run<float>({4, 24, 4, 6, layout, e, false, true, true, true, 2}, "float32", seed++);
    }
  }
  // The dual op's branches with parameters of their own: one lacks its weight, its bias or
  // both while the other has them (a kernel reading one branch's flags for both would read
  // a missing parameter, or skip a present one).
  const Affine full{}, partial[] = {{false, true}, {true, false}, {false, false}};
  for (Layout layout : {Layout::kNHWC, Layout::kNCHW}) {
    for (bool training : {true, false}) {
      for (const Affine& p : partial) {
        for (const auto& [main_params, downsample_params] : {std::pair{full, p}, std::pair{p, full}}) {
          run<float>({2, 16, 4, 4, layout, Epilogue::kDualAddRelu, training, true, true, false, 5, main_params,
                      downsample_params},
                     "float32", seed++);
        }
      }
    }
  }
  // One buffer misaligned alone, at shapes that take 16-byte vectors: every operand's
  // alignment decides the path (a vector access to the misaligned one is what UBSan flags).
  for (Layout layout : {Layout::kNHWC, Layout::kNCHW}) {
    for (Epilogue e : {Epilogue::kRelu, Epilogue::kAddRelu, Epilogue::kDualAddRelu}) {
      for (Operand o : {kInput, kOther, kGradOut, kOut, kGradInput, kGradOther}) {
        if (e == Epilogue::kRelu && (o == kOther || o == kGradOther)) continue;
        const Case k{2, 16, 4, 4, layout, e, true, true, true, false, 5, {}, {}, o};
        run<float>(k, "float32", seed++);
        run<__half>(k, "float16", seed++);
      }
    }
  }
  for (Layout layout : {Layout::kNHWC, Layout::kNCHW}) {
    for (Epilogue e : {Epilogue::kRelu, Epilogue::kAddRelu, Epilogue::kDualAddRelu}) {
      check_eval_backward_of_non_finite_inputs(layout, e);
    }
    check_backward_mask_is_the_forwards(layout, Epilogue::kAddRelu, false);
    check_backward_mask_is_the_forwards(layout, Epilogue::kAddRelu, true);
    check_backward_mask_is_the_forwards(layout, Epilogue::kDualAddRelu, false);
    for (Epilogue e : {Epilogue::kRelu, Epilogue::kAddRelu, Epilogue::kDualAddRelu}) {
      check_mask_of_the_rounded_output<__half>(layout, e, "float16");
      check_mask_of_the_rounded_output<__nv_bfloat16>(layout, e, "bfloat16");
    }
  }
  for (Layout layout : {Layout::kNHWC, Layout::kNCHW}) {
    check_statistics<float>(layout, "float32");
    check_statistics<float>(layout, "float32",
                            {.C = 5, .center = 0.5, .spread = 2.0, .planted = {{3, 0, 17, INFINITY}, {0, 2, 0, NAN},
                                                                               {15, 3, 143, -INFINITY}},
                             .planted_what = " with an Inf, a NaN and a -Inf"});
    check_statistics<float>(layout, "float32",
                            {.center = 0.0, .spread = 1e-3, .planted = outliers_first(32, 1.0),
                             .planted_what = " with an outlier first"});
    check_statistics<__nv_bfloat16>(layout, "bfloat16");
    // Values whose square overflows float: a thread's first step must not square them.
    check_statistics<float>(layout, "float32", {.center = 2e19, .spread = 6e16});
    // Deviations whose squares overflow float: M2 inf, never inf - inf.
    check_statistics<float>(layout, "float32", {.center = 3e31, .spread = 1e30});
    // Constant channels: variance 0 whatever float32 makes of a mean of 1000.1.
    check_statistics<float>(layout, "float32", {.center = 1000.1, .spread = 0.0});
    check_statistics<__nv_bfloat16>(layout, "bfloat16", {.center = 1000.1, .spread = 0.0});
  }
  // NCHW, 20 channels on 12 block slots: 3 splits per channel (20 blocks would run 1.67
  // waves of work in 2, 60 run it in 5 waves of a third).
  check_statistics<float>(Layout::kNCHW, "float32",
                          {.N = 5, .C = 20, .S = 4096, .multiprocessors = 4, .min_partials = 3});
  // The statistics' splits per channel at the ResNet-50 NCHW stage shapes (N = 128, bf16)
  // on an H100/H200's 132 SMs (396 slots): as many blocks per channel as fill the waves
  // (C = 2048: 2, as many as 7x7 planes give a block's worth of work).
  emulation::multiprocessors = 132;
  for (const auto& [C, S, splits] : {std::tuple<int64_t, int64_t, int64_t>{64, 56 * 56, 6}, {256, 56 * 56, 3},
                                     {128, 28 * 28, 3}, {512, 28 * 28, 3}, {1024, 14 * 14, 3}, {2048, 7 * 7, 2}}) {
    const ActivationGeometry g = geometry(128, C, S, Layout::kNCHW, DType::kBFloat16);
    const size_t bytes = cuda::batch_stats_workspace_bytes(g);
    if (bytes != sizeof(float) * splits * (2 * C + 1)) {
      std::printf("FAIL NCHW statistics splits at C = %lld: %zu workspace bytes, expected %lld splits\n",
                  static_cast<long long>(C), bytes, static_cast<long long>(splits));
      ++failures;
    }
  }
  // Past kMaxSplitValues (2^22) values per split a floor on the splits takes over, so a
  // partial's count stays far below float's exact 2^24: C = 2048 with 5 * 2^22 + 1 values
  // per channel takes 6 splits (the waves alone would take 2).
  {
    const ActivationGeometry g = geometry(1, 2048, 5 * (int64_t{1} << 22) + 1, Layout::kNCHW, DType::kBFloat16);
    const size_t bytes = cuda::batch_stats_workspace_bytes(g), want = sizeof(float) * 6 * (2 * 2048 + 1);
    if (bytes != want) {
      std::printf("FAIL NCHW statistics splits past 2^22 values each: %zu workspace bytes, expected %zu\n", bytes, want);
      ++failures;
    }
  }
  // Over 512 partials per channel (1040 * 1024 rows of one vector, 180 SMs): a finalize
  // lane loads its partials in two rounds.
  check_statistics<float>(Layout::kNHWC, "float32",
                          {.N = 1, .C = 4, .S = 1040 * 1024, .multiprocessors = 180, .min_partials = 513});
  // Ordinary launches: a device below sm_90, and an sm_90 device running kernels compiled
  // for compute_80 (whose code has no griddepcontrol.wait: they must not start early).
  // Every launch so far was on the default sm_90 device: each must have been programmatic.
  if (emulation::programmatic_launches != emulation::launches) {
    std::printf("FAIL sm_90: %d of %d launches programmatic\n", emulation::programmatic_launches, emulation::launches);
    ++failures;
  }
  for (const auto& [compute_capability, ptx_version] : {std::pair{8, 80}, std::pair{9, 80}}) {
    emulation::compute_capability = compute_capability;
    emulation::ptx_version = ptx_version;
    const int programmatic = emulation::programmatic_launches;
    for (Epilogue e : {Epilogue::kRelu, Epilogue::kDualAddRelu}) {
      run<__nv_bfloat16>({2, 264, 2, 4, Layout::kNHWC, e, true, true, true, false, 5}, "bfloat16", seed++);
      run<float>({9, 3, 5, 7, Layout::kNCHW, e, true, true, true, false, 2}, "float32", seed++);
    }
    if (emulation::programmatic_launches != programmatic) {
      std::printf("FAIL sm_%d device, compute_%d kernels: %d programmatic launches\n", compute_capability,
                  ptx_version, emulation::programmatic_launches - programmatic);
      ++failures;
    }
  }
  emulation::compute_capability = 9;
  emulation::ptx_version = 90;
  failures += emulation::barrier_errors + emulation::dependency_errors;
  std::printf("%d emulated launches (%d programmatic), %d barrier errors, %d dependency errors, %d failed checks\n",
              emulation::launches, emulation::programmatic_launches, emulation::barrier_errors,
              emulation::dependency_errors, failures);
  return failures == 0 ? 0 : 1;
}
