// The Python module nfkernels._C. Importing it loads this library, which registers every op
// below under torch.ops.nfkernels. Each op lives in its own csrc/*.cpp file and adds itself with
// TORCH_LIBRARY_FRAGMENT(nfkernels, m) (schema) and TORCH_LIBRARY_IMPL(nfkernels, CPU|CUDA, m).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "nfkernels compiled ops", -1, nullptr};
  return PyModule_Create(&def);
}
