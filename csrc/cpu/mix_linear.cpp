// CPU kernel of the factored (activation-space) mode of a Linear layer.
#include <torch/library.h>

#include "common.h"

namespace twinmerge::cpu {
namespace {

at::Tensor lowrank_mix_linear(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& U,
                              const at::Tensor& S, const at::Tensor& V, at::IntArrayRef ranks,
                              const at::Tensor& row_weights) {
  const auto [B, rows, m, n, K, offsets] =
      check_lowrank_mix_linear(x, weight, bias, U, S, V, ranks, row_weights);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = m;
  if (rows == 0) return at::zeros(out_sizes, x.options());
  const auto opmath = opmath_type(x.scalar_type());
  const auto x2 = x.reshape({rows, n}).to(opmath);
  const auto w = weight.to(opmath);
  auto y = bias.has_value() ? at::addmm(bias->to(opmath), x2, w.t()) : at::mm(x2, w.t());
  if (K > 0) {
    // h = (x V) * coef[batch(row)], coef[b, k] = row_weights[b, expert(k)] * S[k].
    const auto coef = mixing_coefficients(row_weights, S.unsqueeze(0), offsets, opmath);
    // Scaled in place: h is this call's own temporary, and one [rows, K] pass is saved.
    auto h = at::mm(x2, V.to(opmath));
    h.view({B, rows / B, K}).mul_(coef.unsqueeze(1));
    y.addmm_(h, U.to(opmath).t());
  }
  return y.to(x.scalar_type()).view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(twinmerge, CPU, m) { m.impl("lowrank_mix_linear", &lowrank_mix_linear); }

}  // namespace twinmerge::cpu
