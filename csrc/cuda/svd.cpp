// CUDA truncated SVD: a randomized range finder (Halko, Martinsson, Tropp 2011, Alg. 4.4) with
// cuBLAS GEMMs and cuSOLVER Householder QR (geqrf + orgqr); the projected matrix's SVD is its QR
// on the device and the small triangular factor's SVD on the host (tall_svd). When the sketch
// would cover the whole matrix, cuSOLVER's exact gesvd. Matrices are column-major here, as
// cuSOLVER wants them: a column-major P x Q matrix lives in a contiguous tensor of shape
// [batch, Q, P]. The Gaussian test matrix comes from a generator seeded per call, so this op is
// deterministic but not CUDA-graph capturable.
#include <ATen/Parallel.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "blas.h"
#include "kernels.h"

namespace twinmerge::cuda {
namespace {

constexpr const char* kOp = "truncated_svd";

template <typename T>
class Workspace {
 public:
  explicit Workspace(const at::Tensor& like)
      : info_(at::empty({1}, like.options().dtype(at::kInt))), like_(like) {}

  T* get(int64_t elements) {
    if (elements > capacity_ || !work_.defined()) {
      capacity_ = std::max<int64_t>(elements, 1);
      work_ = at::empty({capacity_}, like_.options());
    }
    return work_.data_ptr<T>();
  }
  int* info() { return info_.data_ptr<int>(); }

 private:
  at::Tensor work_, info_, like_;
  int64_t capacity_ = 0;
};

// Replaces each column-major P x l matrix of `Y` ([batch, l, P]) by an orthonormal basis of its
// columns (the Q of its Householder QR); with R, also writes each R factor there, row-major
// [batch, l, l].
template <typename T>
void orthonormalize(cusolverDnHandle_t h, at::Tensor& Y, Workspace<T>& ws,
                    at::Tensor* R = nullptr) {
  const int64_t batch = Y.size(0);
  const int l = to_int(kOp, "sketch size", Y.size(1)), P = to_int(kOp, "rows", Y.size(2));
  auto tau = at::empty({l}, Y.options());
  T* y = Y.data_ptr<T>();
  const int lwork = std::max(Solver<T>::geqrf_work(h, P, l, y, P),
                             Solver<T>::orgqr_work(h, P, l, y, P, tau.data_ptr<T>()));
  T* work = ws.get(lwork);
  for (int64_t b = 0; b < batch; ++b) {
    T* yb = y + b * static_cast<int64_t>(l) * P;
    Solver<T>::geqrf(h, P, l, yb, P, tau.data_ptr<T>(), work, lwork, ws.info());
    if (R != nullptr) {
      // geqrf leaves R in the upper triangle of the first l rows: element (i, j) of the
      // column-major matrix is [j, i] of the row-major [l, P] view.
      auto Rb = R->select(0, b);
      at::triu_out(Rb, Y.select(0, b).narrow(1, 0, l).mT());
    }
    Solver<T>::orgqr(h, P, l, yb, P, tau.data_ptr<T>(), work, lwork, ws.info());
  }
}

// Thin SVD of each column-major P x Q matrix (P >= Q) of `M` ([batch, Q, P], destroyed):
// U [batch, Q, P] (column-major P x Q), S [batch, Q], VT [batch, Q, Q] (column-major Q x Q).
template <typename T>
void thin_svd(cusolverDnHandle_t h, at::Tensor& M, at::Tensor& U, at::Tensor& S, at::Tensor& VT,
              Workspace<T>& ws) {
  const int64_t batch = M.size(0);
  const int Q = to_int(kOp, "columns", M.size(1)), P = to_int(kOp, "rows", M.size(2));
  U = at::empty({batch, Q, P}, M.options());
  S = at::empty({batch, Q}, M.options());
  VT = at::empty({batch, Q, Q}, M.options());
  auto rwork = at::empty({std::max(Q, 1)}, M.options());
  auto info = at::empty({batch}, M.options().dtype(at::kInt));
  const int lwork = Solver<T>::gesvd_work(h, P, Q);
  T* work = ws.get(lwork);
  for (int64_t b = 0; b < batch; ++b) {
    Solver<T>::gesvd(h, P, Q, M.data_ptr<T>() + b * static_cast<int64_t>(P) * Q, P,
                     S.data_ptr<T>() + b * Q, U.data_ptr<T>() + b * static_cast<int64_t>(P) * Q, P,
                     VT.data_ptr<T>() + b * static_cast<int64_t>(Q) * Q, Q, work, lwork,
                     rwork.data_ptr<T>(), info.data_ptr<int>() + b);
  }
  // Reading info would wait for the device a second time; a matrix whose SVD did not converge
  // (NaN or Inf input is refused before) gets NaN singular values instead, so the failure shows
  // rather than passing as a result.
  launch_nan_rows_where_failed(info, S);
}

// The SVD of each small matrix of R_host ([batch, l, l], double, on the host) by LAPACK. Inputs
// with NaN or Inf never get here (check_finite_matrices); a matrix whose R is not finite all the
// same (a finite input that overflowed), or one LAPACK fails on, gets NaN throughout, as one
// that cuSOLVER's gesvd fails on does on the exact path.
std::tuple<at::Tensor, at::Tensor, at::Tensor> host_svd(const at::Tensor& R_host) {
  const int64_t batch = R_host.size(0), l = R_host.size(1);
  auto Ur = at::empty_like(R_host), Vh = at::empty_like(R_host);
  auto S = at::empty({batch, l}, R_host.options());
  std::vector<char> bad(batch, 0);
  // One matrix per task: LAPACK's SVD of a small matrix runs on one core, so the batch (the T
  // experts of a parameter) is where the parallelism is.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const auto Rb = R_host[b];
      if (!at::isfinite(Rb).all().item<bool>()) {
        bad[b] = 1;
        continue;
      }
      try {
        const auto [u, s, vh] = at::linalg_svd(Rb, /*full_matrices=*/false);
        Ur[b].copy_(u);
        S[b].copy_(s);
        Vh[b].copy_(vh);
      } catch (const c10::Error&) {  // no convergence
        bad[b] = 1;
      }
    }
  });
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t b = 0; b < batch; ++b) {
    if (bad[b]) Ur[b].fill_(nan), S[b].fill_(nan), Vh[b].fill_(nan);
  }
  return {Ur, S, Vh};
}

// The thin SVD of each column-major P x l matrix of Z ([batch, l, P], P > l; destroyed) as
// Z = Qz R, a Householder QR on the device, then R = Ur diag(S) Vr^T on the host (host_svd, in
// double). cuSOLVER's gesvd on tall, thin matrices takes milliseconds per matrix, mostly latency
// (pytorch/pytorch#41306), and so do its small SVDs; an l x l SVD on the host takes about
// l^3 / 1e8 seconds (0.7 ms at l = 87 on one slow core). Returns Qz Ur as a row-major
// [batch, P, l] view, S [batch, l] and Vr^T [batch, l, l] (row-major, on the device). Waits for
// the device once, to read R and with it `finite` (the input's flags, [batch] bool on the
// device), refusing non-finite input (the leading dims `lead` name it); the results go back in
// one copy from pinned memory.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> tall_svd(cusolverDnHandle_t h, at::Tensor& Z,
                                                        Workspace<T>& ws, const at::Tensor& finite,
                                                        at::IntArrayRef lead) {
  const int64_t batch = Z.size(0), l = Z.size(1), P = Z.size(2);
  auto R = at::empty({batch, l, l}, Z.options());
  orthonormalize<T>(h, Z, ws, &R);
  const auto host =
      at::cat({R.flatten(1), finite.to(R.scalar_type()).unsqueeze(1)}, 1).to(at::kCPU, at::kDouble);
  check_finite_matrices(kOp, lead, host.select(1, l * l) != 0);
  const auto R_host = host.narrow(1, 0, l * l).reshape({batch, l, l}).contiguous();
  const auto [Ur, S, Vh] = host_svd(R_host);
  auto packed = at::empty({batch, 2 * l * l + l},
                          R_host.options().dtype(Z.scalar_type()).pinned_memory(true));
  packed.copy_(at::cat({Ur.flatten(1), Vh.flatten(1), S}, 1));
  const auto on_device = packed.to(Z.device(), /*non_blocking=*/true);
  const auto Ur_d = on_device.narrow(1, 0, l * l).view({batch, l, l});
  const auto Vh_d = on_device.narrow(1, l * l, l * l).view({batch, l, l});
  // Qz Ur, column-major P x l: Ur_d row-major is Ur^T column-major, used transposed. An explicit
  // FP32 GEMM: a matmul could take TF32 (torch's cuBLASLt backend ignores NoTF32Guard).
  auto QU = at::empty({batch, l, P}, Z.options());
  gemm_colmajor(CUBLAS_OP_N, CUBLAS_OP_T, P, l, l, Z, P, P * l, Ur_d.contiguous(), l, l * l, 0.0,
                QU, P, P * l, batch);
  return {QU.mT(), on_device.narrow(1, 2 * l * l, l), Vh_d.contiguous()};
}

at::Tensor gaussian(int64_t batch, int64_t rows, int64_t cols, int64_t seed,
                    const at::TensorOptions& options) {
  auto gen = at::cuda::detail::createCUDAGenerator(options.device().index());
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_current_seed(static_cast<uint64_t>(seed));
  }
  return at::randn({batch, rows, cols}, gen, options);
}

// M [batch, Q, P] holds column-major P x Q matrices, P >= Q. Returns Um [batch, P, r],
// Sm [batch, r], Vm [batch, Q, r] (row-major views) with M ~= Um diag(Sm) Vm^T. Refuses a batch
// in which `finite` ([batch] bool, on the device) flags a matrix with NaN or Inf, naming it by
// its index in the leading dims `lead`; the flags are read in the one wait for the device.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_tall(at::Tensor& M, int64_t r, int64_t sketch,
                                                        int64_t n_iter, int64_t seed,
                                                        const at::Tensor& finite,
                                                        at::IntArrayRef lead) {
  const int64_t batch = M.size(0), Q = M.size(1), P = M.size(2);
  cusolverDnHandle_t h = at::cuda::getCurrentCUDASolverDnHandle();
  Workspace<T> ws(M);
  if (sketch >= Q) {
    check_finite_matrices(kOp, lead, finite.cpu());  // before gesvd, which iterates
    at::Tensor U, S, VT;
    thin_svd<T>(h, M, U, S, VT, ws);
    // VT is column-major Q x Q, so its row-major reading is V.
    return {U.mT().narrow(-1, 0, r), S.narrow(-1, 0, r), VT.narrow(-1, 0, r)};
  }
  const int64_t l = sketch;
  auto omega = gaussian(batch, l, Q, seed, M.options());  // column-major Q x l
  auto Y = at::empty({batch, l, P}, M.options());         // column-major P x l
  auto Z = at::empty({batch, l, Q}, M.options());         // column-major Q x l
  gemm_colmajor(CUBLAS_OP_N, CUBLAS_OP_N, P, l, Q, M, P, P * Q, omega, Q, Q * l, 0.0, Y, P, P * l,
                batch);
  orthonormalize<T>(h, Y, ws);
  for (int64_t i = 0; i < n_iter; ++i) {
    gemm_colmajor(CUBLAS_OP_T, CUBLAS_OP_N, Q, l, P, M, P, P * Q, Y, P, P * l, 0.0, Z, Q, Q * l,
                  batch);
    orthonormalize<T>(h, Z, ws);
    gemm_colmajor(CUBLAS_OP_N, CUBLAS_OP_N, P, l, Q, M, P, P * Q, Z, Q, Q * l, 0.0, Y, P, P * l,
                  batch);
    orthonormalize<T>(h, Y, ws);
  }
  // Bt = M^T Y (Q x l, Q > l) = Ub Sb Vb^T, so M ~= Y Y^T M = Y Bt^T = (Y Vb) Sb Ub^T.
  gemm_colmajor(CUBLAS_OP_T, CUBLAS_OP_N, Q, l, P, M, P, P * Q, Y, P, P * l, 0.0, Z, Q, Q * l,
                batch);
  auto [Ub, Sb, Vbt] = tall_svd<T>(h, Z, ws, finite, lead);
  // Y Vb[:, :r], column-major P x r: Vb^T row-major is Vb column-major, its first r columns.
  auto Um = at::empty({batch, r, P}, M.options());
  gemm_colmajor(CUBLAS_OP_N, CUBLAS_OP_N, P, r, l, Y, P, P * l, Vbt, l, l * l, 0.0, Um, P, P * r,
                batch);
  return {Um.mT(), Sb.narrow(-1, 0, r), Ub.narrow(-1, 0, r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> truncated_svd(const at::Tensor& A, int64_t rank,
                                                             int64_t oversample, int64_t n_iter,
                                                             int64_t seed) {
  const auto [batch, m, n, r, sketch] = check_truncated_svd(A, rank, oversample, n_iter);
  const c10::cuda::CUDAGuard guard(A.device());
  // TF32 GEMMs (torch.backends.cuda.matmul.allow_tf32) would cost the range finder ~3 digits.
  const at::NoTF32Guard no_tf32;
  if (batch == 0 || r == 0) return svd_outputs(A, r, {}, {}, {});
  // Decompose the tall orientation M (P x Q, P >= Q): A itself if m >= n, else A^T. A row-major
  // [m, n] matrix read column-major is A^T, so M is a fresh column-major copy either way.
  const bool wide = m < n;
  const auto A3 = A.reshape({batch, m, n});
  auto M = at::empty({batch, std::min(m, n), std::max(m, n)},
                     A.options().dtype(opmath_type(A.scalar_type())));
  M.copy_(wide ? A3 : A3.mT());
  const auto finite = at::isfinite(M).flatten(1).all(1);
  const auto lead = A.sizes().slice(0, A.dim() - 2);
  auto [Um, Sm, Vm] = M.scalar_type() == at::kDouble
                          ? svd_tall<double>(M, r, sketch, n_iter, seed, finite, lead)
                          : svd_tall<float>(M, r, sketch, n_iter, seed, finite, lead);
  if (wide) std::swap(Um, Vm);
  return svd_outputs(A, r, Um, Sm, Vm);
}

}  // namespace

TORCH_LIBRARY_IMPL(twinmerge, CUDA, m) { m.impl("truncated_svd", &truncated_svd); }

}  // namespace twinmerge::cuda
