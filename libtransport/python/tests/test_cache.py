"""The node-local cache against a real node: entries verified against the node's root on
every use, a byte budget kept by LRU eviction that never evicts an entry in use, and several
processes sharing one directory."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch.utils.data import DataLoader

import transportd
from conftest import TD, Node, Site, random_bytes
from transportd._native import manifest_root
from transportd.cache import Cache
from transportd.pytorch import Connection, ShardDataset

JOB = Path(__file__).with_name("torch_job.py")
SIZE = 20_000


@pytest.fixture(scope="module")
def objs(site: Site) -> dict[str, bytes]:
    """Objects of SIZE bytes under scans/cache-t/."""
    out = {}
    for i in range(12):
        name = f"cache-t/obj-{i:02d}.bin"
        out[name] = random_bytes(SIZE, 700 + i)
        site.write(f"scans/{name}", out[name])
    return out


@pytest.fixture(scope="module")
def client(site: Site, node: Node) -> transportd.Client:
    return transportd.Client(node.quic, identity=site.identity("loader"), path="quic")


def transfers(node: Node, names: set[str]) -> int:
    """Reads of these objects the node's audit trail records."""
    return sum(
        r["event"] == "transfer_started" and r.get("object") in names
        for r in node.audit_records(peer=f"spiffe://{TD}/gpu/loader")
    )


def flip(path: Path, at: int) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x80]))


def test_manifest_root_is_the_nodes_root(site: Site, client: transportd.Client) -> None:
    data = random_bytes((2 << 20) + 77, 42)  # three chunks of the node's 1 MiB
    stored = site.write("scans/cache-root/big.bin", data)
    st = client.stat("scans", "cache-root/big.bin")
    assert st.chunk_count == 3
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    for source in (data, bytearray(data), arr, stored, str(stored)):
        assert manifest_root(source, st.chunk_bytes) == st.root, type(source)
    assert manifest_root(client.fetch("scans", "cache-root/big.bin"), st.chunk_bytes) == st.root
    # The controls: one changed byte, or another chunk size, is another root.
    arr[(1 << 20) + 5] ^= 1
    assert manifest_root(arr, st.chunk_bytes) != st.root
    assert manifest_root(data, st.chunk_bytes * 2) != st.root
    with pytest.raises(ValueError, match="power of two"):
        manifest_root(data, 1000)


def test_a_second_epoch_is_served_from_the_cache(site: Site, node: Node, tmp_path: Path) -> None:
    blobs = {f"cache-ep/s-{i}.bin": random_bytes(3000 + 97 * i, 800 + i) for i in range(9)}
    for name, data in blobs.items():
        site.write(f"scans/{name}", data)
    conn = Connection(node.quic, identity=site.identity("loader"), path="quic")
    ds = ShardDataset(conn, [("scans", "cache-ep/")], cache=tmp_path / "c", cache_bytes=1 << 20)
    assert ds.cache is not None
    before = transfers(node, set(blobs))
    # Epoch 0: two DataLoader workers fill the cache (each process counts its own).
    first = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(s.object for s in first) == sorted(blobs)
    after_first = transfers(node, set(blobs))
    assert after_first == before + len(blobs)  # the control: the trail shows reads
    assert ds.cache.usage().entries == len(blobs)
    # Epoch 1, in this process: every object from the cache, verified, nothing pulled.
    ds.set_epoch(1)
    second = list(ds)
    assert {s.object: s.data.numpy().tobytes() for s in second} == blobs
    assert (ds.cache.hits, ds.cache.misses, ds.cache.discarded) == (len(blobs), 0, 0)
    assert ds.cache.served_bytes == sum(map(len, blobs.values()))
    assert ds.cache.fetched_bytes == 0
    assert transfers(node, set(blobs)) == after_first


def test_the_budget_evicts_the_least_recently_used(
    client: transportd.Client, objs: dict[str, bytes], tmp_path: Path
) -> None:
    a, b, c, d = sorted(objs)[:4]
    cache = Cache(tmp_path / "c", max_bytes=3 * SIZE + SIZE // 2)
    roots = {n: client.stat("scans", n).root for n in (a, b, c, d)}

    def present() -> set[str]:
        return {n for n in roots if cache.holds("scans", n, roots[n])}

    for n in (a, b, c):
        assert cache.read(client, "scans", n) == objs[n]
    assert (cache.misses, cache.hits, cache.fetched_bytes) == (3, 0, 3 * SIZE)
    assert cache.read(client, "scans", a) == objs[a]  # a is now the most recently used
    assert cache.hits == 1
    assert present() == {a, b, c}
    cache.read(client, "scans", d)
    # b, not a (the first placed), made room: least recently used, not first in.
    assert present() == {a, c, d}
    assert cache.evictions == 1
    cache.read(client, "scans", b)
    assert present() == {a, d, b}
    assert cache.usage().bytes <= cache.max_bytes
    assert cache.usage().entries == 3
    # An object larger than the whole budget is served, and not kept.
    tiny = Cache(tmp_path / "tiny", max_bytes=SIZE - 1)
    assert tiny.read(client, "scans", a) == objs[a]
    assert tiny.usage().entries == 0
    assert list((tmp_path / "tiny" / "tmp").iterdir()) == []


def test_a_tampered_entry_is_discarded_and_pulled_again(
    node: Node,
    client: transportd.Client,
    objs: dict[str, bytes],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="transportd")
    name = sorted(objs)[5]
    cache = Cache(tmp_path / "c", max_bytes=1 << 20)
    entry = cache.entry_path("scans", name, client.stat("scans", name).root)
    assert cache.read(client, "scans", name) == objs[name]
    reads = transfers(node, {name})
    # The control: untouched, the entry is served and the node sends nothing.
    assert cache.read(client, "scans", name) == objs[name]
    assert (cache.hits, cache.discarded, transfers(node, {name})) == (1, 0, reads)
    # The same size, one bit changed: the root no longer matches.
    flip(entry, 1234)
    assert cache.read(client, "scans", name) == objs[name]
    assert (cache.discarded, cache.misses) == (1, 2)
    assert transfers(node, {name}) == reads + 1
    assert entry.read_bytes() == objs[name]  # pulled again in its place
    # Held through open() too.
    flip(entry, 0)
    with cache.open(client, "scans", name) as held:
        assert held.read() == objs[name]
        assert held.path.read_bytes() == objs[name]
    assert cache.discarded == 2
    # The warning names the object by digest only.
    warned = [r.getMessage() for r in caplog.records if "verification" in r.getMessage()]
    assert len(warned) == 2
    assert all(transportd.object_digest(name)[:16] in w and name not in w for w in warned)


def job(params: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(JOB), json.dumps(params)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_an_entry_in_use_elsewhere_is_not_evicted_until_released(
    site: Site, node: Node, client: transportd.Client, objs: dict[str, bytes], tmp_path: Path
) -> None:
    held, other = sorted(objs)[6:8]
    budget = SIZE + SIZE // 2  # room for one entry
    cache = Cache(tmp_path / "c", max_bytes=budget)
    roots = {n: client.stat("scans", n).root for n in (held, other)}
    holder = job({
        "job": "hold", "node": node.quic, "identity": str(site.identity("loader")),
        "cache": str(tmp_path / "c"), "budget": budget, "dataset": "scans", "object": held,
    })  # fmt: skip
    assert holder.stdout is not None
    assert holder.stdin is not None
    assert holder.stdout.readline() == "held\n", holder.stderr.read() if holder.stderr else ""
    # Placing another entry would evict the held one, the least recently used: it stays,
    # and the cache is over budget meanwhile (this process holds its own entry too, else its
    # release would evict it at once to get back within budget).
    with cache.open(client, "scans", other) as mine:
        assert mine.read() == objs[other]
        assert cache.holds("scans", held, roots[held])
        assert cache.holds("scans", other, roots[other])
        assert cache.usage().bytes == 2 * SIZE > budget
        assert cache.evictions == 0
        # Released, the other process's entry is evicted (by that process, which finds the
        # cache over budget as it lets go).
        holder.stdin.write("\n")
        holder.stdin.flush()
        out, err = holder.communicate(timeout=60)
        assert holder.returncode == 0, err
        assert out == "released\n"
        assert not cache.holds("scans", held, roots[held])
        assert cache.holds("scans", other, roots[other])
        assert cache.usage().bytes <= budget
        assert not (tmp_path / "c" / "over-budget").exists()


def test_processes_filling_the_cache_at_once_leave_it_consistent(
    site: Site, node: Node, client: transportd.Client, objs: dict[str, bytes], tmp_path: Path
) -> None:
    names = sorted(objs)
    budget = 3 * SIZE  # a quarter of the objects: placing and evicting all along
    go = tmp_path / "go"
    params = {
        "job": "fill", "node": node.quic, "identity": str(site.identity("loader")),
        "cache": str(tmp_path / "c"), "budget": budget, "go": str(go),
    }  # fmt: skip
    procs = [
        # Each process reads every object eight times, starting at a different one.
        job(
            {
                **params,
                "objects": [["scans", n] for n in (names[k:] + names[:k]) * 8],
                "out": str(tmp_path / f"{k}"),
            }
        )
        for k in (0, 4, 8)
    ]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
    go.touch()  # all start at once
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    for k in (0, 4, 8):
        *served, counts = [
            json.loads(line) for line in (tmp_path / f"{k}").read_text().splitlines()
        ]
        for s in served:
            assert bytes.fromhex(s["data"]) == objs[s["object"]]
        assert counts["hits"] + counts["misses"] == len(served)
    # Within budget, and every entry is a whole, verifying object under its own name.
    cache = Cache(tmp_path / "c", max_bytes=budget)
    assert 0 < cache.usage().bytes <= budget
    expected = {}
    for n in names:
        st = client.stat("scans", n)
        expected[cache.entry_path("scans", n, st.root).name] = st
    entries = list((tmp_path / "c" / "objects").iterdir())
    assert len(entries) == cache.usage().entries
    for e in entries:
        st = expected[e.name]
        assert manifest_root(e, st.chunk_bytes) == st.root
    assert list((tmp_path / "c" / "tmp").iterdir()) == []
    assert not (tmp_path / "c" / "over-budget").exists()
    # No file name carries an object's name.
    for path in (tmp_path / "c").rglob("*"):
        assert "obj-" not in path.name
