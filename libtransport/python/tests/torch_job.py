"""What the PyTorch and cache tests run in processes of their own: ranks of a training job,
a resumed job, processes sharing a cache. Not a test module (pytest collects test_*.py).

    python tests/torch_job.py '{"job": "epochs", ...}'

Each job reads its parameters from the JSON argument and writes what it saw as JSON lines
to ``out``: one line per sample (dataset, object, the bytes in hex, the DataLoader worker).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transportd import Client
from transportd.cache import Cache

# The cache's jobs do without torch (it takes seconds to import); the others import it.
if TYPE_CHECKING:
    from transportd.pytorch import ShardDataset


def record(dataset: str, object: str, data: memoryview) -> tuple[str, str, str, int]:
    """The decode of these jobs: what the test compares, and which worker yielded it."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return dataset, object, bytes(data).hex(), info.id if info is not None else -1


def shards(p: dict[str, Any]) -> ShardDataset:
    from transportd.pytorch import Connection, ShardDataset

    return ShardDataset(
        Connection(p["node"], identity=p["identity"], path="quic"),
        [tuple(s) for s in p["sources"]],
        seed=p["seed"],
        decode=record,
    )


def write(out: Any, samples: Any, **extra: Any) -> int:
    n = 0
    for dataset, object, data, worker in samples:
        line = {"dataset": dataset, "object": object, "data": data, "worker": worker, **extra}
        out.write(json.dumps(line) + "\n")
        n += 1
    return n


def epochs(p: dict[str, Any]) -> None:
    """One rank (RANK and WORLD_SIZE set by the test) running through epochs with a
    DataLoader of two workers; a second dataset object runs the first epoch again."""
    from torch.utils.data import DataLoader

    with open(p["out"], "w") as out:
        for run, epoch in p["runs"]:
            ds = shards(p)
            ds.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=None, num_workers=p["workers"])
            write(out, loader, epoch=epoch, run=run)


def stop(p: dict[str, Any]) -> None:
    """Takes ``take`` samples under a StatefulDataLoader, saves its state and quits."""
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    ds = shards(p)
    ds.set_epoch(p["epoch"])
    loader = StatefulDataLoader(ds, batch_size=None, num_workers=p["workers"])
    taken = []
    for sample in loader:
        taken.append(sample)
        if len(taken) == p["take"]:
            break
    torch.save(loader.state_dict(), p["state"])
    with open(p["out"], "w") as out:
        write(out, taken)


def resume(p: dict[str, Any]) -> None:
    """Resumes from the saved state twice, in this fresh process: with another number of
    workers (the loader's state given to the dataset, a new loader), and with the same
    number (the state given to the loader)."""
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    saved = torch.load(p["state"], weights_only=True)
    other = shards(p)
    other.load_state_dict(saved)
    remaining = other.remaining(saved)
    loader = StatefulDataLoader(other, batch_size=None, num_workers=p["other_workers"])
    with open(p["out"], "w") as out:
        write(out, loader, how="other")
        same = shards(p)
        loader = StatefulDataLoader(same, batch_size=None, num_workers=p["workers"])
        loader.load_state_dict(saved)
        write(out, loader, how="same")
        out.write(json.dumps({"remaining": remaining}) + "\n")


def hold(p: dict[str, Any]) -> None:
    """Holds a cache entry open until told to let go on stdin."""
    cache = Cache(p["cache"], p["budget"])
    with Client(p["node"], identity=p["identity"], path="quic") as c:
        entry = cache.open(c, p["dataset"], p["object"])
        print("held", flush=True)
        sys.stdin.readline()
        entry.close()
        print("released", flush=True)


def fill(p: dict[str, Any]) -> None:
    """Reads objects through a shared cache once the test says go (a file appears)."""
    cache = Cache(p["cache"], p["budget"])
    with Client(p["node"], identity=p["identity"], path="quic") as c:
        print("ready", flush=True)
        go = Path(p["go"])
        while not go.exists():
            time.sleep(0.01)
        with open(p["out"], "w") as out:
            for dataset, object in p["objects"]:
                data = cache.read(c, dataset, object)
                out.write(json.dumps({"object": object, "data": data.hex()}) + "\n")
            out.write(json.dumps({"hits": cache.hits, "misses": cache.misses}) + "\n")


if __name__ == "__main__":
    params = json.loads(sys.argv[1])
    {"epochs": epochs, "stop": stop, "resume": resume, "hold": hold, "fill": fill}[params["job"]](
        params
    )
