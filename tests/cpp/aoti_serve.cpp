// Serves an AOTInductor package of a TwinMergedModule from C++, as a serving stack would: loads it
// with torch::inductor::AOTIModelPackageLoader, runs mixed batches (each row its own mixing
// weights) and checks the logits against the eager Python wrapper's.
//
//   aoti_serve <package.pt2> <reference.pt>
//
// The package and the reference come from tests/cpp/make_aoti_package.py (the ctest fixture
// aoti_package). The package calls the twinmerge operators by name through AOTInductor's proxy
// executor, i.e. through the dispatcher: they must be registered in this process, which linking
// TwinMerge::twinmerge does (its static initializers). Prints one line per check and exits
// non-zero if any failed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>

#include <twinmerge/twinmerge.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

std::unordered_map<std::string, at::Tensor> load_reference(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("aoti_serve: cannot open reference file " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::unordered_map<std::string, at::Tensor> out;
  for (const auto& item : torch::pickle_load(bytes).toGenericDict()) {
    out.emplace(item.key().toStringRef(), item.value().toTensor());
  }
  return out;
}

const at::Tensor& get(const std::unordered_map<std::string, at::Tensor>& ref,
                      const std::string& key) {
  auto it = ref.find(key);
  if (it == ref.end()) throw std::runtime_error("aoti_serve: reference has no tensor " + key);
  return it->second;
}

// One mixed batch: the package's logits against the eager wrapper's, within fp32 tolerance
// (AOTInductor's fused kernels round differently: ~1e-6 on logits of magnitude ~1).
void serve_case(torch::inductor::AOTIModelPackageLoader& loader,
                const std::unordered_map<std::string, at::Tensor>& ref, const std::string& c) {
  const auto& ids = get(ref, c + "_input_ids");
  const auto& mask = get(ref, c + "_attention_mask");
  const auto& weights = get(ref, c + "_mix_weights");
  const auto& expected = get(ref, c + "_logits");
  auto out = loader.run({ids, mask, weights});
  check(out.size() == 1, "case " + c + ": one output, got " + std::to_string(out.size()));
  if (out.empty()) return;
  const auto& logits = out[0];
  check(logits.sizes() == expected.sizes(),
        "case " + c + ": logits shape " + c10::str(logits.sizes()) + " == expected " +
            c10::str(expected.sizes()));
  if (logits.sizes() != expected.sizes()) return;
  const double err = (logits - expected).abs().max().item<double>();
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  const double tol = 1e-5 * scale;
  char line[200];
  std::snprintf(line, sizeof line,
                "case %s: B=%lld L=%lld, rows with different weights: max abs error %.3g "
                "(tolerance %.1g)",
                c.c_str(), static_cast<long long>(ids.size(0)),
                static_cast<long long>(ids.size(1)), err, tol);
  check(err <= tol, line);
  // Each row is its own model: row 0 alone gives row 0 of the batch.
  auto alone = loader.run({ids.slice(0, 0, 1), mask.slice(0, 0, 1), weights.slice(0, 0, 1)});
  const double row_err = (alone[0] - logits.slice(0, 0, 1)).abs().max().item<double>();
  std::snprintf(line, sizeof line, "case %s: row 0 served alone (B=1) equals its row in the batch "
                "(max abs difference %.3g)", c.c_str(), row_err);
  check(row_err <= tol, line);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <package.pt2> <reference.pt>\n", argv[0]);
    return 2;
  }
  try {
    auto& dispatcher = c10::Dispatcher::singleton();
    check(dispatcher.findSchema({"twinmerge::lowrank_mix_linear", ""}).has_value(),
          "twinmerge ops registered in this process (libtwinmerge linked)");
    const auto ref = load_reference(argv[2]);
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    auto meta = loader.get_metadata();
    check(meta["twinmerge.inputs"] == "input_ids,attention_mask,mix_weights",
          "package metadata twinmerge.inputs = '" + meta["twinmerge.inputs"] + "'");
    check(meta["twinmerge.dynamic"] == "batch,length",
          "package metadata twinmerge.dynamic = '" + meta["twinmerge.dynamic"] + "'");
    serve_case(loader, ref, "a");
    serve_case(loader, ref, "b");

    // The exported NaN check: a weight row with NaN raises, naming mix_weights.
    const auto& w = get(ref, "b_mix_weights");
    auto bad = w.clone();
    bad[1][0] = std::numeric_limits<float>::quiet_NaN();
    std::string error;
    try {
      loader.run({get(ref, "b_input_ids"), get(ref, "b_attention_mask"), bad});
    } catch (const std::exception& e) {
      error = e.what();
    }
    check(error.find("mix_weights has NaN/Inf entries") != std::string::npos,
          "NaN in mix_weights raises: '" + error.substr(0, error.find('\n')) + "'");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "aoti_serve: %s\n", e.what());
    return 1;
  }
  std::printf("%s\n", failures ? "aoti_serve: FAILED" : "aoti_serve: all checks passed");
  return failures ? 1 : 0;
}
