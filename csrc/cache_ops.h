#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace deepforcing {

// Per-frame float32 sums of a contiguous CPU block x [B, F * n, H, D]: out [B, F, H, D] = sum over each frame's n
// tokens, accumulated in float32 in token order, on the calling thread.
at::Tensor frame_sums(const at::Tensor& x, int64_t frames);

// Slot moves of the cache's contiguous CPU tensors [B, L, ...] (L = slots), on the calling thread: a block's K/V is
// a few hundred KB, and an ATen parallel copy of it waits more for its threads to wake than it copies.
// dst[:, offset:offset + n] = src (src [B, n, ...], same dtype and slot size).
void copy_slots(at::Tensor& dst, int64_t offset, const at::Tensor& src);
// t[:, dst:dst + count] = t[:, src:src + count] as a memmove (overlap allowed).
void move_slots(at::Tensor& t, int64_t src, int64_t dst, int64_t count);
// The Top-C compaction of every tensor, in place: slots idx [B, C] (int64, ascending, idx[b, i] >= keep_head + i,
// all before recent_src) move to [keep_head, keep_head + C), then [recent_src, recent_src + recent_len) to
// recent_dst == keep_head + C.
void compact_slots(std::vector<at::Tensor> tensors, const at::Tensor& idx, int64_t keep_head, int64_t recent_src,
                   int64_t recent_dst, int64_t recent_len);

}  // namespace deepforcing
