"""The kvswap daemon: one asyncio process per node that owns the store, the ledger, the engine and the
libp2p network, and answers the CLI on a loopback control API.

Lifecycle (aiohttp web_runner style): `setup()` opens everything and starts listening, `serve()` waits for
a stop request (SIGINT, SIGTERM or POST /stop), `cleanup()` closes in reverse order within the shutdown
timeout. Background work (engine loading, publish and fetch jobs) lives in one TaskGroup so its errors
surface. Engine work runs in worker threads behind one lock: the model is not re-entrant, and a hosted
generation for a peer and a local one must not interleave.

The control-API handlers are the `api_<route>` methods (kvswap/control/routes.py names the routes; node/api.py
registers them); each does its work through the operations layer (kvswap/ops/), as the CLI and Python do.
A node started with `--no-model` never imports torch: it stores, forwards, serves and provides, and answers
generation requests with "no model here".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import ops
from ..config import Config, parse_size
from ..control import routes, runfiles
from ..document import Document
from ..home import Home
from ..modes import AuditMode, DecodeMode, HostBackend, SwarmMode
from ..protocol.cid import Cid
from ..protocol.errors import Busy, IntegrityError, KvswapError, ModelMismatch, NotFound, UsageError
from ..payments.rules import Purse
from ..payments.terms import sign_terms
from ..protocol.keys import DocumentKey
from ..protocol.messages import GenerateRequest, GenerateResponse
from .announcements import AnnouncementTable
from .hosting import EngineBackend, HostedJob, HostedResult
from .api import build_app, check_loopback
from .jobs import Job, JobTable
from .metrics import NodeMetrics
from .nat import NatConfig
from .net import Network
from .payments import Payer, Till
from .storeadapter import StoreArtifacts
from .tuning import DEFAULT_TUNING, NodeTuning, swarm_tuning

log = logging.getLogger("kvswap.node")

#: what a node without a model answers generation requests with
NO_MODEL = "this node runs without a model (--no-model): it stores and serves artifacts but generates nothing"


class Daemon:
    def __init__(self, home: Path, config: Config, tuning: NodeTuning = DEFAULT_TUNING, on_ready=None):
        self.home = Path(home)
        self.config = config
        self.tuning = swarm_tuning(replace(tuning, ration=replace(tuning.ration, copies=config["node.ration_copies"])),
                                   SwarmMode.parse(config["node.swarm"], "node.swarm"))
        self._on_ready = on_ready
        self.started = time.time()
        self._stop = asyncio.Event()
        self._engine_lock = threading.Lock()
        self._engine_ready = asyncio.Event()
        self._engine_error: str | None = None
        self.engine: Any = None
        self.host_backend = HostBackend.parse(config["node.host_backend"], "node.host_backend")
        self.announcements = AnnouncementTable(self.tuning.gossip)  # bounded and expiring: peers announce anything

    @property
    def light(self) -> bool:
        return bool(self.config["node.no_model"])

    # --- lifecycle --------------------------------------------------------------------------------------
    async def setup(self, group: asyncio.TaskGroup) -> None:
        host, _, port = self.config["node.api"].rpartition(":")
        check_loopback(host)
        self.h = Home(self.home)  # the one object that opens the home's key, store, ledger and trust policy
        self.key, self.store, self.ledger = self.h.key, self.h.store, self.h.ledger
        self.policy = self.h.policy(self.config["node.accept_any"])
        self.jobs = JobTable(group, self.tuning.daemon.max_finished_jobs)
        self._loop = asyncio.get_running_loop()
        self.hosting = self._make_backend()
        self._host_slots = asyncio.Semaphore(self.hosting.capacity)
        self.artifacts = StoreArtifacts(self.store, self.policy, generate=self._hosted_generate,
                                        budget_bytes=parse_size(self.config["store.budget"]),
                                        generate_capacity=self.hosting.capacity)
        self.metrics = NodeMetrics(artifacts=lambda: len(self.store.list_artifacts()), stored_bytes=self.store.usage,
                                   tier=self.h.tier)
        self.artifacts.on_chunk = self.metrics.on_chunk
        self.till, self.payer = self._payments()
        self.net = Network()
        await self.net.start(
            seed=self.key.seed, listen_addrs=self.config["node.listen"], bootstrap=self.config["node.bootstrap"],
            service=self.artifacts, target=self.artifacts, on_transfer=self._on_transfer,
            on_announce=self._on_announce, tuning=self.tuning,
            nat=NatConfig(reachability=self.config["node.reachability"], relay=self.config["node.relay"],
                          relays=tuple(self.config["node.relays"]),
                          hole_punching=self.config["node.hole_punching"] == "on",
                          relay_data=self.config["node.relay_data"]),
            till=self.till, payer=self.payer,
        )
        self.metrics.watch_nat(self.net.nat_snapshot)
        self.metrics.watch_uploads(self.net.uploads_snapshot)
        self._reload_trust()  # also names the peers with standing (trusted publishers, bootstrap peers)
        token = runfiles.api_token(self.home, create=True)
        self._runner = web.AppRunner(build_app(self, token), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, int(port or 0))
        await site.start()
        bound = self._runner.addresses[0]  # the real port when 0 was asked for
        self.api_url = f"http://{host}:{bound[1]}"
        if self.light:
            self._engine_ready.set()
        else:
            self._engine_task = group.create_task(self._load_engine())
            self._hosting_task = group.create_task(self.hosting.run())
        runfiles.write_node_file(self.home, {
            "pid": os.getpid(), "api": self.api_url, "peer_id": self.net.peer_id, "addrs": self.net.addrs,
            "public_key": self.key.public_hex, "started": self.started,
        })
        log.info("node %s listening on %s, control API %s%s", self.net.peer_id, " ".join(self.net.addrs),
                 self.api_url, " (no model)" if self.light else "")

    async def cleanup(self) -> None:
        runfiles.remove_node_file(self.home)
        with contextlib.suppress(asyncio.TimeoutError):  # a vLLM server is ended with its process group
            await asyncio.wait_for(self.hosting.stop(), self.tuning.daemon.shutdown_timeout_s / 2)
        for step in (self._runner.cleanup, self.net.stop):
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(step(), self.tuning.daemon.shutdown_timeout_s / 2)
            except (asyncio.TimeoutError, KvswapError) as exc:
                log.warning("shutdown step %s: %r", getattr(step, "__qualname__", step), exc)
            log.info("shutdown step %s took %.2f s", getattr(step, "__qualname__", step), time.perf_counter() - t0)
        self.h.close()

    def _payments(self) -> tuple[Till, Payer]:
        """This node's till (its signed terms, when config.toml [pay] prices anything) and its payer."""
        cfg, book = self.config, self.h.payments
        terms = None
        if cfg["pay.price_per_mb"] or cfg["pay.price_per_token"]:
            terms = sign_terms(self.key, unit=cfg["pay.unit"], price_per_mb=cfg["pay.price_per_mb"],
                               price_per_token=cfg["pay.price_per_token"],
                               credit_bytes=parse_size(cfg["pay.credit_bytes"]), credit_tokens=cfg["pay.credit_tokens"])
        return Till(book, terms, self.tuning.pay), Payer(book, self.key, self.tuning.pay)

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
                    if hasattr(self, "_hosting_task"):
                        self._hosting_task.cancel()
            log.info("background tasks ended")
            return 0
        finally:
            if hasattr(self, "_runner"):
                await self.cleanup()

    # --- engine -----------------------------------------------------------------------------------------
    async def _load_engine(self) -> None:
        from ..engine import load_engine  # torch loads here, in a worker thread, not at import

        try:
            engine = await asyncio.to_thread(load_engine, self.config["node.model"] or None, self.config["node.dtype"])
            mode = DecodeMode(self.config["node.decode"] or (
                DecodeMode.COMPILED if engine.device.startswith("cuda") else DecodeMode.EAGER))
            engine.set_decode_mode(mode)
            if mode is not DecodeMode.EAGER:  # compile (or warm) the decode step now, not on the first request
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
        if self.light:
            raise NotFound(NO_MODEL)
        try:
            await asyncio.wait_for(self._engine_ready.wait(), self.tuning.daemon.engine_wait_s)
        except asyncio.TimeoutError:
            raise NotFound("the node's model is still loading") from None
        if self.engine is None:
            raise NotFound(f"this node has no model: {self._engine_error}")
        return self.engine

    def _with_engine(self, fn, *args, **kw):
        with self._engine_lock:
            return fn(*args, **kw)

    # --- control API: status and listings ------------------------------------------------------------------
    async def api_status(self) -> dict:
        info = await self.net.info()
        eng = self.engine
        return {
            "peer_id": self.net.peer_id, "addrs": self.net.addrs, "api": self.api_url, "pid": os.getpid(),
            "public_key": self.key.public_hex, "light": self.light,
            "model": eng.model_id if eng else None, "model_fingerprint": eng.fingerprint if eng else None,
            "dtype": eng.dtype if eng else self.config["node.dtype"],
            "model_error": NO_MODEL if self.light else self._engine_error,
            "artifacts": len(self.store.list_artifacts()), "peers": info.get("peers"), "dataplane": info.get("dataplane"),
            "providing": info.get("providing"), "announcements": self.announcements.recent(20),
            "announcements_kept": len(self.announcements),
            "uptime_s": round(time.time() - self.started, 1), "accept_any": self.config["node.accept_any"],
            "refusals": {k: info.get(k) for k in ("rejected_streams", "refused_streams", "busy_answers",
                                                  "dataplane_refused", "gossip_dropped")},
            "nat": info.get("nat"), "uploads": info.get("uploads"), "payments": self.net.payments_snapshot(),
            "hosting": None if self.light else self.hosting.status(),
            # a light node (--no-model) never imports torch: what its idle RSS (bench memory) relies on
            "torch_imported": "torch" in sys.modules,
        }

    async def api_metrics(self) -> bytes:
        return self.metrics.render()

    async def api_peers(self) -> list[dict]:
        return await self.net.peers()

    async def api_artifacts(self) -> list[dict]:
        return self.store.list_artifacts()

    async def api_job(self, job_id: str) -> routes.JobView:
        return self.jobs.get(job_id).view()

    async def api_cancel_job(self, job_id: str) -> routes.JobView:
        return self.jobs.cancel(job_id).view()

    async def api_stop(self) -> dict:
        self.request_stop("control API")
        return {"stopping": True}

    # --- control API: publish and fetch (jobs) ---------------------------------------------------------------
    async def api_publish(self, req: routes.PublishBody) -> routes.JobView:
        """A job that prefills (progress per block), stores, then provides and announces the artifact."""
        document = Document(req.text)

        async def work(job: Job) -> dict:
            engine = await self.engine_ready()
            job.progress.update(stage="prefill", tokens=0)
            result = await asyncio.to_thread(self._with_engine, ops.publish_here, self.h, engine, document,
                                             codec=req.codec, block_tokens=req.block_tokens,
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

    async def api_get(self, req: routes.GetBody) -> routes.JobView:
        """A job that fetches (by CID, or a document for this node's model), then checks the artifact before
        first use."""
        if req.key is None:
            raise UsageError("get: give either cid or document_hash")

        async def work(job: Job) -> dict:
            self._reload_trust()
            key, expect_model = req.key, None
            if isinstance(key, DocumentKey):
                engine = await self.engine_ready()
                key = key.for_model(engine.fingerprint)
                expect_model = engine.fingerprint

            purse = Purse.of(self.config, max_price_mb=req.max_price, budget=req.budget)  # what this fetch may pay

            def progress(p) -> None:
                job.progress.update(bytes=p.bytes_done, total_bytes=p.bytes_total, rate_mb_s=p.rate_mb_s,
                                    peers=len(p.peers), chunks=p.chunks_done, chunks_total=p.chunks_total)

            try:
                r = await self.net.fetch(key, n_tokens=req.tokens, progress=progress, expect_model=expect_model,
                                         accept_any=req.accept_any, purse=purse)
            except NotFound as exc:
                self.metrics.fetches.labels("failed").inc()
                doc = key.document_hash if isinstance(key, DocumentKey) else None
                raise NotFound(f"{exc}{await self._other_models(doc)}") from None
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
                   "complete": self.store.is_complete(r.cid), "paid": r.paid, "unit": purse.unit, "settle_s": round(r.settle_s, 3)}
            job.progress["stage"] = "audit"
            out["audit"] = await self._check_fetched(r.cid, req.document)
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

    async def _check_fetched(self, cid: Cid, document_text: str | None) -> dict | None:
        """Before a fetched artifact's first use: bind it to the document the user holds (when given), and audit
        `audit_fraction` of its blocks with this node's model, signing an attestation when it passes. A failed
        check removes the artifact (it never reaches a model) and fails the job with the audit's one line."""
        engine = self.engine
        complete = self.store.is_complete(cid)
        manifest = self.store.get_manifest(cid)
        if engine is None or manifest.model_fingerprint != engine.fingerprint or not complete:
            return None  # another model's artifact, a prefix fetch, or a node without a model: nothing to check
        document = Document(document_text) if document_text else None
        fraction = self.config["node.audit_fraction"]
        if not fraction and document is None:
            return None
        try:
            if not fraction:
                await asyncio.to_thread(ops.check_document, engine, manifest, document)
                return None
            result = await asyncio.to_thread(self._with_engine, ops.audit_here, self.h, engine, cid,
                                             fraction=fraction, document=document)
        except (IntegrityError, ModelMismatch) as exc:  # AuditFailed is an IntegrityError
            self.metrics.audits.labels("failed").inc()
            await asyncio.to_thread(self.store.remove, cid, True)
            raise type(exc)(f"{exc} (artifact {cid.short()} removed)") from None
        self.metrics.audits.labels("passed").inc()
        return {k: result[k] for k in ("blocks", "n_blocks", "drawn", "mode", "why", "max_rel", "seconds", "bounds")}

    # --- control API: generate and audit ---------------------------------------------------------------------
    async def api_generate(self, req: routes.GenerateBody) -> dict:
        """Ship (from this node's store, with its model) or host (ask another node)."""
        if req.host:
            return await self._generate_remote(req)
        engine = await self.engine_ready()
        cid = self._resolve(req.key, engine)
        self._reload_trust()
        document = Document(req.document) if req.document else None
        out = await asyncio.to_thread(self._with_engine, ops.generate_here, self.h, engine, cid, req.prompt,
                                      req.max_new_tokens, policy=self.policy, seed=req.seed, document=document,
                                      temperature=req.temperature)
        self.metrics.generations.labels("local").inc()
        return out

    async def _generate_remote(self, req: routes.GenerateBody) -> dict:
        """Hosted mode: the prompt's tokens go to the host, its tokens come back. The prompt is tokenized with
        this node's model (a node without one can name the artifact by CID and send an empty prompt)."""
        engine = None if self.light else await self.engine_ready()
        if isinstance(req.key, Cid):
            cid = req.key
        elif engine is not None:
            cid = self._resolve(req.key, engine)
        else:
            raise UsageError("a node without a model names a hosted artifact by its CID")
        if req.prompt and engine is None:
            raise UsageError(f"{NO_MODEL}: it cannot tokenize a prompt")
        suffix = engine.tokenize(req.prompt) if req.prompt else []
        t0 = time.perf_counter()
        purse = Purse.of(self.config, max_price_token=req.max_price_token, budget=req.budget)
        resp = await self.net.remote_generate(req.host, GenerateRequest(cid, tuple(suffix), req.max_new_tokens, req.seed),
                                              purse=purse)
        self.metrics.generations.labels("remote").inc()
        return {"cid": str(cid), "host": req.host, "tokens": list(resp.tokens), "text": resp.text,
                "suffix_tokens": len(suffix), "host_timings": dict(resp.timings),
                "seconds": round(time.perf_counter() - t0, 4), "mode": "hosted", "paid": purse.spent}

    async def api_audit(self, req: routes.AuditBody) -> dict:
        """Audit a stored artifact with this node's model (kvswap audit through the node)."""
        engine = await self.engine_ready()
        cid = self._resolve(req.key, engine)
        document = Document(req.document) if req.document else None
        self._reload_trust()
        try:
            result = await asyncio.to_thread(
                self._with_engine, ops.audit_here, self.h, engine, cid, fraction=req.fraction, blocks=req.blocks,
                full=req.full, seed=req.seed, mode=AuditMode(req.mode), sign=req.sign, document=document)
        except IntegrityError:  # AuditFailed, or a document that is not the artifact's
            self.metrics.audits.labels("failed").inc()
            raise
        self.metrics.audits.labels("passed").inc()
        return result

    # --- control API: the OpenAI-compatible door (POST /v1/completions) -------------------------------------
    async def api_completions(self, req: routes.CompletionBody) -> dict:
        """A local agent's completion over a document: found in the store, else fetched through kvswap (and
        checked as `kvswap get` checks it), then generated by this node's hosted backend. OpenAI's answer."""
        if req.stream:
            raise UsageError("completions: stream is not supported here; ask with stream false")
        if req.key is None:
            raise UsageError("completions: name the document with document_hash (or an artifact with cid)")
        engine = await self.engine_ready()
        cid, fetched = await self._door_artifact(req.key, req.document, engine)
        suffix = engine.tokenize(req.prompt) if req.prompt else []
        seed = None
        if req.temperature > 0:
            seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "big") >> 1
        job = HostedJob(cid, tuple(suffix), req.max_tokens, seed, temperature=req.temperature or 1.0)
        r = await self._host(job, "door", self.tuning.hosting.slot_wait_s)
        return {"id": f"cmpl-{os.urandom(8).hex()}", "object": "text_completion", "created": int(time.time()),
                "model": engine.model_id,
                "choices": [{"index": 0, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}],
                "usage": {"prompt_tokens": r.document_tokens + r.suffix_tokens, "completion_tokens": len(r.tokens),
                          "total_tokens": r.document_tokens + r.suffix_tokens + len(r.tokens)},
                "kvswap": {"cid": str(cid), "fetched": fetched, **r.to_dict()}}

    async def _door_artifact(self, key: Any, document_text: str | None, engine: Any) -> tuple[Cid, bool]:
        """The complete stored artifact `key` names for this node's model, fetched first when missing."""
        self._reload_trust()
        if isinstance(key, Cid):
            if self.store.is_complete(key):
                return key, False
            want = key
        else:
            try:
                return ops.resolve(self.h, engine, ops.Source(key)), False
            except NotFound:
                want = key.for_model(engine.fingerprint)
        try:
            r = await self.net.fetch(want, expect_model=engine.fingerprint, purse=Purse.of(self.config))
        except KvswapError:
            self.metrics.fetches.labels("failed").inc()
            raise
        self.metrics.fetches.labels("done").inc()
        await self._check_fetched(r.cid, document_text)
        return r.cid, True

    def _reload_trust(self) -> None:
        """Pick up `kvswap trust add/rm` made while the daemon runs (config.toml [trust] is the source of truth).
        Trusted publishers and auditors, and the bootstrap peers, have standing with this node: the streams
        reserved against crowds of fresh identities are theirs to use (node/quota.py)."""
        from .p2p import peer_id_of_public_key

        self.policy = self.h.policy(self.config["node.accept_any"])
        self.artifacts.policy = self.policy
        keys = {k.hex() for k in self.policy.trusted | self.policy.auditors} - {self.key.public_hex}
        standing = {peer_id_of_public_key(k) for k in keys}
        standing |= {a.rsplit("/p2p/", 1)[1] for a in self.config["node.bootstrap"] if "/p2p/" in a}
        self.net.set_standing(sorted(standing))

    def _resolve(self, key, engine: Any) -> Cid:
        if key is None:
            raise UsageError("give an artifact CID or a document")
        return ops.resolve(self.h, engine, ops.Source(key))

    # --- hosting: the backend (node/hosting/) behind the generate protocol and the OpenAI door ---------------
    def _make_backend(self) -> Any:
        """The `node.host_backend` backend (checked once, in __init__). The generate protocol gets its capacity
        as slots (node/exchange.py), one per peer."""
        if self.light or self.host_backend is HostBackend.ENGINE:
            return EngineBackend(self.h, self._hosting_engine, self._engine_lock, self.tuning.daemon.resident_kv_slots)
        from .hosting.vllm import VllmBackend, find_vllm_python

        return VllmBackend(self.h, self._hosting_engine, model=self.config["node.model"] or None,
                           dtype=self.config["node.dtype"], python=find_vllm_python(self.config["node.vllm_python"]),
                           accept_any=self.config["node.accept_any"], tuning=self.tuning.hosting,
                           engine_ready=self.engine_ready)

    def _hosting_engine(self) -> Any:
        if self.light:
            raise NotFound(NO_MODEL)
        if self.engine is None:
            raise NotFound("the hosting node's model is not loaded")
        return self.engine

    async def _host(self, job: HostedJob, mode: str, wait_s: float) -> HostedResult:
        """One generation on the backend, within its capacity (Busy after `wait_s`), counted in /metrics
        (mode: hosted for a peer over libp2p, door for a local agent's completion)."""
        try:
            await asyncio.wait_for(self._host_slots.acquire(), wait_s)
        except asyncio.TimeoutError:
            raise Busy(f"all {self.hosting.capacity} hosted-generation slots stayed taken for {wait_s:g} s") from None
        try:
            result = await self.hosting.generate(job)
        finally:
            self._host_slots.release()
        self.metrics.generations.labels(mode).inc()
        return result

    def _hosted_generate(self, request: GenerateRequest) -> GenerateResponse:
        """A peer's generation (runs in a network worker thread; the exchange admits at most the backend's
        capacity, one per peer): handed to the backend on the daemon's loop, and waited for."""
        job = HostedJob(request.artifact_cid, tuple(request.suffix_ids), request.max_new_tokens, request.seed,
                        origin="peer")
        wait = self.tuning.hosting.request_timeout_s
        result = asyncio.run_coroutine_threadsafe(self._host(job, "hosted", wait), self._loop).result()
        return GenerateResponse(result.tokens, result.text, result.timings())

    def _on_announce(self, announce: Any, sender: str) -> None:
        self.announcements.add(str(announce.artifact_cid), sender, {
            "cid": str(announce.artifact_cid), "from": sender, "document_hash": announce.document_hash,
            "n_tokens": announce.n_tokens, "model_fingerprint": announce.model_fingerprint})
        log.debug("announced by %s: %s (%d tokens)", sender, announce.artifact_cid, announce.n_tokens)


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


def run_daemon(home: Path, config: Config, tuning: NodeTuning = DEFAULT_TUNING, on_ready=None) -> int:
    """`kvswap node start`: run in the foreground until SIGINT/SIGTERM or `kvswap node stop`. `on_ready(info)`
    is called once the node listens, with {peer_id, addrs, api, pid} (the CLI prints it). Everything a user can
    get wrong (a node already running, a taken port, an unknown model) fails here with one line, before
    anything starts."""
    from ..engine.catalog import check_name

    home = Path(home)
    try:
        info = runfiles.read_node_file(home)
        raise UsageError(f"a node (pid {info['pid']}) already runs in {home}")
    except NotFound:
        pass
    if config["node.no_model"] and config["node.model"]:
        raise UsageError("--no-model runs a node without a model: leave out --model")
    if not config["node.no_model"]:
        check_name(config["node.model"] or None)  # a mistyped --model is one line, not a node without a model
        if HostBackend.parse(config["node.host_backend"], "node.host_backend") is HostBackend.VLLM:
            from .hosting.vllm import check_servable, find_vllm_python

            check_servable(config["node.model"] or None)
            find_vllm_python(config["node.vllm_python"])  # no vLLM venv: one line, before anything starts
    check_ports_free(config["node.listen"])  # before anything binds: a taken fixed port is one clear line
    _setup_logging(home)
    try:
        return _run_bounded(Daemon(home, config, tuning, on_ready).main(), tuning.daemon.shutdown_timeout_s)
    except ExceptionGroup as group:  # a failure while starting (inside the task group): its one clear line
        first = _first_kvswap_error(group)
        if first is None:
            raise
        raise first from None


def _run_bounded(main, shutdown_timeout_s: float) -> int:
    """asyncio.run, with the end bounded: tasks still pending after the daemon's own cleanup are cancelled and
    given half the shutdown timeout (asyncio.run would wait for them, and for every worker thread, forever),
    and any that still run are named in the log."""
    loop = asyncio.new_event_loop()
    failure: BaseException | None = None
    try:
        return loop.run_until_complete(main)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=shutdown_timeout_s / 2))
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
            code = 0
            if failure is not None:  # a failure (to start, say): os._exit skips the CLI, which would print
                # its one line and exit non-zero; under load a bad --listen once exited 0 here
                first = _first_kvswap_error(failure) if isinstance(failure, BaseExceptionGroup) else failure
                error = first if first is not None else failure
                print(f"error: {error}", file=sys.stderr, flush=True)
                code = getattr(error, "exit_code", 1)
            logging.shutdown()
            os._exit(code)


def _first_kvswap_error(group: BaseExceptionGroup) -> KvswapError | None:
    for exc in group.exceptions:
        if isinstance(exc, KvswapError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_kvswap_error(exc)
            if found is not None:
                return found
    return None
