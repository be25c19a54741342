"""Tensors out of safetensors files on a node, by byte range; checkpoints pushed so that
readers see them whole or not at all.

**One tensor** of a large file costs a ``stat`` and two range reads, not the file:

>>> import transportd
>>> from transportd.tensors import read_safetensors_header, read_tensor
>>> with transportd.Client("storage-0:7443", identity="gpu-id/") as c:  # doctest: +SKIP
...     header = read_safetensors_header(c, "models", "llama/model-00001-of-00004.safetensors")
...     w = read_tensor(c, "models", "llama/model-00001-of-00004.safetensors",
...                     "model.embed_tokens.weight", framework="torch", header=header)

:func:`read_safetensors_header` reads the 8-byte header length and the JSON header (after a
``stat`` for the object's size and chunking: one ``read_range`` of the first chunk, a second
only for a header longer than a chunk), validating both; :func:`read_tensor` reads that
tensor's bytes only (one more ``read_range``; pass ``header=`` to reuse a header already
read). The node verifies and sends whole chunks, so a tensor costs the chunks it touches.

**No copies**: the bytes arrive in a read-only :class:`transportd.Buffer`; numpy arrays are
``numpy.frombuffer`` views of it (read-only: writing raises). torch tensors are
``torch.frombuffer`` views of it: torch has no read-only tensors and warns about that, which
these functions silence, so **do not write into a returned torch tensor** (``.clone()`` it
first, or pass ``writable=True`` for a copy). Byte order is the file's (little-endian), as
on every host PyTorch runs on.

**dtypes**: every safetensors dtype numpy has (``BOOL``, ``U8``-``U64``, ``I8``-``I64``,
``F16``, ``F32``, ``F64``, ``C64``) reads as numpy; torch adds ``BF16`` and the 8-bit floats
(``F8_E4M3``, ``F8_E5M2``, ``F8_E4M3FNUZ``, ``F8_E5M2FNUZ``, ``F8_E8M0``). numpy has no
bfloat16 or 8-bit floats: those raise :class:`UnsupportedDtype` with ``framework="numpy"``
(use ``"torch"``, or read the raw bytes with ``read_range``). The sub-byte floats (``F4``,
``F6_*``) are read by neither.

**Checkpoints** (:func:`push_checkpoint`, :func:`read_checkpoint_index`,
:func:`load_checkpoint`) follow Hugging Face's sharded layout, made atomic for readers:

1. Every push writes its shards under a directory of its own, ``PREFIX/<push id>/``, named
   ``model-00001-of-0000N.safetensors``: a push never touches another push's objects.
2. Each shard is one object push, which the node makes visible only once complete and
   verified (a partial file renamed on commit).
3. Last, the index ``PREFIX/model.safetensors.index.json`` is pushed: the usual
   ``weight_map`` (tensor -> shard) and ``metadata.total_size``, plus
   ``metadata.format`` (``"transportd-checkpoint/1"``) and ``parts``: each shard's size and
   BLAKE3 root as the node reported them. Pushing it is the commit point:
   it replaces the previous index, if any, in one rename on the node.
4. Readers go through the index only: :func:`read_checkpoint_index` reads it and checks that
   every part it lists is on the node with the root it records (``stat``), so a reader sees
   the previous checkpoint whole or the new one whole. A push that dies before step 3 leaves
   shards nobody's index names (they stay on the node until its operator removes them; nodes
   do not delete) and, under a new prefix, no checkpoint at all
   (:class:`CheckpointNotFound`).
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import errors
from ._native import PushReport

if TYPE_CHECKING:
    from ._client import Client

__all__ = [
    "INDEX_NAME",
    "MAX_HEADER_BYTES",
    "MAX_INDEX_BYTES",
    "CheckpointCorrupt",
    "CheckpointNotFound",
    "InvalidSafetensors",
    "SafetensorsHeader",
    "TensorInfo",
    "UnsupportedDtype",
    "load_checkpoint",
    "push_checkpoint",
    "read_checkpoint_index",
    "read_safetensors_header",
    "read_tensor",
]

Framework = Literal["numpy", "torch"]

INDEX_NAME = "model.safetensors.index.json"
"""The index object under a checkpoint's prefix: pushed last, the commit point."""

MAX_HEADER_BYTES = 100_000_000
"""Largest JSON header accepted: the safetensors library's own limit."""

MAX_INDEX_BYTES = 64 << 20
"""Largest checkpoint index accepted."""

INDEX_FORMAT = "transportd-checkpoint/1"


class InvalidSafetensors(errors.TransportError, ValueError):
    """The object is not a valid safetensors file (length, JSON or tensor table)."""

    code = "invalid_safetensors"


class UnsupportedDtype(errors.TransportError, TypeError):
    """The tensor's dtype has no counterpart in the framework asked for."""

    code = "unsupported_dtype"


class CheckpointNotFound(errors.NotFound):
    """No complete checkpoint under the prefix: its index is not there (never pushed, a
    push that did not finish, or not permitted to this identity)."""

    code = "checkpoint_not_found"


class CheckpointCorrupt(errors.Corrupt):
    """The index does not match the node: a part it lists is missing or has another root
    (replaced or removed behind the index's back), or the index itself is malformed."""

    code = "checkpoint_corrupt"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor is in the file: its dtype, shape and absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsHeader(dict[str, Any]):
    """A safetensors file's JSON header as a dict (``"__metadata__"`` included, as the file
    has it), with what reading its tensors needs: :meth:`tensor`, ``data_start`` (where the
    tensor bytes begin), ``object_size`` and ``root`` (the object's BLAKE3 root)."""

    data_start: int
    object_size: int
    root: str | None

    def tensor(self, name: str) -> TensorInfo:
        """A tensor's dtype, shape and absolute byte range; KeyError if the file has none of
        that name."""
        if name == "__metadata__" or name not in self:
            raise KeyError(f"no tensor {name!r} in this safetensors file")
        e = self[name]
        begin, end = e["data_offsets"]
        start = self.data_start
        return TensorInfo(e["dtype"], tuple(e["shape"]), start + begin, start + end)

    def tensor_names(self) -> list[str]:
        """The tensors' names, in file order."""
        names = [k for k in self if k != "__metadata__"]
        return sorted(names, key=lambda k: self[k]["data_offsets"][0])


def read_safetensors_header(client: Client, dataset: str, object: str) -> SafetensorsHeader:
    """The header of a safetensors object, validated: a ``stat`` (size, chunking, root) and
    one range read of the first chunk, which holds the 8-byte little-endian header length
    and, almost always, the JSON header (the node verifies and sends whole chunks, so that
    read costs what reading the 8 bytes alone would); a header longer than the first chunk
    takes a second range read for the rest.

    Raises :class:`InvalidSafetensors` for anything that is not a valid header: a length
    past the object or over :data:`MAX_HEADER_BYTES`, bytes that are not JSON, tensors whose
    dtype, shape or offsets do not add up.
    """
    st = client.stat(dataset, object)
    if st.size < 8:
        raise InvalidSafetensors("not safetensors: shorter than the 8-byte header length")
    first = memoryview(client.read_range(dataset, object, 0, min(st.size, st.chunk_bytes)))
    n = int.from_bytes(first[:8], "little")
    _check_length(n, st.size)
    raw = bytes(first[8 : 8 + n])
    if len(raw) < n:
        raw += bytes(client.read_range(dataset, object, len(first), 8 + n))
    return _parse_header(raw, 8 + n, st.size, st.root)


def read_tensor(
    client: Client,
    dataset: str,
    object: str,
    name: str,
    *,
    framework: Framework = "numpy",
    header: SafetensorsHeader | None = None,
    writable: bool = False,
) -> Any:
    """One tensor of a safetensors object, reading only its bytes.

    Returns a numpy array (``framework="numpy"``) or a torch tensor (``"torch"``) of the
    file's dtype and shape, a view of the bytes as they arrived (see the module's notes: the
    numpy array is read-only; do not write into the torch tensor) unless ``writable=True``
    asks for a copy of one's own. ``header`` reuses a header from
    :func:`read_safetensors_header`, saving two requests; it must be the object's current
    header (objects replaced under the same name change their offsets).
    """
    if header is None:
        header = read_safetensors_header(client, dataset, object)
    info = header.tensor(name)
    _check_dtype(info.dtype, framework)
    data: Any = b""
    if info.end > info.start:
        data = client.read_range(dataset, object, info.start, info.end)
    return _as_tensor(data, info, framework, writable)


def push_checkpoint(
    client: Client,
    state_dict_or_directory: Mapping[str, Any] | str | os.PathLike[str],
    dataset: str,
    prefix: str,
    *,
    max_shard_bytes: int = 1 << 30,
    on_part: Callable[[str, PushReport], None] | None = None,
) -> dict[str, Any]:
    """Pushes a checkpoint under ``prefix`` of ``dataset``, atomically for readers (see the
    module's notes for the protocol) and returns the index it committed.

    ``state_dict_or_directory`` is a mapping of names to torch tensors or numpy arrays,
    written as safetensors shards of at most ``max_shard_bytes`` of tensor data each (a
    larger tensor gets a shard of its own), by the ``safetensors`` package; tensors must not
    share memory (tied weights: keep one name). Or a local directory: its files (top level;
    ``*.safetensors`` shards, configs, tokenizers) are pushed as they are, each from disk.
    A shard is built in memory, and pushing copies it once: the peak is about twice
    ``max_shard_bytes``. ``on_part(object, report)`` is called after each part is committed
    on the node (progress reports).
    """
    prefix = prefix.strip("/")
    push_id = secrets.token_hex(8)
    parts: dict[str, dict[str, Any]] = {}
    weight_map: dict[str, str] = {}
    total = 0

    def committed(rel: str, report: PushReport) -> None:
        parts[rel] = {"size": report.size, "root": report.root}
        if on_part is not None:
            on_part(_join(prefix, rel), report)

    if isinstance(state_dict_or_directory, Mapping):
        shards = _plan_shards(state_dict_or_directory, max_shard_bytes)
        for i, names in enumerate(shards, 1):
            rel = f"{push_id}/model-{i:05d}-of-{len(shards):05d}.safetensors"
            shard = {k: state_dict_or_directory[k] for k in names}
            data = _serialize(shard)
            committed(rel, client.push_bytes(dataset, _join(prefix, rel), data))
            del data
            weight_map.update(dict.fromkeys(names, rel))
            total += sum(_nbytes(v) for v in shard.values())
    else:
        root = Path(state_dict_or_directory)
        files = sorted(p for p in root.iterdir() if p.is_file() and p.name != INDEX_NAME)
        if not files:
            raise ValueError("the checkpoint directory has no files to push")
        for f in files:
            rel = f"{push_id}/{f.name}"
            if f.suffix == ".safetensors":
                header = _read_local_header(f)
                for name in header.tensor_names():
                    weight_map[name] = rel
                    t = header.tensor(name)
                    total += t.end - t.start
            committed(rel, client.push_file(dataset, _join(prefix, rel), f))
    index = {
        "metadata": {"total_size": total, "format": INDEX_FORMAT},
        "weight_map": weight_map,
        "parts": parts,
    }
    client.push_bytes(dataset, _join(prefix, INDEX_NAME), json.dumps(index, indent=1).encode())
    return index


def read_checkpoint_index(client: Client, dataset: str, prefix: str) -> dict[str, Any]:
    """The index of the complete checkpoint under ``prefix``, every part it lists checked on
    the node (present, with the size and root the index records).

    Raises :class:`CheckpointNotFound` if there is no index (no checkpoint was completed
    there) and :class:`CheckpointCorrupt` if the index is malformed or the node's parts do
    not match it.
    """
    prefix = prefix.strip("/")
    try:
        raw = client.fetch(dataset, _join(prefix, INDEX_NAME), max_bytes=MAX_INDEX_BYTES)
    except errors.NotFound as e:
        raise CheckpointNotFound(
            "no complete checkpoint under this prefix (no index: none was pushed, a push did "
            "not finish, or this identity may not read it); push one with push_checkpoint",
            wire_code=e.wire_code,
        ) from e
    index = _parse_index(bytes(raw))
    for rel, part in index["parts"].items():
        try:
            st = client.stat(dataset, _join(prefix, rel))
        except errors.NotFound as e:
            raise CheckpointCorrupt("a part the checkpoint index lists is not on the node") from e
        if (st.size, st.root) != (part["size"], part["root"]):
            raise CheckpointCorrupt(
                "a part of the checkpoint differs from what its index records (replaced "
                "after the push); push the checkpoint again"
            )
    return index


def load_checkpoint(
    client: Client,
    dataset: str,
    prefix: str,
    *,
    framework: Framework = "numpy",
    writable: bool = False,
) -> dict[str, Any]:
    """Every tensor of the complete checkpoint under ``prefix``, by its index (checked as
    :func:`read_checkpoint_index` does): each shard pulled whole and verified, the tensors
    views of the pulled bytes (as :func:`read_tensor` returns them)."""
    prefix = prefix.strip("/")
    index = read_checkpoint_index(client, dataset, prefix)
    out: dict[str, Any] = {}
    for rel in sorted(set(index["weight_map"].values())):
        size = index["parts"][rel]["size"]
        buf = client.fetch(dataset, _join(prefix, rel), max_bytes=size)
        if len(buf) != size:
            raise CheckpointCorrupt("a shard changed size between its check and its pull")
        view = memoryview(buf)
        if size < 8:
            raise InvalidSafetensors("not safetensors: shorter than the 8-byte header length")
        n = int.from_bytes(view[:8], "little")
        _check_length(n, size)
        header = _parse_header(bytes(view[8 : 8 + n]), 8 + n, size, index["parts"][rel]["root"])
        for name in header.tensor_names():
            if index["weight_map"].get(name) != rel:
                continue
            info = header.tensor(name)
            _check_dtype(info.dtype, framework)
            out[name] = _as_tensor(view[info.start : info.end], info, framework, writable)
    missing = set(index["weight_map"]) - set(out)
    if missing:
        raise CheckpointCorrupt(f"{len(missing)} tensors of the index are in none of its shards")
    return out


# -- dtypes --------------------------------------------------------------------------------

# Bits per element of every safetensors dtype.
_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
    "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

# numpy's names, little-endian as the files are.
_NUMPY = {
    "BOOL": "?", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4", "I64": "<i8", "U64": "<u8", "F64": "<f8",
    "C64": "<c8",
}  # fmt: skip

# torch's names (attributes of the torch module).
_TORCH = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip


def _check_dtype(dtype: str, framework: Framework) -> None:
    if framework == "numpy":
        if dtype not in _NUMPY:
            hint = " (use framework='torch')" if dtype in _TORCH else ""
            raise UnsupportedDtype(f"numpy has no dtype for safetensors {dtype}{hint}")
    elif framework == "torch":
        import torch

        if getattr(torch, _TORCH.get(dtype, ""), None) is None:
            raise UnsupportedDtype(f"this torch has no dtype for safetensors {dtype}")
    else:
        raise ValueError(f"framework is 'numpy' or 'torch', not {framework!r}")


def _as_tensor(data: Any, info: TensorInfo, framework: Framework, writable: bool) -> Any:
    """A view of ``data`` (a buffer of exactly the tensor's bytes) as the framework's array."""
    if framework == "numpy":
        import numpy as np

        arr = np.frombuffer(data, dtype=np.dtype(_NUMPY[info.dtype])).reshape(info.shape)
        return arr.copy() if writable else arr
    import torch

    dtype = getattr(torch, _TORCH[info.dtype])
    if info.end == info.start:
        return torch.empty(info.shape, dtype=dtype)  # frombuffer refuses empty buffers
    with warnings.catch_warnings():
        # torch has no read-only tensors and warns that the buffer is not writable; the
        # module's docs tell callers not to write (or to ask for writable=True).
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        t = torch.frombuffer(data, dtype=dtype).reshape(info.shape)
    return t.clone() if writable else t


# -- headers -------------------------------------------------------------------------------


def _check_length(n: int, size: int) -> None:
    if n > MAX_HEADER_BYTES:
        raise InvalidSafetensors(
            f"not safetensors: a header of {n} bytes is over the limit ({MAX_HEADER_BYTES})"
        )
    if n < 2 or 8 + n > size:
        raise InvalidSafetensors(
            f"not safetensors: a header length of {n} bytes does not fit an object of {size}"
        )


def _parse_header(raw: bytes, data_start: int, size: int, root: str | None) -> SafetensorsHeader:
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidSafetensors(f"not safetensors: the header is not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise InvalidSafetensors("not safetensors: the header is not a JSON object")
    data_bytes = size - data_start
    for name, e in parsed.items():
        if name == "__metadata__":
            if not isinstance(e, dict):
                raise InvalidSafetensors("not safetensors: __metadata__ is not an object")
            continue
        if not isinstance(e, dict):
            raise InvalidSafetensors(f"not safetensors: tensor {name!r} is not an object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in _BITS:
            raise InvalidSafetensors(f"not safetensors: tensor {name!r} has dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_uint(d) for d in shape):
            raise InvalidSafetensors(f"not safetensors: tensor {name!r} has a bad shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_uint(o) for o in offsets)
            or not offsets[0] <= offsets[1] <= data_bytes
        ):
            raise InvalidSafetensors(
                f"not safetensors: tensor {name!r} has offsets outside the object"
            )
        if (offsets[1] - offsets[0]) * 8 != -(-prod(shape) * _BITS[dtype] // 8) * 8:
            raise InvalidSafetensors(
                f"not safetensors: tensor {name!r} has {offsets[1] - offsets[0]} bytes "
                f"for its shape and dtype"
            )
    header = SafetensorsHeader(parsed)
    header.data_start, header.object_size, header.root = data_start, size, root
    return header


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _read_local_header(path: Path) -> SafetensorsHeader:
    size = path.stat().st_size
    with path.open("rb") as f:
        if size < 8:
            raise InvalidSafetensors("not safetensors: shorter than the 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        _check_length(n, size)
        return _parse_header(f.read(n), 8 + n, size, None)


# -- checkpoints ---------------------------------------------------------------------------


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _nbytes(v: Any) -> int:
    if hasattr(v, "nbytes") and not _is_torch(v):
        return int(v.nbytes)
    return int(v.numel() * v.element_size())


def _is_torch(v: Any) -> bool:
    return type(v).__module__.startswith("torch")


def _plan_shards(state_dict: Mapping[str, Any], max_shard_bytes: int) -> list[list[str]]:
    """Names in order, cut into shards of at most ``max_shard_bytes`` (a larger tensor gets a
    shard of its own)."""
    if not state_dict:
        raise ValueError("the state_dict is empty: nothing to push")
    shards: list[list[str]] = [[]]
    filled = 0
    for name, v in state_dict.items():
        n = _nbytes(v)
        if shards[-1] and filled + n > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += n
    return shards


def _serialize(shard: Mapping[str, Any]) -> bytes:
    """A shard as safetensors bytes, by the safetensors package (its torch writer if any
    tensor is torch's, numpy arrays then converted without a copy)."""
    if any(_is_torch(v) for v in shard.values()):
        import torch
        from safetensors.torch import save as save_torch

        tensors = {
            k: (v if _is_torch(v) else torch.from_numpy(v)).contiguous() for k, v in shard.items()
        }
        return save_torch(tensors, metadata={"format": "pt"})
    from safetensors.numpy import save as save_numpy

    return save_numpy(dict(shard))


def _parse_index(raw: bytes) -> dict[str, Any]:
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointCorrupt("the checkpoint index is not JSON") from None
    ok = (
        isinstance(index, dict)
        and isinstance(index.get("metadata"), dict)
        and index["metadata"].get("format") == INDEX_FORMAT
        and isinstance(index.get("weight_map"), dict)
        and isinstance(index.get("parts"), dict)
        and all(
            isinstance(p, dict) and _uint(p.get("size")) and isinstance(p.get("root"), str)
            for p in index["parts"].values()
        )
        and all(rel in index["parts"] for rel in index["weight_map"].values())
    )
    if not ok:
        raise CheckpointCorrupt(
            f"the checkpoint index is not one push_checkpoint writes ({INDEX_FORMAT})"
        )
    return index
