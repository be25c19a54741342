"""The PyTorch datasets against a real node, with real torch (CPU) and torchdata: every
object once per epoch across ranks and workers, resuming mid-epoch with another worker
count, zero-copy tensors, and errors out of the DataLoader.

The ranks and the resumed job run as processes of their own (tests/torch_job.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_client import leaks
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

import transportd
from conftest import TD, Node, Site, random_bytes
from transportd import errors
from transportd.cache import Cache
from transportd.pytorch import Connection, ObjectDataset, Sample, ShardDataset, merge_states

JOB = Path(__file__).with_name("torch_job.py")
# Two sources, 31 objects: not a multiple of 2 ranks x 2 workers (nor of 3 workers).
SOURCES = [("scans", "shards-a/"), ("checkpoints", "shards-b/")]
COUNTS = {"scans": 17, "checkpoints": 14}

Objects = dict[tuple[str, str], bytes]

# torch's advice for this two-core machine, and torchdata's own use of a deprecated call.
pytestmark = [
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning"),
]


@pytest.fixture(scope="module")
def shards(site: Site) -> Objects:
    """A multi-shard dataset: objects of 1 to 8 KiB, of varying sizes, in two datasets."""
    objects = {}
    for k, ((dataset, prefix), count) in enumerate(zip(SOURCES, COUNTS.values(), strict=True)):
        for i in range(count):
            name = f"{prefix}shard-{i:03d}.bin"
            data = random_bytes(1024 + (i * 733 + k * 311) % 7168, 100 * k + i)
            site.write(f"{dataset}/{name}", data)
            objects[(dataset, name)] = data
    return objects


@pytest.fixture(scope="module")
def conn(site: Site, node: Node) -> Connection:
    return Connection(node.quic, identity=site.identity("loader"), path="quic")


def job(params: dict[str, Any], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(JOB), json.dumps(params)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> None:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"job failed:\n{out}\n{err}"


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_ranks_of_two_workers_yield_every_object_once_per_epoch(
    site: Site, node: Node, shards: Objects, tmp_path: Path
) -> None:
    base = {
        "job": "epochs",
        "node": node.quic,
        "identity": str(site.identity("loader")),
        "sources": SOURCES,
        "seed": 5,
        "workers": 2,
        # Epochs 0 and 1; then epoch 0 again with a new dataset object.
        "runs": [[0, 0], [0, 1], [1, 0]],
    }
    procs = [
        job({**base, "out": str(tmp_path / f"rank-{r}.jsonl")}, {"RANK": str(r), "WORLD_SIZE": "2"})
        for r in range(2)
    ]
    for p in procs:
        finish(p)
    seen = {r: lines(tmp_path / f"rank-{r}.jsonl") for r in range(2)}

    def order(rank: int, run: int, epoch: int) -> list[tuple[str, str]]:
        return [
            (s["dataset"], s["object"])
            for s in seen[rank]
            if (s["run"], s["epoch"]) == (run, epoch)
        ]

    for run, epoch in base["runs"]:
        got = [s for r in range(2) for s in seen[r] if (s["run"], s["epoch"]) == (run, epoch)]
        # Every object exactly once across ranks and workers, byte-identical.
        assert Counter((s["dataset"], s["object"]) for s in got) == Counter(shards.keys())
        for s in got:
            assert bytes.fromhex(s["data"]) == shards[(s["dataset"], s["object"])]
        # Both ranks and both workers of each did work, in shares that differ by at most one.
        sizes = [len(order(r, run, epoch)) for r in range(2)]
        assert sorted(sizes) == [15, 16], sizes
        for r in range(2):
            workers = Counter(
                s["worker"] for s in seen[r] if (s["run"], s["epoch"]) == (run, epoch)
            )
            assert set(workers) == {0, 1}
            assert max(workers.values()) - min(workers.values()) <= 1
    for r in range(2):
        # The same seed and epoch give the same order, in another dataset object...
        assert order(r, 0, 0) == order(r, 1, 0)
        # ...and another epoch another one, not merely another split of the same order.
        assert order(r, 0, 0) != order(r, 0, 1)
    assert set(order(0, 0, 0)) != set(order(0, 0, 1))


def test_a_state_saved_mid_epoch_resumes_with_another_worker_count(
    site: Site, node: Node, shards: Objects, tmp_path: Path
) -> None:
    base = {
        "node": node.quic,
        "identity": str(site.identity("loader")),
        "sources": SOURCES,
        "seed": 11,
        "epoch": 3,
        "workers": 2,
        "state": str(tmp_path / "loader-state.pt"),
    }
    finish(job({**base, "job": "stop", "take": 9, "out": str(tmp_path / "before.jsonl")}))
    finish(job({**base, "job": "resume", "other_workers": 3, "out": str(tmp_path / "after.jsonl")}))
    before = [(s["dataset"], s["object"]) for s in lines(tmp_path / "before.jsonl")]
    assert len(before) == len(set(before)) == 9
    after = lines(tmp_path / "after.jsonl")
    remaining = {tuple(o) for o in after.pop()["remaining"]}
    assert remaining == set(shards) - set(before)
    for how in ("other", "same"):
        resumed = [s for s in after if s["how"] == how]
        got = [(s["dataset"], s["object"]) for s in resumed]
        # Exactly the samples not seen before the stop: none repeated, none lost.
        assert Counter(got) == Counter(remaining), how
        for s in resumed:
            assert bytes.fromhex(s["data"]) == shards[(s["dataset"], s["object"])]
    # The new worker count was used: three workers shared the rest.
    assert {s["worker"] for s in after if s["how"] == "other"} == {0, 1, 2}


def test_a_resumed_run_saves_and_resumes_again(conn: Connection, shards: Objects) -> None:
    def take(loader: StatefulDataLoader, n: int | None) -> tuple[list[Any], dict[str, Any]]:
        it = iter(loader)
        got = [(s.dataset, s.object) for s in itertools.islice(it, n)]
        return got, loader.state_dict()

    first = ShardDataset(conn, SOURCES, seed=8)
    first.set_epoch(1)
    seen, state = take(StatefulDataLoader(first, batch_size=None, num_workers=2), 7)
    # Two workers to three, through the dataset; the new run saves a state of its own...
    second = ShardDataset(conn, SOURCES)
    second.load_state_dict(state)
    more, state = take(StatefulDataLoader(second, batch_size=None, num_workers=3), 9)
    seen += more
    # ...which its loader resumes, with its three workers.
    loader = StatefulDataLoader(ShardDataset(conn, SOURCES), batch_size=None, num_workers=3)
    loader.load_state_dict(state)
    rest, _ = take(loader, None)
    assert Counter(seen + rest) == Counter(shards.keys())
    assert len(seen) == 16


def test_states_merge_across_workers_and_ranks_and_resume_in_another_world(
    conn: Connection, shards: Objects
) -> None:
    def dataset(rank: int, world: int) -> ShardDataset:
        ds = ShardDataset(conn, SOURCES, seed=3, prefetch=0, rank=rank, world_size=world)
        ds.set_epoch(2)
        return ds

    # Three ranks stop part-way through their shares.
    states, seen = [], []
    for rank, take in ((0, 4), (1, 0), (2, 7)):
        ds = dataset(rank, 3)
        it = iter(ds)
        seen += [next(it).object for _ in range(take)]
        states.append(ds.state_dict())
        # The plain helper agrees with what is left of this rank's share.
        assert len(ds.remaining()) == len(ds) == [11, 10, 10][rank] - take
    # A state of another rank is refused...
    other = dataset(1, 3)
    other.load_state_dict(states[0])
    with pytest.raises(ValueError, match="rank 0 of 3"):
        iter(other)
    # ...and so is a merge that lacks a rank (its progress would be lost).
    with pytest.raises(ValueError, match="every rank"):
        merge_states([states[0], states[2]])
    # Merged, the rest is dealt to a world of two, each object once.
    merged = merge_states(states)
    rest = []
    for rank in range(2):
        ds = _loaded(dataset(rank, 2), merged)
        rest += [s.object for s in ds]
    assert len(rest) == len(set(rest)) == len(shards) - len(seen)
    assert set(rest) | set(seen) == {o for _, o in shards}
    assert {o for _, o in dataset(0, 2).remaining(merged)} == set(rest)


def _loaded(ds: ShardDataset, state: dict[str, Any]) -> ShardDataset:
    ds.load_state_dict(state)
    return ds


def test_a_plain_state_dict_resumes_without_torchdata(conn: Connection, shards: Objects) -> None:
    ds = ShardDataset(conn, SOURCES, seed=1)
    taken = []
    for batch in DataLoader(ds, batch_size=None, num_workers=0):
        taken.append(batch)
        if len(taken) == 5:
            break
    state = json.loads(json.dumps(ds.state_dict()))  # plain values: JSON round-trips
    fresh = ShardDataset(conn, SOURCES, seed=99)  # the state brings its seed and epoch
    fresh.load_state_dict(state)
    rest = list(DataLoader(fresh, batch_size=None, num_workers=2))
    rest_in_order = list(DataLoader(_loaded(ShardDataset(conn, SOURCES), state), batch_size=None))
    names = [(s.dataset, s.object) for s in taken + rest]
    assert Counter(names) == Counter(shards.keys())
    for s in taken + rest:
        assert isinstance(s, Sample)
        assert s.data.dtype == torch.uint8
        assert s.data.numpy().tobytes() == shards[(s.dataset, s.object)]
    # In the process that stopped, iterating again continues the pass; once a pass is
    # complete, the next is a whole pass in the same order; another epoch, another order.
    assert [(s.dataset, s.object) for s in ds] == [(s.dataset, s.object) for s in rest_in_order]
    whole = [(s.dataset, s.object) for s in ds]
    assert whole == [(s.dataset, s.object) for s in taken + rest_in_order]
    ds.set_epoch(1)
    other_epoch = [(s.dataset, s.object) for s in ds]
    assert Counter(other_epoch) == Counter(whole)
    assert other_epoch != whole
    # A listing that differs from the state's is refused.
    other = ShardDataset(conn, SOURCES[:1])
    with pytest.raises(ValueError, match="same objects"):
        other.load_state_dict(state)


def test_prefetch_runs_ahead_by_at_most_its_depth(
    node: Node, conn: Connection, shards: Objects
) -> None:
    names = {o for d, o in shards if d == "scans"}
    before = reads(node, names)
    ds = ShardDataset(conn, [SOURCES[0]], seed=2, prefetch=2)
    it = iter(ds)
    first = next(it)
    # One handed out, two waiting in the queue, one more fetched and waiting to be queued:
    # the thread then blocks until the consumer takes one.
    poll(lambda: reads(node, names) - before == 4)
    thread = next(t for t in threading.enumerate() if t.name == "transportd-prefetch")
    poll(lambda: "_put" in frames(thread))
    assert reads(node, names) - before == 4
    rest = list(it)
    assert sorted([first.object] + [s.object for s in rest]) == sorted(names)
    assert not thread.is_alive()
    # The control: without prefetching, nothing is fetched ahead (and no thread runs).
    before = reads(node, names)
    it = iter(ShardDataset(conn, [SOURCES[0]], seed=2, prefetch=0))
    next(it)
    assert reads(node, names) - before == 1
    assert not any(t.name == "transportd-prefetch" for t in threading.enumerate())


def reads(node: Node, names: set[str]) -> int:
    """Reads of these objects the node's audit trail records."""
    return sum(
        r["event"] == "transfer_started" and r.get("object") in names
        for r in node.audit_records(peer=f"spiffe://{TD}/gpu/loader")
    )


def frames(thread: threading.Thread) -> list[str]:
    """The functions a thread is in now, innermost first."""
    assert thread.ident is not None
    frame = sys._current_frames().get(thread.ident)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def poll(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_the_rank_comes_from_torch_distributed_when_initialised(
    conn: Connection, shards: Objects, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # The control: from the environment, rank 1 of 2 gets half.
    assert len(ShardDataset(conn, SOURCES)) == 15
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        ds = ShardDataset(conn, SOURCES)
        assert len(ds) == len(shards)
        assert len(list(ds)) == len(shards)
    finally:
        dist.destroy_process_group()


def test_fetch_into_a_tensor_and_frombuffer_make_no_copy(
    site: Site, node: Node, shards: Objects
) -> None:
    (dataset, name), data = next(iter(shards.items()))
    with transportd.Client(node.quic, identity=site.identity("loader"), path="quic") as c:
        # A tensor's memory, through numpy's view of it (torch tensors do not export the
        # buffer protocol themselves).
        t = torch.empty(len(data), dtype=torch.uint8)
        view = c.fetch_into(dataset, name, t.numpy())
        landed = np.frombuffer(view, dtype=np.uint8)
        assert landed.ctypes.data == t.data_ptr()
        assert np.shares_memory(landed, t.numpy())
        assert not np.shares_memory(landed, t.clone().numpy())  # the control: a copy shows
        assert t.numpy().tobytes() == data
        # A larger tensor of another dtype takes the object at its start.
        f = torch.zeros(len(data) // 4 + 8, dtype=torch.float32)
        c.fetch_into(dataset, name, f.numpy())
        assert f.numpy().view(np.uint8)[: len(data)].tobytes() == data

        buf = c.fetch(dataset, name)
    address = np.frombuffer(buf, dtype=np.uint8).ctypes.data  # where the Buffer's bytes are
    with pytest.warns(UserWarning, match="not writable"):  # exported read-only
        tensor = torch.frombuffer(buf, dtype=torch.uint8)
    assert address <= tensor.data_ptr() < address + len(buf)
    assert tensor.data_ptr() == address
    copied = torch.frombuffer(bytearray(buf), dtype=torch.uint8)  # the control: a copy
    assert not address <= copied.data_ptr() < address + len(buf)
    assert tensor.numpy().tobytes() == data
    # Pinned (page-locked) tensors as fetch_into targets need CUDA, which this machine
    # lacks: torch.empty(..., pin_memory=True) raises without a CUDA driver. Not tested here.


def test_a_corrupted_object_raises_corrupt_out_of_the_dataloader(
    site: Site, conn: Connection
) -> None:
    names = [f"rot/obj-{i}.bin" for i in range(6)]
    blobs = {n: random_bytes(3000 + i, 500 + i) for i, n in enumerate(names)}
    stored = {n: site.write(f"scans/{n}", d) for n, d in blobs.items()}
    ds = ShardDataset(conn, [("scans", "rot/")], seed=4)
    # The control: intact, every object arrives (and the node has hashed each).
    assert sorted(s.object for s in DataLoader(ds, batch_size=None, num_workers=2)) == names
    bad = names[3]
    st = os.stat(stored[bad])
    with stored[bad].open("r+b") as f:
        f.seek(100)
        f.write(bytes([blobs[bad][100] ^ 0x01]))
    os.utime(stored[bad], ns=(st.st_atime_ns, st.st_mtime_ns))
    got: list[str] = []  # extend keeps what arrived before the error
    it = iter(DataLoader(ds, batch_size=None, num_workers=2))
    with pytest.raises(errors.Corrupt):
        got.extend(s.object for s in it)
    # The loader goes on with the other worker's objects (the failing worker's share ended
    # with the error), then shuts its workers down. (Left to the garbage collector instead,
    # torch's shutdown of an iterator whose worker raised waits 5 s for each worker.)
    got.extend(s.object for s in it)
    assert bad not in got
    assert len(got) == len(set(got)) >= 3  # at least the other worker's three
    for n in got:
        assert n in blobs
    # Without workers too, and the map-style dataset.
    with pytest.raises(errors.Corrupt):
        list(ShardDataset(conn, objects=[("scans", bad)], prefetch=0))
    with pytest.raises(errors.Corrupt):
        ObjectDataset(conn, [("scans", bad)])[0]
    assert ObjectDataset(conn, [("scans", names[0])])[0].data.numpy().tobytes() == blobs[names[0]]


def test_an_object_not_permitted_raises_not_found(
    site: Site, node: Node, conn: Connection, shards: Objects
) -> None:
    intruder = Connection(node.quic, identity=site.identity("intruder"), path="quic")
    name = next(o for d, o in shards if d == "scans")
    with pytest.raises(errors.NotFound):
        ObjectDataset(intruder, [("scans", name)])[0]
    with pytest.raises(errors.NotFound):
        list(DataLoader(ShardDataset(intruder, objects=[("scans", name)]), batch_size=None))
    # The control: the loader reads the same object through the same datasets.
    assert (
        ObjectDataset(conn, [("scans", name)])[0].data.numpy().tobytes() == shards[("scans", name)]
    )


def test_the_map_style_dataset_fetches_by_index_in_each_worker(
    conn: Connection, shards: Objects
) -> None:
    # This process connects first, so its main thread's random generator is in use when
    # the workers fork: each worker must reseed it, or both draw the same QUIC connection
    # IDs and the node routes the second's handshake to the first's connection.
    conn.client().list_datasets()
    keys = sorted(shards)
    ds = ObjectDataset(conn, keys, decode=lambda d, o, b: (d, o, bytes(b)))
    assert len(ds) == len(keys)
    got = list(DataLoader(ds, batch_size=None, num_workers=2, shuffle=True))
    assert sorted((d, o) for d, o, _ in got) == keys
    for d, o, data in got:
        assert data == shards[(d, o)]


def test_no_object_name_or_payload_reaches_a_log_record(
    site: Site, conn: Connection, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG, logger="transportd")
    secret = "patient-4711-jane-doe"
    name = f"leak/{secret}.bin"
    payload = b"CANARY-PAYLOAD-" + random_bytes(64, 13).hex().encode()
    site.write(f"scans/{name}", payload)
    cache = Cache(tmp_path / "c", max_bytes=1 << 20)
    ds = ShardDataset(conn, [("scans", "leak/")], cache=cache)
    assert [s.data.numpy().tobytes() for s in ds] == [payload]  # a miss
    ds.set_epoch(1)
    assert len(list(ds)) == 1  # a hit
    entry = cache.entry_path("scans", name, conn.client().stat("scans", name).root)
    entry.write_bytes(payload[::-1])  # discarded, pulled again
    assert [s.data.numpy().tobytes() for s in ds] == [payload]
    assert ObjectDataset(conn, [("scans", name)])[0].data.numpy().tobytes() == payload
    with pytest.raises(errors.NotFound):
        ObjectDataset(conn, [("scans", f"leak/missing-{secret}.bin")])[0]
    records = [r for r in caplog.records if r.name.startswith("transportd")]
    # The check looked at real records of the datasets and the cache, and of the client.
    assert {"transportd", "transportd.pytorch", "transportd.cache"} <= {r.name for r in records}
    assert any("verification" in r.getMessage() for r in records)
    secrets = [secret, payload.decode()[:32], payload[::-1].decode()[:32]]
    assert leaks(records, secrets) == []
    # The control: a record that does carry the name is caught.
    logging.getLogger("transportd.cache").debug("cached %s", name)
    assert leaks([r for r in caplog.records if r.name.startswith("transportd")], secrets)


def test_importing_transportd_does_not_import_torch() -> None:
    code = (
        "import sys, transportd, transportd.cache\n"
        "assert 'torch' not in sys.modules\n"
        "import transportd.pytorch\n"  # the control: the check sees an import of torch
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
