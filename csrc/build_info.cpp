#include "build_info.h"

#include <ATen/Parallel.h>

#ifndef DEEPFORCING_VERSION
#define DEEPFORCING_VERSION "0.1.0"
#endif

namespace deepforcing {

std::string version() { return DEEPFORCING_VERSION; }

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int max_threads() { return at::get_num_threads(); }

}  // namespace deepforcing
