"""Upload throughput of a large checkpoint against a raw gRPC echo of the same bytes.

The checkpoint (a state_dict of about `--mb` megabytes) is streamed with
SaveCheckpoint into a server process, which hashes, writes, fsyncs, validates and
commits it. The ceiling is the same chunks streamed to bench/echo_server.py, which
only counts them. Download (DownloadCheckpoint) is reported too. Target: upload at
least half the raw rate.

    python bench/upload.py [--mb 500] [--repeat 5] [--chunk-mb 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import torch

from common import ServerProcess, echo_server, machine, table
from modelhost.client import ModelHostClient


def raw_rate(target: str, path: Path, chunk: int) -> float:
    """Seconds to stream the file to the echo sink in `chunk`-byte messages."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(target, options=options) as channel:
        sink = channel.stream_unary("/bench.Echo/Sink")

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as file:
                while block := file.read(chunk):
                    yield block

        started = time.perf_counter()
        total = int.from_bytes(sink(chunks()), "little")
        elapsed = time.perf_counter() - started
    assert total == path.stat().st_size
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunk-mb", type=float, default=2)
    args = parser.parse_args()
    chunk = int(args.chunk_mb * (1 << 20))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.pt"
        count = args.mb * (1 << 20) // 4 // (16 << 20) or 1
        torch.save({f"layer{i}.weight": torch.randn(16 << 20) for i in range(count)}, path)
        size_mb = path.stat().st_size / 1e6
        with (
            echo_server() as echo,
            ServerProcess.start(Path(tmp) / "store") as server,
            ModelHostClient(server.target, timeout=600, chunk_bytes=chunk) as client,
        ):
            raw_rate(echo, path, chunk)  # warm up
            raws, ups, downs = [], [], []
            for index in range(args.repeat):
                raws.append(raw_rate(echo, path, chunk))
                started = time.perf_counter()
                info = client.save_checkpoint("big", path, overwrite=index > 0)
                ups.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.download_checkpoint("big", Path(tmp) / "back.pt")
                downs.append(time.perf_counter() - started)
            assert info.size_bytes == path.stat().st_size
    rates = {
        name: sorted(size_mb / seconds for seconds in times)
        for name, times in (("raw", raws), ("upload", ups), ("download", downs))
    }
    print(
        f"{size_mb:,.0f} MB checkpoint, {args.chunk_mb} MiB chunks, {args.repeat} interleaved "
        f"runs: best and median ({machine()})"
    )
    labels = {
        "raw": "raw gRPC echo (ceiling)",
        "upload": "SaveCheckpoint (hash both ends, write, fsync, validate, commit)",
        "download": "DownloadCheckpoint (to a file, verified)",
    }
    rows = []
    for name, label in labels.items():
        best, median = rates[name][-1], statistics.median(rates[name])
        rows.append(
            [
                label,
                best,
                median,
                f"{best / rates['raw'][-1]:.2f}x",
                f"{median / statistics.median(rates['raw']):.2f}x",
            ]
        )
    print(table(["path", "best MB/s", "median MB/s", "best vs raw", "median vs raw"], rows))


if __name__ == "__main__":
    main()
