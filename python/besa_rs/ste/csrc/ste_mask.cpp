// Torch bindings of the fused straight-through mask kernels (ste_mask_kernel.cu).
//
// Registered as torch operators (torch.ops.<TORCH_EXTENSION_NAME>.forward / .backward) with
// TORCH_LIBRARY rather than as a pybind11 module: the light ATen headers compile in ~15 s
// instead of ~80 s for <torch/extension.h> on a 2-core machine.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <tuple>

cudaError_t besa_ste_select(int elem_bytes, int idx_code, const void* src, const void* ranks,
                            const int64_t* n_rows, void* out, int64_t rows, int64_t cols,
                            cudaStream_t stream);
cudaError_t besa_ste_bucket_sums(int scalar_code, int idx_code, bool acc_double, const void* g,
                                 const void* w, const void* ranks, const int64_t* t_sorted,
                                 int n_cand, void* hist, int64_t rows, int64_t cols,
                                 cudaStream_t stream);
cudaError_t besa_ste_neg_suffix(bool acc_double, const void* h, int64_t groups, int n, void* out,
                                cudaStream_t stream);
cudaError_t besa_ste_prune_rows(bool alpha_double, const void* alpha, int64_t rows,
                                int64_t rows_per_group, int64_t cols, int64_t* n_rows,
                                cudaStream_t stream);

namespace {

int idx_code(const at::Tensor& ranks) {
  switch (ranks.scalar_type()) {
    case at::kShort:
      return 0;
    case at::kInt:
      return 1;
    case at::kLong:
      return 2;
    default:
      TORCH_CHECK(false, "ste_mask: ranks must be int16/int32/int64, got ", ranks.scalar_type());
  }
}

int scalar_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kDouble:
      return 1;
    case at::kHalf:
      return 2;
    case at::kBFloat16:
      return 3;
    default:
      TORCH_CHECK(false, "ste_mask: weight must be fp16/bf16/fp32/fp64, got ", t.scalar_type());
  }
}

void check_2d(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "ste_mask: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, "ste_mask: ", name, " must be 2-D");
  TORCH_CHECK(t.is_contiguous(), "ste_mask: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == like.sizes(), "ste_mask: ", name, " shape mismatch");
  TORCH_CHECK(t.device() == like.device(), "ste_mask: ", name, " on another device");
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ste_mask: ", what, " failed: ", cudaGetErrorString(err));
}

at::Tensor row_counts(const at::Tensor& n_rows, const at::Tensor& ranks) {
  TORCH_CHECK(n_rows.dim() == 1 && n_rows.size(0) == ranks.size(0),
              "ste_mask: n_rows must be [R]");
  return n_rows.to(ranks.device(), at::kLong).contiguous();
}

// src * (ranks >= n_rows[:, None]), for the forward (src = W) and the weight gradient (src = g).
at::Tensor hard_select(const at::Tensor& src, const at::Tensor& ranks, const at::Tensor& n_rows) {
  check_2d(ranks, "ranks", ranks);
  check_2d(src, "weight", ranks);
  scalar_code(src);
  const at::cuda::CUDAGuard guard(src.device());
  at::Tensor n = row_counts(n_rows, ranks);
  at::Tensor out = at::empty_like(src);
  check_cuda(besa_ste_select(static_cast<int>(src.element_size()), idx_code(ranks),
                             src.data_ptr(), ranks.data_ptr(), n.data_ptr<int64_t>(),
                             out.data_ptr(), src.size(0), src.size(1),
                             c10::cuda::getCurrentCUDAStream()),
             "select kernel");
  return out;
}

// Rows pruned: floor(alpha[g] * cols) clamped to [0, cols] (in alpha's dtype) for every row of
// group g, int64 [rows]; the same values as torch's prune_counts(alpha).repeat_interleave(k).
at::Tensor prune_rows(const at::Tensor& alpha, int64_t rows, int64_t cols) {
  TORCH_CHECK(alpha.is_cuda(), "ste_mask: alpha must be a CUDA tensor");
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) >= 1 && rows % alpha.size(0) == 0,
              "ste_mask: alpha must be [G] with G dividing the rows");
  TORCH_CHECK(alpha.scalar_type() == at::kFloat || alpha.scalar_type() == at::kDouble,
              "ste_mask: alpha must be fp32 or fp64, got ", alpha.scalar_type());
  const at::cuda::CUDAGuard guard(alpha.device());
  at::Tensor a = alpha.contiguous();
  at::Tensor n = at::empty({rows}, a.options().dtype(at::kLong));
  check_cuda(besa_ste_prune_rows(a.scalar_type() == at::kDouble, a.data_ptr(), rows,
                                 rows / a.size(0), cols, n.data_ptr<int64_t>(),
                                 c10::cuda::getCurrentCUDAStream()),
             "prune-count kernel");
  return n;
}

// Gradient of the loss w.r.t. the candidate weights (candidates sorted by descending prune
// count), [G, D] in fp32 (fp64 if acc_double): per-row bucket sums H of grad * weight, summed
// over the rows of each group (torch's sum, as the PyTorch side did before), then
// -sum_{j > d} H[g, j] by the deterministic suffix scan; and, if asked, grad * hard.
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& weight,
                                            const at::Tensor& ranks, const at::Tensor& n_rows,
                                            const at::Tensor& t_sorted, int64_t rows_per_group,
                                            bool need_weight_grad, bool acc_double) {
  check_2d(ranks, "ranks", ranks);
  check_2d(weight, "weight", ranks);
  check_2d(grad, "grad", ranks);
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), "ste_mask: grad dtype ",
              grad.scalar_type(), " != weight dtype ", weight.scalar_type());
  TORCH_CHECK(t_sorted.dim() == 1 && t_sorted.size(0) >= 1, "ste_mask: t_sorted must be [D]");
  const int64_t rows = ranks.size(0);
  TORCH_CHECK(rows_per_group >= 1 && rows % rows_per_group == 0,
              "ste_mask: rows_per_group must divide the rows");
  const at::cuda::CUDAGuard guard(weight.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor t = t_sorted.to(weight.device(), at::kLong).contiguous();
  const int64_t n_cand = t.size(0);
  at::Tensor hist =
      at::empty({rows, n_cand + 1}, weight.options().dtype(acc_double ? at::kDouble : at::kFloat));
  check_cuda(besa_ste_bucket_sums(scalar_code(weight), idx_code(ranks), acc_double,
                                  grad.data_ptr(), weight.data_ptr(), ranks.data_ptr(),
                                  t.data_ptr<int64_t>(), static_cast<int>(n_cand),
                                  hist.data_ptr(), rows, ranks.size(1), stream),
             "bucket-sum kernel");
  const int64_t groups = rows / rows_per_group;
  if (rows_per_group > 1) {
    hist = at::sum(hist.view({groups, rows_per_group, n_cand + 1}), {1}).contiguous();
  }
  at::Tensor grad_w = at::empty({groups, n_cand}, hist.options());
  check_cuda(besa_ste_neg_suffix(acc_double, hist.data_ptr(), groups,
                                 static_cast<int>(n_cand + 1), grad_w.data_ptr(), stream),
             "suffix-sum kernel");
  at::Tensor grad_weight = need_weight_grad ? hard_select(grad, ranks, n_rows)
                                            : at::empty({0}, grad.options());
  return {grad_w, grad_weight};
}

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  // W * (ranks >= n_rows[:, None]); a pruned entry is W * 0 (keeps the sign bit)
  m.def("forward(Tensor weight, Tensor ranks, Tensor n_rows) -> Tensor", &hard_select);
  // rows pruned per row, int64 [rows], from the expected sparsity alpha [G]
  m.def("prune_rows(Tensor alpha, int rows, int cols) -> Tensor", &prune_rows);
  // gradient w.r.t. the sorted candidate weights ([G, D]) and grad * hard (empty unless
  // need_weight_grad)
  m.def(
      "backward(Tensor grad, Tensor weight, Tensor ranks, Tensor n_rows, Tensor t_sorted, "
      "int rows_per_group, bool need_weight_grad, bool acc_double) -> (Tensor, Tensor)",
      &backward);
}
