// GEMM paths of the CPU kernel: BLAS sgemm behind a row-major wrapper, and one-time probes of oneDNN's fp32 and
// bf16 micro-kernels. The switches that tests and benchmarks flip (sink_attention_cpu.h) live here too.
#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <limits>

#include "sink_attention_cpu.h"

// Fortran BLAS sgemm, exported by libtorch_cpu when PyTorch is built with MKL (or linked to OpenBLAS). Weak, so
// the extension still loads where it is missing; then gemm_f32 falls back to at::mm.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace deepforcing {
namespace detail {
namespace {

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

std::atomic<bool> g_bf16_gemm_enabled{true};
// -1: automatic (f32_brgemm_preferred), 0: BLAS sgemm, 1: the micro-kernel where it works.
std::atomic<int> g_f32_brgemm_mode{-1};

}  // namespace

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

// oneDNN's fp32 micro-kernel needs no packing of B per call, unlike BLAS sgemm, which would re-pack the whole key
// panel for every query block. A wrong answer on the probe is not trusted.
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

// Measured at the bench.ops shape (fp32, Lq 384, Lk 2432, 12 heads, D 128, 2 threads), against SDPA in the same
// process: on an AVX-512 Zen 4 the micro-kernel on K^T packed once per call wins (0.72x SDPA); on an AVX2-only
// Zen 3, oneDNN's AVX2 kernel ran 1.18x SDPA where MKL sgemm on whole-head row blocks ran 0.96x (the sgemm's
// own packing of K is then shared by 384 query rows).
bool f32_brgemm_preferred() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
#else
  return true;  // no measurement elsewhere: keep the micro-kernel where it works
#endif
}

// Raises on CPUs without a bf16 kernel; a wrong answer is not trusted either.
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

}  // namespace detail

void set_bf16_gemm(bool enabled) { detail::g_bf16_gemm_enabled.store(enabled); }

bool bf16_gemm_active() { return detail::g_bf16_gemm_enabled.load() && detail::bf16_brgemm_available(); }

void set_f32_microkernel(std::optional<bool> enabled) {
  detail::g_f32_brgemm_mode.store(enabled.has_value() ? static_cast<int>(*enabled) : -1);
}

bool f32_microkernel_active() { return f32_microkernel_for(0); }

bool f32_microkernel_for(int64_t query_rows) {
  const int mode = detail::g_f32_brgemm_mode.load();
  // sgemm re-packs the keys for every task: below ~128 query rows that packing is not shared enough (measured,
  // Zen 3, bf16, 12 heads, D 128, 21 frames of keys, 2 threads: 16 tokens per frame (48 rows) micro-kernel 1.09 ms
  // against sgemm 1.69 ms; 64 tokens per frame (192 rows) 17.1 ms against 13.4 ms).
  constexpr int64_t kSgemmMinRows = 128;
  const bool want = mode < 0 ? (detail::f32_brgemm_preferred() || (query_rows > 0 && query_rows < kSgemmMinRows))
                             : mode > 0;
  return want && detail::f32_brgemm_available();
}

}  // namespace deepforcing
