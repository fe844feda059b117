#pragma once
#include <ATen/ATen.h>

namespace deepforcing {

// Per-frame float32 sums of a contiguous CPU block x [B, F * n, H, D]: out [B, F, H, D] = sum over each frame's n
// tokens, accumulated in float32 in token order, on the calling thread.
at::Tensor frame_sums(const at::Tensor& x, int64_t frames);

}  // namespace deepforcing
