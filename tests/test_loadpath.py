"""The load path (kvswap/artifact/loader.py + kvswap/engine/kvload.py): chunks straight into a staging buffer,
every one verified, raw local forms for compressed chunks, and the engine's gather into cache tensors.

The fast path must give exactly the bytes of the reference path (assemble_kv: read, verify, decode, scatter
into per-layer arrays): the same bytes through a different copy route, so bits are the claim here."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvswap.artifact import loader
from kvswap.artifact.pipeline import assemble_kv, publish_kv
from kvswap.artifact.signing import NodeKey
from kvswap.protocol.errors import IntegrityError, NotFound, UsageError
from kvswap.kvtensors import KvLayout, KvTensors
from kvswap.store import Store, local_key_from_seed

LAYOUT = KvLayout(layers=3, kv_heads=2, head_dim=8, dtype="bf16")


def synthetic_kv(n_tokens: int, seed: int = 0) -> KvTensors:
    """bf16-looking KV (normals cut to bf16) so the compressed codecs really compress."""
    rng = np.random.default_rng(seed)
    shape = (LAYOUT.kv_heads, n_tokens, LAYOUT.head_dim)

    def arr():
        return (rng.normal(0, 1, shape).astype(np.float32).view(np.uint32) >> 16).astype("<u2")

    ids = [int(t) for t in rng.integers(0, 50_000, n_tokens)]
    return KvTensors(LAYOUT, ids, [arr() for _ in range(3)], [arr() for _ in range(3)],
                     rng.normal(0, 1, 32).astype(np.float32))


def put(store: Store, kv: KvTensors, codec: str, block_tokens: int = 16):
    manifest, chunks = publish_kv(kv, model_id="m", model_fingerprint="ab" * 32, tokenizer_fingerprint="cd" * 32,
                                  document_hash="ef" * 32, codec=codec, block_tokens=block_tokens)
    store.put_artifact(manifest, [NodeKey.generate().sign_manifest(manifest.cid)], chunks)
    return manifest


@pytest.fixture
def keyed_store(tmp_path):
    with Store(tmp_path / "store", local_key=local_key_from_seed(os.urandom(32))) as s:
        yield s


def _buffer_as_layers(plan: loader.LoadPlan, buf: np.ndarray) -> list[np.ndarray]:
    """Per-layer [K, V] arrays from a staging buffer, by numpy (independent of the engine's gather)."""
    lay, out = plan.manifest.layout, []
    parts = [[] for _ in range(2 * lay.layers)]
    for slot in plan.slots:
        n = slot.ref.n_tokens
        chunk = buf[slot.offset:slot.end].view(lay.raw_dtype).reshape(2 * lay.layers, lay.kv_heads, n, lay.head_dim)
        for i in range(2 * lay.layers):
            parts[i].append(chunk[i])
    for i in range(2 * lay.layers):
        out.append(np.concatenate(parts[i], axis=1)[:, :plan.n_tokens])
    return out


@pytest.mark.parametrize("codec", ["raw", "zstd", "planes", "auto"])
@pytest.mark.parametrize("n_tokens", [None, 16, 37, 1])
def test_staging_buffer_holds_exactly_what_assemble_kv_returns(keyed_store, codec, n_tokens):
    kv = synthetic_kv(50)
    manifest = put(keyed_store, kv, codec)
    plan = loader.LoadPlan.of(manifest, n_tokens)
    assert plan.nbytes == sum(s.ref.raw_size for s in plan.slots)
    for threads in (1, 4):
        buf = loader.load_all(plan, keyed_store, threads=threads)
        ref = assemble_kv(manifest, keyed_store.read_chunk, n_tokens)
        got = _buffer_as_layers(plan, buf)
        want = [a for pair in zip(ref.keys, ref.values) for a in pair]
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    tail = loader.read_tail(manifest, keyed_store)
    assert tail.tobytes() == kv.last_logits.tobytes()


def test_every_damaged_chunk_is_refused(keyed_store, tmp_path):
    manifest = put(keyed_store, synthetic_kv(50), "raw")
    plan = loader.LoadPlan.of(manifest)
    path = keyed_store.chunk_path(manifest.chunks[1].cid)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 3] ^= 0x10
    for bad, error in ((bytes(flipped), IntegrityError), (good[:-2], IntegrityError), (good + b"\0", IntegrityError)):
        path.write_bytes(bad)
        with pytest.raises(error):
            loader.load_all(plan, keyed_store, threads=4)
    # verify="none" trusts what was verified on arrival: a same-size flip goes through (documented)
    path.write_bytes(bytes(flipped))
    assert loader.load_all(plan, keyed_store, verify="none").nbytes == plan.nbytes
    path.unlink()
    with pytest.raises(NotFound):
        loader.load_all(plan, keyed_store)
    with pytest.raises(UsageError, match="verify: unknown value"):
        loader.load_all(plan, keyed_store, verify="crc")


def test_raw_forms_are_kept_used_and_dropped_when_damaged(keyed_store):
    manifest = put(keyed_store, synthetic_kv(64), "planes")
    plan = loader.LoadPlan.of(manifest)
    first = loader.load_all(plan, keyed_store)
    forms = [keyed_store.raw_form(c.cid) for c in manifest.chunks]
    assert all(f is not None for f in forms)
    assert keyed_store.raw_forms_usage() == manifest.raw_size
    # the second load reads the raw forms: it no longer needs the stored (compressed) chunk files
    stored = {c.cid: keyed_store.chunk_path(c.cid).read_bytes() for c in manifest.chunks}
    for c in manifest.chunks:
        keyed_store.chunk_path(c.cid).unlink()
    assert np.array_equal(loader.load_all(plan, keyed_store), first)
    for cid, data in stored.items():
        keyed_store.put_chunk(cid, data)

    # a raw form altered on disk fails its digest: dropped, and the chunk loads from its stored bytes
    victim = manifest.chunks[0].cid
    path, _ = keyed_store.raw_form(victim)
    path.write_bytes(b"\x01" * path.stat().st_size)
    assert np.array_equal(loader.load_all(plan, keyed_store, keep_raw=False), first)
    assert keyed_store.raw_form(victim) is None

    # someone without the home's key rewrites both a raw form and its digest: the MAC does not verify
    other = manifest.chunks[1].cid
    path, _ = keyed_store.raw_form(other)
    import hashlib

    forged = b"\x02" * path.stat().st_size
    path.write_bytes(forged)
    db = keyed_store._db()
    db.execute("UPDATE raw_forms SET raw_sha256 = ? WHERE chunk_cid = ?", (hashlib.sha256(forged).digest(), str(other)))
    assert keyed_store.raw_form(other) is None  # refused, and dropped
    assert np.array_equal(loader.load_all(plan, keyed_store), first)
    assert keyed_store.fsck()["ok"]


def test_raw_forms_need_a_key_and_follow_the_artifact_out(tmp_path):
    with Store(tmp_path / "plain") as plain:
        manifest = put(plain, synthetic_kv(40), "zstd")
        loader.load_all(loader.LoadPlan.of(manifest), plain)
        assert plain.raw_forms_usage() == 0 and not any(plain.raw_dir.iterdir())
    with Store(tmp_path / "keyed", local_key=b"k" * 32) as store:
        manifest = put(store, synthetic_kv(40), "zstd")
        loader.load_all(loader.LoadPlan.of(manifest), store)
        used = store.usage()
        assert used == manifest.stored_size + manifest.raw_size
        # gc drops raw forms (a cache) before it evicts any artifact
        result = store.gc(manifest.stored_size)
        assert result["evicted"] == [] and store.raw_forms_usage() == 0 and store.is_complete(manifest.cid)
        loader.load_all(loader.LoadPlan.of(manifest), store)
        (store.raw_dir / "stray").write_bytes(b"x")
        report = store.fsck()
        assert report["ok"] and any("stray" in g for g in report["garbage"])
        store.fsck(repair=True)
        assert not (store.raw_dir / "stray").exists()
        store.remove(manifest.cid)
        assert store.raw_forms_usage() == 0 and not any(store.raw_dir.iterdir())


def test_engine_gather_and_generation_match_the_reference_path(tiny_engine, tmp_path, doc_text, question_text):
    """Through the real engine: LoadedKv tensors are the stored bits, and generating from them is the same
    computation as generating from assemble_kv's arrays (two-phase oracle, bitwise)."""
    from bench.harness.poison import publish_text
    from kvswap.engine.rawbits import tensor_to_bits
    from kvswap.ops import load_artifact

    with Store(tmp_path / "s", local_key=b"k" * 32) as store:
        manifest = publish_text(store, NodeKey.generate(), tiny_engine, doc_text, 16)
        q_ids = tiny_engine.tokenize(question_text)
        oracle = tiny_engine.generate_two_phase(list(manifest.token_ids), q_ids, 8, stop_at_eos=False)
        for n in (None, 16, manifest.n_tokens - 3):
            loaded = load_artifact(tiny_engine, store, manifest, n)
            ref = assemble_kv(manifest, store.read_chunk, n)
            for mine, theirs in zip(loaded.keys + loaded.values, ref.keys + ref.values):
                assert np.array_equal(tensor_to_bits(mine[0]), theirs)
            assert loaded.n_tokens == ref.n_tokens and (loaded.last_logits is None) == (n is not None)
        loaded = load_artifact(tiny_engine, store, manifest)
        first = tiny_engine.generate_from_loaded(loaded, q_ids, 8, stop_at_eos=False)
        again = tiny_engine.generate_from_loaded(loaded, q_ids, 8, stop_at_eos=False)  # resident: reusable
        assert first.tokens == again.tokens == oracle.tokens
        assert first.first_logits.tobytes() == oracle.first_logits.tobytes()
        plain = tiny_engine.generate_from_loaded(loaded, [], 8, stop_at_eos=False)
        assert plain.tokens == tiny_engine.generate_fresh(list(manifest.token_ids), 8, stop_at_eos=False).tokens
