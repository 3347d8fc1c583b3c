"""The sans-I/O wire codec: frames fed whole, byte by byte, with trailing garbage, oversized, malformed."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import LocalProtocolError, RemoteProtocolError, UsageError
from kvswap.protocol import limits
from kvswap.protocol.codec import NEED_DATA, PREFIX_BYTES, Decoder, encode, frame_size
from kvswap.protocol.messages import (
    MESSAGE_TYPES,
    Announce,
    ChunkData,
    ChunkMissing,
    ChunkRequest,
    DataGrant,
    ErrorMessage,
    GenerateRequest,
    GenerateResponse,
    ManifestRequest,
    ManifestResponse,
    Voucher,
    VoucherAck,
)
from kvswap.protocol.keys import DocumentKey
from kvswap.protocol.names import announce_topic, any_model_key, artifact_keys, cid_key, document_key

C1, C2 = Cid.of(b"one"), Cid.of(b"two")

SAMPLES = [
    ManifestRequest(C1),
    ManifestRequest(DocumentKey("cd" * 32, "ab" * 32)),
    ManifestRequest(DocumentKey("cd" * 32)),
    ManifestResponse(manifest=b"\x81\xa1a\x01", envelopes=(b"sig1", b"sig2")),
    ChunkRequest(cids=(C1, C2), dataplane=True, artifact=C2),
    ChunkRequest(cids=(C1,)),
    ChunkData(cid=C1, payload=b"\x00\xff" * 1000),
    ChunkData(cid=C2, payload=b""),
    ChunkMissing(cid=C2),
    ChunkMissing(cid=C1, rationed=True, holders=("12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5",)),
    DataGrant(host="127.0.0.1", port=4001, token=b"t" * limits.DATAPLANE_TOKEN_BYTES, cids=(C1, C2)),
    GenerateRequest(artifact_cid=C1, suffix_ids=(1, 2, 151_668), max_new_tokens=8, seed=7),
    GenerateRequest(artifact_cid=C1, suffix_ids=(), max_new_tokens=0),
    GenerateResponse(tokens=(5, 6), text="hi there", timings=(("decode_s", 0.5), ("load_s", 0.01))),
    ErrorMessage(code="not_found", text="no such artifact"),
    ErrorMessage(code="payment", text="accept the terms"),
    ManifestResponse(manifest=b"m", terms=b"t" * 200),
    ChunkRequest(cids=(C1,), artifact=C1, terms=b"d" * limits.TERMS_DIGEST_BYTES),
    GenerateRequest(artifact_cid=C1, suffix_ids=(1,), max_new_tokens=4, terms=b"d" * limits.TERMS_DIGEST_BYTES),
    Voucher(b"v" * 228),
    VoucherAck(sequence=7),
    Announce(artifact_cid=C1, model_fingerprint="ab" * 32, document_hash="cd" * 32, n_tokens=3774,
             publisher="12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"),
]
STREAM = b"".join(encode(m) for m in SAMPLES)


def test_every_message_type_has_a_sample():
    assert {type(m).TYPE for m in SAMPLES} == set(MESSAGE_TYPES)


def test_whole_stream_decodes_in_order():
    dec = Decoder()
    assert dec.feed(STREAM) == SAMPLES
    assert dec.buffered == 0
    assert dec.bytes_in == len(STREAM)
    assert dec.next_message() is NEED_DATA
    dec.eof()  # a clean end


def test_byte_by_byte():
    dec = Decoder()
    out = []
    for i in range(len(STREAM)):
        out += dec.feed(STREAM[i : i + 1])
    assert out == SAMPLES


def test_frame_size_matches_encoding():
    for m in SAMPLES:
        assert frame_size(m) == len(encode(m))


def test_trailing_partial_frame_waits_then_fails_at_eof():
    dec = Decoder()
    assert dec.feed(STREAM + encode(SAMPLES[0])[:3]) == SAMPLES
    assert dec.next_message() is NEED_DATA
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        dec.eof()


def test_trailing_garbage_is_rejected():
    dec = Decoder()
    with pytest.raises(RemoteProtocolError, match="unexpected frame type"):
        dec.feed(STREAM + b"\xee\x00\x00\x00\x01x")


def test_oversized_frame_rejected_from_its_prefix_alone():
    dec = Decoder()
    prefix = struct.pack(">BI", ManifestRequest.TYPE, limits.MAX_FRAME_BYTES + 1)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        dec.feed(prefix)  # no body bytes needed to refuse it
    # a poisoned decoder stays poisoned
    with pytest.raises(RemoteProtocolError):
        dec.feed(encode(SAMPLES[0]))


def test_per_type_limits():
    big_chunk = struct.pack(">BI", ChunkData.TYPE, limits.MAX_DATA_FRAME_BYTES)
    assert Decoder().feed(big_chunk) == []  # a data frame may be that large: keep buffering
    with pytest.raises(RemoteProtocolError):
        Decoder().feed(struct.pack(">BI", ChunkData.TYPE, limits.MAX_DATA_FRAME_BYTES + 1))
    with pytest.raises(RemoteProtocolError):
        Decoder().feed(struct.pack(">BI", Announce.TYPE, limits.MAX_ANNOUNCE_BYTES + 1))
    with pytest.raises(RemoteProtocolError):
        Decoder(max_body=100).feed(struct.pack(">BI", ManifestRequest.TYPE, 101))


def test_allowed_types_enforced():
    dec = Decoder(allowed={ChunkRequest.TYPE})
    with pytest.raises(RemoteProtocolError, match="unexpected frame type"):
        dec.feed(encode(ManifestRequest(C1)))


def _frame(mtype: int, body: bytes) -> bytes:
    return struct.pack(">BI", mtype, len(body)) + body


@pytest.mark.parametrize(
    "frame",
    [
        _frame(ManifestRequest.TYPE, b"\xc1"),  # never-used msgpack byte
        _frame(ManifestRequest.TYPE, msgpack.packb([1, 2])),  # not a map
        _frame(ManifestRequest.TYPE, msgpack.packb({"c": b"short"})),  # bad CID
        _frame(ManifestRequest.TYPE, msgpack.packb({"m": "NOT HEX", "d": "ab"})),
        _frame(ChunkRequest.TYPE, msgpack.packb({"c": []})),  # no chunks
        _frame(ChunkRequest.TYPE, msgpack.packb({"c": [C1.to_bytes()], "p": 1})),  # dataplane not bool
        _frame(ChunkData.TYPE, b"\x01\x55"),  # shorter than its CID header
        _frame(GenerateRequest.TYPE, msgpack.packb({"a": C1.to_bytes(), "s": ["x"], "n": 1})),
        _frame(GenerateRequest.TYPE, msgpack.packb({"a": C1.to_bytes(), "s": [], "n": 10**9})),
        _frame(ErrorMessage.TYPE, msgpack.packb({"c": "made_up", "t": ""})),
        _frame(DataGrant.TYPE, msgpack.packb({"h": "x", "p": 1, "t": b"short", "c": [C1.to_bytes()]})),
        _frame(Announce.TYPE, msgpack.packb({"a": C1.to_bytes(), "m": "ab", "d": "cd", "n": -1, "p": "x"})),
        _frame(ManifestResponse.TYPE, msgpack.packb({"m": b"x", "e": ["not bytes"]})),
    ],
)
def test_malformed_bodies_raise_remote_protocol_error(frame):
    with pytest.raises(RemoteProtocolError, match="malformed"):
        Decoder().feed(frame)


def test_encode_refuses_oversized_local_messages():
    with pytest.raises(LocalProtocolError):
        encode(ChunkData(cid=C1, payload=bytes(limits.MAX_DATA_FRAME_BYTES)))
    with pytest.raises(LocalProtocolError):
        encode("not a message")  # type: ignore[arg-type]


def test_request_constructors_validate():
    with pytest.raises(RemoteProtocolError):
        ManifestRequest("not a key")  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError):
        ChunkRequest(cids=())
    with pytest.raises(RemoteProtocolError):
        GenerateRequest(artifact_cid=C1, suffix_ids=(1,) * limits.MAX_GENERATE_TOKENS, max_new_tokens=1)


def test_rationed_chunk_missing_is_checked():
    from kvswap.protocol.messages import _pack

    def body(**extra):
        return _pack({"c": C1.to_bytes(), **extra})

    assert ChunkMissing.from_body(body()) == ChunkMissing(C1)  # the pre-rationing form still decodes
    assert ChunkMissing.from_body(body(r=True, h=["Qm1"])) == ChunkMissing(C1, True, ("Qm1",))
    for bad in (dict(r=1), dict(r=True, h="Qm1"), dict(r=True, h=["no spaces"]), dict(r=True, h=["0OIl"]),
                dict(r=True, h=["x" * (limits.MAX_PEER_ID_CHARS + 1)]),
                dict(r=True, h=["Qm"] * (limits.MAX_HOLDER_HINTS + 1)), dict(h=["Qm1"])):
        with pytest.raises(RemoteProtocolError):
            ChunkMissing.from_body(body(**bad))


def test_announce_topic_is_per_model():
    assert announce_topic("ab" * 32) == "kvswap/announce/" + "ab" * 8


def test_dht_keys_are_pinned():
    """Peers must compute the same keys: a change here is a protocol change (bump the document key domain)."""
    assert cid_key(C1) == str(C1)
    assert document_key("ab" * 32, "cd" * 32) == "1220e43356fc0302854d82c0dfea64723d79adb05fc8bad42eabfff2015cb5d0a22d"
    assert document_key("ab" * 32, "cd" * 32) != document_key("cd" * 32, "ab" * 32)
    assert any_model_key("cd" * 32) == "122043250ecbdc56cd13f73d6babc7e54916cc1771e7b6a699fb6370cdf0defce77e"
    assert any_model_key("cd" * 32) not in {document_key("ab" * 32, "cd" * 32), document_key("", "cd" * 32)}


def test_a_manifest_request_names_a_cid_or_a_document_for_a_model_or_any():
    assert ManifestRequest(DocumentKey("cd" * 32)).any_model
    assert not ManifestRequest(DocumentKey("cd" * 32, "ab" * 32)).any_model
    assert not ManifestRequest(C1).any_model
    for bad in ("cd" * 32, None, ("ab" * 32, "cd" * 32)):
        with pytest.raises(RemoteProtocolError):
            ManifestRequest(bad)  # type: ignore[arg-type]
    # a document hash or fingerprint that is not 64 lowercase hex digits is refused where it enters
    from kvswap.protocol.messages import _pack

    for body in ({"d": "CD" * 32}, {"d": "cd" * 31}, {"m": "ab" * 33, "d": "cd" * 32}):
        with pytest.raises(RemoteProtocolError):
            ManifestRequest.from_body(_pack(body))
    with pytest.raises(UsageError):
        DocumentKey("cd" * 31)


def test_a_complete_artifact_is_provided_whole_a_prefix_only_by_its_chunks():
    doc, anymodel = document_key("ab" * 32, "cd" * 32), any_model_key("cd" * 32)
    assert artifact_keys(C1, "ab" * 32, "cd" * 32, [C2, C2], complete=True) == [str(C1), doc, anymodel, str(C2)]
    assert artifact_keys(C1, "ab" * 32, "cd" * 32, [C2], complete=False) == [str(C2)]


cids = st.binary(min_size=32, max_size=32).map(Cid)
hexes = st.text(alphabet="0123456789abcdef", min_size=1, max_size=64)
hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
messages = st.one_of(
    cids.map(lambda c: ManifestRequest(c)),
    st.builds(lambda m, d: ManifestRequest(DocumentKey(d, m)), hex64, hex64),
    hex64.map(lambda d: ManifestRequest(DocumentKey(d))),
    st.builds(ManifestResponse, st.binary(max_size=2000), st.lists(st.binary(max_size=100), max_size=4).map(tuple)),
    st.builds(ChunkRequest, st.lists(cids, min_size=1, max_size=20).map(tuple), st.booleans(),
              st.none() | cids),
    st.builds(ChunkData, cids, st.binary(max_size=5000)),
    st.builds(ChunkMissing, cids),
    st.builds(lambda c, h: ChunkMissing(c, rationed=True, holders=tuple(h)), cids,
              st.lists(st.text(alphabet="123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", min_size=1,
                               max_size=limits.MAX_PEER_ID_CHARS), max_size=limits.MAX_HOLDER_HINTS)),
    st.builds(GenerateRequest, cids, st.lists(st.integers(0, 2**31 - 1), max_size=50).map(tuple),
              st.integers(0, 100), st.none() | st.integers(0, 2**63 - 1)),
    st.builds(GenerateResponse, st.lists(st.integers(0, 2**31 - 1), max_size=50).map(tuple), st.text(max_size=200),
              st.dictionaries(st.text(max_size=10), st.floats(allow_nan=False, allow_infinity=False), max_size=4)
              .map(lambda d: tuple(sorted(d.items())))),
    st.builds(ErrorMessage, st.sampled_from(sorted(__import__("kvswap.protocol.messages",
                                                               fromlist=["ERROR_CODES"]).ERROR_CODES)),
              st.text(max_size=200)),
    st.builds(Announce, cids, hexes, hexes, st.integers(0, limits.MAX_WIRE_TOKENS), st.text(min_size=1, max_size=60)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, min_size=1, max_size=6), st.integers(1, 97))
def test_round_trip_any_split(msgs, step):
    data = b"".join(encode(m) for m in msgs)
    dec = Decoder()
    out = []
    for i in range(0, len(data), step):
        out += dec.feed(data[i : i + step])
    assert out == msgs
    assert dec.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_protocol_errors(data):
    dec = Decoder()
    try:
        dec.feed(data)
        dec.eof()
    except RemoteProtocolError:
        pass
    assert PREFIX_BYTES == 5


def test_requests_are_capped_at_max_request_frame_bytes_at_their_prefix():
    for mtype in (ManifestRequest.TYPE, ChunkRequest.TYPE, GenerateRequest.TYPE):
        assert Decoder().feed(struct.pack(">BI", mtype, limits.MAX_REQUEST_FRAME_BYTES)) == []
        with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
            Decoder().feed(struct.pack(">BI", mtype, limits.MAX_REQUEST_FRAME_BYTES + 1))
    largest = [ChunkRequest(tuple(Cid.of(str(i).encode()) for i in range(limits.MAX_CHUNKS_PER_REQUEST)), True, C1),
               GenerateRequest(C1, (limits.MAX_TOKEN_ID,) * (limits.MAX_GENERATE_TOKENS - 1), 1,
                               limits.MAX_GENERATE_SEED)]
    for msg in largest:  # the largest valid requests fit, and decode
        assert Decoder().feed(encode(msg)) == [msg]


@pytest.mark.parametrize("body", [
    b"\x81\xa1c" + b"\x91" * 20 + b"\x90",  # {"c": [[[...[]...]]]}: nesting past MAX_MESSAGE_CONTAINERS
    b"\x81\xa1c\xdc" + struct.pack(">H", limits.MAX_MESSAGE_ARRAY + 1) + b"\x90" * (limits.MAX_MESSAGE_ARRAY + 1),
    b"\x81\xa1c\xdc" + struct.pack(">H", 9) + b"\x90" * 9,  # nine empty arrays: containers past the bound
    b"\xde" + struct.pack(">H", limits.MAX_TIMINGS + 1) + b"".join(
        msgpack.packb(f"k{i}") + b"\x00" for i in range(limits.MAX_TIMINGS + 1)),  # a map past the bound
])
def test_message_bodies_decode_within_bounds(body):
    """A body that would decode into many Python objects is refused while decoding, not after."""
    with pytest.raises(RemoteProtocolError, match="within the message bounds"):
        Decoder().feed(_frame(ChunkRequest.TYPE, body))
