"""Manifest encoding and the validator: canonical bytes, determinism, and every rule in FORMAT.md
"Validation" refused with a clear error before any chunk is read or tensor allocated."""

from __future__ import annotations

import copy

import msgpack
import numpy as np
import pytest

from kvswap.artifact import chunking
from kvswap.artifact.manifest import FORMAT_VERSION, _pack, decode_manifest
from kvswap.artifact.pipeline import assemble_kv, check_compatible, publish_kv
from kvswap.protocol.errors import FormatError, LimitExceeded, ModelMismatch, UsageError
from kvswap.kvtensors import KvLayout, KvTensors
from kvswap.artifact import limits

LAYOUT = KvLayout(layers=2, kv_heads=2, head_dim=8, dtype="bf16")


def synthetic_kv(n_tokens: int, seed: int = 0, layout: KvLayout = LAYOUT, token_ids=None) -> KvTensors:
    rng = np.random.default_rng(seed)
    shape = (layout.kv_heads, n_tokens, layout.head_dim)

    def arr():
        if layout.itemsize == 2:
            return (rng.normal(0, 1, shape).astype(np.float32).view(np.uint32) >> 16).astype("<u2")
        return rng.normal(0, 1, shape).astype(np.float32).view("<u4")

    ids = list(token_ids) if token_ids is not None else [int(t) for t in rng.integers(0, 50_000, n_tokens)]
    return KvTensors(layout, ids, [arr() for _ in range(layout.layers)], [arr() for _ in range(layout.layers)],
                     rng.normal(0, 1, 32).astype(np.float32))


def publish(kv, **kw):
    args = dict(model_id="m", model_fingerprint="ab" * 32, tokenizer_fingerprint="cd" * 32,
                document_hash="ef" * 32, block_tokens=16)
    args.update(kw)
    manifest, chunks = publish_kv(kv, **args)
    return manifest, dict(chunks)


def test_round_trip_and_determinism():
    kv = synthetic_kv(70)
    m1, c1 = publish(kv)
    m2, c2 = publish(synthetic_kv(70))
    assert m1.canonical_bytes == m2.canonical_bytes and m1.cid == m2.cid and c1 == c2
    assert decode_manifest(m1.canonical_bytes, m1.cid) == m1
    assert [(c.t0, c.t1) for c in m1.chunks] == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]
    assert m1.raw_size == 70 * LAYOUT.bytes_per_token


def test_canonical_form_has_sorted_keys_and_no_floats():
    m, _ = publish(synthetic_kv(20))
    obj = msgpack.unpackb(m.canonical_bytes, raw=False)
    assert list(obj) == sorted(obj)
    assert list(obj["chunks"][0]) == sorted(obj["chunks"][0])

    def walk(x):
        assert not isinstance(x, float)
        if isinstance(x, dict):
            [walk(v) for v in x.values()]
        elif isinstance(x, list):
            [walk(v) for v in x]

    walk(obj)


def test_non_canonical_encodings_are_refused():
    m, _ = publish(synthetic_kv(20))
    obj = msgpack.unpackb(m.canonical_bytes, raw=False)
    reordered = msgpack.packb(dict(reversed(list(obj.items()))), use_bin_type=True)
    with pytest.raises(FormatError, match="canonical"):
        decode_manifest(reordered)
    with pytest.raises(FormatError):
        decode_manifest(m.canonical_bytes + b"\x00")  # trailing bytes


def test_shared_prefix_gives_shared_leading_chunks_and_prefix_keys():
    ids = list(range(1000, 1100))
    long = synthetic_kv(100, token_ids=ids)
    short = KvTensors(LAYOUT, ids[:40], [k[:, :40, :].copy() for k in long.keys],
                      [v[:, :40, :].copy() for v in long.values], None)
    ml, _ = publish(long)
    ms, _ = publish(short)
    assert [c.cid for c in ms.chunks[:2]] == [c.cid for c in ml.chunks[:2]]
    assert [c.prefix_key for c in ms.chunks[:2]] == [c.prefix_key for c in ml.chunks[:2]]
    assert ms.chunks[2].cid != ml.chunks[2].cid  # the short document's last block is partial
    assert ms.cid != ml.cid


def _mutated(m, fn):
    obj = msgpack.unpackb(m.canonical_bytes, raw=False)
    fn(obj)
    return _pack(obj)


def _chunk(i, key, value):
    def fn(o):
        o["chunks"][i][key] = value
    return fn


MUTATIONS = {
    "wrong version": (lambda o: o.update(version=FORMAT_VERSION + 1), "version"),
    "wrong format name": (lambda o: o.update(format="safetensors"), "format"),
    "float where an int belongs": (lambda o: o.update(block_tokens=16.0), "block_tokens"),
    "unknown codec": (_chunk(0, "codec", "lz4"), "unknown codec"),
    "hole in token ranges": (_chunk(1, "t0", 17), "tile"),
    "overlap in token ranges": (_chunk(1, "t0", 15), "tile"),
    "range past the end": (_chunk(4, "t1", 71), "tile"),
    "missing last chunk": (lambda o: o["chunks"].pop(), "tile"),
    "raw size that does not add up": (_chunk(0, "raw_size", 16 * LAYOUT.bytes_per_token + 2), "raw_size"),
    "raw stored size differs from raw size": (
        lambda o: o["chunks"][0].update(codec="raw", stored_size=100), "stored_size"),
    "stored size over the codec bound": (_chunk(0, "stored_size", 10**9), "stored_size"),
    "zero stored size": (_chunk(0, "stored_size", 0), "stored_size"),
    "wrong prefix key": (_chunk(2, "prefix_key", b"\x00" * 32), "prefix key"),
    "token hash mismatch": (lambda o: o.update(token_hash="00" * 32), "token_hash"),
    "tokens not uint32": (lambda o: o.update(tokens=o["tokens"] + b"\x00"), "uint32"),
    "unknown extra field": (lambda o: o.update(comment="hi"), "unexpected keys"),
    "missing field": (lambda o: o.pop("document_hash"), "missing"),
    "bad fingerprint": (lambda o: o.update(model_fingerprint="not hex!"), "model_fingerprint"),
    "bad dtype": (lambda o: o["layout"].update(dtype="int8"), "dtype"),
    "zero layers": (lambda o: o["layout"].update(layers=0), "layers"),
    "bad cid bytes": (_chunk(0, "cid", b"\x01\x55"), "CID"),
    "tail raw size not float32": (lambda o: o["tail"].update(raw_size=6), "tail"),
    "tail over its limit": (lambda o: o["tail"].update(raw_size=limits.MAX_TAIL_RAW_BYTES + 4), "tail"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_validator_rejects(name):
    m, _ = publish(synthetic_kv(70))
    fn, match = MUTATIONS[name]
    with pytest.raises(FormatError, match=match):
        decode_manifest(_mutated(m, fn))


def test_limits_are_enforced_before_parsing_or_allocating():
    with pytest.raises(LimitExceeded):
        decode_manifest(b"\x00" * (limits.MAX_MANIFEST_BYTES + 1))
    m, _ = publish(synthetic_kv(20))
    big_tokens = _mutated(m, lambda o: o.update(tokens=b"\x00" * 4 * (limits.MAX_TOKENS + 1)))
    with pytest.raises(LimitExceeded):
        decode_manifest(big_tokens)
    # a block too large for MAX_CHUNK_RAW_BYTES cannot be declared either
    huge_block = _mutated(m, lambda o: o.update(block_tokens=limits.MAX_CHUNK_RAW_BYTES // LAYOUT.bytes_per_token + 1))
    with pytest.raises((LimitExceeded, FormatError)):
        decode_manifest(huge_block)


def test_garbage_is_a_format_error():
    for junk in (b"", b"\xc1", b"\x92\x01", msgpack.packb([1, 2, 3]), msgpack.packb({"format": "kvswap-kv"})):
        with pytest.raises(FormatError):
            decode_manifest(junk)


def test_fp32_layout_and_4_planes():
    lay = KvLayout(layers=1, kv_heads=1, head_dim=4, dtype="fp32")
    kv = synthetic_kv(33, layout=lay)
    m, chunks = publish(kv, codec="planes")
    back = assemble_kv(decode_manifest(m.canonical_bytes, m.cid), chunks.__getitem__)
    assert all((a == b).all() for a, b in zip(back.keys + back.values, kv.keys + kv.values))


def test_publish_rejects_bad_arguments():
    kv = synthetic_kv(10)
    with pytest.raises(UsageError):
        publish(kv, codec="gzip")
    with pytest.raises(UsageError):
        publish(kv, block_tokens=0)
    with pytest.raises(UsageError):
        publish(kv, block_tokens=limits.MAX_CHUNK_RAW_BYTES)
    with pytest.raises(FormatError):
        publish(kv, document_hash="not a hash")


def test_chunk_payload_layout_is_layer_major_k_then_v():
    kv = synthetic_kv(6)
    payload = chunking.chunk_payload(kv, 2, 5)
    expected = b"".join(a[:, 2:5, :].tobytes() for pair in zip(kv.keys, kv.values) for a in pair)
    assert payload == expected


def test_check_compatible_names_both_sides():
    m, _ = publish(synthetic_kv(10))

    class Eng:
        model_id, fingerprint, tokenizer_fingerprint, dtype, layout = "m", "ab" * 32, "cd" * 32, "bf16", LAYOUT

    check_compatible(m, Eng)
    for attr, value in (("fingerprint", "99" * 32), ("tokenizer_fingerprint", "98" * 32), ("dtype", "fp16"),
                        ("layout", KvLayout(3, 2, 8, "bf16"))):
        other = copy.copy(Eng)
        other = type("E", (), {**{k: getattr(Eng, k) for k in ("model_id", "fingerprint", "tokenizer_fingerprint",
                                                                 "dtype", "layout")}, attr: value})
        with pytest.raises(ModelMismatch):
            check_compatible(m, other)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(n_tokens=st.integers(1, 90), block=st.integers(1, 40), codec=st.sampled_from(["auto", "raw", "zstd", "planes"]),
       prefix=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_publish_decode_assemble_round_trip(n_tokens, block, codec, prefix, seed):
    kv = synthetic_kv(n_tokens, seed=seed)
    m, chunks = publish(kv, block_tokens=block, codec=codec)
    back = decode_manifest(m.canonical_bytes, m.cid)
    assert back == m and len(back.chunks) == -(-n_tokens // block)
    k = max(1, int(n_tokens * prefix))
    got = assemble_kv(back, chunks.__getitem__, n_tokens=k)
    assert got.token_ids == kv.token_ids[:k]
    for a, b in zip(got.keys + got.values, kv.keys + kv.values):
        assert (a == b[:, :k, :]).all()
    assert (got.last_logits is not None) == (k == n_tokens)


from kvswap.artifact import codecs  # noqa: E402
from kvswap.artifact.signing import decode_envelopes  # noqa: E402
from kvswap.protocol.errors import KvswapError  # noqa: E402


def _mutations_of(data: bytes):
    """Random edits of a valid encoding: far more likely to reach deep validation than random bytes."""
    return st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=4).map(
        lambda edits: bytes(_apply(bytearray(data), edits)))


def _apply(buf: bytearray, edits):
    for offset, value in edits:
        buf[offset] = value
    return buf


_VALID = publish(synthetic_kv(40, seed=3), block_tokens=16)[0].canonical_bytes


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=2048), _mutations_of(_VALID)))
def test_fuzz_manifest_decoder_raises_only_kvswap_errors(data):
    try:
        m = decode_manifest(data)
    except KvswapError:
        return
    assert m.canonical_bytes == data  # anything accepted is canonical


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=1024))
def test_fuzz_envelope_decoder_raises_only_kvswap_errors(data):
    try:
        decode_envelopes(data)
    except KvswapError:
        pass


@settings(max_examples=300, deadline=None)
@given(codec=st.sampled_from(codecs.CODECS), data=st.binary(max_size=512), raw_size=st.sampled_from([0, 2, 64, 4096]))
def test_fuzz_codec_decoder_raises_only_integrity_errors(codec, data, raw_size):
    try:
        out = codecs.decode(codec, data, raw_size, 2)
    except KvswapError as exc:
        assert type(exc).__name__ == "IntegrityError"
        return
    assert len(out) == raw_size


def test_publish_streams_without_holding_every_chunk(monkeypatch):
    """Past PUBLISH_BUFFER_BYTES the stream re-encodes chunks (deterministically) instead of keeping them."""
    from kvswap.artifact import pipeline

    kv = synthetic_kv(200, seed=11)
    buffered_manifest, buffered = publish(kv, codec="auto")
    monkeypatch.setattr(pipeline, "PUBLISH_BUFFER_BYTES", 0)
    streamed_manifest, streamed_iter = publish_kv(
        kv, model_id="m", model_fingerprint="ab" * 32, tokenizer_fingerprint="cd" * 32, document_hash="ef" * 32,
        block_tokens=16)
    first = next(streamed_iter)
    assert first[0] == streamed_manifest.chunks[0].cid
    streamed = dict([first, *streamed_iter])
    assert streamed_manifest == buffered_manifest and streamed == buffered
