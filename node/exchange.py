"""Manifest, chunk and generate conversations over libp2p streams (trio): the serving handlers and the client
requests. Framing, the per-protocol rules and the order of chunk answers are protocol/'s
(protocol/conversation.py); node/framed.py moves the bytes; this module decides what to say.

One request per stream: the client writes one request frame, the server answers with one or more frames and
closes. Every read has an idle timeout (serve.stream_idle_timeout_s); a peer that sends garbage, an oversized
frame or stalls has its stream reset, and nothing else changes: other streams and peers are served as before.
Store and engine work runs in worker threads (bounded by a CapacityLimiter), never on the trio loop.

Serving shares the node out per peer (node/quota.py, its `ServeTuning` from node/tuning.py): a peer may have
serve.max_streams_per_peer streams open (more are reset at once); a request is read before it takes a
serve slot (silent streams hold none); slots go round robin to the waiting peers, at most
serve.max_per_peer each, and a request that waits serve.wait_timeout_s is answered `busy`; a peer has at
most serve.max_generate_per_peer hosted generations running or waiting. While a request is served the stream is
watched: a peer that sends more after its request is cut off, one that resets stops costing its slot.
Chunks are sent from their files piece by piece, never whole in memory.

A chunk request with `dataplane=True` may be answered by a DataGrant; the chunks then come over the node's
data plane (node/dataplane.py) through the same callback. When the data plane fails (refused, reset, not a
kvswap data plane), the client takes the rest of the chunks over a libp2p stream from the same peer and
asks that peer for no grant for fetch.dataplane_backoff_s. Every frame is accounted (node/accounting.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Awaitable, Callable, Protocol, Sequence

import trio

from kvswap.protocol.cid import Cid
from kvswap.protocol.keys import ArtifactKey
from kvswap.protocol.errors import KvswapError, LocalProtocolError, RemoteProtocolError, error_from_wire, wire_code_of
from kvswap.protocol import limits
from kvswap.protocol.conversation import CONVERSATIONS, SERVED_PROTOCOLS, ChunkAnswers, Conversation
from kvswap.protocol.messages import (
    CHUNK_HEADER_BYTES,
    MAX_BODY_BYTES,
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
    Voucher,
    VoucherAck,
)
from kvswap.protocol.names import CHUNKS_PROTOCOL, GENERATE_PROTOCOL, MANIFEST_PROTOCOL, PAY_PROTOCOL

from .accounting import TransferHook, new_request_id, no_hook
from .dataplane import DataPlaneFailed, fetch_granted
from .framed import FramedStream
from .p2p import PEER_FAILURES
from .payments import Till
from .quota import FairSlots, PeerRecords, RefusalLog, StreamAdmission
from .ration import UploadRation
from .uploads import UploadGate
from .tuning import DEFAULT_TUNING, NodeTuning

log = logging.getLogger(__name__)


# --- what the daemon supplies -----------------------------------------------------------------------------


class Service(Protocol):
    """What a node serves, supplied by the daemon. Methods are called from worker threads: be thread-safe."""

    def manifest(self, key: ArtifactKey) -> tuple[bytes, list[bytes]] | None:
        """(canonical manifest bytes, envelope bytes) of the local artifact `key` names (by CID; a document's
        for its model; a complete one for any model when the key names none), or None."""

    def read_chunk(self, cid: Cid) -> bytes | None:
        """A chunk's stored bytes, or None when this node does not hold it."""

    # Optional: `chunk_path(cid) -> path | None`, the file holding a chunk's stored bytes. When present the
    # data plane sends chunks with sendfile(2) instead of reading them into memory.

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Hosted generation over a local artifact (may take seconds). Raise NotFound / ModelMismatch / ..."""


ChunkCallback = Callable[[Cid, "bytes | bytearray | ChunkMissing"], Awaitable[None]]


def _error_for(exc: BaseException) -> ErrorMessage:
    """The refusal a peer gets when serving its request failed with `exc` (its code from protocol/errors.py;
    what went wrong inside a bug is not the peer's business)."""
    return ErrorMessage(wire_code_of(exc), str(exc) if isinstance(exc, KvswapError) else "the server failed")


def raise_for_error(msg: ErrorMessage, peer: str) -> None:
    """Turn a peer's ErrorMessage into our exception type (protocol/errors.py's error_from_wire)."""
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
        tuning: NodeTuning = DEFAULT_TUNING,
        records: PeerRecords | None = None,
        gate: UploadGate | None = None,
        till: Till | None = None,
    ) -> None:
        self.p2p = p2p
        #: this node's terms and its consumers' credit (node/payments.py); without terms it serves for free
        self.till = till if till is not None else Till(None, None, tuning.pay)
        self.tuning = tuning
        #: peers with a good record here (served to the end, fetched from, trusted, configured): node/quota.py
        self.records = records if records is not None else PeerRecords(tuning.serve.max_recorded_peers)
        self.ration = ration or UploadRation(tuning.ration)  # shared with the data plane: one count of copies sent
        #: the ration and the upload slots every chunk sent goes through (shared with the data plane)
        self.gate = gate or UploadGate.of(self.ration, tuning.serve)
        self.service = service
        self.on_transfer = on_transfer or no_hook
        self.dataplane = dataplane
        self.limiter = worker_limiter or trio.CapacityLimiter(self.tuning.serve.worker_threads)
        serve = tuning.serve
        self.inbound = StreamAdmission(serve.max_streams, serve.max_streams_per_peer, serve.max_streams_per_ip,
                                       serve.max_streams_per_subnet, serve.reserved_streams,
                                       vouched=self.records.__contains__)
        self.slots = {p: FairSlots(self.tuning.serve.max_concurrent, self.tuning.serve.max_per_peer)
                      for p in (MANIFEST_PROTOCOL, CHUNKS_PROTOCOL, PAY_PROTOCOL)}
        # as many hosted generations at once as the backend runs (the engine: 1, it is not reentrant; vLLM: its
        # batch), one per peer, peers taking turns; their threads wait on the backend, not on store work's limiter
        capacity = max(1, int(getattr(service, "generate_capacity", 1)))
        self.slots[GENERATE_PROTOCOL] = FairSlots(capacity, 1, max_pending=self.tuning.serve.max_generate_per_peer)
        self.generate_limiter = trio.CapacityLimiter(capacity)
        serve = {MANIFEST_PROTOCOL: self._serve_manifest, CHUNKS_PROTOCOL: self._serve_chunks,
                 GENERATE_PROTOCOL: self._serve_generate, PAY_PROTOCOL: self._serve_pay}
        for protocol in SERVED_PROTOCOLS:
            p2p.set_stream_handler(protocol, self._guard(CONVERSATIONS[protocol], serve[protocol]))
        self.rejected_streams = 0  # streams cut off for misbehaviour (garbage, oversize, stall)
        self.refused = RefusalLog(log, "refused streams over quota", tuning.serve.refusal_log_interval_s)
        self.cut_off = RefusalLog(log, "cut off misbehaving streams", tuning.serve.refusal_log_interval_s)
        self.idle_timeout = self.tuning.serve.stream_idle_timeout_s  # for serving; tests lower it
        self.serve_wait_timeout = self.tuning.serve.wait_timeout_s  # tests lower it
        self._dataplane_off: dict[str, float] = {}  # peer -> until when we ask it for no grant (client side)
        self.dataplane_fallbacks = 0  # requests whose chunks came over libp2p after the data plane failed

    async def _in_thread(self, fn: Callable, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # --- serving ----------------------------------------------------------------------------------------

    def _guard(self, conversation: Conversation, serve: Callable[[FramedStream, Any], Awaitable[None]]
               ) -> Callable[[Any], Awaitable[None]]:
        protocol = conversation.protocol

        async def handler(stream: Any) -> None:
            new_request_id()
            peer = _peer_of(stream)
            ip = _remote_ip(stream)
            ticket = self.inbound.acquire(peer, ip)
            if ticket is None:  # over its share of open streams (its own, its address's, or everyone's)
                self.refused.note(f"{peer[:16]} on {protocol}: {self.inbound.why_refused(peer, ip)}")
                await _reset(stream)
                return
            try:
                framed = FramedStream(stream, peer, protocol, self.on_transfer, conversation.request_decoder(),
                                      idle_timeout=self.idle_timeout,
                                      read_bytes=limits.MAX_REQUEST_FRAME_BYTES + limits.KiB,
                                      piece_bytes=self.tuning.serve.stream_read_bytes)
                try:
                    async with framed:  # closed when served, reset when anything went wrong
                        await self._serve_one(framed, serve)
                except RemoteProtocolError as exc:
                    self.rejected_streams += 1
                    self.records.forfeit(peer)  # a misbehaving peer loses the standing it earned
                    self.cut_off.note(f"{peer[:16]} on {protocol}: {exc}")
                except LocalProtocolError as exc:  # a half-sent answer could not be finished: reset, logged
                    log.warning("answer to %s on %s abandoned: %s", peer[:16], protocol, exc)
            finally:
                self.inbound.release(ticket)

        return handler

    async def _serve_one(self, framed: FramedStream, serve: Callable[[FramedStream, Any], Awaitable[None]]) -> None:
        request = None
        with trio.move_on_after(self.idle_timeout) as scope:  # the whole request, not per read
            request = await framed.recv()
        if scope.cancelled_caught:
            raise RemoteProtocolError(f"no complete request within {self.idle_timeout:g} s")
        if request is None:
            raise RemoteProtocolError("stream closed before a request")
        if framed.has_unread:
            raise RemoteProtocolError("sent more than its one request")
        if self.service is None:
            await framed.send(ErrorMessage("not_found", "this node serves nothing"))
            return
        wait = self.tuning.serve.generate_timeout_s if framed.protocol == GENERATE_PROTOCOL else self.serve_wait_timeout
        try:
            await _watched(framed, self._serve_in_slot, framed, request, serve, wait)
        except (RemoteProtocolError, LocalProtocolError):
            raise
        except Exception as exc:  # boundary: serving one peer's request. A KvswapError is a refusal the peer
            # is told (its wire code: Busy is `busy`); anything else is a bug here, logged, and the peer hears
            # "internal". Either way this node goes on serving everyone else.
            if not isinstance(exc, KvswapError):
                log.exception("serving %s to %s failed", framed.protocol, framed.peer[:16])
            await framed.send(_error_for(exc))

    async def _serve_in_slot(self, framed: FramedStream, request: Any,
                             serve: Callable[[FramedStream, Any], Awaitable[None]], wait: float) -> None:
        async with self.slots[framed.protocol].hold(framed.peer, wait):
            await serve(framed, request)

    async def _serve_manifest(self, framed: FramedStream, request: ManifestRequest) -> None:
        svc = self.service
        found = await self._in_thread(svc.manifest, request.key)
        if found is None:
            await framed.send(ErrorMessage("not_found", "no such artifact here"))
            return
        manifest, envelopes = found
        cid = Cid.of(manifest)
        attestations = b""
        if hasattr(svc, "attestations"):  # optional: a service that keeps audit attestations serves them too
            attestations = await self._in_thread(svc.attestations, cid)
        await framed.send(ManifestResponse(manifest=manifest, envelopes=tuple(envelopes), attestations=attestations,
                                           terms=self.till.terms_blob), artifact=cid)

    async def _serve_chunks(self, framed: FramedStream, request: ChunkRequest) -> None:
        framed.artifact = request.artifact
        if self.till.prices_bytes and await self._holds_any(request.cids):  # priced: nothing moves before the
            self.till.check_terms(request.terms, request.artifact, framed.peer)  # asker accepted the terms
        if request.dataplane and self.dataplane is not None and self.p2p.dataplane_reachable(framed.peer):
            grant = self.dataplane.grant(framed.peer, request.cids, request.artifact)
            if grant is not None:
                await framed.send(grant)
                return
            # no grant within the data plane's quotas: the chunks come on this stream instead
        chunk_path = getattr(self.service, "chunk_path", None)
        sent = 0
        for cid in request.cids:
            path = await self._in_thread(chunk_path, cid) if chunk_path is not None else None
            data = None
            if path is None:  # no file: read it whole (a chunk we do not hold takes no upload slot)
                data = await self._in_thread(self.service.read_chunk, cid)
                if data is None:
                    await framed.send(ChunkMissing(cid))
                    continue
            async with self.gate.turn(request.artifact, cid, framed.peer, path, data) as turn:  # credit, ration, slot
                if turn.answer is not None:
                    await framed.send(turn.answer)
                    continue
                if path is not None and await self._send_stored(framed, cid, path):
                    turn.sent = True
                else:
                    if data is None:  # the file went away between the lookup and the send
                        data = await self._in_thread(self.service.read_chunk, cid)
                    await framed.send(ChunkData(cid, data) if data is not None else ChunkMissing(cid))
                    turn.sent = data is not None
            sent += turn.sent
        if sent:  # it asked for chunks and took them: a peer that is using the node as it is meant to be used
            self.records.earn(framed.peer)

    async def _holds_any(self, cids: Sequence[Cid]) -> bool:
        """Whether this node holds any of `cids` (a priced node that holds none answers "missing", as a free one
        does: asking for its terms would tell the asker nothing)."""
        chunk_path = getattr(self.service, "chunk_path", None)
        has = (lambda cid: chunk_path(cid) is not None) if chunk_path is not None else (
            lambda cid: self.service.read_chunk(cid) is not None)
        return await self._in_thread(lambda: any(has(c) for c in cids))

    async def _send_stored(self, framed: FramedStream, cid: Cid, path: Any) -> bool:
        """Send a stored chunk from its file, serve.stream_read_bytes at a time; False if the file is gone or too big
        for a frame (then it is read whole, or reported missing)."""
        try:
            handle = await self._in_thread(open, path, "rb")
        except OSError:
            return False
        try:
            size = await self._in_thread(lambda: os.fstat(handle.fileno()).st_size)
            if size + CHUNK_HEADER_BYTES > MAX_BODY_BYTES[ChunkData.TYPE]:
                return False

            async def read_piece(offset: int, n: int) -> bytes:
                return await self._in_thread(os.pread, handle.fileno(), n, offset)

            await framed.send_chunk(cid, size, read_piece)
            return True
        finally:
            handle.close()

    async def _serve_generate(self, framed: FramedStream, request: GenerateRequest) -> None:
        # in one of the protocol's slots; a priced host takes the tokens' credit first (node/payments.py)
        till, peer = self.till, framed.peer
        if till.prices_tokens:
            till.check_terms(request.terms, request.artifact_cid, peer)
            await till.admit_generation(peer, request.max_new_tokens)
        delivered = 0
        try:
            response = await trio.to_thread.run_sync(self.service.generate, request, limiter=self.generate_limiter)
            await framed.send(response, artifact=request.artifact_cid)
            delivered = len(response.tokens)
        finally:
            till.generation_done(peer, request.artifact_cid, request.max_new_tokens, delivered)

    async def _serve_pay(self, framed: FramedStream, request: Voucher) -> None:
        """A consumer's voucher: checked and booked in a worker thread, acked with the sequence now held."""
        sequence, paid = await self._in_thread(self.till.receive, framed.peer, request.voucher)
        self.till.credited(framed.peer, paid)
        await framed.send(VoucherAck(sequence))

    # --- client side ------------------------------------------------------------------------------------

    async def _open(self, peer: str, protocol: str, idle: float | None = None,
                    max_body: int | None = None, chunks: bool = False) -> FramedStream:
        """A framed stream to `peer`; `chunks`: one that carries chunk bytes, never over a relay unless
        node.relay_data allows (`P2PHost.open_chunk_stream`)."""
        stream = await (self.p2p.open_chunk_stream if chunks else self.p2p.open_stream)(peer, protocol)
        serve = self.tuning.serve
        return FramedStream(stream, peer, protocol, self.on_transfer, CONVERSATIONS[protocol].reply_decoder(max_body),
                            idle_timeout=serve.stream_idle_timeout_s if idle is None else idle,
                            read_bytes=serve.stream_read_bytes, piece_bytes=serve.stream_read_bytes)

    async def request_manifest(self, peer: str, request: ManifestRequest) -> ManifestResponse:
        """Ask `peer` for a manifest. NotFound if it has none; RemoteProtocolError on any misbehaviour."""
        framed = await self._open(peer, MANIFEST_PROTOCOL)
        framed.artifact = request.key if isinstance(request.key, Cid) else None
        async with framed:
            await framed.send(request)
            reply = await framed.recv()
        return _only_reply(reply, ManifestResponse, peer, "sent no manifest")

    async def request_chunks(self, peer: str, cids: Sequence[Cid], on_chunk: ChunkCallback, *,
                             artifact: Cid | None = None, dataplane: bool = False,
                             max_chunk_bytes: int | None = None, terms: bytes | None = None) -> None:
        """Ask `peer` for `cids`; `await on_chunk(cid, answer)` for each in order: the bytes, or the peer's
        ChunkMissing (it lacks the chunk, or rations it and names holders to ask instead).

        The bytes are NOT verified here (node/fetch.py verifies). With `dataplane=True` the server may answer
        with a DataGrant; the chunks then come over its data plane (node/dataplane.py), same callback. When
        the data plane fails, the chunks not yet answered are asked again over a libp2p stream, and the peer
        is asked for no grant for fetch.dataplane_backoff_s. `max_chunk_bytes` (the largest stored size asked for)
        bounds the frames accepted, so a lying peer cannot make us buffer more than an honest answer. Raises
        RemoteProtocolError on misbehaviour, NotFound / LimitExceeded / Busy on a refusal.
        """
        max_body = None if max_chunk_bytes is None else max(max_chunk_bytes + CHUNK_HEADER_BYTES,
                                                             limits.MAX_REQUEST_FRAME_BYTES)
        answered: set[Cid] = set()

        async def counted(cid: Cid, answer: bytes | bytearray | ChunkMissing) -> None:
            answered.add(cid)
            await on_chunk(cid, answer)

        use_dataplane = dataplane and not self._dataplane_backed_off(peer)
        grant, reached_ip = await self._chunk_stream(peer, cids, counted, artifact, use_dataplane, max_body, terms)
        if grant is None:
            return
        try:
            await fetch_granted(grant, peer, counted, self.on_transfer, artifact,
                                known_ips=self.p2p.peer_ips(peer), reached_ip=reached_ip, max_body=max_body,
                                tuning=self.tuning)
        except DataPlaneFailed as exc:
            self._dataplane_failed(peer, exc)
            rest = [c for c in cids if c not in answered]
            if rest:
                self.dataplane_fallbacks += 1
                await self._chunk_stream(peer, rest, counted, artifact, False, max_body, terms)

    async def _chunk_stream(self, peer: str, cids: Sequence[Cid], on_chunk: ChunkCallback, artifact: Cid | None,
                            dataplane: bool, max_body: int | None = None,
                            terms: bytes | None = None) -> tuple[DataGrant | None, str | None]:
        """One chunk request on a libp2p stream: the chunks it answers go to `on_chunk`; a grant is returned
        (with the IP the stream reached the peer at) for the caller to use."""
        framed = await self._open(peer, CHUNKS_PROTOCOL, idle=self.tuning.fetch.silence_s, max_body=max_body,
                                  chunks=True)
        framed.artifact = artifact
        reached_ip = _remote_ip(framed.stream)
        answers = ChunkAnswers(cids, grant_allowed=dataplane, who=f"peer {peer[:16]}")  # a grant only if asked
        grant: DataGrant | None = None
        async with framed:
            await framed.send(ChunkRequest(tuple(cids), dataplane=dataplane, artifact=artifact, terms=terms))
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
        return grant, reached_ip

    def _dataplane_backed_off(self, peer: str) -> bool:
        until = self._dataplane_off.get(peer)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._dataplane_off[peer]
        return False

    def _dataplane_failed(self, peer: str, exc: Exception) -> None:
        now = time.monotonic()
        if len(self._dataplane_off) >= self.tuning.fetch.max_peers:  # bounded: forget the expired ones
            self._dataplane_off = {p: t for p, t in self._dataplane_off.items() if t > now}
        if peer not in self._dataplane_off:
            log.info("data plane of %s unusable, taking its chunks over libp2p for %g s: %s", peer[:16],
                     self.tuning.fetch.dataplane_backoff_s, exc)
        self._dataplane_off[peer] = now + self.tuning.fetch.dataplane_backoff_s

    async def remote_generate(self, peer: str, request: GenerateRequest) -> GenerateResponse:
        new_request_id()
        framed = await self._open(peer, GENERATE_PROTOCOL, idle=self.tuning.serve.generate_timeout_s)
        framed.artifact = request.artifact_cid
        async with framed:
            await framed.send(request)
            with trio.move_on_after(self.tuning.serve.generate_timeout_s) as scope:
                reply = await framed.recv()
            if scope.cancelled_caught:
                raise RemoteProtocolError(f"peer {peer[:16]} did not answer within {self.tuning.serve.generate_timeout_s:g} s")
        return _only_reply(reply, GenerateResponse, peer, "closed without an answer")

    async def send_voucher(self, peer: str, voucher: bytes) -> int:
        """Give `peer` a voucher; the sequence it acked. PaymentRequired when it refused the voucher."""
        framed = await self._open(peer, PAY_PROTOCOL)
        async with framed:
            await framed.send(Voucher(voucher))
            reply = await framed.recv()
        return _only_reply(reply, VoucherAck, peer, "did not ack the voucher").sequence


async def _reset(stream: Any) -> None:
    with contextlib.suppress(*PEER_FAILURES):  # already gone
        await stream.reset()


async def _watched(framed: FramedStream, work: Callable[..., Awaitable[None]], *args: Any) -> None:
    """`await work(*args)` while watching `framed` for anything but silence (FramedStream.watch_quiet): a peer
    that sends more, or resets, has the work cancelled and a RemoteProtocolError raised. Exceptions come out
    as themselves, not wrapped in an exception group."""
    broken: list[str] = []

    async def watch(scope: trio.CancelScope) -> None:
        why = await framed.watch_quiet()
        if why is not None:
            broken.append(why)
            scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            await work(*args)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the work's own failure (the watcher raises nothing)
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    if broken:
        raise RemoteProtocolError(broken[0])


__all__ = ["ChunkCallback", "Exchange", "Service", "raise_for_error"]
