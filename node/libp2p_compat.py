"""Everything kvswap needs from py-libp2p beyond its public API, in one place, for the one version pinned.

kvswap pins `libp2p==0.8.1` (pyproject.toml). Every private attribute it touches, every patch and every
logger level it changes is here, so an upgrade is reviewed in one file, and `check()` says plainly which of
them a different version lacks (tests/test_libp2p_compat.py runs it). Nothing happens on import: `apply()`
is called when a host starts (node/p2p.py), so importing kvswap changes nothing in a process that embeds
py-libp2p for its own use until it starts a kvswap host.

What and why:
- **a cancel-safe secure-channel write** (`SecureSession.write`). Every stream to a peer shares one
  connection: a TCP socket carrying one Noise session carrying Yamux frames. py-libp2p encrypts a frame,
  which advances the session's nonce, and only then writes it, passing trio checkpoints on the way. A
  cancellation delivered there leaves the frame encrypted but unsent, or half sent: the peer cannot decrypt
  anything after it and the whole connection dies, with every stream on it, though neither side
  misbehaved. kvswap cancels libp2p work all the time (a late chunk request, a DHT query past its timeout,
  a hedged manifest request), so a fetch could lose its one honest provider to its own timeouts. Each write
  therefore runs to its end, shielded, for at most the stream idle timeout; one the peer has not taken by
  then leaves the connection unusable anyway: it is closed and ConnectionClosedError raised, which
  py-libp2p and node/p2p.py treat as a peer failure.
- **the DHT's ADD_PROVIDER rate** (`KadDHT._provider_rate_max`): py-libp2p allows 10 per 10 s per sender,
  tuned for IPFS; kvswap provides every chunk CID.
- **the DHT key encoding** (`kad_dht._encode_key`) and **one GET_PROVIDERS round to one peer**
  (`ProviderStore._get_providers_from_peer_with_closers`): py-libp2p's find_providers answers from the local
  record store first, so a node that provides a key itself would never ask the network (node/p2p.py).
- **AutoNAT's dial-back** (`AutoNATService._try_dial`, issue 26): py-libp2p 0.8.1 dials back with
  `host.connect`, which returns at once when the requester is already connected (it always is: it asked over
  that connection), so every node was told it is reachable. The patch dials the address afresh
  (`Swarm.dial_addr`), within a timeout, and closes that test connection again.
- **the relay's own limits** (`CircuitV2Protocol._handle_reserve`, `_handle_connect`, issue 26): 0.8.1 bounds
  reservations in total and circuits per reservation, each circuit's duration and bytes (`relay_limits`), but
  not reservations per IP address nor circuits in total or per IP address, and it takes a RESERVE's optional peer field as the
  peer to reserve for, so one peer could hold slots in others' names; and a circuit whose one direction ended
  (its byte budget spent, a reset) could keep its other direction, and so its slot, blocked in a read for
  good (the duration is checked only between reads). `bound_relay` adds the three bounds (and counts a reservation's circuits before it
  answers: 0.8.1 counted them only once the target accepted, so concurrent CONNECTs overshot), refuses a
  reservation for anyone but the requester, and ends both directions of a circuit together, at its
  duration at the latest (`_relay_data`). Its memory (the relay's Yamux, `_handle_hop_stream`): a stream the
  relay reset kept its unread bytes, and what still arrived for it, until a sweep 60-90 s later; a relayed
  stream's receive window grew to 4-16 MiB; a hop stream its peer closed was never closed. `bound_relay` drops
  the unread bytes (`_drop_unread`), holds a circuit's windows at 256 KiB (`_hold_window`) and resets a hop
  stream once its handler returns: flat at 137-141 MB RSS over 19-256 MiB relayed (BENCHMARKS.md).
- **AutoNAT's server** (`AutoNATService._handle_request`, issue 26): 0.8.1 dials back whatever peer id a DIAL
  names, as often as asked; `serve_autonat` answers in its place, refusing a dial-back for anyone but the
  requester and past a per-peer rate (node/nat.py DialBackLimit).
- **DCUtR's driver** (`DCUtRProtocol._auto_drive_loop`, issue 26): it started hole punches one peer after
  another every 2 s, from both sides of a connection at once; `drive_dcutr` turns it off and node/nat.py
  starts them (concurrently, one side first). It also shortens the grace after which DCUtR closes the relayed
  connection an upgrade made idle (`_close_relayed_conns_after_grace`, 60 s in 0.8.1), whose circuit held a
  relay slot meanwhile.
- **relayed addresses in what the host advertises** (`BasicHost.get_addrs`): see `advertise_also`.
- **one FIND_NODE to one peer** (`PeerRouting._query_peer_for_closest`) and **one ADD_PROVIDER to one peer**
  (`ProviderStore._send_add_provider`): see `ask_peer_about` and `provide_to`.
- **which connections are relayed** (`Swarm.connections`, `_actual_transport_addresses`): DCUtR's own test
  for a direct connection, used by node/nat.py to tell relayed peers from direct ones; and **which connection a
  new stream takes** (`Swarm._best_connection`): a direct one where there is one (`prefer_direct_connections`).
- **quieter loggers**: KadDHT logs a WARNING each time a peer closes a DHT stream normally, several per
  lookup, the auto-connector logs its state at INFO every cycle, and gossipsub logs a WARNING for every
  message its own spam protection drops (a flood became a line per message). Raised to ERROR / WARNING;
  kvswap's own refusals are counted and logged once per interval (node/quota.py RefusalLog). Set them lower
  after `apply()` to debug.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import time
from typing import Any, Awaitable

import trio

#: the py-libp2p release every attribute below was read in (pyproject.toml pins it)
PINNED_VERSION = "0.8.1"
#: logger -> the lowest level kvswap lets it log at
_QUIET_LOGGERS = {"libp2p.kad_dht.kad_dht": logging.ERROR, "libp2p.network.auto_connector": logging.WARNING,
                  "libp2p.pubsub.gossipsub": logging.ERROR,
                  # a failed hole punch or refused circuit is an expected outcome behind NAT (counted in node/nat.py)
                  "libp2p.relay.circuit_v2.dcutr": logging.CRITICAL,
                  "libp2p.relay.circuit_v2.protocol": logging.CRITICAL,
                  "libp2p.relay.circuit_v2.transport": logging.CRITICAL,
                  "libp2p.host.autonat.autonat": logging.CRITICAL}


def installed_version() -> str:
    return importlib.metadata.version("libp2p")


def check(version: str | None = None) -> list[str]:
    """What this py-libp2p lacks of what kvswap relies on ([] when all is there). A version other than
    PINNED_VERSION is named first: nothing below was checked against it."""
    problems = []
    version = installed_version() if version is None else version
    if version != PINNED_VERSION:
        problems.append(f"py-libp2p {version} is installed; kvswap was built against {PINNED_VERSION} "
                        f"(node/libp2p_compat.py lists what it relies on): pip install libp2p=={PINNED_VERSION}")
    from libp2p.kad_dht import kad_dht
    from libp2p.kad_dht.provider_store import ProviderStore
    from libp2p.security.secure_session import SecureSession

    from libp2p.host.autonat import autonat as autonat_module
    from libp2p.host.autonat.autonat import AutoNATService
    from libp2p.kad_dht.peer_routing import PeerRouting
    from libp2p.network.swarm import Swarm
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
    from libp2p.relay.circuit_v2.transport import CircuitV2Transport

    wanted = [(kad_dht, "_encode_key"), (ProviderStore, "_get_providers_from_peer_with_closers"),
              (SecureSession, "write"), (kad_dht.KadDHT, "__init__"), (AutoNATService, "_try_dial"),
              (CircuitV2Protocol, "_handle_reserve"), (CircuitV2Protocol, "_handle_connect"),
              (CircuitV2Protocol, "_relay_data"), (CircuitV2Protocol, "_handle_hop_stream"),
              (DCUtRProtocol, "_auto_drive_loop"),
              (DCUtRProtocol, "_close_relayed_conns_after_grace"),
              (Swarm, "_best_connection"),
              (CircuitV2Transport, "_make_reservation"), (PeerRouting, "_query_peer_for_closest"),
              (ProviderStore, "_send_add_provider"), (AutoNATService, "_handle_request"),
              (AutoNATService, "_observed_ip"), (AutoNATService, "_filter_by_observed_ip"),
              (autonat_module, "_is_relayed_stream"), (autonat_module, "_MAX_AUTONAT_MSG_SIZE")]
    problems += [f"py-libp2p {version} has no {getattr(owner, '__name__', owner)}.{name}"
                 for owner, name in wanted if not hasattr(owner, name)]
    return problems


def apply(write_idle_s: float) -> None:
    """What a kvswap host needs before it starts (idempotent): the cancel-safe write, quieter loggers."""
    _shield_secure_writes(write_idle_s)
    for name, level in _QUIET_LOGGERS.items():
        if logging.getLogger(name).level < level:
            logging.getLogger(name).setLevel(level)


def _shield_secure_writes(idle_s: float) -> None:
    from libp2p.io.exceptions import ConnectionClosedError
    from libp2p.security.secure_session import SecureSession

    original = SecureSession.write
    if getattr(original, "_kvswap_cancel_safe", False):
        return

    @functools.wraps(original)
    async def write(self: Any, data: bytes) -> None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + idle_s) as scope:
            await original(self, data)
        if scope.cancelled_caught:  # the peer took no frame for that long: part of one may be on the wire
            with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(Exception):
                await self.close()  # closing a socket: anything it raises means it is gone already
            raise ConnectionClosedError(f"a write of {len(data)} bytes was not taken within {idle_s:g} s")

    write._kvswap_cancel_safe = True  # type: ignore[attr-defined]
    SecureSession.write = write  # type: ignore[method-assign]


def set_provider_rate(dht: Any, per_10_s: int) -> None:
    """ADD_PROVIDER messages a KadDHT accepts per 10 s from one peer."""
    dht._provider_rate_max = per_10_s


def encode_dht_key(key: str) -> bytes:
    """A DHT key as KadDHT hashes and routes it (a CID string parses to its multihash)."""
    from libp2p.kad_dht.kad_dht import _encode_key

    return _encode_key(key)


def providers_from_peer(dht: Any, peer: Any, key_bytes: bytes) -> Awaitable[tuple[list, list]]:
    """One GET_PROVIDERS round to `peer`: (providers, closer peers), the local record store skipped."""
    return dht.provider_store._get_providers_from_peer_with_closers(peer, key_bytes)


def patch_autonat_dial_back(timeout_s: float) -> None:
    """AutoNAT servers dial the requester back afresh (see the module docstring; idempotent)."""
    from libp2p.host.autonat.autonat import AutoNATService
    from multiaddr import Multiaddr

    if getattr(AutoNATService._try_dial, "_kvswap_fresh_dial", False):
        return

    async def _try_dial(self: Any, peer_id: Any, addrs: list[bytes]) -> bytes | None:
        network = self.host.get_network()
        for addr in addrs[:8]:
            conn = None
            with trio.move_on_after(timeout_s), contextlib.suppress(Exception):
                # boundary: dialling an address a peer gave; any failure means "not reachable there"
                conn = await network.dial_addr(Multiaddr(addr), peer_id)
            if conn is not None:
                with trio.move_on_after(1), contextlib.suppress(Exception):
                    await conn.close()  # a test connection: the requester keeps the one it asked over
                return bytes(addr)
        return None

    _try_dial._kvswap_fresh_dial = True  # type: ignore[attr-defined]
    AutoNATService._try_dial = _try_dial  # type: ignore[method-assign]


def serve_autonat(autonat: Any, allow: Any) -> None:
    """Answer AutoNAT on `autonat`'s host (instead of 0.8.1's handler, which registers when the service is made
    with serve=True) with two more rules (issue 26): a DIAL naming another peer than the requester is refused
    (0.8.1 dials whatever peer id the message names), and a DIAL that would be dialled back is refused unless
    `allow(requester base58)` says yes (node/nat.py DialBackLimit). A refusal is E_DIAL_REFUSED: no verdict.
    The rest is 0.8.1's own `_handle_request` (relayed requests refused, only the observed IP dialled)."""
    from libp2p.host.autonat.autonat import _MAX_AUTONAT_MSG_SIZE, AUTONAT_PROTOCOL_ID, _is_relayed_stream
    from libp2p.host.autonat.pb.autonat_pb2 import Message
    from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

    def refusal(text: str) -> Any:
        response = Message()
        response.type = Message.DIAL_RESPONSE
        response.dialResponse.status = Message.E_DIAL_REFUSED
        response.dialResponse.statusText = text
        return response

    async def handle(stream: Any) -> None:
        try:
            # boundary: a peer's request is arbitrary bytes; a bad one ends its stream, nothing else
            with trio.move_on_after(30):
                request = Message()
                request.ParseFromString(await read_varint_prefixed_bytes_limited(stream, _MAX_AUTONAT_MSG_SIZE))
                requester = stream.muxed_conn.peer_id
                observed, relayed = autonat._observed_ip(stream), _is_relayed_stream(stream)
                dial = request.type == Message.DIAL
                would_dial = dial and not relayed and bool(autonat._filter_by_observed_ip(
                    [bytes(a) for a in request.dial.peer.addrs], observed))
                if dial and bytes(request.dial.peer.id) != requester.to_bytes():
                    response = refusal("a dial-back only for the requesting peer")
                elif would_dial and not allow(requester.to_base58()):
                    response = refusal("too many dial-back requests")
                else:
                    response = await autonat._handle_request(request, observed, relayed)
                await stream.write(encode_varint_prefixed(response.SerializeToString()))
        except Exception as exc:
            logging.getLogger(__name__).debug("AutoNAT request failed: %r", exc)
        finally:
            with trio.move_on_after(2), contextlib.suppress(Exception):
                await stream.close()

    autonat.host.set_stream_handler(AUTONAT_PROTOCOL_ID, handle)


def relay_limits(t: Any) -> Any:
    """py-libp2p's RelayLimits from kvswap's NatTuning."""
    from libp2p.relay.circuit_v2.resources import RelayLimits

    return RelayLimits(duration=int(t.relay_circuit_duration_s), data=int(t.relay_circuit_bytes),
                       max_circuit_conns=int(t.relay_circuits_per_reservation),
                       max_reservations=int(t.relay_max_reservations), reservation_ttl=int(t.relay_reservation_ttl_s))


def _remote_ip(stream: Any) -> str | None:
    with contextlib.suppress(Exception):  # a stream without a socket address (a relayed one)
        remote = stream.get_remote_address()
        return str(remote[0]) if remote else None
    return None


async def _end_stream(stream: Any) -> None:
    """Reset a stream of the relay's (unless it is reset already, or its connection gone) and drop what it still
    buffers (`_drop_unread`)."""
    with contextlib.suppress(Exception):
        await stream.reset()
    with contextlib.suppress(Exception):
        await _drop_unread(stream)


async def _drop_unread(stream: Any) -> None:
    """A relayed stream the relay has reset: drop what its peer sent that nobody will read. 0.8.1's Yamux keeps a
    reset stream with unread bytes (and appends what still arrives for it) until its stale-stream sweep, 60-90 s
    later: a relay under a flood held tens of MB of them (BENCHMARKS.md, "A relay under load")."""
    muxed = getattr(stream, "muxed_stream", None)
    conn = getattr(muxed, "conn", None)
    if not getattr(muxed, "closed", False) or not isinstance(getattr(conn, "stream_buffers", None), dict):
        return
    async with conn.streams_lock:
        buffer = conn.stream_buffers.get(muxed.stream_id)
        if buffer:
            buffer.clear()
            conn._finalize_stream_locked(muxed, fully_closed=True)  # with no bytes buffered: forgotten now


def _hold_window(stream: Any) -> None:
    """Keep a relayed stream's Yamux receive window at py-libp2p's initial 256 KiB: 0.8.1 doubles it, up to 16 MiB,
    whenever two window updates come within 4 RTTs (a circuit's first few small reads, before this call: 4-16 MiB
    granted), and then credits back what was read; the relay buffers up to a window per stream while the other side
    is slower (a flood of 4 MiB circuits: 72 MB at once). Held, a stream is granted more only while less than 256 KiB
    is granted or buffered; what was granted before is spent once; a peer sending beyond it is still buffered (0.8.1)."""
    from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE as window

    muxed = getattr(stream, "muxed_stream", None)
    if not hasattr(muxed, "_auto_tune_and_send_window_update") or not hasattr(muxed, "send_window_update"):
        return

    async def credit(*, bytes_read: int = 0) -> None:  # this stream's own: the host's other streams still grow
        async with muxed.window_lock:
            delta = window - (muxed.recv_window + len(muxed.conn.stream_buffers.get(muxed.stream_id, b"")))
            if delta < window // 2:  # half a window at least, as py-libp2p batches its updates
                return
            muxed.recv_window += delta
        await muxed.send_window_update(delta, skip_lock=True)

    muxed._auto_tune_and_send_window_update = credit


def bound_relay(hop: Any, t: Any) -> dict:
    """Reservations per IP address and circuits in total on one hop service; a RESERVE only for its sender
    (see the module docstring). Returns the live counters {"circuits": n, "refused": n}."""
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
    from libp2p.relay.circuit_v2.utils import write_delimited_msg

    rm = hop.resource_manager
    ips: dict = {}  # reserving peer -> its IP
    pending: set = set()  # peers whose request is being answered
    counters = {"circuits": 0, "refused": 0}
    reserve, connect = hop._handle_reserve, hop._handle_connect

    async def refuse(stream: Any) -> None:
        counters["refused"] += 1
        with trio.move_on_after(2), contextlib.suppress(Exception):  # the peer may be gone already
            await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS,
                                                         status=to_proto_status(StatusCode.RESOURCE_LIMIT_EXCEEDED)))

    async def bounded_reserve(stream: Any, msg: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if msg.HasField("peer") and msg.peer.id and bytes(msg.peer.id) != peer.to_bytes():
            await refuse(stream)
            return
        rm._clean_expired()
        for p in [p for p in ips if p not in rm._reservations and p not in pending]:
            del ips[p]
        ip = _remote_ip(stream)
        if peer not in ips and sum(1 for v in ips.values() if v == ip) >= t.relay_max_reservations_per_ip:
            await refuse(stream)
            return
        ips[peer] = ip  # counted before the answer: concurrent requests from one IP see each other
        pending.add(peer)
        try:
            await reserve(stream, msg)
        finally:
            pending.discard(peer)
            if peer not in rm._reservations:
                ips.pop(peer, None)

    circuits_by_ip: dict = {}  # source IP -> circuits it has open
    circuits_to: dict = {}  # destination peer (bytes) -> circuits open to it

    def count(table: dict, key: Any, step: int) -> None:
        table[key] = table.get(key, 0) + step
        if not table[key]:
            del table[key]

    async def bounded_connect(stream: Any, msg: Any) -> None:
        # counted here, before the first await: 0.8.1 counts a reservation's circuits only once the target
        # accepted, so concurrent CONNECTs to one peer all passed its check (5 circuits to a 4-circuit slot)
        ip, dst = _remote_ip(stream), bytes(msg.peer.id) if msg.HasField("peer") else b""
        if (counters["circuits"] >= t.relay_max_circuits or circuits_by_ip.get(ip, 0) >= t.relay_max_circuits_per_ip
                or circuits_to.get(dst, 0) >= t.relay_circuits_per_reservation):
            await refuse(stream)
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        counters["circuits"] += 1
        count(circuits_by_ip, ip, 1)
        count(circuits_to, dst, 1)
        try:
            await connect(stream, msg)
        finally:
            counters["circuits"] -= 1
            count(circuits_by_ip, ip, -1)
            count(circuits_to, dst, -1)

    relay_data = hop._relay_data
    directions: dict = {}  # the circuit's two streams -> the cancel scopes of its directions still running

    async def bounded_relay_data(src: Any, dst: Any, peer_id: Any, deadline: float | None = None,
                                 data_limit: Any = None) -> None:
        key = frozenset((id(src), id(dst)))
        scope = trio.CancelScope()
        if deadline is not None:  # 0.8.1 checks the duration only between reads: a silent circuit outlived it
            scope.deadline = trio.current_time() + max(0.0, deadline - time.monotonic())
        scopes = directions.setdefault(key, [])
        scopes.append(scope)
        _hold_window(src)  # each direction its source: both streams of the circuit
        try:
            with scope:
                await relay_data(src, dst, peer_id, deadline, data_limit)
        finally:
            scopes.remove(scope)
            for other in scopes:  # one direction ended (EOF, reset, its budget spent): the circuit ends
                other.cancel()
            if not scopes:
                directions.pop(key, None)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for s in (src, dst):
                    await _end_stream(s)
            for k, pair in list(hop._active_relays.items()):
                if any(x is src or x is dst for x in pair):
                    hop._active_relays.pop(k, None)

    hop_stream = hop._handle_hop_stream

    async def ended_hop_stream(stream: Any) -> None:
        try:
            await hop_stream(stream)
        finally:  # 0.8.1 returns from a hop stream its peer closed (after a RESERVE, a refused CONNECT) without
            # closing its own side: Yamux kept each for the connection's life (+15 in a test round of 15 CONNECTs)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await _end_stream(stream)

    hop._handle_reserve, hop._handle_connect = bounded_reserve, bounded_connect
    hop._relay_data, hop._handle_hop_stream = bounded_relay_data, ended_hop_stream  # the service registers it
    return counters


def advertise_also(host: Any, extra: Any) -> None:
    """`host.get_addrs()` (what identify and the DHT's records carry) followed by `extra()`'s full multiaddrs.
    Needed for relayed addresses: 0.8.1's get_addrs strips each address at its first /p2p/ component before
    appending our own, which turns `<relay>/p2p/<relay id>/p2p-circuit` into the relay's address under our id."""
    from multiaddr import Multiaddr

    original = host.get_addrs

    def get_addrs() -> list:
        out = list(original())
        seen = {str(a) for a in out}
        return out + [Multiaddr(a) for a in extra() if a not in seen]

    host.get_addrs = get_addrs


def drive_dcutr(dcutr: Any, relay_close_grace_s: float) -> None:
    """Turn off py-libp2p's DCUtR driver on `dcutr` (before it runs): every 2 s it started an exchange with each
    relayed peer in turn, awaiting each, and from both sides of a connection at once. node/nat.py starts the
    exchanges instead (`punch_due`); the DCUtR stream handler still answers the peer's. After an upgrade the
    relayed connection is closed `relay_close_grace_s` later (0.8.1 waits 60 s): new streams take the direct
    one (`prefer_direct_connections`), and the idle circuit held one of the relay's slots for the target, so
    fetchers reaching a holder behind a NAT were refused (31-34 refusals per relay in one swarm run)."""

    async def driven_elsewhere() -> None:
        await trio.sleep_forever()

    close_after = dcutr._close_relayed_conns_after_grace

    async def close_sooner(peer_id: Any, grace: float = relay_close_grace_s) -> None:
        await close_after(peer_id, grace=min(grace, relay_close_grace_s))

    dcutr._auto_drive_loop = driven_elsewhere
    dcutr._close_relayed_conns_after_grace = close_sooner


def _relayed_conn(conn: Any) -> bool:
    """A connection is relayed when its type says so or every transport address it has names a circuit (an
    inbound TCP connection may have none recorded: it is direct); one closing under us counts as relayed."""
    from libp2p.connection_types import ConnectionType

    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
        addrs = getattr(conn, "_actual_transport_addresses", None) or []
        return bool(addrs) and all("/p2p-circuit" in str(a) for a in addrs)
    except Exception:  # a connection closing under us: not direct
        return True


def has_direct_connection(host: Any, peer_id: Any) -> bool:
    """Whether `peer_id` is connected other than through a relay (`_relayed_conn`)."""
    conns = host.get_network().connections.get(peer_id) or []
    return any(not _relayed_conn(conn) for conn in (conns if isinstance(conns, list) else [conns]))


def stream_relayed(stream: Any) -> bool:
    """Whether `stream` runs over a relayed connection (`_relayed_conn`): a stream the swarm opened after it
    dialled a peer's circuit address itself, which a wait for the upgrade beforehand cannot rule out (a
    relayed dial that failed left the peer unconnected, and the swarm then dialled every address it knew)."""
    conn = getattr(stream, "swarm_conn", None)
    return conn is not None and _relayed_conn(conn)


def prefer_direct_connections(host: Any) -> None:
    """New streams to a peer go over a direct connection to it when there is one (`Swarm._best_connection`).
    0.8.1 prefers connections typed DIRECT, then the one with more streams, but a hole-punched connection is
    not typed DIRECT: every new stream, chunk requests with their bytes among them, kept going through the
    relay, the older connection with more streams, until DCUtR closed it a minute later (issue 26)."""
    network = host.get_network()

    def best(connections: list) -> Any:
        def key(conn: Any) -> tuple:
            try:
                streams = len(conn.get_streams())
            except Exception:  # a connection closing under us
                streams = 0
            return (not _relayed_conn(conn), streams, id(conn))

        return max(connections, key=key)

    network._best_connection = best


def ask_peer_about(dht: Any, peer: Any, target: Any) -> Awaitable[list]:
    """One FIND_NODE for `target` to `peer` (`PeerRouting._query_peer_for_closest`): the addresses it knows for
    the peers closest to `target`, `target` itself among them, land in our peerstore. KadDHT's find_peer
    answers from our own peerstore first, so it never learns a private peer's relayed addresses that its
    relays hold (issue 26)."""
    return dht.peer_routing._query_peer_for_closest(peer, target.to_bytes())


def provide_to(dht: Any, peer: Any, key_bytes: bytes) -> Awaitable[bool]:
    """One ADD_PROVIDER of `key_bytes` to `peer` (`ProviderStore._send_add_provider`), without KadDHT's lookup
    of the closest peers first: behind a NAT that lookup took up to a query timeout per key (issue 26)."""
    return dht.provider_store._send_add_provider(peer, key_bytes)


def reserve_on(transport: Any, stream: Any, relay_id: Any) -> Awaitable[bool]:
    """One RESERVE on an open hop stream (the transport keeps the voucher and expiry)."""
    return transport._make_reservation(stream, relay_id)


def reservation_expiry(transport: Any, relay_id: Any) -> float | None:
    return transport._reservations.get(relay_id)


def relay_load(hop: Any) -> dict:
    """Reservations held and circuits open on a hop service."""
    return {"reservations": len(hop.resource_manager._reservations), "circuits": len(hop._active_relays)}


def observed_ips(host: Any) -> list[str]:
    """IPv4 addresses peers saw our connections come from (identify), one observer enough."""
    manager = getattr(host, "_observed_addr_manager", None)
    out: list[str] = []
    with contextlib.suppress(Exception):  # no observations yet
        for a in manager.addrs(min_observers=1):
            with contextlib.suppress(Exception):
                ip = a.value_for_protocol("ip4")
                if ip and ip not in out:
                    out.append(ip)
    return out


__all__ = ["PINNED_VERSION", "advertise_also", "apply", "ask_peer_about", "bound_relay", "drive_dcutr", "prefer_direct_connections", "stream_relayed", "provide_to", "check", "encode_dht_key", "has_direct_connection",
           "installed_version", "observed_ips", "patch_autonat_dial_back", "providers_from_peer", "relay_limits",
           "relay_load", "reservation_expiry", "reserve_on", "serve_autonat", "set_provider_rate"]
