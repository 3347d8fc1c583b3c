"""The libp2p side of a node (trio): host, Kademlia DHT, gossipsub, stream handlers, re-provide loop.

Everything here runs on the trio loop of node/bridge.py (py-libp2p 0.8.1 is trio-only). The host identity is
the node's 32-byte Ed25519 seed, the same key that signs manifests, so "who signed" and "who served" are one
peer id. Facts about py-libp2p 0.8.1 this module relies on (measured here):
- KadDHT needs `max_peers_per_subnet=0`, or peers sharing a /24 (every loopback test node) are capped.
- KadDHT only learns peers we add: we add every connected peer to the routing table on a short loop.
- KadDHT rate-limits ADD_PROVIDER to 10 per 10 s per sender; kvswap provides every chunk CID, so our own
  nodes accept more (DhtTuning.provider_rate_max), and our re-provide loop paces itself.
- find_providers answers from the local provider store first when it has any record; the fetcher therefore
  also asks connected peers directly (node/fetch.py).
- Behind a NAT (node/nat.py, issue 26): the swarm never dials a /p2p-circuit address, so a private peer is
  dialled here through its relay (`_dial_through_relay`); KadDHT's lookups and provides spend their timeout on
  peers nobody can dial, so provider lookups also ask the directly connected peers (`_first_providers`) and a
  private node provides to them (`_provide_to_neighbours`).
- A secure-channel write cut by a trio cancellation (after the frame was encrypted, or half sent) kills the
  whole connection to that peer; node/libp2p_compat.py makes each such write run to its end (applied when a
  host starts, as are the other uses of py-libp2p's private parts: all of them live in that module).

The DHT keys themselves (CID strings, document keys) are defined in protocol/names.py: peers must agree on them.

Errors: py-libp2p and the sockets under it fail in many exception types. Dials, streams and publishes map
the ones a failing peer or network raises (`PEER_FAILURES`) to RemoteProtocolError / ProtocolError with
kvswap.protocol.errors.map_exceptions; malformed addresses and peer ids given by a user are UsageError. DHT queries
go through `_dht_query`, the one place that catches everything: they run py-libp2p's Kademlia code against
arbitrary peers' bytes, and a failed lookup or provide must be an empty answer, never a dead node.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sqlite3
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

import multiaddr
import multiaddr.exceptions
import trio
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.exceptions import RateLimitError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.rcmgr.exceptions import ResourceManagerException
from libp2p.tools.anyio_service import background_trio_service
from libp2p.tools.anyio_service.exceptions import ServiceException

from kvswap.protocol.errors import KvswapError, ProtocolError, RemoteProtocolError, UsageError, map_exceptions
from kvswap.protocol import limits

from . import libp2p_compat, nat
from .quota import RateGate, RefusalLog
from .tuning import DEFAULT_TUNING, NodeTuning

log = logging.getLogger(__name__)

StreamHandler = Callable[[Any], Awaitable[None]]
GossipHandler = Callable[[bytes, str], None]

#: What py-libp2p (and the sockets and trio streams under it) raise when a peer or the network fails: a
#: dial refused or timed out, a handshake or negotiation failed, a stream reset or closed, a resource or
#: rate limit hit, no known address. Translated to RemoteProtocolError where kvswap calls into libp2p;
#: anything else is a bug.
PEER_FAILURES: tuple[type[BaseException], ...] = (
    BaseLibp2pError, PeerStoreError, RateLimitError, ResourceManagerException, ServiceException, OSError,
    EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
)
#: What parsing a malformed multiaddr or peer id raises.
ADDRESS_ERRORS: tuple[type[BaseException], ...] = (ValueError, multiaddr.exceptions.Error)


def key_pair_from_seed(seed: bytes):
    """The libp2p Ed25519 key pair of a node's 32-byte identity seed."""
    if not isinstance(seed, bytes) or len(seed) != 32:
        raise UsageError("a node identity seed is 32 bytes")
    return create_new_key_pair(seed)


def peer_id_of_seed(seed: bytes) -> str:
    """The peer id string (base58) a seed gives, without starting a host."""
    return ID.from_pubkey(key_pair_from_seed(seed).public_key).to_base58()


def peer_id_of_public_key(public_hex: str) -> str:
    """The peer id of an Ed25519 public key (64 hex digits, as `kvswap id` prints and trust lists hold)."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey

    return ID.from_pubkey(Ed25519PublicKey.from_bytes(bytes.fromhex(public_hex))).to_base58()


def split_addr(addr: str) -> tuple[str, Any]:
    """A multiaddr ending in /p2p/<peer id> -> (peer id string, PeerInfo). UsageError otherwise."""
    with map_exceptions({ADDRESS_ERRORS: UsageError}, f"not a peer multiaddr (expected .../p2p/<peer id>): {addr!r:.120}"):
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    return info.peer_id.to_base58(), info


def advertised(candidates: Iterable[Any], interfaces: Callable[[int], list[Any]] | None = None) -> list[Any]:
    """The addresses a host tells peers (identify, DHT records): a wildcard listen address (0.0.0.0) becomes
    one address per IPv4 interface, loopback left out when any other exists, because a peer that dials
    0.0.0.0 or 127.0.0.1 reaches itself, not us. Explicit addresses are advertised as they are.
    `interfaces(port)` lists candidate multiaddrs (default: libp2p's interface scan)."""
    if interfaces is None:
        from libp2p.utils.address_validation import get_available_interfaces as interfaces
    out: list[Any] = []
    for addr in candidates:
        try:
            wildcard = addr.value_for_protocol("ip4") == "0.0.0.0"
        except LookupError:  # no ip4 component (ip6, dns...): as it is (multiaddr's ProtocolLookupError)
            wildcard = False
        if not wildcard:
            out.append(addr)
            continue
        found = [m for m in interfaces(int(addr.value_for_protocol("tcp"))) if str(m).startswith("/ip4/")]
        routable = [m for m in found if not m.value_for_protocol("ip4").startswith("127.")]
        out += routable or found or [addr]
    return list({str(a): a for a in out}.values())


@dataclass
class P2PConfig:
    seed: bytes
    listen_addrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    enable_mdns: bool = False
    tuning: NodeTuning = DEFAULT_TUNING
    #: reachability behind NAT: AutoNAT, relays, hole punching (node/nat.py)
    nat: nat.NatConfig = field(default_factory=nat.NatConfig)


class _ConnectionTracker(INotifee):
    """Every connection the host opened or accepted, held weakly: what `_close_connections` closes when the
    host stops (py-libp2p's own table has forgotten most of them by then)."""

    def __init__(self) -> None:
        self.conns: weakref.WeakSet = weakref.WeakSet()

    async def connected(self, network: Any, conn: Any) -> None:
        self.conns.add(conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        pass  # kept until garbage: a connection "disconnected" by a cancellation may still hold its socket

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


class P2PHost:
    """A running libp2p host with DHT and gossipsub. Use `async with P2PHost(cfg).running():` on trio."""

    def __init__(self, config: P2PConfig) -> None:
        self.config = config
        self.tuning = config.tuning
        self.host: Any = None
        self.dht: Any = None
        self.pubsub: Any = None
        self.gossipsub: Any = None
        self._key_pair = key_pair_from_seed(config.seed)
        self._handlers: dict[str, StreamHandler] = {}
        self._provided: dict[str, None] = {}  # insertion-ordered set of keys we re-provide
        self._provide_queue_send, self._provide_queue_recv = trio.open_memory_channel[str](math.inf)
        self._topics: dict[str, list[GossipHandler]] = {}
        self._nursery: trio.Nursery | None = None
        #: optional callable (run in a worker thread) -> iterable of DHT keys this node should provide
        self.provide_source: Callable[[], Iterable[str]] | None = None
        #: gossip messages accepted per originator (node/quota.py); the rest are dropped and counted
        g = self.tuning.gossip
        self.gossip_gate = RateGate(g.burst, g.rate_per_s, g.max_senders)
        #: ...per peer that delivers them (a fresh key per announcement does not multiply a peer's rate), and all
        #: peers together (the last bound, whatever the keys and peers)
        self.forwarder_gate = RateGate(g.forwarder_burst, g.forwarder_rate_per_s, g.max_senders)
        self.total_gate = RateGate(g.total_burst, g.total_rate_per_s, 1)
        self.gossip_dropped = RefusalLog(log, "dropped gossip", self.tuning.serve.refusal_log_interval_s)
        #: AutoNAT, relays and hole punching, once the host runs (node/nat.py)
        self.nat: nat.NatService | None = None
        #: private providers being connected to ahead of their use (`_warm_up`)
        self._warming: set[str] = set()

    # --- lifecycle ----------------------------------------------------------------------------------------

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Register a handler for a protocol id (before or after start)."""
        self._handlers[protocol] = handler
        if self.host is not None:
            self.host.set_stream_handler(protocol, handler)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start everything, report started via task_status, and run until cancelled."""
        libp2p_compat.apply(write_idle_s=self.tuning.serve.stream_idle_timeout_s)
        with map_exceptions({ADDRESS_ERRORS: UsageError}, f"bad listen multiaddr in {self.config.listen_addrs}"):
            listen = [multiaddr.Multiaddr(a) for a in self.config.listen_addrs]
        self.host = new_host(key_pair=self._key_pair, listen_addrs=listen, enable_mDNS=self.config.enable_mdns,
                             addrs_factory=advertised)
        libp2p_compat.advertise_also(self.host, self._relayed_addrs)
        self._connections = _ConnectionTracker()
        self.host.get_network().register_notifee(self._connections)
        for protocol, handler in self._handlers.items():
            self.host.set_stream_handler(protocol, handler)
        self.dht = KadDHT(self.host, DHTMode.SERVER, max_peers_per_subnet=0)
        libp2p_compat.set_provider_rate(self.dht, self.tuning.dht.provider_rate_max)
        self.gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V11],
            degree=6,
            degree_low=1,
            degree_high=12,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=1,
            eclipse_protection_enabled=False,  # every test peer shares 127.0.0.1
        )
        self.pubsub = Pubsub(self.host, self.gossipsub, max_inbound_rpc_size=limits.MAX_GOSSIP_RPC_BYTES)
        async with self.host.run(listen_addrs=listen):
            try:
                async with background_trio_service(self.dht):
                    async with background_trio_service(self.pubsub), background_trio_service(self.gossipsub):
                        await self.pubsub.wait_until_ready()
                        async with trio.open_nursery() as nursery:
                            self._nursery = nursery
                            nursery.start_soon(self._routing_sync_loop)
                            nursery.start_soon(self._provide_worker)
                            nursery.start_soon(self._reprovide_loop)
                            c = self.config.nat
                            self.nat = nat.NatService(self.host, self.tuning.nat, reachability=c.reachability,
                                                      relay=c.relay, relays=c.relays, bootstrap=self.config.bootstrap,
                                                      hole_punching=c.hole_punching, relay_data=c.relay_data)
                            self.nat.on_addrs_changed = self._readvertise
                            await nursery.start(self.nat.run)
                            for addr in self.config.bootstrap:
                                nursery.start_soon(self._bootstrap, addr)
                            task_status.started()
                            await trio.sleep_forever()
            finally:
                await self._close_connections()

    async def _close_connections(self) -> None:
        """Close every connection when the host stops. py-libp2p leaves them to task cancellation, which does
        not close the sockets: a host stopped inside a longer-lived process (a test, a benchmark, an embedding
        application) stayed connected, its peers kept sending it requests nobody answered, and each waited for
        its deadline (bench hostile's slow mode). Peers see the connection end at once instead."""
        with trio.CancelScope(shield=True), trio.move_on_after(self.tuning.dht.connection_close_timeout_s):
            await self.host.get_network().close()
            # the cancellation that stopped the host has already dropped most connections from the swarm's
            # table (its clean-up marks them closed) without closing their muxers or sockets: close those too
            for conn in list(self._connections.conns):
                if not conn.muxed_conn.is_closed:
                    with contextlib.suppress(*PEER_FAILURES):
                        await conn.muxed_conn.close()

    async def _bootstrap(self, addr: str) -> None:
        """Dial a bootstrap peer until it answers (backing off to `bootstrap_retry_max_s`): it may start after
        us (a testnet or a compose file starting every node at once), and a node that missed its only
        bootstrap peer once would otherwise stay alone for good."""
        delay = self.tuning.dht.bootstrap_retry_s
        while True:
            try:
                await self.connect(addr)
                return
            except UsageError as exc:  # not a peer multiaddr: retrying will not help
                log.warning("bootstrap %s: %s", addr, exc)
                return
            except KvswapError as exc:
                log.warning("bootstrap %s: %s (again in %g s)", addr, exc, delay)
            await trio.sleep(delay)
            delay = min(2 * delay, self.tuning.dht.bootstrap_retry_max_s)
            network = self.host.get_network()
            if hasattr(network, "unblock_peer"):  # libp2p refuses a peer that failed in the last 60 s
                network.unblock_peer(split_addr(addr)[1].peer_id)

    # --- identity and peers -------------------------------------------------------------------------------

    def _relayed_addrs(self) -> list[str]:
        """What identify and the DHT advertise besides `advertised`: a private node's relayed addresses."""
        if self.nat is None:
            return []
        return [str(a) for a in nat.advertise([], self.nat.reach.status, self.nat.relay_addrs())]

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<peer id>) other nodes can dial: what identify and the DHT advertise
        (`advertised`)."""
        return list(dict.fromkeys(str(a) for a in self.host.get_addrs()))

    @property
    def listen_ip(self) -> str:
        """The IPv4 address the host listens on (for the data plane)."""
        for a in self.host.get_transport_addrs():
            with contextlib.suppress(multiaddr.exceptions.Error):  # an address without ip4
                return a.value_for_protocol("ip4")
        return "127.0.0.1"

    async def connect(self, addr: str) -> str:
        """Dial a peer multiaddr (.../p2p/<id>); returns its peer id. RemoteProtocolError on failure."""
        pid, info = split_addr(addr)
        with trio.move_on_after(self.tuning.serve.dial_timeout_s) as scope:
            with map_exceptions({PEER_FAILURES: RemoteProtocolError}, f"cannot dial {addr}"):
                await self.host.connect(info)
        if scope.cancelled_caught:
            raise RemoteProtocolError(f"dialing {addr} timed out after {self.tuning.serve.dial_timeout_s:g} s")
        await self._add_to_routing(info.peer_id)
        return pid

    def peer_id_obj(self, peer_id: str):
        with map_exceptions({ADDRESS_ERRORS: UsageError}, f"not a peer id: {peer_id!r:.80}"):
            return ID.from_base58(peer_id)

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers()]

    def peers(self) -> list[dict]:
        """Connected peers with their known addresses."""
        return [{"peer_id": pid.to_base58(), "addrs": [str(a) for a in self._known_addrs(pid)]}
                for pid in self.host.get_connected_peers()]

    def peer_ips(self, peer_id: str) -> set[str]:
        """IPv4 addresses at which we know `peer_id` (the data plane only dials these)."""
        out: set[str] = set()
        try:
            pid = self.peer_id_obj(peer_id)
        except UsageError:  # not a peer id: known at no address
            return out
        for a in self._known_addrs(pid):
            with contextlib.suppress(multiaddr.exceptions.Error):  # not an ip4 address
                out.add(a.value_for_protocol("ip4"))
        return out

    async def open_stream(self, peer_id: str, protocol: str) -> Any:
        """A new stream to `peer_id` speaking `protocol`; dials if needed (asking the DHT for the addresses of a
        peer known only by its id, e.g. one a rationed chunk answer named)."""
        try:
            pid = self.peer_id_obj(peer_id)
        except UsageError as exc:  # ids come from peers too: a bad one is their fault, not the user's
            raise RemoteProtocolError(str(exc)) from None
        stream = None
        with trio.move_on_after(self.tuning.serve.dial_timeout_s) as scope:
            if not self._known_addrs(pid):
                await self._find_addrs(pid)
            await self._dial_through_relay(pid)
            with map_exceptions({PEER_FAILURES: RemoteProtocolError}, f"cannot open {protocol} to {peer_id[:16]}"):
                stream = await self.host.new_stream(pid, [protocol])
        if scope.cancelled_caught:
            raise RemoteProtocolError(f"opening {protocol} to {peer_id[:16]} timed out")
        return stream

    async def _dial_through_relay(self, pid: Any) -> None:
        """Connect to a peer that may be private: its direct addresses first where `nat.direct_first` says so,
        then through one of its relays (node/nat.py). Nothing when connected already; a peer with direct
        addresses only is left to the swarm, as before, once the direct dial failed."""
        if self.nat is None or pid in self.host.get_connected_peers():
            return
        limit = self.tuning.nat.max_peer_relay_addrs
        direct, relayed = nat.checked_addrs(pid.to_base58(), self._known_addrs(pid), limit)
        direct = nat.direct_first(direct, relayed, [self.listen_ip])
        if direct:
            with trio.move_on_after(self.tuning.nat.direct_dial_timeout_s), contextlib.suppress(*PEER_FAILURES):
                await self.host.connect(PeerInfo(pid, direct))
            if pid in self.host.get_connected_peers():
                return
        if not relayed:  # its record may predate its reservations: the peers we know may know its current ones
            await self._addrs_from_neighbours(pid)
            _, relayed = nat.checked_addrs(pid.to_base58(), self._known_addrs(pid), limit)
        if relayed:
            await self.nat.dial_relayed(pid, relayed)

    async def _addrs_from_neighbours(self, pid: Any) -> None:
        """Ask the peers we are directly connected to (relays and bootstrap peers among them) what addresses
        they know for `pid` (one FIND_NODE each, in parallel); what they name lands in the peerstore."""
        async def ask(peer: Any) -> None:
            with trio.move_on_after(self.tuning.dht.query_timeout_s / 3):
                await self._dht_query(f"FIND_NODE {pid} from {peer}", libp2p_compat.ask_peer_about, self.dht, peer, pid)

        async with trio.open_nursery() as nursery:
            for peer in self.host.get_connected_peers()[: self.tuning.nat.autonat_max_servers]:
                if peer != pid and not self.relayed(peer.to_base58()):
                    nursery.start_soon(ask, peer)

    async def direct_path(self, peer_id: str) -> None:
        """Before chunk bytes go to or come from `peer_id`: wait (nat.upgrade_wait_s, longer while a hole punch
        may still come: `nat.upgrade_wait_over`) for a relayed connection to become direct (DCUtR), then allow
        it unless it is still relayed and `node.relay_data` is off: RelayOnly (a RemoteProtocolError, so the
        fetch moves on to other providers)."""
        if self.nat is None:
            return
        try:
            pid = self.peer_id_obj(peer_id)
        except UsageError as exc:  # ids come from peers too
            raise RemoteProtocolError(str(exc)) from None
        started = time.monotonic()
        if pid not in self.host.get_connected_peers():  # connect first (through a relay if need be), then wait
            with trio.move_on_after(self.tuning.serve.dial_timeout_s):
                if not self._known_addrs(pid):  # a peer a rationed answer named: our neighbours know it best
                    await self._addrs_from_neighbours(pid)
                if not self._known_addrs(pid):
                    await self._find_addrs(pid)
                await self._dial_through_relay(pid)
        dialled = time.monotonic()
        direct = await self.nat.wait_direct(pid)
        if dialled - started > 1.0 or time.monotonic() - dialled > 1.0:
            state = "relayed" if not direct else "direct" if pid in self.host.get_connected_peers() else "not connected"
            log.info("path to %s: dialled for %.1f s, then %.1f s for the upgrade: %s", peer_id[:16],
                     dialled - started, time.monotonic() - dialled, state)
        if direct or self.nat.relay_data:
            return  # direct, or not connected yet: the stream's dial decides (`open_chunk_stream` checks it)
        raise self._relay_only(peer_id)

    async def open_chunk_stream(self, peer_id: str, protocol: str) -> Any:
        """A stream that carries chunk bytes: `direct_path` first, and never one over a relayed connection
        while `node.relay_data` is off. The swarm may still open one there (it dials a circuit address itself
        when it has no connection): that stream is reset, and the wait for the upgrade runs once more on the
        connection then open, before RelayOnly."""
        for _ in range(2):
            await self.direct_path(peer_id)
            stream = await self.open_stream(peer_id, protocol)
            if self.nat is None or self.nat.relay_data or not libp2p_compat.stream_relayed(stream):
                return stream
            log.info("a %s stream to %s went over a relay: reset", protocol, peer_id[:16])
            with contextlib.suppress(Exception):  # boundary: the stream's connection may be gone already
                await stream.reset()
        raise self._relay_only(peer_id)

    def path_pending(self, peer_id: str) -> bool:
        """Whether chunk bytes to or from `peer_id` must wait for `direct_path`: it is connected only through a
        relay, or not connected and known at relayed addresses (a private peer: its direct ones are behind its
        NAT, so the dial goes through its relay, then the wait for the hole punch)."""
        if self.nat is None:
            return False
        try:
            pid = self.peer_id_obj(peer_id)
        except UsageError:
            return False
        if pid in self.host.get_connected_peers():
            return self.nat.relayed_only(pid)
        return self._advertises_relays(pid)

    def private_peer(self, peer_id: str) -> bool:
        """Whether `peer_id` is behind a NAT as far as this node knows: it advertises relayed addresses (its
        direct ones are then LAN addresses, `nat.direct_first`). False for a peer id that is no peer id."""
        try:
            return self._advertises_relays(self.peer_id_obj(peer_id))
        except UsageError:
            return False

    def _advertises_relays(self, pid: Any) -> bool:
        _, relayed = nat.checked_addrs(pid.to_base58(), self._known_addrs(pid), self.tuning.nat.max_peer_relay_addrs)
        return bool(relayed)

    @staticmethod
    def _relay_only(peer_id: str) -> Exception:
        return nat.RelayOnly(f"peer {peer_id[:16]} is reachable only through a relay, and chunk bytes do not go over "
                             f"relays (node.relay_data is off)")

    def dataplane_reachable(self, peer_id: str) -> bool:
        """Whether `peer_id` can reach our data plane: not when we are private (its port is not mapped), nor
        over a relayed connection. The chunks then go on the libp2p stream."""
        if self.nat is None:
            return True
        return self.nat.reach.status != nat.PRIVATE and not self.relayed(peer_id)

    def relayed(self, peer_id: str) -> bool:
        """Whether our only connection to `peer_id` runs through a relay."""
        if self.nat is None:
            return False
        with contextlib.suppress(UsageError):
            return self.nat.relayed_only(self.peer_id_obj(peer_id))
        return False

    def _known_addrs(self, pid: Any) -> list:
        try:
            return list(self.host.get_peerstore().addrs(pid))
        except PeerStoreError:  # a peer it never heard of
            return []

    async def _dht_query(self, what: str, query: Callable[..., Awaitable[Any]], *args: Any, default: Any = None) -> Any:
        """`await query(*args)`, or `default` if it fails (logged). The one blanket catch of this module, on
        purpose: a DHT query runs py-libp2p's Kademlia code against arbitrary peers' bytes, which lets assorted
        exception types escape (protobuf, libp2p, socket errors, plain ValueError/KeyError); a failed lookup or
        provide is an empty answer, and the provide and routing loops calling this must never die."""
        try:
            return await query(*args)
        except Exception as exc:  # boundary: peers' DHT answers; see the docstring
            log.debug("%s failed: %r", what, exc)
            return default

    async def _find_addrs(self, pid: Any) -> None:
        """Put the addresses of `pid` in the peerstore via a DHT peer lookup (no-op if nobody knows it)."""
        info = await self._dht_query(f"find_peer {pid}", self.dht.find_peer, pid)
        if info is not None and info.addrs:
            self.host.get_peerstore().add_addrs(pid, info.addrs, self.tuning.dht.peerstore_addr_ttl_s)

    async def _add_to_routing(self, pid: Any) -> None:
        """Routing-table bookkeeping: a failure is logged, it must not break a dial."""
        await self._dht_query(f"add_peer {pid}", functools.partial(self.dht.add_peer, skip_server_mode_check=True), pid)

    async def _routing_sync_loop(self) -> None:
        known: set = set()
        while True:
            for pid in self.host.get_connected_peers():
                if pid not in known:
                    known.add(pid)
                    await self._add_to_routing(pid)
            known &= set(self.host.get_connected_peers())
            await trio.sleep(self.tuning.dht.routing_sync_interval_s)

    # --- DHT ----------------------------------------------------------------------------------------------

    def provide_soon(self, keys: Iterable[str]) -> None:
        """Remember `keys` for re-providing and queue them for a provide now (non-blocking, in order)."""
        for key in keys:
            if key not in self._provided:
                self._provided[key] = None
            self._provide_queue_send.send_nowait(key)

    async def provide(self, key: str) -> bool:
        """Provide one key now; False if no peer accepted the record (it stays local and is retried later)."""
        self._provided.setdefault(key, None)
        with trio.move_on_after(self.tuning.dht.query_timeout_s):  # a failed provide is retried by the re-provide loop
            if self.nat is not None and self.nat.reach.status == nat.PRIVATE and await self._provide_to_neighbours(key):
                return True
            return bool(await self._dht_query(f"provide {key[:20]}", self.dht.provide, key, default=False))
        return False

    async def _provide_to_neighbours(self, key: str) -> bool:
        """A private node's provide: ADD_PROVIDER to the peers it is directly connected to (its relays and
        bootstrap peers, whom fetchers ask first: `_first_providers`), and the record kept locally. KadDHT's own
        provide first looks up the closest peers, which behind a NAT spent a query timeout per key on peers
        nobody can dial, so a store's keys took minutes to be provided. True when a peer took the record."""
        key_bytes = libp2p_compat.encode_dht_key(key)
        self.dht.provider_store.add_provider(key_bytes, PeerInfo(self.host.get_id(), self.host.get_addrs()))
        sent: list[bool] = []

        async def send(peer: Any) -> None:
            with trio.move_on_after(self.tuning.dht.query_timeout_s / 3):
                sent.append(bool(await self._dht_query(f"ADD_PROVIDER to {peer}", libp2p_compat.provide_to,
                                                       self.dht, peer, key_bytes, default=False)))

        async with trio.open_nursery() as nursery:
            for peer in self.host.get_connected_peers():
                if not self.relayed(peer.to_base58()):
                    nursery.start_soon(send, peer)
        return any(sent)

    async def find_providers(self, key: str, count: int | None = None) -> list[str]:
        """Peer ids that provide `key` (never ourselves). Their addresses land in the peerstore."""
        infos: list = []
        with trio.move_on_after(self.tuning.dht.query_timeout_s):  # a failed lookup is an empty answer; callers fall back
            infos = await self._first_providers(key, count or self.tuning.fetch.max_providers)
        me = self.host.get_id()
        if infos and all(info.peer_id == me for info in infos):
            # py-libp2p answers from the local record store first, and a node that provides a key holds a
            # record of itself: ask the peers closest to the key directly instead
            with trio.move_on_after(self.tuning.dht.query_timeout_s):
                infos = await self._network_providers(key)
        out: list[str] = []
        store = self.host.get_peerstore()
        for info in infos:
            if info.peer_id == me:
                continue
            if info.addrs:
                store.add_addrs(info.peer_id, info.addrs, self.tuning.dht.peerstore_addr_ttl_s)
            text = info.peer_id.to_base58()
            if text not in out:
                out.append(text)
        self._warm_up(out)
        return out

    def _warm_up(self, peers: Iterable[str]) -> None:
        """Behind NAT (issue 26): connect now, through a relay, to providers known only at relayed addresses, so
        that the connection is hole-punched (DCUtR, a few seconds) before a chunk request needs it; a first
        contact made by the request itself waits for the upgrade (`direct_path`), and a fetcher that waits too
        long goes back to the publisher. At most `nat.hole_punch_concurrency` at once; nothing for public
        providers, which are dialled when needed, as before."""
        if self.nat is None or self._nursery is None or not self.nat.hole_punching:
            return
        connected = set(self.host.get_connected_peers())
        for text in peers:
            if len(self._warming) >= self.tuning.nat.hole_punch_concurrency:
                return
            with contextlib.suppress(UsageError):
                pid = self.peer_id_obj(text)
                if pid in connected or text in self._warming:
                    continue
                _, relayed = nat.checked_addrs(text, self._known_addrs(pid), self.tuning.nat.max_peer_relay_addrs)
                if relayed:
                    self._warming.add(text)
                    self._nursery.start_soon(self._warm, pid, text)

    async def _warm(self, pid: Any, text: str) -> None:
        try:
            with trio.move_on_after(self.tuning.serve.dial_timeout_s):
                await self._dial_through_relay(pid)
        except Exception as exc:  # boundary: a background dial of any peer; it must not stop the host
            log.debug("warming a connection to %s failed: %r", text[:16], exc)
        finally:
            self._warming.discard(text)

    async def _first_providers(self, key: str, count: int) -> list:
        """The DHT's iterative lookup, and at the same time one GET_PROVIDERS round to the peers we are
        connected to directly: whichever names providers first. Behind a NAT the iterative lookup spends its
        time on peers nobody can dial (other NAT'd nodes' addresses), while the relays and bootstrap peers
        it is connected to hold the records (issue 26)."""
        found: list = []
        async with trio.open_nursery() as nursery:
            async def lookup() -> None:
                found.extend(await self._dht_query(f"find_providers {key[:20]}", self.dht.find_providers, key, count,
                                                   default=[]) or [])
                nursery.cancel_scope.cancel()

            async def neighbours() -> None:
                direct = [p for p in self.host.get_connected_peers() if not self.relayed(p.to_base58())]
                answer = await self._providers_of(key, direct)
                if answer:
                    found.extend(answer)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(lookup)
            nursery.start_soon(neighbours)
        return found

    async def _providers_of(self, key: str, peers: Iterable[Any]) -> list:
        """Provider records of `key` held by `peers` (one GET_PROVIDERS round each, in parallel)."""
        key_bytes = libp2p_compat.encode_dht_key(key)
        found: list = []
        me = self.host.get_id()

        async def ask(peer: Any) -> None:  # one unhelpful peer does not fail the lookup
            with trio.move_on_after(self.tuning.dht.query_timeout_s / 3):
                answer = await self._dht_query(f"GET_PROVIDERS from {peer}", libp2p_compat.providers_from_peer,
                                               self.dht, peer, key_bytes, default=([], []))
                found.extend(answer[0])

        async with trio.open_nursery() as nursery:
            for peer in peers:
                if peer != me:
                    nursery.start_soon(ask, peer)
        return found

    async def _network_providers(self, key: str) -> list:
        """Provider records held by the peers closest to `key` (one round of GET_PROVIDERS, local store skipped)."""
        closest = await self._dht_query(f"closest peers for {key[:20]}",
                                        self.dht.peer_routing.find_closest_peers_network,
                                        libp2p_compat.encode_dht_key(key), default=[])
        return await self._providers_of(key, closest)

    def _readvertise(self) -> None:
        """Our addresses changed (a relay reservation made or lost): provider records carry the addresses they
        were made with, so provide everything again now."""
        for key in list(self._provided):
            self._provide_queue_send.send_nowait(key)
        if self._nursery is not None:
            self._nursery.start_soon(self._push_addrs)

    async def _push_addrs(self) -> None:
        """Tell connected peers our new addresses (identify push): the relays and bootstrap peers are who a
        peer looking for us asks (`_addrs_from_neighbours`)."""
        from libp2p.identity.identify_push.identify_push import push_identify_to_peers

        with trio.move_on_after(self.tuning.dht.query_timeout_s), contextlib.suppress(*PEER_FAILURES):
            await push_identify_to_peers(self.host)

    async def _provide_worker(self) -> None:
        started = trio.current_time()
        async for key in self._provide_queue_recv:
            # records carry the addresses peers will dial: wait (briefly) while we may turn out private
            while (self.nat is not None and self.nat.unsure()
                   and trio.current_time() - started < self.tuning.nat.provide_wait_s):
                await trio.sleep(self.tuning.nat.watch_interval_s)
            if key in self._provided:
                await self.provide(key)
                await trio.sleep(self.tuning.dht.provide_pacing_s)

    async def _reprovide_loop(self) -> None:
        """Provide everything the node holds at start and every reprovide_interval_s.

        With a `provide_source` (a thread-safe callable returning the DHT keys of what the store holds now),
        the set is re-read each pass, so evicted artifacts stop being advertised."""
        first = True
        while True:
            if not first:
                await trio.sleep(self.tuning.dht.reprovide_interval_s)
            first = False
            if self.provide_source is not None:
                try:
                    keys = await trio.to_thread.run_sync(self.provide_source)
                except (KvswapError, OSError, sqlite3.Error):  # a failing store must not stop the node; next pass
                    log.exception("listing keys to provide failed")
                    continue
                self._provided = dict.fromkeys(keys)
            for key in list(self._provided):
                self._provide_queue_send.send_nowait(key)

    # --- gossipsub ----------------------------------------------------------------------------------------

    async def subscribe(self, topic: str, handler: GossipHandler) -> None:
        """Call `handler(data, from_peer_id)` (on trio) for every message on `topic` from another peer that
        passes `_gossip_ok` (the others are neither handled nor forwarded)."""
        first = topic not in self._topics
        self._topics.setdefault(topic, []).append(handler)
        if first:
            self.pubsub.set_topic_validator(topic, self._gossip_ok, False)
            sub = await self.pubsub.subscribe(topic)
            self._nursery.start_soon(self._topic_loop, topic, sub)

    def _gossip_ok(self, forwarder: Any, msg: Any) -> bool:
        """gossipsub's validator for our topics, run before a message is handled or forwarded: signed (an
        originator), within MAX_ANNOUNCE_BYTES, within its originator's rate (gossip.burst, then
        gossip.rate_per_s), within the rate of the peer that delivered it (gossip.forwarder_*: fresh keys do
        not multiply one peer's rate) and within the node's total budget (gossip.total_*). A flood is dropped
        here, not relayed to the whole mesh, and counted, not logged line by line."""
        if not msg.from_id or len(msg.data) > limits.MAX_ANNOUNCE_BYTES:
            return False
        if ID(msg.from_id) == self.host.get_id():
            return True  # our own announcements
        if not self.gossip_gate.allow(bytes(msg.from_id)):
            self.gossip_dropped.note(f"{ID(msg.from_id).to_base58()[:16]} is over its announcement rate")
            return False
        if not self.forwarder_gate.allow(str(forwarder)):
            self.gossip_dropped.note(f"peer {str(forwarder)[:16]} delivers announcements over its rate")
            return False
        if not self.total_gate.allow(""):
            self.gossip_dropped.note("announcements from all peers are over the node's gossip budget")
            return False
        return True

    async def _topic_loop(self, topic: str, sub: Any) -> None:
        """Hand every message on `topic` from another peer to the topic's handlers (node/net.py's, which
        drop what does not decode: a handler raising is a bug and stops the node, loudly)."""
        me = self.host.get_id()
        while True:
            msg = await sub.get()
            if not msg.from_id or len(msg.data) > limits.MAX_ANNOUNCE_BYTES:
                continue  # unsigned or oversized: ignore the message
            sender = ID(msg.from_id)
            if sender == me:
                continue
            for handler in list(self._topics.get(topic, ())):
                handler(bytes(msg.data), sender.to_base58())

    async def publish(self, topic: str, data: bytes) -> None:
        if len(data) > limits.MAX_ANNOUNCE_BYTES:
            raise ProtocolError("announcement larger than MAX_ANNOUNCE_BYTES")
        with map_exceptions({PEER_FAILURES: ProtocolError}, f"publishing on {topic} failed"):
            await self.pubsub.publish(topic, data)

    def topic_peers(self, topic: str) -> list[str]:
        peers = self.pubsub.peer_topics.get(topic, set()) if self.pubsub else set()
        return [p.to_base58() for p in peers]


__all__ = [
    "ADDRESS_ERRORS",
    "PEER_FAILURES",
    "P2PConfig",
    "P2PHost",
    "key_pair_from_seed",
    "peer_id_of_public_key",
    "peer_id_of_seed",
    "advertised",
    "split_addr",
]
