"""`LoadedCache`: a verified artifact loaded into a fresh `transformers.DynamicCache`, what
`kvswap.load_cache` returns. torch is imported only when a method needs it, so `import kvswap` stays cheap."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..protocol.cid import Cid
from ..protocol.errors import UsageError


@dataclass
class LoadedCache:
    """A verified, trust-checked artifact loaded into a fresh `transformers.DynamicCache`.

    `cache` holds the KV of `token_ids` (the document; never re-tokenize it). Continue with
    `model.generate(**loaded.inputs(suffix_ids), max_new_tokens=...)`, which passes the document's ids plus
    your suffix's, an attention mask over both, and the cache (under the keyword this transformers version
    takes); or, without a suffix, take the first token from `last_logits` (the artifact's stored logits at
    the last document position). A cache is grown in place by generation: call `fresh_cache()` for each new
    generation."""

    cid: Cid
    token_ids: list[int]
    last_logits: np.ndarray | None
    cache: Any
    engine: Any = field(repr=False, default=None)
    loaded: Any = field(repr=False, default=None)
    load_s: float = 0.0

    @classmethod
    def of(cls, cid: Cid, engine, loaded) -> "LoadedCache":
        from .kvload import cache_from_loaded

        return cls(cid, list(loaded.token_ids), loaded.last_logits, cache_from_loaded(engine.model.config, loaded),
                   engine, loaded)

    def timed(self, load_s: float) -> "LoadedCache":
        return replace(self, load_s=load_s)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def fresh_cache(self):
        """A new DynamicCache over the same loaded KV (no copy, no re-read)."""
        from .kvload import cache_from_loaded

        return cache_from_loaded(self.engine.model.config, self.loaded)

    def inputs(self, suffix_ids: list[int], cache: Any = None) -> dict:
        """Keyword arguments for `model.generate`: the document's ids + `suffix_ids`, their attention mask, and
        the cache (this one, or the one given). The suffix must hold at least one token."""
        import torch

        if not suffix_ids:
            raise UsageError("give at least one suffix token (without one, the first token is argmax(last_logits))")
        ids = torch.tensor([list(self.token_ids) + list(suffix_ids)], dtype=torch.long, device=self.engine.device)
        # the cache's keyword as this transformers version spells it (`cache` from 5.2x, `past_key_values` before)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                self.engine._cache_kwarg: self.cache if cache is None else cache}


__all__ = ["LoadedCache"]
