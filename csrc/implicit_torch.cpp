// The Python module implicit_torch._C: importing it loads this shared library, whose static
// registrations add the compiled kernels (TORCH_LIBRARY_IMPL blocks in cpu/ and cuda/) to the
// operators of the `implicit_torch` namespace.
//
// The schemas are defined once, in Python (implicit_torch/ops/_schemas.py), with or without
// this extension, so that the operators exist either way; the kernels here register under
// their names (the dispatcher accepts kernels before the schema and checks their signatures
// against it when it is defined). The fake kernels, autograd and vmap rules, and the
// pure-PyTorch kernels serving the backends this build lacks, are registered from Python
// (implicit_torch/ops/_registration.py).
#include <Python.h>

#include <utility>
#include <vector>

#include "registry.h"

namespace implicit_torch {
namespace {

std::vector<std::pair<const char*, const char*>>& compiled_kernels() {
  static std::vector<std::pair<const char*, const char*>> kernels;  // built on first use
  return kernels;
}

}  // namespace

void note_compiled_kernel(const char* op, const char* backend) {
  compiled_kernels().emplace_back(op, backend);
}

}  // namespace implicit_torch

// The module: no methods (the operators are reached through torch.ops.implicit_torch), one
// attribute, KERNELS: the (op, backend) pairs of the kernels compiled into this build.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // documentation
      -1,       // no per-module state
      nullptr,  // no methods
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  const auto& kernels = implicit_torch::compiled_kernels();
  PyObject* list = PyTuple_New(static_cast<Py_ssize_t>(kernels.size()));
  for (size_t i = 0; list != nullptr && i < kernels.size(); ++i) {
    PyObject* pair = Py_BuildValue("(ss)", kernels[i].first, kernels[i].second);
    if (pair == nullptr) Py_CLEAR(list);
    if (list != nullptr) PyTuple_SET_ITEM(list, static_cast<Py_ssize_t>(i), pair);
  }
  if (list == nullptr || PyModule_AddObject(module, "KERNELS", list) < 0) {
    Py_XDECREF(list);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
