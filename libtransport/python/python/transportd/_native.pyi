"""Type stubs of the extension module ``transportd._native`` (libtransport/python/src)."""

from collections.abc import Awaitable, Callable
from os import PathLike
from typing import final

from typing_extensions import Buffer as _BufferProtocol

__version__: str

@final
class Buffer:
    """Verified bytes in memory Rust owns, exported read-only through the buffer protocol
    (``memoryview``, ``numpy.frombuffer``, ``torch.frombuffer`` take it without a copy)."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, view: memoryview, /) -> None: ...

@final
class ObjectEntry:
    """One object of a listing."""

    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...

@final
class ObjectStat:
    """An object's manifest, in brief."""

    @property
    def size(self) -> int: ...
    @property
    def chunk_bytes(self) -> int: ...
    @property
    def chunk_count(self) -> int: ...
    @property
    def root(self) -> str:
        """The BLAKE3 root, hex."""

@final
class FetchReport:
    """What a pull did."""

    @property
    def server(self) -> str: ...
    @property
    def path(self) -> str:
        """``"quic"``, ``"tcp"``, ``"rdma"``, or ``"sidecar"``."""
    @property
    def size(self) -> int: ...
    @property
    def fetched_bytes(self) -> int: ...
    @property
    def chunks(self) -> int: ...
    @property
    def chunks_reused(self) -> int: ...
    @property
    def chunks_fetched(self) -> int: ...
    @property
    def root(self) -> str: ...
    @property
    def elapsed(self) -> float:
        """Wall time, seconds."""
    @property
    def retries(self) -> int: ...

@final
class PushReport:
    """What a push did."""

    @property
    def server(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def sent_bytes(self) -> int: ...
    @property
    def chunks(self) -> int: ...
    @property
    def chunks_skipped(self) -> int: ...
    @property
    def root(self) -> str: ...
    @property
    def elapsed(self) -> float: ...
    @property
    def retries(self) -> int: ...

@final
class Client:
    """The blocking client; ``transportd.Client`` wraps it. Made by :meth:`sidecar`, its
    calls go through a sidecar's Unix socket: reports name the path ``"sidecar"`` and count
    no chunks, and :meth:`fetch` maps the sidecar's sealed memory file read-only (no copy)."""

    def __init__(
        self,
        node: str,
        *,
        identity: str | None = None,
        svid: str | None = None,
        key: str | None = None,
        bundle: str | None = None,
        workload_socket: str | None = None,
        workload_id: str | None = None,
        server_id: str | None = None,
        path: str = "auto",
        connect_timeout: float | None = None,
    ) -> None: ...
    @staticmethod
    def sidecar(socket: str, *, node: str | None = None) -> Client: ...
    @property
    def server_id(self) -> str:
        """The node's SPIFFE ID (through a sidecar: ``sidecar:`` and the socket's path)."""
    @property
    def path(self) -> str:
        """``"quic"``, ``"tcp"`` or ``"sidecar"``."""
    @property
    def bytes_through_socket(self) -> int | None:
        """Through a sidecar, bytes read from its socket (frames and inline reads, never a
        handed-over file); ``None`` for a direct client."""
    def list_datasets(self) -> list[str]: ...
    def list_objects(self, dataset: str, prefix: str = "") -> list[ObjectEntry]: ...
    def stat(self, dataset: str, object: str) -> ObjectStat: ...
    def read_range(self, dataset: str, object: str, start: int, end: int) -> Buffer: ...
    def fetch(self, dataset: str, object: str, *, max_bytes: int = ...) -> Buffer: ...
    def fetch_into(self, dataset: str, object: str, buffer: _BufferProtocol) -> FetchReport: ...
    def fetch_to_file(self, dataset: str, object: str, dest: str) -> FetchReport: ...
    def push_bytes(self, dataset: str, object: str, data: _BufferProtocol) -> PushReport: ...
    def push_file(self, dataset: str, object: str, src: str) -> PushReport: ...
    def prefetch(self, objects: list[tuple[str, str]]) -> int:
        """Through a sidecar only (``TypeError`` for a direct client)."""
    def close(self) -> None: ...

@final
class AsyncClient:
    """The asyncio client; ``transportd.AsyncClient`` wraps it. Each call returns an awaitable
    of the blocking client's answer; cancelling it cancels the call (through a sidecar, the
    sidecar's answer is still read whole and dropped)."""

    @staticmethod
    def connect(
        node: str,
        *,
        identity: str | None = None,
        svid: str | None = None,
        key: str | None = None,
        bundle: str | None = None,
        workload_socket: str | None = None,
        workload_id: str | None = None,
        server_id: str | None = None,
        path: str = "auto",
        connect_timeout: float | None = None,
    ) -> Awaitable[AsyncClient]: ...
    @staticmethod
    def sidecar(socket: str, *, node: str | None = None) -> Awaitable[AsyncClient]: ...
    @property
    def server_id(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def bytes_through_socket(self) -> int | None: ...
    def list_datasets(self) -> Awaitable[list[str]]: ...
    def list_objects(self, dataset: str, prefix: str = "") -> Awaitable[list[ObjectEntry]]: ...
    def stat(self, dataset: str, object: str) -> Awaitable[ObjectStat]: ...
    def read_range(self, dataset: str, object: str, start: int, end: int) -> Awaitable[Buffer]: ...
    def fetch(self, dataset: str, object: str, *, max_bytes: int = ...) -> Awaitable[Buffer]: ...
    def fetch_into(
        self,
        dataset: str,
        object: str,
        buffer: _BufferProtocol,
        on_release: Callable[[], object],
    ) -> Awaitable[FetchReport]:
        """``on_release`` is called (from another thread) once the buffer is let go of."""
    def fetch_to_file(self, dataset: str, object: str, dest: str) -> Awaitable[FetchReport]: ...
    def push_bytes(
        self, dataset: str, object: str, data: _BufferProtocol
    ) -> Awaitable[PushReport]: ...
    def push_file(self, dataset: str, object: str, src: str) -> Awaitable[PushReport]: ...
    def prefetch(self, objects: list[tuple[str, str]]) -> Awaitable[int]:
        """Through a sidecar only (``TypeError`` for a direct client)."""
    def close(self) -> None: ...

def object_digest(object: str) -> str:
    """BLAKE3 of an object path, hex: what logs show in place of the path."""

def manifest_root(data: str | PathLike[str] | _BufferProtocol, chunk_bytes: int) -> str:
    """The BLAKE3 manifest root (hex) of a file or of bytes, cut into chunks of
    ``chunk_bytes``: equal to the node's ``stat().root`` when they are the object's bytes and
    ``chunk_bytes`` is ``stat().chunk_bytes`` (a power of two from 64 KiB to 64 MiB, else
    ``ValueError``). A writable buffer is hashed in place, a read-only one copied once; the
    GIL is released while hashing."""

def _forwarded_events() -> int:
    """How many Rust-side log events have taken the GIL to reach Python (for tests)."""
