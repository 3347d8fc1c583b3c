"""Manifest, chunk and generate conversations over libp2p streams (trio): the serving handlers and the client
requests, both moving bytes between a stream and the sans-I/O codec of protocol/.

One request per stream: the client writes one request frame, the server answers with one or more frames and
closes. Every read has an idle timeout (STREAM_IDLE_TIMEOUT_S); a peer that sends garbage, an oversized
frame or stalls has its stream reset, and nothing else changes: other streams and peers are served as before.
Store and engine work runs in worker threads (bounded by a CapacityLimiter), never on the trio loop.

Every frame in and out is reported through `on_transfer(TransferEvent)` with its wire size (frame prefix and
header included); node/net.py forwards these to the daemon's ledger.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence

import trio

from kvswap.cid import Cid
from kvswap.errors import KvswapError, RemoteProtocolError, error_from_wire, wire_code_of
from kvswap.protocol import limits
from kvswap.protocol.codec import Decoder, encode_parts
from kvswap.protocol.names import CHUNKS_PROTOCOL, GENERATE_PROTOCOL, MANIFEST_PROTOCOL
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


#: The conversation the current trio task belongs to: one fetch, one hosted generation, one served stream.
#: Child tasks inherit it, so every TransferEvent of one fetch carries the same id (the ledger's `request`).
current_request: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvswap_request", default=None)


def new_request_id() -> str:
    """Set and return a fresh request id for the current task (and the tasks it spawns)."""
    rid = uuid.uuid4().hex[:16]
    current_request.set(rid)
    return rid


@dataclass(frozen=True)
class TransferEvent:
    """One frame (or data-plane transfer) that crossed the wire, for the ledger."""

    peer: str
    protocol: str
    direction: str  # "in" or "out"
    wire_bytes: int  # bytes on the wire for this message (frame prefix + header + payload)
    raw_bytes: int  # payload bytes (a chunk's stored bytes); 0 for control messages
    artifact: str | None = None
    chunk: str | None = None
    request: str | None = field(default_factory=current_request.get)

    def as_ledger_kwargs(self) -> dict:
        """Keyword arguments for kvswap.ledger.Ledger.transfer: `ledger.transfer(**event.as_ledger_kwargs())`."""
        return {"peer": self.peer, "protocol": self.protocol, "direction": self.direction,
                "wire_bytes": self.wire_bytes, "raw_bytes": self.raw_bytes, "artifact": self.artifact,
                "chunk": self.chunk, "request": self.request}


TransferHook = Callable[[TransferEvent], None]


def _no_hook(event: TransferEvent) -> None:
    return None


# --- framed stream ----------------------------------------------------------------------------------------


class FramedStream:
    """A libp2p stream seen as messages: `await recv()` / `await send(msg)`, with idle timeouts and counting."""

    def __init__(
        self,
        stream: Any,
        peer: str,
        protocol: str,
        hook: TransferHook,
        allowed: set[int] | None = None,
        idle_timeout: float = limits.STREAM_IDLE_TIMEOUT_S,
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.protocol = protocol
        self.hook = hook
        self.decoder = Decoder(allowed=allowed)
        self.idle_timeout = idle_timeout
        self._pending: list[Message] = []
        self._eof = False
        self.artifact: str | None = None  # attributed to every event of this stream when known

    async def recv(self) -> Message | None:
        """The next message, or None at a clean end of stream. RemoteProtocolError on garbage or stall."""
        while not self._pending:
            if self._eof:
                self.decoder.eof()
                return None
            before = self.decoder.bytes_in
            with trio.move_on_after(self.idle_timeout) as scope:
                data = await _read(self.stream)
            if scope.cancelled_caught:
                raise RemoteProtocolError(f"peer {self.peer[:16]} stalled for {self.idle_timeout:g} s")
            if not data:
                self._eof = True
                continue
            msgs = self.decoder.feed(data)
            self._account_in(msgs, self.decoder.bytes_in - before)
            self._pending.extend(msgs)
        return self._pending.pop(0)

    def _account_in(self, msgs: list[Message], nbytes: int) -> None:
        # each completed frame is reported with its exact frame size (a frame is counted once it is whole)
        for msg in msgs:
            wire, raw = _sizes(msg)
            self.hook(TransferEvent(self.peer, self.protocol, "in", wire, raw, self.artifact, _chunk_of(msg)))

    async def send(self, msg: Message, artifact: str | None = None) -> int:
        parts = encode_parts(msg)
        wire = sum(len(p) for p in parts)
        with trio.move_on_after(self.idle_timeout) as scope:
            try:
                if wire < 65536:
                    await self.stream.write(b"".join(parts))
                else:
                    for part in parts:
                        await self.stream.write(part)
            except Exception as exc:  # StreamReset / StreamClosed / StreamError from libp2p
                raise RemoteProtocolError(f"peer {self.peer[:16]} closed the stream: {type(exc).__name__}") from exc
        if scope.cancelled_caught:
            raise RemoteProtocolError(f"peer {self.peer[:16]} stopped reading for {self.idle_timeout:g} s")
        self.hook(
            TransferEvent(self.peer, self.protocol, "out", wire, _sizes(msg)[1], artifact or self.artifact, _chunk_of(msg))
        )
        return wire

    async def close(self) -> None:
        try:
            await self.stream.close()
        except Exception:  # already reset or closed by the peer
            pass

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except Exception:  # already gone
            pass


async def _read(stream: Any) -> bytes:
    from libp2p.network.stream.exceptions import StreamEOF

    try:
        return await stream.read(limits.STREAM_READ_BYTES)
    except StreamEOF:
        return b""
    except Exception as exc:  # StreamReset / StreamError / muxer errors: the peer went away
        raise RemoteProtocolError(f"stream failed: {type(exc).__name__}: {exc}") from exc


def _sizes(msg: Message) -> tuple[int, int]:
    from kvswap.protocol.codec import PREFIX_BYTES

    if isinstance(msg, ChunkData):
        return PREFIX_BYTES + len(msg.cid.to_bytes()) + len(msg.payload), len(msg.payload)
    return PREFIX_BYTES + len(msg.to_body()), 0


def _chunk_of(msg: Message) -> str | None:
    if isinstance(msg, (ChunkData, ChunkMissing)):
        return str(msg.cid)
    return None


_UNSPECIFIED = frozenset({"0.0.0.0", "::", ""})


def _remote_ip(stream: Any) -> str | None:
    """The peer's IP as this libp2p stream reaches it (None if the transport does not say)."""
    try:
        addr = stream.get_remote_address()
    except Exception:  # transports without socket addresses
        return None
    return addr[0] if addr else None


def _cid_or_none(text: str | None) -> Cid | None:
    return Cid.parse(text) if text else None


def _peer_of(stream: Any) -> str:
    try:
        return stream.muxed_conn.peer_id.to_base58()
    except Exception:  # a stream without a muxed connection (never in practice)
        return "unknown"


def _error_for(exc: BaseException) -> ErrorMessage:
    """The refusal a peer gets when serving its request failed with `exc` (its code from kvswap/errors.py;
    what went wrong inside a bug is not the peer's business)."""
    return ErrorMessage(wire_code_of(exc), str(exc) if isinstance(exc, KvswapError) else "the server failed")


def raise_for_error(msg: ErrorMessage, peer: str) -> None:
    """Turn a peer's ErrorMessage into our exception type (kvswap/errors.py's error_from_wire)."""
    raise error_from_wire(msg.code, f"peer {peer[:16]}: {msg.text or msg.code}")


# --- serving ----------------------------------------------------------------------------------------------


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
        self.on_transfer = on_transfer or _no_hook
        self.dataplane = dataplane
        self.limiter = worker_limiter or trio.CapacityLimiter(limits.WORKER_THREADS)
        self._serve_slots = {
            p: trio.Semaphore(limits.MAX_CONCURRENT_SERVES)
            for p in (MANIFEST_PROTOCOL, CHUNKS_PROTOCOL, GENERATE_PROTOCOL)
        }
        self._generate_slot = trio.Semaphore(1)  # one hosted generation at a time: the engine is not reentrant
        p2p.set_stream_handler(MANIFEST_PROTOCOL, self._guard(MANIFEST_PROTOCOL, self._serve_manifest))
        p2p.set_stream_handler(CHUNKS_PROTOCOL, self._guard(CHUNKS_PROTOCOL, self._serve_chunks))
        p2p.set_stream_handler(GENERATE_PROTOCOL, self._guard(GENERATE_PROTOCOL, self._serve_generate))
        self.rejected_streams = 0  # streams cut off for misbehaviour (garbage, oversize, stall)
        self.idle_timeout = limits.STREAM_IDLE_TIMEOUT_S  # for serving; tests lower it

    async def _in_thread(self, fn: Callable, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def _guard(self, protocol: str, serve: Callable[[FramedStream], Any]) -> Callable[[Any], Any]:
        allowed = {
            MANIFEST_PROTOCOL: {ManifestRequest.TYPE},
            CHUNKS_PROTOCOL: {ChunkRequest.TYPE},
            GENERATE_PROTOCOL: {GenerateRequest.TYPE},
        }[protocol]

        async def handler(stream: Any) -> None:
            new_request_id()
            framed = FramedStream(stream, _peer_of(stream), protocol, self.on_transfer, allowed=allowed,
                                  idle_timeout=self.idle_timeout)
            async with self._serve_slots[protocol]:
                try:
                    request = None
                    with trio.move_on_after(self.idle_timeout) as scope:  # whole request, not per read
                        request = await framed.recv()
                    if scope.cancelled_caught:
                        raise RemoteProtocolError(f"no complete request within {self.idle_timeout:g} s")
                    if request is None:
                        raise RemoteProtocolError("stream closed before a request")
                    if self.service is None:
                        await framed.send(ErrorMessage("not_found", "this node serves nothing"))
                    else:
                        await serve(framed, request)
                    await framed.close()
                except RemoteProtocolError as exc:
                    self.rejected_streams += 1
                    log.info("cut off %s on %s: %s", framed.peer[:16], protocol, exc)
                    await framed.reset()
                except Exception:  # a server bug: log it, reset this stream, keep serving others
                    log.exception("serving %s to %s failed", protocol, framed.peer[:16])
                    await framed.reset()

        return handler

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
        artifact = str(Cid.of(manifest))
        await framed.send(ManifestResponse(manifest=manifest, envelopes=tuple(envelopes)), artifact=artifact)

    async def _serve_chunks(self, framed: FramedStream, request: ChunkRequest) -> None:
        framed.artifact = str(request.artifact) if request.artifact else None
        if request.dataplane and self.dataplane is not None:
            grant = self.dataplane.grant(framed.peer, request.cids, framed.artifact)
            await framed.send(grant)
            return
        for cid in request.cids:
            data = await self._in_thread(self.service.read_chunk, cid)
            if data is None:
                await framed.send(ChunkMissing(cid))
            else:
                await framed.send(self.ration.refusal(framed.artifact, cid, framed.peer) or ChunkData(cid, data))

    async def _serve_generate(self, framed: FramedStream, request: GenerateRequest) -> None:
        async with self._generate_slot:
            try:
                response = await self._in_thread(self.service.generate, request)
            except Exception as exc:  # mapped to an ErrorMessage for the peer; bugs logged
                if not isinstance(exc, KvswapError):
                    log.exception("hosted generation failed")
                await framed.send(_error_for(exc))
                return
        await framed.send(response, artifact=str(request.artifact_cid))

    # --- client side ----------------------------------------------------------------------------------

    async def _open(self, peer: str, protocol: str, allowed: set[int], idle: float | None = None) -> FramedStream:
        stream = await self.p2p.open_stream(peer, protocol)
        return FramedStream(
            stream, peer, protocol, self.on_transfer, allowed=allowed,
            idle_timeout=idle if idle is not None else limits.STREAM_IDLE_TIMEOUT_S,
        )

    async def request_manifest(self, peer: str, request: ManifestRequest) -> ManifestResponse:
        """Ask `peer` for a manifest. NotFound if it has none; RemoteProtocolError on any misbehaviour."""
        framed = await self._open(peer, MANIFEST_PROTOCOL, {ManifestResponse.TYPE, ErrorMessage.TYPE})
        framed.artifact = str(request.cid) if request.cid else None
        try:
            await framed.send(request)
            reply = await framed.recv()
        except BaseException:
            await framed.reset()
            raise
        await framed.close()
        if isinstance(reply, ErrorMessage):
            raise_for_error(reply, peer)
        if not isinstance(reply, ManifestResponse):
            raise RemoteProtocolError(f"peer {peer[:16]} sent no manifest")
        return reply

    async def request_chunks(
        self,
        peer: str,
        cids: Sequence[Cid],
        on_chunk: Callable[[Cid, bytes | ChunkMissing], Awaitable[None]],
        *,
        artifact: str | None = None,
        dataplane: bool = False,
    ) -> None:
        """Ask `peer` for `cids`; `await on_chunk(cid, answer)` for each in order: the bytes, or the peer's
        ChunkMissing (it lacks the chunk, or rations it and names holders to ask instead).

        The bytes are NOT verified here (node/fetch.py verifies). With `dataplane=True` the server may answer
        with a DataGrant; the chunks then come over its data plane (node/dataplane.py), same callback.
        Raises RemoteProtocolError on misbehaviour, NotFound / LimitExceeded on a refusal.
        """
        framed = await self._open(
            peer, CHUNKS_PROTOCOL,
            {ChunkData.TYPE, ChunkMissing.TYPE, DataGrant.TYPE, ErrorMessage.TYPE},
            idle=limits.CHUNK_TIMEOUT_S,
        )
        framed.artifact = artifact
        remote_ip = _remote_ip(framed.stream)
        grant: DataGrant | None = None
        try:
            await framed.send(ChunkRequest(tuple(cids), dataplane=dataplane, artifact=_cid_or_none(artifact)))
            for expected in cids:
                msg = await framed.recv()
                if isinstance(msg, DataGrant):
                    grant = msg
                    break
                if isinstance(msg, ErrorMessage):
                    raise_for_error(msg, peer)
                if msg is None:
                    raise RemoteProtocolError(f"peer {peer[:16]} closed mid-answer")
                if msg.cid != expected:
                    raise RemoteProtocolError(f"peer {peer[:16]} answered for another chunk")
                await on_chunk(expected, msg.payload if isinstance(msg, ChunkData) else msg)
        except BaseException:
            await framed.reset()
            raise
        await framed.close()
        if grant is not None:
            from .dataplane import fetch_granted

            if list(grant.cids) != list(cids):
                raise RemoteProtocolError(f"peer {peer[:16]} granted other chunks than asked")
            allowed = self.p2p.peer_ips(peer) | ({remote_ip} if remote_ip else set())
            if grant.host in _UNSPECIFIED and remote_ip:  # server listens on all interfaces: use the IP we reached
                grant = DataGrant(remote_ip, grant.port, grant.token, grant.cids)
            await fetch_granted(grant, peer, on_chunk, self.on_transfer, artifact, allowed)

    async def remote_generate(self, peer: str, request: GenerateRequest) -> GenerateResponse:
        new_request_id()
        framed = await self._open(
            peer, GENERATE_PROTOCOL, {GenerateResponse.TYPE, ErrorMessage.TYPE}, idle=limits.GENERATE_TIMEOUT_S
        )
        framed.artifact = str(request.artifact_cid)
        try:
            await framed.send(request)
            with trio.fail_after(limits.GENERATE_TIMEOUT_S):
                reply = await framed.recv()
        except trio.TooSlowError:
            await framed.reset()
            raise RemoteProtocolError(f"peer {peer[:16]} did not answer within {limits.GENERATE_TIMEOUT_S:g} s")
        except BaseException:
            await framed.reset()
            raise
        await framed.close()
        if isinstance(reply, ErrorMessage):
            raise_for_error(reply, peer)
        if not isinstance(reply, GenerateResponse):
            raise RemoteProtocolError(f"peer {peer[:16]} closed without an answer")
        return reply


__all__ = [
    "Exchange",
    "FramedStream",
    "Service",
    "TransferEvent",
    "raise_for_error",
]
