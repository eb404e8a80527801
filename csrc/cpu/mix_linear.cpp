// CPU kernel of the factored (activation-space) mode of a Linear layer.
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace twinmerge::cpu {
namespace {

// h [B·per_b, K] (contiguous) *= w[b, expert(k)] · S[k] for the rows of batch entry b.
void scale_rows(at::Tensor& h, const at::Tensor& w, const at::Tensor& S,
                const ExpertOffsets& off, int64_t per_b) {
  const int64_t K = h.size(1), B = w.size(0), T = w.size(1);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lowrank_mix_linear", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* sp = S.const_data_ptr<scalar_t>();
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    std::vector<scalar_t> coef(K);
    for (int64_t b = 0; b < B; ++b) {
      for (int32_t t = 0; t < off.num_experts; ++t) {
        for (int32_t k = off.offset[t]; k < off.offset[t + 1]; ++k) coef[k] = wp[b * T + t] * sp[k];
      }
      for (int64_t r = b * per_b; r < (b + 1) * per_b; ++r) {
        scalar_t* row = hp + r * K;
        for (int64_t k = 0; k < K; ++k) row[k] *= coef[k];
      }
    }
  });
}

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
    // h = (x V) * coef[batch(row)], coef[b, k] = row_weights[b, expert(k)] * S[k], scaled in
    // place (h is this call's own temporary) by one loop over its [rows, K] entries: a decode
    // step calls this once per Linear, and the few tensor ops it replaces (an index, two
    // products) cost more there than the loop's arithmetic.
    auto h = at::mm(x2, V.to(opmath));
    scale_rows(h, row_weights.to(opmath).contiguous(), S.to(opmath).contiguous(), offsets,
               rows / B);
    y.addmm_(h, U.to(opmath).t());
  }
  return y.to(x.scalar_type()).view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(twinmerge, CPU, m) { m.impl("lowrank_mix_linear", &lowrank_mix_linear); }

}  // namespace twinmerge::cpu
