"""From a prompt to an mp4: text encoder -> Self-Forcing rollout -> streaming VAE decode -> mp4 writer.

The package's parts: :mod:`.media` (images and videos read as a stream's first frames), :mod:`.stream` (latent
blocks decoded as they come), :mod:`.run` (frames written to mp4 and resumed exactly), :mod:`.core` (the pipeline), :mod:`.offload` (components on the accelerator only while used); in diffusers' shape
(loaded on first use: they import diffusers) :mod:`.diffusers_pipeline` (:class:`DeepForcingPipeline`),
:mod:`.hub_models` (the DiT and sampler settings as diffusers components), :mod:`.hub` (``deepforcing convert``).

:class:`VideoPipeline` ties the pieces together and streams: each latent block the rollout produces is decoded
at once (the VAE's :class:`~deepforcing_kernels.video.vae.StreamDecoder` keeps the causal decoder's feature cache
between blocks) and, in :meth:`VideoPipeline.write`, encoded into the mp4 before the next block is generated, so
frames leave memory as soon as they are written and a run of any length holds one block's frames.

* :meth:`VideoPipeline.frames` -> a :class:`FrameStream` of :class:`FrameChunk` (decoded frames
  ``[B, t, 3, H, W]`` in [-1, 1], the latent block, their indices): what a live viewer needs.
* :meth:`VideoPipeline.open` -> a :class:`VideoRun` (iterate it to generate, decode and write block by block;
  :meth:`VideoRun.state_dict` between blocks to resume) and :meth:`VideoPipeline.write`, which runs one to the
  end.

Segments (``segment_frames=N``): ``run.mp4`` becomes ``run_00000.mp4``, ``run_00001.mp4``, ...; segment ``k``
holds video frames ``[k N, (k + 1) N)`` exactly (the last one fewer); a block whose frames cross a boundary is
split between the two files. A segment is finished and renamed to its final name before the next one is opened,
so at most one is open; the open one is written to a hidden temporary file (see
:class:`~deepforcing_kernels.video.writer.VideoWriter`).

Resume rule (exact): an mp4 cannot be appended to once closed, so the open segment is rewritten from its start.
The run's state (:meth:`VideoRun.state_dict`) holds the rollout's state and the decoder's state after the last
block, the segment index and frames written, and an *anchor*: the decoder state before the block that holds the
open segment's first frame plus the latent blocks from that block on (at most ``N / 4 + block_frames`` latent
frames: latents are 48x smaller than their frames at Wan's sizes). Resuming restores the anchor, re-decodes those
latents, drops the frames before the open segment, writes the segment anew up to where the run stopped, then
continues generating from the rollout's state. Closed segments are never touched. Decoding and generation are
bit for bit what they would have been, so the frames of all segments equal an uninterrupted run's. Without
segments the one file is the open segment: its anchor holds every latent block of the run (use segments for
long runs).
"""
from typing import Any

from .core import PromptLike, VideoPipeline
from .media import _valid_prefix_frames, parse_switch, prefix_from_pixels, read_image, read_video, segment_path  # noqa: F401
from .run import VideoRun, WriteResult
from .stream import FrameChunk, FrameStream

__all__ = ["VideoPipeline", "DeepForcingPipeline", "DeepForcingPipelineOutput", "FrameStream", "FrameChunk", "VideoRun", "WriteResult", "parse_switch",
           "segment_path", "read_image", "read_video", "prefix_from_pixels", "PromptLike"]

# the diffusers-style pipeline imports diffusers: loaded on first use only
_LAZY = {"DeepForcingPipeline": "diffusers_pipeline", "DeepForcingPipelineOutput": "diffusers_pipeline",
         "CausalWanTransformer": "hub_models", "SelfForcingScheduler": "hub_models",
         "convert_original": "hub"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
