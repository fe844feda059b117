#pragma once
// A cache layer's passes as single calls (deepforcing_kernels/cache/prepared.py): what the Python executor does per
// pass around the kernel (input checks, the K/V write, the carried attention mass, the Top-C compression), on the
// calling thread, with the kernel's arguments prepared once per block. At the tiny per-pass sizes of a streaming
// cache the host work around the kernel costs more than the kernel; here it costs a few microseconds.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace deepforcing {

// The passes of one block over one layout: k_store / v_store [B, capacity, Hkv, D] are the layer's storage,
// the pass attends to slots [0, length) with the rotation tables (cos, sin, rot_len) of that layout
// (sink_attention_cpu.h), writes its K/V at slots [write_offset, write_offset + Lb), and, with return_mass,
// records mass over query rows [mass_start, mass_end), summed over KV heads, into carry[:, :length] (float32
// [B, capacity]) when carry is given.
class PreparedPass {
 public:
  PreparedPass(at::Tensor k_store, at::Tensor v_store, int64_t write_offset, int64_t length, at::Tensor cos,
               at::Tensor sin, int64_t rot_len, bool interleaved, double softmax_scale, std::vector<int64_t> q_shape,
               bool check_finite, bool return_mass, int64_t mass_start, int64_t mass_end,
               std::optional<at::Tensor> carry);

  // One overwrite pass: q [B, Lb, Hq, D], k / v [B, Lb, Hkv, D] of the storage's dtype, device and the expected
  // shapes, k / v contiguous, all three finite when checked. Returns nullopt, having changed nothing, when any of
  // that fails (the Python path then names the problem); else writes k / v, attends and returns the output.
  std::optional<at::Tensor> run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

  // The attention alone (inputs already checked and written): (out, mass or an empty tensor).
  std::tuple<at::Tensor, at::Tensor> attend(const at::Tensor& q);

 private:
  bool fits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const;

  at::Tensor k_store_, v_store_, k_view_, v_view_, cos_, sin_;
  int64_t write_offset_, length_, rot_len_;
  bool interleaved_;
  double scale_;
  std::vector<int64_t> q_shape_, kv_shape_;
  bool check_finite_, return_mass_;
  int64_t mass_start_, mass_end_;
  std::optional<at::Tensor> carry_;
};

// A new block's slots [offset, offset + Lb) of a layer's storage (cache/storage.py LayerStorage.write_new): the K/V
// (k, v [B, Lb, Hkv, D] contiguous, the stores' dtype), the source frame of each slot (first_frame + slot // n, int64
// frames [B, capacity]) and every per-slot buffer of extras zeroed; block_frames frames of n = Lb / block_frames
// tokens.
void write_block(at::Tensor k_store, at::Tensor v_store, at::Tensor frames, std::vector<at::Tensor> extras,
                 int64_t offset, const at::Tensor& k, const at::Tensor& v, int64_t first_frame, int64_t block_frames);

// out[b, j] = sum over h of mass[b, h, start + j] for j < out.size(1), in float32, in the order torch's
// mass[:, :, start:].sum(dim=1) adds (up to 3 heads one after another; more go to at::sum). out [B, >= n]
// float32 contiguous; accumulate: add the head sum to out instead of storing it (out += sum).
void head_sum(const at::Tensor& mass, int64_t start, int64_t n, at::Tensor& out, bool accumulate);

// Participative Compression of slots [0, end) in place (cache/scoring.py compress_step with the mass score):
// candidates [S, end - R) scored by the carried parts (summed in order) plus mass [B, Hkv, >= end] summed over
// heads; Top-C by (eligible first when max_reuse >= 0: reuse < max_reuse; score descending, NaN first; slot
// ascending), gathered after the sink in slot order with every tensor of slot_tensors, the last R slots moved
// after them, reuse[:, S:S+C] += 1. Returns the chosen slots [B, C] (int64, before the move).
at::Tensor compress_pass(const std::vector<at::Tensor>& slot_tensors, at::Tensor reuse, const at::Tensor& mass,
                         const std::vector<at::Tensor>& carried, int64_t sink_tokens, int64_t topc_tokens,
                         int64_t recent_tokens, int64_t end, int64_t max_reuse);

}  // namespace deepforcing
