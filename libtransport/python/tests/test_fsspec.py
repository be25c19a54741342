"""``transportd://`` through fsspec, pyarrow and pandas against a real node."""

from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_client import leaks

import transportd
from conftest import TD, Node, Site, random_bytes
from transportd import errors
from transportd.fs import PathNotFound, TransportdFileSystem

TABLE = "fsspec/tables/part-0.parquet"
BLOB = "fsspec/blobs/stream.bin"
BLOB_LEN = (3 << 20) + 12345  # four chunks of 1 MiB, the last partial


@pytest.fixture(scope="module")
def table(site: Site) -> pa.Table:
    n = 5000
    t = pa.table(
        {
            "id": pa.array(range(n), type=pa.int64()),
            "value": pa.array([i * 0.5 for i in range(n)], type=pa.float64()),
            "label": pa.array([f"ward-{i % 13}" for i in range(n)]),
        }
    )
    out = io.BytesIO()
    pq.write_table(t, out, row_group_size=1000)
    site.write(f"scans/{TABLE}", out.getvalue())
    site.write("scans/fsspec/tables/README", b"two tables\n")
    site.write("scans/fsspec/tables/2026/part-1.parquet", out.getvalue())
    return t


@pytest.fixture(scope="module")
def blob(site: Site) -> bytes:
    data = random_bytes(BLOB_LEN, 21)
    site.write(f"scans/{BLOB}", data)
    return data


def poll(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Whether ``cond`` holds within ``timeout`` seconds (the trail is written as transfers
    end, which can be just after the client has its bytes)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def options(site: Site, path: str, who: str = "loader") -> dict[str, Any]:
    return {"identity": str(site.identity(who)), "path": path}


def filesystem(site: Site, node: Node, path: str, who: str = "loader") -> TransportdFileSystem:
    fs = fsspec.filesystem("transportd", node=node.addr(path), **options(site, path, who))
    assert isinstance(fs, TransportdFileSystem)
    return fs


def url(node: Node, path: str, obj: str) -> str:
    return f"transportd://{node.addr(path)}/{obj}"


def test_pyarrow_and_pandas_read_parquet_through_transportd_urls(
    site: Site, node: Node, table: pa.Table, path: str, tmp_path: Path
) -> None:
    local = tmp_path / "local.parquet"
    local.write_bytes(site.path(f"storage/datasets/scans/{TABLE}").read_bytes())
    expected = pq.read_table(local)
    assert expected.equals(table)

    fs = filesystem(site, node, path)
    assert pq.read_table(f"scans/{TABLE}", filesystem=fs).equals(expected)
    # A column and a filter: pyarrow reads parts of the file (footer, column chunks).
    got = pq.read_table(f"scans/{TABLE}", filesystem=fs, columns=["value"])
    assert got.equals(expected.select(["value"]))

    df = pd.read_parquet(url(node, path, f"scans/{TABLE}"), storage_options=options(site, path))
    pd.testing.assert_frame_equal(df, pd.read_parquet(local))
    df = pd.read_parquet(f"scans/{TABLE}", filesystem=fs)
    pd.testing.assert_frame_equal(df, pd.read_parquet(local))


def test_cat_file_returns_exactly_the_bytes_asked_for(
    site: Site, node: Node, blob: bytes, path: str
) -> None:
    fs = filesystem(site, node, path)
    n = len(blob)
    ranges = [
        (None, None),
        (0, 10),
        (10, 20),
        ((1 << 20) - 7, (2 << 20) + 9),  # across chunk boundaries
        (5, None),  # open-ended
        (None, 100),
        (-100, None),  # the last 100 bytes
        (-(2 << 20), -(1 << 20)),  # counted from the end, both
        (None, -5),
        (n - 3, n + 1000),  # past the end: cut at the end
        (-2 * n, 10),  # before the start: from the start
        (n + 5, None),  # nothing
        (20, 10),  # nothing
        (0, 0),
    ]
    for start, end in ranges:
        got = fs.cat_file(f"scans/{BLOB}", start=start, end=end)
        assert got == blob[start:end], (start, end, len(got))
    # The same through a full URL, and fsspec's cat_ranges.
    assert fs.cat_file(url(node, path, f"scans/{BLOB}"), start=-7) == blob[-7:]
    starts, ends = [0, 1 << 20, n - 10], [10, (1 << 20) + 10, n]
    assert fs.cat_ranges([f"scans/{BLOB}"] * 3, starts, ends) == [
        blob[s:e] for s, e in zip(starts, ends, strict=True)
    ]


def test_ls_and_info_agree_with_the_node(
    site: Site, node: Node, table: pa.Table, blob: bytes, path: str
) -> None:
    fs = filesystem(site, node, path)
    c = fs.client
    assert fs.ls("", detail=False) == c.list_datasets() == ["checkpoints", "scans"]
    assert fs.ls("") == [
        {"name": "checkpoints", "size": 0, "type": "directory"},
        {"name": "scans", "size": 0, "type": "directory"},
    ]
    sizes = {e.path: e.size for e in c.list_objects("scans", "fsspec/")}
    assert fs.ls("scans/fsspec", detail=False) == ["scans/fsspec/blobs", "scans/fsspec/tables"]
    tables = {e["name"]: e for e in fs.ls("scans/fsspec/tables")}
    assert tables == {
        "scans/fsspec/tables/2026": {
            "name": "scans/fsspec/tables/2026",
            "size": 0,
            "type": "directory",
        },
        "scans/fsspec/tables/README": {
            "name": "scans/fsspec/tables/README",
            "size": sizes["fsspec/tables/README"],
            "type": "file",
        },
        f"scans/{TABLE}": {"name": f"scans/{TABLE}", "size": sizes[TABLE], "type": "file"},
    }
    # The whole dataset's top level agrees with the node's listing.
    top = {e.path.split("/")[0] for e in c.list_objects("scans")}
    assert fs.ls("scans", detail=False) == sorted(f"scans/{t}" for t in top)
    # A path naming an object lists that object.
    assert fs.ls(f"scans/{BLOB}", detail=False) == [f"scans/{BLOB}"]

    info = fs.info(url(node, path, f"scans/{BLOB}"))
    st = c.stat("scans", BLOB)
    assert info == {
        "name": f"scans/{BLOB}",
        "size": BLOB_LEN,
        "type": "file",
        "root": st.root,
        "chunk_bytes": st.chunk_bytes,
    }
    assert fs.info("scans/fsspec/blobs")["type"] == "directory"
    assert fs.info("scans")["type"] == "directory"
    assert fs.isfile(f"scans/{BLOB}")
    assert not fs.isdir(f"scans/{BLOB}")
    assert fs.isdir("scans/fsspec")
    assert not fs.isfile("scans/fsspec")
    assert fs.exists(f"scans/{BLOB}")
    assert fs.exists("scans/fsspec/tables/2026")
    for missing in ("scans/fsspec/nothing", "scans/fsspec/blobs/stream", "no-such-dataset"):
        assert not fs.exists(missing)
        with pytest.raises(FileNotFoundError):
            fs.info(missing)
    with pytest.raises(FileNotFoundError):
        fs.ls("scans/fsspec/nothing")
    assert fs.glob("scans/fsspec/tables/*.parquet") == [f"scans/{TABLE}"]
    assert fs.find("scans/fsspec/tables") == sorted(
        f"scans/fsspec/tables/{p}" for p in ("2026/part-1.parquet", "README", "part-0.parquet")
    )


def test_open_streams_a_larger_object_in_pieces(
    site: Site, node: Node, blob: bytes, path: str
) -> None:
    fs = filesystem(site, node, path)
    name = f"fsspec/blobs/open-{path}.bin"  # an object of this test's own, for the trail
    site.write(f"scans/{name}", blob)
    pieces = []
    with fs.open(url(node, path, f"scans/{name}"), "rb", block_size=1 << 20) as f:
        assert f.size == BLOB_LEN
        while piece := f.read(300_007):
            pieces.append(piece)
        assert f.tell() == BLOB_LEN
        f.seek(-10, os.SEEK_END)
        assert f.read() == blob[-10:]
        f.seek(1234)
        assert f.read(10) == blob[1234:1244]
    assert b"".join(pieces) == blob
    assert len(pieces) == -(-BLOB_LEN // 300_007)

    # The node served it as ranges, several, none the whole object.
    def transfers() -> list[dict[str, Any]]:
        records = node.audit_records(peer=f"spiffe://{TD}/gpu/loader")
        return [r for r in records if r["event"] == "transfer" and r["object"] == name]

    done = poll(lambda: len(transfers()) >= 3)
    assert done, transfers()
    assert all(r["outcome"] == "incomplete" for r in transfers())
    assert all(0 < int(r["bytes"]) < BLOB_LEN for r in transfers())
    # The control: a whole pull of it is a complete transfer of every byte.
    fs.client.fetch("scans", name)
    assert poll(lambda: any(r["outcome"] == "complete" for r in transfers()))
    assert [r["bytes"] for r in transfers() if r["outcome"] == "complete"] == [BLOB_LEN]


def test_put_file_pipe_file_and_writes_land_and_read_back(
    site: Site, node: Node, path: str, tmp_path: Path
) -> None:
    fs = filesystem(site, node, path)
    base = f"checkpoints/fsspec-{path}"
    stored = site.path(f"storage/datasets/{base}")

    data = random_bytes(70_000, 31)
    fs.pipe_file(f"{base}/piped.bin", data)
    assert (stored / "piped.bin").read_bytes() == data
    assert fs.cat_file(f"{base}/piped.bin") == data
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{base}/piped.bin", b"again", mode="create")

    src = tmp_path / "src.bin"
    src.write_bytes(random_bytes((2 << 20) + 1, 32))
    fs.put(str(src), url(node, path, f"{base}/put.bin"))
    assert fs.cat_file(f"{base}/put.bin") == src.read_bytes()
    assert (stored / "put.bin").read_bytes() == src.read_bytes()
    dest = tmp_path / "back" / "put.bin"
    fs.get(f"{base}/put.bin", str(dest))
    assert dest.read_bytes() == src.read_bytes()

    # Written in pieces larger than the block, pushed whole on close.
    chunks = [random_bytes(400_000, 40 + i) for i in range(3)]
    with fs.open(f"{base}/written.bin", "wb", block_size=1 << 18) as f:
        for ch in chunks:
            f.write(ch)
        assert not fs.exists(f"{base}/written.bin")  # nothing on the node before close
    assert fs.cat_file(f"{base}/written.bin") == b"".join(chunks)
    with pytest.raises(FileExistsError):
        fs.open(f"{base}/written.bin", "xb")
    # In a transaction, the push happens at the end.
    with fs.transaction:
        with fs.open(f"{base}/txn.bin", "wb") as f:
            f.write(b"committed at the end")
        assert not fs.exists(f"{base}/txn.bin")
    assert fs.cat_file(f"{base}/txn.bin") == b"committed at the end"

    # pandas writes through it too (open "wb", pushed on close).
    df = pd.DataFrame({"x": range(100), "y": [f"row-{i}" for i in range(100)]})
    df.to_parquet(url(node, path, f"{base}/frame.parquet"), storage_options=options(site, path))
    back = pd.read_parquet(url(node, path, f"{base}/frame.parquet"),
                           storage_options=options(site, path))  # fmt: skip
    pd.testing.assert_frame_equal(back, df)

    # What nodes do not do says what to do instead.
    for call in (
        lambda: fs.rm(f"{base}/piped.bin"),
        lambda: fs.rm_file(f"{base}/piped.bin"),
        lambda: fs.mv(f"{base}/piped.bin", f"{base}/moved.bin"),
        lambda: fs.open(f"{base}/piped.bin", "ab"),
    ):
        with pytest.raises(NotImplementedError, match="push"):
            call()
    assert fs.cat_file(f"{base}/piped.bin") == data
    # A dataset this identity may only read refuses the push: not found, as the node says.
    with pytest.raises(PathNotFound):
        fs.pipe_file("scans/fsspec/pushed.bin", b"no")


def test_an_identity_without_access_gets_not_found_as_file_not_found(
    site: Site, node: Node, blob: bytes, table: pa.Table, path: str
) -> None:
    fs = filesystem(site, node, path, "intruder")
    assert fs.ls("") == []
    answers: list[BaseException] = []
    for call in (
        lambda: fs.cat_file(f"scans/{BLOB}", start=0, end=10),
        lambda: fs.cat_file(f"scans/{BLOB}"),
        lambda: fs.info(f"scans/{BLOB}"),
        lambda: fs.ls("scans"),
        lambda: fs.open(f"scans/{BLOB}", "rb"),
    ):
        with pytest.raises(FileNotFoundError) as e:
            call()
        answers.append(e.value)
    assert not fs.exists(f"scans/{BLOB}")
    # pandas (through pyarrow) passes it on as a FileNotFoundError.
    with pytest.raises(FileNotFoundError):
        pd.read_parquet(url(node, path, f"scans/{TABLE}"),
                        storage_options=options(site, path, "intruder"))  # fmt: skip
    # A missing object, for an identity with access: the same answer.
    with pytest.raises(FileNotFoundError) as e:
        filesystem(site, node, path).cat_file("scans/fsspec/no-such.bin")
    answers.append(e.value)
    for a in answers:
        # Both: what fsspec users catch, and transportd's typed error with its stable code.
        assert isinstance(a, PathNotFound)
        assert isinstance(a, errors.NotFound)
        assert a.code == "not_found"
    assert {a.wire_code for a in answers if isinstance(a, PathNotFound)} <= {4, None}
    assert any(isinstance(a, PathNotFound) and a.wire_code == 4 for a in answers)
    # The control: the loader reads the same object.
    assert filesystem(site, node, path).cat_file(f"scans/{BLOB}", end=10) == blob[:10]


def test_urls_name_the_node_and_the_protocol_is_registered(site: Site, node: Node) -> None:
    fs, p = fsspec.core.url_to_fs(url(node, "tcp", f"scans/{BLOB}"), **options(site, "tcp"))
    assert isinstance(fs, TransportdFileSystem)
    assert (fs.node, p) == (node.tcp, f"scans/{BLOB}")
    assert fs.unstrip_protocol(p) == url(node, "tcp", f"scans/{BLOB}")
    assert TransportdFileSystem._strip_protocol("transportd://h:1/scans/a/b/") == "scans/a/b"
    assert TransportdFileSystem._strip_protocol("scans/a") == "scans/a"
    assert TransportdFileSystem._strip_protocol("transportd:///scans/a") == "scans/a"
    assert TransportdFileSystem._strip_protocol("transportd::scans/a") == "scans/a"
    # Pickled (as dask and spawned DataLoader workers get it): its options, not a client.
    again = pickle.loads(pickle.dumps(fs))  # noqa: S301 # our own object
    assert again.info(p)["size"] == BLOB_LEN
    with pytest.raises(ValueError, match="node"):
        _ = TransportdFileSystem(identity=site.identity("loader"), skip_instance_cache=True).ls("")
    # By the installed package's entry point: fsspec finds the class without an import of
    # transportd.fs (a fresh interpreter, so nothing imported it).
    code = (
        "import sys, fsspec\n"
        "cls = fsspec.get_filesystem_class('transportd')\n"
        "print(cls.__module__, cls.__name__)\n"
    )
    before = "import sys; from fsspec.registry import known_implementations as k; "
    before += "print('transportd.fs' in sys.modules, k['transportd']['class'])"
    out = subprocess.run([sys.executable, "-c", before], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert out.stdout.split() == ["False", "transportd.fs.TransportdFileSystem"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert out.stdout.split() == ["transportd.fs", "TransportdFileSystem"]


def test_a_filesystem_made_before_a_fork_reconnects_in_the_child(
    site: Site, node: Node, blob: bytes
) -> None:
    fs = filesystem(site, node, "quic")
    assert fs.cat_file(f"scans/{BLOB}", end=16) == blob[:16]  # connected in this process
    inherited = fs.client
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a threaded process
        pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        code = 1
        try:
            try:
                inherited.stat("scans", BLOB)
                control = "usable"
            except errors.LocalError:
                control = "refused"
            # The very instance the parent made (fsspec's cache hands out a new one here).
            got = fs.cat_file(f"scans/{BLOB}", start=-16)
            ok = got == blob[-16:] and fs.client is not inherited
            fresh = fsspec.filesystem("transportd", node=node.quic, **options(site, "quic"))
            ok = ok and fresh is not fs and fresh.cat_file(f"scans/{BLOB}", end=4) == blob[:4]
            os.write(write, f"{control} {ok}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as r:
        answer = r.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The inherited client refuses to run in the child (the control); the filesystem,
    # cached or not, made a client of the child's own and read through it.
    assert answer == "refused True"
    assert fs.client is inherited  # the parent keeps its connection
    assert transportd.Client is type(inherited)


def test_no_object_name_or_payload_reaches_a_log_record(
    site: Site, node: Node, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # Every logger at DEBUG: ours, and fsspec's (which logs files by their str()).
    caplog.set_level(logging.DEBUG)
    secret = "patient-0815-john-roe.bin"
    payload = b"CANARY-FSSPEC-" + random_bytes(48, 51).hex().encode()
    secrets = [secret, "patient-0815", payload.decode()[:24]]
    site.write(f"scans/fsspec/ward-3/{secret}", payload * 1000)
    fs = filesystem(site, node, "tcp")
    obj = f"scans/fsspec/ward-3/{secret}"
    fs.ls("scans/fsspec/ward-3")
    fs.info(obj)
    fs.cat_file(obj, start=-10)
    with fs.open(obj, "rb", block_size=1 << 16) as f:
        while f.read(10_000):
            pass
        assert secret not in repr(f)
    fs.pipe_file(f"checkpoints/fsspec-logs/{secret}", payload)
    with fs.open(f"checkpoints/fsspec-logs/w-{secret}", "wb") as f:
        f.write(payload)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"scans/fsspec/ward-3/missing-{secret}")
    records = caplog.records
    # The check looked at real records of these calls (fsspec's reads among them).
    assert any(r.name.startswith("fsspec") for r in records)
    assert sum(r.name == "transportd" for r in records) >= 8
    assert leaks(records, secrets) == []
