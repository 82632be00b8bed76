// Host-side interface of the CUDA kernels of implicit_torch::batched_cg.
//
// This header and batched_cg_kernels.cu include no torch header: nvcc compiles the kernels on
// their own (`nvcc -c -arch=sm_90 csrc/cuda/batched_cg_kernels.cu`), and the ATen glue
// (batched_cg_cuda.cpp, compiled by the host compiler) sees only these declarations.
// Semantics: csrc/batched_cg.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace implicit_torch {
namespace cuda {

// Contiguous row-major device arrays of one call: A (batch, n, n), b/x0/x (batch, n),
// iterations/residual_norm (batch).
template <typename T>
struct BatchedCGArgs {
  const T* A;
  const T* b;
  const T* x0;  // nullptr: start from zero
  T* x;
  int64_t* iterations;
  T* residual_norm;
  T* workspace;  // BatchedCGPlan::workspace_elems scalars (nullptr when that is 0)
  int64_t batch;
  int64_t n;
  double rtol;
  double atol;
  int64_t maxiter;
  bool jacobi;
};

enum class BatchedCGKind : int {
  kEmpty = 0,       // batch == 0 or n == 0: nothing to launch
  kWarpPerSystem,   // n <= 32: one warp per system, its matrix in registers
  kBlockPerSystem,  // n > 32: one thread block per system
};

// How a call is launched; filled by plan_batched_cg.
struct BatchedCGPlan {
  BatchedCGKind kind;
  int threads;           // threads per block
  int vec;               // matrix elements per vector load (1, or 16 bytes' worth)
  int slices;            // row slices of the block matvec (threads splitting the k sum)
  bool matrix_in_smem;   // the matrix is copied to shared memory once and read from there
  bool vectors_in_smem;  // the CG vectors live in shared memory (else in the workspace)
  size_t smem_bytes;     // dynamic shared memory per block
  int64_t workspace_elems;
};

// Chooses the launch for a (batch, n) problem on `device`. `aligned16`: A's data pointer is
// 16-byte aligned (allows vector loads). Returns cudaErrorInvalidValue for a batch that does
// not fit in one grid (>= 2^31 systems) or n >= 2^31.
template <typename T>
cudaError_t plan_batched_cg(int64_t batch, int64_t n, bool aligned16, int device,
                            BatchedCGPlan* plan);

// Runs the whole solve in one kernel launch on `stream`; returns the launch error, if any.
template <typename T>
cudaError_t launch_batched_cg(const BatchedCGArgs<T>& args, const BatchedCGPlan& plan,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace implicit_torch
