#pragma once
#include <string>

namespace deepforcing {

// Facts about how the extension was compiled, bound as `_C.version()`, `_C.has_openmp()` and `_C.max_threads()`
// (read by tests/test_build.py and by the benchmark metadata in deepforcing_kernels/bench/timing.py).
std::string version();
bool has_openmp();
int max_threads();

}  // namespace deepforcing
