// Fused kernels of BESA's straight-through mask (see docs/ste_mask.md).
//
// This file deliberately includes no torch headers: it only needs the CUDA runtime, so nvcc
// compiles it in seconds. Dtype dispatch and argument checks live in ste_mask.cpp.
//
//  * select:      out[r, c] = rank[r, c] >= n_rows[r] ? src[r, c] : +-0 (hard-masked copy;
//                 used for the forward W * hard and for the weight gradient g * hard). It moves
//                 raw bits, so one instantiation per element width serves fp16/bf16/fp32/fp64;
//                 a pruned entry keeps only its sign bit, i.e. equals src * 0 like the fallback.
//  * bucket sums: hist[r, j] = sum_{c : t_j <= rank[r, c] < t_{j-1}} g[r, c] * W[r, c]
//                 (t sorted descending, t_{-1} = C, t_D = 0), i.e. g*W summed per candidate
//                 bucket of ranks. One block per row: the products are scattered into rank
//                 order in shared memory (ranks are a permutation of the row, so no two threads
//                 write the same slot), then each bucket is a contiguous range summed by one
//                 warp with a fixed shuffle tree. No atomics: the result is deterministic.
//                 Rows longer than the shared-memory tile are processed in several rank tiles.

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

namespace {

constexpr int kSelectThreads = 256;
constexpr int kSelectPerThread = 4;
constexpr int kBucketThreads = 256;
constexpr int kSharedBudget = 48 * 1024;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename bits_t, typename index_t>
__global__ void select_kernel(const bits_t* __restrict__ src, const index_t* __restrict__ ranks,
                              const int64_t* __restrict__ n_rows, bits_t* __restrict__ out,
                              int64_t rows, int64_t cols) {
  constexpr bits_t kSign = static_cast<bits_t>(bits_t(1) << (8 * sizeof(bits_t) - 1));
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t n = n_rows[r];
    const int64_t base = r * cols;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t k = static_cast<int64_t>(ranks[base + c]);
      const bits_t v = src[base + c];
      out[base + c] = k >= n ? v : static_cast<bits_t>(v & kSign);  // src * 0 = +-0
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t, typename index_t, typename acc_t>
__global__ void __launch_bounds__(kBucketThreads)
    bucket_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w,
                  const index_t* __restrict__ ranks, const int64_t* __restrict__ t_sorted,
                  int n_cand, int64_t rows, int64_t cols, int64_t tile, acc_t* __restrict__ hist) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* tb = reinterpret_cast<int64_t*>(smem_raw);  // [D] prune counts, descending
  acc_t* h = reinterpret_cast<acc_t*>(tb + n_cand);     // [D + 1] bucket sums of this row
  acc_t* buf = h + (n_cand + 1);                        // [tile] g*w in rank order
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int n_warps = blockDim.x >> 5;
  for (int j = tid; j < n_cand; j += blockDim.x) tb[j] = t_sorted[j];
  for (int j = tid; j <= n_cand; j += blockDim.x) h[j] = acc_t(0);
  __syncthreads();

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t base = r * cols;
    for (int64_t lo_t = 0; lo_t < cols; lo_t += tile) {
      const int64_t hi_t = lo_t + tile < cols ? lo_t + tile : cols;
      for (int64_t c = tid; c < cols; c += blockDim.x) {
        const int64_t k = static_cast<int64_t>(ranks[base + c]);
        if (k >= lo_t && k < hi_t) {
          buf[k - lo_t] = static_cast<acc_t>(widen(g[base + c])) *
                          static_cast<acc_t>(widen(w[base + c]));
        }
      }
      __syncthreads();
      for (int j = warp; j <= n_cand; j += n_warps) {
        int64_t lo = j < n_cand ? tb[j] : 0;
        int64_t hi = j > 0 ? tb[j - 1] : cols;
        lo = lo > lo_t ? lo : lo_t;
        hi = hi < hi_t ? hi : hi_t;
        if (hi > lo) {  // warp-uniform branch
          acc_t s = acc_t(0);
          for (int64_t k = lo + lane; k < hi; k += 32) s += buf[k - lo_t];
          s = warp_sum(s);
          if (lane == 0) h[j] += s;
        }
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

template <typename bits_t>
cudaError_t select_idx(int idx_code, const void* src, const void* ranks, const int64_t* n_rows,
                       void* out, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t per_block = static_cast<int64_t>(kSelectThreads) * kSelectPerThread;
  int64_t gx = (cols + per_block - 1) / per_block;
  if (gx > 1024) gx = 1024;
  const int64_t gy = rows < 65535 ? rows : 65535;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  const auto* s = static_cast<const bits_t*>(src);
  auto* o = static_cast<bits_t*>(out);
  switch (idx_code) {
    case 0:
      BESA_LAUNCH(grid, kSelectThreads, 0, stream, select_kernel<bits_t, int16_t>)(
          s, static_cast<const int16_t*>(ranks), n_rows, o, rows, cols);
      break;
    case 1:
      BESA_LAUNCH(grid, kSelectThreads, 0, stream, select_kernel<bits_t, int32_t>)(
          s, static_cast<const int32_t*>(ranks), n_rows, o, rows, cols);
      break;
    case 2:
      BESA_LAUNCH(grid, kSelectThreads, 0, stream, select_kernel<bits_t, int64_t>)(
          s, static_cast<const int64_t*>(ranks), n_rows, o, rows, cols);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename scalar_t, typename index_t, typename acc_t>
cudaError_t bucket_launch(const void* g, const void* w, const void* ranks,
                          const int64_t* t_sorted, int n_cand, void* hist, int64_t rows,
                          int64_t cols, cudaStream_t stream) {
  const int64_t fixed = static_cast<int64_t>(n_cand) * 8 + (n_cand + 1) * sizeof(acc_t) + 16;
  int64_t tile = (kSharedBudget - fixed) / static_cast<int64_t>(sizeof(acc_t));
  if (tile < 256) return cudaErrorInvalidConfiguration;  // absurdly many candidates
  if (tile > cols) tile = cols;
  const size_t smem = static_cast<size_t>(fixed + tile * static_cast<int64_t>(sizeof(acc_t)));
  const int64_t blocks = rows < (int64_t{1} << 30) ? rows : (int64_t{1} << 30);
  BESA_LAUNCH(static_cast<unsigned>(blocks), kBucketThreads, smem, stream,
              bucket_kernel<scalar_t, index_t, acc_t>)(
      static_cast<const scalar_t*>(g), static_cast<const scalar_t*>(w),
      static_cast<const index_t*>(ranks), t_sorted, n_cand, rows, cols, tile,
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
