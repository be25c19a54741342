"""The sidecar mode against a real GPU node: an issuer, a storage node and a GPU node whose
``[sidecar]`` serves this process (registered by its uid), all started from the real binary.
The same calls as the direct client, with no identity of our own; and the asyncio client's
(``AsyncClient.sidecar``): the blocking one's answers, concurrent reads, cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from test_aio import until
from test_workload import ISSUER_TOML

import transportd
from conftest import TD, random_bytes, run, spawn_ready
from transportd.errors import ConnectionLost, NotFound

NODE = """
[agent]
issuer = "{issuer}"
bundle = "bootstrap-bundle.pem"
join_token_file = "join-token"
data_dir = "agent"
workload_socket = "run/workload.sock"

[listen]
quic = "127.0.0.1:0"
tcp = "127.0.0.1:0"

[store]
root = "datasets"
state_dir = "state"

[audit]
dir = "audit"

[admin]
listen = "127.0.0.1:0"

{extra}
"""

ALLOW = f"""
[[allow]]
peer = "spiffe://{TD}/gpu/loader"
dataset = "scans"
actions = ["read"]

[[allow]]
peer = "spiffe://{TD}/gpu/loader"
dataset = "checkpoints"
actions = ["read", "write"]
"""


@dataclass
class Domain:
    root: Path
    issuer: subprocess.Popen[str]
    storage: subprocess.Popen[str]
    storage_admin: str
    gpu: subprocess.Popen[str] | None
    socket: str

    def start_gpu(self) -> None:
        proc, ready = spawn_ready(
            ["node", "--config", str(self.root / "gpu/node.toml")],
            self.root / f"gpu-{time.monotonic_ns()}.log",
        )
        self.gpu = proc
        self.socket = ready["sidecar_socket"]

    def stop(self) -> None:
        for p in (self.gpu, self.storage, self.issuer):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def node_dir(d: Path, name: str, token: str, bundle: str, issuer: str, extra: str) -> Path:
    nd = d / name
    for sub in ("datasets/scans", "datasets/checkpoints", "run"):
        (nd / sub).mkdir(parents=True, exist_ok=True)
    (nd / "join-token").write_text(token)
    (nd / "bootstrap-bundle.pem").write_text(bundle)
    (nd / "node.toml").write_text(NODE.format(issuer=issuer, extra=extra))
    return nd


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Domain]:
    root = tmp_path_factory.mktemp("sidecar")
    (root / "issuer").mkdir()
    (root / "issuer/issuer.toml").write_text(ISSUER_TOML.format(td=TD))
    issuer, ready = spawn_ready(
        ["issuer", "--config", str(root / "issuer/issuer.toml")], root / "issuer.log"
    )
    addr = ready["listen"]
    cfg = str(root / "issuer/issuer.toml")

    def issuer_cmd(*args: str) -> str:
        return run("issuer", *args, "--config", cfg).stdout.strip()

    bundle = issuer_cmd("bundle")
    run("issuer", "entry", "create", "--config", cfg,
        "--spiffe-id", f"spiffe://{TD}/gpu/loader",
        "--parent-id", f"spiffe://{TD}/node/gpu-0",
        "--selector", f"unix:uid:{os.geteuid()}")  # fmt: skip
    s_token = issuer_cmd("token", "create", "--node", f"spiffe://{TD}/node/storage")
    sd = node_dir(root, "storage", s_token, bundle, addr, ALLOW)
    storage, s_ready = spawn_ready(["node", "--config", str(sd / "node.toml")], root / "s.log")
    g_token = issuer_cmd("token", "create", "--node", f"spiffe://{TD}/node/gpu-0")
    sidecar = f'[sidecar]\nsocket = "run/data.sock"\nstorage = ["{s_ready["quic"]}"]\n'
    node_dir(root, "gpu", g_token, bundle, addr, sidecar)
    d = Domain(root, issuer, storage, s_ready["admin"], None, "")
    d.start_gpu()
    # The agent holds the loader's SVID once its entry synced.
    deadline = time.monotonic() + 30
    while True:
        try:
            transportd.Client.sidecar(d.socket).list_datasets()
            break
        except transportd.errors.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield d
    d.stop()


def write(d: Domain, rel: str, data: bytes) -> Path:
    p = d.root / "storage/datasets" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_the_sidecar_client_reads_as_the_direct_one_does(domain: Domain, tmp_path: Path) -> None:
    data = random_bytes((3 << 20) + 11, 71)
    write(domain, "scans/ward-1/a.bin", data)
    c = transportd.Client.sidecar(domain.socket)
    assert "scans" in c.list_datasets()
    assert [(e.path, e.size) for e in c.list_objects("scans", "ward-1/")] == [
        ("ward-1/a.bin", len(data))
    ]
    st = c.stat("scans", "ward-1/a.bin")
    assert st.size == len(data)
    assert bytes(c.read_range("scans", "ward-1/a.bin", 5, 4000)) == data[5:4000]
    # A range past the inline limit comes in several reads.
    assert bytes(c.read_range("scans", "ward-1/a.bin", 0, 3 << 20)) == data[: 3 << 20]
    got = c.fetch("scans", "ward-1/a.bin")
    arr = np.frombuffer(got, dtype=np.uint8)
    assert arr.tobytes() == data
    buf = bytearray(len(data) + 100)
    view = c.fetch_into("scans", "ward-1/a.bin", buf)
    assert bytes(view) == data
    dest = tmp_path / "a.bin"
    c.fetch_to_file("scans", "ward-1/a.bin", dest)
    assert dest.read_bytes() == data


def test_the_sidecar_refuses_as_the_storage_node_does_and_pushes_as_the_caller(
    domain: Domain,
) -> None:
    c = transportd.Client.sidecar(domain.socket)
    write(domain, "private/x.bin", b"x" * 1000)
    with pytest.raises(NotFound) as e:
        c.fetch("private", "x.bin")
    assert e.value.code == "not_found"
    with pytest.raises(NotFound):
        c.push_bytes("scans", "nope.bin", b"no write rule for scans")
    data = random_bytes((1 << 20) + 3, 72)
    c.push_bytes("checkpoints", "step-1.ckpt", data)
    assert (domain.root / "storage/datasets/checkpoints/step-1.ckpt").read_bytes() == data


def test_the_environment_variable_chooses_the_sidecar(
    domain: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(domain, "scans/env.bin", b"e" * 5000)
    monkeypatch.setenv("TRANSPORTD_SIDECAR_SOCKET", domain.socket)
    c = transportd.Client.sidecar()
    assert bytes(c.fetch("scans", "env.bin")) == b"e" * 5000


def store_read_bytes(d: Domain) -> float:
    """Object bytes the storage node has read to serve peers, from its metrics."""
    body = urllib.request.urlopen(f"http://{d.storage_admin}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith("transportd_store_read_bytes_total "):
            return float(line.split()[1])
    return 0.0


def test_the_async_sidecar_client_answers_as_the_blocking_one(
    domain: Domain, tmp_path: Path
) -> None:
    data = random_bytes((3 << 20) + 11, 74)
    write(domain, "scans/ward-2/a.bin", data)
    b = transportd.Client.sidecar(domain.socket)
    src = tmp_path / "src.ckpt"
    src.write_bytes(data[::-1])
    stored = domain.root / "storage/datasets/checkpoints"

    async def main() -> None:
        async with await transportd.AsyncClient.sidecar(domain.socket) as c:
            assert (c.path, c.server_id) == (b.path, b.server_id)
            assert await c.list_datasets() == b.list_datasets()
            listed = [(e.path, e.size) for e in await c.list_objects("scans", "ward-2/")]
            assert listed == [(e.path, e.size) for e in b.list_objects("scans", "ward-2/")]
            assert listed == [("ward-2/a.bin", len(data))]
            s, bs = await c.stat("scans", "ward-2/a.bin"), b.stat("scans", "ward-2/a.bin")
            fields = (s.size, s.chunk_bytes, s.chunk_count, s.root)
            assert fields == (bs.size, bs.chunk_bytes, bs.chunk_count, bs.root)
            assert s.size == len(data)
            for start, end in [(5, 4000), (0, 3 << 20), (len(data) - 9, len(data))]:
                got = bytes(await c.read_range("scans", "ward-2/a.bin", start, end))
                assert got == bytes(b.read_range("scans", "ward-2/a.bin", start, end))
                assert got == data[start:end]
            got = await c.fetch("scans", "ward-2/a.bin")
            assert memoryview(got) == memoryview(b.fetch("scans", "ward-2/a.bin")) == data
            buf = bytearray(len(data) + 100)
            view = await c.fetch_into("scans", "ward-2/a.bin", buf)
            assert bytes(view) == data
            del view
            buf.append(0)  # the export ended with the call
            report = await c.fetch_to_file("scans", "ward-2/a.bin", tmp_path / "a.bin")
            b_report = b.fetch_to_file("scans", "ward-2/a.bin", tmp_path / "b.bin")
            assert (tmp_path / "a.bin").read_bytes() == data
            assert (report.server, report.path, report.size, report.root) == (
                b_report.server,
                b_report.path,
                b_report.size,
                b_report.root,
            )
            assert report.root == s.root
            pushed = await c.push_bytes("checkpoints", "aio-1.ckpt", data)
            b_pushed = b.push_bytes("checkpoints", "blocking-1.ckpt", data)
            assert (
                (pushed.size, pushed.root) == (b_pushed.size, b_pushed.root) == (len(data), s.root)
            )
            assert (stored / "aio-1.ckpt").read_bytes() == data
            pushed = await c.push_file("checkpoints", "aio-2.ckpt", src)
            assert pushed.root == b.push_file("checkpoints", "blocking-2.ckpt", src).root
            assert (stored / "aio-2.ckpt").read_bytes() == data[::-1]
            objects = [("scans", "ward-2/a.bin")]
            assert await c.prefetch(objects) == b.prefetch(objects)
            # Refused as the storage node refuses, with the blocking client's exceptions.
            write(domain, "private/y.bin", b"y" * 1000)
            with pytest.raises(NotFound) as e:
                await c.fetch("private", "y.bin")
            with pytest.raises(NotFound) as be:
                b.fetch("private", "y.bin")
            assert (e.value.code, e.value.retriable) == (be.value.code, be.value.retriable)
            with pytest.raises(NotFound):
                await c.push_bytes("scans", "nope.bin", b"no write rule for scans")

    asyncio.run(asyncio.wait_for(main(), timeout=120))


def test_32_concurrent_read_ranges_through_the_sidecar_are_exact(domain: Domain) -> None:
    size = (6 << 20) + 11
    data = random_bytes(size, 75)
    write(domain, "scans/aio-series.bin", data)
    # 32 ranges of varied lengths: small ones, ones across a 1 MiB boundary, and ones past
    # the inline limit (several reads on one connection each).
    ranges = [((i * size) // 32, (i * size) // 32 + 97 * i + 1) for i in range(16)]
    ranges += [((i << 20) - 500 - i, min((i << 20) + 300 + i, size)) for i in range(1, 7)]
    ranges += [(i * 300_000, i * 300_000 + (1 << 20) + 4096 * i) for i in range(10)]
    assert len(ranges) == 32

    async def main() -> None:
        async with await transportd.AsyncClient.sidecar(domain.socket) as c:
            got = await asyncio.gather(
                *(c.read_range("scans", "aio-series.bin", s, e) for s, e in ranges)
            )
            assert [bytes(g) for g in got] == [data[s:e] for s, e in ranges]
            # Inline reads: every byte crossed the socket.
            through = c.bytes_through_socket
            assert through is not None
            assert through >= sum(e - s for s, e in ranges)

    asyncio.run(asyncio.wait_for(main(), timeout=120))


def test_a_task_cancelled_mid_fetch_leaves_the_async_sidecar_client_usable(
    domain: Domain,
) -> None:
    size = 256 << 20
    data = np.random.default_rng(76).bytes(size)
    write(domain, "scans/big-aio.bin", data)

    async def main() -> None:
        async with await transportd.AsyncClient.sidecar(domain.socket) as c:
            before = store_read_bytes(domain)
            task = asyncio.create_task(c.fetch("scans", "big-aio.bin"))
            await until(
                "the fetch to reach the storage node",
                lambda: store_read_bytes(domain) > before,
                timeout=30,
            )
            assert not task.done()
            assert task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The client goes on at once (the sidecar may still be fetching for the
            # cancelled call).
            got = await c.read_range("scans", "big-aio.bin", 5, 70_000)
            assert bytes(got) == data[5:70_000]
            # Then, each call with its own answer, also once the cancelled call's
            # connection is back among the idle ones.
            got = await c.fetch("scans", "big-aio.bin")
            assert memoryview(got) == data
            del got
            for i in range(8):
                start = i * (size // 8)
                piece = await c.read_range("scans", "big-aio.bin", start, start + 4096)
                assert bytes(piece) == data[start : start + 4096]
                assert (await c.stat("scans", "big-aio.bin")).size == size

    asyncio.run(asyncio.wait_for(main(), timeout=180))


def test_a_sidecar_killed_mid_fetch_gives_a_retriable_error_and_the_call_then_succeeds(
    domain: Domain,
) -> None:
    data = np.random.default_rng(73).bytes(384 << 20)
    write(domain, "scans/big.bin", data)
    c = transportd.Client.sidecar(domain.socket)
    before = store_read_bytes(domain)
    failure: list[BaseException] = []

    def fetch() -> None:
        try:
            c.fetch("scans", "big.bin")
        except BaseException as e:
            failure.append(e)

    t = threading.Thread(target=fetch)
    t.start()
    deadline = time.monotonic() + 30
    while store_read_bytes(domain) <= before:
        assert time.monotonic() < deadline, "the fetch never reached the storage node"
        time.sleep(0.05)
    assert domain.gpu is not None
    domain.gpu.send_signal(signal.SIGKILL)
    domain.gpu.wait()
    t.join(timeout=30)
    assert not t.is_alive()
    assert failure, "the call succeeded although its sidecar was killed"
    err = failure[0]
    assert isinstance(err, ConnectionLost), repr(err)
    assert err.retriable
    domain.start_gpu()
    deadline = time.monotonic() + 60
    while True:
        try:
            got = c.fetch("scans", "big.bin")
            break
        except ConnectionLost:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert bytes(got) == data
