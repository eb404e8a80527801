// CPU kernels of the materializing ops: reconstruct_delta, lowrank_merge_, dense_merge_.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace twinmerge::cpu {
namespace {

at::Tensor reconstruct_delta(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V) {
  const auto shape = check_reconstruct_delta(U, S, V);
  const auto opmath = opmath_type(U.scalar_type());
  auto out_sizes = U.sizes().vec();
  out_sizes.back() = shape.n;
  const auto US = U.to(opmath) * S.to(opmath).unsqueeze(-2);
  return at::matmul(US, V.to(opmath).mT()).to(U.scalar_type()).reshape(out_sizes);
}

void lowrank_merge_(at::Tensor& out, const at::Tensor& base, const at::Tensor& U,
                    const at::Tensor& S, const at::Tensor& V, at::IntArrayRef ranks,
                    const at::Tensor& weights) {
  const auto [L, m, n, K, offsets] = check_lowrank_merge(out, base, U, S, V, ranks, weights);
  if (out.numel() == 0) return;
  const auto opmath = opmath_type(out.scalar_type());
  const auto coef = mixing_coefficients(weights.unsqueeze(0), S.reshape({L, K}), offsets, opmath);
  // The diagonal scales the factor with fewer rows: m*K or n*K multiplications.
  auto U3 = U.reshape({L, m, K}).to(opmath);
  auto V3 = V.reshape({L, n, K}).to(opmath);
  if (m <= n) {
    U3 = U3 * coef.unsqueeze(1);
  } else {
    V3 = V3 * coef.unsqueeze(1);
  }
  auto out3 = out.view({L, m, n});
  const auto base3 = base.reshape({L, m, n});
  if (out.scalar_type() != opmath) {
    out3.copy_(at::baddbmm(base3.to(opmath), U3, V3.mT()));
    return;
  }
  // One 2-D BLAS gemm per matrix, accumulating into out: ATen's CPU addmm is faster than its
  // bmm, and with beta = 1 base is read once and out written once.
  const bool in_place = out.data_ptr() == base.data_ptr();  // validated: same memory and strides
  for (int64_t l = 0; l < L; ++l) {
    auto o = out3[l];
    if (in_place) {
      o.addmm_(U3[l], V3[l].t());
    } else {
      at::addmm_out(o, base3[l], U3[l], V3[l].t());
    }
  }
}

void dense_merge_(at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                  const at::Tensor& weights) {
  check_dense_merge(out, base, deltas, weights);
  const int64_t N = out.numel(), T = weights.size(0);
  if (N == 0) return;
  const auto base_c = base.contiguous();
  const auto deltas_c = deltas.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dense_merge_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto w = weights.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
    const opmath_t* wp = w.data_ptr<opmath_t>();
    const scalar_t* bp = base_c.const_data_ptr<scalar_t>();
    const scalar_t* dp = deltas_c.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        opmath_t acc = static_cast<opmath_t>(bp[i]);
        for (int64_t t = 0; t < T; ++t) acc += wp[t] * static_cast<opmath_t>(dp[t * N + i]);
        op[i] = static_cast<scalar_t>(acc);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(twinmerge, CPU, m) {
  m.impl("reconstruct_delta", &reconstruct_delta);
  m.impl("lowrank_merge_", &lowrank_merge_);
  m.impl("dense_merge_", &dense_merge_);
}

}  // namespace twinmerge::cpu
