"""Predict throughput and latency against the in-process ceiling and a raw gRPC echo.

Starts a server process, loads the model, and drives it with N client threads (one
channel each, one image per request) at each concurrency level. Beside it, in the same
run: the in-process ceiling (the same model, device and precision at its best batch
size) and the raw loopback echo of the same payload. The ceiling is measured in
windows interleaved with the served windows (`--rounds` of each per level), so both
see the same machine: shared machines drift by 10-20% over a minute. This process
takes the server's malloc settings first, so the ceiling's activations are not faulted
in afresh on every run (on the machine in bench/README.md that alone made it 10-15% faster).

Targets on a CPU (resnet18, float32): at concurrency 16, at least 90% of the
in-process ceiling; at concurrency 1, p50 at most the in-process batch-1 time plus
1.5x the echo time. On a GPU (resnet50): at least 80% of the ceiling with uint8 or
JPEG inputs.

    python bench/predict.py                                  # CPU defaults
    python bench/predict.py --model resnet50 --input uint8 --dtype bfloat16
    python bench/predict.py --target 127.0.0.1:50051   # a running server, e.g. a container
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import torchvision
from torchvision.io import encode_jpeg

from common import ServerProcess, echo_server, machine, peak_rss_mb, table
from modelhost.client import ChannelConfig, ModelHostClient
from modelhost.server import malloc

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def in_process(
    model: torch.nn.Module,
    *,
    device: str,
    dtype: torch.dtype,
    size: int,
    batch: int,
    seconds: float,
) -> tuple[int, float, list[float]]:
    """(images, seconds, per-call latencies) of the bare model (inputs already on the device)."""
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        _sync(device)
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            began = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - began)
        elapsed = time.perf_counter() - started
    return len(times) * batch, elapsed, times


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def payload(kind: str, size: int, seed: int) -> dict[str, Any]:
    """Keyword arguments of client.predict for one image of the chosen input kind."""
    rng = np.random.default_rng(seed)
    if kind == "float32":
        return {"inputs": rng.standard_normal((1, 3, size, size), dtype=np.float32)}
    pixels = rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8)
    if kind == "uint8":
        return {"inputs": pixels}
    jpeg = encode_jpeg(torch.from_numpy(pixels[0]), quality=90).numpy().tobytes()
    return {"images": [jpeg]}


def wire_bytes(model: str, call: dict[str, Any]) -> int:
    from modelhost.client.predict import PredictCall

    return PredictCall(
        model, call.get("inputs"), None, images=call.get("images")
    ).request.ByteSize()


ECHO_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def echo_latencies(
    target: str, nbytes: int, seconds: float, between: Callable[[], object] | None = None
) -> list[float]:
    """Per-call seconds of the raw echo of `nbytes` at concurrency 1, back to back or
    with `between()` run before each call (not timed)."""
    data = b"\x01" * nbytes
    with grpc.insecure_channel(target, options=ECHO_OPTIONS) as channel:
        call = channel.unary_unary("/bench.Echo/Unary")
        for _ in range(20):
            call(data)
        times: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            if between is not None:
                between()
            began = time.perf_counter()
            call(data)
            times.append(time.perf_counter() - began)
    return times


def echo_rate(target: str, nbytes: int, clients: int, seconds: float) -> float:
    """Requests/s of the raw echo at `clients`."""
    data = b"\x01" * nbytes
    latencies, _ = drive(lambda i: _echo_caller(target, data, ECHO_OPTIONS), clients, seconds)
    return len(latencies) / seconds


def _echo_caller(target: str, data: bytes, options: list[Any]) -> Any:
    channel = grpc.insecure_channel(target, options=options)
    call = channel.unary_unary("/bench.Echo/Unary")
    return lambda: call(data), channel.close


def drive(
    make_caller: Any, clients: int, seconds: float, ramp: float = 0.5
) -> tuple[list[float], int]:
    """Runs `clients` threads calling as fast as they can; returns the latencies of the
    calls that completed within a window of `seconds` (after `ramp` seconds of calling),
    and the errors in it.

    Only completions inside the window count: counting the calls still in flight when
    it closes would add up to `clients` calls to the window (at concurrency 64 and a
    12 s window, a third more than the server did in it).
    """
    done: list[list[tuple[float, float, bool]]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def worker(index: int) -> None:
        call, close = make_caller(index)
        try:
            call()  # connect and warm up outside the timed window
            start.wait()
            while not stop.is_set():
                began = time.perf_counter()
                try:
                    call()
                    ok = True
                except Exception:  # counted, and reported in the table
                    ok = False
                ended = time.perf_counter()
                done[index].append((ended, ended - began, ok))
        finally:
            close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(ramp)
    opened = time.perf_counter()
    time.sleep(seconds)
    closed = time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join()
    inside = [(took, ok) for per in done for ended, took, ok in per if opened <= ended <= closed]
    return [took for took, ok in inside if ok], sum(not ok for _, ok in inside)


@contextlib.contextmanager
def _server(
    target: str | None, store: Path, device: str, extra: Sequence[str] = ()
) -> Iterator[Any]:
    """A server process of our own, or the one at `target` (pid None: not ours to watch)."""
    if target:
        yield types.SimpleNamespace(target=target, pid=None)
        return
    with ServerProcess.start(store, args=["--device", device, *extra]) as server:
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--model", default="resnet50" if gpu else "resnet18")
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--input", default="float32", choices=["float32", "uint8", "jpeg"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=12.0, help="served time per level")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved windows per level")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument(
        "--target",
        help="a running server to measure (e.g. a container on host networking) instead of "
        "a server process of its own; --token if it wants one",
    )
    parser.add_argument("--token", help="management and inference token for --target")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="a flag for the server process, repeatable (e.g. --server-arg=--no-gpu-pipelining)",
    )
    args = parser.parse_args()
    malloc.keep_large_buffers()  # the in-process ceiling gets the server's malloc settings
    dtype = getattr(torch, args.dtype)
    window = args.seconds / args.rounds

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), path)
        reference = model.to(args.device, dtype)
        if args.channels_last:
            reference = reference.to(memory_format=torch.channels_last)

        def bare(batch: int, seconds: float) -> tuple[int, float, list[float]]:
            return in_process(
                reference,
                device=args.device,
                dtype=dtype,
                size=args.size,
                batch=batch,
                seconds=seconds,
            )

        one = torch.randn(1, 3, args.size, args.size, device=args.device, dtype=dtype)

        def run_once() -> None:
            with torch.inference_mode():
                reference(one)
            _sync(args.device)

        batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max(args.max_batch_size, 1)]
        sweep = dict.fromkeys(batches, 0.0)
        for _ in range(3):  # in rounds across the sizes; a size's best round counts
            for batch in batches:
                images, elapsed, _ = bare(batch, 0.5)
                sweep[batch] = max(sweep[batch], images / elapsed)
        best = max(sweep, key=lambda b: sweep[b])

        call = payload(args.input, args.size, 0)
        nbytes = wire_bytes(args.model, call)
        rows = []
        latency_check = None
        with (
            echo_server() as echo_target,
            _server(args.target, Path(tmp) / "store", args.device, args.server_arg) as server,
            ModelHostClient(
                server.target, timeout=60, config=ChannelConfig(token=args.token)
            ) as client,
        ):
            client.save_checkpoint("weights", path)
            options: dict[str, Any] = {
                "dtype": args.dtype,
                "channels_last": args.channels_last,
                "batching": {
                    "max_batch_size": args.max_batch_size,
                    "max_queue_delay_us": args.max_queue_delay_us,
                },
                "warmup_shape": (args.max_batch_size, 3, args.size, args.size),
            }
            if args.input != "float32":
                options["preprocessing"] = {"mean": MEAN, "std": STD}
            info = client.load_model(
                "bench", architecture=args.model, checkpoint="weights", **options
            )
            echo_rps = echo_rate(echo_target, nbytes, 16, min(args.seconds, 5))
            echoes = echo_latencies(echo_target, nbytes, 2.0)
            for level in args.levels:

                def caller(index: int) -> Any:
                    own = ModelHostClient(
                        server.target, timeout=60, config=ChannelConfig(token=args.token)
                    )
                    request = payload(args.input, args.size, index)
                    return (lambda: own.predict("bench", **request)), own.close

                latencies: list[float] = []
                errors, ceiling_images, ceiling_seconds, single, paced = 0, 0, 0.0, [], []
                for _ in range(args.rounds):
                    images, elapsed, _ = bare(best, window / 2)
                    ceiling_images += images
                    ceiling_seconds += elapsed
                    if level == 1:  # the latency budget's terms, measured between served windows
                        single += bare(1, window / 2)[2]
                        echoes += echo_latencies(echo_target, nbytes, 1.0)
                        paced += echo_latencies(echo_target, nbytes, 2.0, between=run_once)
                    served, failed = drive(caller, level, window)
                    latencies += served
                    errors += failed
                rps = len(latencies) / (window * args.rounds)
                ceiling = ceiling_images / ceiling_seconds
                p50, p99 = (
                    np.percentile(latencies, [50, 99]) * 1000 if latencies else (float("nan"),) * 2
                )
                rows.append([level, rps, rps, p50, p99, errors, ceiling, f"{rps / ceiling:.0%}"])
                if level == 1:
                    latency_check = (
                        p50,
                        statistics.median(single) * 1000,
                        statistics.median(paced) * 1000,
                    )
            rss = peak_rss_mb(server.pid) if server.pid else float("nan")
        echo_ms = statistics.median(echoes) * 1000

    print(
        f"{args.model} {args.dtype} on {args.device}, {args.input} inputs "
        f"({nbytes / 1e3:,.0f} KB per request), {args.seconds:.0f}s served per level "
        f"in {args.rounds} windows interleaved with in-process windows"
    )
    print(f"machine: {machine()}")
    print(
        "in-process sweep (img/s by batch): "
        + ", ".join(f"{b}: {r:,.1f}" for b, r in sweep.items())
        + f"; ceiling batch {best}"
    )
    print(
        f"raw gRPC echo of the same payload: p50 {echo_ms:.2f} ms at concurrency 1, "
        f"{echo_rps:,.0f} req/s at 16"
    )
    print(
        table(
            [
                "concurrency",
                "req/s",
                "img/s",
                "p50 ms",
                "p99 ms",
                "errors",
                f"ceiling img/s (batch {best})",
                "vs ceiling",
            ],
            rows,
        )
    )
    if latency_check is not None:
        p50_c1, batch1_ms, paced_ms = latency_check
        budget = batch1_ms + 1.5 * echo_ms
        print(
            f"concurrency 1: p50 {p50_c1:.2f} ms vs budget {budget:.2f} ms "
            f"(in-process batch-1 p50 {batch1_ms:.2f} + 1.5 x echo {echo_ms:.2f}); "
            f"served overhead {p50_c1 - batch1_ms:.2f} ms; the echo with one batch-1 model "
            f"run before each call (as the served calls have): p50 {paced_ms:.2f} ms"
        )
    print(
        f"server peak RSS {rss:,.0f} MB; the version holds on {info.device} "
        f"{info.device_bytes / 1e6:,.1f} MB (weights and its warm-up's workspace)"
    )


if __name__ == "__main__":
    main()
