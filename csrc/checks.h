// Argument checks shared by every twinmerge op.
//
// Every message has the form "<op>: <argument> must <rule>, got <value>" so that a user who
// passes the wrong tensor learns which one and what was wrong with it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#define TM_CHECK(op, cond, ...) TORCH_CHECK((cond), op, ": ", __VA_ARGS__)

#define TM_CHECK_DIM(op, t, d)                                                               \
  TM_CHECK(op, (t).dim() == (d), #t " must be a ", d, "-D tensor, got shape ", (t).sizes())

#define TM_CHECK_FLOATING(op, t)                                                             \
  TM_CHECK(op,                                                                               \
           (t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble ||            \
               (t).scalar_type() == at::kHalf || (t).scalar_type() == at::kBFloat16,         \
           #t " must be float64, float32, float16 or bfloat16, got ", (t).scalar_type())

#define TM_CHECK_SAME_DTYPE(op, a, b)                                                        \
  TM_CHECK(op, (a).scalar_type() == (b).scalar_type(), #b " must have the dtype of " #a " (", \
           (a).scalar_type(), "), got ", (b).scalar_type())

#define TM_CHECK_SAME_DEVICE(op, a, b)                                                       \
  TM_CHECK(op, (a).device() == (b).device(), #b " must be on the device of " #a " (",        \
           (a).device(), "), got ", (b).device())

namespace twinmerge {

// Largest number of experts a single call may mix; the per-expert column offsets travel to CUDA
// kernels by value, so this bounds the kernel-argument size (4 * (kMaxExperts + 1) bytes).
constexpr int64_t kMaxExperts = 256;

// Column k of a concatenated factor belongs to expert t iff offset[t] <= k < offset[t + 1].
struct ExpertOffsets {
  int32_t num_experts;
  int32_t offset[kMaxExperts + 1];
};

// Validates `ranks` against the factor width K and the number of mixing weights T.
ExpertOffsets expert_offsets(const char* op, at::IntArrayRef ranks, int64_t K, int64_t T);

// The output written by an in-place op: contiguous, and either the very tensor `base` or
// disjoint from it (a partial overlap would read values the op has already overwritten).
void check_inplace_output(const char* op, const at::Tensor& out, const at::Tensor& base);

// `t` may not share memory with `out` (it is read after `out` is written).
void check_no_overlap(const char* op, const char* name, const at::Tensor& out, const at::Tensor& t);

// Dtype in which sums are accumulated: double for double, float for everything else.
inline at::ScalarType opmath_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Shapes shared by lowrank_merge_ on every device, after validation.
struct MergeShape {
  int64_t L, m, n, K;
  ExpertOffsets offsets;
};
MergeShape check_lowrank_merge(const at::Tensor& out, const at::Tensor& base,
                               const at::Tensor& U_cat, const at::Tensor& S_cat,
                               const at::Tensor& V_cat, at::IntArrayRef ranks,
                               const at::Tensor& weights);

void check_dense_merge(const at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                       const at::Tensor& weights);

struct MixShape {
  int64_t B, rows, m, n, K;
  ExpertOffsets offsets;
};
MixShape check_lowrank_mix_linear(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& U_cat,
                                  const at::Tensor& S_cat, const at::Tensor& V_cat,
                                  at::IntArrayRef ranks,
                                  const at::Tensor& row_weights);

struct DeltaShape {
  int64_t batch, m, n, r;
};
DeltaShape check_reconstruct_delta(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V);

struct SvdShape {
  int64_t batch, m, n, rank, sketch;  // sketch = rank + oversample, at most min(m, n)
};
SvdShape check_truncated_svd(const at::Tensor& A, int64_t rank, int64_t oversample, int64_t n_iter);

// truncated_svd's refusal of non-finite input: `finite` (bool, on the CPU, one flag per matrix of
// the batch) says which matrices of A [*lead, m, n] have finite entries only; raises naming the
// first that does not, by its index in `lead` and in the flattened batch.
void check_finite_matrices(const char* op, at::IntArrayRef lead, const at::Tensor& finite);

// truncated_svd's results in A's dtype and shapes [..., m, r], [..., r], [..., n, r], from the
// batched [batch, m, r], [batch, r], [batch, n, r] factors (any dtype and strides); zeros when
// given undefined tensors (an empty input).
std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_outputs(const at::Tensor& A, int64_t r,
                                                           const at::Tensor& U,
                                                           const at::Tensor& S,
                                                           const at::Tensor& V);

}  // namespace twinmerge
