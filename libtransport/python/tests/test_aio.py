"""The asyncio client against a real node: concurrent calls on one connection,
cancellation, typed errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

import transportd
from conftest import TD, Node, Relay, Site, random_bytes
from transportd import errors

SERIES = "aio/series-0007.bin"
SERIES_LEN = (6 << 20) + 11  # seven chunks of 1 MiB, the last of 11 bytes
LOADER = f"spiffe://{TD}/gpu/loader"


@pytest.fixture(scope="module")
def series(site: Site) -> bytes:
    data = random_bytes(SERIES_LEN, 21)
    site.write(f"scans/{SERIES}", data)
    return data


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout=60))


async def connect(site: Site, addr: str, path: str, who: str = "loader") -> transportd.AsyncClient:
    return await transportd.AsyncClient.connect(addr, identity=site.identity(who), path=path)


async def until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Polls ``check`` (without blocking the loop) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def count(node: Node, event: str, **fields: object) -> int:
    """Records of ``event`` by the loader in the node's trail with these fields."""
    return sum(
        r["event"] == event and all(r.get(k) == v for k, v in fields.items())
        for r in node.audit_records(peer=LOADER)
    )


def test_32_concurrent_reads_share_one_connection_and_are_exact(
    site: Site, node: Node, series: bytes, path: str
) -> None:
    # 32 ranges of varied lengths: over the whole object, and across chunk boundaries.
    step = SERIES_LEN // 32
    centers = [i * step + 700 if i % 2 else ((i % 6) + 1) << 20 for i in range(32)]
    ranges = [(c - 700 + i, c + 300 + 97 * i) for i, c in enumerate(centers)]
    assert any(s >> 20 != (e - 1) >> 20 for s, e in ranges)

    async def main() -> None:
        connections = count(node, "connection_accepted")
        reads = count(node, "transfer_started", object=SERIES, path=path)
        async with await connect(site, node.addr(path), path) as c:
            assert c.path == path
            assert c.server_id == f"spiffe://{TD}/node/storage"
            got = await asyncio.gather(*(c.read_range("scans", SERIES, s, e) for s, e in ranges))
            assert [bytes(b) for b in got] == [series[s:e] for s, e in ranges]
            # The node saw 32 reads, and one connection (the handshake) for all of them.
            assert count(node, "transfer_started", object=SERIES, path=path) == reads + 32
            assert count(node, "connection_accepted") == connections + 1
            # The control: another client is another connection, and the count shows it.
            async with await connect(site, node.addr(path), path) as other:
                assert (await other.stat("scans", SERIES)).size == SERIES_LEN
            assert count(node, "connection_accepted") == connections + 2

    run(main)


def test_every_call_answers_like_the_blocking_clients(
    site: Site, node: Node, series: bytes, path: str, tmp_path: Any
) -> None:
    async def main() -> None:
        async with await connect(site, node.addr(path), path) as c:
            assert await c.list_datasets() == ["checkpoints", "scans"]
            listed = await c.list_objects("scans", "aio/")
            assert [(e.path, e.size) for e in listed] == [(SERIES, SERIES_LEN)]
            st = await c.stat("scans", SERIES)
            assert (st.size, st.chunk_count) == (SERIES_LEN, 7)
            assert bytes(await c.fetch("scans", SERIES)) == series
            buf = bytearray(SERIES_LEN + 5)
            view = await c.fetch_into("scans", SERIES, buf)
            assert len(view) == SERIES_LEN
            assert bytes(view) == series
            del view
            buf.append(0)  # the export ended with the call: the bytearray resizes again
            report = await c.fetch_to_file("scans", SERIES, tmp_path / "s.bin")
            assert report.size == SERIES_LEN
            assert (tmp_path / "s.bin").read_bytes() == series
            ckpt = random_bytes((2 << 20) + 3, 22)
            await c.push_bytes("checkpoints", f"aio/{path}.ckpt", ckpt)
            src = tmp_path / "src.ckpt"
            src.write_bytes(ckpt[::-1])
            await c.push_file("checkpoints", f"aio/file-{path}.ckpt", src)
            stored = site.path("storage/datasets/checkpoints/aio")
            assert (stored / f"{path}.ckpt").read_bytes() == ckpt
            assert (stored / f"file-{path}.ckpt").read_bytes() == ckpt[::-1]

    run(main)


def exported(buf: bytearray) -> bool:
    """Whether someone holds ``buf``'s buffer: a bytearray refuses to resize meanwhile."""
    try:
        buf.append(0)
    except BufferError:
        return True
    buf.pop()
    return False


def test_a_task_cancelled_mid_fetch_leaves_the_client_usable_and_the_buffer_free(
    site: Site, node: Node, series: bytes
) -> None:
    # The node's bytes are held back once 2 MiB have passed: the pull is then certainly
    # under way (manifest and some chunks in) and certainly not done.
    relay = Relay(node.tcp, after=2 << 20)

    async def main() -> None:
        async with await connect(site, relay.addr, "tcp") as c:
            buf = bytearray(SERIES_LEN)
            task = asyncio.create_task(c.fetch_into("scans", SERIES, buf))
            await until("the pull to be under way", relay.tripped.is_set)
            assert exported(buf)  # the check can fire: Rust holds the buffer now
            assert task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Once the cancelled call has returned, nothing holds (or writes) the buffer.
            assert not exported(buf)
            relay.release()
            # The same client, on the same connection, goes on: exact bytes.
            assert bytes(await c.read_range("scans", SERIES, 5, 70_000)) == series[5:70_000]
            view = await c.fetch_into("scans", SERIES, buf)
            assert bytes(view) == series

    try:
        run(main)
    finally:
        relay.close()


def test_errors_are_typed(site: Site, node: Node, series: bytes, path: str) -> None:
    async def main() -> None:
        async with await connect(site, node.addr(path), path) as c:
            with pytest.raises(errors.NotFound) as e:
                await c.fetch("scans", "aio/missing.bin")
            assert (e.value.code, e.value.wire_code, e.value.retriable) == ("not_found", 4, False)
            with pytest.raises(errors.OutOfRange):
                await c.read_range("scans", SERIES, 0, SERIES_LEN + 1)
            with pytest.raises(errors.InvalidName):
                await c.stat("scans", "../etc/passwd")
            with pytest.raises(TypeError, match="read-only"):
                await c.fetch_into("scans", SERIES, bytes(SERIES_LEN))
            # A failed call leaves the client usable.
            assert (await c.stat("scans", SERIES)).size == SERIES_LEN
        async with await connect(site, node.addr(path), path, "intruder") as c:
            with pytest.raises(errors.NotFound):
                await c.read_range("scans", SERIES, 0, 10)
        with pytest.raises(errors.Unauthenticated) as u:
            await connect(site, node.addr(path), path, "rogue")
        assert u.value.code == "unknown_ca"

    run(main)


def test_a_push_cancelled_mid_way_commits_nothing(site: Site, node: Node, series: bytes) -> None:
    # Our bytes are held back once 2 MiB of them have gone: the push is under way and
    # cannot finish.
    relay = Relay(node.tcp, after=2 << 20, to_node=True)
    ckpt = random_bytes((6 << 20) + 1, 23)
    stored = site.path("storage/datasets/checkpoints/aio/cancelled.ckpt")

    async def main() -> None:
        async with await connect(site, relay.addr, "tcp") as c:
            task = asyncio.create_task(c.push_bytes("checkpoints", "aio/cancelled.ckpt", ckpt))
            await until("the push to be under way", relay.tripped.is_set)
            assert task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            relay.release()
            # A round trip after everything the push sent: the node has had all of it.
            assert (await c.stat("scans", SERIES)).size == SERIES_LEN
            assert not stored.exists()
            # The object goes up whole when pushed again.
            report = await c.push_bytes("checkpoints", "aio/cancelled.ckpt", ckpt)
            assert report.size == len(ckpt)
            assert stored.read_bytes() == ckpt

    try:
        run(main)
    finally:
        relay.close()


@pytest.fixture(scope="module")
def one_transfer_node(site: Site) -> Iterator[Node]:
    """A node that lets a connection hold a single open transfer."""
    n = site.start_node("one-transfer", limits={"max_transfers": 1})
    yield n
    n.stop()


def test_a_cancelled_pull_gives_its_transfer_back_to_the_node(
    site: Site, one_transfer_node: Node, series: bytes
) -> None:
    # On a connection that may hold one transfer, a pull left open on the node by a
    # cancelled task would make every later call on it Busy; its close frees the place.
    relay = Relay(one_transfer_node.tcp, after=2 << 20)

    async def main() -> None:
        async with await connect(site, relay.addr, "tcp") as c:
            task = asyncio.create_task(c.fetch("scans", SERIES))
            await until("the pull to be under way", relay.tripped.is_set)
            assert task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            relay.release()
            # The close goes out when the task is cancelled and may land after the next
            # call is asked for: that call is Busy (retriable) until it has.
            deadline = time.monotonic() + 20
            while True:
                try:
                    got = await c.read_range("scans", SERIES, 100, 5000)
                    break
                except errors.Busy:
                    assert time.monotonic() < deadline, "the cancelled pull kept its transfer"
                    await asyncio.sleep(0.01)
            assert bytes(got) == series[100:5000]

    try:
        run(main)
    finally:
        relay.close()
