"""Tensors by byte range out of safetensors objects, and checkpoints pushed atomically for
readers, against a real node."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import transportd
from conftest import TD, Node, Site
from transportd import errors
from transportd.tensors import (
    INDEX_NAME,
    CheckpointCorrupt,
    CheckpointNotFound,
    InvalidSafetensors,
    UnsupportedDtype,
    load_checkpoint,
    push_checkpoint,
    read_checkpoint_index,
    read_safetensors_header,
    read_tensor,
)

MODEL = "tensors/model.safetensors"
BIG = 3 << 20  # bytes of the last tensor: the object spans four 1 MiB chunks
NUMPY_CANNOT = {"c.bf16", "j.f8e4m3", "k.f8e5m2"}


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "a.f32": torch.randn(3, 4, generator=g),
        "b.f16": torch.randn(5, generator=g).to(torch.float16),
        "c.bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "d.i64": torch.randint(-(2**40), 2**40, (7,), generator=g),
        "e.u8": torch.randint(0, 255, (2, 2, 2), generator=g).to(torch.uint8),
        "f.bool": torch.tensor([True, False, True, True, False, False]),
        "g.f64": torch.tensor(3.25, dtype=torch.float64),  # a scalar
        "h.i16": torch.zeros((0, 3), dtype=torch.int16),  # no elements
        "i.i32": torch.arange(-6, 6, dtype=torch.int32).reshape(3, 4),
        "j.f8e4m3": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "k.f8e5m2": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "l.u16": torch.arange(9, dtype=torch.int32).to(torch.uint16),
        "m.i8": torch.arange(-4, 4, dtype=torch.int8),
        "z.big": torch.randn(BIG // 4, generator=g),
    }


@pytest.fixture(scope="module")
def model(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file the safetensors package wrote, on the node."""
    local = tmp_path_factory.mktemp("tensors") / "model.safetensors"
    save_file(state(), str(local))
    site.write(f"scans/{MODEL}", local.read_bytes())
    return local


@pytest.fixture(scope="module")
def client(site: Site, node: Node) -> Iterator[transportd.Client]:
    with transportd.Client(node.tcp, identity=site.identity("loader"), path="tcp") as c:
        yield c


def poll(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, for comparing dtypes torch cannot compare (8-bit floats)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_read_tensor_equals_safetensors_get_tensor(client: transportd.Client, model: Path) -> None:
    header = read_safetensors_header(client, "scans", MODEL)
    assert set(header.tensor_names()) == set(state())
    with safe_open(str(model), framework="pt") as pt:
        for name in pt.keys():
            want = pt.get_tensor(name)
            got = read_tensor(client, "scans", MODEL, name, framework="torch", header=header)
            assert (got.dtype, got.shape) == (want.dtype, want.shape), name
            assert torch.equal(bits(got), bits(want)), name
    with safe_open(str(model), framework="np") as f:
        for name in sorted(set(state()) - NUMPY_CANNOT):
            want = f.get_tensor(name)
            got = read_tensor(client, "scans", MODEL, name, header=header)
            assert (got.dtype, got.shape) == (want.dtype, want.shape), name
            assert np.array_equal(got, want), name
    # numpy has no bfloat16 nor 8-bit floats: a typed error that says what to use.
    for name in NUMPY_CANNOT:
        with pytest.raises(UnsupportedDtype, match="torch"):
            read_tensor(client, "scans", MODEL, name, header=header)
    with pytest.raises(KeyError):
        read_tensor(client, "scans", MODEL, "no-such-tensor", header=header)
    # Without a header given, it reads one (the same values).
    got = read_tensor(client, "scans", MODEL, "i.i32")
    assert got.tolist() == state()["i.i32"].tolist()


def test_tensors_are_views_of_the_pulled_bytes_unless_asked_for_a_copy(
    client: transportd.Client, model: Path
) -> None:
    arr = read_tensor(client, "scans", MODEL, "a.f32")
    # A view of the read-only transportd.Buffer the range arrived in: no copy.
    owner = arr
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(owner, memoryview)
    assert isinstance(owner.obj, transportd.Buffer)
    assert not arr.flags.writeable
    assert not arr.flags.owndata
    with pytest.raises(ValueError, match="read-only"):
        arr[0, 0] = 1.0
    own = read_tensor(client, "scans", MODEL, "a.f32", writable=True)
    assert own.flags.writeable
    assert own.flags.owndata
    assert np.array_equal(own, arr)
    t = read_tensor(client, "scans", MODEL, "a.f32", framework="torch", writable=True)
    t[0, 0] = 42.0  # a tensor of its own: the bytes it was read from stay as they were
    assert t[0, 0] == 42.0
    assert read_tensor(client, "scans", MODEL, "a.f32")[0, 0] == arr[0, 0] != 42.0


def test_a_tensor_read_moves_ranges_not_the_object(
    client: transportd.Client, site: Site, node: Node, model: Path
) -> None:
    name = "tensors/ranges.safetensors"  # an object of this test's own, for the trail
    data = model.read_bytes()
    site.write(f"scans/{name}", data)
    size = len(data)
    # The node chunks its store's files by 1 MiB (its configuration): four chunks here.
    assert client.stat("scans", name).chunk_bytes == 1 << 20
    got = read_tensor(client, "scans", name, "d.i64")
    assert got.tolist() == state()["d.i64"].tolist()

    def transfers() -> list[dict[str, Any]]:
        records = node.audit_records(peer=f"spiffe://{TD}/gpu/loader")
        return [
            r
            for r in records
            if r["event"] == "transfer" and r["object"] == name and r["direction"] == "out"
        ]

    # Two range reads (the first chunk, for the header; the tensor's), each one chunk.
    assert poll(lambda: len(transfers()) >= 2), transfers()
    assert len(transfers()) == 2, transfers()
    assert all(r["outcome"] == "incomplete" and int(r["bytes"]) <= 1 << 20 for r in transfers()), (
        transfers()
    )
    assert sum(int(r["bytes"]) for r in transfers()) < size
    # The control: a whole pull shows as a complete transfer of every byte.
    client.fetch("scans", name)
    assert poll(lambda: len(transfers()) == 3)
    assert (transfers()[-1]["outcome"], transfers()[-1]["bytes"]) == ("complete", size)


def test_a_header_longer_than_a_chunk_is_read_whole(
    client: transportd.Client, site: Site, tmp_path: Path
) -> None:
    local = tmp_path / "long-header.safetensors"
    tensors = {"w": torch.arange(10, dtype=torch.float32)}
    save_file(tensors, str(local), metadata={"notes": "x" * (1 << 20)})  # > one 1 MiB chunk
    site.write("scans/tensors/long-header.safetensors", local.read_bytes())
    header = read_safetensors_header(client, "scans", "tensors/long-header.safetensors")
    assert header.data_start > 1 << 20
    assert header["__metadata__"]["notes"] == "x" * (1 << 20)
    got = read_tensor(client, "scans", "tensors/long-header.safetensors", "w", header=header)
    assert got.tolist() == list(range(10))


def test_garbage_headers_raise_a_typed_error(
    client: transportd.Client, site: Site, model: Path
) -> None:
    good = model.read_bytes()
    n = int.from_bytes(good[:8], "little")
    garbage = {
        "short": b"\x01\x02\x03",
        "huge-length": (2**63).to_bytes(8, "little") + b"{}" * 10,
        "length-past-end": (1000).to_bytes(8, "little") + b"{}",
        "not-json": (8).to_bytes(8, "little") + b"\xff\xfe not json at all",
        "not-an-object": (2).to_bytes(8, "little") + b"[]",
        "bad-dtype": good[:8] + good[8 : 8 + n].replace(b'"F32"', b'"F33"') + good[8 + n :],
        "offsets-past-end": good[: 8 + n] + good[8 + n : -(1 << 20)],
        "size-mismatch": good[:8] + good[8 : 8 + n].replace(b'"shape":[3,4]', b'"shape":[4,4]')
        + good[8 + n :],
    }  # fmt: skip
    for what, data in garbage.items():
        site.write(f"scans/tensors/garbage-{what}.safetensors", data)
        with pytest.raises(InvalidSafetensors) as e:
            read_safetensors_header(client, "scans", f"tensors/garbage-{what}.safetensors")
        assert isinstance(e.value, ValueError)
        assert isinstance(e.value, errors.TransportError)
        assert e.value.code == "invalid_safetensors", what
    # The control: the file they were made from is valid.
    assert "a.f32" in read_safetensors_header(client, "scans", MODEL)


# A push in its own process that stops for good once two shards are committed, before the
# index: the parent kills it there (SIGKILL).
PUSHER = """
import sys
import numpy as np
import transportd
from transportd.tensors import push_checkpoint

node, identity, prefix, seed = sys.argv[1:]
rng = np.random.default_rng(int(seed))
state = {f"layer.{i}": rng.standard_normal(16384).astype(np.float32) for i in range(5)}
committed = []

def on_part(name, report):
    committed.append(name)
    if len(committed) == 2:
        print("committed", flush=True)
        sys.stdin.read()  # the parent never writes: wait here until killed

with transportd.Client(node, identity=identity, path="tcp") as c:
    push_checkpoint(c, state, "checkpoints", prefix, max_shard_bytes=65536, on_part=on_part)
print("finished", flush=True)
"""


def killed_push(site: Site, node: Node, client: transportd.Client, prefix: str, seed: int) -> int:
    """Runs a push, kills it after its second shard is committed; returns the number of its
    shards on the node."""
    before = {e.path for e in client.list_objects("checkpoints", f"{prefix}/")}
    with subprocess.Popen(
        [sys.executable, "-c", PUSHER, node.tcp, str(site.identity("loader")), prefix, str(seed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as p:
        assert p.stdout is not None
        try:
            assert p.stdout.readline().strip() == "committed"

            def new_shards() -> set[str]:
                now = {e.path for e in client.list_objects("checkpoints", f"{prefix}/")}
                return {o for o in now - before if o.endswith(".safetensors")}

            # Poll the node: the pushed shards are there before the kill.
            assert poll(lambda: len(new_shards()) >= 2)
            p.send_signal(signal.SIGKILL)
        finally:
            p.kill()
            p.wait()
        assert p.returncode == -signal.SIGKILL
    return len(new_shards())


def test_a_killed_checkpoint_push_is_invisible_and_a_complete_one_round_trips(
    site: Site, node: Node, client: transportd.Client
) -> None:
    prefix = "runs/exp-1/step-100"
    # A push killed midway: shards committed, no index. No checkpoint for readers.
    assert killed_push(site, node, client, prefix, seed=1) == 2
    listed = [e.path for e in client.list_objects("checkpoints", f"{prefix}/")]
    assert len(listed) == 2
    assert all(p.endswith(".safetensors") for p in listed)
    with pytest.raises(CheckpointNotFound) as e:
        load_checkpoint(client, "checkpoints", prefix)
    assert isinstance(e.value, errors.NotFound)
    assert e.value.code == "checkpoint_not_found"
    with pytest.raises(CheckpointNotFound):
        read_checkpoint_index(client, "checkpoints", prefix)

    # A complete push over the same prefix: visible whole, equal to the source.
    source = {k: v for k, v in state().items() if k != "z.big"}
    source["z.small"] = torch.randn(1000)
    index = push_checkpoint(client, source, "checkpoints", prefix, max_shard_bytes=2048)
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert set(index["parts"]) == shards
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in source.values()
    )
    got = load_checkpoint(client, "checkpoints", prefix, framework="torch")
    assert set(got) == set(source)
    for k, v in source.items():
        assert (got[k].dtype, got[k].shape) == (v.dtype, v.shape), k
        assert torch.equal(bits(got[k]), bits(v)), k
    # The index's roots are the node's.
    checked = read_checkpoint_index(client, "checkpoints", prefix)
    for rel, part in checked["parts"].items():
        assert client.stat("checkpoints", f"{prefix}/{rel}").root == part["root"]

    # Another push killed midway over the same prefix: readers still see the complete one.
    assert killed_push(site, node, client, prefix, seed=2) == 2
    again = load_checkpoint(client, "checkpoints", prefix, framework="torch")
    assert all(torch.equal(bits(again[k]), bits(v)) for k, v in source.items())

    # The check fires: a part replaced behind the index's back.
    victim = sorted(shards)[0]
    tampered = bytearray(client.fetch("checkpoints", f"{prefix}/{victim}"))
    tampered[-1] ^= 0x01  # one bit of a tensor: same size, a valid file, other values
    client.push_bytes("checkpoints", f"{prefix}/{victim}", tampered)
    with pytest.raises(CheckpointCorrupt):
        read_checkpoint_index(client, "checkpoints", prefix)
    with pytest.raises(CheckpointCorrupt) as c:
        load_checkpoint(client, "checkpoints", prefix)
    assert isinstance(c.value, errors.Corrupt)
    assert c.value.code == "checkpoint_corrupt"


def test_a_checkpoint_directory_is_pushed_as_it_is(
    client: transportd.Client, model: Path, tmp_path: Path
) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors").write_bytes(model.read_bytes())
    (d / "config.json").write_text('{"hidden_size": 4}')
    index = push_checkpoint(client, d, "checkpoints", "runs/hf-dir")
    assert set(index["weight_map"]) == set(state())
    assert {rel.rsplit("/", 1)[1] for rel in index["parts"]} == {
        "model.safetensors",
        "config.json",
    }
    assert client.stat("checkpoints", f"runs/hf-dir/{INDEX_NAME}").size > 0
    got = load_checkpoint(client, "checkpoints", "runs/hf-dir", framework="torch")
    assert torch.equal(got["i.i32"], state()["i.i32"])
    assert torch.equal(bits(got["c.bf16"]), bits(state()["c.bf16"]))
    # numpy cannot hold its bfloat16 and 8-bit floats: a typed error, not a silent cast.
    with pytest.raises(UnsupportedDtype, match="torch"):
        load_checkpoint(client, "checkpoints", "runs/hf-dir")


def test_import_transportd_imports_no_framework() -> None:
    # A fresh interpreter: the tensor functions are exported, their frameworks not imported.
    heavy = ("torch", "numpy", "safetensors", "fsspec", "pyarrow")
    code = "import sys, transportd\nprint(*[m for m in sys.argv[1:] if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code, *heavy], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert out.stdout.split() == []
    # The control: the check sees an import (transportd.fs brings fsspec).
    code = code.replace("transportd\n", "transportd.fs\n")
    out = subprocess.run([sys.executable, "-c", code, *heavy], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert "fsspec" in out.stdout.split()
