#pragma once

#include <ATen/ATen.h>

#include "../checks.h"

namespace twinmerge::cpu {

// The expert that owns each of the K concatenated columns, as a CPU int64 tensor [K].
inline at::Tensor expert_of_col(const ExpertOffsets& off) {
  auto index = at::empty({off.offset[off.num_experts]}, at::kLong);
  auto* p = index.data_ptr<int64_t>();
  for (int32_t t = 0; t < off.num_experts; ++t) {
    std::fill(p + off.offset[t], p + off.offset[t + 1], t);
  }
  return index;
}

// coef[b, k] = weights[b, expert(k)] * S[b, k] in `dtype`, broadcasting size-1 leading dims.
// weights [Bw, T] and S [Bs, K] with Bw, Bs in {1, B}.
inline at::Tensor mixing_coefficients(const at::Tensor& weights, const at::Tensor& S,
                                      const ExpertOffsets& off, at::ScalarType dtype) {
  return weights.to(dtype).index_select(1, expert_of_col(off)) * S.to(dtype);
}

}  // namespace twinmerge::cpu
