// pybind11 module deepforcing_kernels._C: exposes the kernels in csrc/ to Python.
#include <torch/extension.h>

#include "../csrc/build_info.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deepforcing_kernels C++ kernels";
  m.def("version", &deepforcing::version, "version the extension was built as");
  m.def("has_openmp", &deepforcing::has_openmp, "whether the extension was compiled with OpenMP");
  m.def("max_threads", &deepforcing::max_threads, "ATen intra-op threads available to the kernels");
}
