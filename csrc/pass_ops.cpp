// A cache layer's passes as single calls: see pass_ops.h. Everything runs on the calling thread except the kernel.
#include "pass_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "cache_ops.h"
#include "checks.h"
#include "sink_attention_cpu.h"

namespace deepforcing {

PreparedPass::PreparedPass(at::Tensor k_store, at::Tensor v_store, int64_t write_offset, int64_t length,
                           at::Tensor cos, at::Tensor sin, int64_t rot_len, bool interleaved, double softmax_scale,
                           std::vector<int64_t> q_shape, bool check_finite, bool return_mass, int64_t mass_start,
                           int64_t mass_end, std::optional<at::Tensor> carry)
    : k_store_(std::move(k_store)), v_store_(std::move(v_store)), cos_(std::move(cos)), sin_(std::move(sin)),
      write_offset_(write_offset), length_(length), rot_len_(rot_len), interleaved_(interleaved),
      scale_(softmax_scale), q_shape_(std::move(q_shape)), check_finite_(check_finite), return_mass_(return_mass),
      mass_start_(mass_start), mass_end_(mass_end), carry_(std::move(carry)) {
  TORCH_CHECK(k_store_.dim() == 4 && k_store_.sizes() == v_store_.sizes() && k_store_.is_contiguous() &&
                  v_store_.is_contiguous() && k_store_.device().is_cpu(),
              "PreparedPass: the storage must be two contiguous CPU tensors [B, capacity, Hkv, D] of one shape");
  TORCH_CHECK(q_shape_.size() == 4 && q_shape_[0] == k_store_.size(0) && q_shape_[3] == k_store_.size(3),
              "PreparedPass: q_shape must be [B, Lb, Hq, D] of the storage's batch and head_dim");
  const int64_t Lb = q_shape_[1];
  TORCH_CHECK(length_ >= 0 && length_ <= k_store_.size(1) && write_offset_ >= 0 && write_offset_ + Lb <= length_,
              "PreparedPass: slots [", write_offset_, ", ", write_offset_ + Lb, ") are not inside the attended [0, ",
              length_, ")");
  TORCH_CHECK(!carry_ || (carry_->scalar_type() == at::kFloat && carry_->dim() == 2 && carry_->is_contiguous() &&
                          carry_->size(0) == k_store_.size(0) && carry_->size(1) >= length_),
              "PreparedPass: carry must be a contiguous float32 [B, >= length] tensor");
  TORCH_CHECK(!carry_ || return_mass_, "PreparedPass: a carried mass needs return_mass");
  kv_shape_ = {q_shape_[0], Lb, k_store_.size(2), q_shape_[3]};
  k_view_ = k_store_.narrow(1, 0, length_);
  v_view_ = v_store_.narrow(1, 0, length_);
}

bool PreparedPass::fits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const {
  const auto dt = k_store_.scalar_type();
  for (const at::Tensor* t : {&q, &k, &v})
    if (!t->defined() || t->scalar_type() != dt || !t->device().is_cpu() || t->dim() != 4) return false;
  if (q.sizes() != at::IntArrayRef(q_shape_) || k.sizes() != at::IntArrayRef(kv_shape_) ||
      v.sizes() != at::IntArrayRef(kv_shape_))
    return false;
  // the K/V copy is a memcpy, the finite scan a flat one: other strides take the Python path
  if (!k.is_contiguous() || !v.is_contiguous() || (check_finite_ && !q.is_contiguous())) return false;
  return !check_finite_ || all_finite({q, k, v});
}

std::optional<at::Tensor> PreparedPass::run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  if (!fits(q, k, v)) return std::nullopt;
  copy_slots(k_store_, write_offset_, k);
  copy_slots(v_store_, write_offset_, v);
  return std::get<0>(attend(q));
}

std::tuple<at::Tensor, at::Tensor> PreparedPass::attend(const at::Tensor& q) {
  auto res = sink_attention_fwd(q, k_view_, v_view_, cos_, sin_, rot_len_, interleaved_, scale_, return_mass_,
                                mass_start_, mass_end_);
  at::Tensor& mass = std::get<2>(res);
  if (carry_) head_sum(mass, 0, length_, *carry_, false);
  return {std::get<0>(res), mass};
}

void write_block(at::Tensor k_store, at::Tensor v_store, at::Tensor frames, std::vector<at::Tensor> extras,
                 int64_t offset, const at::Tensor& k, const at::Tensor& v, int64_t first_frame, int64_t block_frames) {
  const int64_t B = k.size(0), Lb = k.size(1);
  TORCH_CHECK(block_frames >= 1 && Lb % block_frames == 0, "write_block: ", Lb, " slots are not ", block_frames,
              " whole frames");
  TORCH_CHECK(frames.scalar_type() == at::kLong && frames.dim() == 2 && frames.is_contiguous() && frames.size(0) == B &&
                  offset >= 0 && offset + Lb <= frames.size(1),
              "write_block: frames must be a contiguous int64 [B, capacity] tensor holding slots [", offset, ", ",
              offset + Lb, ")");
  for (const at::Tensor& t : extras)  // all checked before anything is written
    TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu() && t.size(0) == B &&
                    t.size(1) == frames.size(1),
                "write_block: per-slot buffers must be contiguous CPU tensors [B, capacity]");
  copy_slots(k_store, offset, k);
  copy_slots(v_store, offset, v);
  const int64_t n = Lb / block_frames, cap = frames.size(1);
  int64_t* fr = frames.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Lb; ++j) fr[b * cap + offset + j] = first_frame + j / n;
  for (at::Tensor& t : extras) {
    auto* p = static_cast<char*>(t.data_ptr());
    const int64_t row = t.element_size();
    for (int64_t b = 0; b < B; ++b) std::memset(p + (b * cap + offset) * row, 0, static_cast<size_t>(Lb * row));
  }
}

void head_sum(const at::Tensor& mass, int64_t start, int64_t n, at::Tensor& out, bool accumulate) {
  TORCH_CHECK(mass.dim() == 3 && mass.scalar_type() == at::kFloat && mass.is_contiguous() && mass.device().is_cpu(),
              "head_sum: mass must be a contiguous float32 CPU tensor [B, H, L]");
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.size(0) == mass.size(0) && out.size(1) >= n && start >= 0 && start + n <= mass.size(2),
              "head_sum: out must be a contiguous float32 [B, >= n] tensor and [start, start + n) inside the mass");
  const int64_t B = mass.size(0), H = mass.size(1), L = mass.size(2), ld = out.size(1);
  // torch adds up to 3 rows one after another in every column; from 4 rows on, its order depends on the column's
  // place in the vectorised loop (4-way interleaved partial sums for some columns, cascade levels from 16 rows),
  // so those sums are left to torch itself
  if (H > 3) {
    at::Tensor s = mass.narrow(2, start, n).sum(1);
    at::Tensor dst = out.narrow(1, 0, n);
    if (accumulate)
      dst.copy_(dst + s);
    else
      dst.copy_(s);
    return;
  }
  const float* m = mass.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* mb = m + b * H * L + start;
    float* ob = o + b * ld;
    for (int64_t j = 0; j < n; ++j) {
      float acc = mb[j];
      for (int64_t h = 1; h < H; ++h) acc += mb[h * L + j];
      ob[j] = accumulate ? ob[j] + acc : acc;
    }
  }
}

at::Tensor compress_pass(const std::vector<at::Tensor>& slot_tensors, at::Tensor reuse, const at::Tensor& mass,
                         const std::vector<at::Tensor>& carried, int64_t sink_tokens, int64_t topc_tokens,
                         int64_t recent_tokens, int64_t end, int64_t max_reuse) {
  const int64_t S = sink_tokens, C = topc_tokens, R = recent_tokens, B = mass.size(0);
  const int64_t cand = end - R - S;
  TORCH_CHECK(S >= 0 && C >= 0 && R >= 0 && cand >= C && end <= mass.size(2),
              "compress_pass: ", cand, " candidates for ", C, " Top-C slots in a cache of ", end, " slots");
  TORCH_CHECK(reuse.scalar_type() == at::kInt && reuse.dim() == 2 && reuse.is_contiguous() && reuse.size(0) == B &&
                  reuse.size(1) >= end,
              "compress_pass: reuse must be a contiguous int32 [B, >= end] tensor");
  // the score: carried parts in order, then this pass's mass summed over heads (scoring.py MassScorer)
  at::Tensor score = at::empty({B, cand}, mass.options());
  at::Tensor heads = at::empty({B, cand}, mass.options());
  head_sum(mass, S, cand, heads, false);
  float* sc = score.data_ptr<float>();
  const float* hs = heads.data_ptr<float>();
  for (size_t i = 0; i < carried.size(); ++i) {
    const at::Tensor& c = carried[i];
    TORCH_CHECK(c.scalar_type() == at::kFloat && c.dim() == 2 && c.is_contiguous() && c.size(0) == B &&
                    c.size(1) >= end,
                "compress_pass: a carried mass must be a contiguous float32 [B, >= end] tensor");
    const float* cp = c.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < cand; ++j) {
        const float x = cp[b * c.size(1) + S + j];
        sc[b * cand + j] = i == 0 ? x : sc[b * cand + j] + x;
      }
  }
  for (int64_t i = 0; i < B * cand; ++i) sc[i] = carried.empty() ? hs[i] : sc[i] + hs[i];
  // Top-C: the order torch's two stable sorts give (storage.py select_topc), as one total order
  at::Tensor idx = at::empty({B, C}, mass.options().dtype(at::kLong));
  int64_t* ix = idx.data_ptr<int64_t>();
  int32_t* ru = reuse.data_ptr<int32_t>();
  const int64_t lr = reuse.size(1);
  std::vector<int64_t> order(cand);
  for (int64_t b = 0; b < B; ++b) {
    const float* s = sc + b * cand;
    const int32_t* r = ru + b * lr + S;
    auto before = [&](int64_t x, int64_t y) {
      if (max_reuse >= 0) {
        const bool ix_ = r[x] >= max_reuse, iy = r[y] >= max_reuse;
        if (ix_ != iy) return iy;
      }
      const float a = s[x], c = s[y];
      const bool na = std::isnan(a), nc = std::isnan(c);
      if (na != nc) return na;
      if (!na && a != c) return a > c;
      return x < y;
    };
    std::iota(order.begin(), order.end(), int64_t{0});
    std::partial_sort(order.begin(), order.begin() + C, order.end(), before);
    std::sort(order.begin(), order.begin() + C);
    for (int64_t i = 0; i < C; ++i) ix[b * C + i] = order[i] + S;
  }
  compact_slots(slot_tensors, idx, S, end - R, S + C, R);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = S; i < S + C; ++i) ru[b * lr + i] += 1;
  return idx;
}

}  // namespace deepforcing
