"""The package itself: its stubs match the extension module, and calls release the GIL."""

from __future__ import annotations

import ast
import socket
import threading
import time
from pathlib import Path

import pytest

import transportd
from conftest import Site
from transportd import _native, errors

STUB = Path(transportd.__file__).with_name("_native.pyi")


def stub_names() -> dict[str, set[str]]:
    """Top-level names of the stub, and the members each class declares."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = {
                n.name
                for n in node.body
                if isinstance(n, ast.FunctionDef) and not n.name.startswith("__")
            }
        elif isinstance(node, ast.FunctionDef):
            names[node.name] = set()
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = set()
    return names


def test_the_stubs_declare_what_the_module_has() -> None:
    stubs = stub_names()
    # Every name but the module's dunders (its private helpers for tests too).
    names = {n for n in dir(_native) if not n.startswith("__")} | {"__version__"}
    assert set(stubs) == names
    for name, members in stubs.items():
        obj = getattr(_native, name)
        if isinstance(obj, type):
            have = {m for m in dir(obj) if not m.startswith("__")}
            assert members == have, name
    assert Path(transportd.__file__).with_name("py.typed").exists()


def test_a_waiting_call_lets_other_threads_run(site: Site) -> None:
    # A TCP listener that accepts and never answers: the client waits in its TLS handshake.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        addr = f"127.0.0.1:{server.getsockname()[1]}"
        ticks = 0
        done = threading.Event()

        def count() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                time.sleep(0.001)

        counter = threading.Thread(target=count)
        counter.start()
        started = time.monotonic()
        try:
            with pytest.raises(errors.TransportError) as e:
                transportd.Client(
                    addr, identity=site.identity("loader"), path="tcp", connect_timeout=1.0
                )
        finally:
            done.set()
            counter.join()
        waited = time.monotonic() - started
    assert e.value.retriable, e.value
    assert waited >= 0.9
    # Held, the GIL would have stopped the counter for the whole wait.
    assert ticks > 100, ticks
