// CUDA kernels of implicit_torch::batched_cg: every system of the batch is solved in one launch,
// each with its own step sizes and its own early exit (semantics in csrc/batched_cg.h).
//
// * n <= 32: one warp per system (4 systems per block). Lane j owns x[j], r[j], p[j] and keeps
//   column j of A in registers (= row j, A being symmetric); A p is a sum of register columns
//   times p[k] broadcast by __shfl_sync; dot products are xor-butterfly warp reductions, whose
//   result is bitwise identical in every lane, so the loop's control flow stays warp-uniform.
//   Lanes j >= n hold exact zeros throughout (never 0 * v, which is NaN for an infinite v).
// * n > 32: one thread block per system. A is copied once to shared memory when it fits (up to
//   the opt-in limit, 227 KB on Hopper, or a smaller cap) and streamed from global memory
//   otherwise; the CG vectors live in shared memory (or, for very large n, in a global
//   workspace). The matvec reads A row by row with consecutive threads on consecutive columns
//   (coalesced global loads, conflict-free shared loads, 16-byte vector loads when aligned),
//   threads split into `slices` that share the k sum when n is small. Block reductions:
//   __shfl_down_sync within warps, then one warp over the warp partials; the result is broadcast
//   through shared memory, so the whole block leaves the loop together when its system stops.
// * Several blocks per system (BatchedCGStrategy::kMultiBlock; n > 32, batches small enough for
//   all blocks to be resident at once): one cooperative launch; each block owns a strip of
//   columns (entries of x, r, p, A p, kept in a global workspace) and computes that strip of
//   A p from the whole of p; the dot products are per-block partial sums that every block of
//   the system adds up in the same order, so all of them take the same decisions. Grid-wide
//   syncs separate the phases of an iteration (matvec | step | direction). The whole grid leaves
//   the loop together, when no system is active any more (or after maxiter iterations).
//
// Only CUDA runtime headers here (no torch): nvcc can compile this file alone.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>

#include "batched_cg_kernels.cuh"

namespace implicit_torch {
namespace cuda {
namespace {

namespace coop = cooperative_groups;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;    // warp-per-system kernel: systems per block
constexpr int kMaxThreads = 1024;    // block-per-system kernel
constexpr int kMultiThreads = 256;   // multiblock kernel
constexpr int kMaxReduceValues = 4;  // values summed by one block reduction, at most
// Shared scalars of block reductions: per-warp partials, then the broadcast slots, kept apart so
// that a reduction's partials never overwrite the previous reduction's result while a slow thread
// may still be reading it. A multiple of 4 (16-byte alignment of what follows).
constexpr int kBroadcastSlot = kWarpSize * kMaxReduceValues;
constexpr int kReduceSlots = kBroadcastSlot + 32;
constexpr size_t kDefaultSmemBytes = 48 * 1024;  // dynamic shared memory without opting in
constexpr int kMaxDevices = 64;                  // devices with a cached kernel attribute

// max(rtol * ||b||, atol), NaN when rtol * ||b|| is NaN (as torch.clamp in the reference).
__device__ __forceinline__ double stop_threshold(double bnorm, double rtol, double atol) {
  const double scaled = rtol * bnorm;
  return isnan(scaled) ? scaled : fmax(scaled, atol);
}

// "Stopped": ||r|| <= threshold. False for NaN, so a NaN residual is never taken as converged.
template <typename T>
__device__ __forceinline__ bool within(T squared_norm, double threshold) {
  return sqrt(static_cast<double>(squared_norm)) <= threshold;
}

template <typename T>
__device__ __forceinline__ T warp_allreduce(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// ------------------------------------------------------------------------------------------
// Warp per system (n <= 32)
// ------------------------------------------------------------------------------------------

// (A v)[lane] = sum_k A[k][lane] v[k] in the lanes < n (`mine`). The other lanes hold zero
// columns and v = 0; they return an exact 0 rather than their sum of 0 * v[k], which is NaN
// when some v[k] is infinite and would reach the valid lanes through the reductions.
template <typename T, int NMAX>
__device__ __forceinline__ T warp_symv(const T (&column)[NMAX], T v, bool mine) {
  T acc = T(0);
#pragma unroll
  for (int k = 0; k < NMAX; ++k) acc += column[k] * __shfl_sync(kFullMask, v, k);
  return mine ? acc : T(0);
}

template <typename T, int NMAX>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    cg_warp_kernel(const BatchedCGArgs<T> a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t sys = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (sys >= a.batch) return;  // the whole warp leaves together
  const int n = static_cast<int>(a.n);
  const bool mine = lane < n;  // the other lanes keep x = r = p = 0 (exact zeros)
  const T* __restrict__ A = a.A + sys * n * n;
  const int64_t base = sys * n;

  T column[NMAX];
#pragma unroll
  for (int k = 0; k < NMAX; ++k) column[k] = (mine && k < n) ? A[k * n + lane] : T(0);
  const T bj = mine ? a.b[base + lane] : T(0);
  T xj = (mine && a.x0 != nullptr) ? a.x0[base + lane] : T(0);
  T rj = bj;
  if (a.x0 != nullptr) rj = bj - warp_symv(column, xj, mine);
  const double threshold = stop_threshold(sqrt(static_cast<double>(warp_allreduce(bj * bj))),
                                          a.rtol, a.atol);

  T dj = mine ? T(1) : T(0);  // Jacobi: 1 / A[j][j]
  bool ok = true;
  if (a.jacobi) {
    const T d = mine ? A[lane * n + lane] : T(1);
    ok = __all_sync(kFullMask, d > T(0) && isfinite(d));
    dj = (mine && d > T(0)) ? T(1) / d : T(0);
  }
  T pj = dj * rj;
  T rz = warp_allreduce(rj * pj);
  T rr = warp_allreduce(rj * rj);
  bool active = ok && !within(rr, threshold);

  int64_t it = 0;
  while (active && it < a.maxiter) {
    const T Apj = warp_symv(column, pj, mine);
    const T pAp = warp_allreduce(pj * Apj);
    if (!(pAp > T(0))) break;  // not positive definite, or NaN: stop, unconverged
    const T alpha = rz / pAp;
    if (mine) {
      xj += alpha * pj;
      rj -= alpha * Apj;
    }
    ++it;
    rr = warp_allreduce(rj * rj);
    if (within(rr, threshold)) break;
    const T zj = dj * rj;
    const T rz_new = a.jacobi ? warp_allreduce(rj * zj) : rr;
    const T beta = rz_new / rz;
    rz = rz_new;
    pj = mine ? zj + beta * pj : T(0);
  }

  const T res = bj - warp_symv(column, xj, mine);  // the true residual of the returned x
  const T res2 = warp_allreduce(res * res);
  if (mine) a.x[base + lane] = xj;
  if (lane == 0) {
    a.iterations[sys] = it;
    a.residual_norm[sys] = sqrt(res2);
  }
}

// ------------------------------------------------------------------------------------------
// Block building blocks (block per system and several blocks per system)
// ------------------------------------------------------------------------------------------

// V consecutive elements at p (16-byte aligned when V > 1).
template <typename T, int V>
struct Vec {
  __device__ __forceinline__ static void load(const T* p, T (&out)[V]) {
#pragma unroll
    for (int q = 0; q < V; ++q) out[q] = p[q];
  }
  __device__ __forceinline__ static void store(T* p, const T (&in)[V]) {
#pragma unroll
    for (int q = 0; q < V; ++q) p[q] = in[q];
  }
};

template <>
struct Vec<float, 4> {
  __device__ __forceinline__ static void load(const float* p, float (&out)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
  __device__ __forceinline__ static void store(float* p, const float (&in)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  }
};

template <>
struct Vec<double, 2> {
  __device__ __forceinline__ static void load(const double* p, double (&out)[2]) {
    const double2 v = *reinterpret_cast<const double2*>(p);
    out[0] = v.x;
    out[1] = v.y;
  }
  __device__ __forceinline__ static void store(double* p, const double (&in)[2]) {
    *reinterpret_cast<double2*>(p) = make_double2(in[0], in[1]);
  }
};

// Sums v[0..NV) over the block; every thread gets the totals. blockDim.x is a multiple of 32.
// `red` holds kReduceSlots shared scalars. Contains two __syncthreads: call it from all threads.
template <typename T, int NV>
__device__ __forceinline__ void block_allreduce(T (&v)[NV], T* red) {
  static_assert(NV <= kMaxReduceValues, "too many values for one block reduction");
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
      v[i] += __shfl_down_sync(kFullMask, v[i], offset);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) red[warp * NV + i] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      T t = lane < num_warps ? red[lane * NV + i] : T(0);
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        t += __shfl_down_sync(kFullMask, t, offset);
      }
      if (lane == 0) red[kBroadcastSlot + i] = t;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = red[kBroadcastSlot + i];
}

// Columns [0, cols) of M v for the symmetric matrix whose rows start `ld` elements apart at M
// (shared or global memory; M may point into the middle of a row): Av[c] = sum_k M[k ld + c] v[k]
// over k < rows. Thread (g, s) = (tid % G, tid / G) sums rows k = s, s + S, ... for columns
// g*V .. g*V+V-1; with S > 1 the slices' partial sums meet in `partial` (S x cols). v must be
// visible to the block on entry; Av is complete once the caller has synchronised
// (block_allreduce does). Returns this thread's share of sum_c w[c] Av[c]. Call from all threads.
// v, w and Av are plain pointers: in the multiblock kernel other blocks write them between calls.
template <typename T, int V>
__device__ __forceinline__ T block_symv(const T* __restrict__ M, int64_t ld, int rows, int cols,
                                        const T* v, const T* w, T* Av, T* partial, int slices) {
  const int tid = threadIdx.x, num_threads = blockDim.x;
  const int groups = cols / V;
  T wAv = T(0);
  if (slices == 1) {
    for (int g = tid; g < groups; g += num_threads) {
      T acc[V];
#pragma unroll
      for (int q = 0; q < V; ++q) acc[q] = T(0);
      const T* col = M + g * V;
#pragma unroll 4
      for (int k = 0; k < rows; ++k) {
        T m[V];
        Vec<T, V>::load(col + static_cast<int64_t>(k) * ld, m);
        const T vk = v[k];
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] += m[q] * vk;
      }
#pragma unroll
      for (int q = 0; q < V; ++q) {
        Av[g * V + q] = acc[q];
        wAv += w[g * V + q] * acc[q];
      }
    }
  } else {
    const int g = tid % groups, s = tid / groups;
    if (s < slices) {
      T acc[V];
#pragma unroll
      for (int q = 0; q < V; ++q) acc[q] = T(0);
      const T* col = M + g * V;
#pragma unroll 4
      for (int k = s; k < rows; k += slices) {
        T m[V];
        Vec<T, V>::load(col + static_cast<int64_t>(k) * ld, m);
        const T vk = v[k];
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] += m[q] * vk;
      }
#pragma unroll
      for (int q = 0; q < V; ++q) partial[s * cols + g * V + q] = acc[q];
    }
    __syncthreads();
    for (int j = tid; j < cols; j += num_threads) {
      T sum = T(0);
      for (int s2 = 0; s2 < slices; ++s2) sum += partial[s2 * cols + j];
      Av[j] = sum;
      wAv += w[j] * sum;
    }
  }
  return wAv;
}

// ------------------------------------------------------------------------------------------
// Block per system (n > 32)
// ------------------------------------------------------------------------------------------

__host__ __device__ inline int64_t vector_elems(int64_t n, int slices) {
  return (5 + (slices > 1 ? slices : 0)) * n;  // x, r, p, Ap, dinv (+ slice partials)
}

template <typename T, int V, bool MATRIX_IN_SMEM>
__global__ void __launch_bounds__(kMaxThreads)
    cg_block_kernel(const BatchedCGArgs<T> a, const int slices, const bool vectors_in_smem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t sys = blockIdx.x;
  const int n = static_cast<int>(a.n);
  const int tid = threadIdx.x, num_threads = blockDim.x;
  const int64_t base = sys * n;
  const T* __restrict__ A = a.A + sys * static_cast<int64_t>(n) * n;
  const T* __restrict__ b = a.b + base;

  // Shared layout: reduction slots | matrix (n*n, when in smem) | vectors (when in smem). The
  // offsets are multiples of 16 bytes (kReduceSlots * sizeof(T); n*n*sizeof(T) with n % V == 0).
  T* red = smem;
  T* after_matrix = smem + kReduceSlots + (MATRIX_IN_SMEM ? n * n : 0);
  T* vec = vectors_in_smem ? after_matrix : a.workspace + sys * vector_elems(n, slices);
  T* x = vec;
  T* r = vec + n;
  T* p = vec + 2 * n;
  T* Ap = vec + 3 * n;
  T* dinv = vec + 4 * n;
  T* partial = vec + 5 * n;

  const T* M = A;
  if (MATRIX_IN_SMEM) {
    T* As = smem + kReduceSlots;
    const int chunks = n * n / V;
    for (int i = tid; i < chunks; i += num_threads) {
      T m[V];
      Vec<T, V>::load(A + i * V, m);
      Vec<T, V>::store(As + i * V, m);
    }
    M = As;
  }
  for (int j = tid; j < n; j += num_threads) {
    x[j] = a.x0 != nullptr ? a.x0[base + j] : T(0);
  }
  __syncthreads();  // the matrix and x are visible to the block
  if (a.x0 != nullptr) {
    block_symv<T, V>(M, n, n, n, x, x, Ap, partial, slices);
    __syncthreads();
  }

  // r = b - A x0, z = D^-1 r, p = z; one reduction for ||b||^2, bad diagonals, r'z and r'r.
  T sums[4] = {T(0), T(0), T(0), T(0)};
  for (int j = tid; j < n; j += num_threads) {
    const T bj = b[j];
    const T rj = a.x0 != nullptr ? bj - Ap[j] : bj;
    T dj = T(1);
    if (a.jacobi) {
      const T d = M[static_cast<int64_t>(j) * n + j];
      sums[1] += (d > T(0) && isfinite(d)) ? T(0) : T(1);
      dj = d > T(0) ? T(1) / d : T(0);
      dinv[j] = dj;
    }
    r[j] = rj;
    p[j] = dj * rj;
    sums[0] += bj * bj;
    sums[2] += rj * dj * rj;
    sums[3] += rj * rj;
  }
  block_allreduce<T, 4>(sums, red);  // also makes p visible
  const double threshold = stop_threshold(sqrt(static_cast<double>(sums[0])), a.rtol, a.atol);
  T rz = sums[2];
  bool active = sums[1] == T(0) && !within(sums[3], threshold);

  int64_t it = 0;
  while (active && it < a.maxiter) {
    T pAp[1] = {block_symv<T, V>(M, n, n, n, p, p, Ap, partial, slices)};
    block_allreduce<T, 1>(pAp, red);
    if (!(pAp[0] > T(0))) break;  // not positive definite, or NaN: stop, unconverged
    const T alpha = rz / pAp[0];
    T rs[2] = {T(0), T(0)};  // r'r, r'D^-1 r
    for (int j = tid; j < n; j += num_threads) {
      x[j] += alpha * p[j];
      const T rj = r[j] - alpha * Ap[j];
      r[j] = rj;
      rs[0] += rj * rj;
      if (a.jacobi) rs[1] += rj * dinv[j] * rj;
    }
    ++it;
    block_allreduce<T, 2>(rs, red);
    if (within(rs[0], threshold)) break;
    const T rz_new = a.jacobi ? rs[1] : rs[0];
    const T beta = rz_new / rz;
    rz = rz_new;
    for (int j = tid; j < n; j += num_threads) {
      const T zj = a.jacobi ? dinv[j] * r[j] : r[j];
      p[j] = zj + beta * p[j];
    }
    __syncthreads();  // p is visible before the next matvec
  }

  // The true residual of the returned x.
  __syncthreads();
  block_symv<T, V>(M, n, n, n, x, x, Ap, partial, slices);
  __syncthreads();
  T res[1] = {T(0)};
  for (int j = tid; j < n; j += num_threads) {
    const T e = b[j] - Ap[j];
    res[0] += e * e;
    a.x[base + j] = x[j];
  }
  block_allreduce<T, 1>(res, red);
  if (tid == 0) {
    a.iterations[sys] = it;
    a.residual_norm[sys] = sqrt(res[0]);
  }
}

// ------------------------------------------------------------------------------------------
// Several blocks per system (n > 32, one cooperative launch)
// ------------------------------------------------------------------------------------------

// Partial sums each block of a system publishes in its slots of the global workspace:
// 0 = p'Ap (or, at the start, ||b||^2), 1 = r'r, 2 = r'D^-1 r, 3 = bad diagonals at the start
// and the squared true residual at the end.
constexpr int kPartialSlots = 4;

// Workspace of the multiblock kernel (offsets in scalars): r, p, Ap, dinv of every system
// (4 n each; x is the output array itself), then every block's partial sums, then one
// "still active" flag per system (1 or 0, as a T).
struct MultiBlockLayout {
  int64_t partials, flags, total;
  __host__ __device__ MultiBlockLayout(int64_t batch, int64_t n, int64_t blocks_per_system)
      : partials(batch * 4 * n),
        flags(partials + batch * blocks_per_system * kPartialSlots),
        total(flags + batch) {}
};

// Every block of a system adds up the partial sums of the system's `nb` blocks (slots FIRST ..
// FIRST + NV of `part`) in the same fixed order, so all of them get bitwise the same totals and
// take the same decisions. Call from all threads (two __syncthreads).
template <typename T, int FIRST, int NV>
__device__ __forceinline__ void sum_partials(const T* part, int nb, T (&out)[NV], T* red) {
  static_assert(FIRST + NV <= kPartialSlots, "no such partial sums");
  const int lane = threadIdx.x % kWarpSize;
  __syncthreads();  // every thread has read the previous broadcast
  if (threadIdx.x < kWarpSize) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      T t = T(0);
      for (int blk = lane; blk < nb; blk += kWarpSize) t += part[blk * kPartialSlots + FIRST + i];
      t = warp_allreduce(t);
      if (lane == 0) red[kBroadcastSlot + i] = t;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) out[i] = red[kBroadcastSlot + i];
}

// Whether any system's flag is set; the same answer in every block (it reads the same flags,
// written before the last grid sync). Call from all threads.
template <typename T>
__device__ __forceinline__ bool any_active(const T* flags, int64_t batch) {
  int found = 0;
  for (int64_t s = threadIdx.x; s < batch; s += blockDim.x) found |= flags[s] != T(0);
  return __syncthreads_or(found) != 0;
}

// Block `blk` of system `sys` (blockIdx.x = sys * nb + blk) owns entries [c0, c0 + cols) of the
// system's vectors. Its state (active, rz, it, threshold) is replicated in every block of the
// system, computed from the same totals, so the blocks of a system stay in step; the grid-wide
// syncs are reached by every block the same number of times (the loop bound and the exit test
// are the same for the whole grid). Needs a cooperative launch of batch * nb blocks.
template <typename T, int V>
__global__ void __launch_bounds__(kMultiThreads, 1)
    cg_multiblock_kernel(const BatchedCGArgs<T> a, const int nb, const int cols_per_block,
                         const int slices) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* red = reinterpret_cast<T*>(smem_raw);
  T* slice_partial = red + kReduceSlots;  // slices x cols (block_symv, when slices > 1)
  coop::grid_group grid = coop::this_grid();
  const int n = static_cast<int>(a.n);
  const int64_t sys = blockIdx.x / nb;
  const int blk = static_cast<int>(blockIdx.x % nb);
  const int tid = threadIdx.x, num_threads = blockDim.x;
  const int c0 = blk * cols_per_block;
  const int cols = min(cols_per_block, n - c0);  // >= 1 (plan_batched_cg)
  const T* __restrict__ A = a.A + sys * static_cast<int64_t>(n) * n;
  const T* __restrict__ b = a.b + sys * n;
  const MultiBlockLayout layout(a.batch, n, nb);
  T* x = a.x + sys * n;
  T* r = a.workspace + sys * 4 * n;
  T* p = r + n;
  T* Ap = r + 2 * n;
  T* dinv = r + 3 * n;
  T* part = a.workspace + layout.partials + sys * nb * kPartialSlots;  // the system's blocks
  T* mine = part + blk * kPartialSlots;                                // this block's slots
  T* flags = a.workspace + layout.flags;

  // x = x0 and the Jacobi inverse diagonal on this block's entries.
  T bad[1] = {T(0)};
  for (int j = c0 + tid; j < c0 + cols; j += num_threads) {
    x[j] = a.x0 != nullptr ? a.x0[sys * n + j] : T(0);
    if (a.jacobi) {
      const T d = A[static_cast<int64_t>(j) * n + j];
      bad[0] += (d > T(0) && isfinite(d)) ? T(0) : T(1);
      dinv[j] = d > T(0) ? T(1) / d : T(0);
    }
  }
  grid.sync();  // all of x is visible: A x0 reads it
  if (a.x0 != nullptr) {
    block_symv<T, V>(A + c0, n, n, cols, x, x + c0, Ap + c0, slice_partial, slices);
    __syncthreads();  // this block's entries of A x0 are complete
  }
  // r = b - A x0, z = D^-1 r, p = z; partial sums of ||b||^2, r'r, r'z and bad diagonals.
  T sums[4] = {T(0), T(0), T(0), bad[0]};
  for (int j = c0 + tid; j < c0 + cols; j += num_threads) {
    const T bj = b[j];
    const T rj = a.x0 != nullptr ? bj - Ap[j] : bj;
    const T dj = a.jacobi ? dinv[j] : T(1);
    r[j] = rj;
    p[j] = dj * rj;
    sums[0] += bj * bj;
    sums[1] += rj * rj;
    sums[2] += rj * dj * rj;
  }
  block_allreduce<T, 4>(sums, red);
  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < kPartialSlots; ++i) mine[i] = sums[i];
  }
  grid.sync();
  T totals[4];
  sum_partials<T, 0, 4>(part, nb, totals, red);
  const double threshold = stop_threshold(sqrt(static_cast<double>(totals[0])), a.rtol, a.atol);
  T rz = totals[2];
  bool active = totals[3] == T(0) && !within(totals[1], threshold);
  if (blk == 0 && tid == 0) flags[sys] = active ? T(1) : T(0);
  grid.sync();

  // Iteration k is applied to every system still active; an active system has had k updates,
  // so k < maxiter is the kernel's it < maxiter. The slots read in a phase were written in the
  // previous one, and are next written two grid syncs after being read.
  int64_t it = 0;
  for (int64_t k = 0; k < a.maxiter; ++k) {
    if (!any_active(flags, a.batch)) break;  // the whole grid leaves together
    // 1. This block's entries of A p, and its share of p'Ap.
    if (active) {
      T pAp[1] = {block_symv<T, V>(A + c0, n, n, cols, p, p + c0, Ap + c0, slice_partial,
                                   slices)};
      block_allreduce<T, 1>(pAp, red);
      if (tid == 0) mine[0] = pAp[0];
    }
    grid.sync();
    // 2. The step: x += alpha p, r -= alpha Ap on this block's entries; shares of r'r, r'z.
    if (active) {
      T pAp[1];
      sum_partials<T, 0, 1>(part, nb, pAp, red);
      if (!(pAp[0] > T(0))) {
        active = false;  // not positive definite, or NaN: stop, unconverged
      } else {
        const T alpha = rz / pAp[0];
        T rs[2] = {T(0), T(0)};  // r'r, r'D^-1 r
        for (int j = c0 + tid; j < c0 + cols; j += num_threads) {
          x[j] += alpha * p[j];
          const T rj = r[j] - alpha * Ap[j];
          r[j] = rj;
          rs[0] += rj * rj;
          if (a.jacobi) rs[1] += rj * dinv[j] * rj;
        }
        ++it;
        block_allreduce<T, 2>(rs, red);
        if (tid == 0) {
          mine[1] = rs[0];
          mine[2] = rs[1];
        }
      }
    }
    grid.sync();
    // 3. Stop, or the next direction p = z + beta p on this block's entries.
    if (active) {
      T rs[2];
      sum_partials<T, 1, 2>(part, nb, rs, red);
      if (within(rs[0], threshold)) {
        active = false;
      } else {
        const T rz_new = a.jacobi ? rs[1] : rs[0];
        const T beta = rz_new / rz;
        rz = rz_new;
        for (int j = c0 + tid; j < c0 + cols; j += num_threads) {
          const T zj = a.jacobi ? dinv[j] * r[j] : r[j];
          p[j] = zj + beta * p[j];
        }
      }
    }
    if (blk == 0 && tid == 0) flags[sys] = active ? T(1) : T(0);
    grid.sync();
  }

  // The true residual of the returned x. The loop ends right after a grid sync (or none ran,
  // and the set-up ended with one), so all of x is visible.
  block_symv<T, V>(A + c0, n, n, cols, x, x + c0, Ap + c0, slice_partial, slices);
  __syncthreads();
  T res[1] = {T(0)};
  for (int j = c0 + tid; j < c0 + cols; j += num_threads) {
    const T e = b[j] - Ap[j];
    res[0] += e * e;
  }
  block_allreduce<T, 1>(res, red);
  if (tid == 0) mine[3] = res[0];
  grid.sync();
  if (blk == 0) {
    sum_partials<T, 3, 1>(part, nb, res, red);
    if (tid == 0) {
      a.iterations[sys] = it;
      a.residual_norm[sys] = sqrt(res[0]);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Launches
// ------------------------------------------------------------------------------------------

template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);  // elements per 16-byte load

// Raises KERNEL's dynamic shared memory limit on `device` (the current device) to the device's
// opt-in maximum, once per kernel and device. Every call then finds the same limit, whatever
// its own size: setting the attribute to each call's size let two host threads with different
// sizes above 48 KB undo each other between attribute and launch. Thread-safe: a race can only
// set the same value twice.
template <auto KERNEL>
cudaError_t allow_max_dynamic_smem(int device) {
  static std::atomic<bool> done[kMaxDevices] = {};
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  int optin = 0;
  cudaError_t err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes attr{};
  err = cudaFuncGetAttributes(&attr, KERNEL);
  if (err != cudaSuccess) return err;
  const int dynamic_max = optin - static_cast<int>(attr.sharedSizeBytes);
  err = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_max);
  if (err == cudaSuccess && cached) done[device].store(true, std::memory_order_release);
  return err;
}

template <typename T, int V, bool MATRIX_IN_SMEM>
cudaError_t launch_block(const BatchedCGArgs<T>& a, const BatchedCGPlan& plan,
                         cudaStream_t stream) {
  constexpr auto kernel = cg_block_kernel<T, V, MATRIX_IN_SMEM>;
  if (plan.smem_bytes > kDefaultSmemBytes) {
    const cudaError_t err = allow_max_dynamic_smem<kernel>(plan.device);
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(a.batch), plan.threads, plan.smem_bytes, stream>>>(
      a, plan.slices, plan.vectors_in_smem);
  return cudaGetLastError();
}

template <typename T, int V>
cudaError_t launch_block(const BatchedCGArgs<T>& a, const BatchedCGPlan& plan,
                         cudaStream_t stream) {
  return plan.matrix_in_smem ? launch_block<T, V, true>(a, plan, stream)
                             : launch_block<T, V, false>(a, plan, stream);
}

template <typename T, int V>
cudaError_t launch_multiblock(const BatchedCGArgs<T>& a, const BatchedCGPlan& plan,
                              cudaStream_t stream) {
  BatchedCGArgs<T> args = a;
  int nb = plan.blocks_per_system, cols = plan.cols_per_block, slices = plan.slices;
  void* params[] = {&args, &nb, &cols, &slices};
  const dim3 grid(static_cast<unsigned>(a.batch * nb)), block(plan.threads);
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(cg_multiblock_kernel<T, V>),
                                     grid, block, params, plan.smem_bytes, stream);
}

// The multiblock plan, or false when it does not apply (no cooperative launch, or more systems
// than blocks that can be resident at once).
template <typename T>
bool plan_multiblock(int64_t batch, int64_t n, int vec, int device,
                     const BatchedCGTuning& tuning, BatchedCGPlan* plan, cudaError_t* err) {
  int cooperative = 0, sms = 0, per_sm = 0;
  *err = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (*err == cudaSuccess) *err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // Occupancy for the largest shared memory any plan uses (slices * cols <= threads * vec).
  const size_t max_smem = (kReduceSlots + static_cast<size_t>(kMultiThreads) * vec) * sizeof(T);
  if (*err == cudaSuccess) {
    *err = vec == 1 ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                          &per_sm, cg_multiblock_kernel<T, 1>, kMultiThreads, max_smem)
                    : cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                          &per_sm, cg_multiblock_kernel<T, kVecWidth<T>>, kMultiThreads, max_smem);
  }
  if (*err != cudaSuccess) return false;
  const int64_t capacity = static_cast<int64_t>(sms) * per_sm;
  if (!cooperative || batch > capacity) return false;
  // Blocks per system: as asked (or, by default, enough to fill the device, with at least 8
  // vector groups of columns per block), at most what stays resident and one group each.
  const int64_t groups = n / vec;
  int64_t want = tuning.blocks_per_system > 0
                     ? tuning.blocks_per_system
                     : std::max<int64_t>(1, std::min(capacity / batch, (groups + 7) / 8));
  want = std::max<int64_t>(1, std::min({want, capacity / batch, groups}));
  const int64_t cols = (groups + want - 1) / want * vec;  // a whole number of groups per block
  plan->kind = BatchedCGKind::kMultiBlock;
  plan->threads = kMultiThreads;
  plan->vec = vec;
  plan->cols_per_block = static_cast<int>(cols);
  plan->blocks_per_system = static_cast<int>((n + cols - 1) / cols);  // every block has columns
  plan->slices = static_cast<int>(std::max<int64_t>(1, kMultiThreads / (cols / vec)));
  plan->smem_bytes = (kReduceSlots + (plan->slices > 1 ? plan->slices * cols : 0)) * sizeof(T);
  plan->workspace_elems = MultiBlockLayout(batch, n, plan->blocks_per_system).total;
  return true;
}

}  // namespace

template <typename T>
cudaError_t plan_batched_cg(int64_t batch, int64_t n, bool aligned16, int device,
                            const BatchedCGTuning& tuning, BatchedCGPlan* plan) {
  *plan = BatchedCGPlan{BatchedCGKind::kEmpty, device, 0, 1, 1, false, false, 0, 0, 1, 0};
  if (batch < 0 || n < 0 || n > INT_MAX || tuning.blocks_per_system < 0) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0 || n == 0) return cudaSuccess;
  if (n <= kWarpSize) {
    if ((batch + kWarpsPerBlock - 1) / kWarpsPerBlock > INT_MAX) return cudaErrorInvalidValue;
    plan->kind = BatchedCGKind::kWarpPerSystem;
    plan->threads = kWarpsPerBlock * kWarpSize;
    return cudaSuccess;
  }
  if (batch > INT_MAX) return cudaErrorInvalidValue;
  const int64_t vw = kVecWidth<T>;
  const int vec = (aligned16 && n % vw == 0) ? static_cast<int>(vw) : 1;
  if (tuning.strategy == BatchedCGStrategy::kMultiBlock) {
    cudaError_t err = cudaSuccess;
    if (plan_multiblock<T>(batch, n, vec, device, tuning, plan, &err) || err != cudaSuccess) {
      return err;
    }
  }
  plan->kind = BatchedCGKind::kBlockPerSystem;
  plan->vec = vec;
  const int64_t threads = std::min<int64_t>(kMaxThreads, std::max<int64_t>(64, (n + 31) / 32 * 32));
  const int64_t groups = n / plan->vec;
  plan->threads = static_cast<int>(threads);
  plan->slices = static_cast<int>(std::max<int64_t>(1, threads / groups));

  int max_smem = 0;
  cudaError_t err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                           device);
  if (err != cudaSuccess) return err;
  size_t limit = static_cast<size_t>(max_smem);
  if (tuning.smem_cap_bytes >= 0) limit = std::min(limit, static_cast<size_t>(tuning.smem_cap_bytes));
  const size_t reduce_bytes = kReduceSlots * sizeof(T);
  const size_t vector_bytes = static_cast<size_t>(vector_elems(n, plan->slices)) * sizeof(T);
  const size_t matrix_bytes = static_cast<size_t>(n) * static_cast<size_t>(n) * sizeof(T);
  plan->vectors_in_smem = reduce_bytes + vector_bytes <= limit;
  plan->matrix_in_smem = tuning.strategy != BatchedCGStrategy::kGlobal && plan->vectors_in_smem &&
                         reduce_bytes + vector_bytes + matrix_bytes <= limit;
  plan->smem_bytes = reduce_bytes + (plan->vectors_in_smem ? vector_bytes : 0) +
                     (plan->matrix_in_smem ? matrix_bytes : 0);
  plan->workspace_elems = plan->vectors_in_smem ? 0 : batch * vector_elems(n, plan->slices);
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_batched_cg(const BatchedCGArgs<T>& a, const BatchedCGPlan& plan,
                              cudaStream_t stream) {
  switch (plan.kind) {
    case BatchedCGKind::kEmpty:
      return cudaSuccess;
    case BatchedCGKind::kWarpPerSystem: {
      const unsigned blocks = static_cast<unsigned>((a.batch + kWarpsPerBlock - 1) / kWarpsPerBlock);
      if (a.n <= 8) {
        cg_warp_kernel<T, 8><<<blocks, plan.threads, 0, stream>>>(a);
      } else if (a.n <= 16) {
        cg_warp_kernel<T, 16><<<blocks, plan.threads, 0, stream>>>(a);
      } else {
        cg_warp_kernel<T, 32><<<blocks, plan.threads, 0, stream>>>(a);
      }
      return cudaGetLastError();
    }
    case BatchedCGKind::kBlockPerSystem:
      if (a.workspace == nullptr && !plan.vectors_in_smem) return cudaErrorInvalidValue;
      return plan.vec == 1 ? launch_block<T, 1>(a, plan, stream)
                           : launch_block<T, kVecWidth<T>>(a, plan, stream);
    case BatchedCGKind::kMultiBlock:
      if (a.workspace == nullptr) return cudaErrorInvalidValue;
      return plan.vec == 1 ? launch_multiblock<T, 1>(a, plan, stream)
                           : launch_multiblock<T, kVecWidth<T>>(a, plan, stream);
  }
  return cudaErrorInvalidValue;
}

template cudaError_t plan_batched_cg<float>(int64_t, int64_t, bool, int, const BatchedCGTuning&,
                                            BatchedCGPlan*);
template cudaError_t plan_batched_cg<double>(int64_t, int64_t, bool, int, const BatchedCGTuning&,
                                             BatchedCGPlan*);
template cudaError_t launch_batched_cg<float>(const BatchedCGArgs<float>&, const BatchedCGPlan&,
                                              cudaStream_t);
template cudaError_t launch_batched_cg<double>(const BatchedCGArgs<double>&,
                                               const BatchedCGPlan&, cudaStream_t);

}  // namespace cuda
}  // namespace implicit_torch
