"""The sidecar mode against a real GPU node: an issuer, a storage node and a GPU node whose
``[sidecar]`` serves this process (registered by its uid), all started from the real binary.
The same calls as the direct client, with no identity of our own."""

from __future__ import annotations

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
