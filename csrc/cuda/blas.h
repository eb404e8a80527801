// Thin, typed wrappers over the cuBLAS and cuSOLVER calls the CUDA ops make. Handles come from
// PyTorch (bound to the current stream), workspaces from PyTorch's caching allocator.
#pragma once

#include <ATen/ATen.h>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cusolverDn.h>

namespace twinmerge::cuda {

// Row-major batched GEMM on contiguous tensors, accumulating in fp32 (fp64 for double):
//   C[b] = op(A[b]) op(B[b]) + beta * C[b],   C [batch, M, N],
//   A [batch, M, K] ([batch, K, M] if trans_a),  B [batch, K, N] ([batch, N, K] if trans_b).
// A and B share a dtype; C may have that dtype or the accumulation dtype.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const at::Tensor& A,
          const at::Tensor& B, double beta, at::Tensor& C, int64_t batch = 1);

// Whether gemm_lt may be used, from the environment variable TWINMERGE_CUBLASLT, read per call:
// "auto" (default): where cuBLASLt takes the case; "off": never (the cuBLAS path throughout, to
// compare the two); "require": a case cuBLASLt does not take is an error (for tests).
enum class LtMode { kAuto, kOff, kRequire };
LtMode lt_mode();

// Row-major batched GEMM through cuBLASLt, whose output D may be a buffer other than the addend:
//   D[b] = op(A[b]) op(B[b]) (+ C[b]) (+ bias[j] on every row's column j),
// accumulating in fp32; shapes as for gemm(). C and D [batch, M, N] share a dtype (A's, or
// float); bias [N] has D's dtype. All contiguous; C may be D. Returns false, having done
// nothing, for fp64, K = 0, a bias off a 16-byte boundary and wherever cuBLASLt offers no
// algorithm or refuses one: the caller then takes the cuBLAS path, gemm(). fp32 uses TF32 when
// torch.backends.cuda.matmul.allow_tf32 does (and no at::NoTF32Guard is active).
bool gemm_lt(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const at::Tensor& A,
             const at::Tensor& B, const std::optional<at::Tensor>& C, at::Tensor& D,
             const std::optional<at::Tensor>& bias, int64_t batch = 1);

// Column-major batched GEMM on raw buffers of one dtype (float or double), as cuBLAS defines it:
//   C[b] = op(A[b]) op(B[b]) + beta * C[b], C is M x N with leading dimension ldc.
void gemm_colmajor(cublasOperation_t op_a, cublasOperation_t op_b, int64_t M, int64_t N,
                   int64_t K, const at::Tensor& A, int64_t lda, int64_t stride_a,
                   const at::Tensor& B, int64_t ldb, int64_t stride_b, double beta, at::Tensor& C,
                   int64_t ldc, int64_t stride_c, int64_t batch);

// cuSOLVER routines for float and double, column-major.
template <typename T>
struct Solver;

template <>
struct Solver<float> {
  static int geqrf_work(cusolverDnHandle_t h, int m, int n, float* A, int lda);
  static void geqrf(cusolverDnHandle_t h, int m, int n, float* A, int lda, float* tau, float* work,
                    int lwork, int* info);
  static int orgqr_work(cusolverDnHandle_t h, int m, int n, float* A, int lda, const float* tau);
  static void orgqr(cusolverDnHandle_t h, int m, int n, float* A, int lda, const float* tau,
                    float* work, int lwork, int* info);
  static int gesvd_work(cusolverDnHandle_t h, int m, int n);
  static void gesvd(cusolverDnHandle_t h, int m, int n, float* A, int lda, float* S, float* U,
                    int ldu, float* VT, int ldvt, float* work, int lwork, float* rwork, int* info);
};

template <>
struct Solver<double> {
  static int geqrf_work(cusolverDnHandle_t h, int m, int n, double* A, int lda);
  static void geqrf(cusolverDnHandle_t h, int m, int n, double* A, int lda, double* tau,
                    double* work, int lwork, int* info);
  static int orgqr_work(cusolverDnHandle_t h, int m, int n, double* A, int lda, const double* tau);
  static void orgqr(cusolverDnHandle_t h, int m, int n, double* A, int lda, const double* tau,
                    double* work, int lwork, int* info);
  static int gesvd_work(cusolverDnHandle_t h, int m, int n);
  static void gesvd(cusolverDnHandle_t h, int m, int n, double* A, int lda, double* S, double* U,
                    int ldu, double* VT, int ldvt, double* work, int lwork, double* rwork,
                    int* info);
};

// cuBLAS and cuSOLVER take 32-bit sizes.
int to_int(const char* op, const char* what, int64_t v);

}  // namespace twinmerge::cuda
