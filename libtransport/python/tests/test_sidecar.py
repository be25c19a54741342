"""The sidecar mode (``Client.sidecar``) without a daemon: where the socket comes from, what a
missing one raises, and the calls against a small sidecar played by a thread of the test (a
real Unix socket, the wire's frames, real sealed memory files). The daemon's own tests run
this mode against a real ``transportd node``.

The played sidecar is a Python thread of this process, so every call answered here also
shows that the call waited with the GIL released (held, the sidecar could not answer)."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import transportd
from conftest import SEALS, Answer, Node, PlayedSidecar, Site, memfd, random_bytes
from transportd import errors


def test_without_a_path_or_the_variable_the_error_says_to_set_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRANSPORTD_SIDECAR_SOCKET", raising=False)
    with pytest.raises(ValueError, match="TRANSPORTD_SIDECAR_SOCKET"):
        transportd.Client.sidecar()
    monkeypatch.setenv("TRANSPORTD_SIDECAR_SOCKET", "")
    with pytest.raises(ValueError, match="TRANSPORTD_SIDECAR_SOCKET"):
        transportd.Client.sidecar()


def test_a_missing_socket_is_the_retriable_unavailable(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(errors.SidecarUnavailable) as e:
        transportd.Client.sidecar(sock_path)
    assert e.value.retriable
    assert e.value.code == "unavailable"
    assert isinstance(e.value, errors.ConnectionLost)
    assert "not running" in str(e.value)
    # The variable names it when no path is given.
    monkeypatch.setenv("TRANSPORTD_SIDECAR_SOCKET", str(sock_path))
    with pytest.raises(errors.SidecarUnavailable):
        transportd.Client.sidecar()


def test_a_fetch_maps_the_sealed_memory_file_and_only_the_frame_crosses_the_socket(
    played: Callable[..., PlayedSidecar], sock_path: Path, tmp_path: Path
) -> None:
    data = random_bytes(3 << 20, 1)
    root = "ab" * 32

    def handler(req: dict[str, Any], _fd: int | None) -> Answer:
        assert (req["op"], req["dataset"], req["object"]) == ("fetch", "scans", "a.bin")
        mapped = {"answer": "mapped", "size": len(data), "root": root, "cached": True}
        return mapped, b"", memfd(data)

    played(handler)
    c = transportd.Client.sidecar(sock_path)
    assert c.path == "sidecar"
    buf = c.fetch("scans", "a.bin")
    assert isinstance(buf, transportd.Buffer)
    assert memoryview(buf).readonly
    assert bytes(buf) == data
    through = c.bytes_through_socket
    assert through is not None
    assert through < 200
    out = bytearray(len(data) + 3)
    view = c.fetch_into("scans", "a.bin", out)
    assert bytes(view) == data
    dest = tmp_path / "out" / "a.bin"
    dest.parent.mkdir()
    report = c.fetch_to_file("scans", "a.bin", dest)
    assert (report.size, report.path, report.root) == (len(data), "sidecar", root)
    assert dest.read_bytes() == data
    assert os.listdir(dest.parent) == ["a.bin"]
    with pytest.raises(errors.TooLarge):
        c.fetch("scans", "a.bin", max_bytes=len(data) - 1)


def test_a_memory_file_without_its_write_seal_is_a_protocol_error(
    played: Callable[..., PlayedSidecar], sock_path: Path
) -> None:
    data = b"x" * 5000

    def handler(_req: dict[str, Any], _fd: int | None) -> Answer:
        mapped = {"answer": "mapped", "size": len(data), "root": "00" * 32, "cached": False}
        return mapped, b"", memfd(data, SEALS & ~fcntl.F_SEAL_WRITE)

    played(handler)
    c = transportd.Client.sidecar(sock_path)
    with pytest.raises(errors.ProtocolError, match="not sealed"):
        c.fetch("scans", "a.bin")


def test_calls_pushes_and_prefetch_through_a_played_sidecar(
    played: Callable[..., PlayedSidecar], sock_path: Path, tmp_path: Path
) -> None:
    pushed: list[bytes] = []
    data = random_bytes(100_000, 2)

    def handler(req: dict[str, Any], fd: int | None) -> Answer:
        op = req["op"]
        if op == "datasets":
            return {"answer": "datasets", "names": ["scans"]}, b"", None
        if op == "list":
            assert req.get("node") == "storage-1"
            return {"answer": "listing", "objects": [[req["prefix"] + "a.bin", 3]]}, b"", None
        if op == "stat":
            stat = {"answer": "stat", "size": 3, "root": "cd" * 32, "chunk_bytes": 1 << 20}
            return {**stat, "chunks": 1}, b"", None
        if op == "read":
            body = data[req["start"] : req["end"]]
            return {"answer": "inline", "body": len(body)}, body, None
        if op == "push":
            assert fd is not None
            size = os.fstat(fd).st_size
            pushed.append(os.pread(fd, size, 0))
            return {"answer": "pushed", "size": size, "root": "ef" * 32}, b"", None
        if op == "prefetch":
            return {"answer": "prefetching", "count": len(req["objects"])}, b"", None
        raise AssertionError(op)

    played(handler)
    c = transportd.Client.sidecar(sock_path, node="storage-1")
    assert c.list_datasets() == ["scans"]
    assert [(e.path, e.size) for e in c.list_objects("scans", "train/")] == [("train/a.bin", 3)]
    s = c.stat("scans", "a.bin")
    assert (s.size, s.chunk_count, s.root) == (3, 1, "cd" * 32)
    assert bytes(c.read_range("scans", "a.bin", 10, 5000)) == data[10:5000]
    report = c.push_bytes("checkpoints", "step-1.bin", data)
    assert (report.size, report.path) == (len(data), "sidecar")
    src = tmp_path / "src.bin"
    src.write_bytes(data[:777])
    assert c.push_file("checkpoints", "step-2.bin", src).size == 777
    assert pushed == [data, data[:777]]
    assert c.prefetch([("scans", "a.bin"), ("scans", "b.bin")]) == 2
    with pytest.raises(errors.InvalidName):
        c.stat("scans", "../escape")


def test_a_direct_client_has_no_prefetch(site: Site, node: Node) -> None:
    with transportd.Client(node.tcp, identity=site.identity("loader"), path="tcp") as c:
        with pytest.raises(TypeError, match="sidecar"):
            c.prefetch([("scans", "a.bin")])
        assert c.bytes_through_socket is None

    async def main() -> None:
        async with await transportd.AsyncClient.connect(
            node.tcp, identity=site.identity("loader"), path="tcp"
        ) as a:
            with pytest.raises(TypeError, match="sidecar"):
                await a.prefetch([("scans", "a.bin")])
            assert a.bytes_through_socket is None

    asyncio.run(main())


def test_fsspec_and_pytorch_switch_to_the_sidecar_with_one_argument(
    played: Callable[..., PlayedSidecar], sock_path: Path
) -> None:
    def handler(_req: dict[str, Any], _fd: int | None) -> Answer:
        return {"answer": "datasets", "names": ["scans"]}, b"", None

    played(handler)
    fs = pytest.importorskip("transportd.fs")
    f = fs.TransportdFileSystem(sidecar=sock_path, skip_instance_cache=True)
    assert f.client.path == "sidecar"
    assert f.client.list_datasets() == ["scans"]
    pytorch = pytest.importorskip("transportd.pytorch")
    conn = pytorch.Connection("", sidecar=sock_path)
    assert conn.client().path == "sidecar"
