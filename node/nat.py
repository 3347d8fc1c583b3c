"""Reachability behind NAT: what AutoNAT says of this node, the relays it holds reservations on, its relay
service, and hole-punch attempts (issue 26). py-libp2p 0.8.1's own parts do the work: AutoNAT
(`libp2p.host.autonat`), circuit relay v2 (`libp2p.relay.circuit_v2`: the hop service, the transport that
reserves and dials through a relay) and DCUtR (`circuit_v2.dcutr`); kvswap builds no relay of its own.

Two halves:
- pure rules, tested without a network (tests/test_nat.py): `Reachability` (verdicts of AutoNAT servers
  -> public / private / unknown, or fixed by `node.reachability`), `relay_service_on` (`node.relay`),
  `checked_addrs` (which of a peer's claimed addresses may be dialled), `circuit_addr` and `advertise`
  (what this node tells peers);
- `NatService` (trio, on the host's nursery): runs AutoNAT, the relay service, the reservations of a
  private node and DCUtR, keeps the `NatState` numbers that `kvswap node status` and /metrics show, and
  dials a peer known only at relayed addresses.

Rules:
- A node is *public* once `nat.autonat_confirmations` AutoNAT servers dialled it back and more did than
  failed; *private* once as many failed to and more failed than succeeded. A refused request (the server
  would not dial: we asked over a relay, or our addresses do not match the IP it sees) is no verdict.
- A public node (or `node.relay = on`) runs the circuit relay v2 hop service within `NatTuning`'s limits:
  reservations in total and per peer IP, circuits per reservation, each circuit's duration and bytes.
- A private node reserves a slot on up to `nat.max_relays`
  relays: `node.relays`, its bootstrap peers, and connected peers that speak the hop protocol; it
  advertises `<relay address>/p2p-circuit/p2p/<itself>` for each (identify, so peer records, and the DHT's
  provider records, which carry the peer's addresses).
- A peer's claimed relayed address is used only if it ends in that peer's id, names a relay other than the
  peer itself, holds one circuit hop and a dialable relay address; at most `nat.max_peer_relay_addrs` kept.
- An AutoNAT server dials a requester back only for the requester itself, at most
  `nat.autonat_dialbacks_per_peer` times per `nat.autonat_dialback_window_s` and `nat.autonat_dialbacks_total`
  for all peers together (`DialBackLimit`); past that it refuses, which is no verdict.
- A relayed connection is hole-punched (DCUtR) from one side first: the peer with the smaller id starts at
  once, the other after `nat.hole_punch_answer_wait_s` if the connection is still relayed; a failed exchange
  is retried after `nat.hole_punch_retry_s`, up to `nat.hole_punch_attempts`; at most
  `nat.hole_punch_concurrency` at once (`punch_due`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import multiaddr
import multiaddr.exceptions
import trio
from libp2p.host.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL, CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from kvswap.protocol import errors

from . import libp2p_compat
from .tuning import NatTuning

log = logging.getLogger(__name__)

#: `node.reachability` values: learn it (AutoNAT), or say so
REACHABILITY_MODES = ("auto", "public", "private")
#: `node.relay` values: relay for others when public, always, never
RELAY_MODES = ("auto", "on", "off")
PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"
CIRCUIT = "/p2p-circuit"


RelayOnly = errors.RelayOnly  # the one error tree is protocol/errors.py's

@dataclass(frozen=True)
class NatConfig:
    """The node's NAT settings (kvswap/config.py declares them: node.reachability, node.relay, node.relays,
    node.hole_punching, node.relay_data)."""

    reachability: str = "auto"
    relay: str = "auto"
    relays: tuple[str, ...] = ()
    hole_punching: bool = True
    relay_data: bool = False


# --- pure rules ---------------------------------------------------------------------------------------------
@dataclass
class Reachability:
    """What AutoNAT servers told us, folded into one answer (see the module docstring)."""

    mode: str = "auto"
    confirmations: int = 2
    max_servers: int = 16
    #: server peer id -> dialled us back (True) or could not (False), the newest last
    verdicts: dict[str, bool] = field(default_factory=dict)
    #: monotonic time the answer last changed (None: never)
    changed_at: float | None = None
    _status: str = UNKNOWN

    def __post_init__(self) -> None:
        if self.mode not in REACHABILITY_MODES:
            raise ValueError(f"node.reachability must be one of {', '.join(REACHABILITY_MODES)}: {self.mode!r}")

    def record(self, server: str, dialled_back: bool | None, now: float) -> str:
        """One server's answer (None: it refused, which says nothing); the status after it."""
        if dialled_back is not None:
            self.verdicts.pop(server, None)
            self.verdicts[server] = dialled_back
            while len(self.verdicts) > self.max_servers:  # the oldest answer goes
                self.verdicts.pop(next(iter(self.verdicts)))
        before = self.status
        ok = sum(self.verdicts.values())
        failed = len(self.verdicts) - ok
        if ok >= self.confirmations and ok > failed:
            self._status = PUBLIC
        elif failed >= self.confirmations and failed > ok:
            self._status = PRIVATE
        if self.status != before:
            self.changed_at = now
        return self.status

    @property
    def status(self) -> str:
        return self.mode if self.mode != "auto" else self._status

    def snapshot(self) -> dict:
        return {"status": self.status, "mode": self.mode, "dialled_back": sum(self.verdicts.values()),
                "not_dialled_back": len(self.verdicts) - sum(self.verdicts.values())}


@dataclass
class DialBackLimit:
    """How often this node, as an AutoNAT server, dials a requester back: at most `per_peer` dial-backs for one
    peer and `total` for all peers together within any `window_s` seconds (each dial-back is a connection this
    node opens at a peer's asking; unbounded, a peer could make it dial on and on). A request past either is
    refused, which the requester takes as no verdict. Memory: one timestamp per dial-back granted within the
    window, so at most `total` of them whatever the number of peers asking."""

    per_peer: int
    window_s: float
    total: int
    _granted: dict[str, list[float]] = field(default_factory=dict)
    _count: int = 0
    refused: int = 0

    def _expire(self, now: float) -> None:
        cutoff = now - self.window_s
        for peer in list(self._granted):
            times = self._granted[peer]
            keep = [t for t in times if t > cutoff]
            self._count -= len(times) - len(keep)
            if keep:
                self._granted[peer] = keep
            else:
                del self._granted[peer]

    def allow(self, peer: str, now: float) -> bool:
        """Whether to dial `peer` back now (and, if so, counted)."""
        self._expire(now)
        times = self._granted.get(peer, [])
        if len(times) >= self.per_peer or self._count >= self.total:
            self.refused += 1
            return False
        self._granted[peer] = [*times, now]
        self._count += 1
        return True

    def tracked(self) -> int:
        """Dial-backs remembered now (bounded by `total`)."""
        return self._count


def relay_service_on(setting: str, reachability: str) -> bool:
    """Whether this node relays for others: `node.relay` on / off, or auto: only while it is public."""
    if setting not in RELAY_MODES:
        raise ValueError(f"node.relay must be one of {', '.join(RELAY_MODES)}: {setting!r}")
    return setting == "on" or (setting == "auto" and reachability == PUBLIC)


def wants_relays(reachability: str) -> bool:
    """A node reserves relay slots, and advertises them, once it knows it is private (a public node whose
    AutoNAT answer is pending would only take slots it does not need)."""
    return reachability == PRIVATE


def maybe_private(status: str, listen_ips: Iterable[str], observed_ips: Iterable[str]) -> bool:
    """Whether a node may yet turn out private: AutoNAT has not answered, and either no peer has told it the
    address it sees it at, or one saw another address than the node listens on (a NAT between them). Never
    for a node that listens on loopback only."""
    listen = set(listen_ips)
    if listen and all(ip.startswith("127.") or ip == "::1" for ip in listen):
        return False  # a node on loopback only is reached on this machine: no NAT can stand in between
    observed = set(observed_ips)
    return status == UNKNOWN and (not observed or bool(observed - listen))


def starts_punch(me: str, peer: str) -> bool:
    """Which side of a relayed connection starts the DCUtR exchange at once: the one with the smaller peer id
    (exactly one of any two peers). The other answers it (py-libp2p's driver skips a peer whose exchange is
    under way), or starts its own later if none came."""
    return me < peer


def punch_due(me: str, peer: str, relayed_s: float, attempts: int, idle_s: float, *, answer_wait_s: float,
              retry_s: float, max_attempts: int) -> bool:
    """Whether to start a DCUtR exchange toward `peer`, connected by relay only for `relayed_s` seconds, after
    `attempts` exchanges of ours, the last of which ended `idle_s` ago: the side `starts_punch` names at once,
    the other once `answer_wait_s` passed without an upgrade (the first side's exchange never came, or failed);
    a failed exchange again after `retry_s`; at most `max_attempts`. One side at a time: two exchanges at once
    dial each other twice, with crossed roles, and both may fail."""
    if attempts >= max_attempts or (attempts and idle_s < retry_s):
        return False
    return starts_punch(me, peer) or relayed_s >= answer_wait_s


def upgrade_wait_over(relayed_s: float, attempts: int, punching: bool, *, wait_s: float, wait_max_s: float,
                      max_attempts: int) -> bool:
    """Whether a chunk transfer stops waiting for a connection, relayed for `relayed_s` seconds, to become
    direct: after `wait_s`, unless a DCUtR exchange of ours toward the peer is under way (`punching`) or still
    due (fewer than `max_attempts` made); then after `wait_max_s` at the latest. With ten daemons on two loaded
    cores an upgrade took 10-39 s, and fetchers that gave up at 10 s went back to the publisher, which sent
    another copy (BENCHMARKS.md, "The swarm behind cone NATs"); behind symmetric NATs every exchange fails
    within a few seconds, so the failure still comes early."""
    if relayed_s >= wait_max_s:
        return True
    return relayed_s >= wait_s and not (punching or attempts < max_attempts)


def _ma(addr: Any) -> multiaddr.Multiaddr | None:
    try:
        return addr if isinstance(addr, multiaddr.Multiaddr) else multiaddr.Multiaddr(addr)
    except (ValueError, TypeError, multiaddr.exceptions.Error):
        return None


def is_relayed(addr: Any) -> bool:
    return CIRCUIT in str(addr)


def circuit_addr(relay_addr: str, relay_id: str, me: str) -> str:
    """The address at which `me` is reachable through a relay it has a reservation on."""
    base = str(relay_addr).split("/p2p/", 1)[0]
    return f"{base}/p2p/{relay_id}{CIRCUIT}/p2p/{me}"


def _ip_ok(ip: str) -> bool:
    return ip not in ("0.0.0.0", "::") and not ip.startswith("127.") and ip != "::1"


def checked_addrs(peer_id: str, addrs: Iterable[Any], max_relayed: int) -> tuple[list, list]:
    """(direct, relayed) addresses of `peer_id` worth dialling, from what it (or the DHT) claims: a relayed
    address must end in /p2p/<peer_id>, hold exactly one circuit hop, name a relay other than the peer and
    reach that relay at a routable IPv4/IPv6 TCP address; at most `max_relayed` of them. Direct addresses
    are left as they are (the swarm has its own rules for them)."""
    direct, relayed = [], []
    for raw in addrs:
        ma = _ma(raw)
        if ma is None:
            continue
        text = str(ma)
        if not is_relayed(text):
            direct.append(ma)
            continue
        head, sep, tail = text.partition(CIRCUIT)
        if text.count(CIRCUIT) != 1 or tail != f"/p2p/{peer_id}" or "/p2p/" not in head:
            continue
        relay_id = head.rsplit("/p2p/", 1)[1]
        if relay_id == peer_id or "/" in relay_id or len(relayed) >= max_relayed:
            continue
        relay = _ma(head)
        ip = None
        for proto in ("ip4", "ip6"):
            with contextlib.suppress(LookupError, multiaddr.exceptions.Error):
                ip = relay.value_for_protocol(proto)
                break
        if relay is None or ip is None or not _ip_ok(ip) or "/tcp/" not in head:
            continue
        relayed.append(ma)
    return direct, relayed


def _ip4(addr: Any) -> str | None:
    with contextlib.suppress(LookupError, multiaddr.exceptions.Error, AttributeError):
        return addr.value_for_protocol("ip4")
    return None


def direct_first(direct: Iterable[Any], relayed: Iterable[Any], own_ips: Iterable[str]) -> list:
    """Which of a peer's direct addresses to dial before its relays. A peer that advertises relayed addresses
    says it is private, so its direct ones are LAN addresses: worth a dial only from the same LAN (an address
    sharing a /24 with one of ours); from anywhere else the relay comes first and DCUtR upgrades the
    connection. A peer without relayed addresses is dialled directly, as always."""
    direct = list(direct)
    if not list(relayed):
        return direct
    nets = {ip.rsplit(".", 1)[0] for ip in own_ips if ip and ip.count(".") == 3}
    return [a for a in direct if (_ip4(a) or "").rsplit(".", 1)[0] in nets]


def advertise(candidates: Iterable[Any], reachability: str, relay_addrs: Iterable[str]) -> list:
    """What this node tells peers: its direct addresses (wildcards expanded by node/p2p.py's `advertised`),
    plus, once it knows it is private, its relayed addresses."""
    out = [a for a in candidates if not is_relayed(a)]
    if wants_relays(reachability):
        out += [m for m in (_ma(a) for a in relay_addrs) if m is not None]
    return list({str(a): a for a in out}.values())


# --- the service --------------------------------------------------------------------------------------------
@dataclass
class HolePunches:
    """DCUtR outcomes, counted from connection changes: a peer first seen relayed and later direct."""

    attempted: int = 0
    succeeded: int = 0
    failed: int = 0
    last_upgrade_s: float | None = None


class NatService:
    """AutoNAT, relay service, reservations and DCUtR for one host (see the module docstring)."""

    def __init__(self, host: Any, tuning: NatTuning, *, reachability: str = "auto", relay: str = "auto",
                 relays: Iterable[str] = (), bootstrap: Iterable[str] = (), hole_punching: bool = True,
                 relay_data: bool = False) -> None:
        self.host = host
        self.tuning = tuning
        self.reach = Reachability(reachability, tuning.autonat_confirmations, tuning.autonat_max_servers)
        self.relay_setting = relay
        relay_service_on(relay, UNKNOWN)  # checks the value
        self.relay_candidates = [a for a in [*relays, *bootstrap] if "/p2p/" in a]
        self.hole_punching = hole_punching
        self.relay_data = relay_data
        self.autonat = AutoNATService(host, serve=False, confirmations=tuning.autonat_confirmations)
        #: how often our AutoNAT server dials a requester back (libp2p_compat.serve_autonat answers for it)
        self.dialbacks = DialBackLimit(tuning.autonat_dialbacks_per_peer, tuning.autonat_dialback_window_s,
                                       tuning.autonat_dialbacks_total)
        libp2p_compat.serve_autonat(self.autonat, lambda peer: self.dialbacks.allow(peer, time.monotonic()))
        #: relay peer id -> {"addr": our circuit address through it, "expires": unix time}
        self.reservations: dict[str, dict] = {}
        self.relay_service = False
        self.punches = HolePunches()
        self._relayed_since: dict[str, float] = {}  # peer id -> when we first saw it connected by relay only
        self._punching: set[str] = set()  # peers a DCUtR exchange of ours is under way with
        self._punch_attempts: dict[str, int] = {}  # ...and how many we started while it stayed relayed
        self._punch_ended: dict[str, float] = {}  # ...and when the last ended
        self._hop: Any = None
        self._stop: Any = None
        self._transport: Any = None
        self._dcutr: Any = None
        self._nursery: trio.Nursery | None = None
        #: reservation requests that failed (refused, or the relay unreachable)
        self.reservation_failures = 0
        self._hop_counters: dict = {"circuits": 0, "refused": 0}
        #: called (on trio) when the addresses we advertise change: a reservation made or lost
        self.on_addrs_changed: Any = None

    # --- what others see ------------------------------------------------------------------------------------
    def relay_addrs(self) -> list[str]:
        return [r["addr"] for r in self.reservations.values()]

    def snapshot(self) -> dict:
        relay = {}
        if self._hop is not None:
            # circuits: CONNECTs being served (py-libp2p's own table keys circuits by peer, so it undercounts)
            relay = {**libp2p_compat.relay_load(self._hop), "circuits": self._hop_counters["circuits"],
                     "refused": self._hop_counters["refused"]}
        return {"reachability": self.reach.snapshot(), "relay_service": self.relay_service, "relay": relay,
                "reservations": [{"relay": k, **v} for k, v in self.reservations.items()],
                "reservation_failures": self.reservation_failures,
                "autonat_dialbacks_refused": self.dialbacks.refused,
                "hole_punching": self.hole_punching, "relay_data": self.relay_data,
                "hole_punches": dict(vars(self.punches)), "relayed_peers": len(self._relayed_only_peers())}

    # --- lifecycle ------------------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        t = self.tuning
        libp2p_compat.patch_autonat_dial_back(t.autonat_dial_timeout_s)
        libp2p_compat.prefer_direct_connections(self.host)  # chunk streams over the punched connection
        limits = libp2p_compat.relay_limits(t)
        # the STOP side (accept circuits through our relays) and the client: every node
        self._stop = CircuitV2Protocol(self.host, limits=limits, allow_hop=False)
        self._transport = CircuitV2Transport(self.host, self._stop, RelayConfig(
            roles=RelayRole.STOP | RelayRole.CLIENT, limits=limits))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with background_trio_service(self._stop):
                await self._stop.event_started.wait()
                if self.hole_punching:
                    self._dcutr = DCUtRProtocol(self.host, dial_timeout=int(t.hole_punch_dial_timeout_s))
                    libp2p_compat.drive_dcutr(self._dcutr, t.relay_close_grace_s)  # _connection_watch starts them
                    nursery.start_soon(self._run_service, self._dcutr)
                nursery.start_soon(self._autonat_loop)
                nursery.start_soon(self._reservation_loop)
                nursery.start_soon(self._connection_watch)
                await self._update_relay_service()
                task_status.started()
                await trio.sleep_forever()

    async def _run_service(self, service: Any) -> None:
        async with background_trio_service(service):
            await trio.sleep_forever()

    async def _update_relay_service(self) -> None:
        """Start the hop service once this node should relay (it stays on until the node stops)."""
        if self._hop is None and relay_service_on(self.relay_setting, self.reach.status):
            self._hop = CircuitV2Protocol(self.host, limits=libp2p_compat.relay_limits(self.tuning), allow_hop=True)
            self._hop_counters = libp2p_compat.bound_relay(self._hop, self.tuning)
            self._nursery.start_soon(self._run_service, self._hop)
            self.relay_service = True
            log.info("relaying for others (circuit relay v2, reachability %s)", self.reach.status)

    # --- AutoNAT ----------------------------------------------------------------------------------------------
    def _direct_peers(self) -> list:
        return [pid for pid in self.host.get_connected_peers() if libp2p_compat.has_direct_connection(self.host, pid)]

    def _dialback_addrs(self) -> list[bytes]:
        """What we ask AutoNAT servers to dial: our listen addresses, and for each IP peers saw us come from,
        that IP at our listen port (what a NAT that keeps ports maps it to; a server only dials addresses at
        the IP it sees)."""
        listen = [a for a in self.host.get_transport_addrs() if "/tcp/" in str(a)]
        out = list(listen)
        for ip in libp2p_compat.observed_ips(self.host):
            for a in listen:
                with contextlib.suppress(Exception):  # a listen address without ip4/tcp
                    out.append(multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{a.value_for_protocol('tcp')}"))
        return [a.to_bytes() for a in {str(a): a for a in out}.values()]

    async def _autonat_loop(self) -> None:
        t = self.tuning
        asked: dict = {}
        while True:
            if self.reach.mode == "auto":
                now = time.monotonic()
                for pid in self._direct_peers()[: t.autonat_max_servers]:
                    if now < asked.get(pid, -1e9):
                        continue
                    asked[pid] = now + t.autonat_retry_s * 4  # no verdict: ask again soon
                    verdict: bool | None = None
                    with contextlib.suppress(Exception), trio.move_on_after(t.autonat_query_timeout_s):
                        # boundary: a server's answer is arbitrary bytes; a failed query is no verdict
                        status, _ = await self.autonat.query_server(pid, self._dialback_addrs(),
                                                                    timeout=t.autonat_query_timeout_s)
                        verdict = {int(AutoNATMessage.OK): True, int(AutoNATMessage.E_DIAL_ERROR): False}.get(int(status))
                    if verdict is not None:
                        asked[pid] = time.monotonic() + t.autonat_interval_s
                    before = self.reach.status
                    if self.reach.record(pid.to_base58(), verdict, time.monotonic()) != before:
                        log.info("reachability: %s (AutoNAT)", self.reach.status)
                        await self._update_relay_service()
            await trio.sleep(t.autonat_retry_s if self.reach.status == UNKNOWN else t.autonat_retry_s * 4)

    # --- reservations -------------------------------------------------------------------------------------------
    def _relay_peers(self) -> list[tuple[Any, list]]:
        """(peer id, addrs) of relays to reserve on: configured and bootstrap ones first, then connected peers
        whose identify says they speak the hop protocol."""
        out: dict = {}
        for addr in self.relay_candidates:
            with contextlib.suppress(Exception):
                info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
                out.setdefault(info.peer_id, list(info.addrs))
        store = self.host.get_peerstore()
        for pid in self._direct_peers():
            with contextlib.suppress(Exception):
                if HOP_PROTOCOL in (store.get_protocols(pid) or []):
                    out.setdefault(pid, list(store.addrs(pid)))
        out.pop(self.host.get_id(), None)
        return list(out.items())

    async def _reservation_loop(self) -> None:
        """Stay connected to the relay candidates (they answer AutoNAT too); once private, hold reservations
        on up to `nat.max_relays` of them, renewed before they expire."""
        t = self.tuning
        while True:
            now = time.time()
            held_before = set(self.reservations)
            for rid in [r for r, v in self.reservations.items() if v["expires"] <= now]:
                del self.reservations[rid]
            for pid, addrs in self._relay_peers():
                held = self.reservations.get(pid.to_base58())
                if not wants_relays(self.reach.status):
                    if pid not in self.host.get_connected_peers():
                        await self._connect(pid, addrs)
                elif held is None and len(self.reservations) < t.max_relays:
                    await self._reserve(pid, addrs)
                elif held is not None and held["expires"] - now < t.reservation_refresh_s:
                    await self._reserve(pid, addrs)
            if set(self.reservations) != held_before and self.on_addrs_changed is not None:
                self.on_addrs_changed()
            await trio.sleep(t.reservation_retry_s)

    async def _connect(self, pid: Any, addrs: list) -> bool:
        with contextlib.suppress(Exception), trio.move_on_after(self.tuning.reservation_timeout_s):
            await self.host.connect(PeerInfo(pid, addrs))  # boundary: any peer; a failure is retried later
        return pid in self.host.get_connected_peers()

    async def _reserve(self, pid: Any, addrs: list) -> None:
        t, text = self.tuning, pid.to_base58()
        ok = False
        with contextlib.suppress(Exception), trio.move_on_after(t.reservation_timeout_s):
            # boundary: a relay is any peer; its failure is a missing reservation, tried again next pass
            if pid in self.host.get_connected_peers() or await self._connect(pid, addrs):
                stream = await self.host.new_stream(pid, [HOP_PROTOCOL])
                try:
                    ok = await libp2p_compat.reserve_on(self._transport, stream, pid)
                finally:
                    with contextlib.suppress(Exception):
                        await stream.close()
        relay_addr = next((str(a) for a in addrs if not is_relayed(a)), None)
        if not ok or relay_addr is None:
            self.reservation_failures += 1
            return
        if text not in self.reservations:
            log.info("reserved a relay slot on %s", text[:16])
        expires = libp2p_compat.reservation_expiry(self._transport, pid) or time.time() + t.reservation_refresh_s
        me = self.host.get_id().to_base58()
        self.reservations[text] = {"addr": circuit_addr(relay_addr, text, me), "expires": float(expires)}

    # --- connections through relays, and their upgrades --------------------------------------------------------
    def _relayed_only_peers(self) -> list[str]:
        return [pid.to_base58() for pid in self.host.get_connected_peers()
                if not libp2p_compat.has_direct_connection(self.host, pid)]

    async def _punch(self, pid: str, limiter: trio.CapacityLimiter) -> None:
        """One DCUtR exchange toward `pid` when `punch_due` says so (concurrently with others, within
        `nat.hole_punch_concurrency`). py-libp2p's own driver, which started them every 2 s one peer after
        another and from both sides at once, is off (libp2p_compat.drive_dcutr)."""
        from libp2p.peer.id import ID

        try:
            async with limiter:
                with contextlib.suppress(Exception), trio.move_on_after(self.tuning.hole_punch_give_up_s):
                    # boundary: the peer is any peer; a failed punch leaves the connection relayed (counted below)
                    if self.relayed_only(ID.from_base58(pid)):
                        await self._dcutr.initiate_hole_punch(ID.from_base58(pid))
        finally:
            self._punching.discard(pid)
            self._punch_ended[pid] = time.monotonic()

    async def _connection_watch(self) -> None:
        """Count hole punches: a peer connected by relay only that later has a direct connection was upgraded
        (DCUtR's work); one still relayed after `nat.hole_punch_give_up_s` counts as a failed upgrade (and as a
        success after all if it is upgraded later)."""
        t = self.tuning
        failed: set[str] = set()
        limiter = trio.CapacityLimiter(max(1, t.hole_punch_concurrency))
        me = self.host.get_id().to_base58()
        while True:
            now = time.monotonic()
            relayed = set(self._relayed_only_peers())
            for pid in relayed:
                if pid not in self._relayed_since:
                    self._relayed_since[pid] = now
                    if self.hole_punching:
                        self.punches.attempted += 1
                if (self._dcutr is not None and pid not in self._punching and punch_due(
                        me, pid, now - self._relayed_since[pid], self._punch_attempts.get(pid, 0),
                        now - self._punch_ended.get(pid, now), answer_wait_s=t.hole_punch_answer_wait_s,
                        retry_s=t.hole_punch_retry_s, max_attempts=t.hole_punch_attempts)):
                    self._punching.add(pid)
                    self._punch_attempts[pid] = self._punch_attempts.get(pid, 0) + 1
                    self._nursery.start_soon(self._punch, pid, limiter)
                if self.hole_punching and pid not in failed and now - self._relayed_since[pid] > t.hole_punch_give_up_s:
                    failed.add(pid)
                    self.punches.failed += 1
            for pid in list(self._relayed_since):
                if pid in relayed:
                    continue
                since = self._relayed_since.pop(pid)
                self._punch_attempts.pop(pid, None)
                self._punch_ended.pop(pid, None)
                if pid in self.host_connected() and self.hole_punching:
                    if pid in failed:
                        failed.discard(pid)
                        self.punches.failed -= 1
                    self.punches.succeeded += 1
                    self.punches.last_upgrade_s = round(now - since, 3)
                    log.info("direct connection to %s after %.1f s relayed", pid[:16], now - since)
                failed.discard(pid)
            await trio.sleep(t.watch_interval_s)

    def unsure(self) -> bool:
        """`maybe_private` for this host now."""
        listen = []
        for a in self.host.get_transport_addrs():
            with contextlib.suppress(LookupError, multiaddr.exceptions.Error):
                listen.append(a.value_for_protocol("ip4"))
        return maybe_private(self.reach.status, listen, libp2p_compat.observed_ips(self.host))

    def host_connected(self) -> set[str]:
        return {p.to_base58() for p in self.host.get_connected_peers()}

    def relayed_only(self, pid: Any) -> bool:
        return pid in self.host.get_connected_peers() and not libp2p_compat.has_direct_connection(self.host, pid)

    async def wait_direct(self, pid: Any) -> bool:
        """Wait for a relayed connection to `pid` to become direct, as long as `upgrade_wait_over` allows
        (`nat.upgrade_wait_s`, up to `nat.upgrade_wait_max_s` while a hole punch may still come, unless
        node.relay_data lets the bytes go through the relay meanwhile); True when the connection is direct (or
        not relayed at all) by then."""
        if not self.relayed_only(pid):
            return True
        if not self.hole_punching:
            return False
        t, text, first = self.tuning, pid.to_base58(), time.monotonic()
        while self.relayed_only(pid):
            now = time.monotonic()
            if upgrade_wait_over(now - self._relayed_since.get(text, first), self._punch_attempts.get(text, 0),
                                 text in self._punching, wait_s=t.upgrade_wait_s,
                                 wait_max_s=t.upgrade_wait_s if self.relay_data else t.upgrade_wait_max_s,
                                 max_attempts=t.hole_punch_attempts):
                break
            await trio.sleep(t.watch_interval_s / 4)
        return not self.relayed_only(pid)

    async def dial_relayed(self, pid: Any, addrs: list) -> bool:
        """Connect to `pid` through one of its relayed addresses (checked by `checked_addrs`). True when
        connected."""
        _, relayed = checked_addrs(pid.to_base58(), addrs, self.tuning.max_peer_relay_addrs)
        for ma in relayed:
            with contextlib.suppress(Exception), trio.move_on_after(self.tuning.relay_dial_timeout_s):
                # boundary: the relay and the target are any peers; a failed circuit tries the next relay
                await self._transport.dial(ma)
                if pid in self.host.get_connected_peers():
                    return True
        return False


__all__ = ["CIRCUIT", "DialBackLimit", "NatConfig", "NatService", "PRIVATE", "PUBLIC", "REACHABILITY_MODES", "RELAY_MODES", "Reachability",
           "RelayOnly", "UNKNOWN", "advertise", "checked_addrs", "circuit_addr", "direct_first", "maybe_private", "is_relayed", "punch_due", "relay_service_on",
           "starts_punch", "upgrade_wait_over", "wants_relays"]
