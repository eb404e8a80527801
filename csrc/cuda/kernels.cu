// Elementwise kernels of the twinmerge CUDA ops. The GEMMs themselves are cuBLAS calls (blas.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "kernels.h"

namespace twinmerge::cuda {
namespace {

constexpr int kThreads = 256;

// Grid-stride loops: enough blocks to fill the device, never more than there is work.
int64_t num_blocks(int64_t n) {
  const int64_t fill = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, fill));
}

__device__ __forceinline__ int expert_of(const ExpertOffsets& off, int64_t k) {
  int t = 0;
  while (t + 1 < off.num_experts && off.offset[t + 1] <= k) ++t;
  return t;
}

template <typename opmath_t>
__global__ void mixing_coefficients_kernel(const opmath_t* __restrict__ w, int64_t w_stride,
                                           const opmath_t* __restrict__ S, int64_t s_stride,
                                           const ExpertOffsets off, int64_t B, int64_t K,
                                           opmath_t* __restrict__ coef) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < B * K;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / K, k = i - b * K;
    coef[i] = w[b * w_stride + expert_of(off, k)] * S[b * s_stride + k];
  }
}

template <typename in_t, typename out_t, typename opmath_t>
__global__ void scale_columns_kernel(const in_t* __restrict__ in, out_t* __restrict__ out,
                                     const opmath_t* __restrict__ coef, int64_t rows_per_group,
                                     int64_t K, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / K, k = i - row * K;
    out[i] = static_cast<out_t>(static_cast<opmath_t>(in[i]) * coef[(row / rows_per_group) * K + k]);
  }
}

template <typename scalar_t, typename opmath_t>
__global__ void dense_merge_kernel(scalar_t* out, const scalar_t* base,
                                   const scalar_t* __restrict__ deltas,
                                   const opmath_t* __restrict__ w, int64_t T, int64_t N) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    opmath_t acc = static_cast<opmath_t>(base[i]);
    for (int64_t t = 0; t < T; ++t) acc += w[t] * static_cast<opmath_t>(deltas[t * N + i]);
    out[i] = static_cast<scalar_t>(acc);  // `out` may be `base`: each element is read first.
  }
}

template <typename scalar_t>
__global__ void nan_rows_where_failed_kernel(const int* __restrict__ info, scalar_t* __restrict__ S,
                                             int64_t batch, int64_t k) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < batch * k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (info[i / k] != 0) S[i] = static_cast<scalar_t>(NAN);
  }
}

}  // namespace

void launch_nan_rows_where_failed(const at::Tensor& info, at::Tensor& S) {
  const int64_t batch = S.size(0), k = S.size(1);
  if (batch * k == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "nan_rows_where_failed", [&] {
    nan_rows_where_failed_kernel<<<num_blocks(batch * k), kThreads, 0, stream>>>(
        info.const_data_ptr<int>(), S.data_ptr<scalar_t>(), batch, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_mixing_coefficients(const at::Tensor& weights, int64_t w_stride, const at::Tensor& S,
                                int64_t s_stride, const ExpertOffsets& offsets, at::Tensor& coef) {
  const int64_t B = coef.size(0), K = coef.size(1);
  if (B * K == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "mixing_coefficients", [&] {
    mixing_coefficients_kernel<scalar_t><<<num_blocks(B * K), kThreads, 0, stream>>>(
        weights.const_data_ptr<scalar_t>(), w_stride, S.const_data_ptr<scalar_t>(), s_stride,
        offsets, B, K, coef.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_scale_columns(const at::Tensor& in, at::Tensor& out, const at::Tensor& coef,
                          int64_t rows_per_group) {
  const int64_t total = in.numel(), K = in.size(-1);
  if (total == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scale_columns", [&] {
    using out_t = scalar_t;
    using opmath_t = at::opmath_type<out_t>;
    TORCH_INTERNAL_ASSERT(coef.scalar_type() == c10::CppTypeToScalarType<opmath_t>::value);
    const auto launch = [&](const auto* in_ptr) {
      scale_columns_kernel<<<num_blocks(total), kThreads, 0, stream>>>(
          in_ptr, out.data_ptr<out_t>(), coef.const_data_ptr<opmath_t>(), rows_per_group, K,
          total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (in.scalar_type() == out.scalar_type()) {
      launch(in.const_data_ptr<out_t>());
    } else {
      TORCH_INTERNAL_ASSERT(in.scalar_type() == coef.scalar_type());
      launch(in.const_data_ptr<opmath_t>());
    }
  });
}

void launch_dense_merge(at::Tensor& out, const at::Tensor& base, const at::Tensor& deltas,
                        const at::Tensor& weights) {
  const int64_t N = out.numel(), T = weights.size(0);
  if (N == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dense_merge_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    dense_merge_kernel<<<num_blocks(N), kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), base.const_data_ptr<scalar_t>(),
        deltas.const_data_ptr<scalar_t>(), weights.const_data_ptr<opmath_t>(), T, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace twinmerge::cuda
