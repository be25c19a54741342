"""Identity from the SPIFFE Workload API: an issuer, a node whose agent attests with a join
token and serves the Workload API, and a registration entry for this process's uid."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import transportd
from conftest import TD, random_bytes, run, spawn_ready
from transportd import errors

ISSUER_TOML = """
trust_domain = "{td}"
listen = "127.0.0.1:0"
data_dir = "data"
[ca]
ttl = "12h"
[svid]
ttl = "1h"
sync_interval = "1s"
[audit]
dir = "audit"
"""

AGENT_NODE_TOML = """
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
listen = "off"

[[allow]]
peer = "spiffe://{td}/gpu/py-loader"
dataset = "scans"
actions = ["read"]

[limits]
chunk_size = "1MiB"
"""


@pytest.fixture(scope="module")
def agent_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("workload")
    issuer_dir = root / "issuer"
    issuer_dir.mkdir()
    config = issuer_dir / "issuer.toml"
    config.write_text(ISSUER_TOML.format(td=TD))
    issuer, ready = spawn_ready(["issuer", "--config", str(config)], root / "issuer.log")
    procs: list[subprocess.Popen[str]] = [issuer]
    try:

        def admin(*args: str) -> str:
            return run("issuer", *args, "--config", str(config)).stdout

        node_id = f"spiffe://{TD}/node/gpu-0"
        node = root / "gpu-0"
        (node / "run").mkdir(parents=True)
        (node / "bootstrap-bundle.pem").write_text(admin("bundle"))
        (node / "join-token").write_text(admin("token", "create", "--node", node_id).strip())
        (node / "node.toml").write_text(AGENT_NODE_TOML.format(issuer=ready["listen"], td=TD))
        admin("entry", "create", "--spiffe-id", f"spiffe://{TD}/gpu/py-loader",
              "--parent-id", node_id, "--selector", f"unix:uid:{os.geteuid()}")  # fmt: skip
        data = random_bytes((2 << 20) + 9, 21)
        (node / "datasets/scans").mkdir(parents=True)
        (node / "datasets/scans/shard-0.bin").write_bytes(data)
        proc, up = spawn_ready(["node", "--config", str(node / "node.toml")], root / "node.log")
        procs.append(proc)
        yield {
            "quic": up["quic"],
            "tcp": up["tcp"],
            "id": up["id"],
            "socket": up["workload_socket"],
            "audit": str(node / "audit"),
            "data": data.hex(),
        }
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=20)


def connect_when_issued(node: dict[str, str], path: str, **kw: str) -> transportd.Client:
    """The entry reaches the agent at its next sync: until then the Workload API has no
    SVID for us (a retriable IdentityError)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return transportd.Client(node[path], path=path, **kw)  # type: ignore[arg-type]
        except errors.IdentityError as e:
            if not e.retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.mark.parametrize("path", ["quic", "tcp"])
def test_identity_from_the_workload_api(
    agent_node: dict[str, str], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytes.fromhex(agent_node["data"])
    # SPIFFE_ENDPOINT_SOCKET, as SPIRE's clients take it.
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", f"unix://{agent_node['socket']}")
    with connect_when_issued(agent_node, path) as c:
        assert c.server_id == agent_node["id"]
        assert bytes(c.fetch("scans", "shard-0.bin")) == data
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET")
    # Or the socket named, asking for the ID by name.
    with connect_when_issued(
        agent_node,
        path,
        workload_socket=agent_node["socket"],
        workload_id=f"spiffe://{TD}/gpu/py-loader",
    ) as c:
        assert c.stat("scans", "shard-0.bin").size == len(data)
    # The node saw the workload's own identity.
    out = run("audit", "query", agent_node["audit"], "--peer", f"spiffe://{TD}/gpu/py-loader",
              "--event", "transfer", "--json")  # fmt: skip
    assert out.stdout.strip(), "no transfer of the workload in the node's trail"


def test_a_socket_nobody_serves_is_an_identity_error(tmp_path: Path) -> None:
    with pytest.raises(errors.IdentityError) as e:
        transportd.Client("127.0.0.1:9", workload_socket=f"unix://{tmp_path}/none.sock")
    assert e.value.code == "workload_api"
