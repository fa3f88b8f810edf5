"""Soak test: many clients predict while versions are hot-swapped and checkpoints uploaded.

A server runs as a child process. N client threads (one channel each) send Predict
for two models ("alpha" and "beta", resnet18 variants, small images, 1-2 rows per
request, always the newest version) for a bounded time. Meanwhile one more client
hot-swaps versions every few seconds, alternating between the two models: it
uploads a checkpoint of freshly seeded weights, loads it as the next version,
unloads the previous version and deletes that version's checkpoint; each round it
also overwrites a scratch checkpoint of a few MB.

Every response is checked:
- it succeeded (failed: any error at all);
- the version it names was live when the request was sent: loaded (LoadModel sent
  before the response came) and not yet unloaded (UnloadModel had not returned
  before the request was sent);
- it came from the newest version: no newer version had finished loading before
  the request was sent;
- its outputs are that version's: they match the in-process reference computed
  from that version's weights (within --tolerance; batched results are not
  bit-identical).

The server's resident memory (VmRSS, and its anonymous part RssAnon, which excludes
mapped checkpoint files) is sampled throughout: start (models loaded,
before traffic), after warm-up, peak, end, and the growth and trend after warm-up.

Exits 1 if any prediction failed, named a version that was not live, was not the
newest, or did not match its version's weights, or if a swap failed.

    python bench/soak.py                          # 32 clients, 60 s
    python bench/soak.py --seconds 20 --clients 8 # quick
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import torchvision

from common import ServerProcess, machine
from modelhost.client import ModelHostClient, codec
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc as pb_grpc

MODELS = ("alpha", "beta")
NUM_CLASSES = 10
INPUTS_PER_MODEL = 16
MB = 1 << 20


def weights(seed: int) -> torch.nn.Module:
    """resnet18 with seeded random weights (and BatchNorm statistics), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model: torch.nn.Module = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
        for param in model.parameters():
            param.normal_(0, 0.05, generator=generator)
    return model.eval()


def state_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


@dataclass
class Version:
    """A version of a model as the swapper made it, with its timeline (monotonic seconds)."""

    model: str
    number: int
    seed: int
    references: list[np.ndarray[Any, Any]]
    load_sent: float
    load_done: float | None = None
    unload_sent: float | None = None
    unload_done: float | None = None


@dataclass
class Run:
    """The run as a whole: timings and the server's memory."""

    samples: list[tuple[float, int, int]]  # (monotonic time, VmRSS, RssAnon) in bytes
    start: dict[str, int]
    end: dict[str, int]
    elapsed: float = 0.0
    warmup: float = 0.0
    setup: float = 0.0
    exit_code: int = 0


@dataclass
class Stats:
    """What the clients saw."""

    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    not_live: list[str] = field(default_factory=list)
    not_newest: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    during_unload: int = 0
    served: Counter[tuple[str, int]] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, target: str) -> None:
        self.args = args
        self.target = target
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.versions: dict[tuple[str, int], Version] = {}
        self.stats = Stats()
        self.swap_errors: list[str] = []
        self.load_seconds: list[float] = []
        self.unload_seconds: list[float] = []
        self.upload_seconds: list[float] = []
        self.uploaded_bytes = 0
        rng = np.random.default_rng(args.seed)
        size = args.image_size
        self.inputs = {
            model: [
                rng.standard_normal(
                    (int(rng.integers(1, args.max_rows + 1)), 3, size, size)
                ).astype(np.float32)
                for _ in range(INPUTS_PER_MODEL)
            ]
            for model in MODELS
        }
        self.requests = {
            model: [
                pb.PredictRequest(model=model, inputs={"input": codec.from_numpy(x)})
                for x in self.inputs[model]
            ]
            for model in MODELS
        }
        self.next_seed = 1000
        self.began = 0.0
        self.server_start = 0.0

    # The swapper

    def references(self, model: str, net: torch.nn.Module) -> list[np.ndarray[Any, Any]]:
        with torch.inference_mode():
            return [net(torch.from_numpy(x)).numpy() for x in self.inputs[model]]

    def publish(self, client: ModelHostClient, model: str, number: int) -> Version:
        """Uploads fresh weights and loads them as `model` version `number`."""
        seed = self.next_seed
        self.next_seed += 1
        net = weights(seed)
        refs = self.references(model, net)
        data = state_bytes(net)
        started = time.monotonic()
        client.save_checkpoint(f"{model}-v{number}", data)
        self.upload_seconds.append(time.monotonic() - started)
        self.uploaded_bytes += len(data)
        version = Version(model, number, seed, refs, load_sent=time.monotonic())
        with self.lock:
            self.versions[(model, number)] = version
        info = client.load_model(
            model,
            architecture="resnet18",
            checkpoint=f"{model}-v{number}",
            version=number,
            architecture_args={"num_classes": NUM_CLASSES},
        )
        version.load_done = time.monotonic()
        self.load_seconds.append(version.load_done - version.load_sent)
        assert info.version == number, info
        return version

    def retire(self, client: ModelHostClient, version: Version) -> None:
        version.unload_sent = time.monotonic()
        removed = client.unload_model(version.model, version.number)
        version.unload_done = time.monotonic()
        self.unload_seconds.append(version.unload_done - version.unload_sent)
        assert removed == [version.number], removed
        client.delete_checkpoint(f"{version.model}-v{version.number}")

    def scratch_upload(self, client: ModelHostClient, rng: random.Random) -> None:
        """Overwrites a scratch checkpoint of a few MB (uploads beside the swaps)."""
        floats = rng.randint(1, 4) * MB // 4
        generator = torch.Generator().manual_seed(rng.randrange(1 << 31))
        state = {"w": torch.randn(floats, generator=generator)}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        started = time.monotonic()
        client.save_checkpoint("scratch", buffer.getvalue(), overwrite=True)
        self.upload_seconds.append(time.monotonic() - started)
        self.uploaded_bytes += buffer.tell()

    def swapper(self, current: dict[str, Version]) -> None:
        rng = random.Random(self.args.seed)
        turn = 0
        with ModelHostClient(self.target, timeout=120) as client:
            while not self.stop.wait(self.args.swap_every):
                model = MODELS[turn % len(MODELS)]
                turn += 1
                try:
                    old = current[model]
                    current[model] = self.publish(client, model, old.number + 1)
                    self.retire(client, old)
                    self.scratch_upload(client, rng)
                except Exception as error:  # recorded, reported, and fails the run
                    self.swap_errors.append(f"{type(error).__name__}: {error}")

    # The clients

    def client(self, index: int) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        channel = grpc.insecure_channel(self.target)
        stub = pb_grpc.ModelHostStub(channel)
        try:
            while not self.stop.is_set():
                model = rng.choice(MODELS)
                which = rng.randrange(INPUTS_PER_MODEL)
                sent = time.monotonic()
                try:
                    reply = stub.Predict(self.requests[model][which], timeout=self.args.timeout)
                except grpc.RpcError as error:
                    with self.lock:
                        self.stats.failed[f"{error.code().name}: {error.details()}"] += 1
                    continue
                received = time.monotonic()
                self.check(model, which, reply, sent, received)
        finally:
            channel.close()

    def check(
        self, model: str, which: int, reply: pb.PredictResponse, sent: float, received: float
    ) -> None:
        out = codec.to_numpy(reply.outputs["output"])
        with self.lock:
            stats = self.stats
            stats.latencies.append(received - sent)
            stats.served[(model, reply.version)] += 1
            label = f"{model} v{reply.version} (sent at {sent - self.began:.2f}s)"
            version = self.versions.get((model, reply.version))
            if version is None:
                stats.not_live.append(f"{label}: a version the swapper never made")
                return
            if version.load_sent > received or (
                version.unload_done is not None and version.unload_done < sent
            ):
                stats.not_live.append(f"{label}: not live then")
            newer = [
                v.number
                for (name, number), v in self.versions.items()
                if name == model
                and number > reply.version
                and v.load_done is not None
                and v.load_done < sent
            ]
            if newer:
                stats.not_newest.append(f"{label}: v{max(newer)} was loaded before")
            if version.unload_sent is not None and version.unload_sent < received:
                stats.during_unload += 1
            candidates = [v for (name, _), v in self.versions.items() if name == model]
        if not self.matches(out, version.references[which]):
            found = [v.number for v in candidates if self.matches(out, v.references[which])]
            with self.lock:
                stats.mismatched.append(
                    f"{label}: outputs match {'v' + str(found) if found else 'no version'}"
                )
            return
        with self.lock:
            stats.ok += 1

    def matches(self, out: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]) -> bool:
        tol = self.args.tolerance
        return out.shape == expected.shape and bool(np.allclose(out, expected, rtol=tol, atol=tol))


def rss_sampler(
    server: ServerProcess, samples: list[tuple[float, int, int]], stop: threading.Event
) -> None:
    while not stop.wait(0.25):
        try:
            memory = server.memory()
        except (OSError, RuntimeError):
            return
        samples.append((time.monotonic(), memory["VmRSS"], memory["RssAnon"]))


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def trend_mb_per_min(samples: Sequence[tuple[float, int, int]]) -> float:
    """Least-squares slope of RSS over time."""
    if len(samples) < 3:
        return float("nan")
    t = np.array([s[0] for s in samples])
    m = np.array([s[1] / MB for s in samples])
    slope = np.polyfit(t - t[0], m, 1)[0]
    return float(slope * 60)


def table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 62 + "+"
    out = [line]
    for name, value in rows:
        out.append(f"| {name.ljust(width)} | {value.ljust(60)} |")
    out.append(line)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="predicting client threads")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long traffic runs")
    parser.add_argument("--swap-every", type=float, default=3.0, help="seconds between swaps")
    parser.add_argument("--warmup", type=float, help="seconds before the RSS baseline")
    parser.add_argument("--image-size", type=int, default=32, help="input height and width")
    parser.add_argument("--max-rows", type=int, default=2, help="most rows per request")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="rtol and atol")
    parser.add_argument("--timeout", type=float, default=60.0, help="Predict deadline (s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--store", type=Path, help="store folder (default: a temp folder)")
    parser.add_argument(
        "--max-rss-growth-mb",
        type=float,
        help="also fail if RSS grows more than this after warm-up",
    )
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(10.0, args.seconds / 4)
    torch.set_num_threads(1)  # references are computed here; leave the cores to the server

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "store"
        server = ServerProcess.start(store)
        with server:
            soak = Soak(args, server.target)
            soak.server_start = server.start_seconds
            setup = time.monotonic()
            current: dict[str, Version] = {}
            with ModelHostClient(server.target, timeout=120) as client:
                for model in MODELS:
                    current[model] = soak.publish(client, model, 1)
            setup = time.monotonic() - setup
            start = server.memory()
            samples: list[tuple[float, int, int]] = []
            sampling = threading.Event()
            sampler = threading.Thread(target=rss_sampler, args=(server, samples, sampling))
            soak.began = time.monotonic()
            sampler.start()
            threads = [
                threading.Thread(target=soak.client, args=(i,), daemon=True)
                for i in range(args.clients)
            ]
            threads.append(threading.Thread(target=soak.swapper, args=(current,), daemon=True))
            for thread in threads:
                thread.start()
            time.sleep(args.seconds)
            soak.stop.set()
            for thread in threads:
                thread.join(args.timeout + 30)
            elapsed = time.monotonic() - soak.began
            sampling.set()
            sampler.join()
            run = Run(samples, start, server.memory(), elapsed, warmup, setup)
            run.exit_code = server.stop()
        print(report(args, soak, run))
    return verdict(args, soak, run)[0]


def rss_numbers(soak: Soak, run: Run) -> tuple[tuple[float, int, int], int, float, float]:
    """The sample after warm-up, peak RSS, RSS and RssAnon growth after warm-up (MB)."""
    after = [s for s in run.samples if s[0] - soak.began >= run.warmup] or run.samples
    end = (0.0, run.end["VmRSS"], run.end["RssAnon"])
    warm = after[0] if after else end
    peak = max((s[1] for s in run.samples), default=end[1])
    return warm, peak, (end[1] - warm[1]) / MB, (end[2] - warm[2]) / MB


def verdict(args: argparse.Namespace, soak: Soak, run: Run) -> tuple[int, str]:
    s = soak.stats
    problems = []
    if s.failed:
        problems.append(f"{sum(s.failed.values())} failed")
    if s.not_live:
        problems.append(f"{len(s.not_live)} from a version not live")
    if s.not_newest:
        problems.append(f"{len(s.not_newest)} not from the newest version")
    if s.mismatched:
        problems.append(f"{len(s.mismatched)} with the wrong outputs")
    if soak.swap_errors:
        problems.append(f"{len(soak.swap_errors)} swaps failed")
    if s.ok == 0:
        problems.append("no prediction succeeded")
    growth = rss_numbers(soak, run)[2]
    if args.max_rss_growth_mb is not None and growth > args.max_rss_growth_mb:
        problems.append(f"RSS grew {growth:.0f} MB (limit {args.max_rss_growth_mb:.0f})")
    return (1, "FAIL: " + "; ".join(problems)) if problems else (0, "PASS")


def mb(rss: int, anon: int) -> str:
    return f"{rss / MB:,.0f} MB (anonymous {anon / MB:,.0f} MB)"


def seconds_summary(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"min {min(values):.2f}  median {statistics.median(values):.2f}  max {max(values):.2f} s"


def report(args: argparse.Namespace, soak: Soak, run: Run) -> str:
    s = soak.stats
    total = s.ok + sum(s.failed.values()) + len(s.mismatched)
    elapsed, warmup = run.elapsed, run.warmup
    warm, peak, growth, anon_growth = rss_numbers(soak, run)
    after = [x for x in run.samples if x[0] - soak.began >= warmup]
    lat = [x * 1000 for x in s.latencies]
    served = {model: sorted(n for (m, n) in s.served if m == model) for model in MODELS}
    rows = [
        ("machine", machine()),
        (
            "load",
            f"{args.clients} clients, {elapsed:.0f} s, 2 models (resnet18, "
            f"{args.image_size}x{args.image_size}, 1-{args.max_rows} rows)",
        ),
        ("predictions", f"{total:,} ({total / elapsed:,.0f}/s), {s.ok:,} ok and verified"),
        ("failed", str(sum(s.failed.values()))),
        ("from a version not live", str(len(s.not_live))),
        ("not from the newest version", str(len(s.not_newest))),
        ("outputs not the version's", str(len(s.mismatched))),
        ("answered while unloading", f"{s.during_unload} (by the version being unloaded)"),
        (
            "latency ms",
            f"p50 {percentile(lat, 0.5):.1f}  p90 {percentile(lat, 0.9):.1f}  "
            f"p99 {percentile(lat, 0.99):.1f}  max {max(lat, default=0):.1f}",
        ),
        (
            "hot swaps",
            f"{len(soak.unload_seconds)} done, {len(soak.swap_errors)} failed, "
            f"every {args.swap_every:g} s",
        ),
        ("LoadModel", seconds_summary(soak.load_seconds)),
        ("UnloadModel", seconds_summary(soak.unload_seconds)),
        (
            "uploads",
            f"{len(soak.upload_seconds)} ({soak.uploaded_bytes / MB:,.0f} MB), "
            + seconds_summary(soak.upload_seconds),
        ),
        (
            "versions served",
            ", ".join(f"{m} v{v[0]}-v{v[-1]}" if v else f"{m} none" for m, v in served.items()),
        ),
        (
            "setup",
            f"server start {soak.server_start:.1f} s, first 2 uploads + loads {run.setup:.1f} s",
        ),
        ("RSS start (models loaded)", mb(run.start["VmRSS"], run.start["RssAnon"])),
        (f"RSS after {warmup:g} s warm-up", mb(warm[1], warm[2])),
        ("RSS peak", f"{peak / MB:,.0f} MB"),
        ("RSS end", mb(run.end["VmRSS"], run.end["RssAnon"])),
        (
            "RSS growth after warm-up",
            f"{growth:+,.0f} MB (anonymous {anon_growth:+,.0f} MB); "
            f"trend {trend_mb_per_min(after):+,.1f} MB/min",
        ),
        ("server exit on SIGTERM", str(run.exit_code)),
        ("verdict", verdict(args, soak, run)[1]),
    ]
    details = []
    for title, items in (
        ("failed", [f"{n} x {why}" for why, n in s.failed.most_common(5)]),
        ("not live", s.not_live[:5]),
        ("not newest", s.not_newest[:5]),
        ("wrong outputs", s.mismatched[:5]),
        ("swap errors", soak.swap_errors[:5]),
    ):
        details += [f"  {title}: {item}" for item in items]
    return "\n" + table(rows) + ("\n" + "\n".join(details) if details else "")


if __name__ == "__main__":
    sys.exit(main())
