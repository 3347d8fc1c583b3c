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

from .. import ops
from ..artifact.pipeline import check_compatible
from ..artifact.service import audit_stored, check_document, generate_from_store, load_artifact
from ..audit import DEFAULT_AUDIT_FRACTION
from ..cid import Cid
from ..document import Document
from ..errors import IntegrityError, KvswapError, ModelMismatch, NotFound, UsageError
from ..home import Home
from ..protocol.limits import ENGINE_WAIT_S, RATION_COPIES, RESIDENT_KV_SLOTS, SHUTDOWN_TIMEOUT_S
from ..protocol.messages import GenerateRequest, GenerateResponse
from . import runfiles
from .announcements import AnnouncementTable
from .api import build_app, check_loopback
from .jobs import Job, JobTable
from .metrics import NodeMetrics
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
    ration_copies: int = RATION_COPIES


class Daemon:
    def __init__(self, config: NodeConfig, on_ready=None):
        self.config = config
        self._on_ready = on_ready
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
        self.h = Home(self.home)  # the one object that opens the home's key, store, ledger and trust policy
        self.key, self.store, self.ledger = self.h.key, self.h.store, self.h.ledger
        self.policy = self.h.policy(self.config.accept_any)
        self.jobs = JobTable(group)
        self.artifacts = StoreArtifacts(self.store, self.policy, generate=self._hosted_generate)
        self.metrics = NodeMetrics(artifacts=lambda: len(self.store.list_artifacts()), stored_bytes=self.store.usage)
        self.artifacts.on_chunk = self.metrics.on_chunk
        self.net = Network()
        await self.net.start(
            seed=self.key.seed, listen_addrs=self.config.listen, bootstrap=self.config.bootstrap,
            service=self.artifacts, target=self.artifacts,
            on_transfer=self._on_transfer,
            on_announce=self._on_announce, ration_copies=self.config.ration_copies,
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
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(step(), SHUTDOWN_TIMEOUT_S / 2)
            except (asyncio.TimeoutError, KvswapError) as exc:
                log.warning("shutdown step %s: %r", getattr(step, "__qualname__", step), exc)
            log.info("shutdown step %s took %.2f s", getattr(step, "__qualname__", step), time.perf_counter() - t0)
        self.h.close()

    def _on_transfer(self, event) -> None:
        """Every frame and data-plane transfer: one ledger row and the byte counters."""
        self.ledger.transfer(**event.as_ledger_kwargs())
        self.metrics.on_transfer(event)

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
                if self._on_ready is not None:
                    self._on_ready({"peer_id": self.net.peer_id, "addrs": self.net.addrs, "api": self.api_url,
                                    "pid": os.getpid()})
                try:
                    await self._stop.wait()
                finally:  # the group waits for its tasks: cancel the ones this daemon started
                    if hasattr(self, "jobs"):
                        self.jobs.cancel_running()
                    if hasattr(self, "_engine_task"):
                        self._engine_task.cancel()
            log.info("background tasks ended")
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
            "artifacts": len(self.store.list_artifacts()), "peers": info.get("peers"), "dataplane": info.get("dataplane"),
            "providing": info.get("providing"), "announcements": self.announcements.recent(20),
            "uptime_s": round(time.time() - self.started, 1), "accept_any": self.config.accept_any,
        }

    async def peers(self) -> list[dict]:
        return await self.net.peers()

    async def list_artifacts(self) -> list[dict]:
        return self.store.list_artifacts()

    def start_publish(self, req: dict) -> dict:
        """POST /publish (fields checked by node/apibody.py): a job that prefills (progress per block), stores,
        then provides and announces the artifact."""
        document = Document(req["text"])

        async def work(job: Job) -> dict:
            engine = await self.engine_ready()
            job.progress.update(stage="prefill", tokens=0)
            result = await asyncio.to_thread(self._with_engine, ops.publish_here, self.h, engine, document,
                                             codec=req["codec"], block_tokens=req["block_tokens"],
                                             progress=job.progress.update)  # a dict update, from the worker thread
            self.metrics.prefill_seconds.inc(result["prefill_s"])
            self.metrics.prefill_tokens.inc(result["n_tokens"])
            job.progress["stage"] = "announce"
            cid = Cid.parse(result["cid"])
            manifest = self.store.get_manifest(cid)
            await self.net.provide_artifact(cid, manifest.model_fingerprint, manifest.document_hash,
                                            [b.cid for b in manifest.blobs()])
            await self.net.announce(cid, manifest.model_fingerprint, manifest.document_hash, manifest.n_tokens)
            return result

        return self.jobs.start("publish", work).view()

    def start_fetch(self, req: dict) -> dict:
        """POST /get: a job that fetches (by CID or document hash), then checks the artifact before first use."""
        if (req["cid"] is None) == (req["document_hash"] is None):
            raise UsageError("get: give either cid or document_hash")

        async def work(job: Job) -> dict:
            self._reload_trust()
            if req["cid"] is not None:
                key: Any = req["cid"]
                expect_model = None
            else:
                engine = await self.engine_ready()
                key = (engine.fingerprint, req["document_hash"])
                expect_model = engine.fingerprint

            def progress(p) -> None:
                job.progress.update(bytes=p.bytes_done, total_bytes=p.bytes_total, rate_mb_s=p.rate_mb_s,
                                    peers=len(p.peers), chunks=p.chunks_done, chunks_total=p.chunks_total)

            try:
                r = await self.net.fetch(key, n_tokens=req["tokens"], progress=progress, expect_model=expect_model,
                                         accept_any=req["accept_any"])
            except NotFound as exc:
                self.metrics.fetches.labels("failed").inc()
                raise NotFound(f"{exc}{await self._other_models(req['document_hash'])}") from None
            except asyncio.CancelledError:
                self.metrics.fetches.labels("cancelled").inc()
                raise
            except KvswapError:
                self.metrics.fetches.labels("failed").inc()
                raise
            self.metrics.fetches.labels("done").inc()
            out = {"cid": str(r.cid), "tokens": r.n_tokens, "chunks": r.chunks_fetched + r.chunks_present,
                   "chunks_fetched": r.chunks_fetched, "bytes": r.bytes_fetched, "seconds": r.seconds,
                   "peers": len(r.providers), "providers": r.providers,
                   "complete": self.store.is_complete(r.cid)}
            job.progress["stage"] = "audit"
            out["audit"] = await self._check_fetched(r.cid, req["document"])
            return out

        return self.jobs.start("get", work).view()

    async def _other_models(self, document_hash: str | None) -> str:
        """When a document was not found for this node's model: which peer has it for which other model. Asked
        of the network (peers providing the document's any-model key, then connected ones; node/fetch.py),
        else taken from the announcements heard; "" when nobody says."""
        if document_hash is None or self.engine is None:
            return ""
        own = self.engine.fingerprint
        others = await self.net.other_models(document_hash, own)
        if not others:
            others = [{"peer": a["from"], "model_fingerprint": a["model_fingerprint"], "model_id": ""}
                      for a in self.announcements.current()
                      if a["document_hash"] == document_hash and a["model_fingerprint"] != own]
        if not others:
            return ""
        first = sorted(others, key=lambda o: (o["model_fingerprint"], o["peer"]))[0]
        named = first["model_id"] or f"model {first['model_fingerprint'][:12]}"
        return (f"; peer {first['peer'][:16]} has it for {named} ({first['model_fingerprint'][:12]}), but this node "
                f"runs {self.engine.model_id} ({own[:12]}): an artifact is bound to one model")

    async def generate(self, req: dict) -> dict:
        """POST /generate: ship (from this node's store, with its model) or host (ask another node)."""
        engine = await self.engine_ready()
        cid = self._resolve(req, engine)
        self._reload_trust()
        if req["host"]:
            suffix = engine.tokenize(req["prompt"]) if req["prompt"] else []
            t0 = time.perf_counter()
            resp = await self.net.remote_generate(
                req["host"], GenerateRequest(cid, tuple(suffix), req["max_new_tokens"], req["seed"]))
            self.metrics.generations.labels("remote").inc()
            return {"cid": str(cid), "host": req["host"], "tokens": list(resp.tokens), "text": resp.text,
                    "suffix_tokens": len(suffix), "host_timings": dict(resp.timings),
                    "seconds": round(time.perf_counter() - t0, 4), "mode": "hosted"}
        document = Document(req["document"]) if req["document"] else None
        out = await asyncio.to_thread(self._with_engine, generate_from_store, engine, self.store, cid, req["prompt"],
                                      req["max_new_tokens"], self.policy, req["seed"], document, req["temperature"])
        ops._log_generation(self.h, engine, cid, out)
        self.metrics.generations.labels("local").inc()
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
            self.metrics.audits.labels("failed").inc()
            await asyncio.to_thread(self.store.remove, cid, True)
            raise type(exc)(f"{exc} (artifact {cid.short()} removed)") from None
        self.metrics.audits.labels("passed").inc()
        self.ledger.compute(kind="audit", seconds=result["seconds"], tokens=sum(
            manifest.chunks[i].n_tokens for i in result["blocks"]), model=engine.model_id, dtype=engine.dtype,
            device=engine.device, artifact=str(cid), extra={"blocks": len(result["blocks"]), "mode": result["mode"]})
        return {k: result[k] for k in ("blocks", "n_blocks", "drawn", "mode", "max_rel", "seconds", "bounds")}

    async def audit(self, req: dict) -> dict:
        """POST /audit: audit a stored artifact with this node's model (kvswap audit through the node)."""
        engine = await self.engine_ready()
        cid = req["cid"]
        document = Document(req["document"]) if req["document"] else None
        self._reload_trust()
        try:
            result = await asyncio.to_thread(
                self._with_engine, audit_stored, engine, self.store, cid, fraction=req["fraction"],
                blocks=req["blocks"], full=req["full"], seed=req["seed"], require_exact=req["exact"],
                key=self.key if req["sign"] else None, document=document, prefer=self.policy.auditors)
        except IntegrityError:  # AuditFailed, or a document that is not the artifact's
            self.metrics.audits.labels("failed").inc()
            raise
        self.metrics.audits.labels("passed").inc()
        self.ledger.compute(kind="audit", seconds=result["seconds"], tokens=0, model=engine.model_id,
                            dtype=engine.dtype, device=engine.device, artifact=str(cid),
                            extra={"blocks": len(result["blocks"]), "mode": result["mode"]})
        return result

    def _reload_trust(self) -> None:
        """Pick up `kvswap trust add/rm` made while the daemon runs (config.toml [trust] is the source of truth)."""
        self.policy = self.h.policy(self.config.accept_any)
        self.artifacts.policy = self.policy

    def _resolve(self, req: dict, engine: Any) -> Cid:
        if req["cid"] is not None:
            return req["cid"]
        if req["document_hash"] is not None:
            return ops.resolve(self.h, engine, ops.Source(document_hash=req["document_hash"]))
        raise UsageError("give an artifact CID or a document")

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
        ops._log_generation(self.h, engine, cid, out, kind="hosted_generate")
        self.metrics.generations.labels("hosted").inc()
        timings = (("load_s", load_s), ("prefill_s", float(out.get("prefill_s", 0.0))),
                   ("decode_s", float(out.get("decode_s", 0.0))))
        return GenerateResponse(tuple(result.tokens), result.text, timings)

    def _on_announce(self, announce: Any, sender: str) -> None:
        self.announcements.add(str(announce.artifact_cid), sender, {
            "cid": str(announce.artifact_cid), "from": sender, "document_hash": announce.document_hash,
            "n_tokens": announce.n_tokens, "model_fingerprint": announce.model_fingerprint})
        log.info("announced by %s: %s (%d tokens)", sender, announce.artifact_cid, announce.n_tokens)


def check_ports_free(listen: list[str]) -> None:
    """UsageError when a fixed listen port is taken. py-libp2p listens with SO_REUSEPORT (for hole punching),
    so a second node on the same ip:port would bind too and the kernel would spread connections over both;
    a plain bind, without that option, fails exactly when anyone listens there."""
    import errno
    import re
    import socket

    for addr in listen:
        m = re.match(r"^/ip([46])/([^/]+)/tcp/(\d+)", addr)
        if not m or int(m.group(3)) == 0:
            continue
        family = socket.AF_INET if m.group(1) == "4" else socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((m.group(2), int(m.group(3))))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise UsageError(f"cannot listen on {addr}: the port is in use (another node? give this one "
                                     f"--listen /ip4/{m.group(2)}/tcp/PORT, or 0 for any free port)") from None
                raise UsageError(f"cannot listen on {addr}: {exc.strerror}") from None


def _setup_logging(home: Path) -> None:
    """Log to <home>/node.log, readable by the node's user only (0600, like the keys and the API token): it
    names peers, artifacts and the control API's address."""
    Path(home).mkdir(parents=True, exist_ok=True)
    path = home / runfiles.LOG_FILE
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)  # a log an older node created 0644
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def run_daemon(config: NodeConfig, on_ready=None) -> int:
    """`kvswap node start`: run in the foreground until SIGINT/SIGTERM or `kvswap node stop`. `on_ready(info)`
    is called once the node listens, with {peer_id, addrs, api, pid} (the CLI prints it)."""
    home = Path(config.home)
    try:
        info = runfiles.read_node_file(home)
        raise UsageError(f"a node (pid {info['pid']}) already runs in {home}")
    except NotFound:
        pass
    check_ports_free(config.listen)  # before anything binds: a taken fixed port is one clear line
    _setup_logging(home)
    try:
        return _run_bounded(Daemon(config, on_ready).main())
    except ExceptionGroup as group:  # a failure while starting (inside the task group): its one clear line
        first = _first_kvswap_error(group)
        if first is None:
            raise
        raise first from None


def _run_bounded(main) -> int:
    """asyncio.run, with the end bounded: tasks still pending after the daemon's own cleanup are cancelled and
    given SHUTDOWN_TIMEOUT_S / 2 (asyncio.run would wait for them, and for every worker thread, forever), and
    any that still run are named in the log."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=SHUTDOWN_TIMEOUT_S / 2))
            for task in stuck:
                log.warning("shutdown: %r did not end", task)
        loop.run_until_complete(loop.shutdown_asyncgens())
        executor = loop._default_executor  # worker threads asyncio.to_thread started
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        loop.close()
        busy = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
        if busy:
            log.warning("shutdown: worker threads still busy (%s); exiting without them", ", ".join(busy))
            logging.shutdown()
            os._exit(0)


def _first_kvswap_error(group: BaseExceptionGroup) -> KvswapError | None:
    for exc in group.exceptions:
        if isinstance(exc, KvswapError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_kvswap_error(exc)
            if found is not None:
                return found
    return None
