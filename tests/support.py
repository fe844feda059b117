"""Helpers shared by test folders (the fixtures are in conftest.py): the C++ kernel's presence, and the cache
policies and state comparison the fuzz, resume and bad-input tests draw from."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import assume
from hypothesis import strategies as st

from deepforcing_kernels import CachePolicy


def cpp_available() -> bool:
    from deepforcing_kernels import available_backends

    return "cpp" in available_backends("cpu")


def require_cpp():
    """Skip when the C++ kernel is not built, unless the run demands it (make test sets DEEPFORCING_REQUIRE_CPP=1,
    so a broken build fails CI instead of silently skipping the fast backend)."""
    if cpp_available():
        return
    if os.environ.get("DEEPFORCING_REQUIRE_CPP") == "1":
        pytest.fail("the C++ extension is required (DEEPFORCING_REQUIRE_CPP=1) but is not built")
    pytest.skip("C++ extension not built")


def state_equal(a, b) -> bool:
    """Deep equality of two state dicts (tensors compared bit for bit, dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[x], b[x]) for x in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@st.composite
def policies(draw, kinds=("full", "sliding", "frame_sink", "deep_sink", "deep_forcing")):
    kind = draw(st.sampled_from(kinds))
    F = draw(st.integers(1, 3))
    if kind == "full":
        return CachePolicy.full(block_frames=F)
    W = draw(st.integers(F, 10))
    if kind == "sliding":
        return CachePolicy.sliding(W, block_frames=F)
    assume(W >= F + 1)
    S = draw(st.integers(1, W - F))
    if kind == "frame_sink":
        return CachePolicy.frame_sink(W, S, block_frames=F)
    gap = draw(st.sampled_from([None, 0, 1, 4]))
    if kind == "deep_sink":
        return CachePolicy.deep_sink(W, S, gap, block_frames=F)
    score = draw(st.sampled_from(["mass", "logits"]))
    R = draw(st.integers(F, 2 * F if score == "mass" else 2 * F + 1))
    assume(S + R + 1 <= W)
    N = draw(st.integers(S + R + 1, W))  # at least one Top-C frame
    return CachePolicy.deep_forcing(W, S, N, R, score=score, topc_max_reuse=draw(st.sampled_from([None, 1, 2, 7])),
                                    unify_topc_rope=draw(st.booleans()), sink_gap=gap, block_frames=F)


def write_tiny_original_folder(folder) -> None:
    """A tiny Wan2.1 folder in the original release's layout under ``folder`` (created): random
    ``Wan2.1_VAE.pth`` and umT5 ``.pth`` at the tiny configs, and a word-level tokenizer in ``google/umt5-xxl/``
    (the words of the tests' prompts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from deepforcing_kernels.video import t5, vae

    (folder / "google" / "umt5-xxl").mkdir(parents=True)
    torch.save(vae.random_original_state_dict(seed=3, **vae.TINY_VAE_CONFIG), folder / "Wan2.1_VAE.pth")
    torch.save(t5.random_original_state_dict(seed=3, **t5.TINY_T5_CONFIG),
               folder / "models_t5_umt5-xxl-enc-bf16.pth")
    words = ["<pad>", "</s>", "<unk>", "a", "red", "fox"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder / "google" / "umt5-xxl"))


def sigint_default() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: a shell without job control (CI runners, a
    backgrounded ``make test``) starts its children with SIGINT ignored, and a Python child then never raises
    KeyboardInterrupt; the default disposition is what a terminal's Ctrl-C meets."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
