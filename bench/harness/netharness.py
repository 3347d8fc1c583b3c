"""Helpers for network-layer tests: a small on-disk artifact store that speaks the node's Service and
FetchTarget contracts, artifact builders, and a runner for a net-layer node in a real subprocess.

`DirArtifacts` keeps chunk files named by CID (temp file + rename) and manifests in a folder; its "manifest" is
a canonical msgpack map (model fingerprint, document hash, dtype, n_tokens, chunk list) whose CID is the hash
of its bytes, exactly the properties node/fetch.py relies on. `corrupt=True` makes it serve flipped bytes
(a lying provider); `die_after` makes it stop the process after serving that many chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

import msgpack

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import FormatError, NotFound
from kvswap.node.fetch import VerifiedManifest
from kvswap.node.fetchplan import FetchBlob
from kvswap.protocol.messages import GenerateRequest, GenerateResponse

REPO = Path(__file__).resolve().parents[2]


def make_artifact(n_chunks: int = 4, chunk_bytes: int = 64 * 1024, block_tokens: int = 16,
                  model: str = "aa" * 32, seed: int = 0) -> tuple[bytes, list[bytes], str]:
    """(manifest bytes, chunk payloads, document hash) of a synthetic artifact with distinct chunks."""
    chunks = []
    for i in range(n_chunks):
        block = hashlib.sha256(f"{seed}/{i}".encode()).digest()
        chunks.append((block * (chunk_bytes // 32 + 1))[:chunk_bytes])
    doc_hash = hashlib.sha256(f"document {seed}".encode()).hexdigest()
    manifest = msgpack.packb(
        {
            "model_fingerprint": model,
            "document_hash": doc_hash,
            "dtype": "bf16",
            "n_tokens": n_chunks * block_tokens,
            "chunks": [[Cid.of(c).to_bytes(), i * block_tokens, (i + 1) * block_tokens, len(c)]
                       for i, c in enumerate(chunks)],
        },
        use_bin_type=True,
    )
    return manifest, chunks, doc_hash


def parse_manifest(manifest: bytes, envelopes: Sequence[bytes] = ()) -> VerifiedManifest:
    try:
        d = msgpack.unpackb(manifest, raw=False)
        blobs = tuple(FetchBlob(Cid.from_bytes(c), s, e, n) for c, s, e, n in d["chunks"])
        return VerifiedManifest(
            cid=Cid.of(manifest), manifest=manifest, envelopes=tuple(envelopes),
            model_fingerprint=d["model_fingerprint"], document_hash=d["document_hash"], dtype=d["dtype"],
            n_tokens=d["n_tokens"], blobs=blobs,
        )
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise FormatError(f"bad test manifest: {exc}") from exc


class DirArtifacts:
    """Service + FetchTarget over a folder. Thread-safe (a lock around the manifest index)."""

    def __init__(self, root: Path, corrupt: bool = False, die_after: int | None = None) -> None:
        self.root = Path(root)
        (self.root / "chunks").mkdir(parents=True, exist_ok=True)
        (self.root / "manifests").mkdir(parents=True, exist_ok=True)
        self.corrupt = corrupt
        self.die_after = die_after
        self.served = 0
        self._lock = threading.Lock()

    # --- publishing -----------------------------------------------------------------------------------
    def add(self, manifest: bytes, chunks: Sequence[bytes]) -> VerifiedManifest:
        verified = parse_manifest(manifest)
        for c in chunks:
            self.put_chunk(Cid.of(c), c)  # Cid.of: content addressed by construction
        self.put_manifest(verified)
        return verified

    # --- FetchTarget ----------------------------------------------------------------------------------
    def verify_manifest(self, manifest: bytes, envelopes: Sequence[bytes], attestations: bytes = b"",
                        accept_any: bool = False) -> VerifiedManifest:
        return parse_manifest(manifest, envelopes)

    def has_chunk(self, cid: Cid) -> bool:
        return (self.root / "chunks" / str(cid)).exists()

    def put_chunk(self, cid: Cid, data: bytes) -> None:
        # node/fetch.py verified the bytes against `cid` already; a store need not hash them twice
        path = self.root / "chunks" / str(cid)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def put_manifest(self, verified: VerifiedManifest) -> None:
        with self._lock:
            (self.root / "manifests" / str(verified.cid)).write_bytes(verified.manifest)

    # --- Service --------------------------------------------------------------------------------------
    def manifest(self, key):
        if isinstance(key, Cid):
            path = self.root / "manifests" / str(key)
            return (path.read_bytes(), [b"envelope"]) if path.exists() else None
        with self._lock:
            for path in (self.root / "manifests").iterdir():
                v = parse_manifest(path.read_bytes())
                if (v.model_fingerprint, v.document_hash) == (key.model_fingerprint, key.document_hash):
                    return v.manifest, [b"envelope"]
        return None

    def read_chunk(self, cid: Cid) -> bytes | None:
        path = self.root / "chunks" / str(cid)
        if not path.exists():
            return None
        self.served += 1
        if self.die_after is not None and self.served > self.die_after:
            os._exit(3)  # the provider dies mid-transfer
        data = path.read_bytes()
        if self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data

    def chunk_path(self, cid: Cid) -> Path | None:
        if self.corrupt or self.die_after is not None:
            return None  # misbehaviour is simulated in read_chunk
        path = self.root / "chunks" / str(cid)
        return path if path.exists() else None

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        if self.manifest(request.artifact_cid) is None:
            raise NotFound(f"no artifact {request.artifact_cid.short()} here")
        tokens = tuple((sum(request.suffix_ids) + i) % 1000 for i in range(request.max_new_tokens))
        return GenerateResponse(tokens=tokens, text=" ".join(map(str, tokens)), timings=(("decode_s", 0.001),))


def chunks_of(root: Path) -> set[str]:
    return {p.name for p in (Path(root) / "chunks").iterdir() if not p.name.count(".tmp")}


# --- a node in a real subprocess ------------------------------------------------------------------------


class SubprocessNode:
    """`python -m bench.harness.netharness serve OPTIONS_JSON` in a child process; reads its addrs from stdout.

    `real_store=True` publishes a signed artifact of random KV through the real artifact pipeline into a
    kvswap.store.Store (chunk size = block_tokens x 32 KiB per token) instead of the synthetic DirArtifacts.
    `ration=False` serves every fetcher at once (node/ration.py off): a benchmark that fetches the same
    artifact again and again from one provider measures the transport, not the rationing patience.
    """

    def __init__(self, home: Path, seed: int, *, n_chunks: int = 4, chunk_bytes: int = 64 * 1024,
                 corrupt: bool = False, die_after: int | None = None, bootstrap: Sequence[str] = (),
                 dataplane: bool = True, publish: bool = True, real_store: bool = False,
                 ration: bool = True) -> None:
        options = dict(home=str(home), seed=seed, n_chunks=n_chunks, chunk_bytes=chunk_bytes, corrupt=corrupt,
                       die_after=die_after, bootstrap=list(bootstrap), dataplane=dataplane, publish=publish,
                       real_store=real_store, ration=ration)
        args = [sys.executable, "-m", "bench.harness.netharness", "serve", json.dumps(options)]
        self.proc = subprocess.Popen(args, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            raise RuntimeError(f"subprocess node failed to start: {err[-2000:]}")
        info = json.loads(line)
        self.peer_id: str = info["peer_id"]
        self.addrs: list[str] = info["addrs"]
        self.cid: str | None = info.get("cid")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the child exits when its stdin closes
                self.proc.wait(5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


def real_store_artifact(store, seed: bytes, n_chunks: int, chunk_bytes: int):
    """Publish a signed artifact of random bf16 KV (incompressible: stored raw) into a real Store."""
    import numpy as np

    from kvswap.artifact.pipeline import publish_kv
    from kvswap.artifact.signing import NodeKey
    from kvswap.kvtensors import KvLayout, KvTensors

    layout = KvLayout(layers=8, kv_heads=8, head_dim=128, dtype="bf16")  # 32 KiB per token
    block = max(1, chunk_bytes // layout.bytes_per_token)
    n_tokens = block * n_chunks
    rng = np.random.default_rng(1)
    shape = (layout.kv_heads, n_tokens, layout.head_dim)
    kv = KvTensors(layout, list(range(n_tokens)),
                   [rng.integers(0, 1 << 16, shape, dtype=np.uint16) for _ in range(layout.layers)],
                   [rng.integers(0, 1 << 16, shape, dtype=np.uint16) for _ in range(layout.layers)],
                   rng.standard_normal(64).astype(np.float32))
    manifest, chunks = publish_kv(kv, model_id="bench", model_fingerprint="ab" * 32, tokenizer_fingerprint="cd" * 32,
                                  document_hash=hashlib.sha256(b"bench").hexdigest(), codec="raw",
                                  block_tokens=block)
    store.put_artifact(manifest, [NodeKey(seed).sign_manifest(manifest.cid)], chunks)
    return manifest


def _serve_main(options_json: str) -> None:
    import trio

    from kvswap.node.net import TrioNode
    from kvswap.node.p2p import P2PConfig
    from kvswap.node.ration import UploadRation
    from kvswap.node.tuning import RationTuning

    o = json.loads(options_json)
    seed = bytes([o["seed"]]) * 32
    if o["real_store"]:
        from kvswap.artifact.signing import TrustPolicy
        from kvswap.node.storeadapter import StoreArtifacts
        from kvswap.store import Store

        store = StoreArtifacts(Store(Path(o["home"])), TrustPolicy(frozenset(), accept_any=True))
        cid = real_store_artifact(store.store, seed, o["n_chunks"], o["chunk_bytes"]).cid if o["publish"] else None
        provide = None
    else:
        store = DirArtifacts(Path(o["home"]), corrupt=o["corrupt"], die_after=o["die_after"])
        manifest, chunks, _ = make_artifact(o["n_chunks"], o["chunk_bytes"])
        verified = store.add(manifest, chunks) if o["publish"] else None
        cid = verified.cid if verified else None
        provide = verified

    async def main() -> None:
        node = TrioNode(P2PConfig(seed=seed, bootstrap=o["bootstrap"]), service=store, target=store,
                        use_dataplane=o["dataplane"], ration=UploadRation(RationTuning(copies=0)) if not o["ration"] else None)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            if provide is not None:
                node.provide_artifact(provide.cid, provide.model_fingerprint, provide.document_hash,
                                      [b.cid for b in provide.blobs])
            print(json.dumps({"peer_id": node.peer_id, "addrs": node.addrs, "cid": str(cid) if cid else None}),
                  flush=True)
            # run until the parent closes our stdin or kills us
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

    trio.run(main)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        _serve_main(sys.argv[2])
    else:
        print("usage: python -m bench.harness.netharness serve OPTIONS_JSON")
        sys.exit(2)
