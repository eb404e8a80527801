// Launchers of the hand-written CUDA kernels; all run on the current stream.
#pragma once

#include <ATen/ATen.h>

#include "../checks.h"

namespace twinmerge::cuda {

// coef[b, k] = weights[b * w_stride + expert(k)] * S[b * s_stride + k] for b < B, k < K.
// weights and S are contiguous tensors of coef's dtype (float or double); coef is [B, K].
void launch_mixing_coefficients(const at::Tensor& weights, int64_t w_stride, const at::Tensor& S,
                                int64_t s_stride, const ExpertOffsets& offsets, at::Tensor& coef);

// out[i, k] = in[i, k] * coef[i / rows_per_group, k], computed in coef's dtype and rounded once
// to out's dtype (for fp16/bf16 outputs, the scaled factor then feeds a GEMM in that dtype).
// in [R, K] and out [R, K] contiguous; coef [R / rows_per_group, K] float or double.
void launch_scale_columns(const at::Tensor& in, at::Tensor& out, const at::Tensor& coef,
                          int64_t rows_per_group);

// out[i] = base[i] + sum_t weights[t] * deltas[t, i]; all contiguous, weights in opmath dtype.
void launch_dense_merge(at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                        const at::Tensor& weights);

// S[b, :] = NaN wherever info[b] != 0 (a cuSOLVER routine that failed on matrix b).
// info [batch] int32, S [batch, k] float or double, both contiguous.
void launch_nan_rows_where_failed(const at::Tensor& info, at::Tensor& S);

}  // namespace twinmerge::cuda
