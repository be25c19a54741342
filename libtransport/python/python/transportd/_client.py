"""The blocking client: a thin layer over ``transportd._native.Client`` that takes paths
as ``os.PathLike``, hands ``fetch_into``'s result back as a view of the caller's buffer, and
logs.

Logging goes to the ``transportd`` logger: connections at INFO, each call at DEBUG. Records
carry the node, the server's SPIFFE ID, dataset names, sizes, timings and error codes; an
object appears only as its digest (:func:`object_digest`), since paths can carry patient
identifiers, and payload never.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypeVar

from . import _native
from ._native import Buffer, FetchReport, ObjectEntry, ObjectStat, PushReport, object_digest
from .errors import TransportError

if TYPE_CHECKING:
    from typing_extensions import Buffer as BufferLike

__all__ = ["SIDECAR_SOCKET_ENV", "Client", "sidecar_socket"]

SIDECAR_SOCKET_ENV = "TRANSPORTD_SIDECAR_SOCKET"
"""The environment variable naming the sidecar's socket (:meth:`Client.sidecar`)."""

_log = logging.getLogger("transportd")

_T = TypeVar("_T")

PathLike = str | os.PathLike[str]


class Client:
    """A connection to one transportd node, authenticated by our SVID.

    Identity: SVID files when any is given (``identity``, a directory holding ``svid.pem``,
    ``svid.key`` and ``bundle.pem``; or ``svid``, ``key`` and ``bundle``), otherwise the SPIFFE
    Workload API at ``workload_socket`` or ``SPIFFE_ENDPOINT_SOCKET`` (rotations followed).

    ``path`` is ``"auto"`` (QUIC, then TLS over TCP if QUIC cannot reach the node), ``"quic"``
    or ``"tcp"``; ``connect_timeout`` (seconds, default 10) bounds each path's handshake, so
    also how long ``"auto"`` gives QUIC before it tries TCP. ``server_id`` pins the node's
    SPIFFE ID. Connecting completes the TLS handshake and a first round trip, so a refused
    identity raises here (:class:`~transportd.errors.Unauthenticated`).

    Every call blocks with the GIL released; Ctrl-C cancels it. Use one client per process:
    a client made before a fork (DataLoader workers) refuses to run in the child.

    On a GPU node whose ``transportd node`` serves a sidecar, :meth:`Client.sidecar` gives a
    client making the same calls through it.
    """

    _native: _native.Client

    def __init__(
        self,
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
    ) -> None:
        started = time.monotonic()
        try:
            self._native = _native.Client(
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
            self._native.server_id,
            self._native.path,
            _ms(started),
        )

    @classmethod
    def sidecar(cls, path: PathLike | None = None, *, node: str | None = None) -> Client:
        """A client whose calls the sidecar of this machine answers: ``transportd node``
        serving its local data API on the Unix socket ``path`` (by default
        ``$TRANSPORTD_SIDECAR_SOCKET``; :class:`ValueError` if neither names one).

        No identity of our own: the sidecar knows this process by its uid, gid and executable
        (one that matches no registration entry gets
        :class:`~transportd.errors.PermissionDenied`) and fetches with this workload's SVID.
        ``node`` names the storage node to ask (one of the sidecar's; by default its first).
        The calls are this class's: :meth:`fetch` maps the sealed memory file the sidecar
        hands over (no copy), :meth:`read_range` asks in pieces of at most 1 MiB. A sidecar
        that is not running (or restarted mid-call) raises the retriable
        :class:`~transportd.errors.SidecarUnavailable`.
        """
        socket = sidecar_socket(path)
        started = time.monotonic()
        client = cls.__new__(cls)
        try:
            client._native = _native.Client.sidecar(socket, node=node)
        except TransportError as e:
            _sidecar_failed(socket, e)
            raise
        _sidecar_connected(socket, started)
        return client

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

    def prefetch(self, objects: list[tuple[str, str]]) -> int:
        """Through a sidecar: asks it to fetch ``objects`` (``(dataset, object)`` pairs, in
        the order wanted) into its cache meanwhile; returns how many it took on. A direct
        client has no cache to fill (:class:`TypeError`)."""
        pairs = list(objects)
        return self._call("prefetch", None, None, lambda: self._native.prefetch(pairs))

    def list_datasets(self) -> list[str]:
        """Datasets this identity may see."""
        return self._call("list_datasets", None, None, self._native.list_datasets)

    def list_objects(self, dataset: str, prefix: str = "") -> list[ObjectEntry]:
        """Objects of ``dataset`` whose path starts with ``prefix``, in path order."""
        return self._call(
            "list_objects", dataset, None, lambda: self._native.list_objects(dataset, prefix)
        )

    def stat(self, dataset: str, object: str) -> ObjectStat:
        """An object's size, chunking and BLAKE3 root."""
        return self._call("stat", dataset, object, lambda: self._native.stat(dataset, object))

    def read_range(self, dataset: str, object: str, start: int, end: int) -> Buffer:
        """Bytes ``start`` to ``end`` (exclusive) of an object, each chunk they touch verified.

        Raises :class:`~transportd.errors.OutOfRange` for a range outside the object.
        """
        return self._call(
            "read_range",
            dataset,
            object,
            lambda: self._native.read_range(dataset, object, start, end),
        )

    def fetch(self, dataset: str, object: str, *, max_bytes: int = 16 << 30) -> Buffer:
        """A whole object, verified, in memory the returned :class:`Buffer` owns.

        ``numpy.frombuffer(buf)`` and ``torch.frombuffer(buf, dtype=...)`` use that memory
        without a copy (it is read-only). Objects over ``max_bytes`` raise
        :class:`~transportd.errors.TooLarge`.
        """
        return self._call(
            "fetch",
            dataset,
            object,
            lambda: self._native.fetch(dataset, object, max_bytes=max_bytes),
        )

    def fetch_into(self, dataset: str, object: str, buffer: BufferLike) -> memoryview:
        """A whole object, verified, into the start of ``buffer``: any writable C-contiguous
        buffer (``bytearray``, numpy array, torch tensor's ``numpy()``, ...). Nothing of the
        object's size is allocated and nothing is copied: chunks land in place.

        Returns a byte view of ``buffer``'s first ``size`` bytes (the object). An object
        larger than the buffer raises :class:`~transportd.errors.TooLarge`; if the pull
        fails, the buffer holds an unspecified mix of old and new bytes. Keep other code off
        the buffer until the call returns.
        """
        report = self._call(
            "fetch_into",
            dataset,
            object,
            lambda: self._native.fetch_into(dataset, object, buffer),
        )
        return memoryview(buffer).cast("B")[: report.size]

    def fetch_to_file(self, dataset: str, object: str, dest: PathLike) -> FetchReport:
        """A whole object into the file ``dest``, which appears only once complete and
        verified; after an interruption, the same call resumes from the verified chunks."""
        return self._call(
            "fetch_to_file",
            dataset,
            object,
            lambda: self._native.fetch_to_file(dataset, object, os.fspath(dest)),
        )

    def push_bytes(self, dataset: str, object: str, data: BufferLike) -> PushReport:
        """Stores ``data`` (``bytes`` or any C-contiguous buffer, copied once) as ``object``
        of ``dataset``; the object appears on the node only once complete and verified."""
        view = memoryview(data).cast("B")
        return self._call(
            "push_bytes", dataset, object, lambda: self._native.push_bytes(dataset, object, view)
        )

    def push_file(self, dataset: str, object: str, src: PathLike) -> PushReport:
        """Stores the file ``src`` as ``object`` of ``dataset`` (resumable, like pulls)."""
        return self._call(
            "push_file",
            dataset,
            object,
            lambda: self._native.push_file(dataset, object, os.fspath(src)),
        )

    def close(self) -> None:
        """Closes the connection (a later call reconnects)."""
        self._native.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        native = getattr(self, "_native", None)  # None if connecting failed
        if native is None:
            return "<transportd.Client (not connected)>"
        return f"<transportd.Client {native.server_id} over {native.path}>"

    def _call(self, op: str, dataset: str | None, object: str | None, call: Callable[[], _T]) -> _T:
        """Runs ``call``, logging what it did: the object only as its digest."""
        started = time.monotonic()
        try:
            result = call()
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


def sidecar_socket(path: PathLike | None = None) -> str:
    """The sidecar's socket: ``path``, else ``$TRANSPORTD_SIDECAR_SOCKET``;
    :class:`ValueError` if neither names one."""
    if path is not None:
        socket = os.fspath(path)
    else:
        socket = os.environ.get(SIDECAR_SOCKET_ENV, "")
    if not socket:
        raise ValueError(
            f"no sidecar socket: pass path= or set {SIDECAR_SOCKET_ENV} to the path of the "
            "node's sidecar socket"
        )
    return socket


def _sidecar_failed(socket: str, e: TransportError) -> None:
    _log.warning("connecting to the sidecar at %s failed: %s (code %s)", socket, e, e.code)


def _sidecar_connected(socket: str, started: float) -> None:
    _log.info("connected to the sidecar at %s in %d ms", socket, _ms(started))


def _fs(p: PathLike | None) -> str | None:
    return None if p is None else os.fspath(p)


def _digest(object: str | None) -> str | None:
    if object is None:
        return None
    try:
        return object_digest(object)[:16]
    except TransportError:
        return "(invalid)"


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
