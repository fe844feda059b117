#pragma once
// CPU kernel of the fused op `sink_attention` (SPEC.md sections 2 and 3): exact softmax attention of q over k, v
// where the temporal RoPE band of chosen keys is re-phased on load, with optional per-key attention mass.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace deepforcing {

// Forward pass. Arguments are validated and normalised by the Python op; this entry re-checks what the kernel
// relies on and raises c10::Error (RuntimeError in Python) otherwise.
//
//   q               [B, Lq, Hq, D]   float32 / bfloat16 / float16 (any strides: made contiguous here), D even
//   k, v            [B, Lk, Hkv, D]  same dtype as q, Hq % Hkv == 0; query head h reads KV head h / (Hq / Hkv)
//   cos, sin        float32 rotation tables over the first T temporal RoPE pairs (T <= D / 2); pair t is channels
//                   (2t, 2t+1) when `interleaved`, else (t, t + D/2), and (re, im) of a key that moves becomes
//                   (re*c - im*s, re*s + im*c):
//                     [T]        keys [0, rot_len) all use this one table (sink mode), 0 <= rot_len <= Lk;
//                     [B, Lk, T] key j of batch b uses row [b, j] (per-key mode), rot_len == Lk;
//                     [Hkv, T] / [B, Lk, Hkv, T]  the same two modes with one row per KV head (per-head RoPE
//                                frequencies: a RopeSpec with head_scale);
//                     [0]        nothing rotates, rot_len == 0.
//   softmax_scale   multiplier of q.k (finite, > 0)
//   return_mass     compute mass [B, Hkv, Lk] (fp32) over query rows [mass_start, mass_end), summed over the
//                   query heads of each KV group
//
//   key_bias        optional float32 [B or 1, Hq or 1, Lk]: added to the scaled logits of (batch, query head)
//                   before the softmax (softmax_scale * q.k + bias; -inf removes a key); lse and mass are those of
//                   the biased softmax
//
// Returns (out [B, Lq, Hq, D] in q's dtype, lse [B, Hq, Lq] fp32 natural log, mass [B, Hkv, Lk] fp32 or an
// empty tensor of shape [0] when return_mass is false).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sink_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
    int64_t rot_len, bool interleaved, double softmax_scale, bool return_mass, int64_t mass_start,
    int64_t mass_end, const std::optional<at::Tensor>& key_bias = std::nullopt);

// Keys as the kernel's fp32 paths see them: k [B, Lk, Hkv, D] re-phased by the same tables and rules as
// sink_attention_fwd, in float32 (a test hook for the re-phase step alone).
at::Tensor sink_rephase_keys(const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, int64_t rot_len,
                             bool interleaved);

// Query rows per task (exposed for benchmarks and tests; 0 = automatic).
void set_block_rows(int64_t rows);
int64_t get_block_rows();

// bf16 inputs use oneDNN's bf16 micro-kernel when this CPU has one (avx512_bf16 / AMX) and it is enabled (the
// default); otherwise they are converted to fp32 once and take the fp32 GEMM path. For tests and benchmarks.
void set_bf16_gemm(bool enabled);
bool bf16_gemm_active();

// fp32 products use oneDNN's fp32 micro-kernel on K^T packed once per call, or BLAS sgemm reading the keys in
// place. Automatic (nullopt, the default): the micro-kernel on AVX-512 CPUs, sgemm on AVX2-only ones (faster
// there); true / false force a path (true only where the micro-kernel works). For tests and benchmarks.
void set_f32_microkernel(std::optional<bool> enabled);
// Whether a call takes the micro-kernel: forced, or automatic for a call of `query_rows` query rows (AVX2 CPUs take
// the micro-kernel for short query blocks, where sgemm's per-task packing of the keys is shared by too few rows);
// f32_microkernel_active() is the choice for a long block (query_rows 0).
bool f32_microkernel_active();
bool f32_microkernel_for(int64_t query_rows);

}  // namespace deepforcing
