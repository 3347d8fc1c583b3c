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
import time
from pathlib import Path
from typing import Sequence

import msgpack

from kvswap.cid import Cid
from kvswap.errors import FormatError, IntegrityError, NotFound
from kvswap.node.fetch import ChunkRef, VerifiedManifest
from kvswap.protocol.messages import GenerateRequest, GenerateResponse

REPO = Path(__file__).resolve().parents[1]


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
        chunks = tuple(ChunkRef(Cid.from_bytes(c), s, e, n) for c, s, e, n in d["chunks"])
        return VerifiedManifest(
            cid=Cid.of(manifest), manifest=manifest, envelopes=tuple(envelopes),
            model_fingerprint=d["model_fingerprint"], document_hash=d["document_hash"], dtype=d["dtype"],
            n_tokens=d["n_tokens"], chunks=chunks,
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
    def verify_manifest(self, manifest: bytes, envelopes: Sequence[bytes]) -> VerifiedManifest:
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
    def manifest_by_cid(self, cid: Cid):
        path = self.root / "manifests" / str(cid)
        return (path.read_bytes(), [b"envelope"]) if path.exists() else None

    def manifest_by_document(self, model_fingerprint: str, document_hash: str):
        with self._lock:
            for path in (self.root / "manifests").iterdir():
                v = parse_manifest(path.read_bytes())
                if (v.model_fingerprint, v.document_hash) == (model_fingerprint, document_hash):
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
        if self.manifest_by_cid(request.artifact_cid) is None:
            raise NotFound(f"no artifact {request.artifact_cid.short()} here")
        tokens = tuple((sum(request.suffix_ids) + i) % 1000 for i in range(request.max_new_tokens))
        return GenerateResponse(tokens=tokens, text=" ".join(map(str, tokens)), timings=(("decode_s", 0.001),))


def chunks_of(root: Path) -> set[str]:
    return {p.name for p in (Path(root) / "chunks").iterdir() if not p.name.count(".tmp")}


# --- a node in a real subprocess ------------------------------------------------------------------------


class SubprocessNode:
    """`python -m tests.netharness serve ...` in a child process; reads its addrs from stdout."""

    def __init__(self, home: Path, seed: int, *, n_chunks: int = 4, chunk_bytes: int = 64 * 1024,
                 corrupt: bool = False, die_after: int | None = None, bootstrap: Sequence[str] = (),
                 dataplane: bool = True, publish: bool = True) -> None:
        args = [sys.executable, "-m", "tests.netharness", "serve", str(home), str(seed),
                str(n_chunks), str(chunk_bytes), "1" if corrupt else "0",
                str(-1 if die_after is None else die_after), "1" if dataplane else "0", "1" if publish else "0",
                *bootstrap]
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


def _serve_main(argv: list[str]) -> None:
    import trio

    from kvswap.node.net import TrioNode
    from kvswap.node.p2p import P2PConfig

    home, seed, n_chunks, chunk_bytes, corrupt, die_after, dataplane, publish, *bootstrap = argv
    die = int(die_after)
    store = DirArtifacts(Path(home), corrupt=corrupt == "1", die_after=None if die < 0 else die)
    manifest, chunks, _ = make_artifact(int(n_chunks), int(chunk_bytes))
    verified = store.add(manifest, chunks) if publish == "1" else None

    async def main() -> None:
        node = TrioNode(P2PConfig(seed=bytes([int(seed)]) * 32, bootstrap=bootstrap), service=store,
                        target=store, use_dataplane=dataplane == "1")
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            if verified is not None:
                node.provide_artifact(verified.cid, verified.model_fingerprint, verified.document_hash,
                                      [c.cid for c in verified.chunks])
            print(json.dumps({"peer_id": node.peer_id, "addrs": node.addrs,
                              "cid": str(verified.cid) if verified else None}), flush=True)
            # run until the parent closes our stdin or kills us
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

    trio.run(main)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "serve":
        _serve_main(sys.argv[2:])
    else:
        print("usage: python -m tests.netharness serve HOME SEED N_CHUNKS CHUNK_BYTES CORRUPT DIE_AFTER DATAPLANE PUBLISH [BOOTSTRAP...]")
        sys.exit(2)
