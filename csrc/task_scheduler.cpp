// Block size choice and deterministic mass partials of the CPU kernel's scheduler (see task_scheduler.h).
#include "task_scheduler.h"

#include <c10/util/Exception.h>

#include "row_math.h"
#include "sink_attention_cpu.h"

namespace deepforcing {
namespace detail {
namespace {

std::atomic<int64_t> g_block_rows{0};

}  // namespace

int64_t choose_block_rows(int64_t B, int64_t Hq, int64_t Lq, int64_t Lk, int64_t bytes_per_score,
                          bool repacks_keys) {
  const int64_t forced = g_block_rows.load();
  if (forced > 0) return std::min(forced, Lq);
  const int64_t threads = static_cast<int64_t>(at::get_num_threads());
  if (repacks_keys) {
    // sgemm packs the whole key panel on every call: the taller the task, the more rows share that packing
    // (measured, Zen 3, Lq 384, Lk 2432, 2 threads: 64 rows 1.06x SDPA, 128 rows 0.99x, 384 rows 0.96x). Bounded
    // by an 8 MiB score block per thread (L3-resident) and by at least 3 tasks per thread for load balance.
    int64_t rows = std::max<int64_t>(64, std::min<int64_t>(512, (int64_t(8) << 20) / (bytes_per_score * Lk)));
    while (rows > 64 && B * Hq * ((Lq + rows - 1) / rows) < 3 * threads) rows /= 2;
    return std::min(rows, Lq);
  }
  // Keep the score block within about 1 MiB (a core's L2 on current x86 parts) ...
  int64_t rows = std::max<int64_t>(16, (int64_t(1) << 20) / (bytes_per_score * Lk));
  rows = std::min<int64_t>(rows, 64);
  // ... and make enough tasks for every thread (at least 4 each) so the last wave is not half idle.
  const int64_t want = 4 * threads;
  while (rows > 16 && B * Hq * ((Lq + rows - 1) / rows) < want) rows /= 2;
  return std::min(rows, Lq);
}

MassPartials::MassPartials(const Problem& p, const Segments& seg) : p_(p), seg_(seg) {
  if (p.mass == nullptr) return;
  part_ = at::empty({seg.count, p.Lk}, at::TensorOptions().dtype(at::kFloat));
  base_ = part_.data_ptr<float>();
}

void MassPartials::reduce() const {
  if (p_.mass == nullptr) return;
  const int64_t Lk = p_.Lk, per = seg_.per_group;
  // serial on purpose: a few vector adds per key, less than the fork/join of a parallel region would cost
  for (int64_t bg = 0; bg < p_.B * p_.Hkv; ++bg) {
    float* dst = p_.mass + bg * Lk;
    std::copy(base_ + bg * per * Lk, base_ + (bg * per + 1) * Lk, dst);  // per >= 1: every group has a segment
    for (int64_t sgm = 1; sgm < per; ++sgm) {
      const float* src = base_ + (bg * per + sgm) * Lk;
#pragma omp simd
      for (int64_t j = 0; j < Lk; ++j) dst[j] += src[j];
    }
  }
}

}  // namespace detail

void set_block_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "block rows must be >= 0 (0 = automatic)");
  detail::g_block_rows.store(rows);
}

int64_t get_block_rows() { return detail::g_block_rows.load(); }

}  // namespace deepforcing
