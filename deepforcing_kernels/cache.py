"""The streaming KV cache and its policies (see issue: cache engine). Placeholder until the engine lands."""
from __future__ import annotations


class CachePolicy:  # pragma: no cover - replaced by the cache engine
    def __init__(self, *a, **kw):
        raise NotImplementedError("CachePolicy is not implemented yet")


class StreamingKVCache:  # pragma: no cover - replaced by the cache engine
    def __init__(self, *a, **kw):
        raise NotImplementedError("StreamingKVCache is not implemented yet")
