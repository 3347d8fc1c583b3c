"""Fetch a real signed artifact (artifact pipeline + SQLite store) between real libp2p hosts on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from kvswap.artifact.pipeline import assemble_kv, publish_kv
from kvswap.artifact.signing import NodeKey, TrustPolicy
from kvswap.protocol.cid import sha256_hex
from kvswap.protocol.errors import UntrustedSigner
from kvswap.kvtensors import KvLayout, KvTensors
from kvswap.protocol.keys import DocumentKey
from kvswap.node.net import TrioNode
from kvswap.node.p2p import P2PConfig, peer_id_of_seed
from kvswap.node.storeadapter import StoreArtifacts
from kvswap.protocol.names import document_key
from kvswap.store import Store

pytestmark = pytest.mark.timeout(120)

PUB_SEED, ME_SEED = b"\x41" * 32, b"\x42" * 32
MODEL = "ab" * 32


def make_kv(n_tokens: int = 100) -> KvTensors:
    rng = np.random.default_rng(7)
    layout = KvLayout(layers=2, kv_heads=2, head_dim=16, dtype="bf16")
    shape = (layout.kv_heads, n_tokens, layout.head_dim)
    return KvTensors(
        layout=layout,
        token_ids=list(range(1, n_tokens + 1)),
        keys=[rng.integers(0, 1 << 16, shape, dtype=np.uint16) for _ in range(layout.layers)],
        values=[rng.integers(0, 1 << 16, shape, dtype=np.uint16) for _ in range(layout.layers)],
        last_logits=rng.standard_normal(50).astype(np.float32),
    )


def publish(store: Store, kv: KvTensors):
    manifest, chunks = publish_kv(kv, model_id="test-model", model_fingerprint=MODEL, tokenizer_fingerprint="cd" * 32,
                                  document_hash=sha256_hex(b"the document"), block_tokens=16)
    store.put_artifact(manifest, [NodeKey(PUB_SEED).sign_manifest(manifest.cid)], chunks)
    return manifest


def test_signed_artifact_fetched_into_a_real_store_and_reassembled(tmp_path):
    kv = make_kv()
    pub_store, my_store = Store(tmp_path / "pub"), Store(tmp_path / "me")
    manifest = publish(pub_store, kv)
    trusting = TrustPolicy(frozenset({NodeKey(PUB_SEED).public_bytes, NodeKey(ME_SEED).public_bytes}))

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                pub = TrioNode(P2PConfig(seed=PUB_SEED), service=StoreArtifacts(pub_store, trusting),
                               target=StoreArtifacts(pub_store, trusting))
                me = TrioNode(P2PConfig(seed=ME_SEED), service=StoreArtifacts(my_store, trusting),
                              target=StoreArtifacts(my_store, trusting))
                await nursery.start(pub.run)
                await nursery.start(me.run)
                # one key: the publisher's peer id is derived from the seed that signed the manifest
                assert pub.peer_id == peer_id_of_seed(PUB_SEED)
                await me.p2p.connect(pub.addrs[0])

                # a prefix first (tokens 0..40 -> 3 blocks of 16), then the rest resumes from it
                part = await me.fetcher.fetch(manifest.cid, n_tokens=40)
                assert part.chunks_fetched == 3 and not my_store.is_complete(manifest.cid)
                full = await me.fetcher.fetch(DocumentKey(manifest.document_hash, MODEL),
                                              expect_model=MODEL, expect_dtype="bf16")
                assert full.cid == manifest.cid
                assert full.chunks_present == 3 and full.chunks_fetched == len(manifest.blobs()) - 3
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert my_store.is_complete(manifest.cid)
    assert my_store.get_manifest_bytes(manifest.cid) == manifest.canonical_bytes
    assert len(my_store.get_envelopes(manifest.cid)) == 1
    back = assemble_kv(my_store.get_manifest(manifest.cid), my_store.read_chunk)
    for a, b in zip(back.keys + back.values, kv.keys + kv.values):
        assert np.array_equal(a, b)
    assert np.array_equal(back.last_logits, kv.last_logits)


def test_untrusted_signer_is_refused_before_any_chunk(tmp_path):
    pub_store, my_store = Store(tmp_path / "pub"), Store(tmp_path / "me")
    manifest = publish(pub_store, make_kv(40))
    only_me = TrustPolicy(frozenset({NodeKey(ME_SEED).public_bytes}))

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                pub = TrioNode(P2PConfig(seed=PUB_SEED), service=StoreArtifacts(pub_store, only_me))
                me = TrioNode(P2PConfig(seed=ME_SEED), target=StoreArtifacts(my_store, only_me))
                await nursery.start(pub.run)
                await nursery.start(me.run)
                await me.p2p.connect(pub.addrs[0])
                with pytest.raises(UntrustedSigner):
                    await me.fetcher.fetch(manifest.cid)
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert not my_store.has_artifact(manifest.cid)
    assert not any(my_store.chunks_dir.iterdir())


def test_store_holdings_are_provided_at_start(tmp_path):
    """A node started on a store advertises what it holds without being told: another node finds it."""
    pub_store, my_store = Store(tmp_path / "pub"), Store(tmp_path / "me")
    manifest = publish(pub_store, make_kv(40))
    policy = TrustPolicy(frozenset(), accept_any=True)

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                me = TrioNode(P2PConfig(seed=ME_SEED), target=StoreArtifacts(my_store, policy))
                await nursery.start(me.run)
                pub = TrioNode(P2PConfig(seed=PUB_SEED, bootstrap=[me.addrs[0]]),
                               service=StoreArtifacts(pub_store, policy))
                await nursery.start(pub.run)
                found: list[str] = []
                for _ in range(60):
                    found = await me.p2p.find_providers(str(manifest.chunks[1].cid))
                    if pub.peer_id in found:
                        break
                    await trio.sleep(0.25)
                assert pub.peer_id in found
                assert pub.peer_id in await me.p2p.find_providers(
                    document_key(MODEL, manifest.document_hash))
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_facade_with_real_store_and_ledger(tmp_path):
    """The daemon's wiring end to end: Network + StoreArtifacts + Ledger, fetch and hosted generation."""
    import asyncio

    from kvswap.ledger import Ledger
    from kvswap.node.net import Network
    from kvswap.protocol.messages import GenerateRequest, GenerateResponse

    pub_store, my_store = Store(tmp_path / "pub"), Store(tmp_path / "me")
    manifest = publish(pub_store, make_kv(64))
    policy = TrustPolicy(frozenset({NodeKey(PUB_SEED).public_bytes}))

    def hosted(request: GenerateRequest) -> GenerateResponse:
        return GenerateResponse(tokens=tuple(request.suffix_ids[::-1]), text="ok", timings=(("decode_s", 0.01),))

    async def main():
        pub_ledger, my_ledger = Ledger(tmp_path / "pub.sqlite"), Ledger(tmp_path / "me.sqlite")
        pub, me = Network(), Network()
        await pub.start(seed=PUB_SEED, service=StoreArtifacts(pub_store, policy, generate=hosted),
                        on_transfer=lambda e: pub_ledger.transfer(**e.as_ledger_kwargs()))
        await me.start(seed=ME_SEED, target=StoreArtifacts(my_store, policy), bootstrap=[pub.addrs[0]],
                       on_transfer=lambda e: my_ledger.transfer(**e.as_ledger_kwargs()))
        try:
            result = await me.fetch(DocumentKey(manifest.document_hash, MODEL), expect_model=MODEL)
            assert result.cid == manifest.cid and my_store.is_complete(manifest.cid)
            reply = await me.remote_generate(pub.peer_id, GenerateRequest(manifest.cid, (1, 2, 3), 3))
            assert reply.tokens == (3, 2, 1)
        finally:
            await me.stop()
            await pub.stop()
        rows_in = [r for r in my_ledger.transfers(direction="in") if r.chunk]
        assert sum(r.raw_bytes for r in rows_in) == manifest.stored_size  # every stored byte, once
        served = [r for r in pub_ledger.transfers(direction="out") if r.chunk]
        assert sum(r.raw_bytes for r in served) == manifest.stored_size
        gen = my_ledger.transfers(protocol="/kvswap/generate/1")
        assert [r.direction for r in gen] == ["out", "in"] and len({r.request for r in gen}) == 1

    asyncio.run(asyncio.wait_for(main(), 90))
