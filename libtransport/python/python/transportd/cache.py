"""A node-local cache of objects: a directory with a byte budget, shared by every process of
the machine that opens it (DataLoader workers, ranks), evicting the least recently used.

>>> from transportd import Client
>>> from transportd.cache import Cache
>>> cache = Cache("/local/nvme/transportd-cache", max_bytes=200 << 30)  # doctest: +SKIP
>>> with Client("storage-0:7443", identity="gpu-id/") as c:  # doctest: +SKIP
...     data = cache.read(c, "scans", "train/shard-0001.bin")  # a bytearray, verified

**Verified on use.** Every time an entry is served, its BLAKE3 manifest root is computed
again (:func:`transportd._native.manifest_root`) and compared with the root the node's
``stat`` answers now; an entry that does not match (a changed object, bit rot, tampering)
is discarded and the object pulled again. So each use costs one ``stat`` round trip and a
hash of the bytes (BLAKE3: several GB/s), never trust in the disk.

**Layout.** ``objects/`` holds one file per entry, named by a SHA-256 of (dataset, object,
root): never the object's name, which may carry a patient identifier. ``tmp/`` holds pulls
in progress (one directory each, locked by its puller). ``lock`` serialises the placing
and evicting of entries; ``over-budget`` marks a budget left exceeded. There is no index
but the directory itself, so any number of processes may use the cache at once, and a
crashed one leaves nothing inconsistent (its pull directory is removed by the next trim).
A cache directory this class creates gets mode 0700: the entries are plaintext objects.

**Locks.** A process serving an entry holds a shared ``flock`` on its file for as long as
it reads it (:meth:`Cache.read`) or holds it open (:meth:`Cache.open`). Eviction takes an
exclusive lock without waiting and skips entries it cannot lock, so an entry in use is
never evicted; the budget may then be exceeded until the entry is released. The process
releasing an entry while the budget is exceeded trims the cache again. Entries are
otherwise never changed in place: placed by an atomic rename, removed by unlinking.

**Budget.** ``max_bytes`` bounds the entries' sizes (pulls in progress are not counted). An
object larger than the whole budget is served but not kept. Two processes that miss the
same object at once both pull it (the first to finish places its copy; the other serves
its own once and drops it). The directory belongs on a local filesystem: the locks are
``flock`` locks, which network filesystems may not share between machines.

The counters (:attr:`Cache.hits`, ...) count what this process's :class:`Cache` object did;
each DataLoader worker counts its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from ._native import ObjectStat, manifest_root, object_digest
from .errors import Changed, Corrupt, LocalError

if TYPE_CHECKING:
    from typing_extensions import Buffer as BufferLike

    from ._client import Client

__all__ = ["Cache", "CacheUsage", "CachedObject"]

_log = logging.getLogger("transportd.cache")

_B = TypeVar("_B", bound="BufferLike")


@dataclass(frozen=True)
class CacheUsage:
    """What the cache directory holds now."""

    entries: int
    bytes: int


class Cache:
    """A cache directory of at most ``max_bytes`` of entries (see the module's notes).

    The object holds no state but its counters, so it pickles (into DataLoader workers) and
    any number of processes may open the same directory.
    """

    hits: int
    """Objects served from an entry that verified."""
    misses: int
    """Objects that had no usable entry and were pulled from the node."""
    discarded: int
    """Entries that failed verification (root mismatch) and were removed."""
    evictions: int
    """Entries this process evicted to keep within the budget."""
    fetched_bytes: int
    """Bytes pulled from the node into the cache."""
    served_bytes: int
    """Bytes served from verified entries (hits and freshly pulled ones)."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.hits = self.misses = self.discarded = self.evictions = 0
        self.fetched_bytes = self.served_bytes = 0
        for sub in ("", "objects", "tmp"):
            (self.directory / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.directory / "lock").touch(mode=0o600, exist_ok=True)

    def __repr__(self) -> str:
        return f"<transportd.cache.Cache {str(self.directory)!r} max_bytes={self.max_bytes}>"

    def read(
        self,
        client: Client,
        dataset: str,
        object: str,
        *,
        into: Callable[[int], _B] = bytearray,  # type: ignore[assignment]
        stat: ObjectStat | None = None,
    ) -> _B:
        """The object's bytes in a buffer ``into(size)`` makes (a ``bytearray`` by default;
        any writable C-contiguous buffer, such as ``numpy.empty(size, numpy.uint8)``),
        served from the cache if an entry verifies against the node's root, else pulled into
        the cache first. ``stat`` saves the ``stat`` round trip when the caller just made it.

        The buffer is hashed after it is filled, so what it holds is what was verified.
        Raises :class:`~transportd.errors.Changed` if the object changes while it is pulled.
        """
        st = stat if stat is not None else client.stat(dataset, object)
        held = self._acquire(dataset, object, st)
        if held is not None:
            try:
                buf = into(st.size)
                _readinto(held.fd, buf, st.size)
                if manifest_root(buf, st.chunk_bytes) == st.root:
                    self._served(held, st, hit=True)
                    return buf
                self._discard(held, dataset, object)
            finally:
                self._release(held)
        held, done = self._pull(client, dataset, object, st)
        try:
            buf = into(st.size)
            _readinto(held.fd, buf, st.size)
            if manifest_root(buf, st.chunk_bytes) != st.root:
                raise _tampered()
            self._served(held, st, hit=False)
            return buf
        finally:
            done()

    def open(
        self, client: Client, dataset: str, object: str, *, stat: ObjectStat | None = None
    ) -> CachedObject:
        """The object's entry, verified, held until :meth:`CachedObject.close` (a context
        manager): its file (``.path``) may be mapped or opened by other libraries meanwhile
        and is never evicted while held. Pulls the object first if it has no entry."""
        st = stat if stat is not None else client.stat(dataset, object)
        held = self._acquire(dataset, object, st)
        if held is not None:
            if _file_root(held, st) == st.root:
                self._served(held, st, hit=True)
                return CachedObject(st, held, lambda: self._release(held))
            self._discard(held, dataset, object)
            self._release(held)
        held, done = self._pull(client, dataset, object, st)
        try:
            if _file_root(held, st) != st.root:
                raise _tampered()
        except BaseException:
            done()
            raise
        self._served(held, st, hit=False)
        return CachedObject(st, held, done)

    def holds(self, dataset: str, object: str, root: str) -> bool:
        """Whether an entry for this version of the object is present (not verified)."""
        return self._entry(dataset, object, root).exists()

    def entry_path(self, dataset: str, object: str, root: str) -> Path:
        """Where the entry for this version of the object lives (whether or not it does)."""
        return self._entry(dataset, object, root)

    def usage(self) -> CacheUsage:
        """The entries present and their total size."""
        entries = self._entries()
        return CacheUsage(len(entries), sum(e.size for e in entries))

    def trim(self) -> int:
        """Evicts least recently used entries not in use until the cache is within budget,
        and removes pull directories of processes that are gone. Returns the entries
        evicted. (Placing an entry and releasing one over budget trim by themselves.)"""
        with self._locked():
            return self._evict(0)

    # The entries.

    def _entry(self, dataset: str, object: str, root: str) -> Path:
        key = hashlib.sha256(f"{dataset}\0{object}\0{root}".encode()).hexdigest()
        return self.directory / "objects" / key

    def _entries(self) -> list[_Entry]:
        found = []
        with os.scandir(self.directory / "objects") as it:
            for e in it:
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue  # evicted meanwhile
                found.append(_Entry(Path(e.path), st.st_size, st.st_mtime_ns))
        return found

    def _acquire(self, dataset: str, object: str, st: ObjectStat) -> _Held | None:
        """Opens and share-locks the entry, if there is one of the expected size."""
        path = self._entry(dataset, object, st.root)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        # Evicted between the open and the lock? Then it is no longer the entry.
        info = os.fstat(fd)
        if info.st_nlink == 0 or info.st_size != st.size:
            os.close(fd)
            return None
        return _Held(fd, path, info.st_ino)

    def _release(self, held: _Held) -> None:
        os.close(held.fd)
        # Over budget because an entry was in use: the releaser trims. Checked under the
        # lock, so a trim that found this entry busy has written its mark by now.
        with self._locked(fcntl.LOCK_SH):
            over = (self.directory / "over-budget").exists()
        if over:
            self.trim()

    def _served(self, held: _Held, st: ObjectStat, *, hit: bool) -> None:
        """Counts a verified entry served and marks it used now: the LRU order is the
        entries' mtimes, set from a fine clock (the kernel's own file times are coarser than
        the order of quick reads). Processes sharing a cache must run as one user: only
        the owner may set a file's times (else the order is that of placing)."""
        self.hits += hit
        self.served_bytes += st.size
        now = time.time_ns()
        with contextlib.suppress(PermissionError):
            os.utime(held.fd, ns=(now, now))

    def _discard(self, held: _Held, dataset: str, object: str) -> None:
        _log.warning(
            "cache entry failed verification (root mismatch), discarded: dataset=%s "
            "object.digest=%s",
            dataset,
            object_digest(object)[:16],
        )
        self.discarded += 1
        with contextlib.suppress(FileNotFoundError):
            if os.stat(held.path).st_ino == held.ino:
                os.unlink(held.path)

    def _pull(
        self, client: Client, dataset: str, object: str, st: ObjectStat
    ) -> tuple[_Held, Callable[[], None]]:
        """Pulls the object into a pull directory of ours and places it as its entry
        (unless it is larger than the whole budget). Returns its file, share-locked before
        it was placed (so never evicted before it is served), and what releases it."""
        self.misses += 1
        tmp, unlock_tmp = self._pull_dir()
        try:
            dest = tmp / "data"
            report = client.fetch_to_file(dataset, object, dest)
            self.fetched_bytes += report.size
            _log.debug(
                "cache miss: pulled dataset=%s object.digest=%s bytes=%d",
                dataset,
                object_digest(object)[:16],
                report.size,
            )
            if report.root != st.root or report.size != st.size:
                raise Changed(
                    "the object changed while it was pulled into the cache: read it again"
                )
            fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_SH)
            entry = self._entry(dataset, object, st.root)
            held = _Held(fd, dest, os.fstat(fd).st_ino)  # served from the pull directory...
            if report.size <= self.max_bytes:
                with self._locked():
                    # ...unless placed: not when another process placed it meanwhile.
                    if not entry.exists():
                        self._evict(report.size)
                        os.replace(dest, entry)
                        held = _Held(fd, entry, held.ino)
        except BaseException:
            unlock_tmp()
            raise

        def done() -> None:
            self._release(held)
            unlock_tmp()

        return held, done

    def _pull_dir(self) -> tuple[Path, Callable[[], None]]:
        """A fresh directory under ``tmp/``, exclusively locked (through a descriptor of the
        directory) until the returned function removes it, so trims leave it alone."""
        while True:
            path = Path(tempfile.mkdtemp(dir=self.directory / "tmp"))
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # a trim took it for abandoned before we could lock it
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break  # not removed by a trim between its making and our lock
            except FileNotFoundError:
                pass
            os.close(fd)

        def remove() -> None:
            shutil.rmtree(path, ignore_errors=True)
            os.close(fd)

        return path, remove

    @contextlib.contextmanager
    def _locked(self, how: int = fcntl.LOCK_EX) -> Iterator[None]:
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)

    def _evict(self, incoming: int) -> int:
        """With the lock held: evicts LRU entries not in use until ``incoming`` more bytes
        fit; marks the cache over budget if entries in use kept it from fitting."""
        self._remove_abandoned_pulls()
        entries = sorted(self._entries(), key=lambda e: (e.mtime_ns, e.path.name))
        total = sum(e.size for e in entries) + incoming
        evicted = 0
        for e in entries:
            if total <= self.max_bytes:
                break
            if _evict_one(e.path):
                total -= e.size
                evicted += 1
        self.evictions += evicted
        mark = self.directory / "over-budget"
        if total > self.max_bytes:
            mark.touch()
            _log.info("cache over budget by %d bytes: entries in use", total - self.max_bytes)
        else:
            mark.unlink(missing_ok=True)
        return evicted

    def _remove_abandoned_pulls(self) -> None:
        with os.scandir(self.directory / "tmp") as it:
            for d in it:
                try:
                    fd = os.open(d.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass  # a pull in progress
                else:
                    shutil.rmtree(d.path, ignore_errors=True)
                finally:
                    os.close(fd)


class CachedObject:
    """A verified cache entry, held (never evicted) until :meth:`close`."""

    def __init__(self, stat: ObjectStat, held: _Held, release: Callable[[], None]) -> None:
        self.stat = stat
        self._held: _Held | None = held
        self._release = release

    @property
    def path(self) -> Path:
        """The entry's file: read it (``numpy.memmap``, ``safetensors.safe_open``...) only
        while the entry is held."""
        return self._open().path

    @property
    def size(self) -> int:
        return self.stat.size

    @property
    def root(self) -> str:
        return self.stat.root

    def read(self) -> bytes:
        """The entry's bytes (verified when the entry was opened)."""
        buf = bytearray(self.size)
        _readinto(self._open().fd, buf, self.size)
        return bytes(buf)

    def readinto(self, buffer: BufferLike) -> int:
        """Reads the entry into the start of a writable buffer; returns the size."""
        _readinto(self._open().fd, buffer, self.size)
        return self.size

    def close(self) -> None:
        """Releases the entry: it may be evicted from now on."""
        if self._held is not None:
            self._held = None
            self._release()

    def __enter__(self) -> CachedObject:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "held" if self._held is not None else "released"
        return f"<transportd.cache.CachedObject of {self.size} bytes, {state}>"

    def _open(self) -> _Held:
        if self._held is None:
            raise LocalError("the cache entry was released: open it again")
        return self._held


@dataclass(frozen=True)
class _Entry:
    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Held:
    """An entry's open, share-locked descriptor."""

    fd: int
    path: Path
    ino: int


def _file_root(held: _Held, st: ObjectStat) -> str:
    """The root of the file behind a held descriptor (the very file, not whatever its path
    names now)."""
    return manifest_root(f"/proc/self/fd/{held.fd}", st.chunk_bytes)


def _tampered() -> Corrupt:
    return Corrupt(
        "a cache entry failed verification right after its pull: something else "
        "is changing the cache directory"
    )


def _evict_one(path: Path) -> bool:
    """Removes an entry unless someone holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        if os.fstat(fd).st_nlink == 0:
            return False
        path.unlink()
        return True
    finally:
        os.close(fd)


def _readinto(fd: int, buffer: BufferLike, size: int) -> None:
    """Reads ``size`` bytes from the start of ``fd`` into ``buffer``."""
    view = memoryview(buffer).cast("B")
    if len(view) < size:
        raise ValueError(f"the buffer holds {len(view)} bytes; the object has {size}")
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:size]], done)
        if n == 0:
            raise LocalError(
                "a cache entry ended early: something else is changing the cache directory"
            )
        done += n
