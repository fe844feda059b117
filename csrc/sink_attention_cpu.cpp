// CPU kernel of the fused op `sink_attention` (see sink_attention_cpu.h for the contract).
//
// Plan of one call:
//   1. K is packed ONCE per call into the layout the micro-kernel reads (fp32 K^T [B, Hkv, D, Lk]; bf16: VNNI, see
//      below), and the keys that move (the sink, or every key with per-key tables) are re-phased on the way by the
//      precomputed cos/sin tables (pack.h). Packing runs as work items of the attention's own parallel region
//      (task_scheduler.h), into scratch memory kept between calls (scratch.h).
//   2. Tasks (batch, query head, block of query rows) run in parallel. A task computes the whole score block
//      S = Q_blk K^T [rows, Lk] (oneDNN micro-kernel at::native::cpublas::brgemm, in 512-key chunks that stay in
//      cache), so each row's softmax is exact in one sweep (max, exp2, sum; row_math.h) and the mass column sums
//      read the same probabilities with no recomputation; then O = P V (same micro-kernel, accumulating over
//      512-key chunks) and O rows *= 1 / rowsum. Without the fp32 micro-kernel, BLAS sgemm reads the keys in place
//      instead (re-phased rows from a small fp32 side buffer).
//   3. Mass: each work item sums its probabilities into its own row, and the rows are added in a fixed order at
//      the end (bit-identical results run to run, whatever thread ran what).
//
// One task loop (run_tasks) serves both product paths; a path supplies the packing, the score product, the exp
// sweep and the output product:
//   * F32Path: fp32 inputs, and bf16 / fp16 inputs without the bf16 micro-kernel (converted to fp32 once per call:
//     O(L * D) work against O(Lq * Lk * D) GEMM work).
//   * Bf16Path, where oneDNN's bf16 micro-kernel (bf16 x bf16 -> fp32 accumulate; avx512_bf16 or AMX) works on this
//     CPU: K and V are packed once per call into its VNNI layout (K^T as [D/2, Lk, 2] with moving keys re-phased
//     in fp32 and rounded to bf16 once, V as [Lk/2, D, 2]); scores come out in fp32, so softmax, lse and mass are
//     computed as in the fp32 path, and P is rounded to bf16 only as the operand of P V (as any bf16 attention
//     does).
#include "sink_attention_cpu.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "gemm.h"
#include "pack.h"
#include "row_math.h"
#include "scratch.h"
#include "task_scheduler.h"

namespace deepforcing {
namespace {

using detail::Problem;
using detail::Rotation;

// Micro-kernel calls cover at most this many keys (N of Q K^T, the reduction of P V): a 512-key panel of K^T or V
// stays in L1/L2 while the kernel sweeps it, which measured ~25% faster than one call over all keys.
constexpr int64_t kChunk = 512;

// fp32 products: oneDNN's fp32 micro-kernel on K^T packed once per call when it is available, else BLAS sgemm
// reading the keys in place.
class F32Path {
 public:
  static constexpr int64_t kBytesPerScore = 4;  // fp32 S

  F32Path(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Rotation& rot,
          at::Tensor& out)
      : p_(p), k_(k), rot_(rot), dt_(q.scalar_type()), f32_(dt_ == at::kFloat),
        micro_(f32_microkernel_for(p.Lq)), kchunks_((p.Lk + kChunk - 1) / kChunk) {
    qf_ = f32_ ? q.contiguous() : q.to(at::kFloat).contiguous();
    vf_ = f32_ ? v.contiguous() : v.to(at::kFloat).contiguous();
    if (micro_) {
      kt_ = detail::call_buffer<float>(0, p.B * p.Hkv * p.D * p.Lk, kt_holder_);
    } else {
      keys_ = detail::key_rows_f32(k, rot);
    }
    out_ = out.data_ptr();
  }

  int64_t pack_items_per_group() const { return micro_ ? kchunks_ : 0; }
  bool repacks_keys() const { return !micro_; }  // sgemm packs the keys itself, on every call

  // Pack item `part` of KV group bg: K^T of one 512-key chunk.
  void pack(int64_t bg, int64_t part) const {
    const int64_t j0 = part * kChunk, j1 = std::min(p_.Lk, j0 + kChunk), b = bg / p_.Hkv, g = bg % p_.Hkv;
    switch (k_.scalar_type()) {
      case at::kFloat:
        detail::pack_keys_t_f32(k_.data_ptr<float>(), kt_, p_.Lk, p_.Hkv, p_.D, rot_, b, g, j0, j1);
        break;
      case at::kBFloat16:
        detail::pack_keys_t_f32(k_.data_ptr<c10::BFloat16>(), kt_, p_.Lk, p_.Hkv, p_.D, rot_, b, g, j0, j1);
        break;
      default:
        detail::pack_keys_t_f32(k_.data_ptr<c10::Half>(), kt_, p_.Lk, p_.Hkv, p_.D, rot_, b, g, j0, j1);
        break;
    }
  }

  // One thread's buffers and steps.
  class Worker {
   public:
    Worker(const F32Path& path, int64_t rows)
        : x_(path), S(detail::worker_buffer<float>(0, rows * path.p_.Lk)),
          obuf_(path.f32_ ? nullptr : detail::worker_buffer<float>(1, rows * path.p_.D)) {}

    // S = Q_blk K^T for query rows [i0, i0 + m) of head h (KV head g of batch b). Returns the factor the exp
    // sweep still has to apply (the micro-kernel has no alpha; sgemm scales by alpha itself).
    float scores(int64_t b, int64_t g, int64_t h, int64_t i0, int64_t m, float alpha) const {
      const Problem& p = x_.p_;
      const int64_t Lk = p.Lk, D = p.D, ldq = p.Hq * D;
      const float* qblk = x_.qf_.data_ptr<float>() + ((b * p.Lq + i0) * p.Hq + h) * D;
      if (x_.micro_) {
        const float* kth = x_.kt_ + (b * p.Hkv + g) * D * Lk;
        for (int64_t n0 = 0; n0 < Lk; n0 += kChunk)
          at::native::cpublas::brgemm(m, std::min(kChunk, Lk - n0), D, ldq, Lk, Lk, false, qblk, kth + n0, S + n0,
                                      false);
        return alpha;
      }
      // re-phased rows [0, R) from krot, the others in place
      const int64_t R = x_.keys_.R;
      if (R > 0)
        detail::gemm_f32(true, m, R, D, alpha, qblk, ldq, x_.keys_.krot.data_ptr<float>() + (b * p.Hkv + g) * R * D,
                         D, S, Lk);
      if (R < Lk)
        detail::gemm_f32(true, m, Lk - R, D, alpha, qblk, ldq,
                         x_.keys_.kf.data_ptr<float>() + ((b * Lk + R) * p.Hkv + g) * D, p.Hkv * D, S + R, Lk);
      return 1.f;
    }

    // Row r of S (srow) becomes its unnormalised probabilities 2^(a * s - am), in place (they stay there in fp32
    // whatever `keep`, which only the bf16 path reads); returns their sum.
    float exp_row(int64_t /*r*/, float* srow, float a, float am, const float* bias, bool /*keep*/) const {
      return detail::exp2_sub_sum(srow, x_.p_.Lk, a, am, bias);
    }

    // The same over keys [j0, j1) only (a run of equal bias, folded into am by the caller).
    float exp_run(int64_t /*r*/, float* srow, int64_t j0, int64_t j1, float a, float am, bool /*keep*/) const {
      return detail::exp2_sub_sum(srow + j0, j1 - j0, a, am);
    }

    // O = P V for the task's rows, scaled by inv[r] = 1 / rowsum, into out.
    void output(int64_t b, int64_t g, int64_t h, int64_t i0, int64_t m, const float* inv) const {
      const Problem& p = x_.p_;
      const int64_t Lk = p.Lk, D = p.D, ldk = p.Hkv * D, off = ((b * p.Lq + i0) * p.Hq + h) * D;
      float* o = x_.f32_ ? static_cast<float*>(x_.out_) + off : obuf_;
      const int64_t ld_o = x_.f32_ ? p.Hq * D : D;
      const float* vblk = x_.vf_.data_ptr<float>() + (b * Lk * p.Hkv + g) * D;
      if (x_.micro_) {
        for (int64_t k0 = 0; k0 < Lk; k0 += kChunk)
          at::native::cpublas::brgemm(m, D, std::min(kChunk, Lk - k0), Lk, ldk, ld_o, k0 > 0, S + k0,
                                      vblk + k0 * ldk, o, false);
      } else {
        detail::gemm_f32(false, m, D, Lk, 1.f, S, Lk, vblk, ldk, o, ld_o);
      }
      for (int64_t r = 0; r < m; ++r) {
        float* orow = o + r * ld_o;
        const float wr = inv[r];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) orow[d] *= wr;
      }
      if (x_.f32_) return;
      for (int64_t r = 0; r < m; ++r) {
        const float* orow = o + r * D;
        const int64_t at_row = off + r * p.Hq * D;
        if (x_.dt_ == at::kBFloat16) {
          auto* dst = static_cast<c10::BFloat16*>(x_.out_) + at_row;
          for (int64_t d = 0; d < D; ++d) dst[d] = c10::BFloat16(orow[d]);
        } else {
          auto* dst = static_cast<c10::Half*>(x_.out_) + at_row;
          for (int64_t d = 0; d < D; ++d) dst[d] = c10::Half(orow[d]);
        }
      }
    }

    void finish() const {
      if (x_.micro_) at::native::cpublas::brgemm_release(false);
    }

   private:
    const F32Path& x_;

   public:
    float* const S;  // [rows, Lk] scores, then probabilities

   private:
    float* const obuf_;  // [rows, D] fp32 output rows before rounding (non-fp32 outputs)
  };

 private:
  const Problem& p_;
  const at::Tensor& k_;
  const Rotation& rot_;
  const at::ScalarType dt_;
  const bool f32_, micro_;
  const int64_t kchunks_;
  at::Tensor qf_, vf_;     // fp32 contiguous q, v
  at::Tensor kt_holder_;   // K^T when too large for the kept scratch
  float* kt_ = nullptr;    // micro: K^T [B, Hkv, D, Lk]
  detail::KeyRows keys_;   // BLAS: keys read in place
  void* out_ = nullptr;
};

// bf16 micro-kernel products: fp32 scores from bf16 x bf16 products, bf16 P for P V.
class Bf16Path {
 public:
  static constexpr int64_t kBytesPerScore = 6;  // fp32 S and bf16 P

  Bf16Path(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Rotation& rot,
           at::Tensor& out)
      : p_(p), k_(k), rot_(rot), q_(q.contiguous()), v_(v.contiguous()), Lkp_(p.Lk + (p.Lk & 1)),
        kchunks_((p.Lk + kChunk - 1) / kChunk), vchunks_((Lkp_ / 2 + kChunk / 2 - 1) / (kChunk / 2)) {
    kv_ = detail::call_buffer<c10::BFloat16>(0, p.B * p.Hkv * p.D * p.Lk, kv_holder_);
    vv_ = detail::call_buffer<c10::BFloat16>(1, p.B * p.Hkv * Lkp_ * p.D, vv_holder_);
    out_ = out.data_ptr<c10::BFloat16>();
  }

  int64_t pack_items_per_group() const { return kchunks_ + vchunks_; }
  bool repacks_keys() const { return false; }

  // Pack item `part` of KV group bg: K^T (VNNI) of one 512-key chunk, or V (VNNI) of one 512-key chunk.
  void pack(int64_t bg, int64_t part) const {
    const int64_t b = bg / p_.Hkv, g = bg % p_.Hkv;
    if (part < kchunks_) {
      const int64_t j0 = part * kChunk;
      detail::pack_keys_vnni(k_.data_ptr<c10::BFloat16>(), kv_, p_.Lk, p_.Hkv, p_.D, rot_, b, g, j0,
                             std::min(p_.Lk, j0 + kChunk));
    } else {
      const int64_t t0 = (part - kchunks_) * (kChunk / 2);
      detail::pack_values_vnni(v_.data_ptr<c10::BFloat16>(), vv_, p_.Lk, p_.Hkv, p_.D, Lkp_, b, g, t0,
                               std::min(Lkp_ / 2, t0 + kChunk / 2));
    }
  }

  class Worker {
   public:
    Worker(const Bf16Path& path, int64_t rows)
        : x_(path), S(detail::worker_buffer<float>(0, rows * path.p_.Lk)),
          obuf_(detail::worker_buffer<float>(1, rows * path.p_.D)),
          P_(detail::worker_buffer<c10::BFloat16>(2, rows * path.Lkp_)) {
      const int64_t Lk = path.p_.Lk, Lkp = path.Lkp_;
      if (Lkp != Lk)  // the pad column meets V's zero pad row: it must hold a finite value, 0
        for (int64_t r = 0; r < rows; ++r) P_[r * Lkp + Lk] = c10::BFloat16(0.f);
    }

    // S = Q_blk K^T in fp32 (raw q.k: the exp sweep applies alpha).
    float scores(int64_t b, int64_t g, int64_t h, int64_t i0, int64_t m, float alpha) const {
      const Problem& p = x_.p_;
      const int64_t Lk = p.Lk, D = p.D;
      const c10::BFloat16* qblk = x_.q_.data_ptr<c10::BFloat16>() + ((b * p.Lq + i0) * p.Hq + h) * D;
      const c10::BFloat16* kvh = x_.kv_ + (b * p.Hkv + g) * D * Lk;
      for (int64_t n0 = 0; n0 < Lk; n0 += kChunk)  // column n0 of the VNNI panel starts at element 2 * n0
        at::native::cpublas::brgemm(m, std::min(kChunk, Lk - n0), D, p.Hq * D, Lk, Lk, false, qblk, kvh + 2 * n0,
                                    S + n0, true);
      return alpha;
    }

    // Row r's probabilities rounded to bf16 into P (kept in fp32 in srow only when `keep`: the row counts for
    // the mass).
    float exp_row(int64_t r, float* srow, float a, float am, const float* bias, bool keep) const {
      return detail::exp2_scaled_bf16(srow, P_ + r * x_.Lkp_, x_.p_.Lk, a, am, keep, bias);
    }

    // The same over keys [j0, j1) only (a run of equal bias, folded into am by the caller).
    float exp_run(int64_t r, float* srow, int64_t j0, int64_t j1, float a, float am, bool keep) const {
      return detail::exp2_scaled_bf16(srow + j0, P_ + r * x_.Lkp_ + j0, j1 - j0, a, am, keep);
    }

    // O = P V (fp32 accumulate), rows scaled by 1 / rowsum and rounded to bf16.
    void output(int64_t b, int64_t g, int64_t h, int64_t i0, int64_t m, const float* inv) const {
      const Problem& p = x_.p_;
      const int64_t D = p.D, Lkp = x_.Lkp_;
      const c10::BFloat16* vvh = x_.vv_ + (b * p.Hkv + g) * Lkp * D;
      for (int64_t k0 = 0; k0 < Lkp; k0 += kChunk)  // kChunk is even: chunks start on a VNNI row pair
        at::native::cpublas::brgemm(m, D, std::min(kChunk, Lkp - k0), Lkp, D, D, k0 > 0, P_ + k0, vvh + k0 * D,
                                    obuf_, true);
      for (int64_t r = 0; r < m; ++r) {
        const float* orow = obuf_ + r * D;
        const float wr = inv[r];
        c10::BFloat16* dst = x_.out_ + ((b * p.Lq + i0 + r) * p.Hq + h) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = c10::BFloat16(orow[d] * wr);
      }
    }

    void finish() const { at::native::cpublas::brgemm_release(true); }

   private:
    const Bf16Path& x_;

   public:
    float* const S;  // [rows, Lk] fp32 scores, then (with mass) fp32 probabilities

   private:
    float* const obuf_;        // [rows, D] fp32 output rows
    c10::BFloat16* const P_;   // [rows, Lkp] bf16 probabilities
  };

 private:
  const Problem& p_;
  const at::Tensor& k_;
  const Rotation& rot_;
  const at::Tensor q_, v_;
  const int64_t Lkp_;  // V's reduction length padded to even (VNNI pairs rows)
  const int64_t kchunks_, vchunks_;
  at::Tensor kv_holder_, vv_holder_;
  c10::BFloat16* kv_ = nullptr;  // K^T VNNI [B, Hkv, D/2, Lk, 2]
  c10::BFloat16* vv_ = nullptr;  // V VNNI [B, Hkv, Lkp/2, D, 2]
  c10::BFloat16* out_ = nullptr;
};

// The key-bias option: float32 [Bb, Hb, Lk] (Bb in {1, B}, Hb in {1, Hq}) converted once per call to log2 units
// (the scores' units); row(b, h) is the bias of query head h of batch b, or nullptr without a bias.
// A bias row made of runs of equal values (a per-frame bias: Recency Forcing's chunks) averaging at least kMinRun
// keys is also kept as runs: the sweeps then take each run's bias as an offset of the whole run and read no bias
// per key (runs(b, h) = [first, last) into run_lo / run_hi / run_value, empty for a row that takes the per-key path).
constexpr int64_t kMinRun = 256;
struct KeyBias {
  at::Tensor log2_bias;  // undefined without a bias
  const float* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, Lk = 0;
  std::vector<int64_t> row_runs, run_lo, run_hi;  // row_runs[i] .. row_runs[i + 1]: the runs of bias row i
  std::vector<float> run_value;
  const float* row(int64_t b, int64_t h) const {
    return data != nullptr ? data + b * stride_b + h * stride_h : nullptr;
  }
  std::pair<int64_t, int64_t> runs(int64_t b, int64_t h) const {
    const int64_t i = (b * stride_b + h * stride_h) / Lk;
    return {row_runs[i], row_runs[i + 1]};
  }
};

KeyBias make_key_bias(const std::optional<at::Tensor>& key_bias, int64_t B, int64_t Hq, int64_t Lk) {
  KeyBias kb;
  if (!key_bias.has_value() || !key_bias->defined()) return kb;
  const at::Tensor& t = *key_bias;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.dim() == 3,
              "sink_attention_fwd: key_bias must be a 3-D float32 CPU tensor [B or 1, Hq or 1, Lk], got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
  TORCH_CHECK((t.size(0) == 1 || t.size(0) == B) && (t.size(1) == 1 || t.size(1) == Hq) && t.size(2) == Lk,
              "sink_attention_fwd: key_bias must have shape [B or 1, Hq or 1, Lk] = [", B, ", ", Hq, ", ", Lk,
              "], got ", t.sizes());
  kb.log2_bias = (t * static_cast<double>(detail::kLog2e)).contiguous();
  kb.data = kb.log2_bias.data_ptr<float>();
  kb.stride_b = t.size(0) == 1 ? 0 : t.size(1) * Lk;
  kb.stride_h = t.size(1) == 1 ? 0 : Lk;
  kb.Lk = Lk;
  const int64_t rows = t.size(0) * t.size(1);
  kb.row_runs.assign(1, 0);
  for (int64_t i = 0; i < rows; ++i) {
    const float* x = kb.data + i * Lk;
    const size_t first = kb.run_lo.size();
    int64_t j = 0, n = 0;
    for (; j < Lk && (n + 1) * kMinRun <= Lk; ++n) {  // stop early once the runs are too short on average
      int64_t e = j + 1;
      while (e < Lk && x[e] == x[j]) ++e;
      kb.run_lo.push_back(j), kb.run_hi.push_back(e), kb.run_value.push_back(x[j]);
      j = e;
    }
    if (j < Lk) {  // too many runs: this row takes the per-key path
      kb.run_lo.resize(first), kb.run_hi.resize(first), kb.run_value.resize(first);
    }
    kb.row_runs.push_back(static_cast<int64_t>(kb.run_lo.size()));
  }
  return kb;
}

// The task loop of both paths: pack items first, then segments of tasks; per task the score block, the exact row
// softmax (lse, 1 / rowsum), the mass partial and the output rows.
template <class Path>
void run_tasks(const Problem& p, const Path& path, const KeyBias& bias) {
  const int64_t Lq = p.Lq, Lk = p.Lk, Hq = p.Hq;
  const int64_t rows = detail::choose_block_rows(p.B, Hq, Lq, Lk, Path::kBytesPerScore, path.repacks_keys());
  const int64_t nqb = (Lq + rows - 1) / rows;
  const float alpha = p.scale * detail::kLog2e;  // scores in log2 units: exp2 in the softmax
  const detail::PackGate gate(p.B * p.Hkv, path.pack_items_per_group());
  const detail::Segments seg(p.B * p.Hkv, p.G * nqb);
  const detail::MassPartials mass(p, seg);
  const int64_t items = gate.count() + seg.count;
  detail::parallel_workers(items, [&](const auto& claim) {
    const typename Path::Worker wk(path, rows);
    std::vector<float> inv(static_cast<size_t>(rows));
    for (int64_t item = claim(); item < items; item = claim()) {
      if (item < gate.count()) {
        path.pack(gate.group(item), gate.part(item));
        gate.done(item);
        continue;
      }
      const int64_t w = item - gate.count();
      gate.wait(seg.group(w));
      float* col = mass.start(w);
      for (int64_t task = seg.begin(w); task < seg.end(w); ++task) {
        const int64_t qb = task % nqb, bh = task / nqb, h = bh % Hq, b = bh / Hq, g = h / p.G;
        const int64_t i0 = qb * rows, m = std::min(rows, Lq - i0);
        const float a = wk.scores(b, g, h, i0, m, alpha);
        const float* brow = bias.row(b, h);
        const auto runs = brow != nullptr ? bias.runs(b, h) : std::pair<int64_t, int64_t>(0, 0);
        // Exact row softmax (unnormalised; 1 / rowsum applied to O and to the mass weights); a biased row's
        // exponent is a * s + bias (log2 units), added in the max and again in the exp sweep, or, for a row of
        // long runs of equal bias, applied once per run (max of each run's max, each run's exp at its offset).
        for (int64_t r = 0; r < m; ++r) {
          float* srow = wk.S + r * Lk;
          const bool keep = mass.counts(i0 + r);
          float mx, sum = 0.f;
          if (runs.first < runs.second) {
            mx = -std::numeric_limits<float>::infinity();
            for (int64_t u = runs.first; u < runs.second; ++u)
              if (bias.run_value[u] != -std::numeric_limits<float>::infinity())
                mx = std::max(mx, detail::row_max(srow + bias.run_lo[u], bias.run_hi[u] - bias.run_lo[u]) * a +
                                      bias.run_value[u]);
            for (int64_t u = runs.first; u < runs.second; ++u)
              sum += wk.exp_run(r, srow, bias.run_lo[u], bias.run_hi[u], a, mx - bias.run_value[u], keep);
          } else {
            mx = brow != nullptr ? detail::biased_row_max(srow, Lk, a, brow) : detail::row_max(srow, Lk) * a;
            sum = wk.exp_row(r, srow, a, mx, brow, keep);
          }
          inv[r] = 1.f / sum;
          p.lse[(b * Hq + h) * Lq + i0 + r] = (mx + std::log2(sum)) * detail::kLn2;
          mass.add_row(col, i0 + r, srow, inv[r]);  // while the row is still in L1
        }
        wk.output(b, g, h, i0, m, inv.data());
      }
    }
    wk.finish();
  });
  mass.reduce();
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

}  // namespace

at::Tensor sink_rephase_keys(const at::Tensor& k_in, const at::Tensor& cos, const at::Tensor& sin, int64_t rot_len,
                             bool interleaved) {
  TORCH_CHECK(k_in.dim() == 4 && k_in.device().is_cpu(), "sink_rephase_keys: k must be a 4-D CPU tensor");
  const at::Tensor k = k_in.contiguous();
  const Rotation rot =
      detail::make_rotation(cos, sin, rot_len, interleaved, k.size(0), k.size(1), k.size(3), "sink_rephase_keys");
  TORCH_CHECK(rot.H == 0 || rot.H == k.size(2), "sink_rephase_keys: per-head tables have ", rot.H,
              " heads but k has ", k.size(2));
  const detail::KeyRows rows = detail::key_rows_f32(k, rot);
  at::Tensor out = rows.kf.defined() ? rows.kf.clone() : at::empty(k.sizes(), k.options().dtype(at::kFloat));
  if (rows.R > 0) out.narrow(1, 0, rows.R).copy_(rows.krot.permute({0, 2, 1, 3}));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sink_attention_fwd(
    const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
    int64_t rot_len, bool interleaved, double softmax_scale, bool return_mass, int64_t mass_start,
    int64_t mass_end, const std::optional<at::Tensor>& key_bias) {
  check_inputs(q, k_in, v);
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Lk = k_in.size(1), Hkv = k_in.size(2);
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "sink_attention_fwd: softmax_scale must be > 0");
  if (return_mass) {
    TORCH_CHECK(0 <= mass_start && mass_start <= mass_end && mass_end <= Lq, "sink_attention_fwd: mass range [",
                mass_start, ", ", mass_end, ") is not inside [0, Lq=", Lq, "]");
  }
  const Rotation rot = detail::make_rotation(cos, sin, rot_len, interleaved, B, Lk, D, "sink_attention_fwd");
  TORCH_CHECK(rot.H == 0 || rot.H == Hkv, "sink_attention_fwd: per-head tables have ", rot.H, " heads but k has ",
              Hkv, " KV heads");
  const at::Tensor k = k_in.contiguous();
  const KeyBias bias = make_key_bias(key_bias, B, Hq, Lk);

  at::Tensor out = at::empty({B, Lq, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  at::Tensor mass = return_mass ? at::empty({B, Hkv, Lk}, q.options().dtype(at::kFloat))  // reduce() fills it
                                : at::empty({0}, q.options().dtype(at::kFloat));
  const Problem p{B, Lq, Hq, D, Lk, Hkv, Hq / Hkv, static_cast<float>(softmax_scale), lse.data_ptr<float>(),
                  return_mass ? mass.data_ptr<float>() : nullptr, mass_start, mass_end};
  if (q.scalar_type() == at::kBFloat16 && bf16_gemm_active()) {
    run_tasks(p, Bf16Path(p, q, k, v, rot, out), bias);
  } else {
    run_tasks(p, F32Path(p, q, k, v, rot, out), bias);
  }
  return std::make_tuple(out, lse, mass);
}

}  // namespace deepforcing
