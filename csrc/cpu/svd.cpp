// CPU truncated SVD: a randomized range finder (Halko, Martinsson, Tropp 2011, Alg. 4.4) on
// ATen/LAPACK, with the exact SVD when the sketch would cover the whole matrix anyway.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include "common.h"

namespace twinmerge::cpu {
namespace {

at::Tensor orthonormal_basis(const at::Tensor& Y) { return std::get<0>(at::linalg_qr(Y)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> truncated_svd(const at::Tensor& A, int64_t rank,
                                                             int64_t oversample, int64_t n_iter,
                                                             int64_t seed) {
  const auto [batch, m, n, r, sketch] = check_truncated_svd(A, rank, oversample, n_iter);
  if (batch == 0 || r == 0) return svd_outputs(A, r, {}, {}, {});
  const auto opmath = opmath_type(A.scalar_type());
  // Work on the tall orientation M [P, Q], P >= Q: the QRs are then of tall, thin matrices.
  const bool wide = m < n;
  check_finite_matrices("truncated_svd", A.sizes().slice(0, A.dim() - 2),
                        at::isfinite(A.reshape({batch, m, n})).all(-1).all(-1));
  const auto A3 = A.reshape({batch, m, n}).to(opmath);
  const auto M = wide ? A3.mT() : A3;
  const int64_t Q = std::min(m, n);
  at::Tensor Um, Sm, Vm;  // M ~= Um diag(Sm) Vm^T
  if (sketch >= Q) {
    auto [U, S, Vh] = at::linalg_svd(M, /*full_matrices=*/false);
    Um = U.narrow(-1, 0, r);
    Sm = S.narrow(-1, 0, r);
    Vm = Vh.mT().narrow(-1, 0, r);
  } else {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
    const auto omega = at::randn({batch, Q, sketch}, gen, M.options());
    auto basis = orthonormal_basis(at::bmm(M, omega));
    for (int64_t i = 0; i < n_iter; ++i) {
      basis = orthonormal_basis(at::bmm(M, orthonormal_basis(at::bmm(M.mT(), basis))));
    }
    // M ~= basis (basis^T M) and (basis^T M)^T = M^T basis = Ub Sb Vb^T, so
    // M ~= (basis Vb) Sb Ub^T.
    auto [Ub, Sb, Vbh] = at::linalg_svd(at::bmm(M.mT(), basis), /*full_matrices=*/false);
    Um = at::bmm(basis, Vbh.mT().narrow(-1, 0, r));
    Sm = Sb.narrow(-1, 0, r);
    Vm = Ub.narrow(-1, 0, r);
  }
  if (wide) std::swap(Um, Vm);
  return svd_outputs(A, r, Um, Sm, Vm);
}

}  // namespace

TORCH_LIBRARY_IMPL(twinmerge, CPU, m) { m.impl("truncated_svd", &truncated_svd); }

}  // namespace twinmerge::cpu
