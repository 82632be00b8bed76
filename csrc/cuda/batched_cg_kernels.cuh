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

// Which launch to use for n > 32 (n <= 32 always runs one warp per system). Every strategy has
// the semantics of csrc/batched_cg.h; they differ in speed only.
enum class BatchedCGStrategy : int {
  kAuto = 0,    // one block per system, the matrix in shared memory when it fits (under the cap)
  kGlobal,      // one block per system, the matrix always streamed from global memory
  kMultiBlock,  // several blocks per system (cooperative launch), for large n and small batches
};

// Launch choices that a caller may force, to time the variants side by side (the ATen glue
// reads them from IMPLICIT_TORCH_CG_* environment variables). The defaults give the tuned
// launch.
struct BatchedCGTuning {
  BatchedCGStrategy strategy = BatchedCGStrategy::kAuto;
  int64_t smem_cap_bytes = -1;    // cap on the shared memory per block for the matrix and the
                                  // CG vectors (beyond it they stay in global memory; the
                                  // ~1 KB of reduction scratch is always used); < 0: none
  int64_t blocks_per_system = 0;  // kMultiBlock: blocks per system; 0: fill the device
};

enum class BatchedCGKind : int {
  kEmpty = 0,       // batch == 0 or n == 0: nothing to launch
  kWarpPerSystem,   // n <= 32: one warp per system, its matrix in registers
  kBlockPerSystem,  // n > 32: one thread block per system
  kMultiBlock,      // n > 32: blocks_per_system blocks per system, one cooperative launch
};

// How a call is launched; filled by plan_batched_cg.
struct BatchedCGPlan {
  BatchedCGKind kind;
  int device;
  int threads;           // threads per block
  int vec;               // matrix elements per vector load (1, or 16 bytes' worth)
  int slices;            // row slices of the block matvec (threads splitting the k sum)
  bool matrix_in_smem;   // kBlockPerSystem: the matrix is copied to shared memory once
  bool vectors_in_smem;  // kBlockPerSystem: the CG vectors live in shared memory (else in the
                         // workspace)
  size_t smem_bytes;     // dynamic shared memory per block
  int64_t workspace_elems;
  int blocks_per_system;  // kMultiBlock: blocks sharing one system (1 otherwise)
  int cols_per_block;     // kMultiBlock: entries of A p computed per block (the last block of a
                          // system may have fewer)
};

// Chooses the launch for a (batch, n) problem on `device` (the current device). `aligned16`:
// A's data pointer is 16-byte aligned (allows vector loads). A strategy that does not apply
// (kMultiBlock on a device without cooperative launch, or a batch too large for all its
// blocks to be resident at once) falls back to kAuto. Returns cudaErrorInvalidValue for a
// batch that does not fit in one grid (>= 2^31 systems), n >= 2^31 or a bad tuning.
template <typename T>
cudaError_t plan_batched_cg(int64_t batch, int64_t n, bool aligned16, int device,
                            const BatchedCGTuning& tuning, BatchedCGPlan* plan);

// Runs the whole solve in one kernel launch on `stream`; returns the launch error, if any.
template <typename T>
cudaError_t launch_batched_cg(const BatchedCGArgs<T>& args, const BatchedCGPlan& plan,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace implicit_torch
