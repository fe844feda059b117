#pragma once
// The matrix products of the CPU kernel: BLAS sgemm (row-major wrapper) and the probes that decide whether
// oneDNN's micro-kernels (at::native::cpublas::brgemm) can be used on this CPU.
#include <cstdint>

namespace deepforcing {
namespace detail {

// Row-major C[M, N] = alpha * A[M, K] . op(B), where op(B) = B^T for B stored [N, K] (trans_b) or B for B stored
// [K, N]. BLAS sgemm when libtorch exports a trustworthy one, else at::mm. Single-threaded when called inside
// at::parallel_for (BLAS sees a parallel region).
void gemm_f32(bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
              const float* B, int64_t ldb, float* C, int64_t ldc);

// Whether brgemm computes fp32 x fp32 -> fp32 here (probed once on a tiny product).
bool f32_brgemm_available();

// Whether this CPU runs fp32 attention faster on the micro-kernel than on BLAS sgemm (AVX-512: yes; AVX2: no).
bool f32_brgemm_preferred();

// Whether brgemm computes bf16 x bf16 -> fp32 here (avx512_bf16 / AMX; probed once on a tiny product).
bool bf16_brgemm_available();

}  // namespace detail
}  // namespace deepforcing
