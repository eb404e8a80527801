// `import twinmerge_ext._C` loads this shared library, whose static initializers register the
// twinmerge operators with the dispatcher. There is nothing else to bind: every op is reached
// through torch.ops.twinmerge.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
