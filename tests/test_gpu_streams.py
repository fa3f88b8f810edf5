"""Batches made on one CUDA stream and run on another: every row must be its own."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from test_batching import concurrently

from conftest import serve
from modelhost.client import ModelHostClient
from modelhost.server import Settings, running
from modelhost.server.images import Preprocessing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SLEEP_CYCLES = 50_000_000
"""A GPU spin of about 25 ms (H200: about 2 GHz) queued before preprocessing's kernels."""


def normalized(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] pixels on the GPU, preprocessed as the served models are."""
    mean = torch.tensor(MEAN, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(STD, device="cuda").view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def assert_own_rows(twin: torch.nn.Module, inputs: list[torch.Tensor], outs: list[Any]) -> None:
    """Every caller got the in-process model's output (on the GPU) for its own input."""
    for x, out in zip(inputs, outs, strict=True):
        assert not isinstance(out, Exception), out
        with torch.inference_mode():
            expected = twin(x).cpu().numpy()
        # 1e-3: cuDNN may pick other float32 algorithms for a batch of 8 than for one row
        # (outputs here are about 1); a row that is another caller's is off by about 1.
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pipelining", [True, False])
def test_concurrent_float32_batches_pipelined_or_not(settings: Settings, pipelining: bool) -> None:
    """Small batches (8 rows) from 64 callers keep the lane launching a batch while the one
    before computes (or, with --no-gpu-pipelining, one at a time): every row is its caller's."""
    with (
        running(dataclasses.replace(settings, gpu_pipelining=pipelining)) as server,
        ModelHostClient(server.target, timeout=120) as client,
    ):
        model = serve(
            client, "r18", device="cuda", batching={"max_batch_size": 8, "max_queue_delay_us": 0}
        )
        twin = model.cuda()
        rng = np.random.default_rng(1)
        requests = [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(64)]
        outs = concurrently([partial(client.predict, "r18", x, timeout=120) for x in requests])
    assert_own_rows(twin, [torch.from_numpy(x).cuda() for x in requests], outs)


def test_concurrent_uint8_requests_get_their_own_rows(client: ModelHostClient) -> None:
    """uint8 images are joined into one pinned batch on the lane, copied once and
    preprocessed on the model's stream: every row must still be its caller's."""
    model = serve(
        client,
        "r18",
        device="cuda",
        preprocessing={"mean": MEAN, "std": STD},
        batching={"max_batch_size": 32, "max_queue_delay_us": 20_000},
    )
    twin = model.cuda()
    rng = np.random.default_rng(0)
    requests = [rng.integers(0, 256, (1, 3, 64, 64), dtype=np.uint8) for _ in range(64)]
    outs = concurrently([partial(client.predict, "r18", x, timeout=120) for x in requests])
    assert_own_rows(twin, [normalized(torch.from_numpy(x).cuda()) for x in requests], outs)


def test_concurrent_jpeg_requests_decoded_on_their_own_streams(
    client: ModelHostClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JPEGs are decoded (nvjpeg) and preprocessed on each preprocessing thread's own
    stream and handed to the lane with an event (the decode itself synchronises the host
    first, the preprocessing does not): every row must still be the one its caller sent.

    On an idle GPU the preprocessing kernels end long before the lane reads their output,
    so a lane that did not wait for the event would pass too: a spin of about 25 ms on the
    preprocessing stream, queued before those kernels, makes the lane read them while they
    are still to run unless it waits."""
    from torchvision.io import decode_jpeg, encode_jpeg

    delayed: list[torch.cuda.Stream] = []
    preprocess = Preprocessing._batch

    def late(self: Preprocessing, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if images.is_cuda:
            delayed.append(torch.cuda.current_stream(images.device))
            torch.cuda._sleep(SLEEP_CYCLES)
        return preprocess(self, images, dtype)

    model = serve(
        client,
        "r18",
        device="cuda",
        preprocessing={"mean": MEAN, "std": STD},
        batching={"max_batch_size": 16, "max_queue_delay_us": 20_000},
    )
    twin = model.cuda()
    rng = np.random.default_rng(1)
    jpegs = [
        encode_jpeg(torch.from_numpy(rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)))
        .numpy()
        .tobytes()
        for _ in range(48)
    ]
    monkeypatch.setattr(Preprocessing, "_batch", late)
    outs = concurrently([partial(client.predict, "r18", images=[j], timeout=120) for j in jpegs])
    decoded = [
        decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8), device="cuda") for j in jpegs
    ]
    assert_own_rows(twin, [normalized(pixels[None]) for pixels in decoded], outs)
    assert len(delayed) == len(jpegs)  # each delayed, on a preprocessing thread's stream,
    assert torch.cuda.current_stream() not in delayed  # not this thread's (the default)
