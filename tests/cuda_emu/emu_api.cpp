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

// what the emulated device reports as its opt-in shared memory per block (0: Hopper's 227 KiB)
void emu_set_optin_shared(int64_t bytes) {
  emu::machine().optin_shared =
      bytes > 0 ? static_cast<size_t>(bytes) : emu::kMaxDynamicShared;
}

int64_t emu_last_smem() { return emu::machine().last_smem; }

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

int emu_neg_suffix(int acc_double, const void* h, int64_t groups, int n, void* out) {
  return static_cast<int>(besa_ste_neg_suffix(acc_double != 0, h, groups, n, out, nullptr));
}

int emu_prune_rows(int alpha_double, const void* alpha, int64_t rows, int64_t rows_per_group,
                   int64_t cols, int64_t* n_rows) {
  return static_cast<int>(besa_ste_prune_rows(alpha_double != 0, alpha, rows, rows_per_group,
                                              cols, n_rows, nullptr));
}

}  // extern "C"
