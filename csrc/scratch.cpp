// Thread-kept scratch memory of the CPU kernel (see scratch.h).
#include "scratch.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace deepforcing {
namespace detail {
namespace {

// One growing, 64-byte aligned allocation.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(ptr_); }
  void* get(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes > size_) {
      std::free(ptr_);
      ptr_ = std::aligned_alloc(64, bytes);
      size_ = ptr_ != nullptr ? bytes : 0;
      TORCH_CHECK(ptr_ != nullptr, "sink_attention_fwd: out of memory for ", bytes, " bytes of scratch");
    }
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

// Requests above this are served but not kept.
constexpr size_t kScratchRetain = size_t(512) << 20;

}  // namespace

void* call_scratch(int slot, size_t bytes, at::Tensor& holder) {
  thread_local Scratch slots[4];
  TORCH_CHECK(0 <= slot && slot < 4, "call_scratch: slot ", slot, " out of range");
  if (bytes <= kScratchRetain) return slots[slot].get(bytes);
  holder = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
  return holder.data_ptr<uint8_t>();
}

void* worker_scratch(int slot, size_t bytes) {
  thread_local Scratch slots[3];
  TORCH_CHECK(0 <= slot && slot < 3, "worker_scratch: slot ", slot, " out of range");
  return slots[slot].get(bytes);
}

}  // namespace detail
}  // namespace deepforcing
