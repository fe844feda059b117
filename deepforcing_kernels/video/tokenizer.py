"""The byte-level stand-in tokenizer of the tiny random text encoder (no files, no downloads).

It is ByT5's scheme (transformers' ``ByT5Tokenizer`` gives the same ids): id 0 pads, 1 ends the text (``</s>``),
2 is unknown, and byte ``b`` of the UTF-8 text is id ``b + 3``; the vocabulary has 384 rows (ByT5's 256 bytes,
3 specials and 125 unused extra ids). Like Wan2.1's ``HuggingfaceTokenizer(seq_len=text_len,
clean="whitespace")``, texts are whitespace-cleaned, end with ``</s>``, are truncated to ``text_len`` (the
``</s>`` kept) and padded to it, and come with a 0/1 mask. It has no meaning for a real umT5 model: real weights
come with their own tokenizer files (``tokenizer/`` or ``google/umt5-xxl/``).
"""
from __future__ import annotations

import html
import re
from typing import List, Sequence, Tuple, Union

import torch

__all__ = ["ByteTokenizer", "clean_whitespace", "BYTE_VOCAB"]

PAD, EOS, UNK, OFFSET = 0, 1, 2, 3
#: rows of the tiny encoder's token embedding (ByT5's vocabulary size)
BYTE_VOCAB = 384


def clean_whitespace(text: str) -> str:
    """Wan2.1's ``clean="whitespace"``: ftfy's fix_text (when ftfy is installed), HTML unescaped twice, runs of
    whitespace to one space, stripped."""
    try:
        import ftfy  # optional, as in Wan2.1's tokenizers.py
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class ByteTokenizer:
    """UTF-8 bytes as token ids (ByT5's ids), padded / truncated to ``text_len``.

    Args:
        text_len: the length of every row (Wan2.1 uses 512; the tiny model 16).
        clean: apply :func:`clean_whitespace` first (as Wan2.1 does).
    """

    vocab_size = BYTE_VOCAB
    pad_id, eos_id = PAD, EOS

    def __init__(self, text_len: int = 512, clean: bool = True) -> None:
        if not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be a positive int, got {text_len!r}")
        self.text_len = text_len
        self.clean = clean

    def encode(self, text: str) -> List[int]:
        """One text to its ids, ``</s>`` last, at most ``text_len`` ids, no padding."""
        if not isinstance(text, str):
            raise TypeError(f"prompts must be str, got {type(text).__name__}")
        if self.clean:
            text = clean_whitespace(text)
        ids = [b + OFFSET for b in text.encode("utf-8")][: self.text_len - 1]
        return ids + [EOS]

    def __call__(self, prompts: Union[str, Sequence[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Texts to ``(ids, mask)``, both int64 ``[B, text_len]``; mask 1 on the valid ids (``</s>`` included)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [self.encode(p) for p in prompts]
        ids = torch.full((len(rows), self.text_len), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), self.text_len), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids, mask
