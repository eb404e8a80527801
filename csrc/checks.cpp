#include "checks.h"

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

namespace twinmerge {

ExpertOffsets expert_offsets(const char* op, at::IntArrayRef ranks, int64_t K, int64_t T) {
  TM_CHECK(op, !ranks.empty(), "ranks must name at least one expert, got []");
  TM_CHECK(op, static_cast<int64_t>(ranks.size()) <= kMaxExperts, "ranks may name at most ",
           kMaxExperts, " experts, got ", ranks.size());
  TM_CHECK(op, static_cast<int64_t>(ranks.size()) == T,
           "ranks must have one entry per mixing weight (", T, "), got ", ranks.size(),
           " entries: ", ranks);
  ExpertOffsets off{};
  off.num_experts = static_cast<int32_t>(ranks.size());
  int64_t acc = 0;
  for (size_t t = 0; t < ranks.size(); ++t) {
    TM_CHECK(op, ranks[t] >= 0, "ranks must be non-negative, got ranks[", t, "] = ", ranks[t]);
    off.offset[t] = static_cast<int32_t>(acc);
    acc += ranks[t];
  }
  off.offset[ranks.size()] = static_cast<int32_t>(acc);
  TM_CHECK(op, acc == K, "ranks must sum to the factor width K = ", K, ", got sum(", ranks,
           ") = ", acc);
  return off;
}

namespace {

// at::get_overlap_status answers TooHard for any non-dense tensor, even one in another storage,
// so tensors in different storages are told apart first.
bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage()) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  return at::get_overlap_status(a, b) != at::MemOverlapStatus::No;
}

}  // namespace

void check_inplace_output(const char* op, const at::Tensor& out, const at::Tensor& base) {
  TM_CHECK(op, out.is_contiguous(),
           "out must be contiguous (it is written in place, never through a copy), got strides ",
           out.strides());
  if (!shares_memory(out, base)) return;
  TM_CHECK(op,
           out.data_ptr() == base.data_ptr() && out.strides() == base.strides() &&
               out.sizes() == base.sizes(),
           "out must either be base itself or not overlap it, got a partial overlap: out at "
           "storage offset ", out.storage_offset(), " with strides ", out.strides(),
           ", base at storage offset ", base.storage_offset(), " with strides ", base.strides());
}

void check_no_overlap(const char* op, const char* name, const at::Tensor& out, const at::Tensor& t) {
  TM_CHECK(op, !shares_memory(out, t), name, " must not share memory with out (out: storage offset ",
           out.storage_offset(), ", shape ", out.sizes(), "; ", name, ": storage offset ",
           t.storage_offset(), ", shape ", t.sizes(), ")");
}

namespace {

void check_same_leading(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef lead, int64_t trailing) {
  TM_CHECK(op, t.dim() == static_cast<int64_t>(lead.size()) + trailing, name, " must be a ",
           lead.size() + trailing, "-D tensor (leading dims ", lead, "), got shape ", t.sizes());
  TM_CHECK(op, t.sizes().slice(0, lead.size()) == lead, name, " must have leading dims ", lead,
           ", got shape ", t.sizes());
}

}  // namespace

MergeShape check_lowrank_merge(const at::Tensor& out, const at::Tensor& base, const at::Tensor& U_cat,
                               const at::Tensor& S_cat, const at::Tensor& V_cat, at::IntArrayRef ranks,
                               const at::Tensor& weights) {
  constexpr const char* op = "lowrank_merge_";
  TM_CHECK(op, out.dim() >= 2, "out must have shape [..., m, n], got shape ", out.sizes());
  TM_CHECK(op, base.sizes() == out.sizes(), "base must have the shape of out (", out.sizes(),
           "), got ", base.sizes());
  TM_CHECK_FLOATING(op, out);
  TM_CHECK_SAME_DTYPE(op, out, base);
  TM_CHECK_SAME_DTYPE(op, out, U_cat);
  TM_CHECK_SAME_DTYPE(op, out, V_cat);
  TM_CHECK_FLOATING(op, S_cat);
  TM_CHECK_FLOATING(op, weights);
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"U_cat", &U_cat}, {"S_cat", &S_cat}, {"V_cat", &V_cat}, {"weights", &weights}};
  TM_CHECK_SAME_DEVICE(op, out, base);
  for (const auto& [name, t] : inputs) {
    TM_CHECK(op, t->device() == out.device(), name, " must be on the device of out (",
             out.device(), "), got ", t->device());
  }
  const auto lead = out.sizes().slice(0, out.dim() - 2);
  const int64_t m = out.size(-2), n = out.size(-1);
  check_same_leading(op, "U_cat", U_cat, lead, 2);
  check_same_leading(op, "V_cat", V_cat, lead, 2);
  check_same_leading(op, "S_cat", S_cat, lead, 1);
  const int64_t K = U_cat.size(-1);
  TM_CHECK(op, U_cat.size(-2) == m, "U_cat must have shape [..., m=", m, ", K], got ", U_cat.sizes());
  TM_CHECK(op, V_cat.size(-2) == n && V_cat.size(-1) == K, "V_cat must have shape [..., n=", n, ", K=", K,
           "], got ", V_cat.sizes());
  TM_CHECK(op, S_cat.size(-1) == K, "S_cat must have shape [..., K=", K, "], got ", S_cat.sizes());
  TM_CHECK(op, weights.dim() == 1, "weights must be a 1-D tensor [T], got shape ",
           weights.sizes());
  check_inplace_output(op, out, base);
  for (const auto& [name, t] : inputs) check_no_overlap(op, name, out, *t);
  const int64_t L = std::accumulate(lead.begin(), lead.end(), int64_t{1}, std::multiplies<>());
  return {L, m, n, K, expert_offsets(op, ranks, K, weights.size(0))};
}

void check_dense_merge(const at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                       const at::Tensor& weights) {
  constexpr const char* op = "dense_merge_";
  TM_CHECK(op, base.sizes() == out.sizes(), "base must have the shape of out (", out.sizes(),
           "), got ", base.sizes());
  TM_CHECK_FLOATING(op, out);
  TM_CHECK_SAME_DTYPE(op, out, base);
  TM_CHECK_SAME_DTYPE(op, out, deltas);
  TM_CHECK_FLOATING(op, weights);
  TM_CHECK_SAME_DEVICE(op, out, base);
  TM_CHECK_SAME_DEVICE(op, out, deltas);
  TM_CHECK_SAME_DEVICE(op, out, weights);
  TM_CHECK(op, weights.dim() == 1, "weights must be a 1-D tensor [T], got shape ",
           weights.sizes());
  TM_CHECK(op, weights.size(0) >= 1, "weights must hold at least one expert, got shape ",
           weights.sizes());
  TM_CHECK(op,
           deltas.dim() == out.dim() + 1 && deltas.size(0) == weights.size(0) &&
               deltas.sizes().slice(1) == out.sizes(),
           "deltas must have shape [T=", weights.size(0), ", *out.shape=", out.sizes(), "], got ",
           deltas.sizes());
  check_inplace_output(op, out, base);
  check_no_overlap(op, "deltas", out, deltas);
  check_no_overlap(op, "weights", out, weights);
}

MixShape check_lowrank_mix_linear(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& U_cat,
                                  const at::Tensor& S_cat, const at::Tensor& V_cat, at::IntArrayRef ranks,
                                  const at::Tensor& row_weights) {
  constexpr const char* op = "lowrank_mix_linear";
  TM_CHECK(op, x.dim() >= 2, "x must have shape [B, ..., n], got shape ", x.sizes());
  TM_CHECK_FLOATING(op, x);
  TM_CHECK_SAME_DTYPE(op, x, weight);
  TM_CHECK_SAME_DTYPE(op, x, U_cat);
  TM_CHECK_SAME_DTYPE(op, x, V_cat);
  TM_CHECK_FLOATING(op, S_cat);
  TM_CHECK_FLOATING(op, row_weights);
  TM_CHECK_SAME_DEVICE(op, x, weight);
  TM_CHECK_SAME_DEVICE(op, x, U_cat);
  TM_CHECK_SAME_DEVICE(op, x, S_cat);
  TM_CHECK_SAME_DEVICE(op, x, V_cat);
  TM_CHECK_SAME_DEVICE(op, x, row_weights);
  TM_CHECK_DIM(op, weight, 2);
  TM_CHECK_DIM(op, U_cat, 2);
  TM_CHECK_DIM(op, S_cat, 1);
  TM_CHECK_DIM(op, V_cat, 2);
  TM_CHECK_DIM(op, row_weights, 2);
  const int64_t m = weight.size(0), n = weight.size(1), K = U_cat.size(1), B = x.size(0);
  TM_CHECK(op, x.size(-1) == n, "x must have n = weight.size(1) = ", n,
           " features in its last dim, got shape ", x.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TM_CHECK(op, b.scalar_type() == x.scalar_type(), "bias must have the dtype of x (",
             x.scalar_type(), "), got ", b.scalar_type());
    TM_CHECK(op, b.device() == x.device(), "bias must be on the device of x (", x.device(),
             "), got ", b.device());
    TM_CHECK(op, b.dim() == 1 && b.size(0) == m, "bias must have shape [m=", m, "], got ",
             b.sizes());
  }
  TM_CHECK(op, U_cat.size(0) == m, "U_cat must have shape [m=", m, ", K], got ", U_cat.sizes());
  TM_CHECK(op, V_cat.size(0) == n && V_cat.size(1) == K, "V_cat must have shape [n=", n, ", K=", K,
           "], got ", V_cat.sizes());
  TM_CHECK(op, S_cat.size(0) == K, "S_cat must have shape [K=", K, "], got ", S_cat.sizes());
  TM_CHECK(op, row_weights.size(0) == B, "row_weights must have one row per batch entry of x (B=",
           B, "), got shape ", row_weights.sizes());
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  const int64_t rows = std::accumulate(lead.begin(), lead.end(), int64_t{1}, std::multiplies<>());
  return {B, rows, m, n, K, expert_offsets(op, ranks, K, row_weights.size(1))};
}

DeltaShape check_reconstruct_delta(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V) {
  constexpr const char* op = "reconstruct_delta";
  TM_CHECK(op, U.dim() >= 2, "U must have shape [..., m, r], got shape ", U.sizes());
  TM_CHECK_FLOATING(op, U);
  TM_CHECK_SAME_DTYPE(op, U, V);
  TM_CHECK_FLOATING(op, S);
  TM_CHECK_SAME_DEVICE(op, U, S);
  TM_CHECK_SAME_DEVICE(op, U, V);
  const auto lead = U.sizes().slice(0, U.dim() - 2);
  check_same_leading(op, "V", V, lead, 2);
  check_same_leading(op, "S", S, lead, 1);
  const int64_t r = U.size(-1);
  TM_CHECK(op, V.size(-1) == r, "V must have shape [..., n, r=", r, "], got ", V.sizes());
  TM_CHECK(op, S.size(-1) == r, "S must have shape [..., r=", r, "], got ", S.sizes());
  const int64_t batch =
      std::accumulate(lead.begin(), lead.end(), int64_t{1}, std::multiplies<>());
  return {batch, U.size(-2), V.size(-2), r};
}

SvdShape check_truncated_svd(const at::Tensor& A, int64_t rank, int64_t oversample,
                             int64_t n_iter) {
  constexpr const char* op = "truncated_svd";
  TM_CHECK(op, A.dim() >= 2, "A must have shape [..., m, n], got shape ", A.sizes());
  TM_CHECK_FLOATING(op, A);
  TM_CHECK(op, rank >= 0, "rank must be >= 0 (it is clamped to [1, min(m, n)]), got ", rank);
  TM_CHECK(op, oversample >= 0, "oversample must be >= 0, got ", oversample);
  TM_CHECK(op, n_iter >= 0, "n_iter must be >= 0, got ", n_iter);
  const int64_t m = A.size(-2), n = A.size(-1), k = std::min(m, n);
  const int64_t r = k == 0 ? 0 : std::clamp<int64_t>(rank, 1, k);
  const int64_t batch = std::accumulate(A.sizes().begin(), A.sizes().end() - 2, int64_t{1},
                                        std::multiplies<>());
  return {batch, m, n, r, std::min(r + oversample, k)};
}

void check_finite_matrices(const char* op, at::IntArrayRef lead, const at::Tensor& finite) {
  const auto flags = finite.to(at::kBool).contiguous();
  const bool* ok = flags.const_data_ptr<bool>();
  const int64_t batch = flags.numel();
  const int64_t bad = std::count(ok, ok + batch, false);
  if (bad == 0) return;
  if (lead.empty()) {
    TM_CHECK(op, false, "A must have finite entries only (the SVD of a matrix with NaN or Inf is "
             "undefined), got NaN or Inf entries");
  }
  const int64_t first = std::find(ok, ok + batch, false) - ok;
  std::vector<int64_t> index(lead.size());
  for (int64_t d = static_cast<int64_t>(lead.size()) - 1, rest = first; d >= 0; --d) {
    index[d] = rest % lead[d];
    rest /= lead[d];
  }
  TM_CHECK(op, false, "A must have finite entries only (the SVD of a matrix with NaN or Inf is "
           "undefined), got NaN or Inf entries in the matrix at leading index ", at::IntArrayRef(index),
           " (batch index ", first, " of ", batch, ")",
           bad > 1 ? " and in " + std::to_string(bad - 1) + " more" : std::string());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_outputs(const at::Tensor& A, int64_t r,
                                                           const at::Tensor& U,
                                                           const at::Tensor& S,
                                                           const at::Tensor& V) {
  const auto lead = A.sizes().slice(0, A.dim() - 2);
  auto sizes = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> s(lead.begin(), lead.end());
    s.insert(s.end(), tail);
    return s;
  };
  const auto u_sizes = sizes({A.size(-2), r}), s_sizes = sizes({r}), v_sizes = sizes({A.size(-1), r});
  if (!U.defined()) {
    return {at::zeros(u_sizes, A.options()), at::zeros(s_sizes, A.options()),
            at::zeros(v_sizes, A.options())};
  }
  const auto finish = [&](const at::Tensor& t, const std::vector<int64_t>& s) {
    return t.to(A.scalar_type()).reshape(s).contiguous();
  };
  return {finish(U, u_sizes), finish(S, s_sizes), finish(V, v_sizes)};
}

}  // namespace twinmerge
