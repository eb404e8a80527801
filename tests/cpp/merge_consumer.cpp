// A C++ program that uses an installed twinmerge library (tests/cpp/run.sh builds it against the
// install and runs it through ctest). It checks every op on CPU against a direct ATen
// computation, prints one line per check and exits non-zero if any check failed.
//
// One source, three variants (tests/cpp/CMakeLists.txt):
//   (default)                   calls the C++ API of <twinmerge/twinmerge.h>.
//   TM_CONSUMER_VIA_DISPATCHER  includes the header but reaches the ops only through the PyTorch
//                               dispatcher, by name, and references no twinmerge function. Linked
//                               with -Wl,--as-needed, libtwinmerge.so (whose static initializers
//                               register the ops) stays loaded only thanks to the link rule of the
//                               TwinMerge::twinmerge target or the link anchor in twinmerge.h.
//   TM_CONSUMER_NO_HEADER       control for the anchor test: dispatcher only and no header, linked
//                               with --as-needed but without the package's link rule. Expects the
//                               library to be dropped, which shows that --as-needed is in effect.
// TM_EXPECT_CUDA_KERNELS=1 says the library was built with its CUDA kernels; it matters only
// where a CUDA device is present.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#ifndef TM_CONSUMER_NO_HEADER
#include <twinmerge/twinmerge.h>
#elif !defined(TM_CONSUMER_VIA_DISPATCHER)
#define TM_CONSUMER_VIA_DISPATCHER 1
#endif

#ifndef TM_EXPECT_CUDA_KERNELS
#define TM_EXPECT_CUDA_KERNELS 0
#endif

#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace {

bool ops_registered() {
  return c10::Dispatcher::singleton().findSchema({"twinmerge::lowrank_merge_", ""}).has_value();
}

#ifndef TM_CONSUMER_NO_HEADER  // the control needs nothing but ops_registered()

// ---------------------------------------------------------------------------------------------
// The ops under test: the C++ API, or the dispatcher by name.
#ifdef TM_CONSUMER_VIA_DISPATCHER
constexpr const char* kVariant = "dispatcher only";

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor reconstruct_delta(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V) {
  static const auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "twinmerge::reconstruct_delta");
  return h.call(U, S, V);
}

void lowrank_merge_(at::Tensor& out, const at::Tensor& base, const at::Tensor& U,
                    const at::Tensor& S, const at::Tensor& V, at::IntArrayRef ranks,
                    const at::Tensor& weights) {
  static const auto h =
      op<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, at::IntArrayRef, const at::Tensor&)>("twinmerge::lowrank_merge_");
  h.call(out, base, U, S, V, ranks, weights);
}

void dense_merge_(at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                  const at::Tensor& weights) {
  static const auto h =
      op<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "twinmerge::dense_merge_");
  h.call(out, base, deltas, weights);
}

at::Tensor lowrank_mix_linear(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& U,
                              const at::Tensor& S, const at::Tensor& V, at::IntArrayRef ranks,
                              const at::Tensor& row_weights) {
  static const auto h =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                    const at::Tensor&)>("twinmerge::lowrank_mix_linear");
  return h.call(x, weight, bias, U, S, V, ranks, row_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> truncated_svd(const at::Tensor& A, int64_t rank,
                                                             int64_t oversample = 10,
                                                             int64_t n_iter = 2,
                                                             int64_t seed = 0) {
  static const auto h =
      op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t,
                                                        int64_t, int64_t)>(
          "twinmerge::truncated_svd");
  return h.call(A, rank, oversample, n_iter, seed);
}
#else
constexpr const char* kVariant = "C++ API";
using twinmerge::dense_merge_;
using twinmerge::lowrank_merge_;
using twinmerge::lowrank_mix_linear;
using twinmerge::reconstruct_delta;
using twinmerge::truncated_svd;
#endif

// ---------------------------------------------------------------------------------------------
// Checks: each prints one PASS/FAIL line.
int g_checks = 0;
int g_failures = 0;

struct CheckFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Args>
void require(bool cond, const Args&... args) {
  if (!cond) {
    std::ostringstream s;
    (s << ... << args);
    throw CheckFailure(s.str());
  }
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// `body` throws CheckFailure (or anything else) on failure and returns a detail for the PASS line.
void check(const std::string& name, const std::function<std::string()>& body) {
  ++g_checks;
  try {
    const std::string detail = body();
    std::printf("PASS %s%s%s\n", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  } catch (const CheckFailure& e) {
    ++g_failures;
    std::printf("FAIL %s: %s\n", name.c_str(), e.what());
  } catch (const c10::Error& e) {
    ++g_failures;
    std::printf("FAIL %s: unexpected c10::Error: %s\n", name.c_str(),
                first_line(e.what_without_backtrace()).c_str());
  } catch (const std::exception& e) {
    ++g_failures;
    std::printf("FAIL %s: unexpected exception: %s\n", name.c_str(), e.what());
  }
  std::fflush(stdout);
}

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2e", v);
  return buf;
}

// `got` has `want`'s shape and lies within `tol` of it (`want` in double); returns the detail.
std::string expect_close(const at::Tensor& got, const at::Tensor& want, double tol) {
  require(got.sizes() == want.sizes(), "shape ", got.sizes(), ", expected ", want.sizes());
  require(got.scalar_type() != at::kDouble || want.scalar_type() == at::kDouble,
          "reference is less precise than the result");
  const double diff = (got.to(at::kDouble).cpu() - want.to(at::kDouble).cpu()).abs().max().item<double>();
  require(std::isfinite(diff) && diff <= tol, "max |diff| = ", fmt(diff), " > ", fmt(tol));
  return "shape " + c10::str(got.sizes()) + ", max |diff| = " + fmt(diff) + " <= " + fmt(tol);
}

// ---------------------------------------------------------------------------------------------
// Problem of the brief: L = 2 layers of [m, n] = [16, 24], T = 3 experts of ranks {2, 0, 3}.
constexpr int64_t L = 2, m = 16, n = 24, T = 3;
const std::vector<int64_t> kRanks = {2, 0, 3};
constexpr int64_t K = 5;

// The expert owning each of the K concatenated columns: {0, 0, 2, 2, 2}.
at::Tensor expert_of_column(const std::vector<int64_t>& ranks) {
  std::vector<int64_t> idx;
  for (int64_t t = 0; t < static_cast<int64_t>(ranks.size()); ++t) idx.insert(idx.end(), ranks[t], t);
  return at::tensor(idx, at::kLong);
}

struct MergeInputs {
  at::Tensor base, U, S, V, w;
};

MergeInputs merge_inputs(at::ScalarType dtype) {
  return {at::randn({L, m, n}, at::kDouble).to(dtype), at::randn({L, m, K}, at::kDouble).to(dtype),
          at::rand({L, K}, at::kDouble).to(dtype), at::randn({L, n, K}, at::kDouble).to(dtype),
          at::tensor({0.7, -0.3, 1.2}, at::kDouble).to(dtype)};
}

// base + U diag(w[expert] * S) V^T, in double.
at::Tensor ref_lowrank_merge(const MergeInputs& in, const std::vector<int64_t>& ranks) {
  const auto d = [](const at::Tensor& t) { return t.to(at::kDouble).cpu(); };
  const auto coef = d(in.w).index_select(0, expert_of_column(ranks)) * d(in.S);  // [L, K]
  return d(in.base) + at::matmul(d(in.U) * coef.unsqueeze(-2), d(in.V).mT());
}

void check_lowrank_merge(at::ScalarType dtype, double tol) {
  const std::string tag = std::string(" (") + c10::toString(dtype) + ")";
  const auto in = merge_inputs(dtype);
  const auto want = ref_lowrank_merge(in, kRanks);
  check("lowrank_merge_ into a preallocated out" + tag, [&] {
    at::Tensor out = at::full({L, m, n}, NAN, in.base.options());
    const auto base_before = in.base.clone();
    lowrank_merge_(out, in.base, in.U, in.S, in.V, kRanks, in.w);
    require(at::equal(in.base, base_before), "base was modified");
    return expect_close(out, want, tol);
  });
  check("lowrank_merge_ in place (out is base)" + tag, [&] {
    at::Tensor out = in.base.clone();
    lowrank_merge_(out, out, in.U, in.S, in.V, kRanks, in.w);
    return expect_close(out, want, tol);
  });
}

void check_dense_merge() {
  check("dense_merge_ (Float)", [] {
    const auto base = at::randn({L, m, n});
    const auto deltas = at::randn({T, L, m, n});
    const auto w = at::tensor({0.5f, -1.0f, 0.25f});
    at::Tensor out = at::full({L, m, n}, NAN);
    dense_merge_(out, base, deltas, w);
    const auto want = base.to(at::kDouble) +
                      (w.to(at::kDouble).view({T, 1, 1, 1}) * deltas.to(at::kDouble)).sum(0);
    return expect_close(out, want, 1e-5);
  });
}

void check_lowrank_mix_linear() {
  check("lowrank_mix_linear (Float)", [] {
    constexpr int64_t B = 2, rows = 3;
    const auto x = at::randn({B, rows, n});
    const auto weight = at::randn({m, n}) / std::sqrt(static_cast<double>(n));
    const auto bias = at::randn({m});
    const auto U = at::randn({m, K}), S = at::rand({K}), V = at::randn({n, K});
    const auto row_weights = at::rand({B, T});
    const auto y = lowrank_mix_linear(x, weight, bias, U, S, V, kRanks, row_weights);
    const auto y_nobias =
        lowrank_mix_linear(x, weight, std::nullopt, U, S, V, kRanks, row_weights);
    // y = x W^T + b + ((x V) * (row_weights[b, expert(k)] * S[k])) U^T, in double.
    const auto d = [](const at::Tensor& t) { return t.to(at::kDouble); };
    const auto coef = d(row_weights).index_select(1, expert_of_column(kRanks)) * d(S);  // [B, K]
    const auto lowrank = at::matmul(at::matmul(d(x), d(V)) * coef.unsqueeze(1), d(U).t());
    const auto want_nobias = at::matmul(d(x), d(weight).t()) + lowrank;
    expect_close(y_nobias, want_nobias, 1e-4);
    return expect_close(y, want_nobias + d(bias), 1e-4) + " (also without bias)";
  });
}

void check_reconstruct_delta() {
  check("reconstruct_delta (Float)", [] {
    constexpr int64_t r = 4;
    const auto U = at::randn({L, m, r}), S = at::rand({L, r}), V = at::randn({L, n, r});
    const auto delta = reconstruct_delta(U, S, V);
    const auto want = at::matmul(U.to(at::kDouble) * S.to(at::kDouble).unsqueeze(-2),
                                 V.to(at::kDouble).mT());
    return expect_close(delta, want, 1e-5);
  });
}

// ||A - U diag(S) V^T||_F / ||A||_F, batched over the leading dim, the worst layer.
double relative_error(const at::Tensor& A, const at::Tensor& U, const at::Tensor& S,
                      const at::Tensor& V) {
  const auto d = [](const at::Tensor& t) { return t.to(at::kDouble).cpu(); };
  const auto approx = at::matmul(d(U) * d(S).unsqueeze(-2), d(V).mT());
  return ((d(A) - approx).flatten(1).norm(2, 1) / d(A).flatten(1).norm(2, 1)).max().item<double>();
}

void check_svd_shapes(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, int64_t r) {
  require(U.sizes() == at::IntArrayRef({L, m, r}), "U has shape ", U.sizes());
  require(S.sizes() == at::IntArrayRef({L, r}), "S has shape ", S.sizes());
  require(V.sizes() == at::IntArrayRef({L, n, r}), "V has shape ", V.sizes());
}

void check_truncated_svd() {
  // Exactly rank 3: the randomized sketch (3 + 10 < min(m, n) columns) captures it.
  check("truncated_svd of a rank-3 matrix (Float)", [] {
    constexpr int64_t r = 3;
    const auto A = at::matmul(at::randn({L, m, r}), at::randn({L, r, n}));
    const auto [U, S, V] = truncated_svd(A, r);
    check_svd_shapes(U, S, V, r);
    require((S.narrow(-1, 0, r - 1) >= S.narrow(-1, 1, r - 1)).all().item<bool>() &&
                (S >= 0).all().item<bool>(),
            "S is not non-negative and descending: ", S);
    const auto UtU = at::matmul(U.mT(), U), VtV = at::matmul(V.mT(), V);
    const auto eye = at::eye(r).expand({L, r, r});
    const double ortho = std::max((UtU - eye).abs().max().item<double>(),
                                  (VtV - eye).abs().max().item<double>());
    require(ortho < 1e-4, "U or V is not orthonormal: max |X^T X - I| = ", fmt(ortho));
    const double err = relative_error(A, U, S, V);
    require(err < 1e-4, "relative reconstruction error ", fmt(err), " >= 1e-4");
    const auto [U2, S2, V2] = truncated_svd(A, r, 10, 2, 0);
    require(at::equal(U, U2) && at::equal(S, S2) && at::equal(V, V2),
            "two calls with the same seed differ");
    return "shapes U " + c10::str(U.sizes()) + ", S " + c10::str(S.sizes()) + ", V " +
           c10::str(V.sizes()) + ", relative error " + fmt(err) + ", deterministic";
  });
  // Full rank: the rank-4 error must be near the optimum of the exact SVD (loosely).
  check("truncated_svd of a full-rank matrix vs exact SVD (Float)", [] {
    constexpr int64_t r = 4;
    const auto A = at::randn({L, m, n});
    const auto [U, S, V] = truncated_svd(A, r);
    check_svd_shapes(U, S, V, r);
    const auto sv = at::linalg_svdvals(A.to(at::kDouble));  // [L, min(m, n)]
    const auto tail = sv.narrow(-1, r, sv.size(-1) - r);
    const double optimal = (tail.pow(2).sum(-1).sqrt() / sv.pow(2).sum(-1).sqrt()).max().item<double>();
    const double err = relative_error(A, U, S, V);
    require(err <= 1.25 * optimal + 1e-6, "relative error ", fmt(err), " > 1.25 x optimal ",
            fmt(optimal));
    return "relative error " + fmt(err) + ", optimal " + fmt(optimal);
  });
}

void check_bad_ranks() {
  check("lowrank_merge_ with ranks summing to the wrong K throws c10::Error", [] {
    const auto in = merge_inputs(at::kFloat);
    at::Tensor out = at::empty_like(in.base);
    const std::vector<int64_t> bad = {2, 0, 2};  // sums to 4, K = 5
    try {
      lowrank_merge_(out, in.base, in.U, in.S, in.V, bad, in.w);
    } catch (const c10::Error& e) {
      const std::string msg = first_line(e.what_without_backtrace());
      require(msg.find("lowrank_merge_") != std::string::npos,
              "message does not name lowrank_merge_: ", msg);
      return "\"" + msg + "\"";
    }
    throw CheckFailure("no exception");
  });
}

// The message of the c10::Error that `call` throws, required to contain `expected`.
std::string expect_error(const std::function<void()>& call, const std::string& expected) {
  try {
    call();
  } catch (const c10::Error& e) {
    const std::string msg = first_line(e.what_without_backtrace());
    require(msg.find(expected) != std::string::npos, "expected \"", expected, "\", got \"", msg,
            "\"");
    return "\"" + msg + "\"";
  }
  throw CheckFailure("no exception");
}

// What a C++ caller gets for a sparse argument, an argument that requires grad, and an in-place
// merge: the rules of the Python API, since both reach the ops through the dispatcher.
void check_dispatcher_rules() {
  check("lowrank_merge_ names a sparse argument", [] {
    const auto in = merge_inputs(at::kFloat);
    at::Tensor out = at::empty_like(in.base);
    return expect_error(
        [&] { lowrank_merge_(out, in.base, in.U.to_sparse(), in.S, in.V, kRanks, in.w); },
        "lowrank_merge_: U_cat must be a strided (dense) tensor, got layout torch.sparse_coo");
  });
  check("lowrank_merge_ refuses weights that require grad (grad mode on)", [] {
    const auto in = merge_inputs(at::kFloat);
    at::Tensor out = at::empty_like(in.base);
    at::Tensor w = in.w.clone();
    w.set_requires_grad(true);
    return expect_error([&] { lowrank_merge_(out, in.base, in.U, in.S, in.V, kRanks, w); },
                        "lowrank_merge_: weights must not require grad while grad mode is on");
  });
  check("lowrank_merge_ in place bumps out's version counter", [] {
    const auto in = merge_inputs(at::kFloat);
    at::Tensor out = in.base.clone();
    const auto before = out._version();
    lowrank_merge_(out, out, in.U, in.S, in.V, kRanks, in.w);
    require(out._version() == before + 1, "version ", before, " -> ", out._version());
    return "version " + std::to_string(before) + " -> " + std::to_string(out._version());
  });
}

// Without a device: every op's CUDA kernel is the one the build promises, from csrc/cuda/ or, for
// a CPU-only build, from csrc/no_cuda.cpp (the dispatcher records where each was registered).
void check_cuda_registrations() {
  const char* expected = TM_EXPECT_CUDA_KERNELS ? "csrc/cuda/" : "csrc/no_cuda.cpp";
  check(std::string("CUDA kernels registered from ") + expected, [&] {
    for (const char* name : {"twinmerge::reconstruct_delta", "twinmerge::lowrank_merge_",
                             "twinmerge::dense_merge_", "twinmerge::lowrank_mix_linear",
                             "twinmerge::truncated_svd"}) {
      const auto h = c10::Dispatcher::singleton().findSchema({name, ""});
      require(h.has_value(), name, " is not registered");
      require(h->hasKernelForDispatchKey(c10::DispatchKey::CUDA), name, " has no CUDA kernel");
      std::istringstream state(h->dumpState());
      std::string line, cuda_line;
      while (std::getline(state, line)) {
        if (line.rfind("CUDA: ", 0) == 0) cuda_line = line;
      }
      require(cuda_line.find(expected) != std::string::npos, name, ": expected a CUDA kernel from ",
              expected, ", got \"", cuda_line, "\"");
    }
    return "all 5 ops";
  });
}

// With a CUDA device: the CUDA kernels against the CPU results, or, for a CPU-only build, the
// error of csrc/no_cuda.cpp.
void check_cuda() {
  if (!at::hasCUDA()) {
    std::printf("SKIP cuda checks: no CUDA device\n");
    return;
  }
  const at::Device cuda(at::kCUDA, 0);
  if (!TM_EXPECT_CUDA_KERNELS) {
    check("CUDA tensors raise the built-without-CUDA error", [&] {
      const auto in = merge_inputs(at::kFloat);
      at::Tensor out = in.base.to(cuda);
      try {
        lowrank_merge_(out, out, in.U.to(cuda), in.S.to(cuda), in.V.to(cuda), kRanks, in.w.to(cuda));
      } catch (const c10::Error& e) {
        const std::string msg = first_line(e.what_without_backtrace());
        require(msg.find("built without CUDA support") != std::string::npos,
                "unexpected message: ", msg);
        return "\"" + msg + "\"";
      }
      throw CheckFailure("no exception");
    });
    return;
  }
  check("lowrank_merge_ on CUDA (Float)", [&] {
    const auto in = merge_inputs(at::kFloat);
    at::Tensor out = at::full({L, m, n}, NAN, in.base.options().device(cuda));
    lowrank_merge_(out, in.base.to(cuda), in.U.to(cuda), in.S.to(cuda), in.V.to(cuda), kRanks,
                   in.w.to(cuda));
    return expect_close(out, ref_lowrank_merge(in, kRanks), 1e-4);
  });
  check("dense_merge_ on CUDA (Float)", [&] {
    const auto base = at::randn({L, m, n}), deltas = at::randn({T, L, m, n});
    const auto w = at::tensor({0.5f, -1.0f, 0.25f});
    at::Tensor out = at::empty({L, m, n}, base.options().device(cuda));
    dense_merge_(out, base.to(cuda), deltas.to(cuda), w.to(cuda));
    at::Tensor want = at::empty_like(base);
    dense_merge_(want, base, deltas, w);
    return expect_close(out, want, 1e-5);
  });
  check("lowrank_mix_linear on CUDA (Float)", [&] {
    const auto x = at::randn({2, 3, n}), weight = at::randn({m, n}), bias = at::randn({m});
    const auto U = at::randn({m, K}), S = at::rand({K}), V = at::randn({n, K});
    const auto rw = at::rand({2, T});
    const auto y = lowrank_mix_linear(x.to(cuda), weight.to(cuda), bias.to(cuda), U.to(cuda),
                                      S.to(cuda), V.to(cuda), kRanks, rw.to(cuda));
    return expect_close(y, lowrank_mix_linear(x, weight, bias, U, S, V, kRanks, rw), 1e-4);
  });
  check("reconstruct_delta on CUDA (Float)", [&] {
    const auto U = at::randn({L, m, 4}), S = at::rand({L, 4}), V = at::randn({L, n, 4});
    return expect_close(reconstruct_delta(U.to(cuda), S.to(cuda), V.to(cuda)),
                        reconstruct_delta(U, S, V), 1e-5);
  });
  check("truncated_svd on CUDA of a rank-3 matrix (Float)", [&] {
    const auto A = at::matmul(at::randn({L, m, 3}), at::randn({L, 3, n})).to(cuda);
    const auto [U, S, V] = truncated_svd(A, 3);
    check_svd_shapes(U, S, V, 3);
    require(U.is_cuda() && S.is_cuda() && V.is_cuda(), "results not on CUDA");
    const double err = relative_error(A, U, S, V);
    require(err < 1e-4, "relative reconstruction error ", fmt(err), " >= 1e-4");
    return "relative error " + fmt(err);
  });
}

#endif  // TM_CONSUMER_NO_HEADER

}  // namespace

#ifdef TM_CONSUMER_NO_HEADER
int main() {
  std::printf("twinmerge consumer (control: dispatcher only, no header, linked with --as-needed)\n");
  if (ops_registered()) {
    std::printf(
        "FAIL control: the twinmerge ops are registered although nothing references "
        "libtwinmerge.so, so -Wl,--as-needed did not drop it and the header-anchor test shows "
        "nothing on this toolchain\n");
    return 1;
  }
  std::printf("PASS control: without the header's link anchor, -Wl,--as-needed dropped "
              "libtwinmerge.so (no twinmerge ops registered)\n");
  return 0;
}
#else
int main() {
  std::printf("twinmerge consumer (%s), CUDA kernels expected: %s\n", kVariant,
              TM_EXPECT_CUDA_KERNELS ? "yes" : "no");
  check("twinmerge ops registered", [] {
    require(ops_registered(),
            "twinmerge::lowrank_merge_ is not in the dispatcher: libtwinmerge.so was not loaded "
            "(dropped by -Wl,--as-needed?)");
    return "";
  });
  if (g_failures == 0) {
    at::manual_seed(0);
    check_lowrank_merge(at::kFloat, 1e-5);
    check_lowrank_merge(at::kDouble, 1e-12);
    check_dense_merge();
    check_lowrank_mix_linear();
    check_reconstruct_delta();
    check_truncated_svd();
    check_bad_ranks();
    check_dispatcher_rules();
    check_cuda_registrations();
    check_cuda();
  }
  std::printf("%s: %d of %d checks failed\n", g_failures == 0 ? "OK" : "FAILED", g_failures,
              g_checks);
  return g_failures == 0 ? 0 : 1;
}
#endif
