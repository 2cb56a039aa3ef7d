// A CPU emulator for the subset of CUDA that python/besa_rs/ste/csrc/ste_mask_kernel.cu uses,
// so that the kernels' logic (indexing, tiling, shared memory, barriers, warp shuffles) is
// tested on machines without a GPU. Not a general CUDA implementation.
//
// Every CUDA thread of a block is a coroutine (ucontext) on one OS thread. A block's threads
// run one after another until each reaches a barrier (__syncthreads for the block,
// __shfl_down_sync for its warp), which makes the emulation deterministic for a given
// schedule. The order in which threads are resumed is shuffled with a seed, so a kernel whose
// result depends on the interleaving (a race) gives different results for different seeds.
// Misuse that is undefined behaviour on a GPU is reported as an error instead of hanging:
// a barrier that not every thread of the block (or warp) reaches, a launch configuration over
// the hardware limits, dynamic shared memory over 48 KiB without the kernel's opt-in
// (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n)) or over the
// device's opt-in maximum (227 KiB as on Hopper; tests lower it with emu_set_optin_shared to
// exercise the multi-tile paths on short rows).
#pragma once

#include <ucontext.h>

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

// ---- language extensions --------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaSharedCarveout { cudaSharedmemCarveoutMaxShared = 100 };

// ---- 16-bit float types (storage + conversion to float only) ---------------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t man = h.bits & 0x3ffu;
  uint32_t out;
  if (exp == 0x1f) {
    out = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    out = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    out = sign;
  } else {  // subnormal: normalise
    int e = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --e;
    }
    out = sign | (static_cast<uint32_t>(e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t out = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

// ---- the emulated machine --------------------------------------------------------------------
namespace emu {

constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // Hopper's opt-in maximum per block
constexpr size_t kStack = 64 * 1024;

struct Thread {
  ucontext_t ctx{};
  std::vector<char> stack;
  dim3 idx;
  int state = 0;  // 0 runnable, 1 at block barrier, 2 at warp barrier, 3 done
};

struct Machine {
  std::vector<Thread> threads;
  ucontext_t sched{};
  int current = -1;
  std::string error;
  uint64_t seed = 0;
  int launches = 0;
  // warp shuffle exchange slots, one 8-byte value per thread
  std::vector<uint64_t> xch;
  // what cudaDeviceGetAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin) reports
  size_t optin_shared = kMaxDynamicShared;
  // per kernel: cudaFuncAttributeMaxDynamicSharedMemorySize as set by cudaFuncSetAttribute
  std::map<const void*, size_t> max_dynamic_shared;
  int64_t last_smem = 0;  // dynamic shared memory of the latest launch (for tests)
};

inline Machine& machine() {
  static Machine m;
  return m;
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

}  // namespace emu

inline dim3 gridDim, blockDim, blockIdx;
inline dim3 threadIdx;  // set before each switch into a coroutine

namespace emu {

// Suspends the running thread; the scheduler sets threadIdx again before resuming it.
inline void yield_to_scheduler() {
  Machine& m = machine();
  swapcontext(&m.threads[m.current].ctx, &m.sched);
}

}  // namespace emu

inline void __syncthreads() {
  emu::Machine& m = emu::machine();
  m.threads[m.current].state = 1;
  emu::yield_to_scheduler();
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  static_assert(sizeof(T) <= 8, "emulated shuffle of values up to 8 bytes");
  emu::Machine& m = emu::machine();
  if (mask != 0xffffffffu) m.error = "__shfl_down_sync with a partial mask is not emulated";
  const int me = m.current;
  uint64_t slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  m.xch[me] = slot;
  m.threads[me].state = 2;  // wait until the whole warp has published its value
  emu::yield_to_scheduler();
  const int lane = static_cast<int>(threadIdx.x) & 31;
  T out = v;
  if (lane + static_cast<int>(delta) < 32) {
    std::memcpy(&out, &m.xch[me + static_cast<int>(delta)], sizeof(T));
  }
  m.threads[me].state = 2;  // and until every lane has read before the slots are reused
  emu::yield_to_scheduler();
  return out;
}

inline cudaError_t cudaGetLastError() {
  cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin || dev != 0) return cudaErrorInvalidValue;
  *value = static_cast<int>(emu::machine().optin_shared);
  return cudaSuccess;
}

template <typename T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  emu::Machine& m = emu::machine();
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) {
    return value >= -1 && value <= 100 ? cudaSuccess : cudaErrorInvalidValue;
  }
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > m.optin_shared) {
    return cudaErrorInvalidValue;
  }
  m.max_dynamic_shared[reinterpret_cast<const void*>(entry)] = static_cast<size_t>(value);
  return cudaSuccess;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    default:
      return "unspecified launch failure";
  }
}

namespace {
// the dynamic shared memory of the block being run (`extern __shared__ ... smem_raw[]`)
alignas(16) unsigned char smem_raw[emu::kMaxDynamicShared];
}  // namespace

namespace emu {

struct Body {
  virtual void run() = 0;
  virtual ~Body() = default;
};

inline Body*& current_body() {
  static Body* b = nullptr;
  return b;
}

// Stops the running thread for good (a device-side fault): the launch reports `msg`.
inline void fault(const char* msg) {
  Machine& m = machine();
  m.error = msg;
  m.threads[m.current].state = 3;
  swapcontext(&m.threads[m.current].ctx, &m.sched);  // never resumed: the launch is aborted
}

inline void trampoline() {
  current_body()->run();
  Machine& m = machine();
  m.threads[m.current].state = 3;
  swapcontext(&m.threads[m.current].ctx, &m.sched);
}

// Runs one block: resumes threads in a seeded random order until all are done. A barrier opens
// when every thread of its scope waits on it; a thread that finished while others wait is an
// error (divergent barrier).
inline void run_block(Body& body, std::mt19937_64& rng) {
  Machine& m = machine();
  const int n = static_cast<int>(m.threads.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = m.threads[i];
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.data();
    t.ctx.uc_stack.ss_size = t.stack.size();
    t.ctx.uc_link = &m.sched;
    makecontext(&t.ctx, trampoline, 0);
    t.state = 0;
  }
  current_body() = &body;
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (int i : order) {
      if (m.threads[i].state != 0) continue;
      m.current = i;
      threadIdx = m.threads[i].idx;
      swapcontext(&m.sched, &m.threads[i].ctx);
      ran = true;
    }
    if (!m.error.empty()) return;
    if (ran) continue;
    // nobody runnable: open the barriers whose scope is complete
    int done = 0, at_block = 0;
    for (const Thread& t : m.threads) {
      done += t.state == 3;
      at_block += t.state == 1;
    }
    if (done == n) return;
    if (at_block == n) {
      for (Thread& t : m.threads) t.state = 0;
      continue;
    }
    bool opened = false;
    for (int w = 0; w * 32 < n; ++w) {
      const int lo = w * 32, hi = std::min(n, lo + 32);
      bool all = hi - lo == 32;
      for (int i = lo; i < hi && all; ++i) all = m.threads[i].state == 2;
      if (all) {
        for (int i = lo; i < hi; ++i) m.threads[i].state = 0;
        opened = true;
      }
    }
    if (opened) continue;
    m.error = at_block ? "__syncthreads not reached by every thread of the block"
                       : "__shfl_down_sync not reached by every lane of the warp";
    return;
  }
}

template <typename F>
struct LambdaBody : Body {
  F f;
  explicit LambdaBody(F f_) : f(f_) {}
  void run() override { f(); }
};

template <typename F>
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, F&& f) {
  Machine& m = machine();
  const uint64_t per_block = uint64_t{block.x} * block.y * block.z;
  size_t smem_limit = kDefaultDynamicShared;
  const auto opted = m.max_dynamic_shared.find(kernel);
  if (opted != m.max_dynamic_shared.end()) smem_limit = std::max(smem_limit, opted->second);
  smem_limit = std::min(smem_limit, std::max(m.optin_shared, kDefaultDynamicShared));
  if (per_block == 0 || per_block > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 ||
      smem > smem_limit) {
    return cudaErrorInvalidConfiguration;
  }
  m.last_smem = static_cast<int64_t>(smem);
  m.threads.resize(per_block);  // stacks are kept from launch to launch
  m.xch.assign(per_block, 0);
  int i = 0;
  for (unsigned z = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x, ++i) {
        m.threads[i].idx = dim3(x, y, z);
        if (m.threads[i].stack.empty()) m.threads[i].stack.resize(kStack);
      }
  m.error.clear();
  std::mt19937_64 rng(m.seed + 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(++m.launches));
  gridDim = grid;
  blockDim = block;
  LambdaBody<F> body(f);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        std::memset(smem_raw, 0xA5, smem);  // uninitialised shared memory
        run_block(body, rng);
        if (!m.error.empty()) return cudaErrorLaunchFailure;
      }
  return cudaSuccess;
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    auto k = kernel;
    auto call = [&]() { k(static_cast<P>(a)...); };
    const cudaError_t e = run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, call);
    if (e != cudaSuccess) last_error() = e;
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...)) {
  return Launch<P...>{kernel, grid, block, smem};
}

}  // namespace emu

// a misaligned 16-byte vector access faults on a GPU (and an aligned SSE move on the host):
// the thread stops there and the launch fails
#define BESA_ASSERT_ALIGNED(ptr)                                         \
  do {                                                                  \
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)                     \
      ::emu::fault("misaligned 16-byte vector access in the kernel");   \
  } while (0)

// `BESA_LAUNCH(grid, block, smem, stream, kernel<...>)(args...)` = `kernel<<<...>>>(args...)`
#define BESA_LAUNCH(grid, block, smem, stream, ...) \
  ::emu::launch(grid, block, smem, stream, __VA_ARGS__)
