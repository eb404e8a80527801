// Compiled only into CPU-only builds: every op answers CUDA inputs with an error that says why,
// instead of the dispatcher's generic "could not run ... with arguments from the 'CUDA' backend".
#include <torch/library.h>

namespace {

void built_without_cuda(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(),
              ": got CUDA tensors, but twinmerge_ext was built without CUDA support (CPU-only "
              "torch, no nvcc found, or FORCE_ONLY_CPU=1). Rebuild with a CUDA build of torch and "
              "CUDA_HOME set, e.g. `FORCE_CUDA=1 pip install --no-build-isolation -e .`");
}

}  // namespace

TORCH_LIBRARY_IMPL(twinmerge, CUDA, m) {
  for (const char* name : {"reconstruct_delta", "lowrank_merge_", "dense_merge_",
                           "lowrank_mix_linear", "truncated_svd"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&built_without_cuda>());
  }
}
