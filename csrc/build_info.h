#pragma once
#include <string>

namespace deepforcing {

// Facts about how the extension was compiled, for `deepforcing_kernels.build_info()`.
std::string version();
bool has_openmp();
int max_threads();

}  // namespace deepforcing
