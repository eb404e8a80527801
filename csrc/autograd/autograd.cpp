// Autograd and ADInplaceOrView kernels of the ops that are not differentiable: lowrank_merge_,
// dense_merge_ and truncated_svd. (reconstruct_delta and lowrank_mix_linear are differentiable;
// their autograd kernels are registered from Python, twinmerge_ext/ops.py.)
//
// Without these, the backend kernels would run with autograd on: their internal ATen calls
// would record a graph through kernel temporaries (wrong gradients, silently) or fail inside
// ATen with a message that names no argument of ours, depending on the dtype. Instead, with grad
// mode on, an input that requires grad is refused by name, and the op then runs below autograd.
// The in-place ops bump `out`'s version counter as torch's own in-place ops do, so that autograd
// notices when a tensor saved for a backward pass was overwritten.
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <initializer_list>
#include <utility>

#include "../checks.h"
#include "../twinmerge.h"

namespace twinmerge::autograd {
namespace {

using Named = std::pair<const char*, const at::Tensor*>;

// No argument may carry a forward-mode gradient (a dual tensor; torch.no_grad() does not turn
// forward AD off), and with grad mode on, `out` may not require grad (a leaf that does is refused
// as torch refuses in-place writes into it; any other cannot be differentiated through this op),
// and neither may any input. `instead` says what to use for gradients.
void check_not_differentiated(const char* op, const at::Tensor* out,
                              std::initializer_list<Named> inputs, const char* instead) {
  const auto no_tangent = [op](const char* name, const at::Tensor& t) {
    TM_CHECK(op, !t._fw_grad(/*level=*/0).defined(), name, " must not be a dual tensor of "
             "forward-mode AD (", op, " is not differentiable; pass ", name, ".detach(), its "
             "primal), got one with a tangent");
  };
  if (out != nullptr) no_tangent("out", *out);
  for (const auto& [name, t] : inputs) no_tangent(name, *t);
  if (!at::GradMode::is_enabled()) return;
  if (out != nullptr && out->requires_grad()) {
    TM_CHECK(op, !out->is_leaf(),
             "out must not be a leaf tensor that requires grad while grad mode is on (a leaf "
             "Variable that requires grad is being used in an in-place operation; merge into it "
             "under torch.no_grad(), as an optimizer step does), got a leaf of shape ",
             out->sizes(), " with requires_grad=True");
    TM_CHECK(op, false, "out must not require grad while grad mode is on (", op,
             " is not differentiable; ", instead, "), got a tensor with requires_grad=True");
  }
  for (const auto& [name, t] : inputs) {
    TM_CHECK(op, !t->requires_grad(), name, " must not require grad while grad mode is on (", op,
             " is not differentiable; ", instead, "), got a tensor with requires_grad=True");
  }
}

constexpr const char* kMergeInstead =
    "for gradients use lowrank_mix_linear or reconstruct_delta, which are differentiable; to "
    "merge without gradients, call it under torch.no_grad()";
constexpr const char* kDenseInstead =
    "for gradients write base + (weights.view(-1, *[1] * base.dim()) * deltas).sum(0) in torch "
    "ops; to merge without gradients, call it under torch.no_grad()";
constexpr const char* kSvdInstead =
    "for gradients use torch.linalg.svd or torch.svd_lowrank; to decompose without gradients, "
    "pass A.detach() or call it under torch.no_grad()";

// Torch's in-place ops bump the version counter of what they wrote, so that backward() detects
// a tensor it saved having been overwritten. Inference tensors have no version counter.
void bump_version(const at::Tensor& out) {
  if (!out.is_inference()) out.unsafeGetTensorImpl()->bump_version();
}

// --- Autograd: refuse what requires grad, then run below autograd ----------------------------

void lowrank_merge_autograd(at::Tensor& out, const at::Tensor& base, const at::Tensor& U_cat,
                            const at::Tensor& S_cat, const at::Tensor& V_cat,
                            at::IntArrayRef ranks, const at::Tensor& weights) {
  check_not_differentiated("lowrank_merge_", &out,
                           {{"base", &base}, {"U_cat", &U_cat}, {"S_cat", &S_cat},
                            {"V_cat", &V_cat}, {"weights", &weights}},
                           kMergeInstead);
  const at::AutoDispatchBelowAutograd guard;  // next: ADInplaceOrView, which bumps the version
  twinmerge::lowrank_merge_(out, base, U_cat, S_cat, V_cat, ranks, weights);
}

void dense_merge_autograd(at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                          const at::Tensor& weights) {
  check_not_differentiated("dense_merge_", &out,
                           {{"base", &base}, {"deltas", &deltas}, {"weights", &weights}},
                           kDenseInstead);
  const at::AutoDispatchBelowAutograd guard;
  twinmerge::dense_merge_(out, base, deltas, weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> truncated_svd_autograd(const at::Tensor& A,
                                                                      int64_t rank,
                                                                      int64_t oversample,
                                                                      int64_t n_iter,
                                                                      int64_t seed) {
  check_not_differentiated("truncated_svd", nullptr, {{"A", &A}}, kSvdInstead);
  const at::AutoDispatchBelowADInplaceOrView guard;
  return twinmerge::truncated_svd(A, rank, oversample, n_iter, seed);
}

// --- ADInplaceOrView: the version bump of the in-place ops -----------------------------------
// A kernel of its own (not part of the Autograd one) because inference mode skips the Autograd
// keys but not this one: an in-place merge into a normal tensor inside torch.inference_mode()
// must bump its version too.

void lowrank_merge_inplace(at::Tensor& out, const at::Tensor& base, const at::Tensor& U_cat,
                           const at::Tensor& S_cat, const at::Tensor& V_cat,
                           at::IntArrayRef ranks, const at::Tensor& weights) {
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    twinmerge::lowrank_merge_(out, base, U_cat, S_cat, V_cat, ranks, weights);
  }
  bump_version(out);
}

void dense_merge_inplace(at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                         const at::Tensor& weights) {
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    twinmerge::dense_merge_(out, base, deltas, weights);
  }
  bump_version(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(twinmerge, Autograd, m) {
  m.impl("lowrank_merge_", &lowrank_merge_autograd);
  m.impl("dense_merge_", &dense_merge_autograd);
  m.impl("truncated_svd", &truncated_svd_autograd);
}

TORCH_LIBRARY_IMPL(twinmerge, ADInplaceOrView, m) {
  m.impl("lowrank_merge_", &lowrank_merge_inplace);
  m.impl("dense_merge_", &dense_merge_inplace);
}

}  // namespace twinmerge::autograd
