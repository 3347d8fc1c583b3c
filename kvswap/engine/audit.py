"""Recompute one block of an artifact's KV over the artifact's own KV of the blocks before it, and measure how
far the stored block is from what this engine computes (the torch half of kvswap/audit.py).

Block i = tokens [t0, t1): a cache holding the stored KV of tokens [0, t0) (adopted from the loaded artifact,
no copy), then one forward of tokens[t0:t1], which is exactly the step a block-aligned prefill ran for that
block (kvswap/engine/core.py). So for an honest artifact made by this engine on the same kind of machine the
recomputed K/V equal the stored bits; a publisher who stored anything else for block i (another document's
KV, a block spliced from another artifact, noise, KV for other tokens) is caught, and if every block agrees
with its own stored prefix the whole KV follows from the tokens by induction. Comparisons run on the engine's
device; only the small statistics come back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .kvload import LoadedKv, cache_from_loaded


@dataclass(frozen=True)
class BlockCheck:
    """How one recomputed block compares with the stored one.

    `rel` is, for each layer and K/V, the RMS of the difference over the RMS of the stored values (0 when
    bit-equal); `tail_rel` compares the last position's logits (only for the artifact's last block when it has
    stored logits): max |difference| over max |stored logit|."""

    index: int
    t0: int
    t1: int
    exact: bool
    rel: tuple[tuple[float, float], ...]  # per layer: (K, V)
    tail_exact: bool | None = None
    tail_rel: float | None = None

    @property
    def worst(self) -> tuple[float, int, str]:
        """(largest relative difference, its layer, "K" or "V")."""
        best = (0.0, 0, "K")
        for layer, (k, v) in enumerate(self.rel):
            for value, kind in ((k, "K"), (v, "V")):
                if value > best[0]:
                    best = (value, layer, kind)
        return best


def _rel(new: torch.Tensor, old: torch.Tensor) -> float:
    if torch.equal(new, old):
        return 0.0
    a, b = new.double(), old.double()
    scale = torch.sqrt(torch.mean(b * b)).item()
    diff = torch.sqrt(torch.mean((a - b) ** 2)).item()
    return diff / scale if scale > 0 else float("inf")


def check_block(engine, loaded: LoadedKv, index: int, t0: int, t1: int) -> BlockCheck:
    """Recompute tokens [t0, t1) over the stored KV of [0, t0) and compare with the stored block."""
    cache = cache_from_loaded(engine.model.config, loaded, t0) if t0 else engine._new_cache()
    logits = engine._forward(loaded.token_ids[t0:t1], cache)
    rel, exact = [], True
    with torch.inference_mode():
        for layer, stored_k, stored_v in zip(cache.layers, loaded.keys, loaded.values):
            pair = []
            for new, old in ((layer.keys[:, :, t0:t1], stored_k[:, :, t0:t1]),
                             (layer.values[:, :, t0:t1], stored_v[:, :, t0:t1])):
                same = torch.equal(new, old)
                exact = exact and same
                pair.append(0.0 if same else _rel(new, old))
            rel.append((pair[0], pair[1]))
    tail_exact = tail_rel = None
    if t1 == loaded.n_tokens and loaded.last_logits is not None:
        stored = np.asarray(loaded.last_logits, dtype=np.float32)
        tail_exact = stored.tobytes() == logits.astype(np.float32).tobytes()
        top = float(np.max(np.abs(stored))) or 1.0
        tail_rel = 0.0 if tail_exact else float(np.max(np.abs(logits.astype(np.float64) - stored))) / top
    return BlockCheck(index, t0, t1, exact, tuple(rel), tail_exact, tail_rel)


__all__ = ["BlockCheck", "check_block"]
