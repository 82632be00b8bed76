// ATen glue of the CUDA kernel of implicit_torch::batched_cg: argument checks, contiguous
// copies, output allocation, the launch variant, launch on the current stream. The kernels
// themselves are in batched_cg_kernels.cu (no torch headers).
//
// Only c10's CUDA headers (stream, guard, error check): ATen/cuda/CUDAContext.h would pull in
// the cuBLAS, cuSPARSE and cuSOLVER headers, which a CUDA toolkit need not have.
//
// Launch variants, read from the environment at every call (to time them side by side:
// benchmarks/batched_cg.py --variants); each gives the semantics of csrc/batched_cg.h:
//   IMPLICIT_TORCH_CG_STRATEGY           auto (default) | global | multiblock (n > 32; see
//                                        BatchedCGStrategy in batched_cg_kernels.cuh)
//   IMPLICIT_TORCH_CG_SMEM_CAP_BYTES     cap on the shared memory per block (default: none)
//   IMPLICIT_TORCH_CG_BLOCKS_PER_SYSTEM  multiblock: blocks per system (default 0: fill the GPU)
//   IMPLICIT_TORCH_CG_LOG_PLAN=1         a warning per call that describes the launch
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "batched_cg.h"
#include "cuda/batched_cg_kernels.cuh"
#include "registry.h"

namespace implicit_torch {
namespace {

const char* env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' ? value : nullptr;
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* value = env(name);
  if (value == nullptr) return fallback;
  char* end = nullptr;
  errno = 0;
  const long long parsed = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(errno == 0 && *end == '\0' && parsed >= 0, "batched_cg: ", name,
                    " must be a non-negative integer, got '", value, "'");
  return parsed;
}

cuda::BatchedCGTuning tuning_from_env() {
  cuda::BatchedCGTuning tuning;
  if (const char* strategy = env("IMPLICIT_TORCH_CG_STRATEGY")) {
    if (std::strcmp(strategy, "global") == 0) {
      tuning.strategy = cuda::BatchedCGStrategy::kGlobal;
    } else if (std::strcmp(strategy, "multiblock") == 0) {
      tuning.strategy = cuda::BatchedCGStrategy::kMultiBlock;
    } else {
      TORCH_CHECK_VALUE(std::strcmp(strategy, "auto") == 0,
                        "batched_cg: IMPLICIT_TORCH_CG_STRATEGY must be auto, global or "
                        "multiblock, got '",
                        strategy, "'");
    }
  }
  tuning.smem_cap_bytes = env_int("IMPLICIT_TORCH_CG_SMEM_CAP_BYTES", -1);
  tuning.blocks_per_system = env_int("IMPLICIT_TORCH_CG_BLOCKS_PER_SYSTEM", 0);
  return tuning;
}

std::string describe(const cuda::BatchedCGPlan& plan) {
  static const char* const kinds[] = {"empty", "warp per system", "block per system",
                                      "multiblock"};
  std::string s = std::string("batched_cg CUDA launch: ") + kinds[static_cast<int>(plan.kind)] +
                  ", threads=" + std::to_string(plan.threads) +
                  ", vec=" + std::to_string(plan.vec) + ", slices=" + std::to_string(plan.slices);
  if (plan.kind == cuda::BatchedCGKind::kBlockPerSystem) {
    s += std::string(", matrix_in_smem=") + (plan.matrix_in_smem ? "1" : "0") +
         ", vectors_in_smem=" + (plan.vectors_in_smem ? "1" : "0");
  } else if (plan.kind == cuda::BatchedCGKind::kMultiBlock) {
    s += ", blocks_per_system=" + std::to_string(plan.blocks_per_system) +
         ", cols_per_block=" + std::to_string(plan.cols_per_block);
  }
  return s + ", smem_bytes=" + std::to_string(plan.smem_bytes) +
         ", workspace_elems=" + std::to_string(plan.workspace_elems);
}

}  // namespace

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
  const cuda::BatchedCGTuning tuning = tuning_from_env();
  const c10::cuda::CUDAGuard guard(A.device());
  BatchedCGCall call = prepare_batched_cg(A, b, x0);
  if (call.empty()) return call.outputs();

  const bool aligned16 = reinterpret_cast<std::uintptr_t>(call.A.const_data_ptr()) % 16 == 0;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "batched_cg_cuda", [&] {
    cuda::BatchedCGPlan plan;
    C10_CUDA_CHECK(
        cuda::plan_batched_cg<scalar_t>(B, n, aligned16, A.get_device(), tuning, &plan));
    if (env("IMPLICIT_TORCH_CG_LOG_PLAN") != nullptr) TORCH_WARN(describe(plan));
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
    C10_CUDA_CHECK(cuda::launch_batched_cg<scalar_t>(
        args, plan, c10::cuda::getCurrentCUDAStream(A.get_device()).stream()));
  });
  return call.outputs();
}

TORCH_LIBRARY_IMPL(implicit_torch, CUDA, m) {
  m.impl("batched_cg", &batched_cg_cuda);
  note_compiled_kernel("batched_cg", "CUDA");
}

}  // namespace implicit_torch
