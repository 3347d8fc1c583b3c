"""The wire's limits: what a peer may send in one frame, message or field, with its unit and its reason.

These are the bounds every kvswap peer must agree on, and the bounds a decoder enforces before it builds
anything from a peer's bytes. Nothing else lives here: the artifact format's limits sit beside its parser
(kvswap/artifact/limits.py), the node's timeouts, quotas and fetch tuning are the dataclasses of
node/tuning.py, the control API's in kvswap/control/limits.py. README.md ("Limits") lists these values;
tests/test_limits_doc.py checks they agree, and that every wire bound admits what the format allows.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB

# --- frames ------------------------------------------------------------------------------------------------
#: Largest control frame (bytes): requests, responses, announcements. Chunk payloads travel in data
#: frames bounded by MAX_DATA_FRAME_BYTES.
MAX_FRAME_BYTES = 1 * MiB
#: Largest stored chunk a data frame carries (bytes): the artifact format's largest stored chunk
#: (64 MiB of raw KV plus a 64 KiB codec header).
MAX_WIRE_CHUNK_BYTES = 64 * MiB + 64 * KiB
#: Largest data frame (bytes): one stored chunk plus its small header.
MAX_DATA_FRAME_BYTES = MAX_WIRE_CHUNK_BYTES + 4 * KiB
#: Largest manifest a ManifestResponse carries (bytes): the format's largest canonical manifest.
MAX_WIRE_MANIFEST_BYTES = 4 * MiB
#: Largest envelope list, and largest attestation list, a ManifestResponse carries (bytes each).
MAX_WIRE_SIGNATURES_BYTES = 256 * KiB
#: Largest ManifestResponse frame body (bytes): a maximal manifest, envelopes and attestations plus msgpack overhead.
MAX_MANIFEST_FRAME_BYTES = MAX_WIRE_MANIFEST_BYTES + 2 * MAX_WIRE_SIGNATURES_BYTES + 4 * KiB
#: Largest request frame body (bytes): ManifestRequest, ChunkRequest, GenerateRequest. The largest valid one
#: (1024 CIDs, or 4096 token ids) is ~40 KB; a serving node buffers and decodes no more than this per stream.
MAX_REQUEST_FRAME_BYTES = 64 * KiB
#: Largest gossipsub announcement (bytes).
MAX_ANNOUNCE_BYTES = 16 * KiB
#: Largest inbound gossipsub RPC (bytes): a few announcements plus pubsub's own control data.
MAX_GOSSIP_RPC_BYTES = 4 * MAX_ANNOUNCE_BYTES

# --- message bodies ----------------------------------------------------------------------------------------
#: Most msgpack containers (maps + arrays) in one message body: a valid message has at most 3, so a frame of
#: nested empty arrays cannot expand into millions of Python objects.
MAX_MESSAGE_CONTAINERS = 8
#: Longest msgpack array in a message (entries): the longest valid list is a GenerateRequest's suffix.
MAX_MESSAGE_ARRAY = 4096
#: Most chunk CIDs in one ChunkRequest / DataGrant: bounds the server's work per request.
MAX_CHUNKS_PER_REQUEST = 1024
#: Most tokens a message may say an artifact has (the format's largest artifact).
MAX_WIRE_TOKENS = 1_048_576
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
#: Longest peer id accepted in a message (base58 characters; an Ed25519 id has 52).
MAX_PEER_ID_CHARS = 64
#: Most holders a rationed answer names.
MAX_HOLDER_HINTS = 4
#: Largest signed terms a ManifestResponse carries (bytes): the payment format's terms are at most 512.
MAX_WIRE_TERMS_BYTES = 1 * KiB
#: Largest voucher a Voucher message carries (bytes): the payment format's voucher is 228.
MAX_WIRE_VOUCHER_BYTES = 256
#: Bytes of the terms digest a ChunkRequest or GenerateRequest accepts (sha-256).
TERMS_DIGEST_BYTES = 32
#: Bytes of a one-time data-plane token (random, 256 bits: unguessable).
DATAPLANE_TOKEN_BYTES = 32
