// The implicit_torch operator library (batched_cg, qp_ipm): schemas only. Kernels register per backend with
// TORCH_LIBRARY_IMPL (cpu/, cuda/); the fake kernel, autograd and vmap rules are registered from
// Python (implicit_torch/ops/_registration.py).
#include <Python.h>
#include <torch/library.h>

// An empty Python module, so that `import implicit_torch._C` loads this shared library and runs
// its static registrations.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",    // name
      nullptr, // documentation
      -1,      // no per-module state
      nullptr, // no methods: everything is reached through torch.ops.implicit_torch
  };
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(implicit_torch, m) {
  // Must match SCHEMA in implicit_torch/ops/_registration.py (tests/test_ops.py checks it).
  m.def("batched_cg(Tensor A, Tensor b, Tensor? x0, float rtol, float atol, int maxiter, "
        "bool jacobi=False) -> (Tensor x, Tensor iterations, Tensor residual_norm)");
  // The interior-point iterations of implicit_torch.solvers.QP (CPU kernel only; the solver
  // runs its batched PyTorch loop elsewhere). Must match QP_IPM_SCHEMA in _registration.py.
  m.def("qp_ipm(Tensor K, Tensor q, Tensor M1, Tensor W, Tensor T, Tensor nGt, int maxiter, "
        "float tol, float acceptable_tol, int patience) -> (Tensor z, Tensor iterations, "
        "Tensor error, Tensor converged)");
}
