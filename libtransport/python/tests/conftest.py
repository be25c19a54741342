"""Fixtures: a trust domain made with the real ``transportd`` binary (``ca init``, ``ca csr``,
``ca issue``), a storage node with a policy, started as a child process, and identities; and
a sidecar played by a thread of the test (``played``), for the sidecar mode's tests without a
daemon.

The binary is ``$TRANSPORTD_BIN``, else ``$CARGO_TARGET_DIR/debug/transportd``, else the
workspace's ``target/debug/transportd`` (``test.sh`` builds it).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
TD = "hospital.example"

NODE_TOML = """
[identity]
svid = "identity/svid.pem"
key = "identity/svid.key"
bundle = "identity/bundle.pem"

[listen]
quic = "{quic}"
tcp = "{tcp}"

[store]
root = "{root}"
state_dir = "state-{tag}"

[audit]
dir = "audit-{tag}"

[admin]
listen = "off"

[[allow]]
peer = "spiffe://hospital.example/gpu/loader"
dataset = "scans"
actions = ["read"]

[[allow]]
peer = "spiffe://hospital.example/gpu/loader"
dataset = "checkpoints"
actions = ["read", "write"]

[limits]
chunk_size = "1MiB"
"""


def transportd_bin() -> Path:
    if env := os.environ.get("TRANSPORTD_BIN"):
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "transportd"


def run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Runs the binary; fails the test with its stderr if it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSPORTD_")}
    out = subprocess.run(
        [transportd_bin(), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert out.returncode == 0, f"transportd {args} failed: {out.stderr}"
    return out


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@dataclass
class Node:
    """A running ``transportd node``."""

    proc: subprocess.Popen[str]
    quic: str
    tcp: str
    log: Path
    audit: Path

    def addr(self, path: str) -> str:
        return self.tcp if path == "tcp" else self.quic

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def audit_records(self, peer: str | None = None) -> list[dict[str, object]]:
        """The node's trail, through ``transportd audit query``."""
        args = ["audit", "query", str(self.audit), "--json"]
        if peer:
            args += ["--peer", peer]
        out = run(*args)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


class Site:
    """A trust domain in a directory: its CA, a storage node's identity (key made on the
    node, CSR signed by the CA), client identities, and the node's datasets."""

    def __init__(self, root: Path) -> None:
        self.root = root
        run("ca", "init", "--trust-domain", TD, "--out", self.path("ca"), "--validity", "30d")
        node_id = f"spiffe://{TD}/node/storage"
        ident = self.path("storage/identity")
        run("ca", "csr", "--id", node_id, "--out", ident)
        run("ca", "issue", "--ca", self.path("ca"), "--id", node_id,
            "--csr", ident / "svid.csr", "--out", ident)  # fmt: skip
        for who in ("loader", "intruder"):
            run("ca", "issue", "--ca", self.path("ca"), "--id", f"spiffe://{TD}/gpu/{who}",
                "--out", self.path(who))  # fmt: skip
        # The same SPIFFE ID as the loader, signed by another CA of the same trust domain
        # name: it trusts our node (our bundle), but our node does not trust it.
        run("ca", "init", "--trust-domain", TD, "--out", self.path("other-ca"))
        run("ca", "issue", "--ca", self.path("other-ca"), "--id", f"spiffe://{TD}/gpu/loader",
            "--out", self.path("rogue"))  # fmt: skip
        (self.path("rogue") / "bundle.pem").write_bytes(
            (self.path("ca") / "bundle.pem").read_bytes()
        )
        for ds in ("scans", "checkpoints"):
            self.path(f"storage/datasets/{ds}").mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def identity(self, who: str) -> Path:
        return self.path(who)

    def write(self, rel: str, data: bytes) -> Path:
        """Writes a file into the node's store (``scans/ward-7/x.bin``)."""
        p = self.path(f"storage/datasets/{rel}")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def start_node(
        self,
        tag: str = "main",
        quic: str = "127.0.0.1:0",
        tcp: str = "127.0.0.1:0",
        limits: Mapping[str, int | str] | None = None,
        root: Path | None = None,
    ) -> Node:
        """Starts a node serving the site's datasets; nodes of different tags have trails
        and state of their own. ``limits`` adds settings to its ``[limits]`` (such as
        ``{"max_connections_per_identity": 1}``); ``root`` serves datasets from another
        directory than the site's."""
        config = self.path(f"storage/node-{tag}.toml")
        text = NODE_TOML.format(quic=quic, tcp=tcp, tag=tag, root=root or "datasets")
        text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in (limits or {}).items())
        config.write_text(text)
        log = self.path(f"node-{random.getrandbits(32):08x}.log")
        proc, ready = spawn_ready(["node", "--config", str(config)], log)
        return Node(proc, ready["quic"], ready["tcp"], log, self.path(f"storage/audit-{tag}"))


class Relay:
    """A TCP relay in front of a node's TLS/TCP port, to interrupt or stall a connection at
    a chosen point: it copies bytes both ways (the TLS session stays end to end) and counts
    those coming from the node (``to_node=False``) or going to it. Once ``after`` of them
    have passed (over all connections), it either holds those bytes back until
    :meth:`release` (``cut=False``), or closes every connection and calls ``on_cut``
    (``cut=True``); later connections pass freely."""

    def __init__(self, upstream: str, after: int, cut: bool = False,
                 on_cut: Callable[[], object] | None = None,
                 to_node: bool = False) -> None:  # fmt: skip
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.after, self.cut, self.on_cut, self.to_node = after, cut, on_cut, to_node
        self.passed = 0
        self.tripped = threading.Event()  # the point was reached
        self._open = threading.Event()  # held bytes may go on
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        """Lets held bytes go on, and every byte after them."""
        self._open.set()

    def close(self) -> None:
        self._open.set()
        self._listener.close()
        self._drop_all()

    def _drop_all(self) -> None:
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)  # wakes the pumps blocked on it
                except OSError:
                    pass
                s.close()
            self._socks.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            node = socket.create_connection(self.upstream)
            with self._lock:
                self._socks += [client, node]
            for src, dst, to_node in ((client, node, True), (node, client, False)):
                watched = to_node == self.to_node
                threading.Thread(target=self._pump, args=(src, dst, watched), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, watched: bool) -> None:
        try:
            while data := src.recv(65536):
                if watched and not self.tripped.is_set():
                    with self._lock:
                        self.passed += len(data)
                        trip = self.passed >= self.after and not self.tripped.is_set()
                        if trip:
                            self.tripped.set()
                    if trip and self.cut:
                        # Every connection ends first: nothing the node sends after
                        # `on_cut` (which may change what it serves) reaches the client.
                        self._drop_all()
                        if self.on_cut is not None:
                            self.on_cut()
                        return
                if watched and self.tripped.is_set() and not self.cut:
                    self._open.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def spawn_ready(args: list[str], log: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Starts a role (node, issuer) with debug logs into ``log`` and reads the JSON line it
    prints once it serves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSPORTD_")}
    env["TRANSPORTD_LOG"] = "debug"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [transportd_bin(), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        return proc, json.loads(line)
    except json.JSONDecodeError:
        proc.wait()
        pytest.fail(f"transportd {args[0]} did not start: {log.read_text()}")


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    binary = transportd_bin()
    if not binary.exists():
        pytest.fail(f"no transportd binary at {binary}: run `cargo build -p transportd`")
    return Site(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="session")
def node(site: Site) -> Iterator[Node]:
    n = site.start_node()
    yield n
    n.stop()


@pytest.fixture(params=["quic", "tcp"])
def path(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs over QUIC and over TLS/TCP."""
    return request.param


SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL

Answer = tuple[dict[str, Any], bytes, int | None]
"""An answer's header, inline body and descriptor to pass."""

Handler = Callable[[dict[str, Any], int | None], Answer | None]
"""Answers a request (and the descriptor that came with it); ``None`` hangs up unanswered, as
a sidecar killed mid-call would."""


def memfd(data: bytes, seals: int = SEALS) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.pwrite(fd, data, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def recv_exact(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        part = conn.recv(n - len(out))
        if not part:
            raise EOFError
        out += part
    return out


class PlayedSidecar:
    """Answers each request with what ``handler(request, fd)`` gives. ``served`` lists each
    request as it arrives: (its connection's number, from 0 in the order accepted; its op)."""

    def __init__(self, path: Path, handler: Handler):
        self.path = path
        self.handler = handler
        self.accepted = 0
        self.served: list[tuple[int, str]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, self.accepted), daemon=True).start()
            self.accepted += 1

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            while True:
                try:
                    first, fds, _, _ = socket.recv_fds(conn, 4, 1)
                    if not first:
                        return
                    prefix = first + recv_exact(conn, 4 - len(first))
                    (n,) = struct.unpack(">I", prefix)
                    req = json.loads(recv_exact(conn, n))
                except (EOFError, OSError):
                    return
                self.served.append((number, req["op"]))
                answer = self.handler(req, fds[0] if fds else None)
                for f in fds:
                    os.close(f)
                if answer is None:
                    return
                header, body, fd = answer
                frame = json.dumps(header).encode()
                data = struct.pack(">I", len(frame)) + frame + body
                try:
                    if fd is None:
                        conn.sendall(data)
                    else:
                        sent = socket.send_fds(conn, [data], [fd])
                        conn.sendall(data[sent:])
                except OSError:  # the client went away
                    return
                finally:
                    if fd is not None:
                        os.close(fd)

    def close(self) -> None:
        self.listener.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "sidecar.sock"


@pytest.fixture
def played(sock_path: Path) -> Iterator[Callable[..., PlayedSidecar]]:
    made: list[PlayedSidecar] = []

    def start(handler: Handler) -> PlayedSidecar:
        s = PlayedSidecar(sock_path, handler)
        made.append(s)
        return s

    yield start
    for s in made:
        s.close()
