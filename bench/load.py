"""LoadModel wall time against the in-process ways of loading the same checkpoint.

For each model: (a) the naive in-process path (construct with random init,
torch.load, load_state_dict, .to), (b) the best in-process path (construct on the
meta device, torch.load(mmap=True), load_state_dict(assign=True), .to), and the
served path (LoadModel over gRPC into a server process, which does (b) plus its
bookkeeping). All read the same file from a warm page cache. Targets: served within
1.3x of (b) and at least 4x faster than (a).

    python bench/load.py [--models resnet50 vgg16] [--repeat 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from common import ServerProcess, machine, table
from modelhost.client import ModelHostClient


def naive(name: str, path: Path, device: str) -> float:
    started = time.perf_counter()
    model = torchvision.models.get_model(name)
    model.load_state_dict(torch.load(path, weights_only=True))
    model.to(device).eval()
    _sync(device)
    return time.perf_counter() - started


def best(name: str, path: Path, device: str) -> float:
    started = time.perf_counter()
    with torch.device("meta"):
        model = torchvision.models.get_model(name)
    state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    model.load_state_dict(state, assign=True)
    model.to(device).eval()
    _sync(device)
    return time.perf_counter() - started


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def served(client: ModelHostClient, name: str, device: str) -> float:
    started = time.perf_counter()
    client.load_model(name, architecture=name, checkpoint=name, device=device)
    elapsed = time.perf_counter() - started
    client.unload_model(name)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        with (
            ServerProcess.start(store, args=["--device", args.device]) as server,
            ModelHostClient(server.target, timeout=600) as client,
        ):
            for name in args.models:
                torch.manual_seed(0)
                path = Path(tmp) / f"{name}.pt"
                torch.save(torchvision.models.get_model(name).state_dict(), path)
                client.save_checkpoint(name, path)
                for fn in (naive, best):  # warm the page cache and lazy imports
                    fn(name, path, args.device)
                served(client, name, args.device)
                times: dict[str, list[float]] = {"naive": [], "best": [], "served": []}
                for _ in range(args.repeat):  # interleaved, so drift hits all three alike
                    times["naive"].append(naive(name, path, args.device))
                    times["best"].append(best(name, path, args.device))
                    times["served"].append(served(client, name, args.device))
                med = {k: sorted(v)[len(v) // 2] * 1000 for k, v in times.items()}
                rows.append(
                    [
                        name,
                        f"{path.stat().st_size / 1e6:,.0f} MB",
                        med["naive"],
                        med["best"],
                        med["served"],
                        f"{med['served'] / med['best']:.2f}x",
                        f"{med['naive'] / med['served']:.1f}x",
                    ]
                )
    print(f"LoadModel on {args.device}, median of {args.repeat} ({machine()})")
    print(
        table(
            [
                "model",
                "checkpoint",
                "(a) naive ms",
                "(b) best ms",
                "served ms",
                "served / (b)",
                "(a) / served",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
