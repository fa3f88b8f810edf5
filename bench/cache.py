"""The model cache: more resnet18 variants than the device budget holds, under load.

1. Page-in cost, by tier, on an otherwise idle server whose budget holds one variant:
   requests alternate between two, so each one pages its version in. The server's own
   page-in time (mean of modelhost_page_in_seconds: the copy or the load; it excludes the
   wait for room and the eviction that made it, the other variant's copy to the host) is
   compared with a fresh LoadModel of the same checkpoint on the same server (mean of
   modelhost_load_seconds) and, on a GPU, with the bare host-to-device copy of the same
   bytes, measured in this process: one pinned buffer the size of the host tier's, one
   copy (what a host-tier page-in does, without re-pointing the weights). Targets: a
   store-tier page-in no slower than a fresh load; a host-tier one within 2x of the bare
   copy. This table is printed as soon as it is measured, before the mixes.
2. `--models` variants (distinct weights) with a budget that holds `--fraction` of them,
   a Zipf mix (s = `--zipf`) from `--clients` clients for `--seconds`: hit ratio (the
   server's modelhost_cache_requests_total), client p50 and p99.
3. The same mix against a server with everything resident: hits should keep its p50
   (within 10%).

    python bench/cache.py [--models 16] [--seconds 60] [--clients 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import torch
import torchvision
from prometheus_client.parser import text_string_to_metric_families

from common import ServerProcess, free_port, machine, table
from modelhost.client import ModelHostClient, codec
from modelhost.client.channel import channel_options
from modelhost.client.predict import CACHE_TRAILER
from modelhost.server.host_tier import layout
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc

CLAIM_OUTCOMES = ("got_room", "lapsed", "given_up")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the server's /metrics, by name and labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def mean_of(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    key = tuple(sorted(labels.items()))
    count = samples.get((name + "_count", key), 0.0)
    return samples.get((name + "_sum", key), 0.0) / count if count else float("nan")


def bare_copy_seconds(model: torch.nn.Module, device: str, repeat: int = 5) -> float:
    """One host-to-device copy of a pinned buffer the size of the host tier's buffer for
    `model` (its weights at their aligned places), fastest of `repeat`."""
    if not device.startswith("cuda"):
        return float("nan")
    pinned = torch.empty(layout(model)[1], dtype=torch.uint8, pin_memory=True)
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        started = time.perf_counter()
        on_device = pinned.to(device, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
        del on_device
    return best


class Server:
    """A server process with a metrics port, and `count` resnet18 variants loaded."""

    def __init__(self, store: Path, device: str, budget: int, count: int) -> None:
        self.metrics_port = free_port()
        args = ["--device", device, "--metrics-port", str(self.metrics_port)]
        if budget:
            args += ["--device-memory-budget", str(budget)]
        self.process = ServerProcess.start(store, args=args)
        self.client = ModelHostClient(self.process.target, timeout=300)
        self.names = [f"r18-{i}" for i in range(count)]
        for name in self.names:
            self.client.load_model(name, architecture="resnet18", checkpoint=name)

    def close(self) -> None:
        self.client.close()
        self.process.stop()


def zipf_run(
    target: str, names: list[str], x: np.ndarray, *, clients: int, seconds: float, s: float
) -> dict[str, list[float]]:
    """Latencies of a Zipf-distributed model choice from `clients` threads, by what each
    answer's "modelhost-cache" trailer says: "hit" or "miss"."""
    weights = [1 / (rank + 1) ** s for rank in range(len(names))]
    latencies: dict[str, list[float]] = {"hit": [], "miss": []}
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    tensor = codec.from_numpy(x)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        own: list[tuple[str, float]] = []
        with grpc.insecure_channel(target, options=channel_options()) as channel:
            predict = modelhost_pb2_grpc.ModelHostStub(channel).Predict
            while time.monotonic() < stop:
                request = pb.PredictRequest(
                    model=rng.choices(names, weights)[0], inputs={"input": tensor}
                )
                started = time.perf_counter()
                _, call = predict.with_call(request, timeout=300)
                elapsed = time.perf_counter() - started
                own.append((dict(call.trailing_metadata())[CACHE_TRAILER], elapsed))
        with lock:
            for result, elapsed in own:
                latencies[result].append(elapsed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def pct(values: list[float], q: float) -> float:
    return 1000 * float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--rounds", type=int, default=5, help="page-ins per tier measured")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    model = torchvision.models.resnet18()
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    budget = int(args.fraction * args.models * weight_bytes * 1.05)
    print(f"# {machine()}", flush=True)
    print(
        f"# {args.models} resnet18 variants of {weight_bytes / 2**20:.1f} MiB, device budget "
        f"{budget / 2**20:.0f} MiB (about {args.fraction:.0%} of them), {args.clients} clients, "
        f"Zipf s={args.zipf}, {args.seconds:.0f} s per run, input {list(x.shape)}, {args.device}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        with ServerProcess.start(store) as uploader, ModelHostClient(uploader.target) as c:
            for i in range(args.models):
                torch.manual_seed(i)
                c.save_checkpoint(f"r18-{i}", torchvision.models.resnet18().state_dict())

        # 1. Page-in cost on an idle server with room for one variant.
        single = Server(store, args.device, int(weight_bytes * 1.5), 2)
        try:
            for _ in range(args.rounds):
                for name in single.names:
                    single.client.predict(name, x)
            loads = []
            for i in range(args.rounds):
                single.client.load_model(
                    "fresh", architecture="resnet18", checkpoint="r18-0", version=i + 1
                )
                # Read while it is loaded: a name's series go when its last version does.
                loads.append(
                    mean_of(scrape(single.metrics_port), "modelhost_load_seconds", model="fresh")
                )
                single.client.unload_model("fresh")
            idle = scrape(single.metrics_port)
        finally:
            single.close()
        tiers = {
            tier: mean_of(idle, "modelhost_page_in_seconds", tier=tier)
            for tier in ("host", "store")
        }
        fresh_load = float(np.mean(loads)) if loads else float("nan")
        bare = bare_copy_seconds(model, args.device)
        print()
        print(
            table(
                [
                    "page-in from",
                    "mean ms",
                    "fresh LoadModel ms",
                    "bare H2D copy ms",
                    "vs load",
                    "vs copy",
                ],
                [
                    [tier, 1000 * t, 1000 * fresh_load, 1000 * bare, t / fresh_load, t / bare]
                    for tier, t in tiers.items()
                    if not np.isnan(t)  # the tiers that were used
                ],
            )
        )
        print(
            "page-in: the copy (host) or the load (store), without the wait for room or the "
            "eviction that made it; bare copy: one pinned buffer of the same bytes, one copy",
            flush=True,
        )

        def mix(budget: int) -> tuple[dict[str, list[float]], dict[str, float]]:
            """Latencies of the Zipf mix, and how many requests hit and missed."""
            server = Server(store, args.device, budget, args.models)
            try:
                before = scrape(server.metrics_port)
                latencies = zipf_run(
                    server.process.target,
                    server.names,
                    x,
                    clients=args.clients,
                    seconds=args.seconds,
                    s=args.zipf,
                )
                after = scrape(server.metrics_port)
            finally:
                server.close()
            counts = {
                value: after.get((name, ((label, value),)), 0.0)
                - before.get((name, ((label, value),)), 0.0)
                for name, label, values in (
                    ("modelhost_cache_requests_total", "result", ("hit", "miss")),
                    ("modelhost_room_claims_total", "outcome", CLAIM_OUTCOMES),
                )
                for value in values
            }
            return latencies, counts

        # 2. The Zipf mix with room for a fraction of the variants; 3. with room for all.
        latencies, counts = mix(budget)
        hit, miss = counts["hit"], counts["miss"]
        baseline, _ = mix(0)

    print()
    hits, misses, every = latencies["hit"], latencies["miss"], baseline["hit"]
    print(
        table(
            ["server", "requests", "hit ratio", "p50 ms", "p99 ms", "p50 vs all resident"],
            [
                [
                    "cache: hits",
                    len(hits),
                    hit / (hit + miss),
                    pct(hits, 50),
                    pct(hits, 99),
                    pct(hits, 50) / pct(every, 50),
                ],
                [
                    "cache: misses",
                    len(misses),
                    "",
                    pct(misses, 50),
                    pct(misses, 99),
                    pct(misses, 50) / pct(every, 50),
                ],
                ["all resident", len(every), 1.0, pct(every, 50), pct(every, 99), 1.0],
            ],
        )
    )
    claims = ", ".join(f"{o} {counts[o]:.0f}" for o in CLAIM_OUTCOMES)
    print(f"claims on room held by busy versions during the cache's mix: {claims}")


if __name__ == "__main__":
    main()
