// CPU kernel of the fused op `sink_attention` (see sink_attention_cpu.h for the contract).
//
// Plan of one call:
//   1. K is packed ONCE per call into the layout the micro-kernel reads (fp32 K^T [B, Hkv, D, Lk]; bf16: VNNI, see
//      below), and the keys that move (the sink, or every key when per-key shifts are given) are re-phased on the
//      way: cos/sin of angles formed in fp64 and reduced mod 2*pi (SPEC section 7: fp32 angles are off by
//      |shift| * 1e-7 rad), rotation in fp32, spatial pairs copied. Packing uses AVX-512 16x16 transposes into
//      scratch memory kept between calls (a fresh multi-MB buffer would page-fault on every call).
//   2. Tasks (batch, query head, block of query rows) run in parallel. A task computes the whole score block
//      S = Q_blk K^T [rows, Lk] (oneDNN micro-kernel at::native::cpublas::brgemm, in 512-key chunks that stay in
//      cache), so each row's softmax is exact in one sweep (max, exp2, sum) and the mass column sums read the same
//      probabilities with no recomputation; then O = P V (same micro-kernel, accumulating over 512-key chunks)
//      and O rows *= 1 / rowsum. Without the fp32 micro-kernel, BLAS sgemm reads the keys in place instead
//      (re-phased rows from a small fp32 side buffer).
//   3. Mass: work items are runs of consecutive tasks of one KV group, claimed dynamically; each sums its
//      probabilities into its own row, and the rows are added in a fixed order at the end (bit-identical results
//      run to run, whatever thread ran what).
//
// bf16 inputs, where oneDNN's bf16 micro-kernel (bf16 x bf16 -> fp32 accumulate; avx512_bf16 or AMX) works on
// this CPU: K and V are packed once per call into its VNNI layout (K^T as [D/2, Lk, 2] with the sink re-phased in
// fp32 and rounded to bf16 once, V as [Lk/2, D, 2]); scores come out in fp32, so softmax, lse and mass are computed
// as in the fp32 path, and P is rounded to bf16 only as the operand of P V (as any bf16 attention does).
// Elsewhere (no bf16 micro-kernel, and fp16) inputs are converted to fp32 once per call (O(L * D) work against
// O(Lq * Lk * D) GEMM work) and take the fp32 path.
#include "sink_attention_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Fortran BLAS sgemm, exported by libtorch_cpu when PyTorch is built with MKL (or linked to OpenBLAS). Weak, so
// the extension still loads where it is missing; then gemm_f32 falls back to at::mm.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace deepforcing {
namespace {

constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

std::atomic<int64_t> g_block_rows{0};

// Micro-kernel calls cover at most this many keys (N of Q K^T, the reduction of P V): a 512-key panel of K^T or V
// stays in L1/L2 while the kernel sweeps it, which measured ~25% faster than one call over all keys.
constexpr int64_t kChunk = 512;

// ------------------------------------------------------------------------------------------------ GEMM
// Row-major C[M, N] = alpha * A[M, K] . op(B) + beta * C, where op(B) = B^T for B stored [N, K] (trans_b) or
// B for B stored [K, N]. Single-threaded when called inside at::parallel_for (BLAS sees a parallel region).
bool blas_ok() {
  // Checked once: a symbol named sgemm_ with an ILP64 or otherwise unexpected ABI must not be trusted blindly.
  static const bool ok = [] {
    if (sgemm_ == nullptr) return false;
    const float a[6] = {1, 2, 3, 4, 5, 6};   // A [2, 3]
    const float b[6] = {1, 0, 2, 1, 1, 3};   // B [2, 3] (used transposed)
    float c[4] = {0, 0, 0, 0};
    const int m = 2, n = 2, k = 3, lda = 3, ldb = 3, ldc = 2;
    const float one = 1.f, zero = 0.f;
    // Column-major view: C^T [N, M] = B [N, K] . A^T [K, M].
    sgemm_("T", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &zero, c, &ldc);
    const float want[4] = {1 * 1 + 2 * 0 + 3 * 2, 1 * 1 + 2 * 1 + 3 * 3, 4 * 1 + 5 * 0 + 6 * 2,
                           4 * 1 + 5 * 1 + 6 * 3};
    for (int i = 0; i < 4; ++i)
      if (c[i] != want[i]) return false;
    return true;
  }();
  return ok;
}

void gemm_f32(bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
              const float* B, int64_t ldb, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (blas_ok() && std::max({M, N, K, lda, ldb, ldc}) < std::numeric_limits<int>::max()) {
    // Column-major BLAS computes C^T [N, M] = op(B)^T-ish . A^T: swap operands instead of transposing data.
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const float beta = 0.f;
    sgemm_(trans_b ? "T" : "N", "N", &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = trans_b ? at::from_blob(const_cast<float*>(B), {N, K}, {ldb, 1}, opts).t()
                         : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  c.copy_(at::mm(a, b).mul_(alpha));
}

// ------------------------------------------------------------------------------------------------ row maths
#if defined(__AVX512F__)
// 2^x for x <= 0 (scores minus their row max): x = n + f, f in [-0.5, 0.5], 2^f by its degree-7 Taylor
// polynomial in f (truncation 5e-9, below fp32 rounding), scaled by 2^n with vscalefps (exact, denormals too).
inline __m512 exp2_ps(__m512 x) {
  // max(-150, x) in this operand order returns x when x is NaN (vmaxps passes its second operand on NaN), so a
  // NaN score stays NaN and poisons its row instead of turning into a plausible 0.
  x = _mm512_max_ps(_mm512_set1_ps(-150.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5252733804059841e-05f);            // ln2^7 / 7!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381609e-04f));  // ln2^6 / 6!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));  // ln2^5 / 5!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-03f));  // ln2^4 / 4!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-02f));  // ln2^3 / 3!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-01f));  // ln2^2 / 2!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-01f));  // ln2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t r) { return static_cast<__mmask16>((1u << r) - 1u); }
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
#endif
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = 2^(alpha * x[j] - am) in place (am = alpha * rowmax); returns the sum.
inline float exp2_sub_sum(float* x, int64_t n, float alpha, float am) {
  int64_t j = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(alpha), vm = _mm512_set1_ps(am);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), va, vm));
    const __m512 e1 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(x + j + 16), va, vm));
    _mm512_storeu_ps(x + j, e0);
    _mm512_storeu_ps(x + j + 16, e1);
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
  }
  for (; j < n; j += 16) {
    const __mmask16 mk = j + 16 <= n ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - j);
    const __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, x + j), va, vm));
    _mm512_mask_storeu_ps(x + j, mk, e);
    acc0 = _mm512_add_ps(acc0, _mm512_maskz_mov_ps(mk, e));
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
  for (; j < n; ++j) {
    x[j] = std::exp2(alpha * x[j] - am);
    s += x[j];
  }
  return s;
}

// One softmax sweep for the bf16 path: e[j] = 2^(alpha * x[j] - am) where am = alpha * rowmax; e is stored in fp32
// back into x (when keep_f32: the mass needs it) and rounded to bf16 into p (the operand of P V). Returns the sum
// of the fp32 values.
inline float exp2_scaled_bf16(float* x, c10::BFloat16* p, int64_t n, float alpha, float am, bool keep_f32) {
  int64_t j = 0;
  float s = 0.f;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const __m512 va = _mm512_set1_ps(alpha), vm = _mm512_set1_ps(am);
  __m512 acc = _mm512_setzero_ps();
  for (; j < n; j += 16) {
    const __mmask16 mk = j + 16 <= n ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - j);
    const __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, x + j), va, vm));
    if (keep_f32) _mm512_mask_storeu_ps(x + j, mk, e);
    const __m256bh eb = _mm512_cvtneps_pbh(e);
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(p + j), mk, reinterpret_cast<const __m256i&>(eb));
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(mk, e));
  }
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) {
    const float e = std::exp2(alpha * x[j] - am);
    if (keep_f32) x[j] = e;
    p[j] = c10::BFloat16(e);
    s += e;
  }
  return s;
}

// col[j] += sum_r w[r] * P[r, j] over `rows` rows of P (leading dimension ld); four rows per sweep so the column
// vector is loaded and stored a quarter as often.
void column_sums(float* col, const float* P, int64_t ld, const float* w, int64_t rows, int64_t n) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float *p0 = P + r * ld, *p1 = p0 + ld, *p2 = p1 + ld, *p3 = p2 + ld;
    const float w0 = w[r], w1 = w[r + 1], w2 = w[r + 2], w3 = w[r + 3];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) col[j] += w0 * p0[j] + w1 * p1[j] + w2 * p2[j] + w3 * p3[j];
  }
  for (; r < rows; ++r) {
    const float* p0 = P + r * ld;
    const float w0 = w[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) col[j] += w0 * p0[j];
  }
}

template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
}

// ------------------------------------------------------------------------------------------------ packing helpers
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

// Scratch memory kept by each thread between calls. The packed K / V panels (several MB) are rewritten by every
// call; a fresh allocation would page-fault all of it again each time (measured: twice the cost of packing).
// Requests above kScratchRetain bytes are served but not kept.
class Scratch {
 public:
  ~Scratch() { std::free(ptr_); }
  void* get(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes > size_) {
      std::free(ptr_);
      ptr_ = std::aligned_alloc(64, bytes);
      TORCH_CHECK(ptr_ != nullptr, "sink_attention_fwd: out of memory for ", bytes, " bytes of scratch");
      size_ = bytes;
    }
    return ptr_;
  }
  void release() {
    std::free(ptr_);
    ptr_ = nullptr;
    size_ = 0;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

constexpr size_t kScratchRetain = size_t(512) << 20;

// Per-call buffer: thread-kept scratch slot `slot` when small enough, else a tensor freed with the call.
template <typename T>
T* call_buffer(int slot, int64_t count, at::Tensor& holder) {
  thread_local Scratch slots[4];
  const size_t bytes = static_cast<size_t>(count) * sizeof(T);
  if (bytes <= kScratchRetain) return static_cast<T*>(slots[slot].get(bytes));
  holder = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
  return reinterpret_cast<T*>(holder.data_ptr<uint8_t>());
}

// Per-worker buffer (score blocks), kept by each ATen worker thread between calls.
template <typename T>
T* worker_buffer(int slot, int64_t count) {
  thread_local Scratch slots[3];
  return static_cast<T*>(slots[slot].get(static_cast<size_t>(count) * sizeof(T)));
}

// ------------------------------------------------------------------------------------------------ re-phase
// cos/sin of shift * freqs[t], formed and reduced in fp64, stored as fp32 (c[t], s[t]).
void phase_table(int64_t shift, const double* freqs, int64_t T, float* c, float* s) {
  for (int64_t t = 0; t < T; ++t) {
    const double a = std::fmod(static_cast<double>(shift) * freqs[t], kTwoPi);
    c[t] = static_cast<float>(std::cos(a));
    s[t] = static_cast<float>(std::sin(a));
  }
}

// dst[0, D) = src converted to fp32, temporal pairs t < T rotated by (c[t], s[t]) in fp32.
template <typename scalar_t>
inline void rotate_row(const scalar_t* src, float* dst, int64_t D, int64_t T, bool interleaved, const float* c,
                       const float* s) {
  for (int64_t d = 0; d < D; ++d) dst[d] = to_f(src[d]);
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t i0 = interleaved ? 2 * t : t;
    const int64_t i1 = interleaved ? 2 * t + 1 : t + half;
    const float re = dst[i0], im = dst[i1];
    dst[i0] = re * c[t] - im * s[t];
    dst[i1] = re * s[t] + im * c[t];
  }
}

// Re-phased keys rows [0, R): krot [B, Hkv, R, D] fp32 from k [B, Lk, Hkv, D] (contiguous). Either one shift for
// all rows (shifts == nullptr) or shifts[b * Lk + j].
template <typename scalar_t>
void rephase_rows(const scalar_t* k, float* krot, int64_t B, int64_t Lk, int64_t Hkv, int64_t D, int64_t R,
                  const int64_t* shifts, int64_t sink_shift, const double* freqs, int64_t T, bool interleaved) {
  std::vector<float> c0(T), s0(T);
  if (shifts == nullptr) phase_table(sink_shift, freqs, T, c0.data(), s0.data());
  at::parallel_for(0, B * R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> c(T), s(T);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / R, j = idx % R;
      const float *cp = c0.data(), *sp = s0.data();
      if (shifts != nullptr) {
        phase_table(shifts[b * Lk + j], freqs, T, c.data(), s.data());
        cp = c.data();
        sp = s.data();
      }
      for (int64_t g = 0; g < Hkv; ++g) {
        rotate_row(k + ((b * Lk + j) * Hkv + g) * D, krot + ((b * Hkv + g) * R + j) * D, D, T, interleaved, cp,
                   sp);
      }
    }
  });
}

// How keys [0, R) are re-phased, for the packing routines: one shift for all (cos/sin table c0, s0) or one per
// key (shifts[b * Lk + j], table formed per key).
struct Phase {
  int64_t R = 0;
  const int64_t* shifts = nullptr;
  const double* freqs = nullptr;
  int64_t T = 0;
  bool interleaved = true;
  std::vector<float> c0, s0;
  Phase(int64_t R_, const int64_t* shifts_, int64_t sink_shift, const double* freqs_, int64_t T_, bool inter)
      : R(R_), shifts(shifts_), freqs(freqs_), T(T_), interleaved(inter), c0(T_), s0(T_) {
    if (R > 0 && shifts == nullptr) phase_table(sink_shift, freqs, T, c0.data(), s0.data());
  }
  // dst[0, D) = key row src (batch b, key j) in fp32, re-phased when j < R; c, s: scratch of T floats.
  template <typename scalar_t>
  void row(const scalar_t* src, float* dst, int64_t D, int64_t b, int64_t Lk, int64_t j, float* c, float* s) const {
    if (j >= R) {
      for (int64_t d = 0; d < D; ++d) dst[d] = to_f(src[d]);
      return;
    }
    const float *cp = c0.data(), *sp = s0.data();
    if (shifts != nullptr) {
      phase_table(shifts[b * Lk + j], freqs, T, c, s);
      cp = c;
      sp = s;
    }
    rotate_row(src, dst, D, T, interleaved, cp, sp);
  }
  // bf16 row to bf16 row, re-phased when j < R. Only the 2T temporal channels go through fp32 (rotated, rounded
  // once); the others are copied bit for bit, which equals converting them to fp32 and back, at a third of the cost.
  void row_bf16(const c10::BFloat16* src, c10::BFloat16* dst, int64_t D, int64_t b, int64_t Lk, int64_t j,
                float* c, float* s) const {
    std::memcpy(dst, src, static_cast<size_t>(D) * sizeof(c10::BFloat16));
    if (j >= R) return;
    const float *cp = c0.data(), *sp = s0.data();
    if (shifts != nullptr) {
      phase_table(shifts[b * Lk + j], freqs, T, c, s);
      cp = c;
      sp = s;
    }
    const int64_t half = D / 2;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i0 = interleaved ? 2 * t : t;
      const int64_t i1 = interleaved ? 2 * t + 1 : t + half;
      const float re = static_cast<float>(src[i0]), im = static_cast<float>(src[i1]);
      dst[i0] = c10::BFloat16(re * cp[t] - im * sp[t]);
      dst[i1] = c10::BFloat16(re * sp[t] + im * cp[t]);
    }
  }
};

// ------------------------------------------------------------------------------------------------ bf16 path
std::atomic<bool> g_bf16_gemm_enabled{true};

// Whether at::native::cpublas::brgemm computes bf16 x bf16 -> fp32 here (oneDNN micro-kernel for avx512_bf16 or
// AMX). Probed once on a tiny product: it raises on CPUs without a bf16 kernel, and a wrong answer is not trusted.
bool bf16_brgemm_available() {
  static const bool ok = [] {
    try {
      constexpr int64_t M = 2, N = 16, K = 4;
      c10::BFloat16 a[M * K], bv[K * N];
      float c[M * N];
      for (int64_t i = 0; i < M * K; ++i) a[i] = c10::BFloat16(static_cast<float>(i % 5) - 2.f);
      for (int64_t kk = 0; kk < K; ++kk)
        for (int64_t n = 0; n < N; ++n)  // B[kk, n] = (kk + n) % 3 - 1 stored VNNI [K/2, N, 2]
          bv[((kk / 2) * N + n) * 2 + kk % 2] = c10::BFloat16(static_cast<float>((kk + n) % 3) - 1.f);
      at::native::cpublas::brgemm(M, N, K, K, N, N, false, a, bv, c, true);
      at::native::cpublas::brgemm_release(true);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t n = 0; n < N; ++n) {
          float want = 0.f;
          for (int64_t kk = 0; kk < K; ++kk)
            want += (static_cast<float>((i * K + kk) % 5) - 2.f) * (static_cast<float>((kk + n) % 3) - 1.f);
          if (c[i * N + n] != want) return false;
        }
      return true;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

bool use_bf16_gemm(at::ScalarType dt) {
  return dt == at::kBFloat16 && g_bf16_gemm_enabled.load() && bf16_brgemm_available();
}

// K^T in the VNNI layout of the bf16 micro-kernel, for KV head (b, g), keys [j_begin, j_end) (j_begin a multiple
// of 16): kv [B, Hkv, D/2, Lk, 2] from k [B, Lk, Hkv, D] (contiguous bf16), i.e. the transpose of k's rows seen as
// D/2 32-bit channel pairs; keys that move are re-phased in fp32 and rounded to bf16 once.
void pack_keys_vnni(const c10::BFloat16* k, c10::BFloat16* kv, int64_t Lk, int64_t Hkv, int64_t D, const Phase& ph,
                    int64_t b, int64_t g, int64_t j_begin, int64_t j_end) {
  const int64_t P = D / 2;
  constexpr int64_t kRows = 16;
  std::vector<float> c(ph.T), s(ph.T);
  std::vector<c10::BFloat16> tile(static_cast<size_t>(kRows * D));
  const int64_t bg = b * Hkv + g;
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kRows) {
    const int64_t n = std::min(j_end, j0 + kRows) - j0;
    const c10::BFloat16* first = k + ((b * Lk + j0) * Hkv + g) * D;
    uint32_t* dst = reinterpret_cast<uint32_t*>(kv) + bg * P * Lk + j0;
    if (j0 >= ph.R) {
      transpose32(reinterpret_cast<const uint32_t*>(first), Hkv * P, n, P, dst, Lk);
      continue;
    }
    for (int64_t jj = 0; jj < n; ++jj)
      ph.row_bf16(first + jj * Hkv * D, tile.data() + jj * D, D, b, Lk, j0 + jj, c.data(), s.data());
    transpose32(reinterpret_cast<const uint32_t*>(tile.data()), P, n, P, dst, Lk);
  }
}

// V in the VNNI layout, for KV head (b, g), key pairs [t_begin, t_end): vv [B, Hkv, Lkp/2, D, 2] with Lkp = Lk
// rounded up to even (the pad row is zero).
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

// ------------------------------------------------------------------------------------------------ fp32 micro-kernel
std::atomic<bool> g_f32_brgemm_enabled{true};

// Whether at::native::cpublas::brgemm computes fp32 products here (oneDNN's fp32 micro-kernel: no packing of B
// per call, unlike BLAS sgemm, which would re-pack the whole key panel for every query block).
bool f32_brgemm_available() {
  static const bool ok = [] {
    try {
      constexpr int64_t M = 3, N = 16, K = 5;
      float a[M * K], b[K * N], c[M * N];
      for (int64_t i = 0; i < M * K; ++i) a[i] = static_cast<float>(i % 7) - 3.f;
      for (int64_t i = 0; i < K * N; ++i) b[i] = static_cast<float>(i % 5) - 2.f;
      at::native::cpublas::brgemm(M, N, K, K, N, N, false, a, b, c, false);
      at::native::cpublas::brgemm_release(false);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t n = 0; n < N; ++n) {
          float want = 0.f;
          for (int64_t kk = 0; kk < K; ++kk) want += a[i * K + kk] * b[kk * N + n];
          if (c[i * N + n] != want) return false;
        }
      return true;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

// K^T of KV head (b, g), keys [j_begin, j_end) (j_begin a multiple of 16): kt [B, Hkv, D, Lk] fp32 from
// k [B, Lk, Hkv, D] (contiguous). Tiles of 16 keys: fp32 tiles that do not move are transposed straight from k,
// the others are first converted / rotated into a small fp32 tile.
template <typename scalar_t>
void pack_keys_t_f32(const scalar_t* k, float* kt, int64_t Lk, int64_t Hkv, int64_t D, const Phase& ph, int64_t b,
                     int64_t g, int64_t j_begin, int64_t j_end) {
  constexpr int64_t kRows = 16;
  std::vector<float> c(ph.T), s(ph.T), tile(static_cast<size_t>(kRows * D));
  const int64_t bg = b * Hkv + g;
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kRows) {
    const int64_t n = std::min(j_end, j0 + kRows) - j0;
    const scalar_t* first = k + ((b * Lk + j0) * Hkv + g) * D;
    uint32_t* dst = reinterpret_cast<uint32_t*>(kt + bg * D * Lk + j0);
    if (std::is_same<scalar_t, float>::value && j0 >= ph.R) {
      transpose32(reinterpret_cast<const uint32_t*>(first), Hkv * D, n, D, dst, Lk);
      continue;
    }
    for (int64_t jj = 0; jj < n; ++jj)
      ph.row(first + jj * Hkv * D, tile.data() + jj * D, D, b, Lk, j0 + jj, c.data(), s.data());
    transpose32(reinterpret_cast<const uint32_t*>(tile.data()), D, n, D, dst, Lk);
  }
}

// Which keys move and by how much: rows [0, R) are re-phased, by `shifts` [B, Lk] (int64) when defined, else all
// by sink_shift; `freqs` are the fp64 temporal frequencies (defined when R > 0).
struct ShiftPlan {
  int64_t R = 0;
  at::Tensor freqs;
  at::Tensor shifts;
  const int64_t* shift_ptr() const { return shifts.defined() ? shifts.data_ptr<int64_t>() : nullptr; }
};

ShiftPlan plan_shifts(int64_t B, int64_t Lk, int64_t D, const c10::optional<at::Tensor>& key_shift,
                      const c10::optional<at::Tensor>& temporal_freqs, int64_t sink_len, int64_t sink_shift) {
  ShiftPlan plan;
  const bool per_key = key_shift.has_value() && key_shift->defined();
  plan.R = per_key ? Lk : ((sink_len > 0 && sink_shift != 0) ? sink_len : 0);
  if (plan.R == 0) return plan;
  TORCH_CHECK(temporal_freqs.has_value() && temporal_freqs->defined(),
              "sink_attention_fwd: keys are re-phased but temporal_freqs is None");
  const at::Tensor& fr = *temporal_freqs;
  TORCH_CHECK(fr.dim() == 1 && fr.scalar_type() == at::kDouble && fr.device().is_cpu(),
              "sink_attention_fwd: temporal_freqs must be a 1-D float64 CPU tensor, got ", fr.sizes(), " ",
              fr.scalar_type());
  TORCH_CHECK(fr.size(0) <= D / 2, "sink_attention_fwd: temporal_freqs has ", fr.size(0), " pairs but head_dim ",
              D, " has only ", D / 2);
  plan.freqs = fr.contiguous();
  if (per_key) {
    const at::Tensor& ks = *key_shift;
    TORCH_CHECK(ks.scalar_type() == at::kLong && ks.dim() == 2 && ks.size(0) == B && ks.size(1) == Lk &&
                    ks.device().is_cpu(),
                "sink_attention_fwd: key_shift must be an int64 CPU tensor [B, Lk] = [", B, ", ", Lk, "], got ",
                ks.sizes(), " ", ks.scalar_type());
    plan.shifts = ks.contiguous();
  }
  return plan;
}

// fp32 path keys: re-phased rows [0, R) in krot [B, Hkv, R, D]; the resting rows read from kf [B, Lk, Hkv, D].
struct KeyPlan {
  at::Tensor krot;  // undefined when R == 0
  at::Tensor kf;    // undefined when R == Lk
  int64_t R = 0;
};

KeyPlan plan_keys_f32(const at::Tensor& k, const ShiftPlan& sp, bool interleaved, int64_t sink_shift) {
  const int64_t B = k.size(0), Lk = k.size(1), Hkv = k.size(2), D = k.size(3);
  KeyPlan plan;
  plan.R = sp.R;
  if (plan.R > 0) {
    plan.krot = at::empty({B, Hkv, plan.R, D}, k.options().dtype(at::kFloat));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "sink_rephase", [&] {
      rephase_rows<scalar_t>(k.data_ptr<scalar_t>(), plan.krot.data_ptr<float>(), B, Lk, Hkv, D, plan.R,
                             sp.shift_ptr(), sink_shift, sp.freqs.data_ptr<double>(), sp.freqs.size(0),
                             interleaved);
    });
  }
  if (plan.R < Lk) plan.kf = k.scalar_type() == at::kFloat ? k : k.to(at::kFloat);
  return plan;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "sink_attention_fwd: q, k, v must be 4-D [B, L, H, D], got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "sink_attention_fwd: q, k, v must be CPU tensors");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "sink_attention_fwd: dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt,
              "sink_attention_fwd: q, k, v must share one dtype, got ", dt, ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "sink_attention_fwd: k and v shapes differ: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "sink_attention_fwd: k [B, Lk, Hkv, D] disagrees with q on B or D: ", k.sizes(), " vs ", q.sizes());
  TORCH_CHECK(q.size(1) >= 1 && k.size(1) >= 1, "sink_attention_fwd: need Lq >= 1 and Lk >= 1");
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, "sink_attention_fwd: Hq (", q.size(2),
              ") must be a positive multiple of Hkv (", k.size(2), ")");
  TORCH_CHECK(q.size(3) >= 2 && q.size(3) % 2 == 0, "sink_attention_fwd: head_dim must be even, got ", q.size(3));
}

// Query rows per task. `bytes_per_score` is what one score costs in the task's buffers (4: fp32 S; 6: fp32 S and
// bf16 P).
int64_t choose_block_rows(int64_t B, int64_t Hq, int64_t Lq, int64_t Lk, int64_t bytes_per_score) {
  const int64_t forced = g_block_rows.load();
  if (forced > 0) return std::min(forced, Lq);
  // Keep the score block within about 1 MiB (a core's L2 on current x86 parts) ...
  int64_t rows = std::max<int64_t>(16, (int64_t(1) << 20) / (bytes_per_score * Lk));
  rows = std::min<int64_t>(rows, 64);
  // ... and make enough tasks for every thread (at least 4 each) so the last wave is not half idle.
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  while (rows > 16 && B * Hq * ((Lq + rows - 1) / rows) < want) rows /= 2;
  return std::min(rows, Lq);
}

// What every task shares: shapes, the softmax scale, and where lse and mass go.
struct Problem {
  int64_t B, Lq, Hq, D, Lk, Hkv, G;
  float scale;
  float* lse;            // [B, Hq, Lq]
  float* mass;           // [B, Hkv, Lk] or nullptr
  int64_t mass_start, mass_end;
};

// Work items and deterministic mass. Tasks (one query head x one block of query rows) are numbered group by group
// (all tasks of KV group (b, g) are consecutive); a work item ("segment") is a run of at most seg_len consecutive
// tasks of one group, claimed dynamically by whichever thread is free. Each segment sums its probabilities into its
// own mass row, and the rows of a group are added in segment order at the end: the result is bit-identical run to
// run and across threads (the layout depends on the problem size only), with no lock and no atomics on floats.
struct Segments {
  static constexpr int64_t kTarget = 64;  // about this many work items: load balance for up to ~16 threads
  int64_t group_tasks, seg_len, per_group, count;
  Segments(int64_t groups, int64_t tasks_per_group) : group_tasks(tasks_per_group) {
    seg_len = std::max<int64_t>(1, (groups * group_tasks + kTarget - 1) / kTarget);
    per_group = (group_tasks + seg_len - 1) / seg_len;
    count = groups * per_group;
  }
  int64_t begin(int64_t w) const { return (w / per_group) * group_tasks + (w % per_group) * seg_len; }
  int64_t end(int64_t w) const {
    return std::min(begin(w) + seg_len, (w / per_group + 1) * group_tasks);
  }
};

class MassPartials {
 public:
  MassPartials(const Problem& p, const Segments& seg) : p_(p), seg_(seg) {
    if (p.mass != nullptr) part_ = at::zeros({seg.count, p.Lk}, at::TensorOptions().dtype(at::kFloat));
  }
  float* row(int64_t w) const { return p_.mass != nullptr ? part_.data_ptr<float>() + w * p_.Lk : nullptr; }
  // Rows [i0, i0 + m) of a task: P holds unnormalised probabilities (leading dimension ld), inv[r] = 1 / rowsum;
  // the rows inside the mass range are summed into col.
  void add(float* col, int64_t i0, int64_t m, const float* P, int64_t ld, const float* inv) const {
    if (col == nullptr) return;
    const int64_t a = std::max(i0, p_.mass_start), e = std::min(i0 + m, p_.mass_end);
    if (a < e) column_sums(col, P + (a - i0) * ld, ld, inv + (a - i0), e - a, p_.Lk);
  }
  void reduce() const {
    if (p_.mass == nullptr) return;
    const int64_t Lk = p_.Lk, per = seg_.per_group;
    const float* part = part_.data_ptr<float>();
    // serial on purpose: a few vector adds per key, less than the fork/join of a parallel region would cost
    for (int64_t bg = 0; bg < p_.B * p_.Hkv; ++bg) {
      float* dst = p_.mass + bg * Lk;
      for (int64_t sgm = 0; sgm < per; ++sgm) {
        const float* src = part + (bg * per + sgm) * Lk;
#pragma omp simd
        for (int64_t j = 0; j < Lk; ++j) dst[j] += src[j];
      }
    }
  }

 private:
  const Problem& p_;
  const Segments& seg_;
  at::Tensor part_;
};

// Runs worker(claim) on every ATen thread; claim() hands out task indices 0, 1, 2, ... first come, first served.
// Dynamic claiming instead of a static split: on a shared machine a preempted thread no longer holds back its half
// of the tasks (measured: the static split lost 10-20% against SDPA at 2 threads under load).
template <typename Worker>
void parallel_workers(int64_t ntasks, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const auto claim = [&next]() { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) worker(claim);
  });
}

// Packing work done inside the attention's own parallel region instead of regions of its own: every extra
// fork/join costs little on an idle machine, but on a loaded one a join can wait out a whole scheduler time slice
// of a preempted thread (measured: 10-20 ms per region at 2 threads under load). Pack items (a 512-key chunk of
// one KV group) are numbered before the attention work items, so they are all claimed first; a work item of group
// g waits (yielding) until g's items are done. No deadlock: a waiter only waits on items claimed before its own,
// by threads that never wait while packing.
class PackGate {
 public:
  PackGate(int64_t groups, int64_t items_per_group)
      : per_(items_per_group), count_(groups * items_per_group), ready_(new std::atomic<int64_t>[groups]) {
    for (int64_t i = 0; i < groups; ++i) ready_[i].store(0, std::memory_order_relaxed);
  }
  int64_t count() const { return count_; }
  int64_t group(int64_t item) const { return item / per_; }
  int64_t part(int64_t item) const { return item % per_; }
  void done(int64_t item) const { ready_[item / per_].fetch_add(1, std::memory_order_release); }
  void wait(int64_t group) const {
    if (per_ == 0) return;
    while (ready_[group].load(std::memory_order_acquire) < per_) std::this_thread::yield();
  }

 private:
  int64_t per_, count_;
  std::unique_ptr<std::atomic<int64_t>[]> ready_;
};

// fp32 GEMM path (fp32 inputs; bf16 / fp16 inputs without the bf16 micro-kernel, converted once). Products by
// oneDNN's fp32 micro-kernel on K^T packed once per call when it is available, else by BLAS sgemm reading the
// keys in place.
void run_f32(const Problem& p, const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v_in,
             const ShiftPlan& sp, bool interleaved, int64_t sink_shift, at::Tensor& out) {
  const int64_t B = p.B, Lq = p.Lq, Hq = p.Hq, D = p.D, Lk = p.Lk, Hkv = p.Hkv, G = p.G;
  const auto dt = q_in.scalar_type();
  const bool f32 = dt == at::kFloat;
  const bool micro = g_f32_brgemm_enabled.load() && f32_brgemm_available();
  const at::Tensor qf = f32 ? q_in.contiguous() : q_in.to(at::kFloat).contiguous();
  const at::Tensor vf = f32 ? v_in.contiguous() : v_in.to(at::kFloat).contiguous();
  KeyPlan plan;
  at::Tensor kt_holder;
  float* kt = nullptr;
  const int64_t kchunks = (Lk + kChunk - 1) / kChunk;
  const Phase ph(sp.R, sp.shift_ptr(), sink_shift, sp.R > 0 ? sp.freqs.data_ptr<double>() : nullptr,
                 sp.R > 0 ? sp.freqs.size(0) : 0, interleaved);
  if (micro) {
    kt = call_buffer<float>(0, B * Hkv * D * Lk, kt_holder);
  } else {
    plan = plan_keys_f32(k, sp, interleaved, sink_shift);
  }
  const PackGate gate(B * Hkv, micro ? kchunks : 0);
  // Pack item: K^T of one 512-key chunk of one KV group.
  const auto pack = [&](int64_t item) {
    const int64_t bg = gate.group(item), j0 = gate.part(item) * kChunk, j1 = std::min(Lk, j0 + kChunk);
    const int64_t b = bg / Hkv, g = bg % Hkv;
    switch (k.scalar_type()) {
      case at::kFloat:
        pack_keys_t_f32(k.data_ptr<float>(), kt, Lk, Hkv, D, ph, b, g, j0, j1);
        break;
      case at::kBFloat16:
        pack_keys_t_f32(k.data_ptr<c10::BFloat16>(), kt, Lk, Hkv, D, ph, b, g, j0, j1);
        break;
      default:
        pack_keys_t_f32(k.data_ptr<c10::Half>(), kt, Lk, Hkv, D, ph, b, g, j0, j1);
        break;
    }
  };
  const int64_t R = plan.R;
  const float* krot = R > 0 ? plan.krot.data_ptr<float>() : nullptr;
  const float* kf = plan.kf.defined() ? plan.kf.data_ptr<float>() : nullptr;
  const float* ktp = kt;
  const float* qp = qf.data_ptr<float>();
  const float* vp = vf.data_ptr<float>();
  float* outf = f32 ? out.data_ptr<float>() : nullptr;
  void* outraw = out.data_ptr();

  const int64_t rows = choose_block_rows(B, Hq, Lq, Lk, 4);
  const int64_t nqb = (Lq + rows - 1) / rows;
  const float alpha = p.scale * kLog2e;  // scores in log2 units: exp2 in the softmax
  const int64_t ldq = Hq * D, ldk = Hkv * D, ldo = Hq * D;
  const Segments seg(B * Hkv, G * nqb);
  const MassPartials mass(p, seg);
  const int64_t items = gate.count() + seg.count;
  parallel_workers(items, [&](const auto& claim) {
    float* S = worker_buffer<float>(0, rows * Lk);
    float* obuf = worker_buffer<float>(1, f32 ? 1 : rows * D);
    std::vector<float> inv(static_cast<size_t>(rows));
    for (int64_t item = claim(); item < items; item = claim()) {
      if (item < gate.count()) {
        pack(item);
        gate.done(item);
        continue;
      }
      const int64_t w = item - gate.count();
      gate.wait(w / seg.per_group);
      float* col = mass.row(w);
      for (int64_t task = seg.begin(w); task < seg.end(w); ++task) {
        const int64_t qb = task % nqb, bh = task / nqb, h = bh % Hq, b = bh / Hq, g = h / G;
        const int64_t i0 = qb * rows, m = std::min(rows, Lq - i0);
        const float* qblk = qp + ((b * Lq + i0) * Hq + h) * D;

        // S = Q_blk K^T (the micro-kernel has no alpha: then the exp sweep scales).
        float sweep_alpha = 1.f;
        if (micro) {
          const float* kth = ktp + (b * Hkv + g) * D * Lk;
          for (int64_t n0 = 0; n0 < Lk; n0 += kChunk)
            at::native::cpublas::brgemm(m, std::min(kChunk, Lk - n0), D, ldq, Lk, Lk, false, qblk, kth + n0,
                                        S + n0, false);
          sweep_alpha = alpha;
        } else {
          // re-phased rows [0, R) from krot, the others in place
          if (R > 0) gemm_f32(true, m, R, D, alpha, qblk, ldq, krot + (b * Hkv + g) * R * D, D, S, Lk);
          if (R < Lk)
            gemm_f32(true, m, Lk - R, D, alpha, qblk, ldq, kf + ((b * Lk + R) * Hkv + g) * D, ldk, S + R,
                     Lk);
        }

        // Exact row softmax (unnormalised; 1 / rowsum applied to O and to the mass weights).
        for (int64_t r = 0; r < m; ++r) {
          float* srow = S + r * Lk;
          const float mx = row_max(srow, Lk) * sweep_alpha;
          const float sum = exp2_sub_sum(srow, Lk, sweep_alpha, mx);
          inv[r] = 1.f / sum;
          p.lse[(b * Hq + h) * Lq + i0 + r] = (mx + std::log2(sum)) * kLn2;
        }
        mass.add(col, i0, m, S, Lk, inv.data());

        // O = P V, then rows scaled by 1 / rowsum.
        float* o = f32 ? outf + ((b * Lq + i0) * Hq + h) * D : obuf;
        const int64_t ld_o = f32 ? ldo : D;
        const float* vblk = vp + (b * Lk * Hkv + g) * D;
        if (micro) {
          for (int64_t k0 = 0; k0 < Lk; k0 += kChunk)
            at::native::cpublas::brgemm(m, D, std::min(kChunk, Lk - k0), Lk, ldk, ld_o, k0 > 0, S + k0,
                                        vblk + k0 * ldk, o, false);
        } else {
          gemm_f32(false, m, D, Lk, 1.f, S, Lk, vblk, ldk, o, ld_o);
        }
        for (int64_t r = 0; r < m; ++r) {
          float* orow = o + r * ld_o;
          const float wr = inv[r];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) orow[d] *= wr;
        }
        if (!f32) {
          for (int64_t r = 0; r < m; ++r) {
            const float* orow = o + r * D;
            const int64_t off = ((b * Lq + i0 + r) * Hq + h) * D;
            if (dt == at::kBFloat16) {
              auto* dst = static_cast<c10::BFloat16*>(outraw) + off;
              for (int64_t d = 0; d < D; ++d) dst[d] = c10::BFloat16(orow[d]);
            } else {
              auto* dst = static_cast<c10::Half*>(outraw) + off;
              for (int64_t d = 0; d < D; ++d) dst[d] = c10::Half(orow[d]);
            }
          }
        }
      }
    }
    if (micro) at::native::cpublas::brgemm_release(false);
  });
  mass.reduce();
}

// bf16 micro-kernel path: fp32 scores from bf16 x bf16 products, bf16 P for P V.
void run_bf16(const Problem& p, const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v_in,
              const ShiftPlan& sp, bool interleaved, int64_t sink_shift, at::Tensor& out) {
  const int64_t B = p.B, Lq = p.Lq, Hq = p.Hq, D = p.D, Lk = p.Lk, Hkv = p.Hkv, G = p.G;
  const int64_t Lkp = Lk + (Lk & 1);  // V's reduction length padded to even (VNNI pairs rows)
  const at::Tensor q = q_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  at::Tensor kv_holder, vv_holder;
  c10::BFloat16* kv = call_buffer<c10::BFloat16>(0, B * Hkv * D * Lk, kv_holder);
  c10::BFloat16* vv = call_buffer<c10::BFloat16>(1, B * Hkv * Lkp * D, vv_holder);
  const Phase ph(sp.R, sp.shift_ptr(), sink_shift, sp.R > 0 ? sp.freqs.data_ptr<double>() : nullptr,
                 sp.R > 0 ? sp.freqs.size(0) : 0, interleaved);
  const int64_t kchunks = (Lk + kChunk - 1) / kChunk, pairs = Lkp / 2, vchunk = kChunk / 2;
  const int64_t vchunks = (pairs + vchunk - 1) / vchunk;
  const PackGate gate(B * Hkv, kchunks + vchunks);
  // Pack item: K^T (VNNI) of one 512-key chunk of one KV group, or V (VNNI) of one 512-key chunk.
  const auto pack = [&](int64_t item) {
    const int64_t bg = gate.group(item), part = gate.part(item), b = bg / Hkv, g = bg % Hkv;
    if (part < kchunks) {
      const int64_t j0 = part * kChunk;
      pack_keys_vnni(k.data_ptr<c10::BFloat16>(), kv, Lk, Hkv, D, ph, b, g, j0, std::min(Lk, j0 + kChunk));
    } else {
      const int64_t t0 = (part - kchunks) * vchunk;
      pack_values_vnni(v.data_ptr<c10::BFloat16>(), vv, Lk, Hkv, D, Lkp, b, g, t0, std::min(pairs, t0 + vchunk));
    }
  };
  const c10::BFloat16* qp = q.data_ptr<c10::BFloat16>();
  const c10::BFloat16* kvp = kv;
  const c10::BFloat16* vvp = vv;
  auto* outp = out.data_ptr<c10::BFloat16>();

  const int64_t rows = choose_block_rows(B, Hq, Lq, Lk, 6);
  const int64_t nqb = (Lq + rows - 1) / rows;
  const float alpha = p.scale * kLog2e;
  const int64_t ldq = Hq * D;
  const bool keep_f32 = p.mass != nullptr;
  const Segments seg(B * Hkv, G * nqb);
  const MassPartials mass(p, seg);
  const int64_t items = gate.count() + seg.count;
  parallel_workers(items, [&](const auto& claim) {
    float* S = worker_buffer<float>(0, rows * Lk);
    float* obuf = worker_buffer<float>(1, rows * D);
    c10::BFloat16* P = worker_buffer<c10::BFloat16>(2, rows * Lkp);
    if (Lkp != Lk)  // the pad column meets V's zero pad row: it must hold a finite value, 0
      for (int64_t r = 0; r < rows; ++r) P[r * Lkp + Lk] = c10::BFloat16(0.f);
    std::vector<float> inv(static_cast<size_t>(rows));
    for (int64_t item = claim(); item < items; item = claim()) {
      if (item < gate.count()) {
        pack(item);
        gate.done(item);
        continue;
      }
      const int64_t w = item - gate.count();
      gate.wait(w / seg.per_group);
      float* col = mass.row(w);
      for (int64_t task = seg.begin(w); task < seg.end(w); ++task) {
        const int64_t qb = task % nqb, bh = task / nqb, h = bh % Hq, b = bh / Hq, g = h / G;
        const int64_t i0 = qb * rows, m = std::min(rows, Lq - i0);
        const c10::BFloat16* qblk = qp + ((b * Lq + i0) * Hq + h) * D;

        // S = Q_blk K^T in fp32 (raw q.k: the scale is applied in the exp sweep).
        const c10::BFloat16* kvh = kvp + (b * Hkv + g) * D * Lk;
        for (int64_t n0 = 0; n0 < Lk; n0 += kChunk)  // column n0 of the VNNI panel starts at element 2 * n0
          at::native::cpublas::brgemm(m, std::min(kChunk, Lk - n0), D, ldq, Lk, Lk, false, qblk, kvh + 2 * n0,
                                      S + n0, true);
        for (int64_t r = 0; r < m; ++r) {
          float* srow = S + r * Lk;
          const float mx = row_max(srow, Lk) * alpha;
          const float sum = exp2_scaled_bf16(srow, P + r * Lkp, Lk, alpha, mx, keep_f32);
          inv[r] = 1.f / sum;
          p.lse[(b * Hq + h) * Lq + i0 + r] = (mx + std::log2(sum)) * kLn2;
        }
        mass.add(col, i0, m, S, Lk, inv.data());

        // O = P V (fp32 accumulate), rows scaled by 1 / rowsum and rounded to bf16.
        const c10::BFloat16* vvh = vvp + (b * Hkv + g) * Lkp * D;
        for (int64_t k0 = 0; k0 < Lkp; k0 += kChunk)  // kChunk is even: chunks start on a VNNI row pair
          at::native::cpublas::brgemm(m, D, std::min(kChunk, Lkp - k0), Lkp, D, D, k0 > 0, P + k0,
                                      vvh + k0 * D, obuf, true);
        for (int64_t r = 0; r < m; ++r) {
          const float* orow = obuf + r * D;
          const float wr = inv[r];
          c10::BFloat16* dst = outp + ((b * Lq + i0 + r) * Hq + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = c10::BFloat16(orow[d] * wr);
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  mass.reduce();
}

}  // namespace

void set_block_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "block rows must be >= 0 (0 = automatic)");
  g_block_rows.store(rows);
}

int64_t get_block_rows() { return g_block_rows.load(); }

void set_bf16_gemm(bool enabled) { g_bf16_gemm_enabled.store(enabled); }

void set_f32_microkernel(bool enabled) { g_f32_brgemm_enabled.store(enabled); }

bool f32_microkernel_active() { return g_f32_brgemm_enabled.load() && f32_brgemm_available(); }

bool bf16_gemm_active() { return g_bf16_gemm_enabled.load() && bf16_brgemm_available(); }

at::Tensor sink_rephase_keys(const at::Tensor& k_in, const c10::optional<at::Tensor>& key_shift,
                             const at::Tensor& temporal_freqs, bool interleaved, int64_t sink_len,
                             int64_t sink_shift) {
  TORCH_CHECK(k_in.dim() == 4 && k_in.device().is_cpu(), "sink_rephase_keys: k must be a 4-D CPU tensor");
  TORCH_CHECK(sink_len >= 0 && sink_len <= k_in.size(1), "sink_rephase_keys: sink_len out of range");
  const at::Tensor k = k_in.contiguous();
  const ShiftPlan sp = plan_shifts(k.size(0), k.size(1), k.size(3), key_shift, temporal_freqs, sink_len,
                                   sink_shift);
  KeyPlan plan = plan_keys_f32(k, sp, interleaved, sink_shift);
  at::Tensor out = plan.kf.defined() ? plan.kf.clone() : at::empty(k.sizes(), k.options().dtype(at::kFloat));
  if (plan.R > 0) out.narrow(1, 0, plan.R).copy_(plan.krot.permute({0, 2, 1, 3}));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sink_attention_fwd(
    const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v,
    const c10::optional<at::Tensor>& key_shift, const c10::optional<at::Tensor>& temporal_freqs, bool interleaved,
    int64_t sink_len, int64_t sink_shift, double softmax_scale, bool return_mass, int64_t mass_start,
    int64_t mass_end) {
  check_inputs(q, k_in, v);
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Lk = k_in.size(1), Hkv = k_in.size(2);
  TORCH_CHECK(sink_len >= 0 && sink_len <= Lk, "sink_attention_fwd: sink_len must be in [0, Lk=", Lk, "], got ",
              sink_len);
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "sink_attention_fwd: softmax_scale must be > 0");
  if (return_mass) {
    TORCH_CHECK(0 <= mass_start && mass_start <= mass_end && mass_end <= Lq, "sink_attention_fwd: mass range [",
                mass_start, ", ", mass_end, ") is not inside [0, Lq=", Lq, "]");
  }
  const at::Tensor k = k_in.contiguous();
  const ShiftPlan sp = plan_shifts(B, Lk, D, key_shift, temporal_freqs, sink_len, sink_shift);

  at::Tensor out = at::empty({B, Lq, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  at::Tensor mass = return_mass ? at::zeros({B, Hkv, Lk}, q.options().dtype(at::kFloat))
                                : at::empty({0}, q.options().dtype(at::kFloat));
  Problem p{B, Lq, Hq, D, Lk, Hkv, Hq / Hkv, static_cast<float>(softmax_scale), lse.data_ptr<float>(),
            return_mass ? mass.data_ptr<float>() : nullptr, mass_start, mass_end};
  if (use_bf16_gemm(q.scalar_type())) {
    run_bf16(p, q, k, v, sp, interleaved, sink_shift, out);
  } else {
    run_f32(p, q, k, v, sp, interleaved, sink_shift, out);
  }
  return std::make_tuple(out, lse, mass);
}

}  // namespace deepforcing
