"""A compact re-derivation of Wan2.1's umT5 encoder forward (``wan/modules/t5.py`` of Wan-Video/Wan2.1:
``T5Encoder`` with ``T5SelfAttention`` blocks, ``T5RelativeEmbedding``, ``T5LayerNorm``, the tanh ``GELU``) and of
``T5EncoderModel.__call__`` (trim to ``seq_lens``) followed by ``WanModel``'s zero padding to ``text_len``. Test
oracle only: it shares no code with transformers or with ``deepforcing_kernels.video``.
"""
import math
from typing import Dict

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + eps)
    if w.dtype in (torch.float16, torch.bfloat16):
        x = x.type_as(w)
    return w * x


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def relative_bucket(rel_pos: torch.Tensor, num_buckets: int, max_dist: int = 128) -> torch.Tensor:
    """``T5RelativeEmbedding._relative_position_bucket`` with ``bidirectional=True``."""
    num_buckets = num_buckets // 2
    rel_buckets = (rel_pos > 0).long() * num_buckets
    rel_pos = torch.abs(rel_pos)
    max_exact = num_buckets // 2
    rel_pos_large = max_exact + (torch.log(rel_pos.float() / max_exact) / math.log(max_dist / max_exact)
                                 * (num_buckets - max_exact)).long()
    rel_pos_large = torch.min(rel_pos_large, torch.full_like(rel_pos_large, num_buckets - 1))
    return rel_buckets + torch.where(rel_pos < max_exact, rel_pos, rel_pos_large)


def pos_bias(table: torch.Tensor, lq: int, lk: int, num_buckets: int) -> torch.Tensor:
    rel_pos = torch.arange(lk).unsqueeze(0) - torch.arange(lq).unsqueeze(1)
    return F.embedding(relative_bucket(rel_pos, num_buckets), table).permute(2, 0, 1).unsqueeze(0)


def attention(x, sd, p, num_heads, mask, bias):
    b = x.size(0)
    q = F.linear(x, sd[p + "q.weight"]).view(b, -1, num_heads, sd[p + "q.weight"].shape[0] // num_heads)
    k = F.linear(x, sd[p + "k.weight"]).view(b, -1, num_heads, q.shape[-1])
    v = F.linear(x, sd[p + "v.weight"]).view(b, -1, num_heads, q.shape[-1])
    attn_bias = x.new_zeros(b, num_heads, q.size(1), k.size(1))
    attn_bias += bias
    attn_bias.masked_fill_(mask.view(b, 1, 1, -1) == 0, torch.finfo(x.dtype).min)
    attn = torch.einsum("binc,bjnc->bnij", q, k) + attn_bias  # T5 does not scale
    attn = F.softmax(attn.float(), dim=-1).type_as(attn)
    x = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, -1, num_heads * q.shape[-1])
    return F.linear(x, sd[p + "o.weight"])


def t5_encoder(sd: Dict[str, torch.Tensor], ids, mask, *, num_heads, num_layers, num_buckets, shared_pos):
    x = F.embedding(ids, sd["token_embedding.weight"])
    n = x.size(1)
    e = pos_bias(sd["pos_embedding.embedding.weight"], n, n, num_buckets) if shared_pos else None
    for i in range(num_layers):
        p = f"blocks.{i}."
        bias = e if shared_pos else pos_bias(sd[p + "pos_embedding.embedding.weight"], n, n, num_buckets)
        x = x + attention(layer_norm(x, sd[p + "norm1.weight"]), sd, p + "attn.", num_heads, mask, bias)
        y = layer_norm(x, sd[p + "norm2.weight"])
        y = F.linear(y, sd[p + "ffn.fc1.weight"]) * gelu(F.linear(y, sd[p + "ffn.gate.0.weight"]))
        x = x + F.linear(y, sd[p + "ffn.fc2.weight"])
    return layer_norm(x, sd["norm.weight"])


def wan_text_context(sd, ids, mask, text_len, **cfg) -> torch.Tensor:
    """What Wan2.1's DiT receives: ``[u[:v] for u, v in zip(context, seq_lens)]`` zero-padded to text_len."""
    context = t5_encoder(sd, ids, mask, **cfg)
    seq_lens = mask.gt(0).sum(dim=1).long()
    trimmed = [u[:v] for u, v in zip(context, seq_lens)]
    return torch.stack([torch.cat([u, u.new_zeros(text_len - u.size(0), u.size(1))]) for u in trimmed])
