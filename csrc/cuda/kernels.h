// Launchers of the hand-written CUDA kernels; all run on the current stream.
#pragma once

#include <ATen/ATen.h>

#include "../checks.h"

namespace twinmerge::cuda {

// out[i, k] = in[i, k] * S[g * s_stride + k] * weights[g * w_stride + expert(k)] with
// g = i / rows_per_group: the diagonal of U_cat diag(w ⊗ S) V_cat^T folded into one factor, in
// one pass. Computed in the accumulation dtype and rounded once to out's dtype (fp16/bf16
// outputs then feed a GEMM in that dtype). weights may be null (coefficient S alone); without it
// `offsets` is not read. in and out are contiguous [R, K] and may be the same buffer; in and S
// each have out's dtype or the accumulation dtype (float, double for double), *weights the
// accumulation dtype; all contiguous.
void launch_scale_columns(const at::Tensor& in, at::Tensor& out, const at::Tensor& S,
                          int64_t s_stride, const at::Tensor* weights, int64_t w_stride,
                          const ExpertOffsets& offsets, int64_t rows_per_group);

// out[i] = base[i] + sum_t weights[t] * deltas[t, i]; all contiguous, weights in opmath dtype.
void launch_dense_merge(at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                        const at::Tensor& weights);

// S[b, :] = NaN wherever info[b] != 0 (a cuSOLVER routine that failed on matrix b).
// info [batch] int32, S [batch, k] float or double, both contiguous.
void launch_nan_rows_where_failed(const at::Tensor& info, at::Tensor& S);

}  // namespace twinmerge::cuda
