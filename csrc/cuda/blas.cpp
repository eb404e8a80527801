#include "blas.h"

#include <ATen/cuda/CUDAContext.h>

#include <limits>

namespace twinmerge::cuda {

#define TM_CUBLAS(expr)                                                                    \
  do {                                                                                     \
    const cublasStatus_t status_ = (expr);                                                 \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "twinmerge: ", #expr, " failed: ",       \
                cublasGetStatusString(status_));                                           \
  } while (0)

#define TM_CUSOLVER(expr)                                                                  \
  do {                                                                                     \
    const cusolverStatus_t status_ = (expr);                                               \
    TORCH_CHECK(status_ == CUSOLVER_STATUS_SUCCESS, "twinmerge: ", #expr,                  \
                " failed with cusolverStatus_t ", static_cast<int>(status_));              \
  } while (0)

int to_int(const char* op, const char* what, int64_t v) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), op, ": ", what,
              " must fit in a 32-bit int for cuBLAS/cuSOLVER, got ", v);
  return static_cast<int>(v);
}

namespace {

cudaDataType cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "twinmerge: no cuBLAS type for dtype ", t);
  }
}

}  // namespace

void gemm_colmajor(cublasOperation_t op_a, cublasOperation_t op_b, int64_t M, int64_t N,
                   int64_t K, const at::Tensor& A, int64_t lda, int64_t stride_a,
                   const at::Tensor& B, int64_t ldb, int64_t stride_b, double beta, at::Tensor& C,
                   int64_t ldc, int64_t stride_c, int64_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
  TORCH_INTERNAL_ASSERT(A.scalar_type() == B.scalar_type());
  constexpr const char* op = "twinmerge gemm";
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const bool fp64 = A.scalar_type() == at::kDouble;
  const double alpha64 = 1.0;
  const float alpha32 = 1.0f, beta32 = static_cast<float>(beta);
  TM_CUBLAS(cublasGemmStridedBatchedEx(
      handle, op_a, op_b, to_int(op, "M", M), to_int(op, "N", N), to_int(op, "K", K),
      fp64 ? static_cast<const void*>(&alpha64) : &alpha32, A.const_data_ptr(),
      cuda_type(A.scalar_type()), to_int(op, "lda", lda), stride_a, B.const_data_ptr(),
      cuda_type(B.scalar_type()), to_int(op, "ldb", ldb), stride_b,
      fp64 ? static_cast<const void*>(&beta) : &beta32, C.data_ptr(), cuda_type(C.scalar_type()),
      to_int(op, "ldc", ldc), stride_c, to_int(op, "batch", batch),
      fp64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const at::Tensor& A,
          const at::Tensor& B, double beta, at::Tensor& C, int64_t batch) {
  TORCH_INTERNAL_ASSERT(A.is_contiguous() && B.is_contiguous() && C.is_contiguous());
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  gemm_colmajor(trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                B, trans_b ? K : N, K * N, A, trans_a ? M : K, M * K, beta, C, N, M * N, batch);
}

#define TM_DEFINE_SOLVER(T, P)                                                                 \
  int Solver<T>::geqrf_work(cusolverDnHandle_t h, int m, int n, T* A, int lda) {               \
    int lwork = 0;                                                                             \
    TM_CUSOLVER(cusolverDn##P##geqrf_bufferSize(h, m, n, A, lda, &lwork));                     \
    return lwork;                                                                              \
  }                                                                                            \
  void Solver<T>::geqrf(cusolverDnHandle_t h, int m, int n, T* A, int lda, T* tau, T* work,    \
                        int lwork, int* info) {                                                \
    TM_CUSOLVER(cusolverDn##P##geqrf(h, m, n, A, lda, tau, work, lwork, info));                \
  }                                                                                            \
  int Solver<T>::orgqr_work(cusolverDnHandle_t h, int m, int n, T* A, int lda, const T* tau) { \
    int lwork = 0;                                                                             \
    TM_CUSOLVER(cusolverDn##P##orgqr_bufferSize(h, m, n, n, A, lda, tau, &lwork));             \
    return lwork;                                                                              \
  }                                                                                            \
  void Solver<T>::orgqr(cusolverDnHandle_t h, int m, int n, T* A, int lda, const T* tau,       \
                        T* work, int lwork, int* info) {                                       \
    TM_CUSOLVER(cusolverDn##P##orgqr(h, m, n, n, A, lda, tau, work, lwork, info));             \
  }                                                                                            \
  int Solver<T>::gesvd_work(cusolverDnHandle_t h, int m, int n) {                              \
    int lwork = 0;                                                                             \
    TM_CUSOLVER(cusolverDn##P##gesvd_bufferSize(h, m, n, &lwork));                             \
    return lwork;                                                                              \
  }                                                                                            \
  void Solver<T>::gesvd(cusolverDnHandle_t h, int m, int n, T* A, int lda, T* S, T* U,         \
                        int ldu, T* VT, int ldvt, T* work, int lwork, T* rwork, int* info) {   \
    TM_CUSOLVER(cusolverDn##P##gesvd(h, 'S', 'S', m, n, A, lda, S, U, ldu, VT, ldvt, work,     \
                                     lwork, rwork, info));                                     \
  }

TM_DEFINE_SOLVER(float, S)
TM_DEFINE_SOLVER(double, D)

#undef TM_DEFINE_SOLVER

}  // namespace twinmerge::cuda
