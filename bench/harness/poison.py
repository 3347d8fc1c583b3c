"""Poisoned artifacts, built the way a careless or hostile publisher could: real KV from a real engine,
altered, then published and signed with a trusted key through the ordinary Python API. Shared by
tests/test_audit.py and bench/audit.py (which measures how far each lands from the audit's tolerances).

Each poisoning keeps the manifest valid and every CID right (the publisher signs what it stores), so only an
audit that recomputes the KV can tell.
"""

from __future__ import annotations

import numpy as np

from kvswap.artifact.pipeline import publish_kv
from kvswap.document import Document
from kvswap.kvtensors import KvTensors

#: name -> what the publisher did; `make_poisoned` builds each
POISONINGS = {
    "other_document": "KV of another document stored under this document's tokens",
    "swapped_block": "one block swapped in from another document's artifact",
    "noise_1e-2": "relative noise 1e-2 on one layer of one block",
    "noise_1e-3": "relative noise 1e-3 on one layer of one block",
    "edited_tokens": "one token of the manifest edited while the KV stays",
    "replaced_tail": "the last-position logits replaced by another document's",
}
#: one layer's V in one block scaled by (1 + e): a poisoning smaller than any honest cross-machine difference
SCALINGS = (0.005, 0.01, 0.02, 0.05)
for _e in SCALINGS:
    POISONINGS[f"scale_{_e:g}"] = f"one layer's V in one block scaled by {1 + _e:g}"


def _copy(kv: KvTensors, **changes) -> KvTensors:
    fields = dict(layout=kv.layout, token_ids=list(kv.token_ids), keys=[k.copy() for k in kv.keys],
                  values=[v.copy() for v in kv.values],
                  last_logits=None if kv.last_logits is None else kv.last_logits.copy(), meta=dict(kv.meta))
    fields.update(changes)
    return KvTensors(**fields)


def _scaled(layout, bits: np.ndarray, factor: float) -> np.ndarray:
    """bits of values * factor, rounded back to the dtype (round to nearest even)."""
    values = (layout.to_float(bits).astype(np.float64) * factor).astype(np.float32)
    if layout.dtype == "bf16":
        u = values.view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    if layout.dtype == "fp16":
        return values.astype("<f2").view("<u2")
    return values.view("<u4").copy()


def _noisy(layout, bits: np.ndarray, rel: float, rng: np.random.Generator) -> np.ndarray:
    """bits of values * (1 + rel * N(0, 1)), rounded back to the dtype (bf16 by truncation of float32)."""
    values = layout.to_float(bits).astype(np.float64)
    noisy = (values * (1.0 + rel * rng.standard_normal(values.shape))).astype(np.float32)
    if layout.dtype == "bf16":
        u = noisy.view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")  # round to nearest even
    if layout.dtype == "fp16":
        return noisy.astype("<f2").view("<u2")
    return noisy.view("<u4").copy()


def make_poisoned(engine, kind: str, doc_text: str, other_text: str, block_tokens: int, block: int = 2,
                  layer: int = 1, seed: int = 0) -> KvTensors:
    """KvTensors of `doc_text` (prefilled block-aligned, as kvswap publishes) with the poisoning `kind`."""
    ids = engine.tokenize(doc_text)
    kv = engine.prefill(ids, step=block_tokens)
    t0, t1 = block * block_tokens, min((block + 1) * block_tokens, len(ids))
    if kind in ("other_document", "swapped_block", "replaced_tail"):
        other_ids = engine.tokenize(other_text)
        other_ids = (other_ids * (len(ids) // len(other_ids) + 1))[: len(ids)]
        other = engine.prefill(other_ids, step=block_tokens)
        if kind == "other_document":
            return _copy(kv, keys=[k[:, :len(ids)].copy() for k in other.keys],
                         values=[v[:, :len(ids)].copy() for v in other.values])
        if kind == "replaced_tail":
            return _copy(kv, last_logits=other.last_logits.copy())
        out = _copy(kv)
        for mine, theirs in zip(out.keys + out.values, other.keys + other.values):
            mine[:, t0:t1] = theirs[:, t0:t1]
        return out
    if kind.startswith("noise_"):
        rel = float(kind.split("_", 1)[1])
        rng = np.random.default_rng(seed)
        out = _copy(kv)
        out.keys[layer][:, t0:t1] = _noisy(kv.layout, kv.keys[layer][:, t0:t1], rel, rng)
        out.values[layer][:, t0:t1] = _noisy(kv.layout, kv.values[layer][:, t0:t1], rel, rng)
        return out
    if kind.startswith("scale_"):
        out = _copy(kv)
        out.values[layer][:, t0:t1] = _scaled(kv.layout, kv.values[layer][:, t0:t1], 1 + float(kind.split("_", 1)[1]))
        return out
    if kind == "edited_tokens":
        edited = list(ids)
        edited[t0 + 1] = (edited[t0 + 1] + 17) % engine.vocab_size
        return _copy(kv, token_ids=edited)
    raise ValueError(f"unknown poisoning {kind!r}")


def consistent_after(engine, kv: KvTensors, t1: int, block_tokens: int) -> KvTensors:
    """The careful poisoner: recompute every block after token `t1` (and the last logits) over the poisoned
    KV before it, so the only block that does not follow from its stored prefix is the poisoned one, and an
    audit catches it only when it samples that block (the case the detection bound is about)."""
    from kvswap.engine.kvload import cache_from_loaded, load_from_kvtensors
    from kvswap.engine.rawbits import tensor_to_bits

    if t1 >= kv.n_tokens:
        return kv
    cache = cache_from_loaded(engine.model.config, load_from_kvtensors(engine, _copy(kv, last_logits=None), t1), t1)
    logits = engine._prefill(kv.token_ids[t1:], cache, block_tokens)
    keys = [tensor_to_bits(layer.keys[0]) for layer in cache.layers]
    values = [tensor_to_bits(layer.values[0]) for layer in cache.layers]
    return _copy(kv, keys=keys, values=values, last_logits=logits)


def publish(store, key, engine, kv: KvTensors, doc_text: str, block_tokens: int, compute: bool = True):
    """Publish `kv` as the artifact of `doc_text` (its document hash), signed by `key`, declaring this engine's
    compute identity as an honest publisher on this machine would (`compute=False`: a version-1 manifest
    that declares none); the manifest."""
    manifest, chunks = publish_kv(kv, model_id=engine.model_id, model_fingerprint=engine.fingerprint,
                                  tokenizer_fingerprint=engine.tokenizer_fingerprint,
                                  document_hash=Document(doc_text).hash, block_tokens=block_tokens,
                                  compute=engine.compute_identity(kv.meta.get("prefill_step", block_tokens))
                                  if compute else None)
    store.put_artifact(manifest, [key.sign_manifest(manifest.cid)], chunks)
    return manifest


def publish_text(store, key, engine, text: str, block_tokens: int = 64, compute: bool = True):
    """Prefill `text` block-aligned and publish it honestly into `store`, signed by `key` (any key: a test's
    stranger or a second publisher); the manifest. What kvswap.ops.publish_here does, without a home."""
    kv = engine.prefill(engine.tokenize(text), step=block_tokens)
    return publish(store, key, engine, kv, text, block_tokens, compute)
