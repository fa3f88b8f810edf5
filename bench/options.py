"""Which per-model options pay off: eager vs channels_last vs bf16/fp16 vs torch.compile.

Measures the bare model in-process (the server's ceiling for each option) at one batch
size, so LoadModel's defaults can follow the numbers. On a GPU it also tries autocast and
torch.compile(mode="reduce-overhead") (CUDA graphs).

    python bench/options.py [--model resnet50] [--batch 32] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision

from common import machine, table
from modelhost.server import malloc


def rate(
    model: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    seconds: float,
    autocast: torch.dtype | None = None,
) -> float:
    """Images/s of `model` on `x` under inference_mode (after a warm-up)."""
    context = (
        torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    )
    with torch.inference_mode(), context:
        for _ in range(3):
            model(x)
        _sync(x.device)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(x)
            runs += 1
        _sync(x.device)
    return runs * x.shape[0] / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--model", default="resnet50" if gpu else "resnet18")
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--batch", type=int, default=32 if gpu else 8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--compile", action="store_true", help="also try torch.compile")
    args = parser.parse_args()
    malloc.keep_large_buffers()  # the in-process ceiling gets the server's malloc settings
    device = torch.device(args.device)
    base = torchvision.models.get_model(args.model).eval().to(device)

    def fresh() -> torch.nn.Module:  # Module.to() works in place: each variant gets a copy
        return copy.deepcopy(base)

    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    variants: list[tuple[str, Callable[[], tuple[Any, torch.Tensor, torch.dtype | None]]]] = [
        ("float32", lambda: (fresh(), x, None)),
        (
            "float32 channels_last",
            lambda: (
                fresh().to(memory_format=torch.channels_last),
                x.contiguous(memory_format=torch.channels_last),
                None,
            ),
        ),
        ("bfloat16 weights", lambda: (fresh().to(torch.bfloat16), x.to(torch.bfloat16), None)),
        (
            "bfloat16 channels_last",
            lambda: (
                # Module.to takes both at once; torch's overloads name them only apart.
                fresh().to(torch.bfloat16, memory_format=torch.channels_last),  # type: ignore[call-overload]
                x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
                None,
            ),
        ),
    ]
    if gpu:
        variants.append(
            (
                "autocast float16 channels_last",
                lambda: (
                    fresh().to(memory_format=torch.channels_last),
                    x.contiguous(memory_format=torch.channels_last),
                    torch.float16,
                ),
            )
        )
    if args.compile:
        mode = "reduce-overhead" if gpu else None
        variants.append(
            (
                f"torch.compile({mode or 'default'}) float32",
                lambda: (
                    torch.compile(fresh(), mode=mode),
                    x,
                    None,
                ),
            )
        )
    rows = []
    baseline = 0.0
    for name, make in variants:
        model, inputs, autocast = make()
        started = time.perf_counter()
        images_per_s = rate(model, inputs, args.seconds, autocast)
        baseline = baseline or images_per_s
        print(f"  {name}: {images_per_s:.1f} img/s", flush=True)  # if a time limit cuts the rest
        rows.append(
            [
                name,
                images_per_s,
                f"{images_per_s / baseline:.2f}x",
                f"{time.perf_counter() - started:.0f}",
            ]
        )
    print(f"{args.model} on {args.device}, batch {args.batch} ({machine()})")
    print(table(["option", "img/s", "vs float32", "seconds (incl. warm-up)"], rows))


if __name__ == "__main__":
    main()
