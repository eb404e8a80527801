// Kernels for the tensor kinds no twinmerge op supports: sparse, mkldnn and nested layouts and
// quantized dtypes, on CPU and CUDA. Without them such a tensor meets the dispatcher's generic
// "Could not run 'twinmerge::...' with arguments from the 'SparseCPU' backend", which does not
// say which argument is at fault; from Python, C++ and inside inference mode alike, these name
// it and print what it is. (Other device types are refused by the Python wrappers; real meta
// tensors by the fake kernels, twinmerge_ext/ops.py.)
#include <torch/library.h>

#include <string>

namespace {

constexpr const char* kFloating = "float64, float32, float16 or bfloat16";

const char* layout_name(c10::Layout layout) {
  switch (layout) {
    case c10::kStrided: return "torch.strided";
    case c10::kSparse: return "torch.sparse_coo";
    case c10::kSparseCsr: return "torch.sparse_csr";
    case c10::kSparseCsc: return "torch.sparse_csc";
    case c10::kSparseBsr: return "torch.sparse_bsr";
    case c10::kSparseBsc: return "torch.sparse_bsc";
    case c10::kMkldnn: return "torch._mkldnn";
    case c10::kJagged: return "torch.jagged";
    default: return "an unknown layout";
  }
}

void unsupported_tensor(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  std::string name = op.schema().name();
  name = name.substr(name.find("::") + 2);  // "twinmerge::lowrank_merge_" -> "lowrank_merge_"
  const auto& arguments = op.schema().arguments();
  const auto inputs = torch::jit::last(*stack, arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (!inputs[i].isTensor()) continue;
    const at::Tensor& t = inputs[i].toTensor();
    const std::string& arg = arguments[i].name();
    TORCH_CHECK(!t.is_nested(), name, ": ", arg, " must be a strided (dense) tensor, got a ",
                "nested tensor");
    TORCH_CHECK(t.layout() == c10::kStrided, name, ": ", arg,
                " must be a strided (dense) tensor, got layout ", layout_name(t.layout()));
    TORCH_CHECK(!t.is_quantized(), name, ": ", arg, " must be ", kFloating, ", got ",
                t.scalar_type());
  }
  TORCH_CHECK(false, name, ": its tensors must be strided (dense) tensors of a floating dtype on a "
              "cpu or cuda device, got a call dispatched to ", keys.highestPriorityTypeId());
}

}  // namespace

#define TM_REFUSE(KEY)                                                                   \
  TORCH_LIBRARY_IMPL(twinmerge, KEY, m) {                                                \
    for (const char* op : {"reconstruct_delta", "lowrank_merge_", "dense_merge_",        \
                           "lowrank_mix_linear", "truncated_svd"}) {                     \
      m.impl(op, torch::CppFunction::makeFromBoxedFunction<&unsupported_tensor>());      \
    }                                                                                    \
  }

TM_REFUSE(SparseCPU)
TM_REFUSE(SparseCUDA)
TM_REFUSE(SparseMeta)
TM_REFUSE(SparseCsrCPU)
TM_REFUSE(SparseCsrCUDA)
TM_REFUSE(SparseCsrMeta)
TM_REFUSE(MkldnnCPU)
TM_REFUSE(NestedTensorCPU)
TM_REFUSE(NestedTensorCUDA)
TM_REFUSE(NestedTensorMeta)
TM_REFUSE(QuantizedCPU)
TM_REFUSE(QuantizedCUDA)
