"""Manifest, chunk and generate conversations over libp2p streams (trio): the serving handlers and the client
requests. Framing, the per-protocol rules and the order of chunk answers are protocol/'s
(protocol/conversation.py); node/framed.py moves the bytes; this module decides what to say.

One request per stream: the client writes one request frame, the server answers with one or more frames and
closes. Every read has an idle timeout (STREAM_IDLE_TIMEOUT_S); a peer that sends garbage, an oversized
frame or stalls has its stream reset, and nothing else changes: other streams and peers are served as before.
Store and engine work runs in worker threads (bounded by a CapacityLimiter), never on the trio loop.

A chunk request with `dataplane=True` may be answered by a DataGrant; the chunks then come over the node's
data plane (node/dataplane.py) through the same callback. Every frame is accounted (node/accounting.py).
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Protocol, Sequence

import trio

from kvswap.cid import Cid
from kvswap.errors import KvswapError, RemoteProtocolError, error_from_wire, wire_code_of
from kvswap.protocol import limits
from kvswap.protocol.conversation import CONVERSATIONS, SERVED_PROTOCOLS, ChunkAnswers, Conversation
from kvswap.protocol.messages import (
    ChunkData,
    ChunkMissing,
    ChunkRequest,
    DataGrant,
    ErrorMessage,
    GenerateRequest,
    GenerateResponse,
    ManifestRequest,
    ManifestResponse,
    Message,
)
from kvswap.protocol.names import CHUNKS_PROTOCOL, GENERATE_PROTOCOL, MANIFEST_PROTOCOL

from .accounting import TransferHook, new_request_id, no_hook
from .dataplane import fetch_granted
from .framed import FramedStream
from .ration import UploadRation

log = logging.getLogger(__name__)


# --- what the daemon supplies -----------------------------------------------------------------------------


class Service(Protocol):
    """What a node serves, supplied by the daemon. Methods are called from worker threads: be thread-safe."""

    def manifest_by_cid(self, cid: Cid) -> tuple[bytes, list[bytes]] | None:
        """(canonical manifest bytes, envelope bytes) of a complete local artifact, or None."""

    def manifest_by_document(self, model_fingerprint: str, document_hash: str) -> tuple[bytes, list[bytes]] | None:
        """The same for the local artifact of this document for this model, or None."""

    def read_chunk(self, cid: Cid) -> bytes | None:
        """A chunk's stored bytes, or None when this node does not hold it."""

    # Optional: `chunk_path(cid) -> path | None`, the file holding a chunk's stored bytes. When present the
    # data plane sends chunks with sendfile(2) instead of reading them into memory.

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Hosted generation over a local artifact (may take seconds). Raise NotFound / ModelMismatch / ..."""


ChunkCallback = Callable[[Cid, "bytes | bytearray | ChunkMissing"], Awaitable[None]]


def _error_for(exc: BaseException) -> ErrorMessage:
    """The refusal a peer gets when serving its request failed with `exc` (its code from kvswap/errors.py;
    what went wrong inside a bug is not the peer's business)."""
    return ErrorMessage(wire_code_of(exc), str(exc) if isinstance(exc, KvswapError) else "the server failed")


def raise_for_error(msg: ErrorMessage, peer: str) -> None:
    """Turn a peer's ErrorMessage into our exception type (kvswap/errors.py's error_from_wire)."""
    raise error_from_wire(msg.code, f"peer {peer[:16]}: {msg.text or msg.code}")


def _only_reply(reply: Message | None, expected: type, peer: str, missing: str) -> Any:
    """The single reply of a manifest or generate conversation, or the peer's refusal raised."""
    if isinstance(reply, ErrorMessage):
        raise_for_error(reply, peer)
    if not isinstance(reply, expected):
        raise RemoteProtocolError(f"peer {peer[:16]} {missing}")
    return reply


def _remote_ip(stream: Any) -> str | None:
    """The peer's IP as this libp2p stream reaches it (None if the transport does not say)."""
    try:
        addr = stream.get_remote_address()
    except (OSError, AttributeError, NotImplementedError):  # a closed socket, a transport without addresses
        return None
    return addr[0] if addr else None


def _peer_of(stream: Any) -> str:
    try:
        return stream.muxed_conn.peer_id.to_base58()
    except AttributeError:  # a stream without a muxed connection (never in practice)
        return "unknown"


class Exchange:
    """Serving handlers and client calls for the three kvswap protocols on one P2PHost."""

    def __init__(
        self,
        p2p: Any,
        service: Service | None,
        on_transfer: TransferHook | None = None,
        dataplane: Any = None,
        worker_limiter: trio.CapacityLimiter | None = None,
        ration: UploadRation | None = None,
    ) -> None:
        self.p2p = p2p
        self.ration = ration or UploadRation()  # shared with the data plane: one count of copies sent
        self.service = service
        self.on_transfer = on_transfer or no_hook
        self.dataplane = dataplane
        self.limiter = worker_limiter or trio.CapacityLimiter(limits.WORKER_THREADS)
        self._serve_slots = {p: trio.Semaphore(limits.MAX_CONCURRENT_SERVES) for p in SERVED_PROTOCOLS}
        self._generate_slot = trio.Semaphore(1)  # one hosted generation at a time: the engine is not reentrant
        serve = {MANIFEST_PROTOCOL: self._serve_manifest, CHUNKS_PROTOCOL: self._serve_chunks,
                 GENERATE_PROTOCOL: self._serve_generate}
        for protocol in SERVED_PROTOCOLS:
            p2p.set_stream_handler(protocol, self._guard(CONVERSATIONS[protocol], serve[protocol]))
        self.rejected_streams = 0  # streams cut off for misbehaviour (garbage, oversize, stall)
        self.idle_timeout = limits.STREAM_IDLE_TIMEOUT_S  # for serving; tests lower it

    async def _in_thread(self, fn: Callable, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # --- serving ----------------------------------------------------------------------------------------

    def _guard(self, conversation: Conversation, serve: Callable[[FramedStream, Any], Awaitable[None]]
               ) -> Callable[[Any], Awaitable[None]]:
        protocol = conversation.protocol

        async def handler(stream: Any) -> None:
            new_request_id()
            framed = FramedStream(stream, _peer_of(stream), protocol, self.on_transfer,
                                  conversation.request_decoder(), idle_timeout=self.idle_timeout)
            async with self._serve_slots[protocol]:
                try:
                    async with framed:  # closed when served, reset when anything went wrong
                        await self._serve_one(framed, serve)
                except RemoteProtocolError as exc:
                    self.rejected_streams += 1
                    log.info("cut off %s on %s: %s", framed.peer[:16], protocol, exc)

        return handler

    async def _serve_one(self, framed: FramedStream, serve: Callable[[FramedStream, Any], Awaitable[None]]) -> None:
        request = None
        with trio.move_on_after(self.idle_timeout) as scope:  # the whole request, not per read
            request = await framed.recv()
        if scope.cancelled_caught:
            raise RemoteProtocolError(f"no complete request within {self.idle_timeout:g} s")
        if request is None:
            raise RemoteProtocolError("stream closed before a request")
        if self.service is None:
            await framed.send(ErrorMessage("not_found", "this node serves nothing"))
            return
        try:
            await serve(framed, request)
        except RemoteProtocolError:
            raise
        except Exception as exc:  # boundary: serving one peer's request. A KvswapError is a refusal the peer
            # is told (its wire code); anything else is a bug here, logged, and the peer hears "internal".
            # Either way this node goes on serving everyone else.
            if not isinstance(exc, KvswapError):
                log.exception("serving %s to %s failed", framed.protocol, framed.peer[:16])
            await framed.send(_error_for(exc))

    async def _serve_manifest(self, framed: FramedStream, request: ManifestRequest) -> None:
        svc = self.service
        if request.cid is not None:
            found = await self._in_thread(svc.manifest_by_cid, request.cid)
        else:
            found = await self._in_thread(svc.manifest_by_document, request.model_fingerprint, request.document_hash)
        if found is None:
            await framed.send(ErrorMessage("not_found", "no such artifact here"))
            return
        manifest, envelopes = found
        cid = Cid.of(manifest)
        attestations = b""
        if hasattr(svc, "attestations"):  # optional: a service that keeps audit attestations serves them too
            attestations = await self._in_thread(svc.attestations, cid)
        await framed.send(ManifestResponse(manifest=manifest, envelopes=tuple(envelopes), attestations=attestations),
                          artifact=cid)

    async def _serve_chunks(self, framed: FramedStream, request: ChunkRequest) -> None:
        framed.artifact = request.artifact
        if request.dataplane and self.dataplane is not None:
            await framed.send(self.dataplane.grant(framed.peer, request.cids, request.artifact))
            return
        for cid in request.cids:
            data = await self._in_thread(self.service.read_chunk, cid)
            if data is None:
                await framed.send(ChunkMissing(cid))
            else:
                await framed.send(self.ration.refusal(request.artifact, cid, framed.peer) or ChunkData(cid, data))

    async def _serve_generate(self, framed: FramedStream, request: GenerateRequest) -> None:
        async with self._generate_slot:
            response = await self._in_thread(self.service.generate, request)
        await framed.send(response, artifact=request.artifact_cid)

    # --- client side ------------------------------------------------------------------------------------

    async def _open(self, peer: str, protocol: str, idle: float = limits.STREAM_IDLE_TIMEOUT_S) -> FramedStream:
        stream = await self.p2p.open_stream(peer, protocol)
        return FramedStream(stream, peer, protocol, self.on_transfer, CONVERSATIONS[protocol].reply_decoder(),
                            idle_timeout=idle)

    async def request_manifest(self, peer: str, request: ManifestRequest) -> ManifestResponse:
        """Ask `peer` for a manifest. NotFound if it has none; RemoteProtocolError on any misbehaviour."""
        framed = await self._open(peer, MANIFEST_PROTOCOL)
        framed.artifact = request.cid
        async with framed:
            await framed.send(request)
            reply = await framed.recv()
        return _only_reply(reply, ManifestResponse, peer, "sent no manifest")

    async def request_chunks(self, peer: str, cids: Sequence[Cid], on_chunk: ChunkCallback, *,
                             artifact: Cid | None = None, dataplane: bool = False) -> None:
        """Ask `peer` for `cids`; `await on_chunk(cid, answer)` for each in order: the bytes, or the peer's
        ChunkMissing (it lacks the chunk, or rations it and names holders to ask instead).

        The bytes are NOT verified here (node/fetch.py verifies). With `dataplane=True` the server may answer
        with a DataGrant; the chunks then come over its data plane (node/dataplane.py), same callback.
        Raises RemoteProtocolError on misbehaviour, NotFound / LimitExceeded on a refusal.
        """
        framed = await self._open(peer, CHUNKS_PROTOCOL, idle=limits.CHUNK_TIMEOUT_S)
        framed.artifact = artifact
        reached_ip = _remote_ip(framed.stream)
        answers = ChunkAnswers(cids, who=f"peer {peer[:16]}")
        grant: DataGrant | None = None
        async with framed:
            await framed.send(ChunkRequest(tuple(cids), dataplane=dataplane, artifact=artifact))
            while not answers.done:
                msg = await framed.recv()
                if msg is None:
                    raise RemoteProtocolError(f"peer {peer[:16]} closed mid-answer")
                answers.accept(msg)
                if isinstance(msg, ErrorMessage):
                    raise_for_error(msg, peer)
                elif isinstance(msg, DataGrant):
                    grant = msg
                else:
                    await on_chunk(msg.cid, msg.payload if isinstance(msg, ChunkData) else msg)
        if grant is not None:
            await fetch_granted(grant, peer, on_chunk, self.on_transfer, artifact,
                                known_ips=self.p2p.peer_ips(peer), reached_ip=reached_ip)

    async def remote_generate(self, peer: str, request: GenerateRequest) -> GenerateResponse:
        new_request_id()
        framed = await self._open(peer, GENERATE_PROTOCOL, idle=limits.GENERATE_TIMEOUT_S)
        framed.artifact = request.artifact_cid
        async with framed:
            await framed.send(request)
            with trio.move_on_after(limits.GENERATE_TIMEOUT_S) as scope:
                reply = await framed.recv()
            if scope.cancelled_caught:
                raise RemoteProtocolError(f"peer {peer[:16]} did not answer within {limits.GENERATE_TIMEOUT_S:g} s")
        return _only_reply(reply, GenerateResponse, peer, "closed without an answer")


__all__ = ["ChunkCallback", "Exchange", "Service", "raise_for_error"]
