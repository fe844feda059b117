#pragma once
// K / V packing and re-phasing of the CPU kernel.
//
// Re-phasing comes as precomputed float32 rotation tables over the first T temporal RoPE pairs (pair t is channels
// (2t, 2t+1) when interleaved, else (t, t + D/2)): pair t (re, im) of a key that moves becomes
// (re*c[t] - im*s[t], re*s[t] + im*c[t]), in fp32. The tables are formed once on the host (angles and cos/sin in
// fp64), so the kernel holds no angle maths and any shift is as accurate as its table.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace deepforcing {
namespace detail {

// Which keys move and by which table: keys [0, R) rotate, all by one row (sink mode) or key j of batch b by row
// (b, j) (per-key mode, R == Lk). R == 0: nothing moves. With per-head tables (a RopeSpec with head_scale: every
// KV head its own temporal frequencies) each of those rows holds H rows of T, one per KV head g.
struct Rotation {
  int64_t R = 0;   // keys [0, R) rotate
  int64_t T = 0;   // temporal pairs per table row (<= D / 2)
  int64_t Lk = 0;  // keys per batch row (per-key tables are [B, Lk, T] or [B, Lk, H, T])
  int64_t H = 0;   // KV heads of per-head tables ([H, T] or [B, Lk, H, T]); 0: one row for every head
  bool per_key = false;
  bool interleaved = true;
  at::Tensor cos_t, sin_t;  // contiguous float32 (undefined when R == 0)
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t offset(int64_t b, int64_t j, int64_t g) const {
    const int64_t hh = H > 0 ? H : 1, gg = H > 0 ? g : 0;
    return ((per_key ? b * Lk + j : 0) * hh + gg) * T;
  }
  const float* c(int64_t b, int64_t j, int64_t g) const { return cos + offset(b, j, g); }
  const float* s(int64_t b, int64_t j, int64_t g) const { return sin + offset(b, j, g); }
};

// Checks the tables against the op's contract and views them: cos / sin float32 CPU of one shape, [T] or [H, T]
// (keys [0, rot_len) rotate, 0 <= rot_len <= Lk), [B, Lk, T] or [B, Lk, H, T] (rot_len == Lk) or [0]
// (rot_len == 0); T <= D / 2. The caller checks H against the keys' heads. Raises c10::Error naming `who`
// otherwise.
Rotation make_rotation(const at::Tensor& cos, const at::Tensor& sin, int64_t rot_len, bool interleaved, int64_t B,
                       int64_t Lk, int64_t D, const char* who);

// K^T of KV head (b, g), keys [j_begin, j_end) (j_begin a multiple of 16): kt [B, Hkv, D, Lk] fp32 from
// k [B, Lk, Hkv, D] (contiguous float / bf16 / fp16), keys that move re-phased.
template <typename scalar_t>
void pack_keys_t_f32(const scalar_t* k, float* kt, int64_t Lk, int64_t Hkv, int64_t D, const Rotation& rot,
                     int64_t b, int64_t g, int64_t j_begin, int64_t j_end);
extern template void pack_keys_t_f32<float>(const float*, float*, int64_t, int64_t, int64_t, const Rotation&,
                                            int64_t, int64_t, int64_t, int64_t);
extern template void pack_keys_t_f32<c10::BFloat16>(const c10::BFloat16*, float*, int64_t, int64_t, int64_t,
                                                    const Rotation&, int64_t, int64_t, int64_t, int64_t);
extern template void pack_keys_t_f32<c10::Half>(const c10::Half*, float*, int64_t, int64_t, int64_t,
                                                const Rotation&, int64_t, int64_t, int64_t, int64_t);

// K^T in the VNNI layout of the bf16 micro-kernel, for KV head (b, g), keys [j_begin, j_end) (j_begin a multiple
// of 16): kv [B, Hkv, D/2, Lk, 2] from k [B, Lk, Hkv, D] (contiguous bf16). Keys that move have their temporal
// pairs rotated in fp32 and rounded to bf16 once; every other channel is copied bit for bit.
void pack_keys_vnni(const c10::BFloat16* k, c10::BFloat16* kv, int64_t Lk, int64_t Hkv, int64_t D,
                    const Rotation& rot, int64_t b, int64_t g, int64_t j_begin, int64_t j_end);

// V in the VNNI layout, for KV head (b, g), key pairs [t_begin, t_end): vv [B, Hkv, Lkp/2, D, 2] with Lkp = Lk
// rounded up to even (the pad row is zero).
void pack_values_vnni(const c10::BFloat16* v, c10::BFloat16* vv, int64_t Lk, int64_t Hkv, int64_t D, int64_t Lkp,
                      int64_t b, int64_t g, int64_t t_begin, int64_t t_end);

// Keys for products that read them in place (the BLAS path, and the re-phase test hook): the R keys that move
// re-phased into krot [B, Hkv, R, D] fp32; the rest read from kf [B, Lk, Hkv, D] fp32.
struct KeyRows {
  at::Tensor krot;  // undefined when R == 0
  at::Tensor kf;    // undefined when R == Lk
  int64_t R = 0;
};

// k [B, Lk, Hkv, D] contiguous float / bf16 / fp16.
KeyRows key_rows_f32(const at::Tensor& k, const Rotation& rot);

}  // namespace detail
}  // namespace deepforcing
