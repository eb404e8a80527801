#include "blas.h"

#include <ATen/cuda/CUDAContext.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <unordered_map>

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

// The largest power of two (at most 256) that divides every address a batched operand starts at:
// cuBLASLt's heuristics otherwise assume 256-byte aligned operands.
uint32_t alignment(const void* ptr, int64_t stride_bytes, int64_t batch) {
  uint64_t bits = reinterpret_cast<uintptr_t>(ptr) | 256u;
  if (batch > 1) bits |= static_cast<uint64_t>(stride_bytes);
  return static_cast<uint32_t>(bits & (~bits + 1));
}

template <typename T, cublasStatus_t (*Destroy)(T)>
using LtHandle = std::unique_ptr<std::remove_pointer_t<T>,
                                 std::integral_constant<decltype(Destroy), Destroy>>;
using LtDesc = LtHandle<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using LtLayout = LtHandle<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using LtPreference = LtHandle<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

template <typename V>
void set(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a, const V& v) {
  TM_CUBLAS(cublasLtMatmulDescSetAttribute(d, a, &v, sizeof(v)));
}
template <typename V>
void set(cublasLtMatrixLayout_t d, cublasLtMatrixLayoutAttribute_t a, const V& v) {
  TM_CUBLAS(cublasLtMatrixLayoutSetAttribute(d, a, &v, sizeof(v)));
}
template <typename V>
void set(cublasLtMatmulPreference_t d, cublasLtMatmulPreferenceAttributes_t a, const V& v) {
  TM_CUBLAS(cublasLtMatmulPreferenceSetAttribute(d, a, &v, sizeof(v)));
}

// A column-major rows x cols matrix with leading dimension ld, `batch` of them `stride`
// elements apart.
LtLayout layout(cudaDataType type, int64_t rows, int64_t cols, int64_t ld, int64_t batch,
                int64_t stride) {
  cublasLtMatrixLayout_t raw = nullptr;
  TM_CUBLAS(cublasLtMatrixLayoutCreate(&raw, type, rows, cols, ld));
  LtLayout desc(raw);
  if (batch > 1) {
    set(raw, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, static_cast<int32_t>(batch));
    set(raw, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, stride);
  }
  return desc;
}

// The algorithms cuBLASLt's heuristic chose, by problem: the query takes microseconds of host
// time per GEMM, as much as a small merge takes on the device, and a served model asks the same
// few questions again and again. Bounded: cleared when it would exceed kCapacity entries.
using LtKey = std::array<int64_t, 14>;

struct LtKeyHash {
  size_t operator()(const LtKey& key) const {
    size_t h = 0;
    for (const int64_t v : key) h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};

// A cached answer: an algorithm, or none (no algorithm offered, or the one offered refused at
// launch), so that such a case goes to cuBLAS at once instead of asking again every call.
using LtAnswer = std::optional<cublasLtMatmulAlgo_t>;

class LtAlgorithms {
 public:
  std::optional<LtAnswer> find(const LtKey& key) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = map_.find(key);
    if (it == map_.end()) return std::nullopt;
    return it->second;
  }
  void insert(const LtKey& key, const LtAnswer& answer) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (map_.size() >= kCapacity) map_.clear();
    map_[key] = answer;
  }

 private:
  static constexpr size_t kCapacity = 4096;
  std::mutex mutex_;
  std::unordered_map<LtKey, LtAnswer, LtKeyHash> map_;
};

LtAlgorithms& lt_algorithms() {
  static LtAlgorithms* algorithms = new LtAlgorithms();  // never destroyed: used at exit
  return *algorithms;
}

}  // namespace

LtMode lt_mode() {
  const char* v = std::getenv("TWINMERGE_CUBLASLT");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return LtMode::kAuto;
  if (std::strcmp(v, "off") == 0) return LtMode::kOff;
  if (std::strcmp(v, "require") == 0) return LtMode::kRequire;
  TORCH_CHECK(false, "twinmerge: TWINMERGE_CUBLASLT must be auto, off or require, got '", v, "'");
  return LtMode::kAuto;
}

bool gemm_lt(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const at::Tensor& A,
             const at::Tensor& B, const std::optional<at::Tensor>& C, at::Tensor& D,
             const std::optional<at::Tensor>& bias, int64_t batch) {
  const at::Tensor& addend = C ? *C : D;  // beta = 0 without C: cuBLASLt does not read it
  TORCH_INTERNAL_ASSERT(A.scalar_type() == B.scalar_type() &&
                        addend.scalar_type() == D.scalar_type());
  TORCH_INTERNAL_ASSERT(A.is_contiguous() && B.is_contiguous() && addend.is_contiguous() &&
                        D.is_contiguous() && (!bias || bias->is_contiguous()));
  TORCH_INTERNAL_ASSERT(!bias || (bias->scalar_type() == D.scalar_type() && bias->numel() == N));
  const LtMode mode = lt_mode();
  if (mode == LtMode::kOff) return false;
  // Every case cuBLASLt does not take goes to the caller's cuBLAS path; with
  // TWINMERGE_CUBLASLT=require it is an error instead, so tests can tell the paths apart.
  const auto fallback = [&](const char* why) {
    TORCH_CHECK(mode != LtMode::kRequire, "twinmerge: TWINMERGE_CUBLASLT=require, but ", why);
    return false;
  };
  if (A.scalar_type() == at::kDouble || D.scalar_type() == at::kDouble) {
    return fallback("fp64 takes the cuBLAS path");
  }
  if (K == 0) return fallback("K = 0 takes the cuBLAS path");
  if (M == 0 || N == 0 || batch == 0) return true;
  constexpr const char* op = "twinmerge gemm_lt";
  to_int(op, "batch", batch);
  const cudaDataType ab_type = cuda_type(A.scalar_type()), cd_type = cuda_type(D.scalar_type());
  // fp32 follows torch.backends.cuda.matmul.allow_tf32, as torch's matmuls and the cuBLAS path do.
  const bool tf32 = A.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS() &&
                    !at::NoTF32Guard::should_disable_tf32();

  // Row-major D = op(A) op(B) + C is column-major D^T = op(B)^T op(A)^T + C^T (N x M, ld N):
  // cuBLASLt's "A" is our B and its "B" is our A, each described as stored.
  cublasLtMatmulDesc_t raw_desc = nullptr;
  TM_CUBLAS(cublasLtMatmulDescCreate(
      &raw_desc, tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const LtDesc desc(raw_desc);
  const auto cublas_op = [](bool t) { return int32_t{t ? CUBLAS_OP_T : CUBLAS_OP_N}; };
  set(raw_desc, CUBLASLT_MATMUL_DESC_TRANSA, cublas_op(trans_b));
  set(raw_desc, CUBLASLT_MATMUL_DESC_TRANSB, cublas_op(trans_a));
  if (bias) {
    // The alignment preferences below do not cover the bias pointer, and a bias epilogue
    // kernel can fault on a misaligned one (pytorch/pytorch#194497): such a bias is copied by
    // the caller instead.
    if (reinterpret_cast<uintptr_t>(bias->const_data_ptr()) % 16 != 0) {
      return fallback("the bias is not 16-byte aligned");
    }
    // The epilogue adds bias[j] to column-major row j, i.e. to row-major column j of D.
    set(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(CUBLASLT_EPILOGUE_BIAS));
    set(raw_desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias->const_data_ptr());
    set(raw_desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
        static_cast<int32_t>(cuda_type(bias->scalar_type())));
  }
  const auto a_desc = trans_b ? layout(ab_type, K, N, K, batch, N * K)
                              : layout(ab_type, N, K, N, batch, N * K);
  const auto b_desc = trans_a ? layout(ab_type, M, K, M, batch, M * K)
                              : layout(ab_type, K, M, K, batch, M * K);
  const auto d_desc = layout(cd_type, N, M, N, batch, M * N);
  // C's layout is D's. Without C (beta = 0), or with C the very buffer D (in place), D's own
  // descriptor stands for it, as in torch's gemm_and_bias: cuBLASLt's in-place case.
  const bool own_c = C && C->data_ptr() != D.data_ptr();
  const auto c_desc = own_c ? layout(cd_type, N, M, N, batch, M * N) : LtLayout();
  cublasLtMatrixLayout_t c_layout = own_c ? c_desc.get() : d_desc.get();

  const int64_t ab_size = A.element_size(), cd_size = D.element_size();
  const uint32_t align_a = alignment(B.const_data_ptr(), N * K * ab_size, batch),
                 align_b = alignment(A.const_data_ptr(), M * K * ab_size, batch),
                 align_c = alignment(addend.const_data_ptr(), M * N * cd_size, batch),
                 align_d = alignment(D.const_data_ptr(), M * N * cd_size, batch);
  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  // Everything the heuristic sees but the pointers' values: the same key, the same answer. In
  // place or not shares a key (the descriptors are alike), so both take the same algorithm.
  TORCH_INTERNAL_ASSERT(D.get_device() == c10::cuda::current_device());
  const LtKey key{M, N, K, batch, static_cast<int64_t>(ab_type), static_cast<int64_t>(cd_type),
                  (trans_a ? 1 : 0) | (trans_b ? 2 : 0) | (bias ? 4 : 0) | (C ? 8 : 0) |
                      (tf32 ? 16 : 0),
                  align_a, align_b, align_c, align_d,
                  bias ? alignment(bias->const_data_ptr(), 0, 1) : 0,
                  static_cast<int64_t>(workspace_size), static_cast<int64_t>(D.get_device())};
  const std::optional<LtAnswer> cached = lt_algorithms().find(key);
  if (cached && !*cached) return fallback("cuBLASLt has no algorithm for this case");
  LtAnswer algo = cached ? *cached : std::nullopt;
  if (!algo) {
    cublasLtMatmulPreference_t raw_pref = nullptr;
    TM_CUBLAS(cublasLtMatmulPreferenceCreate(&raw_pref));
    const LtPreference pref(raw_pref);
    set(raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(workspace_size));
    // Sums accumulate in fp32: a split-K reduction, if any, adds partial sums in the compute
    // type, never in the output buffer's 16-bit type (which INPLACE and OUTPUT_TYPE would do).
    set(raw_pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
        static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_NONE |
                              CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE));
    set(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
    set(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
    set(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c);
    set(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d);
    cublasLtMatmulHeuristicResult_t heuristic{};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
        handle, raw_desc, a_desc.get(), b_desc.get(), c_layout, d_desc.get(), raw_pref, 1,
        &heuristic, &found);
    // No algorithm for the case is not an error; anything else (a wrong attribute, say) is, so
    // that a broken fast path cannot hide behind the fallback.
    if (status == CUBLAS_STATUS_NOT_SUPPORTED || (status == CUBLAS_STATUS_SUCCESS && found == 0)) {
      lt_algorithms().insert(key, std::nullopt);
      return fallback("cuBLASLt has no algorithm for this case");
    }
    TM_CUBLAS(status);
    TM_CUBLAS(heuristic.state);
    algo = heuristic.algo;
    lt_algorithms().insert(key, heuristic.algo);
  }
  const float alpha = 1.0f, beta = C ? 1.0f : 0.0f;
  const cublasStatus_t run = cublasLtMatmul(
      handle, raw_desc, &alpha, B.const_data_ptr(), a_desc.get(), A.const_data_ptr(),
      b_desc.get(), &beta, addend.const_data_ptr(), c_layout, D.data_ptr(), d_desc.get(),
      &*algo, at::cuda::getCUDABlasLtWorkspace(), workspace_size,
      at::cuda::getCurrentCUDAStream());
  // cuBLASLt can refuse at launch what its heuristic offered (operands of mixed alignment,
  // pytorch/pytorch#92201); a refused launch enqueued nothing, so the cuBLAS path is safe.
  if (run == CUBLAS_STATUS_NOT_SUPPORTED) {
    lt_algorithms().insert(key, std::nullopt);
    TORCH_WARN_ONCE("twinmerge: cuBLASLt refused a GEMM its heuristic offered (M=", M, ", N=", N,
                    ", K=", K, "); using cuBLAS for such cases");
    return fallback("cublasLtMatmul returned CUBLAS_STATUS_NOT_SUPPORTED");
  }
  TM_CUBLAS(run);
  return true;
}

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
