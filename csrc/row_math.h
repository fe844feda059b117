#pragma once
// Row maths of the CPU kernel's softmax, on one score row at a time: row max, exp2 sweeps (fp32 in place, or fp32
// and a bf16 copy for P V) and the weighted column sums of the attention mass. AVX-512 where compiled for, else
// AVX2 + FMA (8 lanes: the same polynomials, clamps and NaN handling), with scalar loops for the remainder and for
// other targets.
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DEEPFORCING_ROW_AVX2 1
#endif

namespace deepforcing {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// 2^f on [-0.5, 0.5] by its degree-7 Taylor polynomial, highest power first (ln2^k / k!, k = 7 .. 0), evaluated
// by Horner's rule in the AVX-512 and AVX2 sweeps alike
constexpr float kExp2Taylor7[8] = {1.5252733804059841e-05f, 1.5403530393381609e-04f, 1.3333558146428443e-03f,
                                   9.6181291076284772e-03f, 5.5504108664821580e-02f, 2.4022650695910071e-01f,
                                   6.9314718055994531e-01f, 1.f};

#if defined(__AVX512F__)
// 2^x for x <= 0 (scores minus their row max): x = n + f, f in [-0.5, 0.5], 2^f by its degree-7 Taylor
// polynomial in f (truncation 5e-9, below fp32 rounding), scaled by 2^n with vscalefps (exact, denormals too).
inline __m512 exp2_ps(__m512 x) {
  // max(-150, x) in this operand order returns x when x is NaN (vmaxps passes its second operand on NaN), so a
  // NaN score stays NaN and poisons its row instead of turning into a plausible 0.
  x = _mm512_max_ps(_mm512_set1_ps(-150.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kExp2Taylor7[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Taylor7[i]));
  return _mm512_scalef_ps(p, n);
}

// The same with a degree-5 polynomial for the bf16 sweep, whose probabilities are rounded to bf16 (2^-9) for P V:
// 2^f on [-0.5, 0.5] by its relative minimax fit (relative error 7.5e-8 in exact arithmetic, 2.3e-7 evaluated in
// fp32, checked on 2e5 points), two multiply-adds fewer per score than exp2_ps.
inline __m512 exp2_ps5(__m512 x) {
  // operand order keeps NaN (see exp2_ps); -160, not -150: the constant term exceeds 1 by 7e-8, so 2^-150
  // (half the least denormal) would round up to it and a key removed by a -inf bias would get a nonzero weight
  x = _mm512_max_ps(_mm512_set1_ps(-160.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3276415520341426e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6755286235903001e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507133182038426e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022119966473063e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314696712431834e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000071603462f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t r) { return static_cast<__mmask16>((1u << r) - 1u); }
#endif

#if defined(DEEPFORCING_ROW_AVX2)
// 2^x for x <= 0 on 8 lanes, as exp2_ps: the degree-7 Taylor polynomial of 2^f, f = x - round(x), times 2^n.
// AVX2 has no vscalefps: 2^(n + 64) is built in the exponent field (a normal number for n >= -150, so the product
// with p is exact) and the product then scaled by 2^-64, which rounds once, into the denormals where it must:
// bit for bit what vscalefps gives.
inline __m256 scale_pow2(__m256 p, __m256 n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127 + 64)), 23);
  return _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(5.421010862427522e-20f));  // 2^-64
}

inline __m256 exp2_ps8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-150.f), x);  // NaN passes (second operand), as in exp2_ps
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(kExp2Taylor7[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Taylor7[i]));
  return scale_pow2(p, n);
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// alpha * x - am, plus the bias when there is one (the exponent of the exp sweep).
inline __m256 exponent8(__m256 x, __m256 va, __m256 vm, const float* bias, int64_t j) {
  if (bias == nullptr) return _mm256_fmsub_ps(x, va, vm);
  return _mm256_sub_ps(_mm256_fmadd_ps(x, va, _mm256_loadu_ps(bias + j)), vm);
}
#endif

// Row max of x[0, n).
inline float row_max(const float* x, int64_t n) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  __m512 vm = _mm512_set1_ps(m);
  for (; j + 16 <= n; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + j));
  if (j < n) vm = _mm512_mask_max_ps(vm, tail_mask(n - j), vm, _mm512_maskz_loadu_ps(tail_mask(n - j), x + j));
  m = _mm512_reduce_max_ps(vm);
  j = n;
#elif defined(DEEPFORCING_ROW_AVX2)
  // (a NaN score need not survive the max, here as in the AVX-512 path: the exp sweep keeps it NaN and so poisons
  // its row)
  __m256 v0 = _mm256_set1_ps(m), v1 = v0;
  for (; j + 16 <= n; j += 16) {
    v0 = _mm256_max_ps(v0, _mm256_loadu_ps(x + j));
    v1 = _mm256_max_ps(v1, _mm256_loadu_ps(x + j + 8));
  }
  for (; j + 8 <= n; j += 8) v0 = _mm256_max_ps(v0, _mm256_loadu_ps(x + j));
  m = hmax8(_mm256_max_ps(v0, v1));
#endif
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// Logit bias of the key-bias option: the max of alpha * x[j] + bias[j] (bias already in log2 units, -inf removes
// a key). Read only: the exp sweeps add the bias again as they read the row, which measured cheaper in the bf16
// path than storing the biased row (one extra load per score, no extra store).
inline float biased_row_max(const float* x, int64_t n, float alpha, const float* bias) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(alpha);
  __m512 vm = _mm512_set1_ps(m);
  for (; j + 16 <= n; j += 16)
    vm = _mm512_max_ps(vm, _mm512_fmadd_ps(_mm512_loadu_ps(x + j), va, _mm512_loadu_ps(bias + j)));
  if (j < n) {
    const __mmask16 mk = tail_mask(n - j);
    const __m512 y = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x + j), va, _mm512_maskz_loadu_ps(mk, bias + j));
    vm = _mm512_mask_max_ps(vm, mk, vm, y);
  }
  m = _mm512_reduce_max_ps(vm);
  j = n;
#elif defined(DEEPFORCING_ROW_AVX2)
  const __m256 va = _mm256_set1_ps(alpha);
  __m256 vm = _mm256_set1_ps(m);
  for (; j + 8 <= n; j += 8)
    vm = _mm256_max_ps(vm, _mm256_fmadd_ps(_mm256_loadu_ps(x + j), va, _mm256_loadu_ps(bias + j)));
  m = hmax8(vm);
#endif
  for (; j < n; ++j) m = std::max(m, std::fma(x[j], alpha, bias[j]));
  return m;
}

#if defined(__AVX512F__)
// alpha * x - am, plus the bias when there is one (the exponent of the exp sweeps).
inline __m512 exponent(__m512 x, __m512 va, __m512 vm, const float* bias, int64_t j, __mmask16 mk) {
  if (bias == nullptr) return _mm512_fmsub_ps(x, va, vm);
  return _mm512_sub_ps(_mm512_fmadd_ps(x, va, _mm512_maskz_loadu_ps(mk, bias + j)), vm);
}
#endif

inline float exponent(float x, float alpha, float am, const float* bias, int64_t j) {
  return bias == nullptr ? alpha * x - am : std::fma(x, alpha, bias[j]) - am;
}

// x[j] = 2^(alpha * x[j] + bias[j] - am) in place (am = the row max of the exponent; bias may be nullptr);
// returns the sum.
inline float exp2_sub_sum(float* x, int64_t n, float alpha, float am, const float* bias = nullptr) {
  int64_t j = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(alpha), vm = _mm512_set1_ps(am);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp2_ps(exponent(_mm512_loadu_ps(x + j), va, vm, bias, j, 0xFFFF));
    const __m512 e1 = exp2_ps(exponent(_mm512_loadu_ps(x + j + 16), va, vm, bias, j + 16, 0xFFFF));
    _mm512_storeu_ps(x + j, e0);
    _mm512_storeu_ps(x + j + 16, e1);
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
  }
  for (; j < n; j += 16) {
    const __mmask16 mk = j + 16 <= n ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - j);
    const __m512 e = exp2_ps(exponent(_mm512_maskz_loadu_ps(mk, x + j), va, vm, bias, j, mk));
    _mm512_mask_storeu_ps(x + j, mk, e);
    acc0 = _mm512_add_ps(acc0, _mm512_maskz_mov_ps(mk, e));
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(DEEPFORCING_ROW_AVX2)
  const __m256 va = _mm256_set1_ps(alpha), vm = _mm256_set1_ps(am);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // two chains: the adds do not serialise
  for (; j + 16 <= n; j += 16) {
    const __m256 e0 = exp2_ps8(exponent8(_mm256_loadu_ps(x + j), va, vm, bias, j));
    const __m256 e1 = exp2_ps8(exponent8(_mm256_loadu_ps(x + j + 8), va, vm, bias, j + 8));
    _mm256_storeu_ps(x + j, e0);
    _mm256_storeu_ps(x + j + 8, e1);
    acc0 = _mm256_add_ps(acc0, e0);
    acc1 = _mm256_add_ps(acc1, e1);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp2_ps8(exponent8(_mm256_loadu_ps(x + j), va, vm, bias, j));
    _mm256_storeu_ps(x + j, e);
    acc0 = _mm256_add_ps(acc0, e);
  }
  s = hsum8(_mm256_add_ps(acc0, acc1));
#endif
  for (; j < n; ++j) {
    x[j] = std::exp2(exponent(x[j], alpha, am, bias, j));
    s += x[j];
  }
  return s;
}

// One softmax sweep for the bf16 path: e[j] = 2^(alpha * x[j] + bias[j] - am) (bias may be nullptr) where am = alpha * rowmax; e is stored in fp32
// back into x (when keep_f32: the mass needs it) and rounded to bf16 into p (the operand of P V). Returns the sum
// of the fp32 values.
inline float exp2_scaled_bf16(float* x, c10::BFloat16* p, int64_t n, float alpha, float am, bool keep_f32,
                              const float* bias = nullptr) {
  int64_t j = 0;
  float s = 0.f;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const __m512 va = _mm512_set1_ps(alpha), vm = _mm512_set1_ps(am);
  // 16 scores at j under mask mk: their exp in fp32 (stored back when keep_f32) and in bf16 into p
  const auto step = [&](int64_t at, __mmask16 mk) {
    const __m512 e = exp2_ps5(exponent(_mm512_maskz_loadu_ps(mk, x + at), va, vm, bias, at, mk));
    if (keep_f32) _mm512_mask_storeu_ps(x + at, mk, e);
    const __m256bh eb = _mm512_cvtneps_pbh(e);
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(p + at), mk, reinterpret_cast<const __m256i&>(eb));
    return _mm512_maskz_mov_ps(mk, e);
  };
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  // two chains: the adds do not serialise
  for (; j + 32 <= n; j += 32) {
    acc0 = _mm512_add_ps(acc0, step(j, 0xFFFF));
    acc1 = _mm512_add_ps(acc1, step(j + 16, 0xFFFF));
  }
  for (; j < n; j += 16) acc0 = _mm512_add_ps(acc0, step(j, j + 16 <= n ? __mmask16(0xFFFF) : tail_mask(n - j)));
  s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
  for (; j < n; ++j) {
    const float e = std::exp2(exponent(x[j], alpha, am, bias, j));
    if (keep_f32) x[j] = e;
    p[j] = c10::BFloat16(e);
    s += e;
  }
  return s;
}

// col[j] += w * p[j]: one row's share of the attention mass, added right after that row's exp sweep while the
// row is still in L1, instead of a second pass over the whole score block.
inline void add_scaled_row(float* col, const float* p, float w, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) col[j] += w * p[j];
}

}  // namespace detail
}  // namespace deepforcing
