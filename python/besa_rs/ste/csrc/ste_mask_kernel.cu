// Fused kernels of BESA's straight-through mask (see docs/ste_mask.md).
//
// This file deliberately includes no torch headers: it only needs the CUDA runtime, so nvcc
// compiles it in seconds. Dtype dispatch and argument checks live in ste_mask.cpp.
//
//  * prune rows:  n[r] = clamp(floor(alpha[r / k] * C), 0, C) as int64, the product and floor
//                 in alpha's dtype: the same operations as torch's
//                 floor(alpha * C).clamp_(0, C).to(int64) followed by repeat_interleave(k).
//  * select:      out[r, c] = rank[r, c] >= n[r] ? src[r, c] : +-0 (hard-masked copy; used for
//                 the forward W * hard and for the weight gradient g * hard). It moves raw bits,
//                 so one instantiation per element width serves fp16/bf16/fp32/fp64; a pruned
//                 entry keeps only its sign bit, i.e. equals src * 0 like the fallback.
//  * bucket sums: hist[r, j] = sum_{c : t_j <= rank[r, c] < t_{j-1}} g[r, c] * W[r, c]
//                 (t sorted descending, t_{-1} = C, t_D = 0), i.e. g*W summed per candidate
//                 bucket of ranks. One block per row: the products are scattered into rank
//                 order in shared memory (ranks are a permutation of the row, so no two threads
//                 write the same slot), then each bucket is a contiguous range summed by one
//                 warp with a fixed shuffle tree. No atomics: the result is deterministic.
//  * suffix:      out[g, d] = -S[g, d + 1] with S[g, j] = sum_{i >= j} h[g, i], by the same
//                 Hillis-Steele scan (same additions, same order) as the torch ops it replaces
//                 (_fallback.suffix_sums), so the logit gradient has the same bits.
//
// Summation order of the bucket sums (fixed; results are bit-identical to the first version of
// this kernel, which processed rows in tiles of `seg` ranks): a bucket's rank range is cut at
// the multiples of `seg` = (48 KiB - 8D - (D+1)*sizeof(acc) - 16) / sizeof(acc) (at least 256;
// `cols` when the row is shorter). Each piece is summed by one warp: lane l adds the products of
// ranks lo+l, lo+l+32, ... in order, starting from 0; the 32 lane sums are combined by the
// shuffle tree 16, 8, 4, 2, 1; the pieces' sums are added to the bucket's total in rank order.
// The shared-memory tile itself holds as many ranks as the device's opt-in shared memory allows
// (a whole row of up to ~58k fp32 slots on Hopper), so a row is read once; only longer rows are
// read once per tile (a tile is a multiple of `seg`, so no piece straddles two tiles).
//
// Loads and stores are 16-byte vectors where the three arrays of a row allow it: a row starts
// with up to V-1 scalar elements until the addresses are aligned, continues with V-element
// vectors and ends with the scalar remainder (V = 16 / the narrowest element size). When the
// arrays' misalignments are incompatible (views at odd offsets) every element is scalar.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// Kernels are launched through this macro so that tests/cuda_emu can compile the same file for
// its CPU emulator (which cannot parse the <<<...>>> syntax). The kernel name comes last because
// its template arguments contain commas.
#ifndef BESA_LAUNCH
#define BESA_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

// The CPU emulator (tests/cuda_emu) checks that every vector access is 16-byte aligned (on the
// host a misaligned one may pass unnoticed; a GPU faults, with a sticky error).
#ifndef BESA_ASSERT_ALIGNED
#define BESA_ASSERT_ALIGNED(ptr) ((void)0)
#endif

namespace {

constexpr int kSelectThreads = 256;
constexpr int kBucketThreads = 512;
constexpr int kSuffixThreads = 256;
// the shared-memory budget of the first version of the bucket kernel: it defines the
// summation pieces (`seg`, see above), not the tile size
constexpr int64_t kSegmentBudget = 48 * 1024;
constexpr int64_t kDefaultShared = 48 * 1024;
constexpr int kMaxDevices = 64;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// V elements of T read or written as 16-byte words (sizeof(Pack) is a multiple of 16)
template <typename T, int V>
struct __align__(16) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  BESA_ASSERT_ALIGNED(p);
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  BESA_ASSERT_ALIGNED(p);
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

template <typename A, typename B>
__host__ __device__ constexpr int vec_elems() {
  return 16 / static_cast<int>(sizeof(A) < sizeof(B) ? sizeof(A) : sizeof(B));
}

// The element shift s in [0, V) at which all `n` arrays (address, element size) are 16-byte
// aligned together, or -1. Element x of every array is then aligned when x = s (mod V).
inline int common_shift(int v, int n, const void* const* ptrs, const int* sizes) {
  for (int s = 0; s < v; ++s) {
    bool ok = true;
    for (int i = 0; i < n && ok; ++i) {
      ok = (reinterpret_cast<uintptr_t>(ptrs[i]) + static_cast<uintptr_t>(s) * sizes[i]) % 16 == 0;
    }
    if (ok) return s;
  }
  return -1;
}

// The split of row r into [0, head) scalar, `nvec` V-vectors, [tail0, cols) scalar.
struct RowSplit {
  int64_t head, nvec, tail0;
};

template <int V>
__device__ __forceinline__ RowSplit split_row(int64_t base, int64_t cols, int shift) {
  RowSplit s;
  if (shift < 0) {
    s.head = cols;
    s.nvec = 0;
    s.tail0 = cols;
    return s;
  }
  int64_t head = (static_cast<int64_t>(shift) - base % V) % V;
  if (head < 0) head += V;
  if (head > cols) head = cols;
  s.head = head;
  s.nvec = (cols - head) / V;
  s.tail0 = head + s.nvec * V;
  return s;
}

__device__ __forceinline__ float floor_of(float v) { return floorf(v); }
__device__ __forceinline__ double floor_of(double v) { return floor(v); }

template <typename acc_t>
__global__ void prune_rows_kernel(const acc_t* __restrict__ alpha, int64_t rows,
                                  int64_t rows_per_group, int64_t cols,
                                  int64_t* __restrict__ n_rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const acc_t c = static_cast<acc_t>(cols);
  acc_t x = floor_of(alpha[r / rows_per_group] * c);
  if (!(x != x)) x = x < acc_t(0) ? acc_t(0) : (x > c ? c : x);  // clamp; NaN passes through
  n_rows[r] = static_cast<int64_t>(x);
}

template <typename bits_t>
__device__ __forceinline__ bits_t select_one(bits_t v, int64_t k, int64_t n) {
  constexpr bits_t kSign = static_cast<bits_t>(bits_t(1) << (8 * sizeof(bits_t) - 1));
  return k >= n ? v : static_cast<bits_t>(v & kSign);  // src * 0 = +-0
}

template <typename bits_t, typename index_t>
__global__ void select_kernel(const bits_t* __restrict__ src, const index_t* __restrict__ ranks,
                              const int64_t* __restrict__ n_rows, bits_t* __restrict__ out,
                              int64_t rows, int64_t cols, int shift) {
  constexpr int V = vec_elems<bits_t, index_t>();
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t n = n_rows[r];
    const int64_t base = r * cols;
    const RowSplit sp = split_row<V>(base, cols, shift);
    const int64_t n_scalar = sp.head + (cols - sp.tail0);
    for (int64_t e = t0; e < n_scalar; e += stride) {
      const int64_t c = base + (e < sp.head ? e : sp.tail0 + (e - sp.head));
      out[c] = select_one(src[c], static_cast<int64_t>(ranks[c]), n);
    }
    const int64_t vbase = base + sp.head;
    for (int64_t i = t0; i < sp.nvec; i += stride) {
      const int64_t c = vbase + i * V;
      const Pack<index_t, V> k = load_pack<index_t, V>(ranks + c);
      const Pack<bits_t, V> v = load_pack<bits_t, V>(src + c);
      Pack<bits_t, V> o;
#pragma unroll
      for (int q = 0; q < V; ++q) o.v[q] = select_one(v.v[q], static_cast<int64_t>(k.v[q]), n);
      store_pack<bits_t, V>(out + c, o);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t product(scalar_t g, scalar_t w) {
  return static_cast<acc_t>(widen(g)) * static_cast<acc_t>(widen(w));
}

// buf[k - lo_t] = g*w for the pack's ranks k in [lo_t, hi_t)
template <typename acc_t, typename index_t, typename scalar_t, int V>
__device__ __forceinline__ void scatter_pack(const Pack<index_t, V>& k, const Pack<scalar_t, V>& g,
                                             const Pack<scalar_t, V>& w, int64_t lo_t,
                                             int64_t hi_t, acc_t* buf) {
#pragma unroll
  for (int q = 0; q < V; ++q) {
    const int64_t kq = static_cast<int64_t>(k.v[q]);
    if (kq >= lo_t && kq < hi_t) buf[kq - lo_t] = product<acc_t>(g.v[q], w.v[q]);
  }
}

template <typename scalar_t, typename index_t, typename acc_t>
__global__ void __launch_bounds__(kBucketThreads)
    bucket_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w,
                  const index_t* __restrict__ ranks, const int64_t* __restrict__ t_sorted,
                  int n_cand, int64_t rows, int64_t cols, int64_t seg, int64_t tile, int shift,
                  acc_t* __restrict__ hist) {
  constexpr int V = vec_elems<scalar_t, index_t>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* h = reinterpret_cast<acc_t*>(smem_raw);  // [D + 1] bucket sums of this row
  acc_t* buf = h + (n_cand + 1);                  // [tile] g*w in rank order
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int n_warps = blockDim.x >> 5;
  for (int j = tid; j <= n_cand; j += blockDim.x) h[j] = acc_t(0);
  __syncthreads();

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t base = r * cols;
    const RowSplit sp = split_row<V>(base, cols, shift);
    const int64_t n_scalar = sp.head + (cols - sp.tail0);
    const int64_t vbase = base + sp.head;
    for (int64_t lo_t = 0; lo_t < cols; lo_t += tile) {
      const int64_t hi_t = lo_t + tile < cols ? lo_t + tile : cols;
      // 1. scatter g*w of this tile's ranks into rank order
      for (int64_t e = tid; e < n_scalar; e += blockDim.x) {
        const int64_t c = base + (e < sp.head ? e : sp.tail0 + (e - sp.head));
        const int64_t k = static_cast<int64_t>(ranks[c]);
        if (k >= lo_t && k < hi_t) buf[k - lo_t] = product<acc_t>(g[c], w[c]);
      }
      // two vectors per thread and step, loaded before either is scattered (more loads in
      // flight)
      int64_t i = tid;
      for (; i + blockDim.x < sp.nvec; i += 2 * static_cast<int64_t>(blockDim.x)) {
        const int64_t c0 = vbase + i * V;
        const int64_t c1 = c0 + static_cast<int64_t>(blockDim.x) * V;
        const Pack<index_t, V> k0 = load_pack<index_t, V>(ranks + c0);
        const Pack<index_t, V> k1 = load_pack<index_t, V>(ranks + c1);
        const Pack<scalar_t, V> g0 = load_pack<scalar_t, V>(g + c0);
        const Pack<scalar_t, V> g1 = load_pack<scalar_t, V>(g + c1);
        const Pack<scalar_t, V> w0 = load_pack<scalar_t, V>(w + c0);
        const Pack<scalar_t, V> w1 = load_pack<scalar_t, V>(w + c1);
        scatter_pack<acc_t>(k0, g0, w0, lo_t, hi_t, buf);
        scatter_pack<acc_t>(k1, g1, w1, lo_t, hi_t, buf);
      }
      if (i < sp.nvec) {
        const int64_t c0 = vbase + i * V;
        const Pack<index_t, V> k0 = load_pack<index_t, V>(ranks + c0);
        const Pack<scalar_t, V> g0 = load_pack<scalar_t, V>(g + c0);
        const Pack<scalar_t, V> w0 = load_pack<scalar_t, V>(w + c0);
        scatter_pack<acc_t>(k0, g0, w0, lo_t, hi_t, buf);
      }
      __syncthreads();
      // 2. each bucket's ranks in this tile, in pieces cut at the multiples of seg
      for (int j = warp; j <= n_cand; j += n_warps) {
        int64_t lo = j < n_cand ? t_sorted[j] : 0;
        int64_t hi = j > 0 ? t_sorted[j - 1] : cols;
        lo = lo > lo_t ? lo : lo_t;
        hi = hi < hi_t ? hi : hi_t;
        acc_t total = h[j];
        // the first multiple of seg above lo (no division in the usual one-piece case)
        int64_t cut = seg >= cols ? cols : (hi > lo ? (lo / seg + 1) * seg : 0);
        for (int64_t a = lo; a < hi; cut += seg) {  // warp-uniform loop
          const int64_t b = cut < hi ? cut : hi;
          acc_t s = acc_t(0);
          const acc_t* p = buf + (a - lo_t);
          const int64_t len = b - a;
          int64_t k = lane;
#pragma unroll 4
          for (; k < len; k += 32) s += p[k];
          s = warp_sum(s);
          total += s;
          a = b;
        }
        if (lane == 0) h[j] = total;
      }
      __syncthreads();
    }
    for (int j = tid; j <= n_cand; j += blockDim.x) {
      hist[r * (n_cand + 1) + j] = h[j];
      h[j] = acc_t(0);
    }
    __syncthreads();
  }
}

// out[g, d] = -(sum_{i > d} h[g, i]) for d < n - 1, by the Hillis-Steele scan of
// _fallback.suffix_sums: S <- h; for shift = 1, 2, 4, ... < n: S[j] <- S[j] + S[j + shift]
// for j < n - shift (all at once).
template <typename acc_t>
__global__ void suffix_kernel(const acc_t* __restrict__ h, int64_t groups, int n,
                              acc_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* s = reinterpret_cast<acc_t*>(smem_raw);  // [n]
  acc_t* t = s + n;                                // [n]
  for (int64_t gi = blockIdx.x; gi < groups; gi += gridDim.x) {
    for (int j = threadIdx.x; j < n; j += blockDim.x) s[j] = h[gi * n + j];
    __syncthreads();
    for (int shift = 1; shift < n; shift *= 2) {
      for (int j = threadIdx.x; j < n; j += blockDim.x) {
        t[j] = j < n - shift ? s[j] + s[j + shift] : s[j];
      }
      __syncthreads();
      acc_t* u = s;
      s = t;
      t = u;
    }
    for (int j = threadIdx.x; j < n - 1; j += blockDim.x) out[gi * (n - 1) + j] = -s[j + 1];
    __syncthreads();
  }
}

// -------------------------------------------------------------------------------------------
// launchers

inline int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) dev = 0;
  return dev;
}

// the device's opt-in shared memory per block (227 KiB on Hopper)
inline int64_t optin_shared(int dev) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      v < kDefaultShared) {
    return kDefaultShared;
  }
  return v;
}

template <typename bits_t, typename index_t>
cudaError_t select_launch(const void* src, const void* ranks, const int64_t* n_rows, void* out,
                          int64_t rows, int64_t cols, cudaStream_t stream) {
  constexpr int V = vec_elems<bits_t, index_t>();
  const void* ptrs[3] = {src, ranks, out};
  const int sizes[3] = {static_cast<int>(sizeof(bits_t)), static_cast<int>(sizeof(index_t)),
                        static_cast<int>(sizeof(bits_t))};
  const int shift = common_shift(V, 3, ptrs, sizes);
  // threads per row: one per vector (the scalar head and tail go to the first threads)
  const int64_t work = shift < 0 ? cols : (cols / V > 2 * V ? cols / V : 2 * V);
  int64_t gx = (work + kSelectThreads - 1) / kSelectThreads;
  if (gx < 1) gx = 1;
  if (gx > 1024) gx = 1024;
  const int64_t gy = rows < 65535 ? rows : 65535;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  BESA_LAUNCH(grid, kSelectThreads, 0, stream, select_kernel<bits_t, index_t>)(
      static_cast<const bits_t*>(src), static_cast<const index_t*>(ranks), n_rows,
      static_cast<bits_t*>(out), rows, cols, shift);
  return cudaGetLastError();
}

template <typename bits_t>
cudaError_t select_idx(int idx_code, const void* src, const void* ranks, const int64_t* n_rows,
                       void* out, int64_t rows, int64_t cols, cudaStream_t stream) {
  switch (idx_code) {
    case 0:
      return select_launch<bits_t, int16_t>(src, ranks, n_rows, out, rows, cols, stream);
    case 1:
      return select_launch<bits_t, int32_t>(src, ranks, n_rows, out, rows, cols, stream);
    case 2:
      return select_launch<bits_t, int64_t>(src, ranks, n_rows, out, rows, cols, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// Lets `kernel` use `smem` bytes of dynamic shared memory: above 48 KiB it needs an opt-in,
// which is set to the device's maximum when a launch first needs more than was set before
// (`allowed[dev]`, per kernel and device).
template <typename K>
cudaError_t allow_shared(K* kernel, int64_t smem, int dev, int64_t* allowed) {
  if (smem <= kDefaultShared || smem <= allowed[dev]) return cudaSuccess;
  const int64_t most = optin_shared(dev);
  if (smem > most) return cudaErrorInvalidConfiguration;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(most));
  if (e != cudaSuccess) return e;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           static_cast<int>(cudaSharedmemCarveoutMaxShared));
  if (e != cudaSuccess) return e;
  allowed[dev] = most;
  return cudaSuccess;
}

template <typename scalar_t, typename index_t, typename acc_t>
cudaError_t bucket_launch(const void* g, const void* w, const void* ranks,
                          const int64_t* t_sorted, int n_cand, void* hist, int64_t rows,
                          int64_t cols, cudaStream_t stream) {
  constexpr int64_t A = static_cast<int64_t>(sizeof(acc_t));
  // the summation pieces (see the top of the file)
  const int64_t legacy_fixed = static_cast<int64_t>(n_cand) * 8 + (n_cand + 1) * A + 16;
  int64_t seg = (kSegmentBudget - legacy_fixed) / A;
  if (seg < 256) return cudaErrorInvalidConfiguration;  // absurdly many candidates
  if (seg > cols) seg = cols;
  // the tile: the whole row if it fits in the opt-in shared memory, else a multiple of seg
  const int dev = current_device();
  const int64_t fixed = (n_cand + 1) * A;
  int64_t tile = (optin_shared(dev) - fixed) / A;
  if (tile >= cols) {
    tile = cols;
  } else {
    tile = tile / seg * seg;
  }
  if (tile < seg) tile = seg;  // (cannot happen: seg fits in 48 KiB)
  const int64_t smem = fixed + tile * A;
  static int64_t opted_in[kMaxDevices] = {};
  auto* kernel = bucket_kernel<scalar_t, index_t, acc_t>;
  const cudaError_t e = allow_shared(kernel, smem, dev, opted_in);
  if (e != cudaSuccess) return e;
  constexpr int V = vec_elems<scalar_t, index_t>();
  const void* ptrs[3] = {g, w, ranks};
  const int sizes[3] = {static_cast<int>(sizeof(scalar_t)), static_cast<int>(sizeof(scalar_t)),
                        static_cast<int>(sizeof(index_t))};
  const int shift = common_shift(V, 3, ptrs, sizes);
  const int64_t blocks = rows < (int64_t{1} << 30) ? rows : (int64_t{1} << 30);
  BESA_LAUNCH(static_cast<unsigned>(blocks), kBucketThreads, static_cast<size_t>(smem), stream,
              bucket_kernel<scalar_t, index_t, acc_t>)(
      static_cast<const scalar_t*>(g), static_cast<const scalar_t*>(w),
      static_cast<const index_t*>(ranks), t_sorted, n_cand, rows, cols, seg, tile, shift,
      static_cast<acc_t*>(hist));
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t bucket_idx(int idx_code, const void* g, const void* w, const void* ranks,
                       const int64_t* t_sorted, int n_cand, void* hist, int64_t rows,
                       int64_t cols, cudaStream_t stream) {
  switch (idx_code) {
    case 0:
      return bucket_launch<scalar_t, int16_t, acc_t>(g, w, ranks, t_sorted, n_cand, hist, rows,
                                                     cols, stream);
    case 1:
      return bucket_launch<scalar_t, int32_t, acc_t>(g, w, ranks, t_sorted, n_cand, hist, rows,
                                                     cols, stream);
    case 2:
      return bucket_launch<scalar_t, int64_t, acc_t>(g, w, ranks, t_sorted, n_cand, hist, rows,
                                                     cols, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename scalar_t>
cudaError_t bucket_acc(bool acc_double, int idx_code, const void* g, const void* w,
                       const void* ranks, const int64_t* t_sorted, int n_cand, void* hist,
                       int64_t rows, int64_t cols, cudaStream_t stream) {
  if (acc_double) {
    return bucket_idx<scalar_t, double>(idx_code, g, w, ranks, t_sorted, n_cand, hist, rows, cols,
                                        stream);
  }
  return bucket_idx<scalar_t, float>(idx_code, g, w, ranks, t_sorted, n_cand, hist, rows, cols,
                                     stream);
}

template <typename acc_t>
cudaError_t suffix_launch(const void* h, int64_t groups, int n, void* out, cudaStream_t stream) {
  if (n < 1) return cudaErrorInvalidValue;
  const int64_t smem = 2 * static_cast<int64_t>(n) * static_cast<int64_t>(sizeof(acc_t));
  const int dev = current_device();
  if (smem > optin_shared(dev)) return cudaErrorInvalidConfiguration;
  static int64_t opted_in[kMaxDevices] = {};
  auto* kernel = suffix_kernel<acc_t>;
  const cudaError_t e = allow_shared(kernel, smem, dev, opted_in);
  if (e != cudaSuccess) return e;
  const int64_t blocks = groups < (int64_t{1} << 30) ? groups : (int64_t{1} << 30);
  BESA_LAUNCH(static_cast<unsigned>(blocks), kSuffixThreads, static_cast<size_t>(smem), stream,
              suffix_kernel<acc_t>)(static_cast<const acc_t*>(h), groups, n,
                                    static_cast<acc_t*>(out));
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t prune_rows_launch(const void* alpha, int64_t rows, int64_t rows_per_group,
                              int64_t cols, int64_t* n_rows, cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = (rows + threads - 1) / threads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  BESA_LAUNCH(static_cast<unsigned>(blocks), threads, 0, stream, prune_rows_kernel<acc_t>)(
      static_cast<const acc_t*>(alpha), rows, rows_per_group, cols, n_rows);
  return cudaGetLastError();
}

}  // namespace

// element width in bytes: 2 (fp16/bf16), 4 (fp32), 8 (fp64); idx_code 0/1/2 = int16/32/64
cudaError_t besa_ste_select(int elem_bytes, int idx_code, const void* src, const void* ranks,
                            const int64_t* n_rows, void* out, int64_t rows, int64_t cols,
                            cudaStream_t stream) {
  switch (elem_bytes) {
    case 2:
      return select_idx<uint16_t>(idx_code, src, ranks, n_rows, out, rows, cols, stream);
    case 4:
      return select_idx<uint32_t>(idx_code, src, ranks, n_rows, out, rows, cols, stream);
    case 8:
      return select_idx<uint64_t>(idx_code, src, ranks, n_rows, out, rows, cols, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// scalar_code 0/1/2/3 = fp32/fp64/fp16/bf16; hist is float (or double if acc_double), [R, D+1]
cudaError_t besa_ste_bucket_sums(int scalar_code, int idx_code, bool acc_double, const void* g,
                                 const void* w, const void* ranks, const int64_t* t_sorted,
                                 int n_cand, void* hist, int64_t rows, int64_t cols,
                                 cudaStream_t stream) {
  switch (scalar_code) {
    case 0:
      return bucket_acc<float>(acc_double, idx_code, g, w, ranks, t_sorted, n_cand, hist, rows,
                               cols, stream);
    case 1:
      return bucket_acc<double>(acc_double, idx_code, g, w, ranks, t_sorted, n_cand, hist, rows,
                                cols, stream);
    case 2:
      return bucket_acc<__half>(acc_double, idx_code, g, w, ranks, t_sorted, n_cand, hist, rows,
                                cols, stream);
    case 3:
      return bucket_acc<__nv_bfloat16>(acc_double, idx_code, g, w, ranks, t_sorted, n_cand, hist,
                                       rows, cols, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// h [G, n] (float, or double if acc_double) -> out [G, n - 1]: out[g, d] = -sum_{i > d} h[g, i]
cudaError_t besa_ste_neg_suffix(bool acc_double, const void* h, int64_t groups, int n, void* out,
                                cudaStream_t stream) {
  if (acc_double) return suffix_launch<double>(h, groups, n, out, stream);
  return suffix_launch<float>(h, groups, n, out, stream);
}

// alpha [R / rows_per_group] (float, or double if alpha_double) -> n_rows [R] int64
cudaError_t besa_ste_prune_rows(bool alpha_double, const void* alpha, int64_t rows,
                                int64_t rows_per_group, int64_t cols, int64_t* n_rows,
                                cudaStream_t stream) {
  if (alpha_double) {
    return prune_rows_launch<double>(alpha, rows, rows_per_group, cols, n_rows, stream);
  }
  return prune_rows_launch<float>(alpha, rows, rows_per_group, cols, n_rows, stream);
}
