// Elementwise kernels of the twinmerge CUDA ops. The GEMMs themselves are cuBLAS and cuBLASLt
// calls (blas.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "kernels.h"

namespace twinmerge::cuda {
namespace {

constexpr int kThreads = 256;

// Blocks of kThreads that fill the device: 8 per multiprocessor.
int64_t fill_blocks() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
}

// Grid-stride loops: enough blocks to fill the device, never more than there is work.
int64_t num_blocks(int64_t n) {
  return std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, fill_blocks()));
}

__device__ __forceinline__ int expert_of(const ExpertOffsets& off, int64_t k) {
  int t = 0;
  while (t + 1 < off.num_experts && off.offset[t + 1] <= k) ++t;
  return t;
}

// out[row, k] = in[row, k] * S[g, k] * w[g, expert(k)] with g = row / rows_per_group (w optional).
// Threads along x walk the columns k (coalesced), threads along y walk the rows; each thread owns
// one column, so it finds its expert once and recomputes its coefficient only when the group
// changes. `in` and `out` may be the same buffer: each element is read before it is written.
template <typename in_t, typename out_t, typename s_t, typename opmath_t>
__global__ void scale_columns_kernel(const in_t* in, out_t* out, const opmath_t* __restrict__ w,
                                     int64_t w_stride, const s_t* __restrict__ S,
                                     int64_t s_stride, const ExpertOffsets off, int64_t R,
                                     int64_t K, int64_t rows_per_group) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= K) return;
  const int t = w == nullptr ? 0 : expert_of(off, k);
  int64_t group = -1;
  opmath_t coef = 0;
  for (int64_t row = blockIdx.y * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < R;
       row += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t g = row / rows_per_group;
    if (g != group) {
      group = g;
      coef = static_cast<opmath_t>(S[g * s_stride + k]) *
             (w == nullptr ? opmath_t(1) : w[g * w_stride + t]);
    }
    const int64_t i = row * K + k;
    out[i] = static_cast<out_t>(static_cast<opmath_t>(in[i]) * coef);
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

void launch_scale_columns(const at::Tensor& in, at::Tensor& out, const at::Tensor& S,
                          int64_t s_stride, const at::Tensor* weights, int64_t w_stride,
                          const ExpertOffsets& offsets, int64_t rows_per_group) {
  const int64_t K = in.size(-1), R = K == 0 ? 0 : in.numel() / K;
  if (R == 0 || K == 0) return;
  // A warp spans up to 32 consecutive columns; blocks of 256 threads; enough blocks along the
  // rows to fill the device (grid.y is capped at 65535 by the hardware, the loop covers the rest).
  int bx = 1;
  while (bx < 32 && bx < K) bx *= 2;
  const dim3 block(bx, kThreads / bx);
  const int64_t col_blocks = (K + bx - 1) / bx;
  const int64_t row_blocks = std::min<int64_t>(
      {(R + block.y - 1) / block.y, (fill_blocks() + col_blocks - 1) / col_blocks, 65535});
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = out.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_columns", [&] {
    using out_t = scalar_t;
    using opmath_t = at::opmath_type<out_t>;
    constexpr auto opmath = c10::CppTypeToScalarType<opmath_t>::value;
    TORCH_INTERNAL_ASSERT(weights == nullptr || weights->scalar_type() == opmath);
    const opmath_t* w = weights == nullptr ? nullptr : weights->const_data_ptr<opmath_t>();
    // `in` and S each come in out's dtype or the accumulation dtype.
    const auto as = [&](const at::Tensor& t, auto launch) {
      if (t.scalar_type() == out.scalar_type()) return launch(t.const_data_ptr<out_t>());
      TORCH_INTERNAL_ASSERT(t.scalar_type() == opmath);
      launch(t.const_data_ptr<opmath_t>());
    };
    as(in, [&](const auto* in_ptr) {
      as(S, [&](const auto* s_ptr) {
        scale_columns_kernel<<<grid, block, 0, stream>>>(in_ptr, out.data_ptr<out_t>(), w,
                                                         w_stride, s_ptr, s_stride, offsets, R,
                                                         K, rows_per_group);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
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
