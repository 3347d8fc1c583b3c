"""The decode step: one token forward over the cache, in one of three modes.

Why modes: transformers' eager loop with a DynamicCache is launch-bound on a GPU (an H100 ran a Qwen3-4B step
in 33-90 ms, where reading 8 GB of weights once takes ~2.5 ms) and concatenates the whole cache on every
step. A StaticCache keeps fixed-size buffers, and `torch.compile(mode="reduce-overhead")` replays the step
as one CUDA graph (8.9 ms per step measured on the same H100 at 4k context, after a 58 s first compile).

    eager     DynamicCache, model.forward as is (the default; what every CPU path runs)
    static    the prompt is prefilled exactly as in eager mode, then its KV is copied into a StaticCache of a
              bucketed length and the steps run over that (eager kernels, fixed shapes)
    compiled  static, with the step compiled once per bucket (CUDA only: CUDA graphs); a daemon pays the
              compile at start (Engine.warm_up), a one-off CLI command runs eager instead

Exactness (docs/exactness.md): the prompt part (document KV, suffix prefill, first token) is the same
computation in every mode, so fresh and reuse paths stay bitwise identical under one mode; a static or
compiled step is a different computation from an eager one (attention over a padded, masked buffer), so
across modes only tokens are promised, with the logit difference reported.
"""

from __future__ import annotations

import numpy as np
import torch

from ..protocol.errors import UsageError

#: decode modes an engine runs (module docstring)
DECODE_MODES = ("eager", "static", "compiled")
#: smallest static cache length; lengths above it round up to a power of two, so a daemon compiles a few
#: graphs (1k, 2k, 4k, ... up to the model's context) instead of one per prompt length
MIN_STATIC_BUCKET = 1024


def check_mode(mode: str, device: str) -> str:
    if mode not in DECODE_MODES:
        raise UsageError(f"unknown decode mode {mode!r} (expected one of {', '.join(DECODE_MODES)})")
    if mode == "compiled" and not str(device).startswith("cuda"):
        raise UsageError("the compiled decode step needs CUDA (CUDA graphs); use --decode static or eager")
    return mode


def bucket(tokens: int, max_context: int) -> int:
    """The static cache length for a generation that ends at `tokens` (prompt + new tokens)."""
    size = MIN_STATIC_BUCKET
    while size < tokens:
        size *= 2
    return min(size, max(max_context, tokens))


class Stepper:
    """Runs decode steps after a prefilled DynamicCache: `step(token) -> float32 logits` of the next one."""

    def __init__(self, engine, cache, max_new_tokens: int) -> None:
        self.engine = engine
        self.mode = engine.decode_mode
        self.pos = cache.get_seq_length()
        if self.mode == "eager":
            self.cache = cache
            self.forward = None
            return
        from transformers import StaticCache

        length = bucket(self.pos + max_new_tokens, engine.max_context)
        static = StaticCache(config=engine.model.config, max_cache_len=length)
        for dst, src in zip(static.layers, cache.layers):
            dst.update(src.keys, src.values)  # allocates the buffers and copies the prompt's KV to 0..pos-1
        self.cache = static
        self.forward = engine.compiled_forward() if self.mode == "compiled" else engine.model.forward

    def step(self, token: int) -> np.ndarray:
        if self.forward is None:
            return self.engine._forward([token], self.cache)
        dev = self.engine.device
        with torch.inference_mode():
            out = self.forward(
                input_ids=torch.tensor([[token]], dtype=torch.long, device=dev),
                position_ids=torch.tensor([[self.pos]], dtype=torch.long, device=dev),
                **{self.engine._cache_kwarg: self.cache},
                use_cache=True,
                logits_to_keep=1,
            )
        self.pos += 1
        return out.logits[0, -1].float().cpu().numpy()


__all__ = ["DECODE_MODES", "MIN_STATIC_BUCKET", "Stepper", "bucket", "check_mode"]
