"""How a node behaves under load, as values passed in: timeouts, quotas, rationing, gossip and fetch rules.

None of these is a wire rule (those are protocol/limits.py): two nodes with different tuning still talk.
They are the daemon's choices, so they are passed into what uses them, as iroh-blobs passes its
`ConcurrencyLimits` and `RetryConfig`, instead of being read from module globals: `Network.start(tuning=...)`
hands each part its own group (the fetch plan its `FetchTuning`, the exchange its `ServeTuning`, ...), and a
test varies one value with `dataclasses.replace` without patching anything.

Each field carries its unit in its name and its reason in the comment above it; README.md ("Node tuning")
lists every default, and tests/test_limits_doc.py checks that the table and these defaults agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kvswap.config import setting
from kvswap.modes import SwarmMode

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class FetchTuning:
    """The fetch scheduler's rules (node/fetchplan.py, node/fetch.py)."""

    #: Parallel chunk requests a fetch keeps in flight (across all providers).
    parallel_chunks: int = 4
    #: Most chunks asked of one provider in one request (amortises request overhead over small chunks).
    batch_chunks: int = 16
    #: Stop adding chunks to a request at this many bytes: big chunks go one per request (balances load over
    #: providers and workers), small ones share a request; a failure re-fetches at most this.
    batch_bytes: int = 64 * MiB
    #: Failures (timeout, bad bytes, reset) after which a provider is dropped for the rest of a fetch.
    max_provider_failures: int = 2
    #: Most providers a fetch asks the DHT for.
    max_providers: int = 20
    #: Most peers one fetch keeps track of (providers, holders named by rationed answers, connected peers).
    max_peers: int = 64
    #: Seconds before a peer that answered `busy` is asked again.
    busy_retry_s: float = 0.5
    #: Seconds before a peer is asked again for a chunk it lacked (doubling after each miss: the peer may be
    #: fetching it right now).
    lack_retry_s: float = 0.2
    #: Times one peer is asked for a chunk it lacks before the fetch stops asking it for that chunk.
    max_lack_asks: int = 5
    #: Seconds before a chunk a provider rationed is asked for again.
    ration_retry_s: float = 0.5
    #: Seconds after a peer first rationed a chunk past which its further rationed answers count as lacking
    #: it for good: an honest node serves a fetcher it refused within its longest patience (ration.patience_max_s
    #: 20 s, plus ration.private_holder_extra_s 8 s when every holder is behind a NAT), so one still rationing
    #: later is lying, and a fetch among such liars fails instead of asking them forever.
    ration_give_up_s: float = 30.0
    #: Seconds between a fetch's looks for new peers (connected peers, the DHT's providers of the artifact).
    peer_refresh_s: float = 1.0
    #: Seconds a chunk request may go without receiving a byte before it fails (one failure for the provider):
    #: progress, not size, so a slow link works as long as bytes flow (a fixed 60 s per chunk failed every
    #: consumer of a swarm on 25 Mbit/s links, where a shared 6.5 MB chunk took longer).
    idle_timeout_s: float = 15.0
    #: Slowest a request may run on average (bytes per second) before it fails, over fetch.request_min_timeout_s
    #: of grace: a peer that trickles a byte now and then cannot hold a request open forever (64 KiB/s is a
    #: 6.5 MB chunk in 100 s).
    min_rate_bytes_s: float = 64 * 1024
    #: Seconds one chunk request may take end to end whatever its progress (0: no such bound). The previous
    #: rule, 60, kept for `node.swarm = "legacy"`.
    chunk_timeout_s: float = 0.0
    @property
    def silence_s(self) -> float:
        """Seconds a chunk answer may go without a byte: idle_timeout_s; under the legacy rule (chunk_timeout_s
        set) the whole chunk_timeout_s, as before."""
        return self.chunk_timeout_s if self.chunk_timeout_s > 0 else self.idle_timeout_s

    #: Times a dropped provider (fetch.max_provider_failures) may still be asked for a chunk that no live peer
    #: has: once it is the only holder, failing on a slow link must not fail the fetch.
    last_holder_asks: int = 2
    #: A request is late, and its chunks go to a faster peer, once it has run this many times as long as the
    #: fastest peer of the fetch would take for its bytes (at that peer's measured rate).
    late_factor: float = 4.0
    #: ...and at least this many seconds (scheduling noise on a loaded machine is not slowness).
    late_min_s: float = 0.1
    #: Shortest deadline of a request to a peer whose rate is measured (seconds): its deadline is late_factor
    #: times its own expected time, at least this, at most chunk_timeout_s per chunk.
    request_min_timeout_s: float = 5.0
    #: Holder hints from one peer that led nowhere after which the fetch ignores that peer's hints.
    max_bad_hints: int = 2
    #: Seconds a fetch waits for a manifest from one provider before it asks the next one as well.
    manifest_hedge_s: float = 1.0
    #: Peers asked which model they hold a document for, when it was not found for this node's model.
    max_other_model_asks: int = 3
    #: Seconds that question may take in all before the error is reported without it.
    other_model_lookup_s: float = 10.0
    #: Seconds a fetch with a budget spends, after the manifest, asking the other providers for their prices (their
    #: manifest answers carry their terms), so the plan can rank them cheapest first; the silent ones count as free.
    price_lookup_s: float = 2.0
    #: Seconds a fetcher asks a peer whose data plane failed or refused it for no grant (libp2p meanwhile).
    dataplane_backoff_s: float = 30.0
    #: Largest artifact a fetch starts on (stored bytes, as its manifest declares), whatever the store's budget:
    #: a trusted publisher's manifest once declared 94 GB, and the fetch ran on without anyone comparing.
    max_artifact_bytes: int = 64 * GiB


@dataclass(frozen=True)
class ServeTuning:
    """What one node gives the peers it serves (node/exchange.py, node/quota.py): per-peer shares and totals."""

    #: Concurrent inbound requests per protocol a node serves; the rest wait (bounds memory and threads).
    max_concurrent: int = 32
    #: Serve slots of one protocol one peer may hold at once; when slots free up, waiting peers take turns.
    max_per_peer: int = 8
    #: Seconds a request may wait for a serve slot before it is answered `busy`.
    wait_timeout_s: float = 10.0
    #: Chunks sent at once, all peers and artifacts (node/uploads.py): a few uploads at full speed complete,
    #: and can be re-shared, long before thirty sharing the uplink do (BitTorrent unchokes 4). 0: no bound.
    upload_slots: int = 4
    #: ...of which one artifact may take this many.
    upload_slots_per_artifact: int = 4
    #: ...of which this many go to a waiting peer drawn at random (an optimistic unchoke: a newcomer with
    #: nothing to give yet still gets a turn).
    optimistic_slots: int = 1
    #: Seconds a chunk waits for an upload slot before the fetcher is pointed at its holders, or told to come back.
    upload_wait_s: float = 5.0
    #: Inbound kvswap streams one peer may have open at once, waiting or served; more are reset at once.
    max_streams_per_peer: int = 16
    #: Inbound kvswap streams open at once from all peers (each buffers at most MAX_REQUEST_FRAME_BYTES).
    max_streams: int = 256
    #: Inbound streams held by peers without a record (node/quota.py PeerRecords), per IP address: identities
    #: cost nothing, addresses do (18 fresh identities from one address once held all 256 slots).
    max_streams_per_ip: int = 64
    #: ...and per /24 (IPv4) or /64 (IPv6) subnet: a host with many addresses in one block is one host.
    max_streams_per_subnet: int = 192
    #: Streams of max_streams only peers with a record may take (peers this node fetched from or served to
    #: the end, trusted publishers, bootstrap peers): a crowd of strangers never takes every slot.
    reserved_streams: int = 64
    #: Peers whose earned record is remembered (the least recently earned is forgotten first).
    max_recorded_peers: int = 4096
    #: Hosted generations one peer may have running or waiting at once (peers take turns on the engine).
    max_generate_per_peer: int = 1
    #: Seconds a peer may stay silent mid-frame before we cut it off.
    stream_idle_timeout_s: float = 15.0
    #: Seconds to open a stream / dial a peer.
    dial_timeout_s: float = 10.0
    #: Seconds a hosted generation may take before the asking node gives up.
    generate_timeout_s: float = 600.0
    #: Bytes asked of a libp2p stream per read call: several Yamux frames at once, and no more held per read.
    stream_read_bytes: int = 1 * MiB
    #: Worker threads the trio side may use at once for store, engine and hashing work.
    worker_threads: int = 16
    #: Seconds between two log lines of one kind of refusal: a flood is counted, not logged line by line.
    refusal_log_interval_s: float = 10.0


@dataclass(frozen=True)
class DataPlaneTuning:
    """The plain-TCP bulk data plane (node/dataplane.py)."""

    #: Seconds a data-plane grant stays valid if unused: a fetcher connects right after it is granted.
    grant_ttl_s: float = 60.0
    #: Grants outstanding at once, all peers; when full, the peer holding the most loses its oldest.
    max_grants: int = 1024
    #: Grants one peer may hold at once; a new one replaces its oldest.
    max_grants_per_peer: int = 64
    #: Chunk CIDs held in outstanding grants, all peers together (36 bytes each, packed: ~2.4 MB at most).
    max_granted_chunks: int = 65_536
    #: Connections that have not yet presented a valid token; a new one makes the node drop the oldest.
    max_pending: int = 64
    #: Seconds a data-plane connection has to send the protocol hello and its token.
    hello_timeout_s: float = 5.0
    #: Data-plane transfers one peer may run at once; more are refused and go over libp2p streams.
    max_transfers_per_peer: int = 4
    #: Lowest port a fetcher dials for a grant: a peer cannot aim it at a system service on its own address.
    min_port: int = 1024
    #: Socket buffer size asked for on data-plane connections (bytes): fewer wake-ups per multi-MB chunk.
    socket_buffer_bytes: int = 4 * MiB


@dataclass(frozen=True)
class RationTuning:
    """Upload rationing for swarms (node/ration.py)."""

    #: Copies of each chunk of an artifact sent before further fetchers are pointed at holders (0: off);
    #: the `node.ration_copies` setting (kvswap/config.py) declares it.
    copies: int = setting("node.ration_copies").default
    #: Seconds after a chunk's latest copy completed before another copy goes out (its holders have had that
    #: long to re-share it): a chunk is delayed, never withheld.
    patience_s: float = 5.0
    #: ...or this many times as long as that copy took to send, if longer: on a slow or crowded link a holder
    #: needs longer to pass a chunk on (at 5 s alone a second copy went out in one testnet run in three).
    patience_factor: float = 2.0
    #: ...but never longer than this (seconds): fetchers give a rationing peer up after fetch.ration_give_up_s.
    patience_max_s: float = 20.0
    #: Seconds more when every holder of the chunk is behind a NAT (it advertises relayed addresses): a fetcher
    #: reaches one through its relay and waits for the hole punch (5-13 s in the NAT swarm runs) before it can
    #: pass the chunk on. With patience_max_s still below fetch.ration_give_up_s.
    private_holder_extra_s: float = 8.0
    #: 1: the previous rule (patience counted from each fetcher's first refusal, no upload slots, 60 s per
    #: chunk request), kept measurable beside the new one (`node.swarm = "legacy"`); 0: super-seeding.
    legacy: int = 0
    #: Seconds without any chunk of an artifact sent after which a node forgets who got its copies.
    idle_reset_s: float = 60.0
    #: Artifacts tracked for rationing at once (the least recently served is forgotten first).
    max_artifacts: int = 256


@dataclass(frozen=True)
class GossipTuning:
    """Announcements heard over gossipsub (node/p2p.py, node/announcements.py)."""

    #: Announcements one publisher may send in a burst before its rate applies.
    burst: int = 32
    #: Announcements per second accepted from one publisher after its burst (the rest dropped, not forwarded).
    rate_per_s: float = 1.0
    #: Publishers whose announcement rate is tracked at once (the least recently heard is forgotten first).
    max_senders: int = 1024
    #: Announcements one forwarding peer may deliver in a burst, whatever keys signed them (a fresh key per
    #: announcement, 3,165 of 5,000 once got through the per-publisher rate)...
    forwarder_burst: int = 64
    #: ...and per second after it (a relay that forwards others' announcements sends more than one publisher).
    forwarder_rate_per_s: float = 8.0
    #: Announcements accepted from all peers together in a burst: the last bound, whatever the identities.
    total_burst: int = 256
    #: ...and per second after it (a crowd of identities shares this, so a flood cannot make the node relay or
    #: log more).
    total_rate_per_s: float = 32.0
    #: Announcements a daemon keeps to show in its status, all publishers together (the oldest go first).
    max_kept: int = 1024
    #: Announcements kept per publisher (its oldest go first).
    max_kept_per_peer: int = 16
    #: Seconds an announcement is kept.
    ttl_s: float = 3600.0


@dataclass(frozen=True)
class DhtTuning:
    """The libp2p host, Kademlia and re-providing (node/p2p.py)."""

    #: Seconds between re-provides of everything the node holds.
    reprovide_interval_s: float = 300.0
    #: Seconds for one DHT lookup or provide before it is abandoned (the fetch falls back to connected peers).
    query_timeout_s: float = 15.0
    #: ADD_PROVIDER messages per 10 s accepted from one peer. libp2p's 10 is tuned for IPFS; kvswap provides
    #: every chunk CID, so a fetcher providing a large artifact sends far more.
    provider_rate_max: int = 100_000
    #: Seconds between passes that add connected peers to the DHT routing table (KadDHT learns none itself).
    routing_sync_interval_s: float = 1.0
    #: Seconds between two provides of one re-provide pass (a large store does not flood its peers at once).
    provide_pacing_s: float = 0.01
    #: Seconds the peerstore keeps addresses learnt from the DHT (provider records, peer lookups).
    peerstore_addr_ttl_s: float = 3600.0
    #: Seconds before a failed bootstrap dial is tried again, doubling: a node may start before its bootstrap peer.
    bootstrap_retry_s: float = 1.0
    #: Longest pause between two bootstrap dials (seconds).
    bootstrap_retry_max_s: float = 30.0
    #: Seconds a stopping libp2p host spends closing its connections (peers then see them end at once).
    connection_close_timeout_s: float = 2.0


@dataclass(frozen=True)
class DaemonTuning:
    """The daemon process (node/daemon.py, node/jobs.py, node/launcher.py)."""

    #: Seconds the daemon waits for its tasks on SIGINT/SIGTERM before it exits anyway.
    shutdown_timeout_s: float = 10.0
    #: Seconds a control-API request waits for the node's model to finish loading before it is refused.
    engine_wait_s: float = 600.0
    #: Artifacts whose verified KV a hosting node keeps in memory for repeated hosted requests (each is the
    #: whole document's KV: 556 MB for 3774 tokens of Qwen3-4B).
    resident_kv_slots: int = 2
    #: Finished publish/fetch jobs kept for pollers (the oldest are forgotten first).
    max_finished_jobs: int = 256


@dataclass(frozen=True)
class NatTuning:
    """Reachability behind NAT: AutoNAT, circuit relay v2 and hole punching (node/nat.py). The relay limits
    bound what a public node gives hostile peers: a relay is not free bandwidth."""

    #: AutoNAT servers that must agree (and outnumber the others) before the node calls itself public or
    #: private (the spec asks for more than three; few nodes know that many peers).
    autonat_confirmations: int = 2
    #: Server answers remembered (the oldest is forgotten first); also the most servers asked per pass.
    autonat_max_servers: int = 16
    #: Seconds one AutoNAT question (ask, dial-back, answer) may take before it counts as no answer.
    autonat_query_timeout_s: float = 10.0
    #: Seconds an AutoNAT server spends dialling a requester back before it answers "could not".
    autonat_dial_timeout_s: float = 5.0
    #: Seconds before the same server is asked again (addresses and NAT mappings change).
    autonat_interval_s: float = 300.0
    #: Seconds between AutoNAT passes while the answer is unknown (four times as long once it is known).
    autonat_retry_s: float = 2.0
    #: Dial-backs our AutoNAT server makes for one peer within `autonat_dialback_window_s` (more are refused:
    #: no verdict; a client asks one server once per `autonat_interval_s` once it has an answer).
    autonat_dialbacks_per_peer: int = 4
    #: Dial-backs our AutoNAT server makes for all peers together within the window.
    autonat_dialbacks_total: int = 64
    #: Seconds of the AutoNAT server's dial-back window.
    autonat_dialback_window_s: float = 60.0
    #: Relays a private node holds a reservation on at once (each one more relayed address it advertises).
    max_relays: int = 2
    #: Seconds a reservation request may take (dial the relay, ask, answer).
    reservation_timeout_s: float = 10.0
    #: Seconds between passes over the relays: new reservations, renewals, expired ones dropped.
    reservation_retry_s: float = 5.0
    #: A reservation is renewed once fewer than this many seconds of it are left.
    reservation_refresh_s: float = 600.0
    #: Seconds a reservation on our relay lasts before its holder must renew it.
    relay_reservation_ttl_s: int = 3600
    #: Reservations our relay holds at once, all peers together (more are refused).
    relay_max_reservations: int = 64
    #: Reservations our relay holds for peers at one IP address (many identities from one host get no more).
    relay_max_reservations_per_ip: int = 4
    #: Circuits our relay carries at once, all reservations together.
    relay_max_circuits: int = 32
    #: Circuits our relay carries at once for dialers at one IP address (one host cannot take every circuit).
    relay_max_circuits_per_ip: int = 8
    #: Circuits one reservation's holder may be reached by at once.
    relay_circuits_per_reservation: int = 4
    #: Seconds one circuit through our relay may last (then it is reset; control traffic redials).
    relay_circuit_duration_s: int = 600
    #: Bytes one circuit through our relay may carry, both ways together: control traffic, and chunk bytes
    #: only where `node.relay_data` allows them.
    relay_circuit_bytes: int = 64 * MiB
    #: Seconds a dial through a relay may take (connect to the relay, CONNECT, handshake with the target).
    relay_dial_timeout_s: float = 8.0
    #: Seconds a direct dial of a peer that may sit behind a NAT gets before its relays are tried.
    direct_dial_timeout_s: float = 5.0
    #: Relayed addresses of one peer kept and tried (a peer may claim any number).
    max_peer_relay_addrs: int = 4
    #: Seconds one hole-punch dial may take (DCUtR's dial timeout; a TCP simultaneous open is quick or never).
    hole_punch_dial_timeout_s: float = 3.0
    #: Seconds a connection may stay relayed before its upgrade counts as failed (it stays relayed).
    hole_punch_give_up_s: float = 30.0
    #: Hole punches this node starts at once, each toward another peer (py-libp2p's own DCUtR driver starts
    #: them one after another, every 2 s: a fetcher meeting seven relayed peers at once waited up to 18 s).
    hole_punch_concurrency: int = 8
    #: Seconds a relayed connection waits for the peer with the smaller id to start the hole punch before this
    #: side starts one itself (one side at a time: two exchanges at once cross their dials).
    hole_punch_answer_wait_s: float = 6.0
    #: Seconds after a failed hole punch before this side tries again...
    hole_punch_retry_s: float = 2.0
    #: ...up to this many times per relayed connection.
    hole_punch_attempts: int = 3
    #: Seconds a relayed connection stays open once hole-punched (py-libp2p's DCUtR: 60 s): its circuit holds a
    #: relay slot for the peer meanwhile, and fetchers reaching a holder behind a NAT were refused.
    relay_close_grace_s: float = 5.0
    #: Seconds a chunk transfer waits, from a relayed connection's start, for it to become direct...
    upgrade_wait_s: float = 10.0
    #: ...and at most, while a hole punch toward the peer is under way or still due (its attempts not spent) and
    #: node.relay_data is off: under CPU load an upgrade took 10-39 s; below the 30 s in which a symmetric NAT's
    #: failure must come.
    upgrade_wait_max_s: float = 20.0
    #: Seconds between looks at which connections are relayed and which direct.
    watch_interval_s: float = 0.5
    #: Seconds after start a node that may be behind a NAT (AutoNAT has not answered; no peer has seen it yet,
    #: or one saw it at another address than it listens on) waits before it provides anyway: a private node's
    #: records must carry its relayed addresses, and its provides go to its relays, not a DHT-wide lookup.
    provide_wait_s: float = 30.0


@dataclass(frozen=True)
class HostingTuning:
    """The hosted-generation backend (node/hosting/): the vLLM server a `--host-backend vllm` node runs."""

    #: Generations the vLLM backend runs at once (vLLM's --max-num-seqs): the backend's capacity, so the
    #: generate protocol's slots; a peer still has one in flight (serve.max_generate_per_peer).
    vllm_max_num_seqs: int = 16
    #: Bytes of vLLM's paged KV cache (--kv-cache-memory-bytes): on the CPU vLLM would otherwise reserve a
    #: share of all RAM. 1 GiB holds 16 x 2k-token sequences of SmolLM2-135M (45 KB/token) with room to spare.
    vllm_kv_cache_bytes: int = 1 * GiB
    #: Longest prompt + answer vLLM accepts (tokens, --max-model-len; 0: the model's own, from its config.json).
    vllm_max_model_len: int = 0
    #: Seconds the vLLM server may take to answer /health after it is started (45-118 s measured on 2 CPU cores).
    vllm_start_timeout_s: float = 600.0
    #: Seconds between two /health probes while the server starts.
    vllm_health_interval_s: float = 0.5
    #: Seconds a stopping vLLM server gets after SIGTERM before its process group is killed.
    vllm_stop_timeout_s: float = 10.0
    #: Seconds before a vLLM server that died is started again, doubling while it keeps dying...
    restart_backoff_s: float = 1.0
    #: ...up to this many seconds.
    restart_backoff_max_s: float = 60.0
    #: Seconds one generation may take at the backend before it is abandoned (as serve.generate_timeout_s).
    request_timeout_s: float = 600.0
    #: Seconds a request of the OpenAI door waits for a free backend slot before it is answered `busy`.
    slot_wait_s: float = 30.0


@dataclass(frozen=True)
class PayTuning:
    """Timing and memory bounds of payments (node/payments.py). The prices and credit windows are the node's
    terms, set in config.toml [pay] (kvswap/config.py)."""

    #: Seconds a priced sender waits for a voucher before it answers "come back" (a chunk) or `payment` (a
    #: generation): longer than an honest consumer's verify-sign-send round trip, short enough to free the slot.
    voucher_wait_s: float = 5.0
    #: Seconds one voucher send may take before it counts as failed.
    voucher_send_timeout_s: float = 10.0
    #: Times a failed voucher send is tried again before the payer gives up on it (a later voucher supersedes it).
    voucher_send_retries: int = 3
    #: Seconds between two tries of a voucher send.
    voucher_retry_s: float = 0.5
    #: Seconds a fetch or a hosted generation waits at its end for its last vouchers to be acked.
    flush_timeout_s: float = 10.0
    #: Consumers a provider keeps credit counters for in memory (the book has them all; the bound is memory).
    max_consumers: int = 4096
    #: Providers a consumer keeps terms of in memory.
    max_providers: int = 1024


@dataclass(frozen=True)
class NodeTuning:
    """Everything above, one group per part of the node."""

    fetch: FetchTuning = field(default_factory=FetchTuning)
    serve: ServeTuning = field(default_factory=ServeTuning)
    dataplane: DataPlaneTuning = field(default_factory=DataPlaneTuning)
    ration: RationTuning = field(default_factory=RationTuning)
    gossip: GossipTuning = field(default_factory=GossipTuning)
    dht: DhtTuning = field(default_factory=DhtTuning)
    daemon: DaemonTuning = field(default_factory=DaemonTuning)
    nat: NatTuning = field(default_factory=NatTuning)
    hosting: HostingTuning = field(default_factory=HostingTuning)
    pay: PayTuning = field(default_factory=PayTuning)


def swarm_tuning(tuning: NodeTuning, mode: SwarmMode) -> NodeTuning:
    """`tuning` under the `node.swarm` mode: super-seeding is the defaults; legacy puts back the rules before
    issue 24 (patience from the refusal, no upload slots, 60 s per chunk request, a dropped provider never asked
    again), so both stay measurable."""
    if mode is SwarmMode.LEGACY:
        return replace(tuning, ration=replace(tuning.ration, legacy=1), serve=replace(tuning.serve, upload_slots=0),
                       fetch=replace(tuning.fetch, chunk_timeout_s=LEGACY_CHUNK_TIMEOUT_S, last_holder_asks=0))
    return tuning


#: seconds per chunk request under `node.swarm = "legacy"` (the fixed bound before progress-based timeouts)
LEGACY_CHUNK_TIMEOUT_S = 60.0

#: the defaults, shared (frozen: nothing can change them in place)
DEFAULT_TUNING = NodeTuning()

__all__ = ["DEFAULT_TUNING", "LEGACY_CHUNK_TIMEOUT_S", "swarm_tuning", "DaemonTuning", "DataPlaneTuning", "DhtTuning", "FetchTuning", "GossipTuning",
           "HostingTuning", "NatTuning", "NodeTuning", "PayTuning", "RationTuning", "ServeTuning"]
