"""The network layer as the asyncio daemon sees it: `Network`, a facade over a trio libp2p node in a thread.

    net = Network()
    await net.start(seed=seed32, listen_addrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=[...],
                    service=service, target=target, on_transfer=ledger_hook, on_announce=callback)
    cid = (await net.fetch(Cid.parse(text))).cid
    await net.stop()

Everything libp2p runs on the trio side (`TrioNode`: P2PHost + Exchange + DataPlane + Fetcher), reached through
node/bridge.py. Callbacks given here (on_transfer, on_announce, progress) are always invoked on the asyncio
loop that called start(), never on the trio thread, so the daemon can touch its SQLite ledger from them.
Service and target methods are called from worker threads (they must be thread-safe).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import trio

from kvswap.payments.rules import Purse
from kvswap.protocol.cid import Cid
from kvswap.protocol.keys import ArtifactKey, DocumentKey, dht_key
from kvswap.protocol.errors import LocalProtocolError, RemoteProtocolError, UsageError
from kvswap.protocol import limits
from kvswap.protocol.codec import encode
from kvswap.protocol.conversation import announce_decoder
from kvswap.protocol.messages import Announce, GenerateRequest, GenerateResponse
from kvswap.protocol.names import announce_topic, artifact_keys

from .bridge import TrioBridge
from .dataplane import DataPlane
from .accounting import TransferEvent, TransferHook, no_hook
from .exchange import Exchange, Service
from .fetch import Fetcher, FetchProgress, FetchResult, FetchTarget
from .nat import NatConfig
from .p2p import P2PConfig, P2PHost
from .quota import PeerRecords
from .ration import UploadRation
from .payments import Payer, Till, paid_generate
from .uploads import Reciprocity, UploadGate
from .tuning import DEFAULT_TUNING, NodeTuning

log = logging.getLogger(__name__)


def check_key(key: Any) -> ArtifactKey:
    """The key a caller passed, when it is one (protocol/keys.py). A CID string or a bare hash is parsed where
    it enters the process (CLI, JSON, wire), never here: inside, a key is a Cid or a DocumentKey."""
    if isinstance(key, Cid) or isinstance(key, DocumentKey) and not key.any_model:
        return key
    raise UsageError(f"cannot fetch {key!r:.80}: give a Cid or a DocumentKey for one model")


def provide_keys(holdings) -> list[str]:
    """DHT keys for (cid, model fingerprint, document hash, chunk CIDs, complete) tuples, by the rule of
    protocol/names.py's `artifact_keys`."""
    return list(dict.fromkeys(key for held in holdings for key in artifact_keys(*held)))


class TrioNode:
    """The trio side of a node. `await nursery.start(node.run)`; then call its methods on the same trio loop."""

    def __init__(
        self,
        config: P2PConfig,
        service: Service | None = None,
        target: FetchTarget | None = None,
        on_transfer: TransferHook | None = None,
        use_dataplane: bool = True,
        limiter: trio.CapacityLimiter | None = None,
        ration: UploadRation | None = None,
        till: Till | None = None,
        payer: Payer | None = None,
    ) -> None:
        self.config = config
        self.tuning = tuning = config.tuning
        # copies sent per chunk, and the upload slots: one gate shared by both senders (node/uploads.py)
        self.ration = ration or UploadRation(tuning.ration, legacy=bool(tuning.ration.legacy))
        if self.ration.present is None:  # a holder that left is no holder (node/ration.py)
            self.ration.present = self._connected
        if self.ration.private is None:  # a holder behind a NAT gets longer to re-share
            self.ration.private = self._private
        #: bytes this node verified from each peer: who re-shares gets an upload slot first
        self.reciprocity = Reciprocity(tuning.serve.max_recorded_peers)
        #: this node's terms and its consumers' credit, and its own vouchers as a consumer (node/payments.py)
        self.till = till if till is not None else Till(None, None, tuning.pay)
        self.payer = payer
        self.gate = UploadGate.of(self.ration, tuning.serve, self.reciprocity.given, self.till)
        self.p2p = P2PHost(config)
        self.limiter = limiter or trio.CapacityLimiter(tuning.serve.worker_threads)
        self.on_transfer = on_transfer or no_hook
        self.service = service
        self.dataplane: DataPlane | None = None
        self.use_dataplane = use_dataplane
        #: peers with a good record here: what lets them past a crowd of strangers (node/quota.py)
        self.records = PeerRecords(tuning.serve.max_recorded_peers)
        self.exchange = Exchange(self.p2p, service, self.on_transfer, None, self.limiter, self.ration, tuning,
                                 self.records, gate=self.gate, till=self.till)
        if payer is not None:
            payer.send = self.exchange.send_voucher
        self.fetcher = (Fetcher(self.p2p, self.exchange, target, self.limiter, use_dataplane, tuning.fetch,
                                records=self.records, reciprocity=self.reciprocity, ration=self.ration, payer=payer)
                        if target else None)

    def uploads_snapshot(self) -> dict:
        """What the upload gate is doing (node/uploads.py, node/ration.py), for `kvswap node status`."""
        slots = self.gate.slots
        return {"swarm": "legacy" if self.ration.legacy else "superseed",
                "slots": self.tuning.serve.upload_slots if slots is not None else 0,
                "sending": slots.in_use if slots is not None else None,
                "waiting": slots.waiting if slots is not None else None,
                "slot_timeouts": slots.timed_out if slots is not None else 0,
                "rationed_answers": self.ration.refusals}

    def _connected(self, peer: str) -> bool:
        try:
            return bool(self.p2p.host.get_network().connections.get(self.p2p.peer_id_obj(peer)))
        except Exception:  # no host yet, or not a peer id: assume it is there (the ration's old behaviour)
            return True

    def _private(self, peer: str) -> bool:
        return self.p2p.host is not None and self.p2p.private_peer(peer)  # no host yet: nobody is known

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        holdings = getattr(self.service, "holdings", None)
        if holdings is not None:  # re-provide what the store holds, at start and on schedule
            self.p2p.provide_source = lambda: provide_keys(holdings())
        async with trio.open_nursery() as nursery:
            await nursery.start(self.p2p.run)
            if self.payer is not None:
                await nursery.start(self.payer.run)
            if self.use_dataplane and self.service is not None:
                self.dataplane = DataPlane(self.p2p.listen_ip, self.service.read_chunk, self.on_transfer, self.limiter,
                                           chunk_path=getattr(self.service, "chunk_path", None), ration=self.ration,
                                           tuning=self.tuning, on_served=self.records.earn, gate=self.gate)
                await nursery.start(self.dataplane.run)
                self.exchange.dataplane = self.dataplane
            task_status.started()

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id

    @property
    def addrs(self) -> list[str]:
        return self.p2p.addrs

    def provide_artifact(self, cid: Cid, model_fingerprint: str, document_hash: str,
                         chunk_cids: Sequence[Cid] = ()) -> None:
        """Queue provider records for the artifact, its document key and its chunks (and re-provide them)."""
        self.p2p.provide_soon(artifact_keys(cid, model_fingerprint, document_hash, chunk_cids, complete=True))

    async def announce(self, announcement: Announce) -> None:
        await self.p2p.publish(announce_topic(announcement.model_fingerprint), encode(announcement))

    async def subscribe(self, model_fingerprint: str, handler: Callable[[Announce, str], None]) -> None:
        """Call handler(announce, from_peer) for valid announcements of this model (malformed ones dropped)."""

        def on_message(data: bytes, sender: str) -> None:
            try:
                msgs = announce_decoder().feed(data)
            except RemoteProtocolError as exc:  # the decoder's only failure: malformed gossip is dropped
                log.info("dropped a malformed announcement from %s: %s", sender[:16], exc)
                return
            for msg in msgs:
                # pubsub signs messages (strict signing): `sender` is the originator, so an announcement
                # naming another publisher is a lie and is dropped
                if msg.model_fingerprint == model_fingerprint and msg.publisher == sender:
                    handler(msg, sender)

        await self.p2p.subscribe(announce_topic(model_fingerprint), on_message)


class Network:
    """The asyncio-facing network layer of a kvswap node. One instance per node; start() once, stop() once."""

    def __init__(self) -> None:
        self._bridge = TrioBridge()  # its worker threads: ServeTuning.worker_threads
        self._node: TrioNode | None = None
        self._on_announce: Callable[[Announce, str], Any] | None = None

    # --- lifecycle --------------------------------------------------------------------------------------

    async def start(
        self,
        *,
        seed: bytes,
        listen_addrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        bootstrap: Sequence[str] = (),
        service: Service | None = None,
        target: FetchTarget | None = None,
        on_transfer: Callable[[TransferEvent], Any] | None = None,
        on_announce: Callable[[Announce, str], Any] | None = None,
        enable_mdns: bool = False,
        use_dataplane: bool = True,
        tuning: NodeTuning = DEFAULT_TUNING,
        nat: NatConfig | None = None,
        till: Till | None = None,
        payer: Payer | None = None,
    ) -> None:
        """Start the libp2p host (listening, DHT, gossipsub, handlers) and dial the bootstrap peers. `tuning`:
        the node's timeouts, quotas, rationing and fetch rules (node/tuning.py); `nat`: reachability, relays
        and hole punching (node/nat.py); `till` / `payer`: this node's terms as a provider and its vouchers as a
        consumer (node/payments.py; without them it serves for free and pays nobody)."""
        if self._node is not None:
            raise LocalProtocolError("Network.start() called twice")
        config = P2PConfig(seed=seed, listen_addrs=list(listen_addrs), bootstrap=list(bootstrap),
                           enable_mdns=enable_mdns, tuning=tuning, nat=nat or NatConfig())
        bridge = self._bridge
        bridge.worker_threads = tuning.serve.worker_threads
        hook = (lambda event: bridge.call_soon_in_asyncio(on_transfer, event)) if on_transfer else None
        self._on_announce = on_announce

        started: list[TrioNode] = []

        async def main(nursery: trio.Nursery, ready: Callable[[], None]) -> None:
            node = TrioNode(config, service=service, target=target, on_transfer=hook,
                            use_dataplane=use_dataplane, limiter=bridge.worker_limiter, till=till, payer=payer)
            await nursery.start(node.run)
            started.append(node)
            ready()

        await self._bridge.start(main)  # raises whatever stopped the node before it was ready
        self._node = started[0]

    async def stop(self) -> None:
        """Stop everything trio-side (host, DHT, pubsub, data plane) and join the thread."""
        await self._bridge.stop()
        self._node = None

    @property
    def running(self) -> bool:
        return self._node is not None and self._bridge.running

    def _need(self) -> TrioNode:
        if self._node is None or not self._bridge.running:
            raise LocalProtocolError("the network layer is not running (call start first)")
        return self._node

    # --- identity and peers -----------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._need().peer_id

    @property
    def addrs(self) -> list[str]:
        """Dialable multiaddrs of this node, each ending in /p2p/<peer id>."""
        return self._need().addrs

    def set_standing(self, peers: Sequence[str]) -> None:
        """The peers that always have a good record here (trusted publishers, bootstrap peers): they may use the
        streams reserved against crowds of strangers (node/quota.py). One attribute replaced, from any thread."""
        self._need().records.set_standing(peers)

    async def connect(self, addr: str) -> str:
        """Dial a peer multiaddr (.../p2p/<id>); returns its peer id."""
        node = self._need()
        return await self._bridge.call(node.p2p.connect, addr)

    def uploads_snapshot(self) -> dict | None:
        """The upload gate's counts (TrioNode.uploads_snapshot), read from any thread: plain integers."""
        node = self._node
        return node.uploads_snapshot() if node is not None else None

    def nat_snapshot(self) -> dict | None:
        """node/nat.py's numbers, read from any thread (small counters and dicts; a read racing a change is
        taken again)."""
        node = self._node
        nat_service = node.p2p.nat if node is not None else None
        for _ in range(3):
            try:
                return nat_service.snapshot() if nat_service is not None else None
            except RuntimeError:  # a dict changed size while it was copied
                continue
        return None

    async def peers(self) -> list[dict]:
        """Connected peers: [{"peer_id": str, "addrs": [str]}]."""
        node = self._need()

        async def read() -> list[dict]:
            return node.p2p.peers()

        return await self._bridge.call(read)

    async def info(self) -> dict:
        """A status snapshot for `kvswap node status`: identity, addresses, peers, what is advertised."""
        node = self._need()

        async def read() -> dict:
            dp = node.dataplane
            return {
                "peer_id": node.peer_id,
                "addrs": node.addrs,
                "peers": len(node.p2p.connected_peers()),
                "providing": len(node.p2p._provided),
                "dataplane": f"{dp.host}:{dp.port}" if dp is not None else None,
                "rejected_streams": node.exchange.rejected_streams,
                "refused_streams": node.exchange.refused.total,
                "busy_answers": sum(s.refused for s in node.exchange.slots.values()),
                "dataplane_refused": dp.refusals.total if dp is not None else 0,
                "dataplane_grants": dp.outstanding if dp is not None else 0,
                "gossip_dropped": node.p2p.gossip_dropped.total,
                "nat": node.p2p.nat.snapshot() if node.p2p.nat is not None else None,
                "uploads": node.uploads_snapshot(),
            }

        return await self._bridge.call(read)

    # --- content routing --------------------------------------------------------------------------------

    async def provide_artifact(self, cid: Cid, model_fingerprint: str, document_hash: str,
                               chunk_cids: Sequence[Cid] = ()) -> None:
        """Advertise a local artifact (its CID, document key and chunks) in the DHT, now and on a schedule."""
        node = self._need()

        async def provide() -> None:
            node.provide_artifact(cid, model_fingerprint, document_hash, chunk_cids)

        await self._bridge.call(provide)

    async def find_providers(self, key: ArtifactKey) -> list[str]:
        """Peer ids providing an artifact (by CID, or a document for one model), from the DHT."""
        node = self._need()
        return await self._bridge.call(node.p2p.find_providers, dht_key(check_key(key)))

    # --- gossip -----------------------------------------------------------------------------------------

    async def subscribe(self, model_fingerprint: str) -> None:
        """Receive announcements for this model; each valid one calls on_announce(announce, from_peer)."""
        node = self._need()
        bridge = self._bridge

        def handler(msg: Announce, sender: str) -> None:
            if self._on_announce is not None:
                bridge.call_soon_in_asyncio(self._on_announce, msg, sender)

        await self._bridge.call(node.subscribe, model_fingerprint, handler)

    async def announce(self, cid: Cid, model_fingerprint: str, document_hash: str, n_tokens: int) -> None:
        """Publish "this node holds artifact `cid`" on the model's gossipsub topic."""
        node = self._need()
        msg = Announce(cid, model_fingerprint, document_hash, n_tokens, node.peer_id)
        await self._bridge.call(node.announce, msg)

    # --- transfer ---------------------------------------------------------------------------------------

    async def fetch(
        self,
        key: ArtifactKey,
        *,
        n_tokens: int | None = None,
        progress: Callable[[FetchProgress], Any] | None = None,
        expect_model: str | None = None,
        expect_dtype: str | None = None,
        providers: Sequence[str] | None = None,
        accept_any: bool = False,
        purse: Purse | None = None,
    ) -> FetchResult:
        """Fetch an artifact (by Cid, or a DocumentKey for one model) into the target store.

        Verifies the manifest and every chunk, resumes from chunks already present, spreads chunks over
        providers, drops bad ones, then provides what it fetched. Raises NotFound, ModelMismatch,
        IntegrityError (from the manifest check), RemoteProtocolError.
        """
        node = self._need()
        if node.fetcher is None:
            raise UsageError("this node was started without a store (target) to fetch into")
        fkey = check_key(key)
        if n_tokens is not None and not 0 < n_tokens <= limits.MAX_WIRE_TOKENS:
            raise UsageError(f"n_tokens must be in 1..{limits.MAX_WIRE_TOKENS}")
        bridge = self._bridge
        report = (lambda p: bridge.call_soon_in_asyncio(progress, p)) if progress else None
        return await bridge.call(
            _fetch, node.fetcher, fkey, n_tokens, report, expect_model, expect_dtype,
            list(providers) if providers is not None else None, accept_any, purse,
        )

    async def other_models(self, document_hash: str, own_fingerprint: str) -> list[dict]:
        """Peers holding this document for another model than `own_fingerprint`: [{"peer", "model_id",
        "model_fingerprint", "cid"}] (node/fetch.py's Fetcher.other_models; empty when nobody says)."""
        node = self._need()
        if node.fetcher is None:
            return []
        found = await self._bridge.call(node.fetcher.other_models, document_hash, own_fingerprint)
        return [{"peer": peer, "model_id": v.model_id, "model_fingerprint": v.model_fingerprint, "cid": str(v.cid)}
                for peer, v in found]

    async def remote_generate(self, peer: str, request: GenerateRequest,
                              purse: Purse | None = None) -> GenerateResponse:
        """Hosted generation on `peer` (a peer id, or a multiaddr ending in /p2p/<id>, dialled first); a host
        that prices tokens is paid per token from `purse` (node/payments.py paid_generate)."""
        node = self._need()
        if "/" in peer:
            peer = await self.connect(peer)
        return await self._bridge.call(paid_generate, node.exchange, node.payer, peer, request, purse, node.limiter)

    def payments_snapshot(self) -> dict:
        """The till's terms and counters (node/payments.py), for `kvswap node status`."""
        node = self._need()
        out = node.till.snapshot()
        out["vouchers_unsent"] = node.payer.unsent if node.payer is not None else 0
        return out


async def _fetch(fetcher: Fetcher, key: ArtifactKey, n_tokens, report, expect_model, expect_dtype, providers,
                 accept_any=False, purse=None):
    return await fetcher.fetch(key, n_tokens=n_tokens, progress=report, expect_model=expect_model,
                               expect_dtype=expect_dtype, providers=providers, accept_any=accept_any, purse=purse)


__all__ = ["FetchProgress", "FetchResult", "Network", "TrioNode", "check_key", "provide_keys"]
