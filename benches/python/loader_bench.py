"""What the Python package costs on top of the Rust client: one node, one dataset, three
readers of the same bytes over the same transport, interleaved so that they share the
machine's moment.

* ``rust``: ``transport-bench client`` pulling ``bench/object.bin`` into memory (the Rust
  library's ``fetch_into``): per round, its second run, into the buffer the first one
  touched; its host line is kept with the figures.
* ``fetch_into``: ``transportd.Client.fetch_into`` of the same object into a numpy array
  allocated once (the connection made before the clock starts).
* ``dataloader``: a ``torch.utils.data.DataLoader`` with ``--workers`` workers over
  ``transportd.pytorch.ShardDataset`` reading the same bytes cut into ``--shards`` objects
  (``bench/shards/``), each sample (``transportd.pytorch.Sample``) a uint8 tensor the
  worker fetched straight into, handed to the training process as DataLoader does.
  Persistent workers, and one untimed epoch first, so that a timed epoch is steady state
  (worker start-up and connections are not in it).

Each round runs every reader once per mode (``quic``, ``tls-tcp``); the report gives the
median GB/s of each and the ratios of the medians to the Rust client's (targets:
``fetch_into`` at least 0.9, the DataLoader at least 0.7).

    benches/python/run.sh [--size 1GiB] [--runs 3] [--out benches/results]

``run.sh`` builds the release binaries and the extension module (``maturin develop
--release``) and calls this with the right paths.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

import transportd
from transportd.pytorch import Connection, ShardDataset

TD = "bench.example"
# Python's ``path`` for each transport-bench mode.
PATHS = {"quic": "quic", "tls-tcp": "tcp"}

NODE_TOML = """
[identity]
svid = "identity/svid.pem"
key = "identity/svid.key"
bundle = "identity/bundle.pem"

[listen]
quic = "127.0.0.1:{port}"
tcp = "127.0.0.1:{port}"

[store]
root = "datasets"
state_dir = "state"

[audit]
dir = "audit"

[admin]
listen = "off"

[[allow]]
peer = "spiffe://bench.example/gpu/loader"
dataset = "bench"
actions = ["read"]

[limits]
chunk_size = "{chunk}"
"""


def size_arg(s: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(B|KiB|MiB|GiB)?", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r}: a size such as 1GiB, 256MiB or 4096")
    unit = {"B": 1, None: 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]
    return int(m.group(1)) * unit


def run(*args: str | os.PathLike[str], cwd: Path | None = None) -> str:
    out = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, check=False
    )
    if out.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} failed ({out.returncode}):\n{out.stderr}")
    return out.stdout


def make_site(root: Path, transportd_bin: str, size: int, shards: int, chunk: int) -> None:
    """A CA, the node's and the loader's identities, and the dataset: one object and the
    same bytes in ``shards`` objects."""
    run(transportd_bin, "ca", "init", "--trust-domain", TD, "--out", root / "ca")
    run(transportd_bin, "ca", "issue", "--ca", root / "ca", "--id",
        f"spiffe://{TD}/node/storage", "--out", root / "storage/identity")  # fmt: skip
    run(transportd_bin, "ca", "issue", "--ca", root / "ca", "--id",
        f"spiffe://{TD}/gpu/loader", "--out", root / "loader")  # fmt: skip
    data = root / "storage/datasets/bench"
    (data / "shards").mkdir(parents=True)
    per_shard = -(-size // shards)
    rng = np.random.default_rng(7)
    with (data / "object.bin").open("wb") as whole:
        for i in range(shards):
            n = min(per_shard, size - i * per_shard)
            if n <= 0:
                break
            piece = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            whole.write(piece)
            (data / f"shards/shard-{i:04d}.bin").write_bytes(piece)
    # One port for QUIC and TLS/TCP, as transport-bench's client expects of a server.
    (root / "storage/node.toml").write_text(NODE_TOML.format(chunk=chunk, port=free_port()))


def free_port() -> int:
    """A loopback port free for both TCP and UDP now."""
    for _ in range(100):
        with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    sys.exit("no loopback port free for both TCP and UDP")


def start_node(root: Path, transportd_bin: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSPORTD_")}
    with (root / "node.log").open("w") as err:
        proc = subprocess.Popen(
            [transportd_bin, "node", "--config", str(root / "storage/node.toml")],
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
        sys.exit(f"transportd node did not start: {(root / 'node.log').read_text()}")


def rust_pull(bench_bin: str, addr: str, mode: str, identity: Path, pid: int) -> tuple[float, str]:
    """The Rust client's GB/s into a buffer it already used once (two runs in one process;
    the first pays for touching fresh memory, as the Python readers' untimed first pull
    does), and the host line it printed."""
    with tempfile.TemporaryDirectory() as out:
        stdout = run(bench_bin, "client", "--server", addr, "--identity", identity,
                     "--modes", mode, "--runs", "2", "--requests", "10",
                     "--server-pid", str(pid), "--out", out)  # fmt: skip
        doc = json.loads(next(Path(out).glob("*.json")).read_text())
    host = next((ln for ln in stdout.splitlines() if ln.startswith("host:")), "host: ?")
    (row,) = [m for m in doc["modes"] if m["mode"] == mode]
    return float(row["runs_gbps"][-1]), host


def timed(f: Callable[[], int]) -> float:
    """GB/s of one call of ``f``, which returns the bytes it moved."""
    t0 = time.perf_counter()
    n = f()
    return n / 1e9 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transportd", required=True, help="the transportd binary (release)")
    ap.add_argument("--transport-bench", required=True, help="the transport-bench binary")
    ap.add_argument("--size", type=size_arg, default=1 << 30, help="dataset size [1GiB]")
    ap.add_argument("--shards", type=int, default=64, help="objects the DataLoader reads [64]")
    ap.add_argument("--chunk-size", type=size_arg, default=4 << 20, help="chunk size [4MiB]")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers [2]")
    ap.add_argument("--runs", type=int, default=3, help="rounds [3]")
    ap.add_argument("--modes", default="quic,tls-tcp", help="quic and/or tls-tcp")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in PATHS:
            ap.error(f"mode {m!r}: one of {', '.join(PATHS)}")

    with tempfile.TemporaryDirectory(prefix="transportd-pybench-") as tmp:
        root = Path(tmp)
        print(f"writing {args.size / 2**30:.2f} GiB twice (one object, {args.shards} shards)")
        make_site(root, args.transportd, args.size, args.shards, args.chunk_size)
        node, ready = start_node(root, args.transportd)
        try:
            results = measure(args, modes, root, node.pid, ready)
        finally:
            node.terminate()
            node.wait()
    report(args, modes, results)


def measure(
    args: argparse.Namespace, modes: list[str], root: Path, pid: int, ready: dict[str, str]
) -> dict[str, object]:
    identity = root / "loader"
    addrs = {"quic": ready["quic"], "tls-tcp": ready["tcp"]}
    size = args.size
    dest = np.empty(size, dtype=np.uint8)
    clients = {m: transportd.Client(addrs[m], identity=identity, path=PATHS[m]) for m in modes}
    loaders = {}
    for m in modes:
        conn = Connection(addrs[m], identity=str(identity), path=PATHS[m])
        ds = ShardDataset(conn, [("bench", "shards/")], shuffle=False)
        loaders[m] = DataLoader(
            ds, batch_size=None, num_workers=args.workers, persistent_workers=True
        )

    def epoch(m: str) -> Callable[[], int]:
        return lambda: sum(s.data.numel() for s in loaders[m])

    def pull(m: str) -> Callable[[], int]:
        return lambda: clients[m].fetch_into("bench", "object.bin", dest).nbytes

    # Untimed: the node hashes every object once, pages come into the cache, workers start.
    for m in modes:
        clients[m].fetch_into("bench", "object.bin", dest)
        assert epoch(m)() == size, "the DataLoader did not read the whole dataset"
    runs: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    host = "host: ?"
    for r in range(args.runs):
        for m in modes:
            gbps, host = rust_pull(args.transport_bench, addrs[m], m, identity, pid)
            row = runs[m]
            row.setdefault("rust", []).append(gbps)
            row.setdefault("fetch_into", []).append(timed(pull(m)))
            row.setdefault("dataloader", []).append(timed(epoch(m)))
            print(
                f"round {r + 1} {m}: rust {row['rust'][-1]:.3f}, fetch_into "
                f"{row['fetch_into'][-1]:.3f}, dataloader {row['dataloader'][-1]:.3f} GB/s",
                flush=True,
            )
    for c in clients.values():
        c.close()
    return {"runs": runs, "host": host}


def dev_shm_huge() -> str:
    """The huge-page option of the tmpfs at /dev/shm (``never`` unless mounted with one).
    A DataLoader hands each worker's tensors over in files there, filled a page at a time:
    4 KiB pages cost it several times what huge ones do, so the setting goes with the figures."""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1] == "/dev/shm":  # noqa: S108 (read, not written)
                    for opt in fields[3].split(","):
                        if opt.startswith("huge="):
                            return opt.removeprefix("huge=")
                    return "never"
    except OSError:
        pass
    return "unknown"


def report(args: argparse.Namespace, modes: list[str], results: dict[str, object]) -> None:
    runs = results["runs"]
    assert isinstance(runs, dict)
    lines = [
        f"Python package vs Rust client, {args.size / 2**30:.2f} GiB, {args.runs} rounds, "
        f"DataLoader: {args.workers} workers over {args.shards} shards",
        "| mode | rust GB/s | fetch_into GB/s (x rust) | DataLoader GB/s (x rust) |",
        "|---|---|---|---|",
    ]
    summary = {}
    for m in modes:
        med = {k: statistics.median(v) for k, v in runs[m].items()}
        summary[m] = {
            **{f"{k}_gbps": v for k, v in med.items()},
            "fetch_into_ratio": med["fetch_into"] / med["rust"],
            "dataloader_ratio": med["dataloader"] / med["rust"],
        }
        lines.append(
            f"| {m} | {med['rust']:.3f} | {med['fetch_into']:.3f} "
            f"({summary[m]['fetch_into_ratio']:.2f}) | {med['dataloader']:.3f} "
            f"({summary[m]['dataloader_ratio']:.2f}) |"
        )
    lines.append(str(results["host"]))
    lines.append(f"/dev/shm huge pages: {dev_shm_huge()}")  # noqa: S108 (a label)
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        doc = {
            "params": {k: str(v) for k, v in vars(args).items()},
            "host": results["host"],
            "dev_shm_huge": dev_shm_huge(),
            "summary": summary,
            "runs": runs,
            "commit": run("git", "rev-parse", "--short", "HEAD").strip(),
        }
        (args.out / f"python-{stamp}.json").write_text(json.dumps(doc, indent=2))
        (args.out / f"python-{stamp}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
