"""The asyncio client's sidecar mode (``AsyncClient.sidecar``) against the sidecar a thread of
the test plays (``conftest.PlayedSidecar``: a real Unix socket, the wire's frames, real
sealed memory files): every call answers as the blocking sidecar client's does, failures
raise the same exceptions (the sidecar's codes are checked here for both clients), and a
cancelled call leaves the client usable, its connection taking no other call until the
cancelled call's answer has been read off it.

The played sidecar answers from a thread of this process, so every call answered here also
shows that the awaitable left the event loop and the GIL free while it waited."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from test_aio import exported, until

import transportd
from conftest import SEALS, Answer, PlayedSidecar, memfd, random_bytes
from transportd import errors

DATA = random_bytes((2 << 20) + 5, 31)
"""The played sidecar's one object: over 1 MiB, so a read of all of it comes in pieces."""
ROOT = "ab" * 32

Played = Callable[..., PlayedSidecar]


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout=60))


def mapped(data: bytes = DATA, seals: int = SEALS) -> Answer:
    return (
        {"answer": "mapped", "size": len(data), "root": ROOT, "cached": True},
        b"",
        memfd(data, seals),
    )


def stat_answer() -> Answer:
    stat = {"answer": "stat", "size": len(DATA), "root": ROOT, "chunk_bytes": 1 << 20}
    return {**stat, "chunks": 3}, b"", None


def serves_every_call(pushed: list[bytes]) -> Callable[[dict[str, Any], int | None], Answer]:
    """A sidecar answering every call about ``DATA``, keeping what is pushed."""

    def handle(req: dict[str, Any], fd: int | None) -> Answer:
        op = req["op"]
        assert req.get("node") == "storage-1", req
        if op == "datasets":
            return {"answer": "datasets", "names": ["scans"]}, b"", None
        if op == "list":
            listing = [[req["prefix"] + "a.bin", len(DATA)]]
            return {"answer": "listing", "objects": listing}, b"", None
        if op == "stat":
            return stat_answer()
        if op == "read":
            body = DATA[req["start"] : req["end"]]
            return {"answer": "inline", "body": len(body)}, body, None
        if op == "fetch":
            return mapped()
        if op == "push":
            assert fd is not None
            size = os.fstat(fd).st_size
            pushed.append(os.pread(fd, size, 0))
            return {"answer": "pushed", "size": size, "root": "ef" * 32}, b"", None
        if op == "prefetch":
            return {"answer": "prefetching", "count": len(req["objects"])}, b"", None
        raise AssertionError(op)

    return handle


def report_fields(r: transportd.FetchReport | transportd.PushReport) -> tuple[object, ...]:
    """A report but for its timing."""
    moved = r.fetched_bytes if isinstance(r, transportd.FetchReport) else r.sent_bytes
    return (r.server, r.path, r.size, moved, r.chunks, r.root, r.retries)


def test_every_call_answers_as_the_blocking_sidecar_clients(
    played: Played, sock_path: Path, tmp_path: Path
) -> None:
    pushed: list[bytes] = []
    played(serves_every_call(pushed))
    b = transportd.Client.sidecar(sock_path, node="storage-1")
    src = tmp_path / "src.bin"
    src.write_bytes(DATA[:777])

    async def main() -> None:
        async with await transportd.AsyncClient.sidecar(sock_path, node="storage-1") as c:
            assert (c.path, c.server_id) == (b.path, b.server_id)
            assert (c.path, c.server_id) == ("sidecar", f"sidecar:{sock_path}")
            assert await c.list_datasets() == b.list_datasets() == ["scans"]
            listed = [(e.path, e.size) for e in await c.list_objects("scans", "train/")]
            assert listed == [(e.path, e.size) for e in b.list_objects("scans", "train/")]
            assert listed == [("train/a.bin", len(DATA))]
            s, bs = await c.stat("scans", "a.bin"), b.stat("scans", "a.bin")
            fields = (s.size, s.chunk_bytes, s.chunk_count, s.root)
            assert fields == (bs.size, bs.chunk_bytes, bs.chunk_count, bs.root)
            assert fields == (len(DATA), 1 << 20, 3, ROOT)
            # Small, empty, and past the inline limit (three reads, one after another).
            for start, end in [(10, 5000), (7, 7), (0, len(DATA)), ((1 << 20) - 3, (1 << 20) + 3)]:
                got = bytes(await c.read_range("scans", "a.bin", start, end))
                assert got == bytes(b.read_range("scans", "a.bin", start, end))
                assert got == DATA[start:end]
            through = c.bytes_through_socket
            assert through is not None
            got = await c.fetch("scans", "a.bin")
            # The sidecar's memory file, mapped: only the answer's frame crossed the socket.
            assert isinstance(got, transportd.Buffer)
            assert memoryview(got).readonly
            assert bytes(got) == bytes(b.fetch("scans", "a.bin")) == DATA
            assert c.bytes_through_socket - through < 200
            buf = bytearray(len(DATA) + 3)
            view = await c.fetch_into("scans", "a.bin", buf)
            blocking_view = b.fetch_into("scans", "a.bin", bytearray(len(DATA)))
            assert bytes(view) == bytes(blocking_view) == DATA
            del view
            buf.append(0)  # the export ended with the call
            dest = tmp_path / "out" / "a.bin"
            dest.parent.mkdir()
            report = await c.fetch_to_file("scans", "a.bin", dest)
            assert dest.read_bytes() == DATA
            assert report_fields(report) == report_fields(
                b.fetch_to_file("scans", "a.bin", tmp_path / "b.bin")
            )
            sidecar_id = f"sidecar:{sock_path}"
            size = len(DATA)
            assert report_fields(report) == (sidecar_id, "sidecar", size, size, 0, ROOT, 0)
            assert os.listdir(dest.parent) == ["a.bin"]
            report = await c.push_bytes("checkpoints", "step-1.bin", DATA)
            assert report_fields(report) == report_fields(
                b.push_bytes("checkpoints", "step-1.bin", DATA)
            )
            assert (report.size, report.path) == (len(DATA), "sidecar")
            report = await c.push_file("checkpoints", "step-2.bin", src)
            assert report_fields(report) == report_fields(
                b.push_file("checkpoints", "step-2.bin", src)
            )
            assert report.size == 777
            assert pushed == [DATA, DATA, DATA[:777], DATA[:777]]
            objects = [("scans", "a.bin"), ("scans", "b.bin")]
            assert await c.prefetch(objects) == b.prefetch(objects) == 2
            # Refused here, before anything is sent, as by the blocking client.
            with pytest.raises(errors.TooLarge):
                await c.fetch("scans", "a.bin", max_bytes=len(DATA) - 1)
            with pytest.raises(errors.TooLarge):
                await c.fetch_into("scans", "a.bin", bytearray(len(DATA) - 1))
            with pytest.raises(TypeError, match="read-only"):
                await c.fetch_into("scans", "a.bin", bytes(len(DATA)))
            with pytest.raises(errors.InvalidName):
                await c.stat("scans", "../escape")
            with pytest.raises(errors.InvalidName):
                await c.prefetch([("scans", "../escape")])
            with pytest.raises(ValueError, match="before start"):
                await c.read_range("scans", "a.bin", 9, 8)

    run(main)


def calls(tmp_path: Path) -> dict[str, Callable[[Any], Any]]:
    """Every call of a client (blocking or asyncio), by name."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 10)
    return {
        "list_datasets": lambda c: c.list_datasets(),
        "list_objects": lambda c: c.list_objects("scans", "train/"),
        "stat": lambda c: c.stat("scans", "a.bin"),
        "read_range": lambda c: c.read_range("scans", "a.bin", 0, 10),
        "fetch": lambda c: c.fetch("scans", "a.bin"),
        "fetch_into": lambda c: c.fetch_into("scans", "a.bin", bytearray(10)),
        "fetch_to_file": lambda c: c.fetch_to_file("scans", "a.bin", tmp_path / "dest.bin"),
        "push_bytes": lambda c: c.push_bytes("checkpoints", "a.bin", b"x" * 10),
        "push_file": lambda c: c.push_file("checkpoints", "a.bin", src),
        "prefetch": lambda c: c.prefetch([("scans", "a.bin")]),
    }


CODES = [
    ("permission_denied", errors.PermissionDenied, False),
    ("not_found", errors.NotFound, False),
    ("busy", errors.Busy, True),
    ("unavailable", errors.Busy, True),
    ("unreachable", errors.Unreachable, True),
    ("range", errors.OutOfRange, False),
    ("invalid", errors.ProtocolError, False),
]
"""The sidecar's error codes, the classes they raise and whether those are retriable."""


def failure(e: BaseException) -> tuple[object, ...]:
    assert isinstance(e, errors.TransportError), repr(e)
    return (type(e), e.code, e.wire_code, e.retriable, str(e))


@pytest.mark.parametrize(("code", "cls", "retriable"), CODES)
def test_every_call_of_both_clients_raises_the_sidecars_codes_as_their_classes(
    played: Played,
    sock_path: Path,
    tmp_path: Path,
    code: str,
    cls: type[errors.TransportError],
    retriable: bool,
) -> None:
    def handler(_req: dict[str, Any], _fd: int | None) -> Answer:
        return {"answer": "error", "code": code, "message": "refused in a test"}, b"", None

    played(handler)
    b = transportd.Client.sidecar(sock_path)

    async def main() -> None:
        c = await transportd.AsyncClient.sidecar(sock_path)
        for name, call in calls(tmp_path).items():
            with pytest.raises(cls) as e:
                await call(c)
            assert (e.value.code, e.value.retriable) == (code, retriable), name
            with pytest.raises(cls) as be:
                call(b)
            assert failure(e.value) == failure(be.value), name
        assert not (tmp_path / "dest.bin").exists()
        if code == "permission_denied":
            assert isinstance(e.value, errors.Unauthenticated)
            assert "registration entry" in str(e.value)

    run(main)


def test_a_sidecar_that_is_not_there_or_hangs_up_is_the_retriable_unavailable(
    played: Played, sock_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRANSPORTD_SIDECAR_SOCKET", raising=False)

    async def main() -> None:
        with pytest.raises(ValueError, match="TRANSPORTD_SIDECAR_SOCKET"):
            await transportd.AsyncClient.sidecar()
        with pytest.raises(errors.SidecarUnavailable) as e:
            await transportd.AsyncClient.sidecar(sock_path)
        with pytest.raises(errors.SidecarUnavailable) as be:
            transportd.Client.sidecar(sock_path)
        assert failure(e.value) == failure(be.value)
        assert (e.value.code, e.value.retriable) == ("unavailable", True)
        # The variable names the socket when no path is given.
        played(lambda _req, _fd: None)  # hangs up on every request
        monkeypatch.setenv("TRANSPORTD_SIDECAR_SOCKET", str(sock_path))
        c = await transportd.AsyncClient.sidecar()
        assert c.server_id == f"sidecar:{sock_path}"
        b = transportd.Client.sidecar()
        for name, call in calls(tmp_path).items():
            with pytest.raises(errors.SidecarUnavailable) as e:
                await call(c)
            with pytest.raises(errors.SidecarUnavailable) as be:
                call(b)
            assert failure(e.value) == failure(be.value), name
            assert e.value.retriable, name

    run(main)


def test_a_memory_file_without_its_write_seal_is_a_protocol_error(
    played: Played, sock_path: Path
) -> None:
    played(lambda _req, _fd: mapped(seals=SEALS & ~fcntl.F_SEAL_WRITE))

    async def main() -> None:
        c = await transportd.AsyncClient.sidecar(sock_path)
        with pytest.raises(errors.ProtocolError, match="not sealed"):
            await c.fetch("scans", "a.bin")
        with pytest.raises(errors.ProtocolError, match="not sealed"):
            await c.fetch_into("scans", "a.bin", bytearray(len(DATA)))

    run(main)


class HeldFetch:
    """A played sidecar that holds a fetch's answer back until ``release``, and answers a
    stat at once."""

    def __init__(self, played: Played) -> None:
        self.asked = threading.Event()
        self.gate = threading.Event()
        self.sidecar = played(self.handle)

    def handle(self, req: dict[str, Any], _fd: int | None) -> Answer:
        if req["op"] == "fetch":
            self.asked.set()
            self.gate.wait(30)
            return mapped()
        assert req["op"] == "stat", req
        if self.gate.is_set():
            time.sleep(0.02)  # so that two calls at once are on two connections at once
        return stat_answer()

    async def calls_go_on_at_once(self, c: transportd.AsyncClient) -> None:
        """While the fetch's answer is held back, calls go on, on another connection: the
        first, which carried the fetch, takes none meanwhile."""
        for _ in range(3):
            assert (await c.stat("scans", "a.bin")).size == len(DATA)
        assert self.sidecar.served == [(0, "fetch"), (1, "stat"), (1, "stat"), (1, "stat")]

    async def until_first_connection_reused(self, c: transportd.AsyncClient) -> None:
        """Lets the held answer go and, once the client has read it, makes calls two at a
        time (so both idle connections are taken) until one goes on the connection that
        carried it: each must get its own answer, not the fetch's."""
        served = len(self.sidecar.served)
        through = c.bytes_through_socket
        assert through is not None
        self.gate.set()
        await until("the held answer to be read", lambda: c.bytes_through_socket != through)
        deadline = time.monotonic() + 20
        while (0, "stat") not in self.sidecar.served[served:]:
            assert time.monotonic() < deadline, "the cancelled call's connection never came back"
            got = await asyncio.gather(c.stat("scans", "a.bin"), c.stat("scans", "a.bin"))
            assert [s.size for s in got] == [len(DATA)] * 2


def test_a_cancelled_call_leaves_the_client_usable_and_its_connection_out_until_answered(
    played: Played, sock_path: Path
) -> None:
    held = HeldFetch(played)

    async def main() -> None:
        async with await transportd.AsyncClient.sidecar(sock_path) as c:
            task = asyncio.create_task(c.fetch("scans", "a.bin"))
            await until("the fetch to reach the sidecar", held.asked.is_set)
            assert task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await held.calls_go_on_at_once(c)
            await held.until_first_connection_reused(c)
            assert bytes(await c.fetch("scans", "a.bin")) == DATA

    run(main)


def test_a_cancelled_fetch_into_lets_go_of_the_buffer_at_once_and_never_writes_it(
    played: Played, sock_path: Path
) -> None:
    held = HeldFetch(played)

    async def main() -> None:
        async with await transportd.AsyncClient.sidecar(sock_path) as c:
            buf = bytearray(len(DATA))
            task = asyncio.create_task(c.fetch_into("scans", "a.bin", buf))
            await until("the fetch to reach the sidecar", held.asked.is_set)
            assert exported(buf)  # the check can fire: Rust holds the buffer now
            assert task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Let go of as the call returned, while the sidecar has not even answered.
            assert not exported(buf)
            await held.calls_go_on_at_once(c)
            await held.until_first_connection_reused(c)
            # The answer came and went: nothing of it landed in the buffer.
            assert buf == bytearray(len(DATA))
            view = await c.fetch_into("scans", "a.bin", buf)
            assert bytes(view) == DATA

    run(main)
