"""TetherCache's memory admission (GRAB) and its AdaIN edit of admitted K/V (TAME), one layer.

The authors' code (my4f175/TetherCache, ``tethercache/patched_attention.py``, ``grab.py``, ``tame.py``; see
docs/methods.md) splits the window into ``[sink S][memory M][recent R]`` frames. When a new block rolls ``recent``,
the ``block_frames`` frames that fall off its head are set aside (:meth:`TetherAdmission.stash`). At that block's
clean pass, before its attention, the memory frames and the set-aside frames compete
(:meth:`TetherAdmission.admit`):

* the score of candidate frame ``c`` is ``softmax_c(mean_{h, i, t} q[i, h] . k[c, t, h] / sqrt(D) / temperature)``
  over the pass's queries ``i`` and the frame's tokens ``t``, on **un-rotated** q and k (their cache keeps keys
  un-rotated), plus ``alpha * (1 - max_j sim(c, j) * score_j)`` with ``sim = exp(-|f_c - f_j| / max(1, extent /
  2))`` over the candidates' frame numbers (``sim(c, c) = 0``); the best ``M`` stay, in candidate (= time) order;
* a set-aside frame that is admitted has its un-rotated K and its V blended toward the per-(head, channel) mean
  and (biased) std of the sink + memory before the admission: ``x' = (1 - tau) x + tau (sigma_t (x - mu_x) /
  sigma_x + mu_t)``, the std floored at 1e-6, statistics over the frame's tokens.

Their score is a mean of raw logits, not the softmax attention mass the fused kernel returns; it factorises
(``sum_h (sum_i q_ih) . (sum_t k_th)``), so it is one float32 product per candidate key
(:func:`~deepforcing_kernels.cache.scoring.release_logit_score`), not a ``queries x keys`` matrix.

Here keys stay stored RoPE'd at their own frames: the maths on un-rotated keys un-rotates them exactly
(:func:`~deepforcing_kernels.rotation.rotate_at_frames`, float64 angles, float32 rotation) and an edited key is
rotated back at its own frame before it is stored; attention re-phases every slot to its contiguous position on
load. Each batch element is its own video (the authors' code runs batch 1 only: its RoPE of the cached keys rotates
one sample), so admission and statistics are per element.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from ..policy import CachePolicy
from ..rope import RopeSpec
from ..rotation import rotate_at_frames
from .scoring import Reduce, Scorer, release_logit_score
from .storage import LayerStorage

__all__ = ["TetherAdmission", "grab_scores", "adain_toward"]


def grab_scores(mean_logits: torch.Tensor, frames: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """GRAB's combined score ``[n]`` of ``n`` candidate frames (one video): ``mean_logits [n]`` float32 (mean over
    heads, queries and the frame's tokens of the scaled un-rotated logits) and their frame numbers ``frames [n]``;
    float32, as the authors compute it."""
    s_attn = torch.softmax(mean_logits / max(temperature, 1e-6), dim=-1)
    f = frames.float()
    diffs = (f[None, :] - f[:, None]).abs()
    extent = float(frames.max().item() - frames.min().item() + 1)
    sim = torch.exp(-diffs / max(1.0, 0.5 * extent))
    sim.fill_diagonal_(0.0)  # a candidate does not penalise itself
    redundancy = (sim * s_attn[None, :]).max(dim=-1).values
    return s_attn + alpha * (1.0 - redundancy).clamp_min(0.0)


def _stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-(head, channel) mean and biased std (floored at 1e-6) over the tokens of ``x [1, L, H, D]`` (float32)."""
    return x.mean(dim=(0, 1)), x.std(dim=(0, 1), unbiased=False).clamp_min(1e-6)


def adain_toward(x: torch.Tensor, target: Tuple[torch.Tensor, torch.Tensor], tau: float) -> torch.Tensor:
    """TAME: ``(1 - tau) x + tau (sigma_t (x - mu_x) / sigma_x + mu_t)`` for ``x [1, L, H, D]`` float32 and the
    target statistics ``(mu_t, sigma_t) [H, D]``."""
    mu_x, sd_x = _stats(x)
    mu_t, sd_t = target
    return (1.0 - tau) * x + tau * (sd_t * ((x - mu_x) / sd_x) + mu_t)


class TetherAdmission(Scorer):
    """The set-aside frames of one layer and the admission that consumes them.

    Args:
        storage: the layer's storage (geometry, dtype, device).
        policy: a ``tethercache`` policy.
        rope: the cache's RoPE layout (keys are un-rotated / re-rotated with it).
        frame_grid: ``(rows, cols)`` of a frame for a 3-D ``rope``; None for a 1-D one.
        num_heads: query heads of this cache (GQA: heads of a group share their key).
        reduce_over_heads: sums the partial per-frame scores of a head-sharded cache's peers (identity here).
    """

    def __init__(self, storage: LayerStorage, policy: CachePolicy, rope: RopeSpec,
                 frame_grid: Optional[Sequence[int]], num_heads: int, reduce_over_heads: Optional[Reduce] = None) -> None:
        super().__init__(reduce_over_heads)
        st, self.policy, self.rope, self.grid = storage, policy, rope, frame_grid
        self.n, self.F, self.num_heads = st.tokens_per_frame, policy.block_frames, num_heads
        shape = (st.batch, self.F * self.n, st.kv_heads, st.head_dim)
        self.k = torch.zeros(shape, dtype=st.dtype, device=st.device)
        self.v = torch.zeros(shape, dtype=st.dtype, device=st.device)
        self.frames = torch.zeros(st.batch, self.F * self.n, dtype=torch.int64, device=st.device)
        self.pending = False

    # ------------------------------------------------------------------ the two steps
    def stash(self, storage: LayerStorage, at: int) -> None:
        """Set aside the ``block_frames`` frames at slot ``at`` (the head of ``recent``, about to be evicted)."""
        L = self.F * self.n
        self.k.copy_(storage.k[:, at:at + L])
        self.v.copy_(storage.v[:, at:at + L])
        self.frames.copy_(storage.frames[:, at:at + L])
        self.pending = True

    def _raw(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Un-rotated float32 copy of whole frames ``x [1, Nf * n, H, D]`` rotated at ``frames [Nf]``."""
        return rotate_at_frames(x.float(), self.rope, frames[None], self.grid, inverse=True)

    def _rotated(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return rotate_at_frames(x, self.rope, frames[None], self.grid)

    @torch.no_grad()
    def admit(self, storage: LayerStorage, q: torch.Tensor, q_start: int) -> None:
        """The clean pass: choose the memory among its ``M`` frames and the set-aside ones (GRAB), edit the newly
        admitted (TAME) and write the memory slots ``[S, S + M)`` in place (K, V and source frames). ``q`` are the
        pass's queries (RoPE'd at frames ``q_start ..``)."""
        p, n = self.policy, self.n
        S, M, F = p.sink_frames, p.tether_frames, self.F
        S_tok, P_tok = S * n, (S + M) * n
        tau, dev = p.tame_tau, storage.device
        qf = q.shape[1] // n
        q_frames = torch.arange(q_start, q_start + qf, device=dev)
        scale = 1.0 / q.shape[-1] ** 0.5
        for b in range(storage.batch):  # each video its own (see the module docstring)
            fr_mem, fr_new = storage.frames[b, S_tok:P_tok:n], self.frames[b, ::n]
            cand_frames = torch.cat([fr_mem, fr_new])
            k_mem = self._raw(storage.k[b:b + 1, S_tok:P_tok], fr_mem)
            k_new = self._raw(self.k[b:b + 1], fr_new)
            part = release_logit_score(self._raw(q[b:b + 1], q_frames), torch.cat([k_mem, k_new], 1))
            part = part.view(1, M + F, n).sum(-1)
            # the head count travels with the partial sums, so a head-sharded cache averages over all heads
            total = self.reduce_over_heads(torch.cat([part, part.new_full((1, 1), float(self.num_heads))], 1))
            mean = total[0, :-1] * scale / (total[0, -1] * q.shape[1] * n)
            score = grab_scores(mean, cand_frames, p.grab_alpha, p.grab_temperature)
            keep = torch.zeros(M + F, dtype=torch.bool, device=dev)
            keep[torch.topk(score, M, largest=True).indices] = True
            chosen = torch.nonzero(keep).flatten().tolist()
            if chosen == list(range(M)):
                continue  # the memory stays as it is
            if tau > 0.0:  # TAME's target: sink + memory before this admission
                sink = self._raw(storage.k[b:b + 1, :S_tok], storage.frames[b, :S_tok:n]) if S else k_mem[:, :0]
                tk = _stats(torch.cat([sink, k_mem], 1))
                tv = _stats(torch.cat([storage.v[b:b + 1, :P_tok]], 1).float())
            ks, vs, fs = [], [], []
            for c in chosen:
                if c < M:
                    sl = slice(S_tok + c * n, S_tok + (c + 1) * n)
                    ks.append(storage.k[b:b + 1, sl].clone())
                    vs.append(storage.v[b:b + 1, sl].clone())
                    fs.append(fr_mem[c:c + 1])
                    continue
                e = c - M
                sl = slice(e * n, (e + 1) * n)
                if tau > 0.0:
                    ks.append(self._rotated(adain_toward(k_new[:, sl], tk, tau), fr_new[e:e + 1]).to(storage.dtype))
                    vs.append(adain_toward(self.v[b:b + 1, sl].float(), tv, tau).to(storage.dtype))
                else:
                    ks.append(self.k[b:b + 1, sl].clone())
                    vs.append(self.v[b:b + 1, sl].clone())
                fs.append(fr_new[e:e + 1])
            storage.k[b:b + 1, S_tok:P_tok] = torch.cat(ks, 1)
            storage.v[b:b + 1, S_tok:P_tok] = torch.cat(vs, 1)
            storage.frames[b, S_tok:P_tok] = torch.cat(fs).repeat_interleave(n)
        self.pending = False

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.pending = False

    def state(self) -> Dict[str, torch.Tensor]:  # type: ignore[override]
        """The set-aside frames (empty when none wait for a clean pass)."""
        L = self.F * self.n if self.pending else 0
        return {"stash_k": self.k[:, :L].clone(), "stash_v": self.v[:, :L].clone(),
                "stash_frames": self.frames[:, :L].clone()}

    def load(self, d: Dict[str, torch.Tensor]) -> None:  # type: ignore[override]
        L = d["stash_k"].shape[1]
        self.pending = L > 0
        if L:
            self.k.copy_(d["stash_k"])
            self.v.copy_(d["stash_v"])
            self.frames.copy_(d["stash_frames"])
