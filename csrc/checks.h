#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace deepforcing {

// Whether every element of every tensor (contiguous, CPU, float32 / bfloat16 / float16 / float64) is finite.
bool all_finite(const std::vector<at::Tensor>& tensors);

}  // namespace deepforcing
