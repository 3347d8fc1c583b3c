"""Lossless chunk codecs: raw, zstd, and byte-plane zstd ("planes"), chosen per chunk.

Why byte planes: a bf16/fp16 value's high byte (sign + exponent) is highly repetitive across a KV tensor
while its low byte (mantissa) is close to random. Interleaved, zstd sees noise every other byte; split
into a high-byte plane and a low-byte plane, the high plane compresses 2.6-3.6x and the whole chunk ~1.5x
on real bf16 KV (BENCHMARKS.md "Codecs"). fp32 splits into 4 planes the same way.

Every decoder is bounded by the raw size the manifest declares (already checked against
MAX_CHUNK_RAW_BYTES): a zstd frame must announce exactly that content size before a byte is
decompressed, so a "zip bomb" is refused without any large allocation. zstandard's exceptions are mapped
here, at this one boundary, to IntegrityError (the bytes were addressed and signed, yet do not decode).
"""

from __future__ import annotations

import struct

import numpy as np
import zstandard

from ..protocol.errors import IntegrityError, UsageError
from .limits import MAX_CHUNK_RAW_BYTES, MAX_CHUNK_STORED_BYTES

#: codecs a manifest may name (what a chunk's stored bytes are)
CODECS = ("raw", "zstd", "planes")
#: what a publisher may ask for: a stored codec, or "auto" (smallest per chunk, raw when it does not pay)
CODEC_CHOICES = ("auto",) + CODECS
#: zstd level for "zstd" and "planes". Level 1 gave bf16 planes 1.48-1.53x at several hundred MB/s on
#: these CPUs; higher levels add a few percent for several times the compression time (bench/codecs.py).
#: Part of the format's determinism: the same KV with the same level gives the same chunk CIDs.
DEFAULT_ZSTD_LEVEL = 1
#: "auto" keeps a chunk raw unless compression saves at least this fraction: a 1% saving is not worth a
#: decompression pass on every load.
AUTO_MIN_SAVING = 0.02
#: zstd window cap for decoding (bytes, power of two >= MAX_CHUNK_RAW_BYTES): bounds decoder memory.
_MAX_WINDOW = 1 << (MAX_CHUNK_RAW_BYTES - 1).bit_length()
_PLANES_HEADER = struct.Struct("<B")
_PLANE_LEN = struct.Struct("<I")


def zstd_bound(n: int) -> int:
    """ZSTD_COMPRESSBOUND(n): the largest frame zstd writes for n input bytes."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0)


def max_stored_size(codec: str, raw_size: int, itemsize: int) -> int:
    """The largest stored size a well-formed chunk of `raw_size` bytes can have under `codec`."""
    if codec == "raw":
        return raw_size
    if codec == "zstd":
        return min(zstd_bound(raw_size), MAX_CHUNK_STORED_BYTES)
    if codec == "planes":
        plane = raw_size // itemsize
        return min(_PLANES_HEADER.size + itemsize * (_PLANE_LEN.size + zstd_bound(plane)), MAX_CHUNK_STORED_BYTES)
    raise UsageError(f"unknown codec {codec!r} (expected one of {', '.join(CODECS)})")


def _check_raw(raw: bytes | memoryview, itemsize: int) -> memoryview:
    view = memoryview(raw).cast("B")
    if itemsize not in (2, 4) or len(view) % itemsize:
        raise UsageError(f"raw chunk of {len(view)} bytes is not a whole number of {itemsize}-byte values")
    return view


def split_planes(raw: bytes | memoryview, itemsize: int) -> list[bytes]:
    """Byte plane j holds byte j of every value (little-endian: plane 0 is the low byte)."""
    view = _check_raw(raw, itemsize)
    table = np.frombuffer(view, dtype=np.uint8).reshape(-1, itemsize)
    return [np.ascontiguousarray(table[:, j]).tobytes() for j in range(itemsize)]



def join_planes(planes: list[bytes], itemsize: int) -> bytes:
    """Inverse of split_planes."""
    n = len(planes[0])
    table = np.empty((n, itemsize), dtype=np.uint8)
    for j, plane in enumerate(planes):
        table[:, j] = np.frombuffer(plane, dtype=np.uint8)
    return table.tobytes()

def _zstd(data: bytes | memoryview, level: int) -> bytes:
    # a fresh compressor per call: zstandard objects are not thread-safe, and creating one costs microseconds
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False).compress(data)


def _unzstd(frame: bytes | memoryview, expected: int, what: str) -> bytes:
    """Decode exactly one zstd frame of exactly `expected` bytes, refusing before allocating otherwise."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: not a zstd frame ({exc})") from None
    if declared != expected:
        shown = "unknown" if declared < 0 or declared >= 1 << 63 else str(declared)
        raise IntegrityError(f"{what}: zstd frame declares {shown} bytes, manifest says {expected}")
    try:
        dobj = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW).decompressobj()
        out = dobj.decompress(frame)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: corrupt zstd data ({exc})") from None
    if not dobj.eof or dobj.unused_data or len(out) != expected:
        raise IntegrityError(f"{what}: zstd frame is truncated, has trailing bytes, or has the wrong size")
    return out


def encode(codec: str, raw: bytes | memoryview, itemsize: int, level: int = DEFAULT_ZSTD_LEVEL) -> bytes:
    """Stored bytes of `raw` under one named codec (not "auto")."""
    view = _check_raw(raw, itemsize)
    if codec == "raw":
        return bytes(view)
    if codec == "zstd":
        return _zstd(view, level)
    if codec == "planes":
        frames = [_zstd(p, level) for p in split_planes(view, itemsize)]
        header = _PLANES_HEADER.pack(itemsize) + b"".join(_PLANE_LEN.pack(len(f)) for f in frames)
        return header + b"".join(frames)
    raise UsageError(f"unknown codec {codec!r} (expected one of {', '.join(CODECS)})")


def encode_best(
    codec: str, raw: bytes | memoryview, itemsize: int, level: int = DEFAULT_ZSTD_LEVEL
) -> tuple[str, bytes]:
    """(codec used, stored bytes). "auto" tries zstd and planes and keeps the smallest, or raw unless it
    saves at least AUTO_MIN_SAVING. A named codec is used as asked, even when it grows the chunk."""
    if codec != "auto":
        return codec, encode(codec, raw, itemsize, level)
    view = _check_raw(raw, itemsize)
    best_codec, best = "raw", None
    for candidate in ("planes", "zstd"):
        stored = encode(candidate, view, itemsize, level)
        if best is None or len(stored) < len(best):
            best_codec, best = candidate, stored
    if best is None or len(best) > len(view) * (1 - AUTO_MIN_SAVING):
        return "raw", bytes(view)
    return best_codec, best


def _check_decode_args(raw_size: int, itemsize: int) -> None:
    if not 0 <= raw_size <= MAX_CHUNK_RAW_BYTES or itemsize not in (2, 4) or raw_size % itemsize:
        raise IntegrityError(f"declared raw size {raw_size} is not a valid chunk size")


def _plane_frames(stored: memoryview, itemsize: int) -> list[memoryview]:
    """The zstd frame of each plane of a `planes` blob, after checking the header adds up."""
    head = _PLANES_HEADER.size + itemsize * _PLANE_LEN.size
    if len(stored) < head or stored[0] != itemsize:
        raise IntegrityError(f"planes chunk header is not {itemsize} planes")
    lengths = [_PLANE_LEN.unpack_from(stored, _PLANES_HEADER.size + j * _PLANE_LEN.size)[0] for j in range(itemsize)]
    if head + sum(lengths) != len(stored):
        raise IntegrityError("planes chunk: plane lengths do not add up to the stored size")
    frames, offset = [], head
    for length in lengths:
        frames.append(stored[offset : offset + length])
        offset += length
    return frames


def decode(codec: str, stored: bytes | memoryview, raw_size: int, itemsize: int) -> bytes | memoryview:
    """Raw bytes of a stored chunk, exactly `raw_size` of them, or IntegrityError. Never allocates more
    than `raw_size` (plus the per-plane share of it) whatever the stored bytes claim. A raw chunk in
    read-only memory comes back as a view of it (no copy)."""
    _check_decode_args(raw_size, itemsize)
    stored = memoryview(stored).cast("B")
    if codec == "raw":
        if len(stored) != raw_size:
            raise IntegrityError(f"raw chunk is {len(stored)} bytes, manifest says {raw_size}")
        return stored if stored.readonly else bytes(stored)  # no copy of immutable bytes
    if codec == "zstd":
        return _unzstd(stored, raw_size, "zstd chunk")
    if codec == "planes":
        out = bytearray(raw_size)
        decode_into(codec, stored, memoryview(out), itemsize)
        return bytes(out)
    raise IntegrityError(f"unknown codec {codec!r}")


def decode_into(codec: str, stored: bytes | memoryview, out: memoryview, itemsize: int) -> None:
    """Decode a stored chunk into `out` (writable, exactly its raw size), with the same checks as `decode`.

    The load path's form: bytes land where the caller wants them (a pinned staging buffer), and a `planes`
    chunk is interleaved straight into place instead of joined into new bytes first."""
    out = memoryview(out).cast("B")
    raw_size = len(out)
    _check_decode_args(raw_size, itemsize)
    stored = memoryview(stored).cast("B")
    if codec == "raw":
        if len(stored) != raw_size:
            raise IntegrityError(f"raw chunk is {len(stored)} bytes, manifest says {raw_size}")
        out[:] = stored
    elif codec == "zstd":
        out[:] = _unzstd(stored, raw_size, "zstd chunk")
    elif codec == "planes":
        table = np.frombuffer(out, dtype=np.uint8).reshape(-1, itemsize)
        for j, frame in enumerate(_plane_frames(stored, itemsize)):
            table[:, j] = np.frombuffer(_unzstd(frame, raw_size // itemsize, f"plane {j}"), dtype=np.uint8)
    else:
        raise IntegrityError(f"unknown codec {codec!r}")
