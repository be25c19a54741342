"""Error paths end to end, each with its typed exception and stable code: a busy node, an
object that changes under a pull, a full disk."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import transportd
from conftest import Node, Relay, Site, random_bytes
from transportd import errors


def connect(site: Site, addr: str, path: str, who: str = "loader") -> transportd.Client:
    return transportd.Client(addr, identity=site.identity(who), path=path)


@pytest.fixture(scope="module")
def busy_node(site: Site) -> Iterator[Node]:
    """A node that lets one identity hold a single connection."""
    n = site.start_node("busy", limits={"max_connections_per_identity": 1})
    yield n
    n.stop()


def test_a_node_at_its_limit_answers_busy_which_is_retriable(
    site: Site, busy_node: Node, path: str
) -> None:
    site.write("scans/busy/a.bin", b"a" * 1000)
    addr = busy_node.addr(path)
    first = connect(site, addr, path)
    try:
        assert first.stat("scans", "busy/a.bin").size == 1000
        with pytest.raises(errors.Busy) as e:
            connect(site, addr, path)
        assert e.value.code == "busy"
        assert e.value.retriable
        assert "retry later" in str(e.value)
        # The limit is the identity's: another one still gets in.
        with connect(site, addr, path, "intruder") as other:
            assert other.list_datasets() == []
    finally:
        first.close()
    # Retriable indeed: once the first connection is gone, the same call succeeds.
    deadline = time.monotonic() + 20
    while True:
        try:
            with connect(site, addr, path) as again:
                assert again.stat("scans", "busy/a.bin").size == 1000
            break
        except errors.Busy:
            assert time.monotonic() < deadline, "the node kept answering busy"
            time.sleep(0.02)


def test_an_object_rewritten_between_calls_reads_as_its_new_version(
    site: Site, node: Node, path: str
) -> None:
    name = f"changed/between-{path}.bin"
    old, new = random_bytes(3 << 20, 31), random_bytes((2 << 20) + 9, 32)
    site.write(f"scans/{name}", old)
    with connect(site, node.addr(path), path) as c:
        before = c.stat("scans", name)
        site.write(f"scans/{name}", new)
        # Each call pulls the version the node has when it asks: no error, the new bytes,
        # every chunk verified against the new manifest (whose root stat shows).
        assert bytes(c.read_range("scans", name, 0, 100)) == new[:100]
        after = c.stat("scans", name)
        assert (after.size, before.size) == (len(new), len(old))
        assert after.root != before.root


def test_an_object_that_changes_layout_under_an_interrupted_pull_raises_changed(
    site: Site, node: Node
) -> None:
    # The pull lands in the caller's buffer, laid out in 1 MiB chunks of the old version.
    # Its connection is cut once 3 MiB have come, the object is rewritten with another
    # size, and the pull resumes on a new connection: the caller's memory cannot be laid
    # out again for the new version, so the pull says the object changed.
    name = "changed/under-a-pull.bin"
    old, new = random_bytes(8 << 20, 33), random_bytes((5 << 20) + 3, 34)
    site.write(f"scans/{name}", old)
    relay = Relay(
        node.tcp, after=3 << 20, cut=True, on_cut=lambda: site.write(f"scans/{name}", new)
    )
    try:
        with connect(site, relay.addr, "tcp") as c:
            with pytest.raises(errors.Changed) as e:
                c.fetch_into("scans", name, bytearray(len(old)))
            assert relay.tripped.is_set()
            assert e.value.code == "changed"
            assert not e.value.retriable
            assert "pull it again" in str(e.value)
            # Pulling it again works: the new version.
            buf = bytearray(len(old))
            assert bytes(c.fetch_into("scans", name, buf)) == new
    finally:
        relay.close()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A store root on a 2 MiB tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("a full disk needs root, to mount a small tmpfs (CI runs as root)")
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        for ds in ("scans", "checkpoints"):
            (root / ds).mkdir()
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_a_push_into_a_full_disk_raises_no_space_and_commits_nothing(
    site: Site, full_disk: Path, path: str
) -> None:
    # A quota on partial files above the disk's size, so the push gets past the node's
    # up-front check (a quarter of this 2 MiB disk by default) to the disk itself.
    quota = {"partial_quota": "64MiB", "partial_quota_per_identity": "64MiB"}
    n = site.start_node(f"full-{path}", root=full_disk, limits=quota)
    try:
        with connect(site, n.addr(path), path) as c:
            # The control: a small object fits.
            c.push_bytes("checkpoints", "small.ckpt", b"x" * 1000)
            assert (full_disk / "checkpoints/small.ckpt").read_bytes() == b"x" * 1000
            with pytest.raises(errors.NoSpace) as e:
                c.push_bytes("checkpoints", "big.ckpt", random_bytes(4 << 20, 35))
            assert (e.value.code, e.value.wire_code) == ("no_space", 13)
            assert not e.value.retriable
            assert not (full_disk / "checkpoints/big.ckpt").exists()
    finally:
        n.stop()
