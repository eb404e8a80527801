// CUDA implementations of the merging ops: cuBLAS/cuBLASLt GEMMs around the one-pass scaling
// kernel of kernels.cu. No op here synchronizes with the host, so all of them can be captured
// in a CUDA graph.
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

// S for launch_scale_columns, which reads it in `like`'s dtype or the accumulation dtype: as it
// is where it already has one of them (no conversion kernel per call), else converted.
at::Tensor singular_values(const at::Tensor& S, const at::Tensor& like) {
  const auto t = S.scalar_type();
  if (t == like.scalar_type() || t == opmath_type(like.scalar_type())) return S.contiguous();
  return S.to(opmath_options(like)).contiguous();
}

at::Tensor reconstruct_delta(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V) {
  const auto [batch, m, n, r] = check_reconstruct_delta(U, S, V);
  const c10::cuda::CUDAGuard guard(U.device());
  auto out_sizes = U.sizes().vec();
  out_sizes.back() = n;
  auto out = at::empty(out_sizes, U.options());
  if (out.numel() == 0) return out;
  if (r == 0) return out.zero_();
  const auto S2 = singular_values(S.reshape({batch, r}), U);
  const auto U3 = U.reshape({batch, m, r}).contiguous();
  auto Us = at::empty_like(U3);
  launch_scale_columns(U3, Us, S2, r, nullptr, 0, ExpertOffsets{}, m);
  gemm(false, true, m, n, r, Us, V.reshape({batch, n, r}).contiguous(), 0.0, out, batch);
  return out;
}

void lowrank_merge_(at::Tensor& out, const at::Tensor& base, const at::Tensor& U,
                    const at::Tensor& S, const at::Tensor& V, at::IntArrayRef ranks,
                    const at::Tensor& weights) {
  const auto [L, m, n, K, offsets] = check_lowrank_merge(out, base, U, S, V, ranks, weights);
  const c10::cuda::CUDAGuard guard(out.device());
  if (out.numel() == 0) return;
  const bool in_place = out.data_ptr() == base.data_ptr();
  if (K == 0) {
    if (!in_place) out.copy_(base);
    return;
  }
  // The diagonal w ⊗ S scales the factor with fewer rows, in one pass; one GEMM then adds the
  // product to base: cuBLASLt's D = A B + C, which reads base once and writes out once, into a
  // separate buffer or in place alike (so both give the same bits). cuBLAS's GEMM, the fallback,
  // needs a copy of base into a separate out first.
  const auto w = weights.to(opmath_options(out)).contiguous();
  const auto S2 = singular_values(S.reshape({L, K}), out);
  auto U3 = U.reshape({L, m, K}).contiguous();
  auto V3 = V.reshape({L, n, K}).contiguous();
  auto& small = m <= n ? U3 : V3;
  auto scaled = at::empty_like(small);
  launch_scale_columns(small, scaled, S2, K, &w, 0, offsets, small.size(1));
  small = scaled;
  const auto base3 = base.reshape({L, m, n});
  auto out3 = out.view({L, m, n});
  if (gemm_lt(false, true, m, n, K, U3, V3, in_place ? out3 : base3.contiguous(), out3,
              std::nullopt, L)) {
    return;
  }
  if (!in_place) out.copy_(base);
  gemm(false, true, m, n, K, U3, V3, 1.0, out3, L);
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
  if (n == 0) {  // x has no features: y = b and x V = 0.
    bias.has_value() ? y.copy_(bias->unsqueeze(0).expand({rows, m})) : y.zero_();
    return y.view(out_sizes);
  }
  const auto x2 = x.reshape({rows, n}).contiguous();
  const auto W = weight.contiguous();
  // y = x W^T + b: the bias in cuBLASLt's epilogue, else copied into y for a GEMM with beta = 1.
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  if (!gemm_lt(false, true, rows, m, n, x2, W, std::nullopt, y, b)) {
    if (b) y.copy_(b->unsqueeze(0).expand({rows, m}));
    gemm(false, true, rows, m, n, x2, W, b ? 1.0 : 0.0, y);
  }
  if (K > 0) {
    // h = x V in the accumulation dtype, scaled per row by its batch entry's w ⊗ S and rounded
    // once to the storage dtype (in place when that is the accumulation dtype), then y += h U^T.
    auto h = at::empty({rows, K}, opmath_options(x));
    gemm(false, false, rows, K, n, x2, V.contiguous(), 0.0, h);
    const auto rw = row_weights.to(h.options()).contiguous();
    auto scaled = h.scalar_type() == x.scalar_type() ? h : at::empty({rows, K}, x.options());
    launch_scale_columns(h, scaled, singular_values(S, x), 0, &rw, rw.size(1), offsets, rows / B);
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
