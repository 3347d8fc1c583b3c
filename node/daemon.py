"""The kvswap daemon: one asyncio process per node that owns the store, the ledger, the engine and the
libp2p network, and answers the CLI on a loopback control API.

Lifecycle (aiohttp web_runner style): `setup()` opens everything and starts listening, `serve()` waits for
a stop request (SIGINT, SIGTERM or POST /stop), `cleanup()` closes in reverse order within
SHUTDOWN_TIMEOUT_S. Background work (engine loading, publish and fetch jobs) lives in one TaskGroup so its
errors surface. Engine work runs in worker threads behind one lock: the model is not re-entrant, and a
hosted generation for a peer and a local one must not interleave.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ..artifact.pipeline import check_compatible
from ..artifact.service import (
    audit_stored,
    check_document,
    generate_from_store,
    home_key,
    load_artifact,
    publish_document,
)
from ..audit import DEFAULT_AUDIT_FRACTION
from ..document import Document
from ..artifact.signing import TrustPolicy
from ..cid import Cid
from ..config import HomeLayout
from ..errors import IntegrityError, KvswapError, ModelMismatch, NotFound, UsageError
from ..ledger import Ledger
from ..protocol.limits import ENGINE_WAIT_S, RESIDENT_KV_SLOTS, SHUTDOWN_TIMEOUT_S
from ..protocol.messages import GenerateRequest, GenerateResponse
from ..store import Store
from . import runfiles
from .announcements import AnnouncementTable
from .api import build_app, check_loopback
from .jobs import Job, JobTable
from .net import Network
from .storeadapter import StoreArtifacts

log = logging.getLogger("kvswap.node")



@dataclass
class NodeConfig:
    home: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    api: str = "127.0.0.1:0"
    model: str | None = None
    dtype: str = "bf16"
    accept_any: bool = False
    decode: str | None = None  # eager | static | compiled; None: compiled on CUDA, eager on the CPU
    audit_fraction: float = DEFAULT_AUDIT_FRACTION  # blocks of each fetched artifact audited before use; 0: off


class Daemon:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.home = Path(config.home)
        self.started = time.time()
        self._stop = asyncio.Event()
        self._engine_lock = threading.Lock()
        self._engine_ready = asyncio.Event()
        self._engine_error: str | None = None
        self.engine: Any = None
        self._resident: OrderedDict[Cid, Any] = OrderedDict()
        self.announcements = AnnouncementTable()  # bounded and expiring: peers may announce anything

    # --- lifecycle --------------------------------------------------------------------------------------
    async def setup(self, group: asyncio.TaskGroup) -> None:
        host, _, port = self.config.api.rpartition(":")
        check_loopback(host)
        HomeLayout(self.home).ensure()
        self.key = home_key(self.home)
        self.store = Store.for_home(self.home)
        self.ledger = Ledger.for_home(self.home)
        self.policy = TrustPolicy.for_home(self.home, node_key=self.key, accept_any=self.config.accept_any)
        self.jobs = JobTable(group)
        self.artifacts = StoreArtifacts(self.store, self.policy, generate=self._hosted_generate)
        self.net = Network()
        await self.net.start(
            seed=self.key.seed, listen_addrs=self.config.listen, bootstrap=self.config.bootstrap,
            service=self.artifacts, target=self.artifacts,
            on_transfer=lambda e: self.ledger.transfer(**e.as_ledger_kwargs()),
            on_announce=self._on_announce,
        )
        token = runfiles.api_token(self.home, create=True)
        self._runner = web.AppRunner(build_app(self, token), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, int(port or 0))
        await site.start()
        sock = site._server.sockets[0]  # the real port when 0 was asked for
        self.api_url = f"http://{host}:{sock.getsockname()[1]}"
        self._engine_task = group.create_task(self._load_engine())
        runfiles.write_node_file(self.home, {
            "pid": os.getpid(), "api": self.api_url, "peer_id": self.net.peer_id, "addrs": self.net.addrs,
            "public_key": self.key.public_hex, "started": self.started,
        })
        log.info("node %s listening on %s, control API %s", self.net.peer_id, " ".join(self.net.addrs), self.api_url)

    async def cleanup(self) -> None:
        runfiles.remove_node_file(self.home)
        for step in (self._runner.cleanup, self.net.stop):
            try:
                await asyncio.wait_for(step(), SHUTDOWN_TIMEOUT_S / 2)
            except (asyncio.TimeoutError, KvswapError) as exc:
                log.warning("shutdown step %s: %r", getattr(step, "__qualname__", step), exc)
        self.ledger.close()
        self.store.close()

    def request_stop(self, why: str) -> None:
        log.info("stopping (%s)", why)
        self._stop.set()

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        try:
            async with asyncio.TaskGroup() as group:
                await self.setup(group)
                try:
                    await self._stop.wait()
                finally:  # the group waits for its tasks: cancel the ones this daemon started
                    if hasattr(self, "jobs"):
                        self.jobs.cancel_running()
                    if hasattr(self, "_engine_task"):
                        self._engine_task.cancel()
            return 0
        finally:
            if hasattr(self, "_runner"):
                await self.cleanup()

    # --- engine -----------------------------------------------------------------------------------------
    async def _load_engine(self) -> None:
        from ..engine import load_engine  # torch loads here, in a worker thread, not at import

        try:
            engine = await asyncio.to_thread(load_engine, self.config.model, self.config.dtype)
            mode = self.config.decode or ("compiled" if engine.device.startswith("cuda") else "eager")
            engine.set_decode_mode(mode)
            if mode != "eager":  # compile (or warm) the decode step now, not on the first request
                warm_s = await asyncio.to_thread(self._with_engine, engine.warm_up)
                log.info("decode step %s warmed up in %.1f s", mode, warm_s)
            self.engine = engine
            await self.net.subscribe(self.engine.fingerprint)
            log.info("model ready: %s %s (fingerprint %s)", self.engine.model_id, self.engine.dtype,
                     self.engine.fingerprint[:16])
        except KvswapError as exc:
            self._engine_error = str(exc)
            log.error("model failed to load: %s", exc)
        finally:
            self._engine_ready.set()

    async def engine_ready(self) -> Any:
        try:
            await asyncio.wait_for(self._engine_ready.wait(), ENGINE_WAIT_S)
        except asyncio.TimeoutError:
            raise NotFound("the node's model is still loading") from None
        if self.engine is None:
            raise NotFound(f"this node has no model: {self._engine_error}")
        return self.engine

    def _with_engine(self, fn, *args, **kw):
        with self._engine_lock:
            return fn(*args, **kw)

    # --- control API operations --------------------------------------------------------------------------
    async def status(self) -> dict:
        info = await self.net.info()
        eng = self.engine
        return {
            "peer_id": self.net.peer_id, "addrs": self.net.addrs, "api": self.api_url, "pid": os.getpid(),
            "public_key": self.key.public_hex,
            "model": eng.model_id if eng else None, "model_fingerprint": eng.fingerprint if eng else None,
            "dtype": eng.dtype if eng else self.config.dtype, "model_error": self._engine_error,
            "artifacts": len(self.store.list_artifacts()), "peers": info.get("peers"),
            "providing": info.get("providing"), "announcements": self.announcements.recent(20),
            "uptime_s": round(time.time() - self.started, 1), "accept_any": self.config.accept_any,
        }

    async def peers(self) -> list[dict]:
        return await self.net.peers()

    async def list_artifacts(self) -> list[dict]:
        return self.store.list_artifacts()

    def start_publish(self, body: dict) -> dict:
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise UsageError("publish needs the document's text")
        codec = body.get("codec", "auto")
        block_tokens = int(body.get("block_tokens") or 64)

        async def work(job: Job) -> dict:
            engine = await self.engine_ready()
            job.progress["stage"] = "prefill"
            result = await asyncio.to_thread(self._with_engine, publish_document, engine, self.store, self.key,
                                             text, codec, block_tokens)
            self.ledger.compute(kind="prefill", seconds=result["prefill_s"], tokens=result["n_tokens"],
                                model=engine.model_id, dtype=engine.dtype, device=engine.device,
                                artifact=result["cid"],
                                extra={"raw_bytes": result["raw_size"], "stored_bytes": result["stored_size"]})
            job.progress["stage"] = "announce"
            cid = Cid.parse(result["cid"])
            manifest = self.store.get_manifest(cid)
            await self.net.provide_artifact(cid, manifest.model_fingerprint, manifest.document_hash,
                                            [b.cid for b in manifest.blobs()])
            await self.net.announce(cid, manifest.model_fingerprint, manifest.document_hash, manifest.n_tokens)
            return result

        return self.jobs.start("publish", work).view()

    def start_fetch(self, body: dict) -> dict:
        n_tokens = body.get("tokens")

        async def work(job: Job) -> dict:
            self._reload_trust()
            if body.get("cid"):
                key: Any = Cid.parse(body["cid"])
                expect_model = None
            elif body.get("document_hash"):
                engine = await self.engine_ready()
                key = (engine.fingerprint, str(body["document_hash"]))
                expect_model = engine.fingerprint
            else:
                raise UsageError("give a CID or a document hash")

            def progress(p) -> None:
                job.progress.update(bytes=p.bytes_done, total_bytes=p.bytes_total, rate_mb_s=p.rate_mb_s,
                                    peers=len(p.peers), chunks=p.chunks_done, chunks_total=p.chunks_total)

            r = await self.net.fetch(key, n_tokens=n_tokens, progress=progress, expect_model=expect_model)
            out = {"cid": str(r.cid), "tokens": r.n_tokens, "chunks": r.chunks_fetched + r.chunks_present,
                   "chunks_fetched": r.chunks_fetched, "bytes": r.bytes_fetched, "seconds": r.seconds,
                   "peers": len(r.providers), "providers": r.providers,
                   "complete": self.store.is_complete(r.cid)}
            job.progress["stage"] = "audit"
            out["audit"] = await self._check_fetched(r.cid, body.get("document"))
            return out

        return self.jobs.start("get", work).view()

    async def generate(self, body: dict) -> dict:
        engine = await self.engine_ready()
        prompt = body.get("prompt") or ""
        max_new = int(body.get("max_new_tokens", 24))
        seed = body.get("seed")
        cid = self._resolve(body, engine)
        self._reload_trust()
        if body.get("host"):
            suffix = engine.tokenize(prompt) if prompt else []
            t0 = time.perf_counter()
            resp = await self.net.remote_generate(body["host"], GenerateRequest(cid, tuple(suffix), max_new, seed))
            return {"cid": str(cid), "host": body["host"], "tokens": list(resp.tokens), "text": resp.text,
                    "suffix_tokens": len(suffix), "host_timings": dict(resp.timings),
                    "seconds": round(time.perf_counter() - t0, 4), "mode": "hosted"}
        document = Document(body["document"]) if body.get("document") else None
        out = await asyncio.to_thread(self._with_engine, generate_from_store, engine, self.store, cid, prompt,
                                      max_new, self.policy, seed, document)
        self._log_generation(engine, cid, out, kind="generate")
        out["mode"] = "local"
        return out

    async def _check_fetched(self, cid: Cid, document_text: str | None) -> dict | None:
        """Before a fetched artifact's first use: bind it to the document the user holds (when given), and audit
        `audit_fraction` of its blocks with this node's model, signing an attestation when it passes. A failed
        check removes the artifact (it never reaches a model) and fails the job with the audit's one line."""
        engine = self.engine
        complete = self.store.is_complete(cid)
        manifest = self.store.get_manifest(cid)
        if engine is None or manifest.model_fingerprint != engine.fingerprint or not complete:
            return None  # another model's artifact, or a prefix fetch: nothing this node can check now
        document = Document(document_text) if document_text else None
        if not self.config.audit_fraction and document is None:
            return None
        try:
            if not self.config.audit_fraction:
                await asyncio.to_thread(check_document, engine, manifest, document)
                return None
            result = await asyncio.to_thread(
                self._with_engine, audit_stored, engine, self.store, cid, fraction=self.config.audit_fraction,
                key=self.key, document=document, prefer=self.policy.auditors)
        except (IntegrityError, ModelMismatch) as exc:  # AuditFailed is an IntegrityError
            await asyncio.to_thread(self.store.remove, cid, True)
            raise type(exc)(f"{exc} (artifact {cid.short()} removed)") from None
        self.ledger.compute(kind="audit", seconds=result["seconds"], tokens=sum(
            manifest.chunks[i].n_tokens for i in result["blocks"]), model=engine.model_id, dtype=engine.dtype,
            device=engine.device, artifact=str(cid), extra={"blocks": len(result["blocks"]), "mode": result["mode"]})
        return {k: result[k] for k in ("blocks", "n_blocks", "drawn", "mode", "max_rel", "seconds", "bounds")}

    async def audit(self, body: dict) -> dict:
        """POST /audit: audit a stored artifact with this node's model (kvswap audit through the node)."""
        engine = await self.engine_ready()
        cid = Cid.parse(str(body.get("cid", "")))
        document = Document(body["document"]) if body.get("document") else None
        self._reload_trust()
        result = await asyncio.to_thread(
            self._with_engine, audit_stored, engine, self.store, cid, fraction=body.get("fraction"),
            blocks=body.get("blocks"), full=bool(body.get("full")), seed=body.get("seed"),
            require_exact=bool(body.get("exact")), key=self.key if body.get("sign", True) else None,
            document=document, prefer=self.policy.auditors)
        self.ledger.compute(kind="audit", seconds=result["seconds"], tokens=0, model=engine.model_id,
                            dtype=engine.dtype, device=engine.device, artifact=str(cid),
                            extra={"blocks": len(result["blocks"]), "mode": result["mode"]})
        return result

    def _reload_trust(self) -> None:
        """Pick up `kvswap trust add/rm` made while the daemon runs (trust.json is the source of truth)."""
        self.policy = TrustPolicy.for_home(self.home, node_key=self.key, accept_any=self.config.accept_any)
        self.artifacts.policy = self.policy

    def _resolve(self, body: dict, engine: Any) -> Cid:
        if body.get("cid"):
            return Cid.parse(body["cid"])
        if body.get("document_hash"):
            found = self.store.find_by_document(engine.fingerprint, str(body["document_hash"]), complete_only=True)
            if found:
                return found[0]
            raise NotFound("no complete artifact of this document for this node's model (run `kvswap get` first)")
        raise UsageError("give an artifact CID or a document")

    def _log_generation(self, engine: Any, cid: Cid, out: dict, kind: str) -> None:
        common = dict(model=engine.model_id, dtype=engine.dtype, device=engine.device, artifact=str(cid))
        load_s = float(out.get("read_verify_s", 0.0)) + float(out.get("load_s", 0.0))
        self.ledger.compute(kind="load", seconds=load_s, tokens=int(out.get("document_tokens", 0)), **common)
        self.ledger.compute(kind=kind, seconds=float(out.get("decode_s", 0.0)), tokens=len(out.get("tokens", [])),
                            extra={"suffix_tokens": out.get("suffix_tokens", 0),
                                   "suffix_prefill_s": out.get("prefill_s", 0.0)}, **common)

    # --- hosting (runs in a network worker thread) -------------------------------------------------------
    def _hosted_generate(self, request: GenerateRequest) -> GenerateResponse:
        engine = self.engine
        if engine is None:
            raise NotFound("the hosting node's model is not loaded")
        cid = request.artifact_cid
        with self._engine_lock:
            t0 = time.perf_counter()
            kv = self._resident.get(cid)
            if kv is None:
                manifest = self.store.get_manifest(cid)
                check_compatible(manifest, engine)
                if self.store.missing_chunks(cid):
                    raise NotFound(f"artifact {cid.short()} is not complete here")
                kv = load_artifact(engine, self.store, manifest)  # every chunk verified, on the engine's device
                self._resident[cid] = kv
                while len(self._resident) > RESIDENT_KV_SLOTS:
                    self._resident.popitem(last=False)
            self._resident.move_to_end(cid)
            load_s = time.perf_counter() - t0
            result = engine.generate_from_loaded(kv, list(request.suffix_ids),
                                                 max_new_tokens=request.max_new_tokens, seed=request.seed)
        out = result.to_dict()
        out.update(read_verify_s=load_s, document_tokens=kv.n_tokens, suffix_tokens=len(request.suffix_ids))
        self._log_generation(engine, cid, out, kind="hosted_generate")
        timings = (("load_s", load_s), ("prefill_s", float(out.get("prefill_s", 0.0))),
                   ("decode_s", float(out.get("decode_s", 0.0))))
        return GenerateResponse(tuple(result.tokens), result.text, timings)

    def _on_announce(self, announce: Any, sender: str) -> None:
        self.announcements.add(str(announce.artifact_cid), sender, {
            "cid": str(announce.artifact_cid), "from": sender, "document_hash": announce.document_hash,
            "n_tokens": announce.n_tokens})
        log.info("announced by %s: %s (%d tokens)", sender, announce.artifact_cid, announce.n_tokens)


def _setup_logging(home: Path) -> None:
    """Log to <home>/node.log, readable by the node's user only (0600, like the keys and the API token): it
    names peers, artifacts and the control API's address."""
    HomeLayout(home).ensure()
    path = home / runfiles.LOG_FILE
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)  # a log an older node created 0644
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def run_daemon(config: NodeConfig) -> int:
    """`kvswap node start`: run in the foreground until SIGINT/SIGTERM or `kvswap node stop`."""
    home = Path(config.home)
    try:
        info = runfiles.read_node_file(home)
        raise UsageError(f"a node (pid {info['pid']}) already runs in {home}")
    except NotFound:
        pass
    _setup_logging(home)
    return asyncio.run(Daemon(config).main())
