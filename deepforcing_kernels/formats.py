"""The format tags of everything the package saves, in one place.

Each saved object (a cache state, a rollout state, a run's files, a video run's resume state) carries one of these
strings under ``"format"`` and is refused on load when the tag differs. They are on-disk contracts: a change of
layout takes a new tag, never a new meaning for an old one.
"""
from __future__ import annotations

__all__ = ["CACHE_STATE_FORMAT", "ROLLOUT_STATE_FORMAT", "RUN_FORMAT", "RUN_BLOCK_FORMAT", "RUN_STATE_FORMAT",
           "FRAME_STREAM_FORMAT", "VIDEO_RUN_FORMAT", "STREAM_DECODER_FORMAT", "SHARD_FORMAT"]

#: :meth:`deepforcing_kernels.StreamingKVCache.state_dict`
CACHE_STATE_FORMAT = "deepforcing_kernels.StreamingKVCache/1"
#: :meth:`deepforcing_kernels.driver.Rollout.state_dict` (holds a cache state)
ROLLOUT_STATE_FORMAT = "deepforcing-rollout-v1"
#: the manifest of a `deepforcing generate` latents run (``run.pt``)
RUN_FORMAT = "deepforcing-run/2"
#: one block file of such a run (``run.pt.d/latents-*.pt``)
RUN_BLOCK_FORMAT = "deepforcing-run-block/1"
#: its resume state (``run.pt.d/state.pt``; holds a rollout state)
RUN_STATE_FORMAT = "deepforcing-run-state/1"
#: :meth:`deepforcing_kernels.pipeline.FrameStream.state_dict` (a rollout state plus the decoder's)
FRAME_STREAM_FORMAT = "deepforcing-frame-stream/1"
#: :meth:`deepforcing_kernels.pipeline.VideoRun.state_dict` (the resume state of an mp4 run)
VIDEO_RUN_FORMAT = "deepforcing-video-run/1"
#: :meth:`deepforcing_kernels.video.StreamDecoder.state_dict` (the VAE's causal decoder caches)
STREAM_DECODER_FORMAT = "deepforcing-stream-decoder/1"
#: one rank's shard of a sequence-parallel `deepforcing generate --parallel` run
SHARD_FORMAT = "deepforcing-sp-shard/1"
