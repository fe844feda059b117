// K / V packing and re-phasing of the CPU kernel (see pack.h). Packing uses AVX-512 16x16 transposes of 32-bit
// words (fp32 values or bf16 channel pairs) where compiled for, scalar loops otherwise.
#include "pack.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace deepforcing {
namespace detail {
namespace {

constexpr int64_t kTileRows = 16;  // keys per transposed tile

#if defined(__AVX512F__)
// In-register transpose of a 16 x 16 block of 32-bit lanes (rows r[0..15] become columns).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
  }
}
#endif

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols, on 32-bit words (fp32 values or bf16 pairs).
void transpose32(const uint32_t* src, int64_t ld_src, int64_t rows, int64_t cols, uint32_t* dst, int64_t ld_dst) {
  int64_t c0 = 0;
#if defined(__AVX512F__)
  if (rows == 16) {
    for (; c0 + 16 <= cols; c0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(reinterpret_cast<const float*>(src + i * ld_src + c0));
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(dst + (c0 + i) * ld_dst), r[i]);
    }
  }
#endif
  for (int64_t c = c0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// The channels of pair t.
inline void pair_channels(bool interleaved, int64_t t, int64_t half, int64_t& i0, int64_t& i1) {
  i0 = interleaved ? 2 * t : t;
  i1 = interleaved ? 2 * t + 1 : t + half;
}

// dst[0, D) = key row src (batch b, key j) in fp32, re-phased when key j moves.
template <typename scalar_t>
inline void row_f32(const Rotation& rot, const scalar_t* src, float* dst, int64_t D, int64_t b, int64_t j,
                    int64_t g) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
  if (j >= rot.R) return;
  const float *c = rot.c(b, j, g), *s = rot.s(b, j, g);
  const int64_t half = D / 2;
  for (int64_t t = 0; t < rot.T; ++t) {
    int64_t i0, i1;
    pair_channels(rot.interleaved, t, half, i0, i1);
    const float re = dst[i0], im = dst[i1];
    dst[i0] = re * c[t] - im * s[t];
    dst[i1] = re * s[t] + im * c[t];
  }
}

#if defined(__AVX512F__)
// c10::BFloat16(float)'s rounding of 16 fp32 lanes: round to nearest even, NaN -> 0x7FC0; the bf16 bits in the
// low half of each 32-bit lane.
inline __m512i round_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
}
#endif

#if defined(__AVX512F__)
// 16 words (im << 16 | re, bf16 pairs) rotated by one (cos, sin) pair of lanes each: the same arithmetic as
// row_bf16's scalar loop.
inline __m512i rotate_words(__m512i x, __m512 cc, __m512 ss) {
  const __m512 re = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  const __m512 im = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  const __m512i r0 = round_bf16(_mm512_fmsub_ps(re, cc, _mm512_mul_ps(im, ss)));
  const __m512i r1 = round_bf16(_mm512_fmadd_ps(re, ss, _mm512_mul_ps(im, cc)));
  return _mm512_or_si512(r0, _mm512_slli_epi32(r1, 16));
}

// Channel rows (2t, 2t+1), t < T, of a transposed fp32 tile (rows ld floats apart, 16 keys each) rotated by pair
// t's table: the same products as row_f32.
inline void rotate_rows16(float* tile, int64_t ld, int64_t T, const float* c, const float* s) {
  for (int64_t t = 0; t < T; ++t) {
    float* r0 = tile + 2 * t * ld;
    float* r1 = r0 + ld;
    const __m512 re = _mm512_loadu_ps(r0), im = _mm512_loadu_ps(r1);
    const __m512 cc = _mm512_set1_ps(c[t]), ss = _mm512_set1_ps(s[t]);
    _mm512_storeu_ps(r0, _mm512_fmsub_ps(re, cc, _mm512_mul_ps(im, ss)));
    _mm512_storeu_ps(r1, _mm512_fmadd_ps(re, ss, _mm512_mul_ps(im, cc)));
  }
}

// Rows t < T of a transposed tile (row t = pair t of 16 keys, rows ld words apart) rotated by pair t's table.
inline void rotate_words16(uint32_t* tile, int64_t ld, int64_t T, const float* c, const float* s) {
  for (int64_t t = 0; t < T; ++t) {
    uint32_t* row = tile + t * ld;
    _mm512_storeu_si512(row, rotate_words(_mm512_loadu_si512(row), _mm512_set1_ps(c[t]), _mm512_set1_ps(s[t])));
  }
}
#endif

// bf16 row to bf16 row, re-phased when key j moves. Only the 2T temporal channels go through fp32 (rotated,
// rounded once); the others are copied bit for bit, which equals converting them to fp32 and back, at a third of
// the cost.
inline void row_bf16(const Rotation& rot, const c10::BFloat16* src, c10::BFloat16* dst, int64_t D, int64_t b,
                     int64_t j, int64_t g) {
  std::memcpy(dst, src, static_cast<size_t>(D) * sizeof(c10::BFloat16));
  if (j >= rot.R) return;
  const float *c = rot.c(b, j, g), *s = rot.s(b, j, g);
  const int64_t half = D / 2;
  int64_t t0 = 0;
#if defined(__AVX512F__)
  if (rot.interleaved) {
    // 16 pairs at a time, as 32-bit words (im << 16 | re): the products as the scalar loop compiles them (one
    // fused multiply-add each) and c10::BFloat16(float)'s rounding, so the packed keys are bit-identical to the
    // scalar loop's (checked against it), at a fraction of the cost
    const uint32_t* w = reinterpret_cast<const uint32_t*>(src);
    uint32_t* o = reinterpret_cast<uint32_t*>(dst);
    for (; t0 < rot.T; t0 += 16) {
      const __mmask16 m = rot.T - t0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (rot.T - t0)) - 1u);
      const __m512 cc = _mm512_maskz_loadu_ps(m, c + t0), ss = _mm512_maskz_loadu_ps(m, s + t0);
      _mm512_mask_storeu_epi32(o + t0, m, rotate_words(_mm512_maskz_loadu_epi32(m, w + t0), cc, ss));
    }
  }
#endif
  for (int64_t t = t0; t < rot.T; ++t) {
    int64_t i0, i1;
    pair_channels(rot.interleaved, t, half, i0, i1);
    const float re = static_cast<float>(src[i0]), im = static_cast<float>(src[i1]);
    dst[i0] = c10::BFloat16(re * c[t] - im * s[t]);
    dst[i1] = c10::BFloat16(re * s[t] + im * c[t]);
  }
}

}  // namespace

Rotation make_rotation(const at::Tensor& cos, const at::Tensor& sin, int64_t rot_len, bool interleaved, int64_t B,
                       int64_t Lk, int64_t D, const char* who) {
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.device().is_cpu() &&
                  sin.device().is_cpu(),
              who, ": cos and sin must be float32 CPU tensors, got ", cos.scalar_type(), " on ", cos.device(),
              " and ", sin.scalar_type(), " on ", sin.device());
  TORCH_CHECK(cos.sizes() == sin.sizes(), who, ": cos and sin shapes differ: ", cos.sizes(), " vs ", sin.sizes());
  Rotation rot;
  rot.Lk = Lk;
  rot.interleaved = interleaved;
  if (cos.dim() == 1 && cos.size(0) == 0) {
    TORCH_CHECK(rot_len == 0, who, ": cos and sin are empty (nothing rotates), so rot_len must be 0, got ", rot_len);
    return rot;
  }
  if (cos.dim() == 1 || cos.dim() == 2) {
    TORCH_CHECK(0 <= rot_len && rot_len <= Lk, who, ": rot_len must be in [0, Lk=", Lk, "], got ", rot_len);
    if (cos.dim() == 2) rot.H = cos.size(0);
  } else {
    TORCH_CHECK((cos.dim() == 3 || cos.dim() == 4) && cos.size(0) == B && cos.size(1) == Lk, who,
                ": cos and sin must have shape [T], [H, T], [B, Lk, T] = [", B, ", ", Lk, ", T], [B, Lk, H, T] or [0], "
                "got ", cos.sizes());
    if (cos.dim() == 4) rot.H = cos.size(2);
    TORCH_CHECK(rot_len == Lk, who, ": per-key tables [B, Lk, T] rotate every key, so rot_len must be Lk=", Lk,
                ", got ", rot_len);
    rot.per_key = true;
  }
  rot.T = cos.size(-1);
  TORCH_CHECK(rot.T <= D / 2, who, ": the tables have ", rot.T, " pairs but head_dim ", D, " has only ", D / 2);
  rot.R = rot.T > 0 ? rot_len : 0;
  if (rot.R > 0) {
    rot.cos_t = cos.contiguous();
    rot.sin_t = sin.contiguous();
    rot.cos = rot.cos_t.data_ptr<float>();
    rot.sin = rot.sin_t.data_ptr<float>();
  }
  return rot;
}

// Tiles of 16 keys: fp32 tiles that do not move are transposed straight from k, the others are first converted /
// rotated into a small fp32 tile.
template <typename scalar_t>
void pack_keys_t_f32(const scalar_t* k, float* kt, int64_t Lk, int64_t Hkv, int64_t D, const Rotation& rot,
                     int64_t b, int64_t g, int64_t j_begin, int64_t j_end) {
  std::vector<float> tile(static_cast<size_t>(kTileRows * D));
  const int64_t bg = b * Hkv + g;
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTileRows) {
    const int64_t n = std::min(j_end, j0 + kTileRows) - j0;
    const scalar_t* first = k + ((b * Lk + j0) * Hkv + g) * D;
    uint32_t* dst = reinterpret_cast<uint32_t*>(kt + bg * D * Lk + j0);
    if (std::is_same<scalar_t, float>::value && j0 >= rot.R) {
      transpose32(reinterpret_cast<const uint32_t*>(first), Hkv * D, n, D, dst, Lk);
      continue;
    }
#if defined(__AVX512F__)
    if (std::is_same<scalar_t, float>::value && !rot.per_key && rot.interleaved && n == kTileRows &&
        j0 + n <= rot.R) {
      // one table for the whole tile (sink mode): transpose as stored, then rotate channel rows (2t, 2t+1) in
      // place, 16 keys per vector with pair t's cos / sin broadcast (no per-key staging, as in pack_keys_vnni)
      transpose32(reinterpret_cast<const uint32_t*>(first), Hkv * D, n, D, dst, Lk);
      rotate_rows16(reinterpret_cast<float*>(dst), Lk, rot.T, rot.c(b, j0, g), rot.s(b, j0, g));
      continue;
    }
#endif
    for (int64_t jj = 0; jj < n; ++jj) row_f32(rot, first + jj * Hkv * D, tile.data() + jj * D, D, b, j0 + jj, g);
    transpose32(reinterpret_cast<const uint32_t*>(tile.data()), D, n, D, dst, Lk);
  }
}

template void pack_keys_t_f32<float>(const float*, float*, int64_t, int64_t, int64_t, const Rotation&, int64_t,
                                     int64_t, int64_t, int64_t);
template void pack_keys_t_f32<c10::BFloat16>(const c10::BFloat16*, float*, int64_t, int64_t, int64_t,
                                             const Rotation&, int64_t, int64_t, int64_t, int64_t);
template void pack_keys_t_f32<c10::Half>(const c10::Half*, float*, int64_t, int64_t, int64_t, const Rotation&,
                                         int64_t, int64_t, int64_t, int64_t);

// The transpose of k's rows seen as D/2 32-bit channel pairs.
void pack_keys_vnni(const c10::BFloat16* k, c10::BFloat16* kv, int64_t Lk, int64_t Hkv, int64_t D,
                    const Rotation& rot, int64_t b, int64_t g, int64_t j_begin, int64_t j_end) {
  const int64_t P = D / 2;
  std::vector<c10::BFloat16> tile(static_cast<size_t>(kTileRows * D));
  const int64_t bg = b * Hkv + g;
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTileRows) {
    const int64_t n = std::min(j_end, j0 + kTileRows) - j0;
    const c10::BFloat16* first = k + ((b * Lk + j0) * Hkv + g) * D;
    uint32_t* dst = reinterpret_cast<uint32_t*>(kv) + bg * P * Lk + j0;
    if (j0 >= rot.R) {
      transpose32(reinterpret_cast<const uint32_t*>(first), Hkv * P, n, P, dst, Lk);
      continue;
    }
#if defined(__AVX512F__)
    if (!rot.per_key && rot.interleaved && n == kTileRows && j0 + n <= rot.R) {
      // one table for the whole tile (sink mode): transpose as stored, then rotate the T temporal pair rows in
      // place, 16 keys per vector with the pair's cos / sin broadcast (no per-row staging copy)
      transpose32(reinterpret_cast<const uint32_t*>(first), Hkv * P, n, P, dst, Lk);
      rotate_words16(dst, Lk, rot.T, rot.c(b, j0, g), rot.s(b, j0, g));
      continue;
    }
#endif
    for (int64_t jj = 0; jj < n; ++jj) row_bf16(rot, first + jj * Hkv * D, tile.data() + jj * D, D, b, j0 + jj, g);
    transpose32(reinterpret_cast<const uint32_t*>(tile.data()), P, n, P, dst, Lk);
  }
}

void pack_values_vnni(const c10::BFloat16* v, c10::BFloat16* vv, int64_t Lk, int64_t Hkv, int64_t D, int64_t Lkp,
                      int64_t b, int64_t g, int64_t t_begin, int64_t t_end) {
  const int64_t pairs = Lkp / 2, bg = b * Hkv + g;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t j = 2 * t;
    const uint16_t* r0 = reinterpret_cast<const uint16_t*>(v + ((b * Lk + j) * Hkv + g) * D);
    const uint16_t* r1 =
        j + 1 < Lk ? reinterpret_cast<const uint16_t*>(v + ((b * Lk + j + 1) * Hkv + g) * D) : nullptr;
    uint16_t* dst = reinterpret_cast<uint16_t*>(vv) + (bg * pairs + t) * D * 2;
    int64_t d0 = 0;
#if defined(__AVX512BW__)
    if (r1 != nullptr) {
      // interleave 32 channels of the two rows: (a0 b0 a1 b1 ...) = the VNNI pair layout
      const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                          6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
      const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
      for (; d0 + 32 <= D; d0 += 32) {
        const __m512i a = _mm512_loadu_si512(r0 + d0), b2 = _mm512_loadu_si512(r1 + d0);
        _mm512_storeu_si512(dst + 2 * d0, _mm512_permutex2var_epi16(a, lo, b2));
        _mm512_storeu_si512(dst + 2 * d0 + 32, _mm512_permutex2var_epi16(a, hi, b2));
      }
    }
#endif
    for (int64_t d = d0; d < D; ++d) {
      dst[2 * d] = r0[d];
      dst[2 * d + 1] = r1 != nullptr ? r1[d] : uint16_t(0);
    }
  }
}

KeyRows key_rows_f32(const at::Tensor& k, const Rotation& rot) {
  const int64_t B = k.size(0), Lk = k.size(1), Hkv = k.size(2), D = k.size(3);
  KeyRows rows;
  rows.R = rot.R;
  if (rows.R > 0) {
    rows.krot = at::empty({B, Hkv, rows.R, D}, k.options().dtype(at::kFloat));
    float* krot = rows.krot.data_ptr<float>();
    const int64_t R = rows.R;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "sink_rephase", [&] {
      const scalar_t* kp = k.data_ptr<scalar_t>();
      at::parallel_for(0, B * R, 16, [&](int64_t begin, int64_t end) {
        for (int64_t idx = begin; idx < end; ++idx) {
          const int64_t b = idx / R, j = idx % R;
          for (int64_t g = 0; g < Hkv; ++g)
            row_f32(rot, kp + ((b * Lk + j) * Hkv + g) * D, krot + ((b * Hkv + g) * R + j) * D, D, b, j, g);
        }
      });
    });
  }
  if (rows.R < Lk) rows.kf = k.scalar_type() == at::kFloat ? k : k.to(at::kFloat);
  return rows;
}

}  // namespace detail
}  // namespace deepforcing
