// A CPU stand-in for the part of CUDA that csrc/cuda/*.cu uses, so the kernels' own
// source runs on the host, under AddressSanitizer and UBSan (tests/test_cuda_build.py).
//
// Each CUDA thread of a block is a fiber with its own stack; the block's fibers run one
// at a time, each until it reaches __syncthreads() or returns, so a barrier releases no
// thread before every thread of the block has arrived — the CUDA semantics,
// deterministically. Fibers switch with a few instructions of x86-64 assembly (ucontext's
// swapcontext makes a system call per switch, 10x slower here); other hosts skip the test.
// Between two barriers the fibers run in thread order, or in reverse order with
// EMULATION_THREAD_ORDER=reverse: a shared-memory race (a read not separated from the
// write it depends on by a barrier) then fails in one of the two runs. Every barrier is
// checked: all threads of a pass must wait at the same __syncthreads() (by source line),
// and none may return while others wait (barrier_errors). __shared__ variables start each
// block as NaN bytes (poison()). Blocks run one after another, which is one legal CUDA
// schedule (the kernels never wait on other blocks); __shared__ variables become
// function statics, one per kernel instantiation, which is all one running block needs.
// Device intrinsics map to their IEEE host equivalents (compile with -ffp-contract=off so
// the host compiler fuses nothing the device code did not ask for). Programmatic dependent
// launches (cudaLaunchKernelEx) run like any other, in order; what is checked is the
// kernels' rule: every thread of every kernel calls cudaGridDependencySynchronize(), before
// its first barrier and before it triggers its dependents' launch (that a kernel touches
// no global memory before the wait, the machine code shows: scripts/ptxas_report.py). The emulated device's compute capability and the kernels' PTX
// version decide which launches the host makes programmatic (emulation::compute_capability,
// emulation::ptx_version). Launches are written
// `kernel<<<grid, block, shared, stream>>>(args)` in the source; the test rewrites them to
// `::emulation::launch(kernel, grid, block, shared, stream)(args)`.
#pragma once

#if !defined(__x86_64__)
#error "the CUDA emulation switches fibers with x86-64 assembly"
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::min;
using std::sqrt;

// ---------------------------------------------------------------- runtime API

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emulation {
inline int multiprocessors = 4;       // what cudaDevAttrMultiProcessorCount reports
inline int compute_capability = 9;    // what cudaDevAttrComputeCapabilityMajor reports
inline int ptx_version = 90;          // every kernel's cudaFuncAttributes::ptxVersion
inline cudaError_t last_error = cudaSuccess;
inline int launches = 0;
inline int programmatic_launches = 0;  // of the launches, those through cudaLaunchKernelEx's attribute
}  // namespace emulation

// Each emulated configuration is a device of its own: the kernels cache what they learn
// per device, and a case that sets another SM count (or compute capability, or PTX
// version) must not get the first case's. The default sm_90 configuration is device
// `multiprocessors`; the others lie past the range the kernels cache.
inline cudaError_t cudaGetDevice(int* device) {
  const bool sm90 = emulation::compute_capability == 9 && emulation::ptx_version == 90;
  *device = emulation::multiprocessors +
            (sm90 ? 0 : 1024 * (emulation::compute_capability * 1000 + emulation::ptx_version));
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emulation::multiprocessors; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = emulation::compute_capability; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}
struct cudaFuncAttributes {
  int ptxVersion;
  int binaryVersion;
};
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel*) {
  attributes->ptxVersion = emulation::ptx_version;
  attributes->binaryVersion = emulation::compute_capability * 10;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emulation::last_error;
  emulation::last_error = cudaSuccess;
  return e;
}

// ---------------------------------------------------------------- numeric types and intrinsics

struct __half {
  _Float16 value;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return {static_cast<_Float16>(f)}; }  // IEEE round to nearest even
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline unsigned short __half_as_ushort(__half h) {
  unsigned short u;
  std::memcpy(&u, &h.value, sizeof u);
  return u;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<uint32_t>(b.bits) << 16); }

inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// ---------------------------------------------------------------- threads, blocks, barriers

namespace emulation {

// Saves the callee-saved registers and the stack pointer to *from, loads them from `to`.
extern "C" void emulation_switch_stack(void** from, void* to);
asm(R"(
  .text
  .p2align 4
  .globl emulation_switch_stack
  .type emulation_switch_stack, @function
emulation_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emulation_switch_stack, .-emulation_switch_stack
)");

struct Fiber {
  void* stack_pointer = nullptr;
  bool done = false;
};

inline dim3 thread_index, block_index, block_dim, grid_dim;
inline void* scheduler = nullptr;  // the scheduler's saved stack pointer
inline Fiber* current = nullptr;
inline const bool reverse_order = [] {
  const char* order = std::getenv("EMULATION_THREAD_ORDER");
  return order != nullptr && std::strcmp(order, "reverse") == 0;
}();
inline int barrier_line = 0;  // the __syncthreads() the running pass's waiting threads reached
inline int barrier_errors = 0;
inline long long block_serial = 0;  // counts the blocks run, to poison shared memory once per block
inline std::vector<char> waited;     // per thread of the running block: called cudaGridDependencySynchronize()
inline int dependency_errors = 0;
inline void (*job)() = nullptr;    // what every fiber of the running block executes
inline std::vector<std::vector<char>> stacks;
constexpr size_t kStackBytes = 256 * 1024;

[[noreturn]] inline void fiber_entry() {
  job();
  current->done = true;
  emulation_switch_stack(&current->stack_pointer, scheduler);
  __builtin_unreachable();
}

// A fresh fiber on `stack` that starts in fiber_entry: below a 16-byte aligned top, a
// zero return address (fiber_entry never returns), fiber_entry as the address the
// switch's `ret` takes, and six zeroed callee-saved registers for it to pop.
inline void* start_frame(std::vector<char>& stack) {
  auto top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<void**>(top);
  *--slot = nullptr;
  *--slot = reinterpret_cast<void*>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--slot = nullptr;
  return slot;
}

// Runs job() for every thread of one block.
inline void run_block(const dim3& block, void (*block_job)()) {
  ++block_serial;
  const unsigned threads = block.x * block.y * block.z;
  waited.assign(threads, 0);
  std::vector<Fiber> fibers(threads);
  if (stacks.size() < threads) stacks.resize(threads, std::vector<char>(kStackBytes));
  job = block_job;
  for (unsigned t = 0; t < threads; ++t) fibers[t].stack_pointer = start_frame(stacks[t]);
  // One pass runs every live thread up to its next barrier (or its end).
  for (bool live = true; live;) {
    live = false;
    barrier_line = 0;
    bool returned = false;
    for (unsigned i = 0; i < threads; ++i) {
      const unsigned t = reverse_order ? threads - 1 - i : i;
      if (fibers[t].done) continue;
      thread_index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      current = &fibers[t];
      emulation_switch_stack(&scheduler, fibers[t].stack_pointer);
      live = live || !fibers[t].done;
      returned = returned || fibers[t].done;
    }
    if (live && returned && barrier_errors++ < 10) {
      std::fprintf(stderr, "emulated block: threads returned while others wait at the barrier of line %d\n",
                   barrier_line);
    }
  }
  if (std::count(waited.begin(), waited.end(), 0) != 0 && dependency_errors++ < 10) {
    std::fprintf(stderr, "emulated block: a thread returned without cudaGridDependencySynchronize()\n");
  }
}

inline unsigned linear_thread() {
  return thread_index.x + block_dim.x * (thread_index.y + block_dim.y * thread_index.z);
}

// Where a kernel launched early waits for the kernels before it: here, every thread must.
inline void grid_dependency_wait() { waited[linear_thread()] = 1; }

inline void trigger_dependents() {
  if (!waited[linear_thread()] && dependency_errors++ < 10) {
    std::fprintf(stderr, "emulated block: a thread let the next kernel launch before it waited for the previous\n");
  }
}

// Fills a __shared__ variable with 0xff bytes (NaN as float or double) the first time a
// thread of the running block reaches its declaration (the test's source rewrite adds the
// call): on a GPU shared memory starts with whatever the last block left.
inline void poison(void* shared, size_t bytes) {
  static std::vector<std::pair<void*, long long>> seen;  // (variable, block that poisoned it)
  auto entry = std::find_if(seen.begin(), seen.end(), [&](const auto& e) { return e.first == shared; });
  if (entry == seen.end()) entry = seen.insert(seen.end(), {shared, 0});
  if (entry->second == block_serial) return;
  entry->second = block_serial;
  std::memset(shared, 0xff, bytes);
}

// __syncthreads(): this fiber waits until every live thread of the block has arrived.
inline void barrier(int line) {
  if (!waited[linear_thread()] && dependency_errors++ < 10) {
    std::fprintf(stderr, "emulated block: a thread reached the barrier of line %d before it waited for the previous "
                 "kernel\n", line);
  }
  if (barrier_line == 0) {
    barrier_line = line;
  } else if (barrier_line != line && barrier_errors++ < 10) {
    std::fprintf(stderr, "emulated block: threads wait at different barriers (lines %d and %d)\n", barrier_line,
                 line);
  }
  emulation_switch_stack(&current->stack_pointer, scheduler);
}

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;

  void operator()(Params... params) const {
    ++launches;
    const unsigned long long threads = 1ull * block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 ||
        threads == 0 || threads > 1024) {
      std::fprintf(stderr, "emulated launch: invalid configuration grid (%u, %u, %u) block (%u, %u, %u)\n", grid.x,
                   grid.y, grid.z, block.x, block.y, block.z);
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    static const Launch* self;
    static std::tuple<Params...>* args;
    std::tuple<Params...> stored(params...);
    self = this;
    args = &stored;
    grid_dim = grid;
    block_dim = block;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          block_index = dim3(x, y, z);
          run_block(block, [] { std::apply(self->kernel, *args); });
        }
      }
    }
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t, cudaStream_t) {
  return {kernel, grid, block};
}

}  // namespace emulation

inline void cudaGridDependencySynchronize() { ::emulation::grid_dependency_wait(); }
inline void cudaTriggerProgrammaticLaunchCompletion() { ::emulation::trigger_dependents(); }

enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization = 6 };
union cudaLaunchAttributeValue {
  int programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id != cudaLaunchAttributeProgrammaticStreamSerialization) return cudaErrorInvalidValue;
    if (a.val.programmaticStreamSerializationAllowed) ++::emulation::programmatic_launches;
  }
  ::emulation::launch(kernel, config->gridDim, config->blockDim, config->dynamicSmemBytes,
                      config->stream)(std::forward<Args>(args)...);
  return cudaGetLastError();
}

#define __syncthreads() ::emulation::barrier(__LINE__)

// References rather than macros: a macro would also rewrite members of these names
// (cudaLaunchConfig_t::gridDim).
inline const dim3& threadIdx = ::emulation::thread_index;
inline const dim3& blockIdx = ::emulation::block_index;
inline const dim3& blockDim = ::emulation::block_dim;
inline const dim3& gridDim = ::emulation::grid_dim;
