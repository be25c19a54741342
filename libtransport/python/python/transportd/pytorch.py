"""PyTorch datasets over a node's objects: :class:`ShardDataset` streams shards to every rank
and DataLoader worker exactly once per epoch, resumable mid-epoch; :class:`ObjectDataset`
fetches objects by index.

>>> from torch.utils.data import DataLoader
>>> from transportd.pytorch import Connection, ShardDataset
>>> conn = Connection("storage-0:7443", identity="gpu-id/")  # doctest: +SKIP
>>> shards = ShardDataset(conn, [("scans", "train/")], seed=7)  # doctest: +SKIP
>>> for epoch in range(10):  # doctest: +SKIP
...     shards.set_epoch(epoch)
...     for sample in DataLoader(shards, batch_size=None, num_workers=4):
...         ...  # sample.dataset, sample.object, sample.data (a uint8 tensor)

**Connections.** A :class:`Connection` holds what :class:`~transportd.Client` is made from
(it pickles); each process connects on first use and keeps one client per connection, so
DataLoader workers (forked or spawned) each make their own: a client never crosses a fork.

**The epoch's order.** The objects are listed once, when the dataset is made, and sorted by
(dataset, object). Each epoch shuffles that list with a generator seeded by ``(seed,
epoch)`` (Python's ``random.Random``: the same order on every machine, for any torch
version), or keeps it with ``shuffle=False``. :meth:`ShardDataset.set_epoch` changes the
epoch, as ``DistributedSampler.set_epoch`` does: call it before each epoch.

**Splitting.** The shuffled list is dealt round-robin to the ranks (``rank::world_size``),
and each rank's share round-robin to its DataLoader workers. The rank comes from
``torch.distributed`` when it is initialised, else from the ``RANK`` and ``WORLD_SIZE``
environment variables (as ``torchrun`` sets them), else 0 of 1; the worker from
``torch.utils.data.get_worker_info()``. Every object is yielded exactly once per epoch
across all ranks and workers. When the count does not divide evenly, nothing is dropped and
nothing repeated: the shares differ by one object (``DistributedSampler`` instead pads with
repeats, or drops with ``drop_last``). So ranks may see one batch more than others: a DDP
loop that needs equal steps wraps its loop in ``torch.distributed.algorithms.join.Join``
or stops at the smallest share.

**Samples.** Each object is fetched whole, verified, straight into a new tensor's memory
(no copy). Without ``decode`` a sample is a :class:`Sample` ``(dataset, object, data)``
whose ``data`` is that 1-D ``torch.uint8`` tensor; give the DataLoader ``batch_size=None``
(or a ``collate_fn``) when objects differ in size. ``decode(dataset, object, buffer)``
turns the bytes into a sample instead; ``buffer`` is a writable ``memoryview`` of the
tensor's memory (``torch.frombuffer``, ``numpy.frombuffer`` and ``io.BytesIO`` take it
without a copy) and stays valid after ``decode`` returns.

**Prefetch.** ``prefetch=N`` (default 2) fetches up to N objects ahead of the one being
yielded, in a background thread of each worker (one more may be in flight); 0 fetches
inline. The network work releases the GIL.

**Errors.** They surface as the typed exceptions of :mod:`transportd.errors`, out of the
DataLoader too: an object that fails verification raises
:class:`~transportd.errors.Corrupt` and yields no sample; an object this identity may not
read raises :class:`~transportd.errors.NotFound`.

**Resuming mid-epoch.** :meth:`ShardDataset.state_dict` records the seed, the epoch, a
fingerprint of the listing, and which objects (by index into the sorted list, as
compressed bitmaps) are done: done before the rank split, done within this rank before the
worker split, and yielded by this copy since. An object counts as yielded when it is handed
out, so prefetched objects are not. Three ways to resume:

* *Same world size and number of workers*: under ``torchdata``'s ``StatefulDataLoader``,
  ``loader.load_state_dict(saved)``; each worker gets its own copy's state back and
  continues its own share.
* *Another number of workers* (``StatefulDataLoader`` refuses that with an
  ``AssertionError``): give the loader's state to the dataset,
  ``dataset.load_state_dict(saved)``, and make a new loader without loading a state into
  it. The dataset merges its workers' states and deals this rank's remaining objects to
  the new workers. A later ``loader.state_dict()`` of that run resumes as usual.
* *Another world size*: merge the saved states of every rank with :func:`merge_states`
  and load the result into each rank's dataset; the remaining objects are dealt afresh.

Without ``torchdata``: iterate the dataset (or a DataLoader with ``num_workers=0``), call
the dataset's own :meth:`~ShardDataset.state_dict`, and later ``load_state_dict`` it;
:meth:`ShardDataset.remaining` lists what is left. With ``persistent_workers=True`` the
workers keep their copies, so ``set_epoch`` on the main process's does not reach them: use
the default ``persistent_workers=False``.

**Caching.** ``cache=Cache(dir, max_bytes)`` (or ``cache=dir, cache_bytes=...``) serves
objects from a node-local cache shared by every worker and rank of the machine, verified
against the node's root on every use (:mod:`transportd.cache`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import queue
import random
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ._client import Client
from .cache import Cache
from .errors import TooLarge

__all__ = ["Connection", "ObjectDataset", "Sample", "ShardDataset", "merge_states"]

_log = logging.getLogger("transportd.pytorch")

Decode = Callable[[str, str, memoryview], Any]
"""``decode(dataset, object, buffer) -> sample``."""

_FORMAT = "transportd.ShardDataset/1"


@dataclass(frozen=True)
class Connection:
    """How to reach a node: :class:`~transportd.Client`'s arguments, picklable.

    :meth:`client` gives this process's client for it, connecting on first use.

    ``sidecar=True`` goes through this machine's sidecar instead (its socket from
    ``$TRANSPORTD_SIDECAR_SOCKET``), ``sidecar="/path/to.sock"`` through the one at that
    socket (:meth:`transportd.Client.sidecar`): ``node``, if not empty, then names the
    sidecar's storage node to ask, and the identity arguments are not used.
    """

    node: str
    identity: str | os.PathLike[str] | None = None
    svid: str | os.PathLike[str] | None = None
    key: str | os.PathLike[str] | None = None
    bundle: str | os.PathLike[str] | None = None
    workload_socket: str | None = None
    workload_id: str | None = None
    server_id: str | None = None
    path: Literal["auto", "quic", "tcp"] = "auto"
    connect_timeout: float | None = None
    sidecar: bool | str | os.PathLike[str] = False

    def __post_init__(self) -> None:
        for name in ("identity", "svid", "key", "bundle"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        if not isinstance(self.sidecar, bool):
            object.__setattr__(self, "sidecar", os.fspath(self.sidecar))

    def client(self) -> Client:
        """This process's client for the connection (made on first use, then kept)."""
        with _clients_lock:
            client = _clients.get(self)
            if client is None and self.sidecar is not False:
                socket = None if self.sidecar is True else self.sidecar
                client = Client.sidecar(socket, node=self.node or None)
                _clients[self] = client
            elif client is None:
                client = Client(
                    self.node,
                    identity=self.identity,
                    svid=self.svid,
                    key=self.key,
                    bundle=self.bundle,
                    workload_socket=self.workload_socket,
                    workload_id=self.workload_id,
                    server_id=self.server_id,
                    path=self.path,
                    connect_timeout=self.connect_timeout,
                )
                _clients[self] = client
            return client


class Sample(NamedTuple):
    """An object as a :class:`ShardDataset` or :class:`ObjectDataset` yields it by
    default."""

    dataset: str
    object: str
    data: torch.Tensor
    """The object's bytes: a 1-D ``torch.uint8`` tensor."""


class ShardDataset(IterableDataset[Any]):
    """The objects of ``sources`` (``(dataset, prefix)`` pairs, listed now) and ``objects``
    (``(dataset, object)`` pairs), each yielded once per epoch across all ranks and
    DataLoader workers, in a seeded order that changes with the epoch. See the module's
    notes for the splitting, the samples, prefetching and resuming.

    ``rank`` and ``world_size`` override where this process's rank is read from.
    """

    def __init__(
        self,
        connection: Connection,
        sources: Sequence[tuple[str, str]] = (),
        *,
        objects: Sequence[tuple[str, str]] = (),
        shuffle: bool = True,
        seed: int = 0,
        prefetch: int = 2,
        decode: Decode | None = None,
        cache: Cache | str | os.PathLike[str] | None = None,
        cache_bytes: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if prefetch < 0:
            raise ValueError("prefetch must be 0 or more")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.connection = connection
        self.shuffle = shuffle
        self.seed = seed
        self.prefetch = prefetch
        self.decode = decode
        self.cache = _as_cache(cache, cache_bytes)
        self.epoch = 0
        self._pinned = None if rank is None or world_size is None else (rank, world_size)
        self._captured: tuple[int, int] | None = None
        sizes: dict[tuple[str, str], int | None] = {}
        if sources:
            client = connection.client()
            for dataset, prefix in sources:
                for entry in client.list_objects(dataset, prefix):
                    sizes[(dataset, entry.path)] = entry.size
        for dataset, object in objects:
            sizes.setdefault((dataset, object), None)
        self._items = [(d, o, size) for (d, o), size in sorted(sizes.items())]
        self._listing = _fingerprint([(d, o) for d, o, _ in self._items])
        if not self._items:
            _log.warning("the dataset has no objects: check its sources and objects")
        _log.info(
            "listed %d objects of %d datasets",
            len(self._items),
            len({d for d, _, _ in self._items}),
        )
        self._reset_progress()

    # The epoch and the split.

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch the next iteration yields: another epoch, another order (and its
        progress starts afresh; the same epoch keeps the progress a loaded state brought)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset_progress()

    @property
    def objects(self) -> list[tuple[str, str]]:
        """Every object of the dataset, ``(dataset, object)``, sorted."""
        return [(d, o) for d, o, _ in self._items]

    def __len__(self) -> int:
        """How many objects this rank has left to yield this epoch."""
        rank, world = self._rank_world()
        return len(self._remaining_of(self._state(), rank, world))

    def __iter__(self) -> Iterator[Any]:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self._complete:
            self._reset_progress()  # the previous iteration ran to its end: a new pass
        todo = _plan(self._state(), rank, world, worker, workers)
        self._split = (rank, world, worker, workers)
        _log.debug(
            "epoch %d, rank %d of %d, worker %d of %d: %d objects",
            self.epoch,
            rank,
            world,
            worker,
            workers,
            len(todo),
        )
        return self._run(todo)

    def _run(self, todo: list[int]) -> Iterator[Any]:
        # Complete once the last object is handed out (or at once if none is left), so that
        # the next iteration of this copy is a new pass, not an empty resume.
        last = todo[-1] if todo else None
        self._complete = last is None
        if self.prefetch == 0:
            for i in todo:
                yield self._hand_out(i, self._fetch(i), last)
        else:
            with _Prefetcher(self._fetch, todo, self.prefetch) as fetched:
                for i, data in fetched:
                    yield self._hand_out(i, data, last)

    def _hand_out(self, i: int, data: np.ndarray, last: int | None) -> Any:
        """The sample of object ``i``, which counts as yielded from now on."""
        sample = self._sample(i, data)
        self._yielded.add(i)
        self._complete = i == last
        return sample

    def _fetch(self, i: int) -> np.ndarray:
        dataset, object, size = self._items[i]
        return _load(self.connection.client(), self.cache, dataset, object, size)

    def _sample(self, i: int, data: np.ndarray) -> Any:
        dataset, object, _ = self._items[i]
        if self.decode is not None:
            return self.decode(dataset, object, memoryview(data))
        return Sample(dataset, object, _tensor(data))

    def _rank_world(self) -> tuple[int, int]:
        rank, world = self._pinned or self._captured or _rank_world()
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not within a world of {world}")
        return rank, world

    # Progress and state.

    def state_dict(self) -> dict[str, Any]:
        """Where this copy of the dataset is in its epoch (see the module's notes): plain
        values (str, int, bool, None), for ``torch.save`` or JSON alike."""
        state = self._state()
        return {
            "format": _FORMAT,
            "seed": self.seed,
            "epoch": self.epoch,
            "shuffle": self.shuffle,
            "count": len(self._items),
            "listing": self._listing,
            "world_done": state.world_done.encode(),
            "world": state.world,
            "rank": state.rank,
            "rank_done": state.rank_done.encode(),
            "workers": state.workers,
            "worker": state.worker,
            "yielded": state.yielded.encode(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from a state: one of :meth:`state_dict`, a ``StatefulDataLoader``'s
        whole state, or :func:`merge_states`' result. In the main process the state is
        merged to this rank's (:func:`merge_states`), so the remaining objects can be dealt
        to any number of workers; in a DataLoader worker (where ``StatefulDataLoader`` gives
        each worker its own state back) a worker's state continues that worker's share.
        The state brings its seed, epoch and shuffle; its listing must be this dataset's."""
        found = _find_states(state)
        if not found:
            raise ValueError("no ShardDataset state in what was given")
        if get_worker_info() is not None and len(found) == 1:
            one = found[0]  # a worker's own state, handed back by StatefulDataLoader
        else:
            one = merge_states(found)
        if one["count"] != len(self._items) or one["listing"] != self._listing:
            raise ValueError(
                f"the state is of a listing of {one['count']} objects; this dataset lists "
                f"{len(self._items)}, or others: resume over the same objects"
            )
        self.seed, self.epoch, self.shuffle = one["seed"], one["epoch"], one["shuffle"]
        n = len(self._items)
        self._world_done = _Bits.decode(one["world_done"], n)
        self._rank_done = _Bits.decode(one["rank_done"], n)
        self._yielded = _Bits.decode(one["yielded"], n)
        self._loaded_split = (one["world"], one["rank"], one["workers"], one["worker"])
        self._split = None
        self._complete = False

    def remaining(self, state: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
        """The objects not yet yielded, in the epoch's order: of this dataset's own state,
        or of ``state`` (a state or a loader's, merged as :meth:`load_state_dict` does). For
        a state of one rank, the objects of that rank's share; for one merged over all
        ranks, all of them."""
        if state is None:
            st = self._state()
        else:
            st = _State.of(merge_states([state]))
        order = _order(st.count, st.seed, st.epoch, st.shuffle)
        if st.world is None or st.rank is None:
            done = st.world_done | st.rank_done | st.yielded
            left = [i for i in order if i not in done]
        else:
            left = self._remaining_of(st, st.rank, st.world)
        return [(self._items[i][0], self._items[i][1]) for i in left]

    def _remaining_of(self, st: _State, rank: int, world: int) -> list[int]:
        """This rank's share less what is done, whichever worker did it."""
        if st.world is not None and (st.world, st.rank) != (world, rank) and st.progressed():
            raise _world_mismatch(st, rank, world)
        order = _order(st.count, st.seed, st.epoch, st.shuffle)
        share = [i for i in order if i not in st.world_done][rank::world]
        done = st.rank_done | st.yielded
        return [i for i in share if i not in done]

    def _state(self) -> _State:
        world, rank, workers, worker = self._loaded_split
        if self._split is not None:
            rank, world, worker, workers = self._split
        return _State(
            count=len(self._items),
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            world_done=self._world_done,
            rank_done=self._rank_done,
            yielded=self._yielded,
            world=world,
            rank=rank,
            workers=workers,
            worker=worker,
        )

    def _reset_progress(self) -> None:
        n = len(self._items)
        self._world_done = _Bits(n)
        self._rank_done = _Bits(n)
        self._yielded = _Bits(n)
        self._loaded_split: tuple[int | None, int | None, int | None, int | None] = (None,) * 4
        self._split: tuple[int, int, int, int] | None = None
        self._complete = False

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into spawned workers: they may not see torch.distributed initialised, so
        # they take the rank the main process has now.
        state = dict(vars(self))
        if self._pinned is None:
            state["_captured"] = _rank_world()
        return state

    def __repr__(self) -> str:
        return f"<transportd.pytorch.ShardDataset of {len(self._items)} objects>"


class ObjectDataset(Dataset[Any]):
    """A map-style dataset over ``(dataset, object)`` pairs: ``dataset[i]`` fetches the
    i-th, verified, as a :class:`Sample` (or what ``decode`` makes of it), through
    ``cache`` if given. Each process connects on first use; a DataLoader's sampler decides
    the order and the split (e.g. ``DistributedSampler``)."""

    def __init__(
        self,
        connection: Connection,
        objects: Sequence[tuple[str, str]],
        *,
        decode: Decode | None = None,
        cache: Cache | str | os.PathLike[str] | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        self.connection = connection
        self.objects = [(d, o) for d, o in objects]
        self.decode = decode
        self.cache = _as_cache(cache, cache_bytes)

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, index: int) -> Any:
        dataset, object = self.objects[index]
        data = _load(self.connection.client(), self.cache, dataset, object, None)
        if self.decode is not None:
            return self.decode(dataset, object, memoryview(data))
        return Sample(dataset, object, _tensor(data))

    def __repr__(self) -> str:
        return f"<transportd.pytorch.ObjectDataset of {len(self.objects)} objects>"


def merge_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One state from several of one epoch: the states of a rank's workers (or a
    ``StatefulDataLoader``'s state, whose workers' states are found inside) merge into the
    rank's, whose remaining objects can be dealt to any number of workers; the states of
    *every* rank merge into one whose remaining objects can be dealt to any world size.

    Refuses a merge that lacks a worker or a rank whose progress the others depend on."""
    found = [s for state in states for s in _find_states(state)]
    if not found:
        raise ValueError("no ShardDataset state in what was given")
    first = found[0]
    for s in found[1:]:
        for key in ("seed", "epoch", "shuffle", "count", "listing"):
            if s[key] != first[key]:
                raise ValueError(f"the states differ in {key}: merge states of one epoch")
    n = first["count"]
    world_done = _Bits(n)
    by_rank: dict[tuple[int | None, int | None], list[_State]] = {}
    for st in map(_State.of, found):
        world_done |= st.world_done
        by_rank.setdefault((st.world, st.rank), []).append(st)
    done: dict[tuple[int | None, int | None], _Bits] = {}
    for key, group in by_rank.items():
        _check_workers(group)
        done[key] = _Bits(n)
        for st in group:
            done[key] |= st.rank_done
            done[key] |= st.yielded
    merged = dict(first)
    merged.update(workers=None, worker=None, yielded=_Bits(n).encode())
    ranks = [key for key in by_rank if key != (None, None)]
    if len(ranks) <= 1:
        rank_done = _Bits(n)
        for bits in done.values():
            rank_done |= bits
        world, rank = ranks[0] if ranks else (None, None)
        merged.update(world=world, rank=rank, rank_done=rank_done.encode())
    else:
        worlds = {w for w, _ in ranks}
        have = {r for _, r in ranks}
        world = next(iter(worlds)) if len(worlds) == 1 else None
        if world is None or have != set(range(world)):
            raise ValueError(
                f"states of ranks {sorted(have, key=str)} of worlds {sorted(worlds, key=str)}: "
                "merge the states of every rank of one world"
            )
        for bits in done.values():
            world_done |= bits
        merged.update(world=None, rank=None, rank_done=_Bits(n).encode())
    merged["world_done"] = world_done.encode()
    return merged


def _check_workers(group: list[_State]) -> None:
    """A rank's states must include every worker of the split its progress was made in."""
    counts = {st.workers for st in group if st.yielded.any()}
    if not counts:
        return
    if len(counts) > 1:
        raise ValueError("states of one rank from splits into different numbers of workers")
    workers = counts.pop()
    have = {st.worker for st in group if st.workers == workers}
    if workers is None or have != set(range(workers)):
        raise ValueError(
            f"states of workers {sorted(have, key=str)} of {workers}: give the loader's whole "
            "state (every worker's)"
        )


# The plan: what one rank's worker yields.


@dataclass(frozen=True)
class _State:
    count: int
    seed: int
    epoch: int
    shuffle: bool
    world_done: _Bits
    rank_done: _Bits
    yielded: _Bits
    world: int | None
    rank: int | None
    workers: int | None
    worker: int | None

    @staticmethod
    def of(state: Mapping[str, Any]) -> _State:
        n = state["count"]
        return _State(
            count=n,
            seed=state["seed"],
            epoch=state["epoch"],
            shuffle=state["shuffle"],
            world_done=_Bits.decode(state["world_done"], n),
            rank_done=_Bits.decode(state["rank_done"], n),
            yielded=_Bits.decode(state["yielded"], n),
            world=state["world"],
            rank=state["rank"],
            workers=state["workers"],
            worker=state["worker"],
        )

    def progressed(self) -> bool:
        """Whether anything was done within a rank's share."""
        return self.rank_done.any() or self.yielded.any()


def _plan(st: _State, rank: int, world: int, worker: int, workers: int) -> list[int]:
    """The objects worker ``worker`` of ``workers`` of rank ``rank`` of ``world`` yields:
    the epoch's order less what was done before the rank split, dealt to the ranks; this
    rank's share less what its workers did before the worker split, dealt to the workers;
    this worker's share less what it yielded since."""
    if st.progressed() and st.world is not None and (st.world, st.rank) != (world, rank):
        raise _world_mismatch(st, rank, world)
    if st.yielded.any() and (st.workers, st.worker) != (workers, worker):
        raise ValueError(
            f"this state is worker {st.worker} of {st.workers}'s, and this is worker {worker} "
            f"of {workers}: to resume with another number of workers, give the loader's "
            "whole state to dataset.load_state_dict() and use a new loader"
        )
    order = _order(st.count, st.seed, st.epoch, st.shuffle)
    share = [i for i in order if i not in st.world_done][rank::world]
    left = [i for i in share if i not in st.rank_done][worker::workers]
    return [i for i in left if i not in st.yielded]


def _world_mismatch(st: _State, rank: int, world: int) -> ValueError:
    return ValueError(
        f"this state is rank {st.rank} of {st.world}'s, and this is rank {rank} of {world}: "
        "to resume with another world size, merge every rank's state with merge_states()"
    )


def _order(count: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's order of the sorted objects' indices."""
    order = list(range(count))
    if shuffle:
        mixed = hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=8).digest()
        # An order, not a secret: Python's generator gives the same on every machine.
        random.Random(int.from_bytes(mixed, "big")).shuffle(order)  # noqa: S311
    return order


class _Bits:
    """A set of object indices as a bitmap; encoded as base64 of its zlib compression."""

    __slots__ = ("_b",)

    def __init__(self, n: int, data: bytes | None = None) -> None:
        self._b = bytearray(data) if data is not None else bytearray((n + 7) // 8)

    @staticmethod
    def decode(text: str, n: int) -> _Bits:
        data = zlib.decompress(base64.b64decode(text))
        if len(data) != (n + 7) // 8:
            raise ValueError("a ShardDataset state's bitmap does not fit its object count")
        return _Bits(n, data)

    def encode(self) -> str:
        return base64.b64encode(zlib.compress(bytes(self._b))).decode()

    def add(self, i: int) -> None:
        self._b[i >> 3] |= 1 << (i & 7)

    def __contains__(self, i: int) -> bool:
        return bool(self._b[i >> 3] & (1 << (i & 7)))

    def any(self) -> bool:
        return any(self._b)

    def __or__(self, other: _Bits) -> _Bits:
        return _Bits(0, bytes(a | b for a, b in zip(self._b, other._b, strict=True)))

    def __ior__(self, other: _Bits) -> _Bits:
        for k, b in enumerate(other._b):
            self._b[k] |= b
        return self


def _find_states(state: Any) -> list[dict[str, Any]]:
    """Our states in ``state``: itself, or those nested in a loader's state (a
    ``StatefulDataLoader`` keeps each worker's under ``dataset_state``)."""
    if isinstance(state, Mapping):
        if state.get("format") == _FORMAT:
            return [dict(state)]
        return [s for v in state.values() for s in _find_states(v)]
    return []


def _fingerprint(objects: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for dataset, object in objects:
        h.update(f"{dataset}\0{object}\0".encode())
    return h.hexdigest()


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# Fetching.


def _load(
    client: Client, cache: Cache | None, dataset: str, object: str, size: int | None
) -> np.ndarray:
    """The object's bytes, verified, in a new uint8 array: through the cache, or pulled
    straight into the array (no copy)."""
    if cache is not None:
        return cache.read(client, dataset, object, into=_empty)
    if size is None:
        size = client.stat(dataset, object).size
    data = _empty(size)
    try:
        got = len(client.fetch_into(dataset, object, data))
    except TooLarge:  # it grew since it was listed
        data = _empty(client.stat(dataset, object).size)
        got = len(client.fetch_into(dataset, object, data))
    return data if got == len(data) else data[:got].copy()


def _empty(size: int) -> np.ndarray:
    """A new uint8 array whose memory is a tensor's: in a DataLoader worker, a tensor in
    shared memory already, so handing the sample to the training process moves only a
    handle (a tensor in ordinary memory would be copied into shared memory on the way)."""
    t = torch.empty(size, dtype=torch.uint8)
    if size and get_worker_info() is not None:
        t.share_memory_()
    return t.numpy()


def _tensor(data: np.ndarray) -> torch.Tensor:
    """``data`` as a tensor without a copy: the tensor ``_empty`` made it from, if it is one
    (keeping its shared memory), else a view of the array."""
    base = data.base
    if (
        isinstance(base, torch.Tensor)
        and base.dtype == torch.uint8
        and base.dim() == 1
        and base.numel() == data.size
        and base.data_ptr() == data.ctypes.data
    ):
        return base
    return torch.from_numpy(data)


def _as_cache(cache: Cache | str | os.PathLike[str] | None, max_bytes: int | None) -> Cache | None:
    if cache is None or isinstance(cache, Cache):
        if max_bytes is not None:
            raise ValueError("cache_bytes goes with a cache directory, not a Cache")
        return cache
    if max_bytes is None:
        raise ValueError("a cache directory needs cache_bytes, its budget")
    return Cache(cache, max_bytes)


class _Prefetcher:
    """Fetches ``todo`` in a background thread, at most ``depth`` ahead of the consumer.
    Iterating yields ``(index, data)`` in order and raises what a fetch raised."""

    _END = object()

    def __init__(self, fetch: Callable[[int], np.ndarray], todo: list[int], depth: int) -> None:
        self._fetch = fetch
        self._todo = todo
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="transportd-prefetch", daemon=True)

    def __enter__(self) -> _Prefetcher:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()  # the thread stops after the fetch in flight
        self._thread.join()

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            i, data, error = item
            if error is not None:
                raise error
            yield i, data

    def _work(self) -> None:
        for i in self._todo:
            if self._stop.is_set():
                return
            try:
                item = (i, self._fetch(i), None)
            except BaseException as e:  # handed to the consumer, which raises it
                item = (i, None, e)
            if not self._put(item) or item[2] is not None:
                return
        self._put(self._END)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


# One client per connection and process. A forked child (a DataLoader worker) starts with
# none: its parent's clients refuse to run in it; they are kept, never dropped, as the
# runtime they belong to lives in the parent.
_clients: dict[Connection, Client] = {}
_clients_lock = threading.Lock()
_inherited: list[Client] = []


def _after_fork_in_child() -> None:
    global _clients_lock
    _inherited.extend(_clients.values())
    _clients.clear()
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
