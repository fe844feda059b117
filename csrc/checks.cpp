// Cheap input checks for the streaming cache's hot path.
#include "checks.h"

#include <cstdint>
#include <cstring>

namespace deepforcing {
namespace {

// True when no element has an all-ones exponent (inf or NaN). Reads the raw bits: branch-free, vectorises, and
// runs on the calling thread, because a parallel ATen reduction pays a fork/join that costs more than the scan
// for the block-sized tensors the cache checks on every pass.
template <typename bits_t>
bool exponent_never_saturated(const void* data, int64_t n, bits_t mask) {
  const bits_t* p = static_cast<const bits_t*>(data);
  bits_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<bits_t>((p[i] & mask) == mask);
  return bad == 0;
}

}  // namespace

bool all_finite(const std::vector<at::Tensor>& tensors) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "all_finite: tensors must be contiguous CPU tensors");
    const int64_t n = t.numel();
    bool ok = true;
    switch (t.scalar_type()) {
      case at::kFloat:
        ok = exponent_never_saturated<uint32_t>(t.data_ptr(), n, 0x7F800000u);
        break;
      case at::kBFloat16:
        ok = exponent_never_saturated<uint16_t>(t.data_ptr(), n, static_cast<uint16_t>(0x7F80));
        break;
      case at::kHalf:
        ok = exponent_never_saturated<uint16_t>(t.data_ptr(), n, static_cast<uint16_t>(0x7C00));
        break;
      case at::kDouble:
        ok = exponent_never_saturated<uint64_t>(t.data_ptr(), n, 0x7FF0000000000000ull);
        break;
      default:
        TORCH_CHECK(false, "all_finite: unsupported dtype ", t.scalar_type());
    }
    if (!ok) return false;
  }
  return true;
}

}  // namespace deepforcing
