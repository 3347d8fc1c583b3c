"""Every size and time limit in kvswap, in one place, with its unit and its reason.

FORMAT.md and README.md ("Limits") list the same values; tests/test_limits.py checks they agree.
Sizes a peer declares are never trusted beyond these bounds.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB

# --- artifact format -------------------------------------------------------------------------------
#: Largest canonical manifest (bytes). A 3774-token Qwen3-4B artifact with 64-token blocks lists 59
#: chunks (~10 KB); 4 MiB leaves room for ~100k-token documents while stopping a hostile peer early.
MAX_MANIFEST_BYTES = 4 * MiB
#: Largest signature envelope list for one manifest (bytes): a few attestations, not a database.
MAX_ENVELOPES_BYTES = 256 * KiB
#: Largest audit attestation list for one manifest (bytes): a full audit's statement is ~0.5 KB, so dozens fit.
MAX_ATTESTATIONS_BYTES = 256 * KiB
#: Most attestations a store keeps per artifact (one per auditor, the newest); when full, one by an auditor
#: the node trusts replaces one by an auditor it does not (a flood of throwaway auditor keys evicts nothing
#: the node relies on).
MAX_ATTESTATIONS_PER_ARTIFACT = 64
#: Largest raw (decompressed) chunk (bytes). Qwen3-4B at 64 tokens per block is 9.4 MB raw; 64 MiB
#: bounds memory per in-flight chunk and caps a zstd bomb before any allocation.
MAX_CHUNK_RAW_BYTES = 64 * MiB
#: Largest stored (on-disk / on-the-wire) chunk (bytes); a stored chunk is never larger than raw + header.
MAX_CHUNK_STORED_BYTES = MAX_CHUNK_RAW_BYTES + 64 * KiB
#: Most chunks in one artifact.
MAX_CHUNKS = 65_536
#: Most tokens in one artifact (longer than any context window we serve).
MAX_TOKENS = 1_048_576
#: Largest raw "tail" blob (bytes): the float32 logits at the document's last position. Qwen3's
#: 151,669-token vocabulary is 607 KB; 4 MiB admits vocabularies up to ~1M entries.
MAX_TAIL_RAW_BYTES = 4 * MiB
#: Default tokens per chunk block: a Qwen3-4B chunk (147,456 B/token) is ~9.4 MB, "a few MB".
DEFAULT_BLOCK_TOKENS = 64

# --- wire protocol ---------------------------------------------------------------------------------
#: Largest control frame (bytes): requests, responses, announcements. Chunk payloads travel in data
#: frames bounded by MAX_CHUNK_STORED_BYTES.
MAX_FRAME_BYTES = 1 * MiB
#: Largest data frame (bytes): one stored chunk plus its small header.
MAX_DATA_FRAME_BYTES = MAX_CHUNK_STORED_BYTES + 4 * KiB
#: Largest gossipsub announcement (bytes).
MAX_ANNOUNCE_BYTES = 16 * KiB
#: Largest inbound gossipsub RPC (bytes): a few announcements plus pubsub's own control data.
MAX_GOSSIP_RPC_BYTES = 4 * MAX_ANNOUNCE_BYTES
#: Seconds a peer may stay silent mid-frame before we cut it off.
STREAM_IDLE_TIMEOUT_S = 15.0
#: Seconds to open a stream / dial a peer.
DIAL_TIMEOUT_S = 10.0
#: Seconds for one chunk request, end to end, before the provider is dropped for this chunk.
CHUNK_TIMEOUT_S = 60.0
#: Seconds a hosted generation may take before the client gives up.
GENERATE_TIMEOUT_S = 600.0
#: Most suffix + output tokens in one hosted generation request.
MAX_GENERATE_TOKENS = 4096
#: Largest token id accepted in a message (int32: larger than any vocabulary, small enough for every tokenizer).
MAX_TOKEN_ID = 2**31 - 1
#: Largest sampling seed accepted in a GenerateRequest (an int64, what numpy's generator takes).
MAX_GENERATE_SEED = 2**63 - 1
#: Most timing entries in a GenerateResponse (the host reports load/prefill/decode: a few, not a database).
MAX_TIMINGS = 16
#: Longest timing name in a GenerateResponse (chars).
MAX_TIMING_NAME_CHARS = 32
#: Longest ErrorMessage text (chars): one line for a log or a CLI error, never a dump.
MAX_ERROR_TEXT_CHARS = 1000
#: Longest hex field in a message (chars): a sha-256 hex digest is 64; room for a longer hash, not for junk.
MAX_HEX_CHARS = 128
#: Longest data-plane host in a DataGrant (chars): an IPv4 or IPv6 literal.
MAX_HOST_CHARS = 64
#: Bytes asked of a libp2p stream per read call: several Yamux frames at once, and no more held per read.
STREAM_READ_BYTES = 1 * MiB
#: Largest request frame body (bytes): ManifestRequest, ChunkRequest, GenerateRequest. The largest valid one
#: (1024 CIDs, or 4096 token ids) is ~40 KB; a serving node buffers and decodes no more than this per stream.
MAX_REQUEST_FRAME_BYTES = 64 * KiB
#: Most msgpack containers (maps + arrays) in one message body: a valid message has at most 3, so a frame of
#: nested empty arrays cannot expand into millions of Python objects.
MAX_MESSAGE_CONTAINERS = 8
#: Longest msgpack array in a message (entries): the longest valid list is a GenerateRequest's suffix.
MAX_MESSAGE_ARRAY = 4096

# --- daemon ----------------------------------------------------------------------------------------
#: Seconds between re-provides of everything the node holds.
REPROVIDE_INTERVAL_S = 300.0
#: Seconds the daemon waits for its tasks on SIGINT/SIGTERM before it exits anyway.
SHUTDOWN_TIMEOUT_S = 10.0
#: Seconds a stopping libp2p host spends closing its connections (peers then see them end at once).
CONNECTION_CLOSE_TIMEOUT_S = 2.0
#: Largest control-API request body (bytes): a document to publish.
MAX_API_BODY_BYTES = 64 * MiB
#: Seconds the CLI waits for one control-API answer (long operations are jobs it polls instead).
API_TIMEOUT_S = 30.0
#: Deepest JSON nesting a control-API body may have (every body kvswap sends is 2 levels deep).
MAX_API_JSON_DEPTH = 32
#: Seconds between two polls of a daemon job (fetch, publish) by the CLI or a Python caller.
JOB_POLL_INTERVAL_S = 0.2
#: Seconds a control-API request waits for the node's model to finish loading before it is refused.
ENGINE_WAIT_S = 600.0
#: Artifacts whose verified KV a hosting node keeps in memory for repeated hosted requests (each is the
#: whole document's KV: 556 MB for 3774 tokens of Qwen3-4B).
RESIDENT_KV_SLOTS = 2
#: Finished publish/fetch jobs the daemon keeps for pollers (the oldest are forgotten first).
MAX_FINISHED_JOBS = 256
#: Seconds a child daemon (node/launcher.py) may take to write its node.json, and again to load its model.
NODE_START_TIMEOUT_S = 300.0
#: Seconds a child daemon gets to exit after SIGTERM before it is killed (it cleans up within SHUTDOWN_TIMEOUT_S).
NODE_STOP_TIMEOUT_S = 30.0

# --- network layer (node/p2p.py, node/exchange.py, node/fetch.py) ---------------------------------------
#: Largest ManifestResponse frame body (bytes): a maximal manifest, envelopes and attestations plus msgpack overhead.
MAX_MANIFEST_FRAME_BYTES = MAX_MANIFEST_BYTES + MAX_ENVELOPES_BYTES + MAX_ATTESTATIONS_BYTES + 4 * KiB
#: Most chunk CIDs in one ChunkRequest / DataGrant: bounds the server's work per request.
MAX_CHUNKS_PER_REQUEST = 1024
#: Bytes of a one-time data-plane token (random, 256 bits: unguessable).
DATAPLANE_TOKEN_BYTES = 32
#: Seconds a data-plane grant stays valid if unused: a fetcher connects right after it is granted.
DATAPLANE_GRANT_TTL_S = 60.0
#: Most concurrent inbound streams per protocol a node serves; the rest wait (bounds memory and threads).
MAX_CONCURRENT_SERVES = 32
#: Serve slots of one protocol one peer may hold at once; when slots free up, waiting peers take turns
#: (round robin), so a flooding peer never holds more than this and honest peers are served meanwhile.
MAX_SERVES_PER_PEER = 8
#: Seconds a request may wait for a serve slot before it is answered `busy` (it never waits unbounded).
SERVE_WAIT_TIMEOUT_S = 10.0
#: Inbound kvswap streams (manifest, chunks, generate) one peer may have open at once, waiting or served;
#: more are refused at once with `busy` (a fetcher keeps FETCH_PARALLEL_CHUNKS + 1 open).
MAX_INBOUND_STREAMS_PER_PEER = 16
#: Inbound kvswap streams open at once from all peers (bounds buffered requests: each holds at most
#: MAX_REQUEST_FRAME_BYTES).
MAX_INBOUND_STREAMS = 256
#: Hosted generations one peer may have running or waiting at once (the engine runs one at a time and peers
#: take turns, so one peer's queue of long generations never delays another peer's by more than one).
MAX_GENERATE_PER_PEER = 1
#: Seconds a fetcher waits before asking a peer that answered `busy` again.
BUSY_RETRY_S = 0.5
#: Parallel chunk requests a fetch keeps in flight (across all providers).
FETCH_PARALLEL_CHUNKS = 4
#: Failures (timeout, bad bytes, reset) after which a provider is dropped for the rest of a fetch.
MAX_PROVIDER_FAILURES = 2
#: Most providers a fetch asks the DHT for.
MAX_PROVIDERS_PER_FETCH = 20
#: Seconds before a failed bootstrap dial is tried again, doubling up to BOOTSTRAP_RETRY_MAX_S: a node may
#: start before its bootstrap peer.
BOOTSTRAP_RETRY_S = 1.0
#: Longest pause between two bootstrap dials (seconds).
BOOTSTRAP_RETRY_MAX_S = 30.0
#: Seconds for one DHT lookup or provide before it is abandoned (the fetch falls back to connected peers).
DHT_QUERY_TIMEOUT_S = 15.0
#: ADD_PROVIDER messages per 10 s a node accepts from one peer. libp2p's default of 10 is tuned for IPFS;
#: kvswap provides every chunk CID, so a fetcher providing a large artifact sends far more.
PROVIDER_RATE_MAX = 100_000
#: Seconds between passes that add connected peers to the DHT routing table (KadDHT learns none by itself).
ROUTING_SYNC_INTERVAL_S = 1.0
#: Seconds between two provides of one re-provide pass (a large store does not flood its peers at once).
PROVIDE_PACING_S = 0.01
#: Seconds the peerstore keeps addresses learnt from the DHT (provider records, peer lookups).
PEERSTORE_ADDR_TTL_S = 3600
#: Most data-plane grants outstanding at once, all peers together; when full, the oldest grant of the peer
#: holding the most is dropped for a new one (its fetcher falls back to libp2p streams).
MAX_DATAPLANE_GRANTS = 1024
#: Data-plane grants one peer may hold at once; a new one replaces its oldest (a fetcher uses each grant
#: right away and has FETCH_PARALLEL_CHUNKS requests in flight).
MAX_DATAPLANE_GRANTS_PER_PEER = 64
#: Chunk CIDs held in outstanding grants, all peers together (36 bytes each, packed: ~2.4 MB at most);
#: bounds grant memory however many CIDs each grant names.
MAX_DATAPLANE_GRANTED_CHUNKS = 65_536
#: Data-plane connections that have not yet presented a valid token; a new one makes the node drop the
#: oldest (an honest fetcher presents its token within a round trip, an idle socket is the one dropped).
MAX_DATAPLANE_PENDING = 64
#: Seconds a data-plane connection has to send the protocol hello and its token.
DATAPLANE_HELLO_TIMEOUT_S = 5.0
#: Data-plane transfers one peer may run at once (one per request in flight); more are refused and the
#: fetcher takes those chunks over libp2p streams.
MAX_DATAPLANE_TRANSFERS_PER_PEER = 4
#: Seconds a fetcher stops asking a peer for grants after that peer's data plane failed or refused it (the
#: chunks come over libp2p streams meanwhile).
DATAPLANE_BACKOFF_S = 30.0
#: Lowest port a fetcher dials for a grant: a peer cannot aim it at a system service on its own address.
DATAPLANE_MIN_PORT = 1024
#: Seconds between two log lines of one kind of refusal (bad tokens, streams over quota): a flood is counted,
#: not logged line by line.
REFUSAL_LOG_INTERVAL_S = 10.0
#: Socket buffer size asked for on data-plane connections (bytes): fewer wake-ups per multi-MB chunk
#: (+40% throughput under load, NETWORK.md); the kernel may cap it.
DATAPLANE_SOCKET_BUFFER_BYTES = 4 * MiB
#: Worker threads the trio side may use at once for store, engine and hashing work.
WORKER_THREADS = 16
#: Most chunks a fetch asks one provider for in one request (amortises request overhead over small chunks).
FETCH_BATCH_CHUNKS = 16
#: Stop adding chunks to a request at this many bytes: big chunks go one per request (balances load over
#: providers and workers), small ones share a request (amortises its overhead); a failure re-fetches at most this.
FETCH_BATCH_BYTES = 64 * MiB

# --- swarm distribution (node/ration.py, node/fetch.py) ---------------------------------------------------
#: Copies of each chunk of an artifact a node sends before it answers further fetchers "rationed, ask these
#: holders" instead (BitTorrent's super-seeding, by counting): when many peers fetch one artifact at once,
#: the publisher sends each chunk about this many times and the fetchers trade the rest among themselves.
RATION_COPIES = 2
#: Seconds a fetcher may be refused one chunk before it is served anyway (the holders may be gone or slow):
#: rationing delays a chunk by at most this, it never withholds it.
RATION_PATIENCE_S = 5.0
#: Seconds without any chunk of an artifact sent after which a node forgets who got its copies.
RATION_IDLE_RESET_S = 60.0
#: Most artifacts a node tracks copies for at once (the least recently served is forgotten first).
MAX_RATIONED_ARTIFACTS = 256
#: Most holders a rationed answer names.
MAX_HOLDER_HINTS = 4
#: Longest peer id accepted in a message (base58 characters; an Ed25519 id has 52).
MAX_PEER_ID_CHARS = 64
#: Seconds before a fetcher asks again for a chunk a provider rationed.
RATION_RETRY_S = 0.5
#: Seconds after a peer first rationed a chunk to a fetch past which its further rationed answers for that chunk
#: count as lacking it for good: an honest node serves a fetcher it has refused for RATION_PATIENCE_S, so one
#: still rationing twice that long later (a margin for latency) is lying, and a fetch whose only live peers
#: do so fails with NotFound instead of asking them every RATION_RETRY_S forever.
RATION_GIVE_UP_S = 2 * RATION_PATIENCE_S
#: Seconds before a fetcher asks a peer again for a chunk it lacked (doubling after each miss: the peer
#: may be fetching it right now).
LACK_RETRY_S = 0.2
#: Times a fetcher asks one peer for a chunk it lacks before it stops asking it for that chunk.
MAX_LACK_ASKS = 5
#: Seconds between a fetch's looks for new peers (connected peers, the DHT's providers of the artifact).
FETCH_PEER_REFRESH_S = 1.0
#: Most peers one fetch keeps track of (providers, holders named by rationed answers, connected peers).
MAX_PEERS_PER_FETCH = 64

# --- slow and lying providers (node/fetchplan.py, node/fetch.py) ----------------------------------------------
#: A request is late, and its chunks go to a faster peer, once it has run this many times as long as the
#: fastest peer of the fetch would take for its bytes (at that peer's measured rate).
LATE_FACTOR = 4.0
#: ...and at least this many seconds (scheduling noise on a loaded machine is not slowness).
LATE_MIN_S = 0.1
#: Shortest deadline of a request to a peer whose rate is measured (seconds): its deadline is LATE_FACTOR
#: times its own expected time, at least this, at most CHUNK_TIMEOUT_S per chunk.
REQUEST_MIN_TIMEOUT_S = 5.0
#: Holder hints from one peer that led nowhere (the named holder lacked the chunk, failed or was late) after
#: which the fetch ignores that peer's hints.
MAX_BAD_HINTS = 2
#: Seconds a fetch waits for a manifest from one provider before it asks the next one as well.
MANIFEST_HEDGE_S = 1.0
#: Peers asked which model they hold a document for, when it was not found for the asker's model (the answer
#: only names the model in the error; no fetch follows).
MAX_OTHER_MODEL_ASKS = 3
#: Seconds that question may take in all (DHT lookup and the asks) before the error is reported without it.
OTHER_MODEL_LOOKUP_S = 10.0

# --- gossip announcements (node/net.py, node/announcements.py) ---------------------------------------------
#: Announcements one publisher may send in a burst before its rate applies.
ANNOUNCE_BURST = 32
#: Announcements per second accepted from one publisher after its burst (the rest are dropped, not forwarded).
ANNOUNCE_RATE_PER_S = 1.0
#: Publishers whose announcement rate a node tracks at once (the least recently heard is forgotten first).
MAX_ANNOUNCE_SENDERS = 1024
#: Announcements a daemon keeps to show in its status, all publishers together (the oldest go first).
MAX_ANNOUNCEMENTS = 1024
#: Announcements kept per publisher (its oldest go first).
MAX_ANNOUNCEMENTS_PER_PEER = 16
#: Seconds an announcement is kept.
ANNOUNCEMENT_TTL_S = 3600.0
