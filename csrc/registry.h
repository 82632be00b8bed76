// Which kernels this build of the extension holds. Every TORCH_LIBRARY_IMPL block also calls
// note_compiled_kernel(op, backend); the module exposes the list to Python as
// implicit_torch._C.KERNELS, a tuple of (op, backend) pairs such as ("batched_cg", "CUDA"),
// which implicit_torch/ops/_registration.py reads (no need to ask the dispatcher through
// private torch APIs).
#pragma once

namespace implicit_torch {

// Records a kernel; `op` and `backend` must be string literals (they are kept, not copied).
// Called during static initialisation, before the module's PyInit__C runs.
void note_compiled_kernel(const char* op, const char* backend);

}  // namespace implicit_torch
