// CUDA implementations of the merging ops: cuBLAS GEMMs around the hand-written kernels of
// kernels.cu. No op synchronizes with the host, so all of them can be captured in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "blas.h"
#include "kernels.h"

namespace twinmerge::cuda {
namespace {

at::TensorOptions opmath_options(const at::Tensor& t) {
  return t.options().dtype(opmath_type(t.scalar_type()));
}

at::Tensor reconstruct_delta(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V) {
  const auto [batch, m, n, r] = check_reconstruct_delta(U, S, V);
  const c10::cuda::CUDAGuard guard(U.device());
  auto out_sizes = U.sizes().vec();
  out_sizes.back() = n;
  auto out = at::empty(out_sizes, U.options());
  if (out.numel() == 0) return out;
  if (r == 0) return out.zero_();
  const auto coef = S.reshape({batch, r}).to(opmath_options(U)).contiguous();
  const auto U3 = U.reshape({batch, m, r}).contiguous();
  auto Us = at::empty_like(U3);
  launch_scale_columns(U3, Us, coef, m);
  gemm(false, true, m, n, r, Us, V.reshape({batch, n, r}).contiguous(), 0.0, out, batch);
  return out;
}

void lowrank_merge_(at::Tensor& out, const at::Tensor& base, const at::Tensor& U,
                    const at::Tensor& S, const at::Tensor& V, at::IntArrayRef ranks,
                    const at::Tensor& weights) {
  const auto [L, m, n, K, offsets] = check_lowrank_merge(out, base, U, S, V, ranks, weights);
  const c10::cuda::CUDAGuard guard(out.device());
  if (out.numel() == 0) return;
  if (out.data_ptr() != base.data_ptr()) out.copy_(base);
  if (K == 0) return;
  auto coef = at::empty({L, K}, opmath_options(out));
  launch_mixing_coefficients(weights.to(coef.options()).contiguous(), 0,
                             S.reshape({L, K}).to(coef.options()).contiguous(), K, offsets, coef);
  // The diagonal scales the factor with fewer rows; the GEMM then adds into `out` (beta = 1),
  // which reads base once and writes the result once.
  auto U3 = U.reshape({L, m, K}).contiguous();
  auto V3 = V.reshape({L, n, K}).contiguous();
  if (m <= n) {
    auto scaled = at::empty_like(U3);
    launch_scale_columns(U3, scaled, coef, m);
    U3 = scaled;
  } else {
    auto scaled = at::empty_like(V3);
    launch_scale_columns(V3, scaled, coef, n);
    V3 = scaled;
  }
  gemm(false, true, m, n, K, U3, V3, 1.0, out, L);
}

void dense_merge_(at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                  const at::Tensor& weights) {
  check_dense_merge(out, base, deltas, weights);
  const c10::cuda::CUDAGuard guard(out.device());
  launch_dense_merge(out, base.contiguous(), deltas.contiguous(),
                     weights.to(opmath_options(out)).contiguous());
}

at::Tensor lowrank_mix_linear(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& U,
                              const at::Tensor& S, const at::Tensor& V, at::IntArrayRef ranks,
                              const at::Tensor& row_weights) {
  const auto [B, rows, m, n, K, offsets] =
      check_lowrank_mix_linear(x, weight, bias, U, S, V, ranks, row_weights);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = m;
  auto y = at::empty({rows, m}, x.options());
  if (y.numel() == 0) return y.view(out_sizes);
  if (bias.has_value()) {
    y.copy_(bias->unsqueeze(0).expand({rows, m}));
  } else if (n == 0) {
    y.zero_();
  }
  if (n == 0) return y.view(out_sizes);  // x has no features: y = b and x V = 0.
  const auto x2 = x.reshape({rows, n}).contiguous();
  gemm(false, true, rows, m, n, x2, weight.contiguous(), bias.has_value() ? 1.0 : 0.0, y);
  if (K > 0) {
    // h = x V in the accumulation dtype, scaled per row by its batch entry's coefficients,
    // rounded once to the storage dtype, then y += h U^T.
    auto h = at::empty({rows, K}, opmath_options(x));
    gemm(false, false, rows, K, n, x2, V.contiguous(), 0.0, h);
    auto coef = at::empty({B, K}, h.options());
    launch_mixing_coefficients(row_weights.to(h.options()).contiguous(), row_weights.size(1),
                               S.to(h.options()).contiguous(), 0, offsets, coef);
    auto scaled = at::empty({rows, K}, x.options());
    launch_scale_columns(h, scaled, coef, rows / B);
    gemm(false, true, rows, m, K, scaled, U.contiguous(), 1.0, y);
  }
  return y.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(twinmerge, CUDA, m) {
  m.impl("reconstruct_delta", &reconstruct_delta);
  m.impl("lowrank_merge_", &lowrank_merge_);
  m.impl("dense_merge_", &dense_merge_);
  m.impl("lowrank_mix_linear", &lowrank_mix_linear);
}

}  // namespace twinmerge::cuda
