#pragma once
// The parallel work-item scheduler of the CPU kernel.
//
// Tasks (batch, query head, block of query rows) are numbered group by group (all tasks of KV group (b, g) are
// consecutive). A work item ("segment") is a run of at most seg_len consecutive tasks of one group, claimed
// dynamically by whichever thread is free. Each segment sums its attention probabilities into its own mass row,
// and the rows of a group are added in segment order at the end: the result is bit-identical run to run and across
// threads (the layout depends on the problem size only), with no lock and no atomics on floats.
//
// Packing work (a chunk of K or V of one KV group) runs inside the same parallel region as pack items, numbered
// before the segments so they are all claimed first; a segment of group g waits until g's pack items are done.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "row_math.h"

namespace deepforcing {
namespace detail {

// What every task shares: shapes, the softmax scale, and where lse and mass go.
struct Problem {
  int64_t B, Lq, Hq, D, Lk, Hkv, G;  // G = Hq / Hkv query heads per KV head
  float scale;
  float* lse;   // [B, Hq, Lq]
  float* mass;  // [B, Hkv, Lk] or nullptr
  int64_t mass_start, mass_end;
};

// Query rows per task. `bytes_per_score` is what one score costs in the task's buffers (4: fp32 S; 6: fp32 S and
// bf16 P). `repacks_keys`: the score product packs the keys anew for every task (BLAS sgemm), so tasks are made as
// tall as memory allows. A forced value (set_block_rows) wins.
int64_t choose_block_rows(int64_t B, int64_t Hq, int64_t Lq, int64_t Lk, int64_t bytes_per_score,
                          bool repacks_keys = false);

// The segment layout of `groups` KV groups of `tasks_per_group` tasks each.
struct Segments {
  static constexpr int64_t kTarget = 64;  // about this many work items: load balance for up to ~16 threads
  int64_t group_tasks, seg_len, per_group, count;
  Segments(int64_t groups, int64_t tasks_per_group) : group_tasks(tasks_per_group) {
    seg_len = std::max<int64_t>(1, (groups * group_tasks + kTarget - 1) / kTarget);
    per_group = (group_tasks + seg_len - 1) / seg_len;
    count = groups * per_group;
  }
  int64_t group(int64_t w) const { return w / per_group; }
  int64_t begin(int64_t w) const { return (w / per_group) * group_tasks + (w % per_group) * seg_len; }
  int64_t end(int64_t w) const { return std::min(begin(w) + seg_len, (w / per_group + 1) * group_tasks); }
};

// One mass row per segment, reduced in a fixed order.
class MassPartials {
 public:
  MassPartials(const Problem& p, const Segments& seg);
  // Segment w's row, zeroed here by the worker that runs the segment (a fill of all rows up front was a parallel
  // region of its own), or nullptr when no mass is asked for.
  float* start(int64_t w) const {
    if (base_ == nullptr) return nullptr;
    float* r = base_ + w * p_.Lk;
    std::fill(r, r + p_.Lk, 0.f);
    return r;
  }
  // Whether query row i counts (a mass is asked for and i is inside the mass range).
  bool counts(int64_t i) const { return base_ != nullptr && p_.mass_start <= i && i < p_.mass_end; }
  // Query row i's unnormalised probabilities prow [Lk], weighted by inv = 1 / rowsum, summed into col when the
  // row counts.
  void add_row(float* col, int64_t i, const float* prow, float inv) const {
    if (counts(i)) add_scaled_row(col, prow, inv, p_.Lk);
  }
  // mass[b, g] = the sum of the rows of group (b, g), in segment order (mass need not be initialised).
  void reduce() const;

 private:
  const Problem& p_;
  const Segments& seg_;
  at::Tensor part_;
  float* base_ = nullptr;
};

// Completion counters of the pack items of every KV group. No deadlock: a waiter only waits on items claimed
// before its own, by threads that never wait while packing.
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

// Runs worker(claim) on every ATen thread (at most ntasks of them); claim() hands out indices 0, 1, 2, ... first
// come, first served. Dynamic claiming instead of a static split: on a shared machine a preempted thread no longer
// holds back its share of the tasks (measured: the static split lost 10-20% against SDPA at 2 threads under load).
// One parallel region per call: on a loaded machine every extra fork/join can wait out a scheduler time slice of a
// preempted thread (measured: 10-20 ms per region at 2 threads).
template <typename Worker>
void parallel_workers(int64_t ntasks, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const auto claim = [&next]() { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) worker(claim);
  });
}

}  // namespace detail
}  // namespace deepforcing
