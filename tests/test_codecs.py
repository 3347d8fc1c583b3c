"""Chunk codecs: bit-exact round trips (property tests), bounded decoding, and the auto policy."""

from __future__ import annotations

import os
import struct
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvswap.artifact import codecs
from kvswap.protocol.errors import IntegrityError, UsageError

MiB = 1 << 20


def _values(itemsize: int, max_values: int = 2048):
    """Byte strings holding whole values of `itemsize` bytes (random, repetitive, or float-like)."""
    n = st.integers(min_value=0, max_value=max_values)
    random_bytes = n.flatmap(lambda k: st.binary(min_size=k * itemsize, max_size=k * itemsize))
    repetitive = st.tuples(st.binary(min_size=itemsize, max_size=itemsize), n).map(lambda t: t[0] * t[1])
    return st.one_of(random_bytes, repetitive)


@settings(max_examples=150, deadline=None)
@given(data=_values(2), codec=st.sampled_from(codecs.CODEC_CHOICES))
@example(data=b"", codec="planes")
@example(data=b"\x00\x80" * 4096, codec="auto")
def test_round_trip_2_byte_values(data, codec):
    used, stored = codecs.encode_best(codec, data, 2)
    assert used in codecs.CODECS
    assert len(stored) <= codecs.max_stored_size(used, len(data), 2)
    assert codecs.decode(used, stored, len(data), 2) == data


@settings(max_examples=100, deadline=None)
@given(data=_values(4), codec=st.sampled_from(codecs.CODEC_CHOICES))
def test_round_trip_4_byte_values(data, codec):
    used, stored = codecs.encode_best(codec, data, 4)
    assert codecs.decode(used, stored, len(data), 4) == data


def test_round_trip_bf16_like_values_at_every_level():
    rng = np.random.default_rng(7)
    bits = (rng.normal(0, 1, 50_000).astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    for level in (1, 3, 19):
        for codec in codecs.CODECS:
            stored = codecs.encode(codec, bits, 2, level)
            assert codecs.decode(codec, stored, len(bits), 2) == bits
    # byte planes beat plain zstd on float-like data: the exponent byte is predictable, the mantissa is not
    assert len(codecs.encode("planes", bits, 2)) < len(codecs.encode("zstd", bits, 2)) < len(bits)


def test_planes_split_and_join_are_inverse_and_little_endian():
    raw = np.array([0x1234, 0xABCD], dtype="<u2").tobytes()
    low, high = codecs.split_planes(raw, 2)
    assert low == bytes([0x34, 0xCD]) and high == bytes([0x12, 0xAB])
    assert codecs.join_planes([low, high], 2) == raw


def test_auto_keeps_raw_on_incompressible_data():
    noise = os.urandom(64 * 1024)
    used, stored = codecs.encode_best("auto", noise, 2)
    assert used == "raw" and stored == noise


def test_auto_picks_a_compressing_codec_when_it_pays():
    used, stored = codecs.encode_best("auto", b"\x01\x3f" * 10_000, 2)
    assert used in ("zstd", "planes") and len(stored) < 1000


def test_named_codec_is_honoured_even_when_it_grows_the_chunk():
    noise = os.urandom(4096)
    used, stored = codecs.encode_best("zstd", noise, 2)
    assert used == "zstd" and len(stored) > len(noise)
    assert codecs.decode("zstd", stored, len(noise), 2) == noise


def test_unknown_codec_and_ragged_input_are_usage_errors():
    with pytest.raises(UsageError):
        codecs.encode("lz4", b"\x00\x00", 2)
    with pytest.raises(UsageError):
        codecs.encode("raw", b"\x00\x00\x00", 2)
    with pytest.raises(IntegrityError):
        codecs.decode("lz4", b"\x00\x00", 2, 2)


def _zeros_frame(size: int, content_size: bool = True) -> bytes:
    """A zstd frame of `size` zero bytes, compressed in pieces (never holds `size` bytes)."""
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    cobj = cctx.compressobj(size=size if content_size else -1)
    piece = bytes(MiB)
    out = [cobj.compress(piece) for _ in range(size // MiB)]
    out.append(cobj.flush())
    return b"".join(out)


def _peak_during(fn) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zstd_bomb_declaring_more_than_the_manifest_is_refused_without_allocating():
    bomb = _zeros_frame(1024 * MiB)  # 1 GiB of zeros in a few tens of KB
    assert len(bomb) < 200_000
    peak = _peak_during(lambda: codecs.decode("zstd", bomb, 4096, 2))
    assert peak < 4 * MiB


def test_zstd_frame_without_content_size_is_refused():
    frame = _zeros_frame(64 * MiB, content_size=False)
    peak = _peak_during(lambda: codecs.decode("zstd", frame, 4096, 2))
    assert peak < 4 * MiB


def test_zstd_frame_that_lies_about_its_content_size_is_refused_within_the_bound():
    # a 32 MiB frame whose header is patched to claim 4096 bytes: the lie is caught as corruption and
    # the output never grows past the declared size by more than zstd's block size
    frame = bytearray(_zeros_frame(32 * MiB))
    params = zstandard.get_frame_parameters(bytes(frame))
    assert params.content_size == 32 * MiB
    # header: magic(4) + descriptor(1) [+ window byte] + 4-byte content size (for sizes >= 65,792)
    descriptor = frame[4]
    single_segment = bool(descriptor & 0x20)
    offset = 5 + (0 if single_segment else 1)
    assert (descriptor >> 6) == 2  # 4-byte FCS field
    frame[offset : offset + 4] = struct.pack("<I", 4096)
    assert zstandard.frame_content_size(bytes(frame)) == 4096
    peak = _peak_during(lambda: codecs.decode("zstd", bytes(frame), 4096, 2))
    assert peak < 4 * MiB


def test_planes_bomb_in_one_plane_is_refused():
    good = codecs.encode("planes", b"\x01\x02" * 1000, 2)
    bomb = _zeros_frame(256 * MiB)
    forged = struct.pack("<B", 2) + struct.pack("<I", len(bomb)) + struct.pack("<I", len(bomb)) + bomb + bomb
    peak = _peak_during(lambda: codecs.decode("planes", forged, 2000, 2))
    assert peak < 4 * MiB
    assert codecs.decode("planes", good, 2000, 2) == b"\x01\x02" * 1000


def test_declared_raw_size_over_the_limit_is_refused_before_decoding():
    with pytest.raises(IntegrityError):
        codecs.decode("zstd", b"", 1 << 40, 2)


@pytest.mark.parametrize("mutation", ["truncate", "trailing", "wrong_plane_count", "lengths_do_not_add_up"])
def test_malformed_stored_bytes_raise_integrity_error(mutation):
    raw = b"\x07\x41" * 500
    zs = codecs.encode("zstd", raw, 2)
    pl = codecs.encode("planes", raw, 2)
    cases = {
        "truncate": ("zstd", zs[:-3]),
        "trailing": ("zstd", zs + b"\x00"),
        "wrong_plane_count": ("planes", b"\x04" + pl[1:]),
        "lengths_do_not_add_up": ("planes", pl + b"\x00"),
    }
    codec, stored = cases[mutation]
    with pytest.raises(IntegrityError):
        codecs.decode(codec, stored, len(raw), 2)


def test_raw_codec_checks_its_size():
    with pytest.raises(IntegrityError):
        codecs.decode("raw", b"\x00" * 6, 8, 2)


def test_encoding_is_deterministic():
    data = np.random.default_rng(1).integers(0, 300, 20_000).astype("<u2").tobytes()
    for codec in codecs.CODECS:
        assert codecs.encode(codec, data, 2) == codecs.encode(codec, data, 2)
