"""The asyncio client: the blocking client's calls as coroutines, on one connection.

>>> import asyncio, transportd
>>> async def main() -> None:  # doctest: +SKIP
...     async with await transportd.AsyncClient.connect("storage-0:7443", identity="gpu-id/") as c:
...         parts = await asyncio.gather(
...             *(c.read_range("scans", "train/shard-0001.bin", i << 20, (i + 1) << 20)
...               for i in range(32))
...         )

Calls share the client's connection (QUIC streams, or frames over TLS/TCP), so calls
gathered together run at once without more handshakes; a whole-object pull or push of
several chunks may also spread its chunks over a few more connections, kept for later
transfers (as the blocking client's do). The work runs in Rust on the package's runtime
threads, never on the event loop.

Cancelling a task cancels its call: the Rust side stops and tells the node the transfer is
over. A cancelled pull leaves nothing behind but what ``fetch_to_file`` keeps to resume; a
cancelled push commits nothing (the node makes an object visible only once every chunk has
arrived verified, and keeps what it has for a later push of the same object to resume).
``fetch_into`` returns, whether with a result, an error or a cancellation, only once nothing
writes into the caller's buffer any more.

On a GPU node whose ``transportd node`` serves a sidecar, ``await AsyncClient.sidecar()``
gives a client making the same calls through it, as :meth:`transportd.Client.sidecar` does
for the blocking client:

>>> async def main() -> None:  # doctest: +SKIP
...     async with await transportd.AsyncClient.sidecar() as c:  # $TRANSPORTD_SIDECAR_SOCKET
...         shard = await c.fetch("scans", "train/shard-0001.bin")  # mapped, no copy

Each call in flight through a sidecar has a connection to it of its own. A cancelled call
cannot take back what the sidecar was asked: its answer is still read whole (on a thread of
the package's runtime), so its connection is never reused with that answer pending, and then
dropped; a cancelled push through a sidecar may still be stored. A cancelled
``fetch_to_file`` puts nothing in place, and a cancelled ``fetch_into`` writes nothing into
the buffer.

Errors are those of :mod:`transportd.errors`; logging is the blocking client's: the
``transportd`` logger, objects as digests only, and the Rust side's records under
``transportd.native``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self, TypeVar

from . import _native
from ._client import (
    PathLike,
    _digest,
    _fs,
    _ms,
    _sidecar_connected,
    _sidecar_failed,
    sidecar_socket,
)
from ._native import Buffer, FetchReport, ObjectEntry, ObjectStat, PushReport
from .errors import TransportError

if TYPE_CHECKING:
    from typing_extensions import Buffer as BufferLike

__all__ = ["AsyncClient"]

_log = logging.getLogger("transportd")

_T = TypeVar("_T")


class AsyncClient:
    """A connection to one transportd node for asyncio, authenticated by our SVID.

    Make one with ``await AsyncClient.connect(node, ...)``, which takes the options of
    :class:`transportd.Client`, or with ``await AsyncClient.sidecar()`` to go through this
    machine's sidecar; use it as ``async with``. Calls may run concurrently from any number
    of tasks. A client made before a fork refuses to run in the child.
    """

    def __init__(self, native: _native.AsyncClient, node: str) -> None:
        """Wraps a connected native client; use :meth:`connect`."""
        self._native = native
        self._node = node

    @classmethod
    async def connect(
        cls,
        node: str,
        *,
        identity: PathLike | None = None,
        svid: PathLike | None = None,
        key: PathLike | None = None,
        bundle: PathLike | None = None,
        workload_socket: str | None = None,
        workload_id: str | None = None,
        server_id: str | None = None,
        path: Literal["auto", "quic", "tcp"] = "auto",
        connect_timeout: float | None = None,
    ) -> Self:
        """Connects to ``node`` (``HOST:PORT``): the TLS handshake and a first round trip,
        so a refused identity raises here (:class:`~transportd.errors.Unauthenticated`)."""
        started = time.monotonic()
        try:
            native = await _native.AsyncClient.connect(
                node,
                identity=_fs(identity),
                svid=_fs(svid),
                key=_fs(key),
                bundle=_fs(bundle),
                workload_socket=workload_socket,
                workload_id=workload_id,
                server_id=server_id,
                path=path,
                connect_timeout=connect_timeout,
            )
        except TransportError as e:
            _log.warning("connecting to %s failed: %s (code %s)", node, e, e.code)
            raise
        _log.info(
            "connected to %s (%s) over %s in %d ms",
            node,
            native.server_id,
            native.path,
            _ms(started),
        )
        return cls(native, node)

    @classmethod
    async def sidecar(cls, path: PathLike | None = None, *, node: str | None = None) -> Self:
        """A client whose calls the sidecar of this machine answers, as
        :meth:`transportd.Client.sidecar` makes for the blocking client: ``transportd node``
        serving its local data API on the Unix socket ``path`` (by default
        ``$TRANSPORTD_SIDECAR_SOCKET``; :class:`ValueError` if neither names one).

        No identity of our own: the sidecar knows this process by its uid, gid and executable
        (one that matches no registration entry gets
        :class:`~transportd.errors.PermissionDenied`). ``node`` names the storage node to ask
        (one of the sidecar's; by default its first). :meth:`fetch` maps the sealed memory
        file the sidecar hands over (no copy); a sidecar that is not running (or restarted
        mid-call) raises the retriable :class:`~transportd.errors.SidecarUnavailable`.
        """
        socket = sidecar_socket(path)
        started = time.monotonic()
        try:
            native = await _native.AsyncClient.sidecar(socket, node=node)
        except TransportError as e:
            _sidecar_failed(socket, e)
            raise
        _sidecar_connected(socket, started)
        return cls(native, socket)

    @property
    def server_id(self) -> str:
        """The node's SPIFFE ID, as its SVID proved it (through a sidecar: ``sidecar:`` and
        its socket's path)."""
        return self._native.server_id

    @property
    def path(self) -> str:
        """The transport in use: ``"quic"`` or ``"tcp"`` (``"sidecar"`` through one)."""
        return self._native.path

    @property
    def bytes_through_socket(self) -> int | None:
        """Through a sidecar, the bytes read from its socket so far (frames and inline reads,
        never a handed-over object's contents); ``None`` for a direct client."""
        return self._native.bytes_through_socket

    async def prefetch(self, objects: list[tuple[str, str]]) -> int:
        """Through a sidecar: asks it to fetch ``objects`` (``(dataset, object)`` pairs, in
        the order wanted) into its cache meanwhile; returns how many it took on. A direct
        client has no cache to fill (:class:`TypeError`)."""
        pairs = list(objects)
        return await self._call("prefetch", None, None, lambda: self._native.prefetch(pairs))

    async def list_datasets(self) -> list[str]:
        """Datasets this identity may see."""
        return await self._call("list_datasets", None, None, self._native.list_datasets)

    async def list_objects(self, dataset: str, prefix: str = "") -> list[ObjectEntry]:
        """Objects of ``dataset`` whose path starts with ``prefix``, in path order."""
        return await self._call(
            "list_objects", dataset, None, lambda: self._native.list_objects(dataset, prefix)
        )

    async def stat(self, dataset: str, object: str) -> ObjectStat:
        """An object's size, chunking and BLAKE3 root."""
        return await self._call("stat", dataset, object, lambda: self._native.stat(dataset, object))

    async def read_range(self, dataset: str, object: str, start: int, end: int) -> Buffer:
        """Bytes ``start`` to ``end`` (exclusive) of an object, each chunk they touch verified.

        Raises :class:`~transportd.errors.OutOfRange` for a range outside the object.
        """
        return await self._call(
            "read_range",
            dataset,
            object,
            lambda: self._native.read_range(dataset, object, start, end),
        )

    async def fetch(self, dataset: str, object: str, *, max_bytes: int = 16 << 30) -> Buffer:
        """A whole object, verified, in memory the returned :class:`Buffer` owns (read-only,
        taken by numpy and torch without a copy). Objects over ``max_bytes`` raise
        :class:`~transportd.errors.TooLarge`."""
        return await self._call(
            "fetch",
            dataset,
            object,
            lambda: self._native.fetch(dataset, object, max_bytes=max_bytes),
        )

    async def fetch_into(self, dataset: str, object: str, buffer: BufferLike) -> memoryview:
        """A whole object, verified, into the start of ``buffer`` (any writable C-contiguous
        buffer); returns a byte view of its first ``size`` bytes.

        The buffer stays exported (a ``bytearray`` cannot be resized) until the call is
        over; the call returns, also when cancelled, only once the Rust side has let go of
        it. Keep other code off the buffer meanwhile; if the pull fails or is cancelled, it
        holds an unspecified mix of old and new bytes.
        """
        loop = asyncio.get_running_loop()
        released = loop.create_future()

        def on_release() -> None:  # called from a Rust thread
            loop.call_soon_threadsafe(_resolve, released)

        started = False

        def start() -> Awaitable[FetchReport]:
            nonlocal started
            call = self._native.fetch_into(dataset, object, buffer, on_release)
            started = True  # from here on, the Rust side holds the buffer
            return call

        try:
            report = await self._call("fetch_into", dataset, object, start)
        finally:
            if started:
                await _until_done(released)
        return memoryview(buffer).cast("B")[: report.size]

    async def fetch_to_file(self, dataset: str, object: str, dest: PathLike) -> FetchReport:
        """A whole object into the file ``dest``, which appears only once complete and
        verified; after an interruption (or a cancellation), the same call resumes."""
        return await self._call(
            "fetch_to_file",
            dataset,
            object,
            lambda: self._native.fetch_to_file(dataset, object, os.fspath(dest)),
        )

    async def push_bytes(self, dataset: str, object: str, data: BufferLike) -> PushReport:
        """Stores ``data`` (copied once, when called) as ``object`` of ``dataset``; the
        object appears on the node only once complete and verified."""
        view = memoryview(data).cast("B")
        return await self._call(
            "push_bytes", dataset, object, lambda: self._native.push_bytes(dataset, object, view)
        )

    async def push_file(self, dataset: str, object: str, src: PathLike) -> PushReport:
        """Stores the file ``src`` as ``object`` of ``dataset`` (resumable, like pulls)."""
        return await self._call(
            "push_file",
            dataset,
            object,
            lambda: self._native.push_file(dataset, object, os.fspath(src)),
        )

    async def close(self) -> None:
        """Closes the connection (a later call reconnects); calls in flight fail. Through a
        sidecar there is nothing to close: idle connections go with the client."""
        self._native.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<transportd.AsyncClient {self._native.server_id} over {self._native.path}>"

    async def _call(
        self, op: str, dataset: str | None, object: str | None, call: Callable[[], Awaitable[_T]]
    ) -> _T:
        """Awaits ``call()``, logging what it did: the object only as its digest."""
        started = time.monotonic()
        try:
            result = await call()
        except TransportError as e:
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug(
                    "%s failed: dataset=%s object.digest=%s error=%s",
                    op,
                    dataset,
                    _digest(object),
                    e.code,
                )
            raise
        if _log.isEnabledFor(logging.DEBUG):
            size = getattr(result, "size", None)
            if size is None and isinstance(result, Buffer):
                size = len(result)
            _log.debug(
                "%s: dataset=%s object.digest=%s bytes=%s elapsed_ms=%d",
                op,
                dataset,
                _digest(object),
                size,
                _ms(started),
            )
        return result


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _until_done(fut: asyncio.Future[None]) -> None:
    """Waits for ``fut``, also through cancellations of the waiting task (which are raised
    once it is done)."""
    cancelled = None
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError as e:
            cancelled = e
    if cancelled is not None:
        raise cancelled
