#pragma once
// Scratch memory of the CPU kernel, kept by each thread between calls. The packed K / V panels (several MB) are
// rewritten by every call; a fresh allocation would page-fault all of it again each time (measured: twice the cost
// of packing).
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

namespace deepforcing {
namespace detail {

// Per-call buffer of `bytes` in the calling thread's kept slot `slot` (0..3) when at most 512 MiB, else in
// `holder`, a tensor freed with the call.
void* call_scratch(int slot, size_t bytes, at::Tensor& holder);

// Per-worker buffer of `bytes` in the calling thread's kept slot `slot` (0..2): score blocks and their kin.
void* worker_scratch(int slot, size_t bytes);

template <typename T>
T* call_buffer(int slot, int64_t count, at::Tensor& holder) {
  return static_cast<T*>(call_scratch(slot, static_cast<size_t>(count) * sizeof(T), holder));
}

template <typename T>
T* worker_buffer(int slot, int64_t count) {
  return static_cast<T*>(worker_scratch(slot, static_cast<size_t>(count) * sizeof(T)));
}

}  // namespace detail
}  // namespace deepforcing
