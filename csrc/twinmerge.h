// twinmerge: the Twin-Merging primitives as PyTorch operators, callable from C++.
//
// Every function calls through the PyTorch dispatcher, so the CPU or CUDA kernel is chosen by the
// device of the inputs, exactly as for `torch.ops.twinmerge.*` in Python. Shapes use K for the
// concatenated rank of all experts (sum of `ranks`) and T for the number of experts.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace twinmerge {

// U diag(S) V^T, batched over leading dims.  U [..., m, r], S [..., r], V [..., n, r] -> [..., m, n].
at::Tensor reconstruct_delta(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V);

// out = base + U_cat diag(weights[expert(k)] * S_cat[k]) V_cat^T, written into `out`.
// out, base [..., m, n]; U_cat [..., m, K]; S_cat [..., K]; V_cat [..., n, K]; weights [T];
// ranks: T column counts summing to K. `out` may be `base` itself.
void lowrank_merge_(at::Tensor& out, const at::Tensor& base, const at::Tensor& U_cat,
                    const at::Tensor& S_cat, const at::Tensor& V_cat, at::IntArrayRef ranks,
                    const at::Tensor& weights);

// out = base + sum_t weights[t] * deltas[t].  out, base [...]; deltas [T, ...]; weights [T].
void dense_merge_(at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                  const at::Tensor& weights);

// y = x W^T + b + ((x V_cat) * (row_weights[row, expert(k)] * S_cat[k])) U_cat^T, each batch
// row of x with its own mixing weights.  x [B, ..., n]; weight [m, n]; bias [m] or none;
// U_cat [m, K]; S_cat [K]; V_cat [n, K]; row_weights [B, T] -> y [B, ..., m].
at::Tensor lowrank_mix_linear(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& U_cat,
                              const at::Tensor& S_cat, const at::Tensor& V_cat,
                              at::IntArrayRef ranks, const at::Tensor& row_weights);

// Randomized truncated SVD: A [..., m, n] ~= U diag(S) V^T with U [..., m, r], S [..., r],
// V [..., n, r], r = clamp(rank, 1, min(m, n)). Deterministic for a given `seed`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> truncated_svd(const at::Tensor& A, int64_t rank,
                                                             int64_t oversample = 10,
                                                             int64_t n_iter = 2,
                                                             int64_t seed = 0);

// Referencing this symbol keeps the library linked under `-Wl,--as-needed`, where a consumer
// that reaches the ops only through the dispatcher would otherwise drop it (and its operator
// registrations) silently.
int link_anchor();

namespace detail {
// Takes the address of link_anchor from every translation unit that includes this header;
// `used` keeps optimizing compilers from deleting the otherwise unreferenced variable.
[[maybe_unused, gnu::used]] static const auto kLinkAnchor = &link_anchor;
}  // namespace detail

}  // namespace twinmerge
