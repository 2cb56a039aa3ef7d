// C entry points of the CUDA kernels compiled for the CPU emulator (see include/cuda_emu.h);
// loaded with ctypes by tests/test_ste_emu.py. Pointers are host memory.
#include "cuda_emu.h"

// the production kernels, unchanged
#include "../../python/besa_rs/ste/csrc/ste_mask_kernel.cu"

extern "C" {

void emu_set_seed(uint64_t seed) {
  emu::machine().seed = seed;
  emu::machine().launches = 0;
}

const char* emu_last_message() { return emu::machine().error.c_str(); }

int emu_select(int elem_bytes, int idx_code, const void* src, const void* ranks,
               const int64_t* n_rows, void* out, int64_t rows, int64_t cols) {
  return static_cast<int>(
      besa_ste_select(elem_bytes, idx_code, src, ranks, n_rows, out, rows, cols, nullptr));
}

int emu_bucket_sums(int scalar_code, int idx_code, int acc_double, const void* g, const void* w,
                    const void* ranks, const int64_t* t_sorted, int n_cand, void* hist,
                    int64_t rows, int64_t cols) {
  return static_cast<int>(besa_ste_bucket_sums(scalar_code, idx_code, acc_double != 0, g, w,
                                               ranks, t_sorted, n_cand, hist, rows, cols,
                                               nullptr));
}

}  // extern "C"
