"""The load path: a stored artifact's chunks into one staging buffer, every chunk verified, on many threads.

Where the bytes go is the caller's choice (`dest`): a chunk's raw payload is, for every layer, K then V, each
`[kv_heads, n, head_dim]`, i.e. 2 * layers * kv_heads contiguous runs, and the caller names a writable view
for each run.
- On a GPU the engine passes one staging buffer in host memory, pinned, with the chunks back to back: the
  fastest way from disk to device memory is to read straight into pinned memory, hash it there, and hand it
  to the copy engine in large asynchronous copies (measured on an H100: pageable 8.7 GB/s, pinned 54 GB/s);
  the gather into per-layer tensors is then one device-memory copy (kvswap/engine/kvload.py).
- On the CPU the engine passes the runs of the final per-layer cache tensors themselves: a raw chunk is read
  with one `preadv` straight into place and hashed there, so its bytes are written once and read once.

Each chunk is one task on a thread pool (file reads, sha256 and zstd all release the GIL):
- a `raw` chunk is read straight into its destination (readinto, or preadv into several runs) and hashed
  there;
- a compressed chunk is read into a scratch buffer, hashed against its CID, then decoded (`codecs.decode_into`)
  and copied into place; when the store keeps raw local forms (`Store.put_raw_form`), its decoded bytes are
  also written beside it, and later loads read that raw form like a raw chunk: compression saves bytes on
  the wire and disk without costing every local load a decompression;
- `fill` yields each slot as soon as its bytes are verified, so the engine can start copying it to the device
  while other chunks are still being read and hashed.

What "verified" means for a local load (`verify`, a `kvswap.modes.Verify`; SECURITY.md "Loading from the
local store"):
- `blake3` (the default): every byte against the chunk's record, a keyed BLAKE3 of (form, CID, size, bytes)
  the store wrote when the bytes were verified against the CID on arrival or at publish (kvswap/store.py),
  under a key derived from the node's identity. It changes no CID (sha256 stays the CID and the wire check)
  and catches what sha256 catches here: disk corruption, torn writes, and a local user who can write the
  store but cannot read the node key; at 2.5-5x sha256's speed. A chunk stored before records existed is
  checked by sha256 once and recorded;
- `sha256`: every byte against the chunk's CID, or a raw form against its digest (recorded with a MAC under
  the node's key); the previous default, kept;
- `none`: trust what was verified when it arrived (for trusted disks and for measuring what the check costs).
Bytes from the network are always verified against their CIDs before they are stored (Store.put_chunk),
whatever this says.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..modes import Verify
from ..protocol.cid import Cid
from ..protocol.errors import IntegrityError, NotFound, UsageError
from .codecs import decode_into
from .manifest import ChunkRef, Manifest

log = logging.getLogger(__name__)

#: what a local load checks when the caller does not say (module docstring)
DEFAULT_VERIFY = Verify.BLAKE3
#: threads that read, hash and decode chunks at once: one per core, at most 16 (an H100 host's core count)
LOAD_THREADS = max(1, min(16, os.cpu_count() or 1))
#: most buffers one preadv call takes (POSIX guarantees 16, Linux takes 1024)
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16)


class ChunkFiles(Protocol):
    """What the loader needs from a store (kvswap.store.Store implements it)."""

    def chunk_path(self, cid: Cid) -> Path: ...  # NotFound if absent

    def raw_form(self, cid: Cid) -> tuple[Path, bytes] | None: ...  # (file, sha256 of it) of a verified raw form

    def put_raw_form(self, cid: Cid, raw: memoryview) -> bool: ...  # False when the store keeps no raw forms

    def drop_raw_form(self, cid: Cid) -> None: ...

    def check_record(self, cid: Cid, form: str, runs) -> bool | None: ...  # None: no record to check against

    def put_record(self, cid: Cid, form: str, runs) -> bool: ...  # record bytes just verified


@dataclass(frozen=True)
class Slot:
    """Where one chunk's raw payload lives in the staging buffer."""

    ref: ChunkRef
    offset: int
    index: int = 0  # position in the plan (chunk i of the artifact)

    @property
    def end(self) -> int:
        return self.offset + self.ref.raw_size


@dataclass(frozen=True)
class LoadPlan:
    """The chunks that cover the first `n_tokens` tokens of an artifact, laid out back to back."""

    manifest: Manifest
    n_tokens: int
    slots: tuple[Slot, ...]
    nbytes: int

    @classmethod
    def of(cls, manifest: Manifest, n_tokens: int | None = None) -> "LoadPlan":
        k = manifest.n_tokens if n_tokens is None else int(n_tokens)
        slots, offset = [], 0
        for i, ref in enumerate(manifest.chunks_for(k)):  # UsageError outside 1..n_tokens
            slots.append(Slot(ref, offset, i))
            offset += ref.raw_size
        return cls(manifest, k, tuple(slots), offset)

    @property
    def whole(self) -> bool:
        return self.n_tokens == self.manifest.n_tokens


#: where a slot's raw payload goes: writable views that together hold it, in payload order
Dest = Callable[[Slot], "list[memoryview]"]


def _read_into(path: Path, runs: list[memoryview], what: str) -> None:
    """Exactly the bytes of `path` into `runs` in order (a file of any other size is an IntegrityError)."""
    want = sum(len(r) for r in runs)
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size != want:
            raise IntegrityError(f"{what} is {size} bytes on disk, the manifest says {want}")
        fd, offset, i = fh.fileno(), 0, 0
        while i < len(runs):
            batch = runs[i:i + _IOV_MAX]
            n = os.preadv(fd, batch, offset)
            if n <= 0:
                raise IntegrityError(f"{what} shrank while it was read")
            offset += n
            while i < len(runs) and n >= len(runs[i]):  # whole runs done
                n -= len(runs[i])
                i += 1
            if n:  # a short read ended inside run i: finish it before the next batch
                runs[i] = runs[i][n:]


def _digest(runs: list[memoryview]) -> bytes:
    h = hashlib.sha256()
    for run in runs:
        h.update(run)
    return h.digest()


def _copy_runs(src: memoryview, runs: list[memoryview]) -> None:
    offset = 0
    for run in runs:
        run[:] = src[offset:offset + len(run)]
        offset += len(run)


def _check_stored(files: ChunkFiles, ref: ChunkRef, runs: list, verify: Verify) -> None:
    """The check of a chunk's stored bytes (in `runs`): its keyed BLAKE3 record (blake3; a chunk without one,
    stored before records existed, is checked by sha256 once and recorded), its CID (sha256), or nothing."""
    if verify is Verify.NONE:
        return
    ok = files.check_record(ref.cid, "stored", runs) if verify is Verify.BLAKE3 else None
    if ok is True:
        return
    if _digest(runs) != ref.cid.digest:  # no record (or one that does not check): the CID decides
        raise IntegrityError(f"stored chunk {ref.cid.short()} does not match its CID (run `kvswap fsck --repair`, "
                             "then fetch it again)")
    if ok is False:  # the bytes are the CID's, the record is not theirs: a damaged or foreign index row
        log.warning("the record of chunk %s did not match its bytes, which match their CID: recorded again",
                    ref.cid.short())
    if verify is Verify.BLAKE3:
        files.put_record(ref.cid, "stored", runs)  # (re)recorded: the next load checks the record


def _load_raw_form(files: ChunkFiles, ref: ChunkRef, runs: list, verify: Verify) -> bool:
    """A compressed chunk's raw local form into `runs`, checked (its BLAKE3 record, or its recorded sha256
    under the index's MAC); False when there is none or it does not check (it is dropped: the stored chunk is
    decoded instead)."""
    raw_form = files.raw_form(ref.cid)
    if raw_form is None:
        return False
    path, digest = raw_form
    try:
        _read_into(path, list(runs), f"raw form of chunk {ref.cid.short()}")
        if verify is Verify.BLAKE3:
            ok = files.check_record(ref.cid, "raw", runs)
            if ok is None and _digest(runs) == digest:  # a raw form kept before records existed
                files.put_record(ref.cid, "raw", runs)
                ok = True
            if not ok:
                log.warning("the raw form of chunk %s did not match its record: decoded from the stored chunk",
                            ref.cid.short())
                raise IntegrityError("raw form does not match its record")
        elif verify is Verify.SHA256 and _digest(runs) != digest:
            raise IntegrityError("raw form does not match its recorded digest")
        return True
    except (IntegrityError, OSError):
        files.drop_raw_form(ref.cid)  # a damaged cache entry: fall back to the stored chunk
        return False


def _load_one(files: ChunkFiles, ref: ChunkRef, runs: list[memoryview], itemsize: int, verify: Verify,
              keep_raw: bool) -> None:
    """Verified raw payload of one chunk into `runs` (writable views that together are its raw payload)."""
    what = f"chunk {ref.cid.short()}"
    if ref.codec != "raw" and _load_raw_form(files, ref, runs, verify):
        return
    try:
        path = files.chunk_path(ref.cid)
    except NotFound:
        raise NotFound(f"{what} is not in the store") from None
    if ref.codec == "raw":
        _read_into(path, list(runs), what)
        _check_stored(files, ref, runs, verify)
        return
    stored = bytearray(ref.stored_size)
    _read_into(path, [memoryview(stored)], what)
    _check_stored(files, ref, [memoryview(stored)], verify)
    if len(runs) == 1:
        decode_into(ref.codec, stored, runs[0], itemsize)
        raw = runs[0]
    else:
        raw = memoryview(bytearray(ref.raw_size))
        decode_into(ref.codec, stored, raw, itemsize)
        _copy_runs(raw, runs)
    if keep_raw:
        files.put_raw_form(ref.cid, raw)


def contiguous(buffer: memoryview, plan: LoadPlan) -> Dest:
    """The `dest` of a staging buffer holding the plan's chunks back to back (at least plan.nbytes long)."""
    view = memoryview(buffer).cast("B")
    if len(view) < plan.nbytes:
        raise UsageError(f"staging buffer of {len(view)} bytes is smaller than the {plan.nbytes} to load")
    return lambda slot: [view[slot.offset:slot.end]]


def fill(plan: LoadPlan, dest: memoryview | Dest, files: ChunkFiles, *, verify: Verify | str = DEFAULT_VERIFY,
         keep_raw: bool = True, threads: int = LOAD_THREADS) -> Iterator[Slot]:
    """Load every chunk of `plan` into its destination, yielding each slot once its bytes are in place and
    verified, in completion order. `dest` is a staging buffer (chunks back to back, see `contiguous`) or a
    function giving, per slot, writable views that together hold its raw payload in order. The first failure
    (IntegrityError, NotFound) is raised from the iterator after the chunks in flight finish; the destination
    then holds unverified bytes and must not reach a model. Nothing is yielded for a chunk before it is
    verified."""
    verify = Verify.parse(verify, "verify")
    runs_of = dest if callable(dest) else contiguous(dest, plan)
    itemsize = plan.manifest.layout.itemsize

    def task(slot: Slot) -> Slot:
        runs = runs_of(slot)
        if sum(len(r) for r in runs) != slot.ref.raw_size:
            raise UsageError(f"destination of chunk {slot.ref.cid.short()} does not hold its {slot.ref.raw_size} bytes")
        _load_one(files, slot.ref, runs, itemsize, verify, keep_raw)
        return slot

    if threads <= 1 or len(plan.slots) <= 1:
        for slot in plan.slots:
            yield task(slot)
        return
    pool = ThreadPoolExecutor(max_workers=min(threads, len(plan.slots)), thread_name_prefix="kvswap-load")
    pending: set[Future] = set()
    try:
        pending = {pool.submit(task, slot) for slot in plan.slots}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()  # raises the chunk's error
    finally:  # on an error (or a consumer that stops early) chunks not started are dropped
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)


def read_tail(manifest: Manifest, files: ChunkFiles, verify: Verify | str = DEFAULT_VERIFY) -> np.ndarray | None:
    """The verified last-position logits (float32), or None when the artifact has none."""
    tail = manifest.tail
    if tail is None:
        return None
    out = bytearray(tail.raw_size)
    _load_one(files, tail, [memoryview(out)], 4, Verify.parse(verify, "verify"), keep_raw=False)
    return np.frombuffer(out, dtype="<u4").view("<f4").astype(np.float32)


def load_all(plan: LoadPlan, files: ChunkFiles, **kw) -> np.ndarray:
    """The staging buffer as a plain numpy array, filled and verified (CPU callers and tests)."""
    buf = np.empty(plan.nbytes, dtype=np.uint8)
    for _ in fill(plan, memoryview(buf), files, **kw):
        pass
    return buf


__all__ = ["DEFAULT_VERIFY", "LOAD_THREADS", "ChunkFiles", "Dest", "LoadPlan", "Slot", "contiguous", "fill", "load_all",
           "read_tail"]
