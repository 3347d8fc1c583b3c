"""The hand-off between the engine and the artifact layer: a document's KV as plain numpy arrays.

The engine (the only module that imports torch) turns a transformers cache into `KvTensors` and back; the
artifact layer slices, chunks, compresses and hashes these arrays without knowing torch exists. Arrays hold
the raw element bits: bf16 and fp16 as uint16, fp32 as uint32, always little-endian, so every byte is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .protocol.errors import FormatError, ModelMismatch

#: dtype name -> (bytes per element, numpy container for the raw bits)
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "bf16": (2, np.dtype("<u2")),
    "fp16": (2, np.dtype("<u2")),
    "fp32": (4, np.dtype("<u4")),
}


@dataclass(frozen=True)
class KvLayout:
    """Shape of a model's KV cache: what a chunk's bytes mean."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise FormatError(f"unknown dtype {self.dtype!r} (expected one of {', '.join(DTYPES)})")
        for name in ("layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 < value <= 65_536:
                raise FormatError(f"layout.{name} must be a positive int, got {value!r}")

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]

    @property
    def raw_dtype(self) -> np.dtype:
        return DTYPES[self.dtype][1]

    @property
    def bytes_per_token(self) -> int:
        """K and V of every layer for one token (147,456 for Qwen3-4B in bf16)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.itemsize

    def to_float(self, bits: np.ndarray) -> np.ndarray:
        """The values of raw element bits as float32 (exact for every dtype: bf16 and fp16 fit in float32).

        For measuring differences between two KV tensors (audits, `kvswap exact`), never for storing them."""
        bits = np.asarray(bits, dtype=self.raw_dtype)
        if self.dtype == "bf16":
            return (bits.astype("<u4") << 16).view("<f4")
        if self.dtype == "fp16":
            return bits.view("<f2").astype(np.float32)
        return bits.view("<f4").astype(np.float32)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim, "dtype": self.dtype}

@dataclass
class KvTensors:
    """A document's KV cache for an exact token sequence.

    keys[i] and values[i] have shape [kv_heads, tokens, head_dim] and dtype `layout.raw_dtype` (raw bits).
    `last_logits` (float32 [vocab], optional) are the logits at the last document position: with them the
    first generated token needs no forward pass, which is what makes reuse bitwise exact (measured in fp32,
    bf16 and fp16 on tiny-qwen3 and SmolLM2: tests/test_engine.py checks it).
    """

    layout: KvLayout
    token_ids: list[int]
    keys: list[np.ndarray]
    values: list[np.ndarray]
    last_logits: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def check_shapes(self) -> None:
        """Raise ModelMismatch unless every array matches the layout and the token count."""
        lay = self.layout
        want = (lay.kv_heads, self.n_tokens, lay.head_dim)
        if len(self.keys) != lay.layers or len(self.values) != lay.layers:
            raise ModelMismatch(f"expected {lay.layers} layers of K and V, got {len(self.keys)}/{len(self.values)}")
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            for name, arr in (("K", k), ("V", v)):
                if arr.shape != want or arr.dtype != lay.raw_dtype:
                    raise ModelMismatch(
                        f"layer {i} {name}: expected {want} {lay.raw_dtype}, got {arr.shape} {arr.dtype}"
                    )

    def nbytes(self) -> int:
        return self.n_tokens * self.layout.bytes_per_token
