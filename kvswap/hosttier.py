"""The host-memory tier: verified artifacts that were loaded recently, kept in memory for the next load.

Production KV tiers keep hot caches in host memory and copy from there (LMCache's CPU tier, SGLang's HiCache):
a load from the tier skips the disk, the hash and any decompression. kvswap's tier is a folder on a memory
filesystem (`/dev/shm`), one folder per home, so every process of the home shares one copy: the daemon's local
and hosted generations, `kvswap.load_cache`, the vLLM connector.

An entry is one load plan's KV (an artifact's chunks, or the chunks covering its first n tokens) in the layout
of the cache itself, `[layers, K|V, kv_heads, tokens, head_dim]` raw bits, the buffer the CPU load path fills
(kvswap/engine/kvload.py), with the last-position logits of a whole artifact beside it. A hit maps the entry
copy-on-write and prefaults it (MADV_POPULATE_READ): the cache tensors are views of the tier's pages, no byte
is copied, and a write into them (none is made: the cache grows by concatenation) would stay in that process.
On CUDA the mapped pages are the source of one copy to the device. Only bytes that were just verified are
kept (the loader checked every chunk first); the folder is the node user's alone (0700), as the identity key is.

The budget (`store.host_cache_bytes`) is never exceeded, by any number of processes loading at once: a writer
reserves its entry's size under the folder's lock, evicting least recently used entries first (entries of pinned
artifacts last), before it writes a byte, and an entry that cannot fit is not written. A store that removes an
artifact drops its entries (kvswap/store.py), and an fsck that finds a problem clears the tier. An evicted
entry's pages are freed when the last load that maps them is dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .protocol.cid import Cid
from .protocol.errors import FormatError

#: where tiers live unless $KVSWAP_HOST_TIER_DIR says otherwise: a memory filesystem on Linux
DEFAULT_TIER_ROOT = Path("/dev/shm")
#: free space (bytes) an entry leaves on the memory filesystem: a container's /dev/shm may be smaller than the
#: budget, and a write that fills it fails (the load goes on from the store; the entry is not kept)
TIER_FS_HEADROOM_BYTES = 64 << 20
_LOCK = ".lock"
_TAIL = ".tail"
_PART = ".part"


class HostTier:
    """One home's tier: `lookup` (a hit's file, or None), `writer` (reserve and fill an entry), `drop`, `clear`.
    `hits`, `misses` and `hit_bytes` count this process's lookups (the daemon's /metrics shows them)."""

    def __init__(self, folder: Path, budget_bytes: int, is_pinned: Callable[[Cid], bool] = lambda cid: False):
        self.folder = Path(folder)
        self.budget = int(budget_bytes)
        self.is_pinned = is_pinned
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        self.hits = self.misses = self.hit_bytes = self.written_bytes = 0
        self._count_lock = threading.Lock()
        self._pending: list[threading.Thread] = []

    @classmethod
    def for_home(cls, home: Path, budget_bytes: int, is_pinned: Callable[[Cid], bool] = lambda cid: False
                 ) -> "HostTier | None":
        """The tier of the home at `home`, or None when the budget is 0 or no memory filesystem is there."""
        root = Path(os.environ.get("KVSWAP_HOST_TIER_DIR") or DEFAULT_TIER_ROOT)
        if budget_bytes <= 0 or not root.is_dir() or not os.access(root, os.W_OK):
            return None
        name = hashlib.sha256(str(Path(home).expanduser().resolve()).encode()).hexdigest()[:16]
        try:
            return cls(root / f"kvswap-{os.getuid()}" / name, budget_bytes, is_pinned)
        except OSError:  # a read-only or full memory filesystem: no tier, loads go to the store
            return None

    # --- names ----------------------------------------------------------------------------------------
    @staticmethod
    def _name(cid: Cid, n_tokens: int) -> str:
        return f"{cid}.{int(n_tokens)}"

    def _entries(self) -> Iterator[Path]:
        for path in self.folder.iterdir():
            if not path.name.startswith("."):
                yield path

    def usage(self) -> int:
        """Bytes held now: entries, their logits, and reservations being written."""
        total = 0
        for path in self._entries():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # --- reading ----------------------------------------------------------------------------------------
    def lookup(self, cid: Cid, n_tokens: int, nbytes: int, tail_bytes: int = 0
               ) -> tuple[memoryview, bytes | None] | None:
        """(the entry's bytes, mapped copy-on-write and prefaulted; its logits' bytes or None) of an entry holding
        exactly `nbytes` for this plan and, when `tail_bytes`, logits of that size; else None (a miss). The
        mapping outlives an eviction by another process meanwhile. A hit marks the entry used now (eviction is
        least recently used first)."""
        path = self.folder / self._name(cid, n_tokens)
        found = None
        try:
            with open(path, "rb", buffering=0) as fh:
                tail_path = path.with_name(path.name + _TAIL)
                tail = tail_path.read_bytes() if tail_bytes else None
                if os.fstat(fh.fileno()).st_size == nbytes and (not tail_bytes or len(tail) == tail_bytes):
                    os.utime(fh.fileno())
                    pages = mmap.mmap(fh.fileno(), nbytes, flags=mmap.MAP_PRIVATE,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
                    _prefault(pages)
                    found = memoryview(pages), tail
        except FileNotFoundError:
            pass
        with self._count_lock:
            if found is not None:
                self.hits += 1
                self.hit_bytes += nbytes
            else:
                self.misses += 1
        return found

    # --- writing ----------------------------------------------------------------------------------------
    def keep_in_background(self, cid: Cid, n_tokens: int, payload, tail: bytes | None = None) -> None:
        """`keep` on a thread of its own, so the load that calls it returns at once: writing a load into a memory
        filesystem costs about what the load did (its pages are new). `payload` must not change meanwhile (a
        LoadedKv's layer buffer never does). The interpreter waits for it at exit; `flush` waits for it now."""
        thread = threading.Thread(target=self.keep, args=(cid, n_tokens, payload, tail), name="kvswap-tier-keep")
        with self._count_lock:
            self._pending = [t for t in self._pending if t.is_alive()] + [thread]
        thread.start()

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for the entries being kept in the background."""
        with self._count_lock:
            pending = list(self._pending)
        for thread in pending:
            thread.join(timeout_s)

    def keep(self, cid: Cid, n_tokens: int, payload, tail: bytes | None = None) -> bool:
        """Keep `payload` (the verified layer-layout KV of this plan, any buffer) and `tail` (its logits' bytes)
        as an entry; False, nothing kept, when it cannot fit in the budget even after evicting every unpinned
        entry, or the memory filesystem has no room (the load that called this goes on regardless)."""
        view = memoryview(payload).cast("B")
        nbytes, tail = len(view), tail or b""
        need = nbytes + len(tail)
        if need > self.budget or nbytes <= 0:
            return False
        with self._locked():
            if (self.folder / self._name(cid, n_tokens)).exists():
                return False  # another process keeps it already
            if not self._evict_to(self.budget - need):
                return False
            st = os.statvfs(self.folder)
            if st.f_bavail * st.f_frsize < need + TIER_FS_HEADROOM_BYTES:
                return False  # the memory filesystem is smaller than the budget (a container's /dev/shm)
            part = self.folder / f"{self._name(cid, n_tokens)}.{uuid.uuid4().hex[:8]}{_PART}"
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # held while it is written: a reservation nobody holds is stale
                os.ftruncate(fd, need)  # the reservation counts toward usage from now on
            except OSError:
                os.close(fd)
                part.unlink(missing_ok=True)
                return False
        try:
            _write_all(fd, view, 0)
            os.ftruncate(fd, nbytes)  # the payload only: the logits go beside it, in the room reserved
            final = self.folder / self._name(cid, n_tokens)
            with self._locked():
                if tail:
                    tail_fd = os.open(final.with_name(final.name + _TAIL), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                      0o600)
                    try:
                        _write_all(tail_fd, memoryview(tail), 0)
                    finally:
                        os.close(tail_fd)
                os.replace(part, final)
        except OSError:  # the memory filesystem filled up meanwhile: the entry is simply not kept
            part.unlink(missing_ok=True)
            return False
        finally:
            os.close(fd)
        with self._count_lock:
            self.written_bytes += nbytes
        return True

    def _evict_to(self, limit: int) -> bool:
        """Under the lock: remove entries, unpinned and least recently used first, until usage <= limit; False
        if even then it would not fit (reservations in progress and pinned entries stay)."""
        entries = []
        used = 0
        for path in self._entries():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            used += st.st_size
            if path.name.endswith(_PART):
                if _stale(path):  # its writer died (a killed process): the room is free again
                    path.unlink(missing_ok=True)
                    used -= st.st_size
                continue
            if not path.name.endswith(_TAIL):
                cid = _cid_of(path.name)
                entries.append((cid is not None and self.is_pinned(cid), st.st_mtime, path))
        for _, _, path in sorted(entries, key=lambda e: (e[0], e[1])):
            if used <= limit:
                break
            for victim in (path, path.with_name(path.name + _TAIL)):
                with contextlib.suppress(FileNotFoundError):
                    used -= victim.stat().st_size
                    victim.unlink()
        return used <= limit

    # --- invalidation -------------------------------------------------------------------------------------
    def drop(self, cid: Cid) -> None:
        """Every entry of artifact `cid` (it was removed from the store)."""
        prefix = f"{cid}."
        with self._locked():
            for path in list(self._entries()):
                if path.name.startswith(prefix) and not path.name.endswith(_PART):
                    path.unlink(missing_ok=True)

    def clear(self) -> None:
        with self._locked():
            for path in list(self._entries()):
                if not path.name.endswith(_PART):
                    path.unlink(missing_ok=True)


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]


#: madvise(MADV_POPULATE_READ) (Linux 5.14): map every page of an entry in one call, without copying it
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _prefault(pages: mmap.mmap) -> None:
    """Map every page of a hit now, so its first use is not page faults; by touching each page where the
    kernel is older than MADV_POPULATE_READ."""
    try:
        pages.madvise(_MADV_POPULATE_READ)
    except OSError:
        view = memoryview(pages)
        for offset in range(0, len(view), mmap.PAGESIZE):
            view[offset]
        view.release()


def _stale(part: Path) -> bool:
    """Whether no live writer holds the reservation `part` (its lock is free)."""
    try:
        fd = os.open(part, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _cid_of(name: str) -> Cid | None:
    try:
        return Cid.parse(name.split(".", 1)[0])
    except FormatError:  # a stray file in the folder: no CID, evicted like any unpinned entry
        return None


__all__ = ["DEFAULT_TIER_ROOT", "TIER_FS_HEADROOM_BYTES", "HostTier"]
