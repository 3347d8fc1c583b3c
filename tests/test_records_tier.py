"""Keyed BLAKE3 chunk records (kvswap/store.py, the default local check) and the host-memory tier
(kvswap/hosttier.py): every damage is caught with one line and the bytes never used; a record under another
node's key is refused; a store from before records is checked by sha256 once, then recorded; the tier is
dropped with its artifact, never exceeds its budget under concurrent loads, and gives the same bits as a load
from disk."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading

import numpy as np
import pytest

from kvswap.artifact import loader
from kvswap.hosttier import HostTier
from kvswap.modes import Verify
from kvswap.ops.loading import load_kvtensors
from kvswap.protocol.errors import IntegrityError
from kvswap.store import Store, local_key_from_seed
from tests.test_loadpath import put, synthetic_kv


@pytest.fixture
def home_key():
    return local_key_from_seed(os.urandom(32))


@pytest.fixture
def store(tmp_path, home_key):
    with Store(tmp_path / "store", local_key=home_key) as s:
        yield s


@pytest.fixture
def tier(tmp_path):
    return HostTier(tmp_path / "shm" / "tier", budget_bytes=1 << 20)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))


def _records(store: Store) -> int:
    return store._db().execute("SELECT COUNT(*) FROM chunk_records").fetchone()[0]


def test_chunks_are_recorded_when_they_arrive_and_the_default_load_checks_the_records(store):
    manifest = put(store, synthetic_kv(70), "raw")
    assert _records(store) == len(manifest.blobs())  # put_chunk recorded every chunk it verified
    ref = load_kvtensors(store, manifest, verify=Verify.SHA256)
    assert _same(load_kvtensors(store, manifest), ref)  # blake3 (the default) loads the same bits
    assert loader.DEFAULT_VERIFY is Verify.BLAKE3


@pytest.mark.parametrize("where", ["chunk file", "record", "record size"])
def test_a_flipped_byte_is_caught_and_the_bytes_never_used(store, where, caplog):
    manifest = put(store, synthetic_kv(70), "raw")
    victim = manifest.chunks[1].cid
    if where == "chunk file":
        path = store.chunk_path(victim)
        data = bytearray(path.read_bytes())
        data[17] ^= 0x40
        path.chmod(0o644)
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match="does not match its CID") as info:
            load_kvtensors(store, manifest)
        assert "\n" not in str(info.value)
        return
    db = sqlite3.connect(store.db_path)
    if where == "record":
        rec = bytearray(db.execute("SELECT record FROM chunk_records WHERE chunk_cid = ?", (str(victim),)).fetchone()[0])
        rec[0] ^= 1
        db.execute("UPDATE chunk_records SET record = ? WHERE chunk_cid = ?", (bytes(rec), str(victim)))
    else:
        db.execute("UPDATE chunk_records SET size = size + 1 WHERE chunk_cid = ?", (str(victim),))
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING, logger="kvswap.artifact.loader"):
        got = load_kvtensors(store, manifest)  # the record is wrong, the bytes are the CID's: checked by sha256
    assert _same(got, load_kvtensors(store, manifest, verify=Verify.SHA256))
    assert [r.getMessage() for r in caplog.records if "record of chunk" in r.getMessage()]
    assert store.check_record(victim, "stored", [store.read_chunk(victim)]) is True  # recorded again
    assert store.fsck()["ok"]


def test_a_record_written_under_another_nodes_key_is_refused(tmp_path, home_key):
    with Store(tmp_path / "s", local_key=home_key) as mine:
        manifest = put(mine, synthetic_kv(40), "raw")
    with Store(tmp_path / "s", local_key=local_key_from_seed(os.urandom(32))) as theirs:  # another identity
        victim = manifest.chunks[0].cid
        assert theirs.check_record(victim, "stored", [theirs.read_chunk(victim)]) is False
        assert not theirs.fsck()["ok"]  # fsck names the foreign records as problems
        load_kvtensors(theirs, manifest)  # the bytes match their CIDs: loaded, and recorded under this key
        assert theirs.check_record(victim, "stored", [theirs.read_chunk(victim)]) is True


def test_a_store_from_before_records_is_checked_by_sha256_once_then_recorded(store):
    manifest = put(store, synthetic_kv(70), "zstd")
    load_kvtensors(store, manifest)  # writes the raw forms (and records them)
    store._db().execute("DELETE FROM chunk_records")  # as a store written before records existed
    assert _records(store) == 0
    first = load_kvtensors(store, manifest)
    assert _records(store) >= len(manifest.chunks)  # stored and raw forms recorded on the way
    assert _same(first, load_kvtensors(store, manifest))


def test_fsck_checks_records_too(store):
    manifest = put(store, synthetic_kv(40), "raw")
    assert store.fsck()["ok"]
    store._db().execute("UPDATE chunk_records SET record = zeroblob(32) WHERE chunk_cid = ?",
                        (str(manifest.chunks[0].cid),))
    report = store.fsck(repair=True)
    assert any("record does not match" in p for p in report["problems"]) and report["ok"]  # repaired
    assert store.fsck()["ok"]


def test_tier_hits_are_the_bits_of_a_load_from_disk_and_skip_the_store(store, tier):
    store.tier = tier
    manifest = put(store, synthetic_kv(70), "zstd")
    disk = load_kvtensors(store, manifest, tier=tier)  # a miss: loaded and verified, copied into the tier
    tier.flush()
    assert (tier.hits, tier.misses) == (0, 1) and tier.usage() > 0
    for blob in manifest.blobs():  # the store's files are gone: a hit cannot have read them
        store.chunk_path(blob.cid).unlink()
    hit = load_kvtensors(store, manifest, tier=tier)
    assert tier.hits == 1 and _same(hit, disk) and np.array_equal(hit.last_logits, disk.last_logits)


def test_a_tier_entry_goes_with_its_artifact(store, tier):
    store.tier = tier
    manifest = put(store, synthetic_kv(40), "raw")
    load_kvtensors(store, manifest, tier=tier)
    tier.flush()
    assert tier.lookup(manifest.cid, manifest.n_tokens, loader.LoadPlan.of(manifest).nbytes) is not None
    store.remove(manifest.cid)
    assert tier.usage() == 0 and tier.lookup(manifest.cid, manifest.n_tokens, 1) is None


def test_a_prefix_is_its_own_tier_entry(store, tier):
    manifest = put(store, synthetic_kv(70), "raw")
    whole = load_kvtensors(store, manifest, tier=tier)
    first = load_kvtensors(store, manifest, 20, tier=tier)  # the chunks covering 20 tokens: another plan
    tier.flush()
    again = load_kvtensors(store, manifest, 20, tier=tier)
    assert tier.hits == 1 and again.last_logits is None and again.n_tokens == 20
    assert all(np.array_equal(a, b[:, :20]) for a, b in zip(again.keys + again.values, whole.keys + whole.values))
    assert _same(first, again)


def test_the_tier_never_exceeds_its_budget_under_concurrent_loads(tmp_path, store):
    tier = HostTier(tmp_path / "shm2", budget_bytes=3 * 30 * 96 + 1000)  # room for about three 30-token artifacts
    manifests = [put(store, synthetic_kv(30, seed=i), "raw") for i in range(8)]
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], tier.usage())

    def load(m):
        for _ in range(3):
            load_kvtensors(store, m, tier=tier)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=load, args=(m,)) for m in manifests]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    tier.flush()
    stop.set()
    watcher.join()
    assert 0 < peak[0] <= tier.budget and tier.usage() <= tier.budget
    # whether any of the racing loads hit depends on the scheduling (8 artifacts in a budget of ~3): after
    # them, a load kept in the tier is a hit
    load_kvtensors(store, manifests[0], tier=tier)
    tier.flush()
    hits = tier.hits
    load_kvtensors(store, manifests[0], tier=tier)
    assert tier.hits == hits + 1 and tier.usage() <= tier.budget
    for m in manifests:  # and every load, from the tier or not, gave the stored bits
        assert _same(load_kvtensors(store, m, tier=tier), load_kvtensors(store, m, verify=Verify.SHA256))


def test_an_engine_load_from_the_tier_is_views_of_its_pages_and_generates_the_same(tiny_engine, tmp_path, doc_text,
                                                                                 question_text):
    """Through the real engine: a miss is kept, the next load is a hit whose cache tensors are the stored bits,
    and generating from it is the computation a load from disk feeds (bitwise first logits, same tokens)."""
    from bench.harness.poison import publish_text
    from kvswap.artifact.signing import NodeKey
    from kvswap.engine.rawbits import tensor_to_bits
    from kvswap.ops import load_artifact

    tier = HostTier(tmp_path / "tier", budget_bytes=64 << 20)
    with Store(tmp_path / "s", local_key=b"k" * 32) as store:
        store.tier = tier
        manifest = publish_text(store, NodeKey.generate(), tiny_engine, doc_text, 16)
        q_ids = tiny_engine.tokenize(question_text)
        disk = load_artifact(tiny_engine, store, manifest, tier=tier)
        tier.flush()
        hit = load_artifact(tiny_engine, store, manifest, tier=tier)
        assert (disk.meta["tier"], hit.meta["tier"]) == ("miss", "hit")
        for a, b in zip(disk.keys + disk.values, hit.keys + hit.values):
            assert np.array_equal(tensor_to_bits(a[0]), tensor_to_bits(b[0]))
        assert hit.last_logits.tobytes() == disk.last_logits.tobytes()
        from_disk = tiny_engine.generate_from_loaded(disk, q_ids, 8, stop_at_eos=False)
        from_tier = tiny_engine.generate_from_loaded(hit, q_ids, 8, stop_at_eos=False)
        again = tiny_engine.generate_from_loaded(hit, q_ids, 8, stop_at_eos=False)  # the pages were not written
        assert from_tier.tokens == from_disk.tokens == again.tokens
        assert from_tier.first_logits.tobytes() == from_disk.first_logits.tobytes()
        # a problem fsck finds clears the tier: the memory copy may hold what the disk no longer does
        store._db().execute("UPDATE chunks SET stored_size = stored_size + 1 WHERE cid = ?",
                            (str(manifest.chunks[0].cid),))
        assert not store.fsck()["ok"] and tier.usage() == 0
