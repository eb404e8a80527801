// Schemas of every twinmerge operator and the C++ API, which calls through the dispatcher.
#include <torch/library.h>

#include "twinmerge.h"

TORCH_LIBRARY(twinmerge, m) {
  m.def("reconstruct_delta(Tensor U, Tensor S, Tensor V) -> Tensor");
  m.def(
      "lowrank_merge_(Tensor(a!) out, Tensor base, Tensor U_cat, Tensor S_cat, Tensor V_cat, "
      "int[] ranks, Tensor weights) -> ()");
  m.def("dense_merge_(Tensor(a!) out, Tensor base, Tensor deltas, Tensor weights) -> ()");
  m.def(
      "lowrank_mix_linear(Tensor x, Tensor weight, Tensor? bias, Tensor U_cat, Tensor S_cat, "
      "Tensor V_cat, int[] ranks, Tensor row_weights) -> Tensor");
  m.def(
      "truncated_svd(Tensor A, int rank, int oversample=10, int n_iter=2, int seed=0) "
      "-> (Tensor U, Tensor S, Tensor V)");
}

namespace twinmerge {

namespace {
c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}
}  // namespace

at::Tensor reconstruct_delta(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V) {
  static auto op = find_op("twinmerge::reconstruct_delta")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(U, S, V);
}

void lowrank_merge_(at::Tensor& out, const at::Tensor& base, const at::Tensor& U_cat,
                    const at::Tensor& S_cat, const at::Tensor& V_cat, at::IntArrayRef ranks,
                    const at::Tensor& weights) {
  static auto op = find_op("twinmerge::lowrank_merge_")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                   const at::Tensor&)>();
  op.call(out, base, U_cat, S_cat, V_cat, ranks, weights);
}

void dense_merge_(at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                  const at::Tensor& weights) {
  static auto op = find_op("twinmerge::dense_merge_")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&)>();
  op.call(out, base, deltas, weights);
}

at::Tensor lowrank_mix_linear(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& U_cat,
                              const at::Tensor& S_cat, const at::Tensor& V_cat,
                              at::IntArrayRef ranks, const at::Tensor& row_weights) {
  static auto op = find_op("twinmerge::lowrank_mix_linear")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                         const at::Tensor&)>();
  return op.call(x, weight, bias, U_cat, S_cat, V_cat, ranks, row_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> truncated_svd(const at::Tensor& A, int64_t rank,
                                                             int64_t oversample, int64_t n_iter,
                                                             int64_t seed) {
  static auto op = find_op("twinmerge::truncated_svd")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, int64_t, int64_t, int64_t, int64_t)>();
  return op.call(A, rank, oversample, n_iter, seed);
}

int link_anchor() { return 0; }

}  // namespace twinmerge
