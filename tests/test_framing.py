"""protocol/'s framing beyond the message codec: frame prefixes, the conversation table, the order rule of
chunk answers, and the data plane's exact-size reader (fed whole, piece by piece, with trailing garbage,
and fuzzed)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import LocalProtocolError, RemoteProtocolError
from kvswap.protocol import limits
from kvswap.protocol.codec import (
    PREFIX_BYTES,
    Decoder,
    chunk_data_header,
    encode,
    encode_parts,
    encode_prefix,
    parse_prefix,
    payload_size,
)
from kvswap.protocol.conversation import (
    ANNOUNCE_TYPES,
    CONVERSATIONS,
    SERVED_PROTOCOLS,
    ChunkAnswers,
    announce_decoder,
)
from kvswap.protocol.dataplane import DataPlaneReader
from kvswap.protocol.messages import (
    CHUNK_HEADER_BYTES,
    MAX_BODY_BYTES,
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
from kvswap.protocol.names import CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL, GENERATE_PROTOCOL, MANIFEST_PROTOCOL, PAY_PROTOCOL

C = [Cid.of(f"chunk {i}".encode()) for i in range(4)]
HOLDER = "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"


# --- prefixes ----------------------------------------------------------------------------------------------


@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.integers(0, limits.MAX_DATA_FRAME_BYTES))
def test_prefix_round_trip_within_each_types_limit(mtype, length):
    if length > MAX_BODY_BYTES[mtype]:
        with pytest.raises(LocalProtocolError):
            encode_prefix(mtype, length)
        with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
            parse_prefix(struct.pack(">BI", mtype, length))
    else:
        assert parse_prefix(encode_prefix(mtype, length)) == (mtype, length)


@settings(max_examples=500)
@given(st.binary(min_size=5, max_size=5))
@example(b"\x00\x00\x00\x00\x00")
@example(b"\xff\xff\xff\xff\xff")
def test_any_five_bytes_parse_or_raise_remote_protocol_error(prefix):
    try:
        mtype, length = parse_prefix(prefix)
    except RemoteProtocolError:
        return
    assert mtype in MESSAGE_TYPES and length <= MAX_BODY_BYTES[mtype]


def test_prefix_checks_the_allowed_types_and_a_lowered_limit():
    prefix = encode_prefix(ChunkRequest.TYPE, 10)
    assert parse_prefix(prefix, allowed={ChunkRequest.TYPE}) == (ChunkRequest.TYPE, 10)
    with pytest.raises(RemoteProtocolError, match="unexpected frame type"):
        parse_prefix(prefix, allowed={ManifestRequest.TYPE})
    with pytest.raises(RemoteProtocolError):
        parse_prefix(prefix, max_body=9)
    with pytest.raises(LocalProtocolError):
        parse_prefix(prefix[:4])


@given(st.binary(max_size=3000))
def test_sendfile_header_plus_payload_is_the_encoded_frame(payload):
    assert chunk_data_header(C[0], len(payload)) + payload == encode(ChunkData(C[0], payload))


def test_sendfile_header_refuses_a_chunk_too_big_for_a_frame():
    with pytest.raises(LocalProtocolError):
        chunk_data_header(C[0], limits.MAX_DATA_FRAME_BYTES)


def test_decoded_frames_carry_their_wire_size():
    msgs = [ChunkRequest((C[0], C[1])), ChunkData(C[0], b"x" * 100), ChunkMissing(C[1], True, (HOLDER,)),
            ErrorMessage("limit", "too many")]
    stream = b"".join(encode(m) for m in msgs)
    frames = Decoder().feed_frames(stream)
    assert [f.message for f in frames] == msgs
    assert [f.wire_bytes for f in frames] == [len(encode(m)) for m in msgs]
    assert [payload_size(m) for m in msgs] == [0, 100, 0, 0]


# --- the conversation table --------------------------------------------------------------------------------


def test_every_message_belongs_to_a_conversation_or_the_gossip_topic():
    said = set(ANNOUNCE_TYPES)
    for conversation in CONVERSATIONS.values():
        said |= conversation.request_types | conversation.reply_types
    assert said == set(MESSAGE_TYPES)
    assert set(SERVED_PROTOCOLS) == {MANIFEST_PROTOCOL, CHUNKS_PROTOCOL, GENERATE_PROTOCOL, PAY_PROTOCOL}


@pytest.mark.parametrize("protocol, request_msg, reply", [
    (MANIFEST_PROTOCOL, ManifestRequest(C[0]), ManifestResponse(b"m")),
    (CHUNKS_PROTOCOL, ChunkRequest((C[0],)), ChunkData(C[0], b"x")),
    (GENERATE_PROTOCOL, GenerateRequest(C[0], (1,)), GenerateResponse((2,))),
    (PAY_PROTOCOL, Voucher(b"v" * 228), VoucherAck(1)),
])
def test_each_side_may_only_say_its_part(protocol, request_msg, reply):
    conversation = CONVERSATIONS[protocol]
    assert conversation.request_decoder().feed(encode(request_msg)) == [request_msg]
    assert conversation.reply_decoder().feed(encode(reply)) == [reply]
    assert conversation.reply_decoder().feed(encode(ErrorMessage("not_found"))) == [ErrorMessage("not_found")]
    with pytest.raises(RemoteProtocolError, match="unexpected frame type"):
        conversation.request_decoder().feed(encode(reply))  # a server never takes a reply
    with pytest.raises(RemoteProtocolError, match="unexpected frame type"):
        conversation.reply_decoder().feed(encode(request_msg))  # a client never takes a request
    with pytest.raises(RemoteProtocolError, match="unexpected frame type"):
        conversation.request_decoder().feed(encode(Announce(C[0], "ab", "cd", 1, HOLDER)))


def test_gossip_carries_announcements_only():
    ann = Announce(C[0], "ab", "cd", 1, HOLDER)
    assert announce_decoder().feed(encode(ann)) == [ann]
    with pytest.raises(RemoteProtocolError):
        announce_decoder().feed(encode(ChunkMissing(C[0])))


# --- the order rule of chunk answers -----------------------------------------------------------------------


def test_chunk_answers_in_the_order_asked():
    answers = ChunkAnswers(C[:3])
    assert answers.expected == C[0]
    answers.accept(ChunkData(C[0], b"x"))
    answers.accept(ChunkMissing(C[1]))
    with pytest.raises(RemoteProtocolError, match="another chunk"):
        ChunkAnswers(C[:3]).accept(ChunkData(C[1], b"x"))
    answers.accept(ChunkMissing(C[2], True, (HOLDER,)))
    assert answers.done and answers.expected is None
    with pytest.raises(RemoteProtocolError, match="after its answer was complete"):
        answers.accept(ChunkData(C[0], b"x"))


def test_a_grant_is_the_whole_answer_for_exactly_the_asked_chunks():
    grant = DataGrant("127.0.0.1", 1, b"t" * limits.DATAPLANE_TOKEN_BYTES, tuple(C[:2]))
    answers = ChunkAnswers(C[:2])
    assert answers.accept(grant) == grant and answers.done
    with pytest.raises(RemoteProtocolError, match="other chunks"):
        ChunkAnswers(C[1::-1]).accept(grant)  # same chunks, another order
    late = ChunkAnswers(C[:2])
    late.accept(ChunkData(C[0], b"x"))
    with pytest.raises(RemoteProtocolError, match="not its whole answer"):
        late.accept(DataGrant("127.0.0.1", 1, b"t" * limits.DATAPLANE_TOKEN_BYTES, (C[1],)))
    with pytest.raises(RemoteProtocolError):
        ChunkAnswers(C[:2], grant_allowed=False).accept(grant)  # no grant inside the data plane


def test_an_error_message_ends_the_answer_and_other_frames_are_refused():
    answers = ChunkAnswers(C[:2], who="peer P")
    answers.accept(ChunkData(C[0], b"x"))
    answers.accept(ErrorMessage("internal"))
    assert answers.done
    with pytest.raises(RemoteProtocolError, match="^peer P sent ManifestResponse, no chunk answer$"):
        ChunkAnswers(C[:1], who="peer P").accept(ManifestResponse(b"m"))
    with pytest.raises(LocalProtocolError):
        ChunkAnswers([])


# --- the data plane's reader -------------------------------------------------------------------------------


def _serve(answers) -> bytes:
    """What a data-plane server writes: sendfile form for data, encoded frames for missing chunks."""
    out = b""
    for msg in answers:
        if isinstance(msg, ChunkData):
            out += chunk_data_header(msg.cid, len(msg.payload)) + msg.payload
        else:
            out += b"".join(encode_parts(msg))
    return out


def _drive(reader: DataPlaneReader, stream: bytes, piece: int | None = None) -> tuple[list, int]:
    """Read `stream` as node/dataplane.py does: exactly need() bytes at a time (assembled from pieces of
    `piece` bytes as a socket might deliver them); stop when the reader is done or the stream ends.
    Returns the frames and the bytes consumed."""
    frames, pos = [], 0
    while (n := reader.need()) is not None:
        if pos + n > len(stream):
            break  # the peer closed mid-frame
        buf = bytearray()
        while len(buf) < n:  # a recv_into loop over a socket that delivers `piece` bytes per call
            take = n - len(buf) if piece is None else min(piece, n - len(buf))
            buf += stream[pos:pos + take]
            pos += take
        frame = reader.feed(buf)
        if frame is not None:
            frames.append(frame)
    return frames, pos


answers_strategy = st.lists(
    st.one_of(st.binary(max_size=2000).map(lambda p: ("data", p)), st.just(("missing", None)),
              st.lists(st.just(HOLDER), max_size=limits.MAX_HOLDER_HINTS).map(lambda h: ("rationed", tuple(h)))),
    min_size=1, max_size=5)


def _answers(spec) -> list:
    cids = [Cid.of(f"granted {i}".encode()) for i in range(len(spec))]
    out = []
    for cid, (kind, arg) in zip(cids, spec):
        if kind == "data":
            out.append(ChunkData(cid, arg))
        elif kind == "missing":
            out.append(ChunkMissing(cid))
        else:
            out.append(ChunkMissing(cid, rationed=True, holders=arg))
    return out


@settings(max_examples=200, deadline=None)
@given(answers_strategy, st.sampled_from([None, 1, 7, 4096]), st.binary(max_size=40))
def test_data_plane_reader_round_trip_in_any_pieces_and_ignores_trailing_bytes(spec, piece, trailing):
    answers = _answers(spec)
    stream = _serve(answers)
    frames, consumed = _drive(DataPlaneReader([a.cid for a in answers]), stream + trailing, piece)
    assert [f.message for f in frames] == answers
    assert [f.wire_bytes for f in frames] == [len(encode(a)) for a in answers]
    assert consumed == len(stream)  # done after the last granted chunk: nothing after it is read


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_data_plane_reader_on_random_bytes_raises_only_remote_protocol_errors(data):
    reader = DataPlaneReader(C[:2])
    try:
        _drive(reader, data)
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError, match="already failed"):  # a failed reader stays failed
            reader.feed(b"x" * (reader.need() or 1))


@settings(max_examples=100, deadline=None)
@given(answers_strategy, st.data())
def test_data_plane_reader_rejects_any_answer_out_of_order(spec, data):
    answers = _answers(spec)
    cids = [a.cid for a in answers]
    wrong = data.draw(st.permutations(cids))
    if wrong == cids:
        return
    with pytest.raises(RemoteProtocolError, match="another chunk"):
        _drive(DataPlaneReader(wrong), _serve(answers))


def test_data_plane_reader_refuses_at_the_prefix_and_at_the_header_before_the_payload():
    reader = DataPlaneReader([C[0]])
    with pytest.raises(RemoteProtocolError, match="unexpected frame type"):
        reader.feed(encode_prefix(ManifestRequest.TYPE, 3))  # a frame the data plane never carries
    too_big = DataPlaneReader([C[0]])
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):  # before allocating anything
        too_big.feed(struct.pack(">BI", ChunkData.TYPE, limits.MAX_DATA_FRAME_BYTES + 1))
    short = DataPlaneReader([C[0]])
    with pytest.raises(RemoteProtocolError, match="shorter than its header"):
        short.feed(encode_prefix(ChunkData.TYPE, CHUNK_HEADER_BYTES - 1))
    other = DataPlaneReader([C[0]])
    assert other.feed(encode_prefix(ChunkData.TYPE, CHUNK_HEADER_BYTES + 10_000_000)) is None
    assert other.need() == CHUNK_HEADER_BYTES
    with pytest.raises(RemoteProtocolError, match="another chunk than granted"):  # 10 MB never requested
        other.feed(C[1].to_bytes())
    garbled = DataPlaneReader([C[0]])
    garbled.feed(encode_prefix(ChunkData.TYPE, CHUNK_HEADER_BYTES))
    with pytest.raises(RemoteProtocolError, match="malformed ChunkData header"):
        garbled.feed(b"\x00" * CHUNK_HEADER_BYTES)


def test_data_plane_reader_takes_exactly_what_it_asked_for():
    reader = DataPlaneReader([C[0]])
    with pytest.raises(LocalProtocolError):
        reader.feed(b"\x04\x00")
    frames, _ = _drive(reader, _serve([ChunkData(C[0], b"")]))  # an empty chunk: header, no payload read
    assert [f.message for f in frames] == [ChunkData(C[0], b"")]
    assert reader.need() is None
    with pytest.raises(LocalProtocolError):
        reader.feed(b"more")


def test_data_plane_payload_is_the_receive_buffer_itself():
    payload = b"\x01" * 1000
    reader = DataPlaneReader([C[0]])
    stream = _serve([ChunkData(C[0], payload)])
    reader.feed(bytearray(stream[:PREFIX_BYTES]))
    reader.feed(bytearray(stream[PREFIX_BYTES:PREFIX_BYTES + CHUNK_HEADER_BYTES]))
    buf = bytearray(stream[PREFIX_BYTES + CHUNK_HEADER_BYTES:])
    frame = reader.feed(buf)
    assert frame.message.payload is buf  # no copy on the fast path
    assert CONVERSATIONS[DATAPLANE_PROTOCOL].request is None  # the data plane opens with a raw token
