// ATen glue of the CUDA kernel of implicit_torch::batched_cg: argument checks, contiguous
// copies, output allocation, launch on the current stream. The kernels themselves are in
// batched_cg_kernels.cu (no torch headers).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>

#include "batched_cg.h"
#include "cuda/batched_cg_kernels.cuh"

namespace implicit_torch {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_cg_cuda(const at::Tensor& A,
                                                               const at::Tensor& b,
                                                               const std::optional<at::Tensor>& x0,
                                                               double rtol, double atol,
                                                               int64_t maxiter, bool jacobi) {
  check_batched_cg_inputs(A, b, x0, rtol, atol, maxiter);
  TORCH_CHECK_VALUE(A.is_cuda(), "batched_cg: the CUDA kernel got A on ", A.device());
  const int64_t B = A.size(0), n = A.size(1);
  TORCH_CHECK_VALUE(B < INT_MAX && n < INT_MAX, "batched_cg: at most 2^31 - 1 systems of at most ",
                    "2^31 - 1 unknowns per call on CUDA, got B=", B, ", n=", n);
  const c10::cuda::CUDAGuard guard(A.device());
  BatchedCGCall call = prepare_batched_cg(A, b, x0);
  if (call.empty()) return call.outputs();

  const bool aligned16 = reinterpret_cast<std::uintptr_t>(call.A.const_data_ptr()) % 16 == 0;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "batched_cg_cuda", [&] {
    cuda::BatchedCGPlan plan;
    C10_CUDA_CHECK(cuda::plan_batched_cg<scalar_t>(B, n, aligned16, A.get_device(), &plan));
    at::Tensor workspace;
    if (plan.workspace_elems > 0) workspace = at::empty({plan.workspace_elems}, A.options());
    cuda::BatchedCGArgs<scalar_t> args{};
    args.A = call.A.const_data_ptr<scalar_t>();
    args.b = call.b.const_data_ptr<scalar_t>();
    args.x0 = call.x0.has_value() ? call.x0->const_data_ptr<scalar_t>() : nullptr;
    args.x = call.x.mutable_data_ptr<scalar_t>();
    args.iterations = call.iterations.mutable_data_ptr<int64_t>();
    args.residual_norm = call.residual_norm.mutable_data_ptr<scalar_t>();
    args.workspace = workspace.defined() ? workspace.mutable_data_ptr<scalar_t>() : nullptr;
    args.batch = B;
    args.n = n;
    args.rtol = rtol;
    args.atol = atol;
    args.maxiter = maxiter;
    args.jacobi = jacobi;
    C10_CUDA_CHECK(
        cuda::launch_batched_cg<scalar_t>(args, plan, at::cuda::getCurrentCUDAStream()));
  });
  return call.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(implicit_torch, CUDA, m) { m.impl("batched_cg", &batched_cg_cuda); }

}  // namespace implicit_torch
