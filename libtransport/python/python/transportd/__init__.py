"""transportd for Python: pull and push datasets between nodes that know each other only by
SPIFFE identity, over QUIC or TLS/TCP with mutual TLS, every chunk BLAKE3-verified.

>>> import numpy as np, transportd
>>> with transportd.Client("storage-0:7443", identity="gpu-id/") as c:  # doctest: +SKIP
...     shard = c.fetch("scans", "train/shard-0001.bin")        # no copy into numpy:
...     arr = np.frombuffer(shard, dtype=np.uint8)

The network and disk work runs in Rust (libtransport) with the GIL released. Errors are the
typed exceptions of :mod:`transportd.errors`. Tensors by byte range out of safetensors files,
and checkpoints pushed atomically for readers: :mod:`transportd.tensors`. ``transportd://``
for fsspec, pandas and pyarrow: :mod:`transportd.fs`. On a GPU node whose ``transportd node``
serves a sidecar, :meth:`Client.sidecar` makes the same calls through it (no identity of
our own: the sidecar knows this process by its uid and executable).
"""

from . import errors
from ._client import Client
from ._native import (
    Buffer,
    FetchReport,
    ObjectEntry,
    ObjectStat,
    PushReport,
    __version__,
    object_digest,
)
from .aio import AsyncClient
from .errors import (
    Busy,
    Changed,
    Conflict,
    ConnectionLost,
    Corrupt,
    IdentityError,
    InvalidName,
    LocalError,
    NoSpace,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ProtocolError,
    ServerNotTrusted,
    SidecarUnavailable,
    TooLarge,
    TransportError,
    Unauthenticated,
    Unreachable,
)
from .tensors import (  # numpy, torch and safetensors are imported on first use
    load_checkpoint,
    push_checkpoint,
    read_checkpoint_index,
    read_safetensors_header,
    read_tensor,
)

__all__ = [
    "AsyncClient",
    "Buffer",
    "Busy",
    "Changed",
    "Client",
    "Conflict",
    "ConnectionLost",
    "Corrupt",
    "FetchReport",
    "IdentityError",
    "InvalidName",
    "LocalError",
    "NoSpace",
    "NotFound",
    "ObjectEntry",
    "ObjectStat",
    "OutOfRange",
    "PermissionDenied",
    "ProtocolError",
    "PushReport",
    "ServerNotTrusted",
    "SidecarUnavailable",
    "TooLarge",
    "TransportError",
    "Unauthenticated",
    "Unreachable",
    "__version__",
    "errors",
    "load_checkpoint",
    "object_digest",
    "push_checkpoint",
    "read_checkpoint_index",
    "read_safetensors_header",
    "read_tensor",
]
