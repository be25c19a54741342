"""``transportd://`` for fsspec: pandas, pyarrow and anything else that opens files through
fsspec read a node's datasets, and push to them, by URL.

A URL names the node, the dataset and the object::

    transportd://storage-0:7443/scans/ward-7/part-0001.parquet
                 ^ node         ^ dataset ^ object path

>>> import pandas as pd
>>> df = pd.read_parquet(  # doctest: +SKIP
...     "transportd://storage-0:7443/scans/ward-7/part-0001.parquet",
...     storage_options={"identity": "gpu-id/"},
... )
>>> import pyarrow.parquet as pq, transportd.fs
>>> fs = transportd.fs.TransportdFileSystem("storage-0:7443", identity="gpu-id/")
>>> table = pq.read_table("scans/ward-7/part-0001.parquet", filesystem=fs)  # doctest: +SKIP

Importing this module registers the protocol with fsspec; an installed package also
registers it by entry point, so ``fsspec.open("transportd://...")`` works without the import.

**Identity** comes from the storage options, as :class:`transportd.Client` takes it:
``identity`` (a directory with ``svid.pem``, ``svid.key``, ``bundle.pem``), or ``svid``,
``key`` and ``bundle``; else the SPIFFE Workload API at ``workload_socket`` or
``$SPIFFE_ENDPOINT_SOCKET``. ``path`` (``"auto"``, ``"quic"``, ``"tcp"``), ``server_id`` and
``connect_timeout`` pass through too. The node comes from the URL, or ``node=``.

**Paths** inside the filesystem are ``dataset/object/path``: the root lists the datasets this
identity may see, a dataset lists its objects, and the ``/`` in object paths make
pseudo-directories (a directory exists while an object under it does).

**Errors**: a path that is missing, or that this identity may not access (the node gives the
same answer to both), raises :class:`PathNotFound`: a :class:`FileNotFoundError`, as fsspec
users expect, and a :class:`transportd.errors.NotFound` with the stable ``code``
(``"not_found"``) and ``wire_code``. Other failures keep their :mod:`transportd.errors` type.

**Reads** of an opened file go through fsspec's ``"readahead"`` cache in blocks of
:data:`BLOCK_SIZE` (4 MiB, one chunk at transportd's default chunk size): a sequential
reader makes one ``read_range`` per 4 MiB and a reader that seeks (Parquet footers, column
chunks) wastes at most one block per seek. Each range is BLAKE3-verified chunk by chunk, so a
range costs the node whole chunks; ``block_size=`` and ``cache_type=`` of :meth:`open`
override. An object replaced (pushed again) while a file is open may read as a mix of the old
and the new version: objects meant to be read while written should get new names.

**Writes**: :meth:`put_file` pushes a local file (resumable); :meth:`pipe_file` pushes bytes;
``open(path, "wb")`` holds everything written in memory and pushes it on ``close()`` (the node
takes an object whole and makes it appear only once complete and verified), so it needs
about twice the object's size in memory: write large objects to a local file and
:meth:`put_file` them. Nodes do not delete, move or append: those raise
:class:`NotImplementedError` saying what to do instead.

**Processes**: fsspec caches filesystem instances, and DataLoader workers inherit them by
fork; a :class:`transportd.Client` made before a fork refuses to run in the child. The
filesystem therefore connects on first use, and again in each new process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from fsspec import AbstractFileSystem, register_implementation, registry
from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from fsspec.spec import AbstractBufferedFile
from fsspec.utils import stringify_path

from . import errors
from ._client import Client, PathLike
from ._native import object_digest

__all__ = ["BLOCK_SIZE", "PROTOCOL", "PathNotFound", "TransportdFile", "TransportdFileSystem"]

PROTOCOL = "transportd"
"""The URL scheme: ``transportd://node:port/dataset/object``."""

BLOCK_SIZE = 4 << 20
"""Bytes an open file reads ahead, and the filesystem's ``blocksize``."""

_NO_DELETE = (
    "transportd nodes do not delete, move or rename objects: push under a new name (objects "
    "are replaced whole by pushing again under the same name), and ask the node's operator "
    "to remove objects from its store"
)


class PathNotFound(errors.NotFound, FileNotFoundError):
    """No such dataset, object or directory, or this identity may not access it (the same
    answer). Both a :class:`FileNotFoundError` and a :class:`transportd.errors.NotFound`."""


class TransportdFileSystem(AbstractFileSystem):  # type: ignore[misc] # fsspec is untyped
    """The datasets of one node, as an fsspec filesystem (see the module's docs).

    ``node`` is ``HOST:PORT``; a URL's node fills it in. The other arguments are
    :class:`transportd.Client`'s. Nothing connects until the first call.

    ``sidecar=True`` goes through this machine's sidecar (its socket from
    ``$TRANSPORTD_SIDECAR_SOCKET``), ``sidecar="/path/to.sock"`` through the one at that
    socket (:meth:`transportd.Client.sidecar`); ``node`` then names the sidecar's storage
    node, if any, and the identity arguments are not used.
    """

    protocol = PROTOCOL
    root_marker = ""
    blocksize = BLOCK_SIZE

    def __init__(
        self,
        node: str | None = None,
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
        sidecar: bool | PathLike = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.node = node
        self.sidecar: bool | str = sidecar if isinstance(sidecar, bool) else os.fspath(sidecar)
        self._connect_args: dict[str, Any] = {
            "identity": identity,
            "svid": svid,
            "key": key,
            "bundle": bundle,
            "workload_socket": workload_socket,
            "workload_id": workload_id,
            "server_id": server_id,
            "path": path,
            "connect_timeout": connect_timeout,
        }
        self._lock = threading.Lock()
        self._conn: Client | None = None
        self._conn_pid: int | None = None

    @property
    def client(self) -> Client:
        """The connection for this process: made on first use, and again after a fork."""
        with self._lock:
            if self._conn is None or self._conn_pid != os.getpid():
                if self.sidecar is not False:
                    socket = None if self.sidecar is True else self.sidecar
                    self._conn = Client.sidecar(socket, node=self.node or None)
                    self._conn_pid = os.getpid()
                    return self._conn
                if not self.node:
                    raise ValueError(
                        "no node to connect to: name it in the URL "
                        "(transportd://host:port/dataset/object) or pass node='host:port'"
                    )
                # A client inherited from the parent is dropped unused: it cannot run here.
                self._conn = Client(self.node, **self._connect_args)
                self._conn_pid = os.getpid()
            return self._conn

    # -- paths ---------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        """``transportd://node/dataset/obj`` (or ``dataset/obj``) -> ``dataset/obj``."""
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = stringify_path(path)
        if path.startswith(f"{PROTOCOL}://"):
            # The node is the URL's authority; paths inside the filesystem go without it.
            path = path[len(PROTOCOL) + 3 :].partition("/")[2]
        elif path.startswith(f"{PROTOCOL}::"):
            path = path[len(PROTOCOL) + 2 :]
        return path.strip("/")

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        """The node named by a URL, for the constructor."""
        path = stringify_path(path)
        if path.startswith(f"{PROTOCOL}://"):
            node = path[len(PROTOCOL) + 3 :].partition("/")[0]
            if node:
                return {"node": node}
        return {}

    def unstrip_protocol(self, name: str) -> str:
        """A path of this filesystem as a full URL, node included."""
        if name.startswith(f"{PROTOCOL}://"):
            return name
        return f"{PROTOCOL}://{self.node or ''}/{name.lstrip('/')}"

    def _split(self, path: str) -> tuple[str, str]:
        dataset, _, obj = self._strip_protocol(path).partition("/")
        return dataset, obj

    def _object(self, path: str) -> tuple[str, str]:
        """A path that must name an object: ``(dataset, object)``."""
        dataset, obj = self._split(path)
        if not dataset or not obj:
            raise IsADirectoryError(
                "a transportd path names an object as dataset/path/to/object; "
                "this one names the root or a dataset"
            )
        return dataset, obj

    # -- listing -------------------------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """The datasets (at the root), or the objects and pseudo-directories right under a
        path; a path naming an object lists that object. ``detail=True`` gives dicts with
        ``name``, ``size`` and ``type`` (``"file"`` or ``"directory"``)."""
        path = self._strip_protocol(path)
        if not path:
            entries = [_dir(ds) for ds in self.client.list_datasets()]
        else:
            dataset, obj = self._split(path)
            prefix = f"{obj}/" if obj else ""
            with _not_found():
                listed = self.client.list_objects(dataset, prefix)
            entries = _children(dataset, prefix, listed)
            if not entries and obj:
                entries = [self.info(path)]  # an object, or PathNotFound
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """``name``, ``size`` and ``type``; objects add ``root`` (their BLAKE3 root, hex) and
        ``chunk_bytes``."""
        path = self._strip_protocol(path)
        if not path:
            return _dir("")
        dataset, obj = self._split(path)
        if not obj:
            if dataset in self.client.list_datasets():
                return _dir(dataset)
            raise PathNotFound("not found or not permitted", code="not_found")
        try:
            st = self.client.stat(dataset, obj)
        except errors.NotFound:
            # Not an object: a pseudo-directory if objects live under it.
            with _not_found():
                under = self.client.list_objects(dataset, f"{obj}/")
            if under:
                return _dir(path)
            raise PathNotFound("not found or not permitted", code="not_found") from None
        return {
            "name": path,
            "size": st.size,
            "type": "file",
            "root": st.root,
            "chunk_bytes": st.chunk_bytes,
        }

    def exists(self, path: str, **kwargs: Any) -> bool:
        """Whether the path is there for this identity. Unlike fsspec's default, a failure
        to reach the node raises instead of reading as ``False``."""
        try:
            self.info(path)
        except (FileNotFoundError, errors.InvalidName):
            return False
        return True

    # -- reading -------------------------------------------------------------------------

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        """Bytes ``start`` to ``end`` of an object, as a slice ``data[start:end]`` would give
        them (negative values count from the end; ``None`` is the start or the end; a range
        past the end is cut at the end). One ``read_range``, plus one ``stat`` when the range
        counts from the end or is open-ended."""
        dataset, obj = self._object(path)
        c = self.client
        size: int | None = None
        start = 0 if start is None else start
        with _not_found():
            if start < 0 or end is None or end < 0:
                size = c.stat(dataset, obj).size
                start = max(0, size + start) if start < 0 else start
                end = size if end is None else (size + end if end < 0 else end)
            if end <= start:
                return b""
            try:
                return bytes(c.read_range(dataset, obj, start, end))
            except errors.OutOfRange:
                if size is not None:
                    raise
                # The range runs past the end: read what there is, as a slice would.
                end = min(end, c.stat(dataset, obj).size)
                if end <= start:
                    return b""
                return bytes(c.read_range(dataset, obj, start, end))

    def get_file(
        self,
        rpath: str,
        lpath: Any,
        callback: Callback = DEFAULT_CALLBACK,
        outfile: Any = None,
        **kwargs: Any,
    ) -> None:
        """Pulls an object into the local file ``lpath``: verified, written whole (the file
        appears only once complete) and resumable, by ``fetch_to_file``."""
        if outfile is not None or not isinstance(lpath, str | os.PathLike):
            return super().get_file(rpath, lpath, callback=callback, outfile=outfile, **kwargs)  # type: ignore[no-any-return]
        if self.isdir(rpath):
            os.makedirs(lpath, exist_ok=True)
            return None
        dataset, obj = self._object(rpath)
        parent = os.path.dirname(os.fspath(lpath))
        if parent:
            os.makedirs(parent, exist_ok=True)
        with _not_found():
            report = self.client.fetch_to_file(dataset, obj, lpath)
        callback.set_size(report.size)
        callback.relative_update(report.size)
        return None

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> TransportdFile:
        if mode == "ab":
            raise NotImplementedError(
                "transportd nodes do not append: an object is pushed whole; read it, "
                "and push the old bytes and the new as one object"
            )
        return TransportdFile(
            self,
            self._strip_protocol(path),
            mode=mode,
            block_size=block_size or self.blocksize,
            autocommit=autocommit,
            cache_type=kwargs.pop("cache_type", "readahead"),
            cache_options=cache_options,
            **kwargs,
        )

    # -- writing -------------------------------------------------------------------------

    def pipe_file(
        self,
        path: str,
        value: bytes,
        mode: Literal["overwrite", "create"] = "overwrite",
        **kwargs: Any,
    ) -> None:
        """Pushes ``value`` as the object ``path`` (it appears whole, or not at all).
        ``mode="create"`` refuses an existing object (checked first: not atomic)."""
        dataset, obj = self._object(path)
        if mode == "create" and self.exists(path):
            raise FileExistsError("the object exists and mode='create'")
        with _not_found():
            self.client.push_bytes(dataset, obj, value)
        self.invalidate_cache(self._strip_protocol(path))

    def put_file(
        self,
        lpath: Any,
        rpath: str,
        callback: Callback = DEFAULT_CALLBACK,
        mode: Literal["overwrite", "create"] = "overwrite",
        **kwargs: Any,
    ) -> None:
        """Pushes the local file ``lpath`` as the object ``rpath``: read from disk as it
        goes (no copy of the file in memory), resumable, the object appearing whole."""
        if os.path.isdir(lpath):
            return  # directories are implicit: they appear with their objects
        dataset, obj = self._object(rpath)
        if mode == "create" and self.exists(rpath):
            raise FileExistsError("the object exists and mode='create'")
        callback.set_size(os.path.getsize(lpath))
        with _not_found():
            report = self.client.push_file(dataset, obj, lpath)
        callback.relative_update(report.size)
        self.invalidate_cache(self._strip_protocol(rpath))

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copies an object by pulling it into memory and pushing it (nodes have no copy
        of their own): it needs the object's size in memory, twice."""
        src, dst = self._object(path1), self._object(path2)
        with _not_found():
            data = self.client.fetch(*src)
            self.client.push_bytes(*dst, data)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Nothing to do inside a dataset (directories appear with their objects); datasets
        are made by the node's operator, in its configuration."""
        dataset, obj = self._split(path)
        if dataset and not obj and not self.exists(dataset):
            raise NotImplementedError(
                "datasets are made by the node's operator (its store and policy), "
                "not by clients; push into a dataset this identity may write"
            )

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """As :meth:`mkdir`."""
        self.mkdir(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Not supported: nodes do not delete objects."""
        raise NotImplementedError(_NO_DELETE)

    def rm_file(self, path: str) -> None:
        """Not supported: nodes do not delete objects."""
        raise NotImplementedError(_NO_DELETE)

    def _rm(self, path: str) -> None:
        raise NotImplementedError(_NO_DELETE)

    def rmdir(self, path: str) -> None:
        """Not supported: nodes do not delete objects."""
        raise NotImplementedError(_NO_DELETE)

    def mv(self, path1: str, path2: str, recursive: bool = False, **kwargs: Any) -> None:
        """Not supported: nodes do not move or delete objects (:meth:`copy` copies)."""
        raise NotImplementedError(_NO_DELETE)


class TransportdFile(AbstractBufferedFile):  # type: ignore[misc] # fsspec is untyped
    """An object opened through :class:`TransportdFileSystem`.

    Read mode (``"rb"``) reads ranges (``read_range``) through fsspec's cache, by default
    ``"readahead"`` in blocks of :data:`BLOCK_SIZE`. Write mode (``"wb"``, ``"xb"``) holds
    what is written in memory and pushes it as one object on ``close()`` (or on
    ``commit()`` inside an fsspec transaction); ``"xb"`` refuses an object that exists when
    the file is opened (checked then, not atomically).
    """

    DEFAULT_BLOCK_SIZE = BLOCK_SIZE
    fs: TransportdFileSystem

    def __init__(self, fs: TransportdFileSystem, path: str, **kwargs: Any) -> None:
        self._target = fs._object(path)
        if kwargs.get("mode") == "xb" and fs.exists(path):
            raise FileExistsError("the object exists and mode='xb'")
        with _not_found():
            super().__init__(fs, path, **kwargs)

    def __str__(self) -> str:
        # fsspec logs files by their str() (reads, at DEBUG): the object only as its digest.
        dataset, obj = self._target
        return f"<TransportdFile {dataset}/object.digest={object_digest(obj)[:16]}>"

    __repr__ = __str__

    def _fetch_range(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        if start >= end:
            return b""
        with _not_found():
            return bytes(self.fs.client.read_range(*self._target, start, end))

    def _upload_chunk(self, final: bool = False) -> bool:
        # False keeps the buffer growing: the node takes the object whole, on close.
        if not final:
            return False
        if self.autocommit:
            self._push()
        return False  # what a commit() pushes stays in the buffer until then

    def commit(self) -> None:
        """Pushes what was written (inside a transaction; ``close()`` does it otherwise)."""
        self._push()

    def discard(self) -> None:
        """Drops what was written (inside a transaction), pushing nothing."""
        self.buffer = None

    def _push(self) -> None:
        with self.buffer.getbuffer() as view, _not_found():
            self.fs.client.push_bytes(*self._target, view)


def _dir(name: str) -> dict[str, Any]:
    return {"name": name, "size": 0, "type": "directory"}


def _children(dataset: str, prefix: str, listed: list[Any]) -> list[dict[str, Any]]:
    """The entries right under ``prefix``: objects, and the pseudo-directories deeper
    objects make."""
    out: dict[str, dict[str, Any]] = {}
    for e in listed:
        rest = e.path[len(prefix) :]
        head, sep, _ = rest.partition("/")
        name = f"{dataset}/{prefix}{head}"
        if sep:
            out.setdefault(name, _dir(name))
        else:
            out[name] = {"name": name, "size": e.size, "type": "file"}
    return [out[k] for k in sorted(out)]


@contextmanager
def _not_found() -> Iterator[None]:
    """The node's NotFound as a :class:`PathNotFound` (a FileNotFoundError too)."""
    try:
        yield
    except PathNotFound:
        raise
    except errors.NotFound as e:
        raise PathNotFound(str(e), code=e.code, wire_code=e.wire_code) from e


def _register() -> None:
    # The entry point registers the class by name (imported on first use); this registers
    # the class itself, replacing only an earlier registration of ours (a reload).
    existing = registry.get(PROTOCOL)
    if existing is None or (existing.__module__, existing.__qualname__) == (
        __name__,
        TransportdFileSystem.__qualname__,
    ):
        register_implementation(PROTOCOL, TransportdFileSystem, clobber=True)


_register()
