// Small per-pass helpers of the streaming cache. They run on the calling thread: for block-sized tensors a parallel
// ATen reduction spends more on its fork/join than on the arithmetic (measured ~110 us vs ~20 us per pass).
#include "cache_ops.h"

#include <cstring>

namespace deepforcing {

at::Tensor frame_sums(const at::Tensor& x, int64_t frames) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(),
              "frame_sums: x must be a contiguous 4-D CPU tensor [B, L, H, D]");
  TORCH_CHECK(frames >= 1 && x.size(1) % frames == 0, "frame_sums: L (", x.size(1), ") must be a multiple of ",
              "frames (", frames, ")");
  const int64_t B = x.size(0), n = x.size(1) / frames, row = x.size(2) * x.size(3);
  at::Tensor out = at::zeros({B, frames, x.size(2), x.size(3)}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "frame_sums", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    for (int64_t bf = 0; bf < B * frames; ++bf) {
      float* acc = o + bf * row;
      const scalar_t* src = p + bf * n * row;
      for (int64_t t = 0; t < n; ++t)
        for (int64_t i = 0; i < row; ++i) acc[i] += static_cast<float>(src[t * row + i]);
    }
  });
  return out;
}

}  // namespace deepforcing

namespace deepforcing {
namespace {

// Bytes of one slot of a contiguous CPU tensor [B, L, ...] (the slot axis is dim 1).
int64_t slot_bytes(const at::Tensor& t, const char* who) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() >= 2, who,
              ": slot tensors must be contiguous CPU tensors [B, L, ...], got ", t.sizes());
  int64_t inner = 1;
  for (int64_t d = 2; d < t.dim(); ++d) inner *= t.size(d);
  return inner * static_cast<int64_t>(t.element_size());
}

void check_range(const at::Tensor& t, int64_t start, int64_t count, const char* who) {
  TORCH_CHECK(start >= 0 && count >= 0 && start + count <= t.size(1), who, ": slots [", start, ", ",
              start + count, ") are outside [0, ", t.size(1), ")");
}

}  // namespace

void copy_slots(at::Tensor& dst, int64_t offset, const at::Tensor& src) {
  const int64_t row = slot_bytes(dst, "copy_slots");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type() && src.dim() == dst.dim() && src.size(0) == dst.size(0) &&
                  slot_bytes(src, "copy_slots") == row,
              "copy_slots: src ", src.sizes(), " ", src.scalar_type(), " does not fit dst ", dst.sizes(), " ",
              dst.scalar_type());
  const int64_t n = src.size(1);
  check_range(dst, offset, n, "copy_slots");
  auto* d = static_cast<char*>(dst.data_ptr());
  const auto* s = static_cast<const char*>(src.data_ptr());
  for (int64_t b = 0; b < dst.size(0); ++b)
    std::memcpy(d + (b * dst.size(1) + offset) * row, s + b * n * row, static_cast<size_t>(n * row));
}

void move_slots(at::Tensor& t, int64_t src, int64_t dst, int64_t count) {
  const int64_t row = slot_bytes(t, "move_slots");
  check_range(t, src, count, "move_slots");
  check_range(t, dst, count, "move_slots");
  auto* p = static_cast<char*>(t.data_ptr());
  for (int64_t b = 0; b < t.size(0); ++b) {
    char* base = p + b * t.size(1) * row;
    std::memmove(base + dst * row, base + src * row, static_cast<size_t>(count * row));
  }
}

void compact_slots(std::vector<at::Tensor> tensors, const at::Tensor& idx, int64_t keep_head, int64_t recent_src,
                   int64_t recent_dst, int64_t recent_len) {
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.device().is_cpu() && idx.is_contiguous(),
              "compact_slots: idx must be a contiguous int64 CPU tensor [B, C]");
  const int64_t B = idx.size(0), C = idx.size(1);
  const int64_t* ix = idx.data_ptr<int64_t>();
  for (auto& t : tensors) {
    TORCH_CHECK(t.size(0) == B, "compact_slots: a tensor has batch ", t.size(0), " but idx has ", B);
    const int64_t L = t.size(1);
    check_range(t, keep_head, C, "compact_slots");
    check_range(t, recent_src, recent_len, "compact_slots");
    check_range(t, recent_dst, recent_len, "compact_slots");
    TORCH_CHECK(recent_dst == keep_head + C && recent_src >= recent_dst, "compact_slots: the recent slots must move "
                "left to right after the Top-C slots");
    // the picks are ascending and at or after their destinations (idx[i] >= keep_head + i), so copying them in
    // order never reads a slot an earlier copy wrote: the gather runs in place, with no scratch
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < C; ++i) {
        const int64_t j = ix[b * C + i];
        TORCH_CHECK(j >= keep_head + i && j < recent_src && (i == 0 || j > ix[b * C + i - 1]),
                    "compact_slots: Top-C slots must be ascending, distinct and inside [", keep_head, ", ",
                    recent_src, ")");
      }
  }
  for (auto& t : tensors) {
    const int64_t row = slot_bytes(t, "compact_slots"), L = t.size(1);
    auto* p = static_cast<char*>(t.data_ptr());
    for (int64_t b = 0; b < B; ++b) {
      char* base = p + b * L * row;
      for (int64_t i = 0; i < C; ++i) {
        const int64_t j = ix[b * C + i];
        if (j != keep_head + i) std::memcpy(base + (keep_head + i) * row, base + j * row, static_cast<size_t>(row));
      }
      if (recent_src != recent_dst)
        std::memmove(base + recent_dst * row, base + recent_src * row, static_cast<size_t>(recent_len * row));
    }
  }
}

}  // namespace deepforcing
