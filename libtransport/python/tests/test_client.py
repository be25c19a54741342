"""The blocking client against a real node: real certificates, policy, QUIC and TLS/TCP."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest

import transportd
from conftest import TD, Node, Site, random_bytes
from transportd import _native, errors

SCAN = "ward-7/patient-0042.bin"
SCAN_LEN = (5 << 20) + 3  # six chunks of 1 MiB, the last of 3 bytes


@pytest.fixture(scope="module")
def scan(site: Site) -> bytes:
    data = random_bytes(SCAN_LEN, 1)
    site.write(f"scans/{SCAN}", data)
    site.write("scans/ward-7/notes.bin", random_bytes(1000, 2))
    return data


def connect(site: Site, node: Node, path: str, who: str = "loader") -> transportd.Client:
    return transportd.Client(node.addr(path), identity=site.identity(who), path=path)


def test_list_stat_read_range_and_fetch_are_byte_identical(
    site: Site, node: Node, scan: bytes, path: str
) -> None:
    with connect(site, node, path) as c:
        assert c.path == path
        assert c.server_id == f"spiffe://{TD}/node/storage"
        assert c.list_datasets() == ["checkpoints", "scans"]
        listed = {e.path: e.size for e in c.list_objects("scans", "ward-7/")}
        assert listed == {SCAN: SCAN_LEN, "ward-7/notes.bin": 1000}
        st = c.stat("scans", SCAN)
        assert (st.size, st.chunk_bytes, st.chunk_count) == (SCAN_LEN, 1 << 20, 6)
        assert len(st.root) == 64
        # A range across a chunk boundary, and the last bytes.
        start, end = (1 << 20) - 10, (2 << 20) + 10
        assert bytes(c.read_range("scans", SCAN, start, end)) == scan[start:end]
        assert bytes(c.read_range("scans", SCAN, SCAN_LEN - 3, SCAN_LEN)) == scan[-3:]
        with pytest.raises(errors.OutOfRange) as e:
            c.read_range("scans", SCAN, 0, SCAN_LEN + 1)
        assert e.value.code == "range"
        buf = c.fetch("scans", SCAN)
        assert len(buf) == SCAN_LEN
        assert bytes(buf) == scan
        assert repr(buf) == f"<transportd.Buffer of {SCAN_LEN} bytes>"
        with pytest.raises(errors.TooLarge):
            c.fetch("scans", SCAN, max_bytes=SCAN_LEN - 1)


def test_fetch_hands_numpy_its_own_memory(site: Site, node: Node, scan: bytes) -> None:
    with connect(site, node, "quic") as c:
        buf = c.fetch("scans", SCAN)
    a = np.frombuffer(buf, dtype=np.uint8)
    b = np.frombuffer(buf, dtype=np.uint8)
    assert not a.flags.owndata
    assert not a.flags.writeable  # exported read-only
    # Two views of the buffer are the same memory, so neither is a copy...
    assert a.ctypes.data == b.ctypes.data
    assert np.shares_memory(a, b)
    assert a.ctypes.data == np.frombuffer(memoryview(buf), dtype=np.uint8).ctypes.data
    # ...and the check tells a copy apart (the control).
    assert not np.shares_memory(a, np.frombuffer(bytes(buf), dtype=np.uint8))
    assert a.tobytes() == scan
    with pytest.raises(ValueError, match="read-only"):
        a[0] = 1
    del a, b


def test_fetch_into_lands_in_the_callers_numpy_array_and_bytearray(
    site: Site, node: Node, scan: bytes, path: str
) -> None:
    with connect(site, node, path) as c:
        # A numpy array larger than the object, of another dtype.
        arr = np.zeros((SCAN_LEN + 13) // 4 + 1, dtype=np.float32)
        view = c.fetch_into("scans", SCAN, arr)
        assert len(view) == SCAN_LEN
        got = np.frombuffer(view, dtype=np.uint8)
        assert got.ctypes.data == arr.ctypes.data
        assert np.shares_memory(got, arr)
        assert not np.shares_memory(np.array(view), arr)  # the control: a copy is told apart
        assert arr.view(np.uint8)[:SCAN_LEN].tobytes() == scan

        ba = bytearray(SCAN_LEN)
        address = np.frombuffer(ba, dtype=np.uint8).ctypes.data
        view = c.fetch_into("scans", SCAN, ba)
        assert np.frombuffer(view, dtype=np.uint8).ctypes.data == address
        assert ba == scan
        del view

        with pytest.raises(errors.TooLarge):
            c.fetch_into("scans", SCAN, bytearray(SCAN_LEN - 1))
        with pytest.raises(TypeError, match="read-only"):
            c.fetch_into("scans", SCAN, bytes(SCAN_LEN))
        with pytest.raises(ValueError, match="C-contiguous"):
            c.fetch_into("scans", SCAN, np.zeros((SCAN_LEN, 2), dtype=np.uint8)[:, 0])


def test_fetch_to_file_and_pushes_land_byte_identical(
    site: Site, node: Node, scan: bytes, path: str, tmp_path: Path
) -> None:
    with connect(site, node, path) as c:
        dest = tmp_path / "scan.bin"
        report = c.fetch_to_file("scans", SCAN, dest)
        assert dest.read_bytes() == scan
        assert (report.size, report.path, report.chunks) == (SCAN_LEN, path, 6)
        assert report.server == f"spiffe://{TD}/node/storage"

        ckpt = random_bytes((3 << 20) + 11, 3)
        r = c.push_bytes("checkpoints", f"run-1/bytes-{path}.ckpt", ckpt)
        assert (r.size, r.path) == (len(ckpt), path)
        stored = site.path(f"storage/datasets/checkpoints/run-1/bytes-{path}.ckpt")
        assert stored.read_bytes() == ckpt
        # Any buffer of bytes: a numpy array's.
        arr = np.frombuffer(ckpt[:4096], dtype=np.uint32)
        c.push_bytes("checkpoints", f"run-1/array-{path}.ckpt", arr)
        assert (
            site.path(f"storage/datasets/checkpoints/run-1/array-{path}.ckpt").read_bytes()
            == ckpt[:4096]
        )

        src = tmp_path / "step.ckpt"
        src.write_bytes(ckpt[::-1])
        r = c.push_file("checkpoints", f"run-1/file-{path}.ckpt", src)
        assert r.size == len(ckpt)
        assert (
            site.path(f"storage/datasets/checkpoints/run-1/file-{path}.ckpt").read_bytes()
            == ckpt[::-1]
        )
        # And back, as the node stored it.
        assert bytes(c.fetch("checkpoints", f"run-1/file-{path}.ckpt")) == ckpt[::-1]


def test_no_access_is_not_found_like_a_missing_dataset_and_is_audited(
    site: Site, node: Node, scan: bytes, path: str
) -> None:
    answers = []
    with connect(site, node, path, "intruder") as c:
        assert c.list_datasets() == []
        for dataset, obj in (("scans", SCAN), ("no-such", SCAN)):
            with pytest.raises(errors.NotFound) as e:
                c.fetch("scans" if dataset == "scans" else dataset, obj)
            answers.append(e.value)
        with pytest.raises(errors.NotFound):
            c.stat("scans", SCAN)
        with pytest.raises(errors.NotFound):
            c.fetch_into("scans", SCAN, bytearray(SCAN_LEN))
    with connect(site, node, path) as c:
        with pytest.raises(errors.NotFound) as e:
            c.fetch("no-such", SCAN)
        answers.append(e.value)
        # The control: the same object is there for an identity with a grant.
        assert bytes(c.fetch("scans", SCAN)) == scan
    # Forbidden and missing are the same answer: class, code, wire code, words.
    assert {(type(a), a.code, a.wire_code, str(a), a.retriable) for a in answers} == {
        (errors.NotFound, "not_found", 4, "not found or not permitted", False)
    }
    # The refusal is in the serving node's trail, with who asked for what.
    denied = [
        r
        for r in node.audit_records(peer=f"spiffe://{TD}/gpu/intruder")
        if r["event"] == "authorization" and r["decision"] == "deny"
    ]
    assert any(r.get("dataset") == "scans" and r.get("object") == SCAN for r in denied), denied
    # The control: the loader's reads were allowed, not denied.
    loader = node.audit_records(peer=f"spiffe://{TD}/gpu/loader")
    assert any(r["event"] == "authorization" and r["decision"] == "allow" for r in loader)
    assert not any(
        r["event"] == "authorization" and r["decision"] == "deny" and r.get("dataset") == "scans"
        for r in loader
    )


def test_an_svid_of_another_ca_is_unauthenticated(
    site: Site, node: Node, scan: bytes, path: str
) -> None:
    with pytest.raises(errors.Unauthenticated) as e:
        connect(site, node, path, "rogue")
    assert e.value.code == "unknown_ca", e.value
    assert not e.value.retriable
    # The control: the genuine loader (same SPIFFE ID, our CA) gets in.
    with connect(site, node, path) as c:
        assert c.stat("scans", SCAN).size == SCAN_LEN
    refused = [r for r in node.audit_records() if r["event"] == "connection_refused"]
    assert refused


def test_a_corrupted_stored_file_raises_corrupt(site: Site, node: Node, path: str) -> None:
    name = f"rot-{path}.bin"
    data = random_bytes((3 << 20) + 5, 7)
    stored = site.write(f"scans/{name}", data)
    with connect(site, node, path) as c:
        # The control: intact, it verifies (and the node has its manifest now).
        assert bytes(c.fetch("scans", name)) == data
        # Bit rot: one byte of the second chunk changes; size, inode and mtime stay.
        st = os.stat(stored)
        with stored.open("r+b") as f:
            f.seek((1 << 20) + 17)
            f.write(bytes([data[(1 << 20) + 17] ^ 0x40]))
        os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
        for pull in (
            lambda: c.fetch("scans", name),
            lambda: c.read_range("scans", name, 1 << 20, (1 << 20) + 100),
            lambda: c.fetch_into("scans", name, bytearray(len(data))),
        ):
            with pytest.raises(errors.Corrupt) as e:
                pull()
            assert e.value.code == "corrupt"
        # A range that does not touch the bad chunk still verifies.
        assert bytes(c.read_range("scans", name, 0, 100)) == data[:100]


def test_auto_falls_back_to_tcp_where_quic_gets_no_answer(site: Site, scan: bytes) -> None:
    # TLS/TCP on a port where nothing answers UDP: QUIC times out, TCP carries the client.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    n = site.start_node("tcp-only", tcp=f"127.0.0.1:{port}")
    try:
        with transportd.Client(
            f"127.0.0.1:{port}", identity=site.identity("loader"), connect_timeout=1.0
        ) as c:
            assert c.path == "tcp"
            assert c.stat("scans", SCAN).size == SCAN_LEN
        with pytest.raises(errors.Unreachable) as e:
            transportd.Client(
                f"127.0.0.1:{port}",
                identity=site.identity("loader"),
                path="quic",
                connect_timeout=1.0,
            )
        assert e.value.retriable
    finally:
        n.stop()


def test_bad_names_and_missing_identities_are_typed(site: Site, node: Node) -> None:
    with connect(site, node, "quic") as c:
        with pytest.raises(errors.InvalidName) as e:
            c.fetch("scans", "/etc/passwd")
        assert isinstance(e.value, ValueError)
        assert "passwd" not in str(e.value)
    with pytest.raises(errors.IdentityError):
        transportd.Client(node.quic, identity=site.path("nobody"))
    env = os.environ.pop("SPIFFE_ENDPOINT_SOCKET", None)
    try:
        with pytest.raises(errors.IdentityError, match="SPIFFE_ENDPOINT_SOCKET"):
            transportd.Client(node.quic)
    finally:
        if env is not None:
            os.environ["SPIFFE_ENDPOINT_SOCKET"] = env


# What must never reach a log record of the package: an object's name, payload, keys.
def leaks(records: list[logging.LogRecord], secrets: list[str]) -> list[str]:
    found = []
    for r in records:
        text = " ".join(
            [r.getMessage(), str(r.msg), repr(r.args), repr(sorted(vars(r).items(), key=str))]
        )
        found += [f"{s!r} in {r.getMessage()!r}" for s in secrets if s in text]
    return found


def test_no_object_name_payload_or_key_reaches_a_log_record(
    site: Site, node: Node, scan: bytes, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # Everything, down to the Rust side's TRACE (Python level 5): quinn's per-packet events
    # too, which it logs holding its connection's lock; closing a client with the GIL held
    # deadlocked on that once (a record waiting for the GIL, the GIL's holder for the lock).
    caplog.set_level(5, logger="transportd")
    secret_name = "patient-4711-jane-doe.bin"
    payload = b"CANARY-PAYLOAD-" + random_bytes(64, 11).hex().encode()
    key_pem = (site.identity("loader") / "svid.key").read_text()
    key_body = "".join(line for line in key_pem.splitlines() if "-----" not in line)
    secrets = [secret_name, "patient-4711", payload.decode()[:32], key_body[:24], "PRIVATE KEY"]
    site.write(f"scans/ward-9/{secret_name}", payload)
    for path in ("quic", "tcp"):
        with connect(site, node, path) as c:
            c.list_datasets()
            c.list_objects("scans", "ward-9/")
            c.stat("scans", f"ward-9/{secret_name}")
            c.read_range("scans", f"ward-9/{secret_name}", 0, 10)
            c.fetch("scans", f"ward-9/{secret_name}")
            c.fetch_into("scans", f"ward-9/{secret_name}", bytearray(len(payload)))
            c.fetch_to_file("scans", f"ward-9/{secret_name}", tmp_path / f"out-{path}")
            c.push_bytes("checkpoints", f"ward-9/{secret_name}", payload)
            src = tmp_path / "src.bin"
            src.write_bytes(payload)
            c.push_file("checkpoints", f"ward-9/{path}-{secret_name}", src)
            with pytest.raises(errors.NotFound):
                c.fetch("scans", f"ward-9/missing-{secret_name}")
        with pytest.raises(errors.Unauthenticated):
            connect(site, node, path, "rogue")
        asyncio.run(every_async_call(site, node, path, secret_name, payload, tmp_path))
    records = [r for r in caplog.records if r.name.startswith("transportd")]
    # The check looked at real records of these calls: each call logged, by digest, by
    # both clients...
    digest = transportd.object_digest(f"ward-9/{secret_name}")[:16]
    assert sum(digest in r.getMessage() for r in records) >= 24
    assert any("failed" in r.getMessage() for r in records)
    # ...and the Rust side's (libtransport's tracing events) at DEBUG too, its pulls by
    # digest as well.
    native = [r for r in records if r.name.startswith("transportd.native.")]
    assert any(r.levelno == logging.DEBUG for r in native), {r.name for r in records}
    assert any(r.name.startswith("transportd.native.libtransport.") for r in native)
    assert any(digest in r.getMessage() for r in native)
    assert leaks(records, secrets) == []
    # The control: a record that does carry the name is caught.
    logging.getLogger("transportd").debug("pulled %s", f"ward-9/{secret_name}")
    assert leaks([r for r in caplog.records if r.name.startswith("transportd")], secrets)


async def every_async_call(
    site: Site, node: Node, path: str, secret_name: str, payload: bytes, tmp_path: Path
) -> None:
    obj = f"ward-9/{secret_name}"
    async with await transportd.AsyncClient.connect(
        node.addr(path), identity=site.identity("loader"), path=path
    ) as c:
        await c.list_datasets()
        await c.list_objects("scans", "ward-9/")
        await c.stat("scans", obj)
        await c.read_range("scans", obj, 0, 10)
        await c.fetch("scans", obj)
        await c.fetch_into("scans", obj, bytearray(len(payload)))
        await c.fetch_to_file("scans", obj, tmp_path / f"out-async-{path}")
        await c.push_bytes("checkpoints", f"ward-9/async-{secret_name}", payload)
        await c.push_file("checkpoints", f"ward-9/async-{path}-{secret_name}", tmp_path / "src.bin")
        with pytest.raises(errors.NotFound):
            await c.fetch("scans", f"ward-9/missing-{secret_name}")
    with pytest.raises(errors.Unauthenticated):
        await transportd.AsyncClient.connect(
            node.addr(path), identity=site.identity("rogue"), path=path
        )


def test_the_rust_sides_records_follow_pythons_levels(
    site: Site, node: Node, scan: bytes, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    def native_debug() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name.startswith("transportd.native.") and r.levelno == logging.DEBUG
        ]

    def native() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name.startswith("transportd.native.")]

    with connect(site, node, "tcp") as c:
        caplog.set_level(logging.INFO, logger="transportd")
        forwarded, kept = _native._forwarded_events(), len(native())
        c.fetch_to_file("scans", SCAN, tmp_path / "a")
        assert native_debug() == []
        # Cheaply: the GIL was taken only for events that became records (none, or a rare
        # INFO one), not for the DEBUG ones Python discards.
        assert _native._forwarded_events() - forwarded == len(native()) - kept
        # A level set later, and on the Rust side's logger alone, is followed at the next
        # call: the records reach Python...
        caplog.set_level(logging.DEBUG, logger="transportd.native")
        forwarded = _native._forwarded_events()
        c.fetch_to_file("scans", SCAN, tmp_path / "b")
        assert any("pull starting" in r.getMessage() for r in native_debug())
        assert _native._forwarded_events() - forwarded >= len(native_debug()) > 0
        assert not any(
            r.name == "transportd" and r.levelno == logging.DEBUG for r in caplog.records
        )
        # ...and stop when it is raised again.
        caplog.clear()
        caplog.set_level(logging.INFO, logger="transportd.native")
        c.fetch_to_file("scans", SCAN, tmp_path / "c")
        assert native_debug() == []
