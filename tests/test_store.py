"""The local store on a real filesystem and real SQLite: registration before chunks, verification on write
and read, shared chunks and refcounts, pins, LRU eviction, fsck and repair, export/import, threads."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from kvswap.artifact.pipeline import assemble_kv, publish_kv
from kvswap.artifact.signing import NodeKey, TrustPolicy
from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import FormatError, IntegrityError, NotFound, UntrustedSigner, UsageError
from kvswap.kvtensors import KvLayout, KvTensors
from kvswap.store import EXPORT_MAGIC, Store

LAYOUT = KvLayout(layers=2, kv_heads=2, head_dim=8, dtype="bf16")


def synthetic_kv(n_tokens: int, seed: int = 0, token_ids=None) -> KvTensors:
    rng = np.random.default_rng(seed)
    shape = (LAYOUT.kv_heads, n_tokens, LAYOUT.head_dim)

    def arr():
        return (rng.normal(0, 1, shape).astype(np.float32).view(np.uint32) >> 16).astype("<u2")

    ids = list(token_ids) if token_ids is not None else [int(t) for t in rng.integers(0, 50_000, n_tokens)]
    return KvTensors(LAYOUT, ids, [arr() for _ in range(2)], [arr() for _ in range(2)],
                     rng.normal(0, 1, 16).astype(np.float32))


def make(n_tokens=50, seed=0, doc="ef", token_ids=None):
    manifest, chunks = publish_kv(synthetic_kv(n_tokens, seed, token_ids), model_id="m",
                                  model_fingerprint="ab" * 32, tokenizer_fingerprint="cd" * 32,
                                  document_hash=doc * 32, block_tokens=16)
    return manifest, list(chunks)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as s:
        yield s


@pytest.fixture
def key():
    return NodeKey.generate()


def test_register_then_fill_then_read(store, key):
    manifest, chunks = make()
    assert store.put_manifest(manifest, [key.sign_manifest(manifest.cid)])
    assert not store.put_manifest(manifest)  # idempotent
    assert store.missing_chunks(manifest.cid) == [c for c, _ in chunks]
    assert not store.is_complete(manifest.cid)
    assert store.list_artifacts()[0]["complete"] is False
    for cid, data in chunks[:-1]:
        assert store.put_chunk(cid, data)
    assert store.missing_chunks(manifest.cid) == [chunks[-1][0]]
    store.put_chunk(*chunks[-1])
    assert not store.put_chunk(*chunks[-1])
    assert store.is_complete(manifest.cid) and store.list_artifacts()[0]["complete"] is True
    assert store.get_manifest(manifest.cid) == manifest
    assert [e.signer for e in store.get_envelopes(manifest.cid)] == [key.public_bytes]
    kv = assemble_kv(manifest, store.read_chunk)
    assert kv.n_tokens == 50 and kv.last_logits is not None
    assert store.chunk_path(chunks[0][0]).read_bytes() == chunks[0][1]
    assert store.find_by_document("ab" * 32, "ef" * 32) == [manifest.cid]
    assert store.find_by_document("ab" * 32, "00" * 32) == []


def test_put_chunk_verifies_before_anything_is_visible(store):
    manifest, chunks = make()
    store.put_manifest(manifest)
    cid, data = chunks[0]
    with pytest.raises(IntegrityError):
        store.put_chunk(cid, bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(IntegrityError):
        store.put_chunk(cid, data[:-1])
    with pytest.raises(NotFound):
        store.put_chunk(Cid.of(b"stray"), b"stray")
    assert not store.has_chunk(cid)
    assert list(store.chunks_dir.iterdir()) == [] and list(store.tmp_dir.iterdir()) == []


def test_corrupted_file_is_caught_on_read_and_by_fsck(store):
    manifest, chunks = make()
    store.put_artifact(manifest, [], chunks)
    cid, data = chunks[1]
    path = store.chunk_path(cid)
    path.write_bytes(bytes([data[0] ^ 0x40]) + data[1:])
    with pytest.raises(IntegrityError, match="corrupted"):
        store.read_chunk(cid)
    with pytest.raises(IntegrityError):
        assemble_kv(manifest, store.read_chunk)
    report = store.fsck()
    assert not report["ok"] and any("does not match" in p for p in report["problems"])
    repaired = store.fsck(repair=True)
    assert repaired["ok"] and repaired["repaired"]
    assert store.missing_chunks(manifest.cid) == [cid] and not store.list_artifacts()[0]["complete"]
    store.put_chunk(cid, data)  # a re-fetch heals it
    assert store.fsck()["ok"] and store.is_complete(manifest.cid)


def test_shared_chunks_are_refcounted(store):
    ids = list(range(500, 600))
    long, long_chunks = make(100, token_ids=ids)
    kv = synthetic_kv(100, token_ids=ids)
    short_kv = KvTensors(LAYOUT, ids[:40], [k[:, :40].copy() for k in kv.keys], [v[:, :40].copy() for v in kv.values])
    short, short_chunks_it = publish_kv(short_kv, model_id="m", model_fingerprint="ab" * 32,
                                        tokenizer_fingerprint="cd" * 32, document_hash="11" * 32, block_tokens=16)
    short_chunks = list(short_chunks_it)
    store.put_artifact(long, [], long_chunks)
    store.put_manifest(short)
    shared = [c.cid for c in short.chunks[:2]]
    assert shared == [c.cid for c in long.chunks[:2]]
    # the shared chunks are already here: only the short document's own last chunk is missing
    assert store.missing_chunks(short.cid) == [short.chunks[2].cid]
    for cid, data in short_chunks:
        store.put_chunk(cid, data)
    assert store.fsck()["ok"]
    store.remove(long.cid)
    assert all(store.has_chunk(c) for c in shared)  # still used by the short artifact
    assert not store.has_chunk(long.chunks[-1].cid)
    assert assemble_kv(short, store.read_chunk).n_tokens == 40
    store.remove(short.cid)
    assert list(store.chunks_dir.iterdir()) == []
    assert store.fsck()["ok"] and store.usage() == 0


def test_gc_evicts_lru_unpinned_complete_artifacts(store):
    arts = []
    for seed in range(4):
        manifest, chunks = make(50, seed=seed, doc=f"{seed}{seed}")
        store.put_artifact(manifest, [], chunks)
        arts.append(manifest)
        time.sleep(0.01)
    incomplete, _ = make(50, seed=9, doc="99")
    store.put_manifest(incomplete)
    store.pin(arts[0].cid)
    store.touch(arts[1].cid)  # now the most recently used
    budget = arts[0].stored_size + arts[1].stored_size
    result = store.gc(budget=budget)
    assert result["evicted"] == [str(arts[2].cid), str(arts[3].cid)]
    assert store.has_artifact(arts[0].cid) and store.has_artifact(arts[1].cid) and store.has_artifact(incomplete.cid)
    assert result["after"] == budget
    assert store.gc(budget=0)["evicted"] == [str(arts[1].cid)]  # the pinned one stays, whatever the budget
    with pytest.raises(UsageError):
        store.remove(arts[0].cid)
    store.unpin(arts[0].cid)
    assert store.gc(budget=0)["evicted"] == [str(arts[0].cid)]
    assert store.fsck()["ok"]


def test_fsck_reports_and_repairs_leftovers(store):
    manifest, chunks = make()
    store.put_artifact(manifest, [], chunks)
    (store.tmp_dir / "x.part").write_bytes(b"half a chunk")
    stray = Cid.of(b"unreferenced")
    (store.chunks_dir / str(stray)).write_bytes(b"unreferenced")
    with store._tx() as db:
        db.execute("UPDATE chunks SET refcount = 7 WHERE cid = ?", (str(chunks[0][0]),))
    report = store.fsck()
    assert not report["ok"]
    assert any("refcount" in p for p in report["problems"])
    assert any("temp file" in g for g in report["garbage"]) and any("unreferenced" in g for g in report["garbage"])
    assert store.fsck(repair=True)["ok"]
    clean = store.fsck()
    assert clean["ok"] and not clean["problems"] and not clean["garbage"]
    assert assemble_kv(manifest, store.read_chunk).n_tokens == 50


def test_export_import_round_trip_and_policy(tmp_path, store, key):
    manifest, chunks = make()
    store.put_artifact(manifest, [key.sign_manifest(manifest.cid)], chunks)
    out = tmp_path / "a.kvx"
    info = store.export_artifact(manifest.cid, out)
    assert out.read_bytes().startswith(EXPORT_MAGIC) and info["bytes"] == out.stat().st_size
    with Store(tmp_path / "other") as other:
        with pytest.raises(UntrustedSigner):
            other.import_artifact(out, TrustPolicy(frozenset()))
        assert not other.list_artifacts()  # nothing left behind
        got = other.import_artifact(out, TrustPolicy(frozenset({key.public_bytes})))
        assert got.cid == manifest.cid and other.is_complete(manifest.cid)
        assert other.fsck()["ok"]
        assert assemble_kv(got, other.read_chunk).n_tokens == 50


def test_import_rejects_tampered_files_and_rolls_back(tmp_path, store, key):
    manifest, chunks = make()
    store.put_artifact(manifest, [key.sign_manifest(manifest.cid)], chunks)
    out = tmp_path / "a.kvx"
    store.export_artifact(manifest.cid, out)
    good = out.read_bytes()
    policy = TrustPolicy(frozenset({key.public_bytes}))
    last_blob = good.rfind(chunks[-1][1])
    cases = {
        "flipped chunk byte": (good[: last_blob + 3] + bytes([good[last_blob + 3] ^ 1]) + good[last_blob + 4:], IntegrityError),
        "truncated": (good[:-20], FormatError),
        "trailing garbage": (good + b"x", FormatError),
        "bad magic": (b"NOTKVSWP" + good[8:], FormatError),
    }
    for name, (data, exc) in cases.items():
        with Store(tmp_path / f"imp-{len(data)}-{name[:3]}") as other:
            with pytest.raises(exc):
                other.import_artifact(io.BytesIO(data), policy)
            assert not other.list_artifacts(), name
            assert other.fsck()["ok"]


def test_concurrent_writers_from_threads(store):
    manifests = [make(64, seed=s, doc=f"{s}{s}") for s in range(4)]
    for manifest, _ in manifests:
        store.put_manifest(manifest)
    errors = []

    def fill(chunks):
        try:
            for cid, data in chunks:
                store.put_chunk(cid, data)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=fill, args=(chunks,)) for _, chunks in manifests]
    threads += [threading.Thread(target=fill, args=(list(reversed(chunks)),)) for _, chunks in manifests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert all(store.is_complete(m.cid) for m, _ in manifests)
    assert all(a["complete"] for a in store.list_artifacts())
    assert store.fsck()["ok"]
