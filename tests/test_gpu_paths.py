"""Failed devices and memory release on error paths, checked on the CPU with fakes: how a
lost CUDA context is recognised under the spellings of Triton, cuBLAS, cuDNN and nvJPEG
(a probe of the context decides), that releasing memory never waits for a CUDA-graph run,
and that the model cache never releases memory with its lock held."""

from __future__ import annotations

import dataclasses
import threading
import types
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from test_cache import ARGS, BUDGET, load

from modelhost.client import ModelHostClient
from modelhost.server import Server, Settings, devices, running
from modelhost.server import cache as cache_module
from modelhost.server.errors import DeviceFailed
from modelhost.server.inference import Runner

ILLEGAL = "an illegal memory access was encountered"
CUBLAS = (
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, "
    "m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc)`"
)
PROBED = [
    "Triton Error [CUDA]: invalid argument",
    CUBLAS,
    "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",
    "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
    "Error while decoding JPEG images: Failed to synchronize CUDA stream: 700",
]


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    """A server whose CPU budget holds three of test_cache's models."""
    with running(dataclasses.replace(settings, device_memory_budget=BUDGET)) as srv:
        yield srv


class FakeStream:
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1
        if self.error is not None:
            raise self.error


@pytest.fixture
def cuda_context(monkeypatch: pytest.MonkeyPatch) -> Callable[[Exception | None], FakeStream]:
    """A CUDA in use whose current stream's synchronisation raises what it is given (a
    lost context repeats its sticky error there) or nothing (a healthy one)."""

    def context(error: Exception | None) -> FakeStream:
        stream = FakeStream(error)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
        return stream

    return context


def test_sticky_errors_are_device_failures_without_a_probe(
    cuda_context: Callable[[Exception | None], FakeStream],
) -> None:
    stream = cuda_context(None)  # a healthy context: the message alone decides
    for text in (f"CUDA error: {ILLEGAL}", f"Triton Error [CUDA]: {ILLEGAL}"):
        assert devices.is_device_failure(RuntimeError(text)), text
    assert stream.synchronized == 0


@pytest.mark.parametrize("text", PROBED)
def test_other_spellings_are_device_failures_when_the_context_is_lost(
    cuda_context: Callable[[Exception | None], FakeStream], text: str
) -> None:
    lost = cuda_context(RuntimeError(f"CUDA error: {ILLEGAL}"))
    assert devices.is_device_failure(RuntimeError(text))
    assert lost.synchronized == 1


@pytest.mark.parametrize("text", PROBED)
def test_other_spellings_fail_only_their_call_when_the_context_is_fine(
    cuda_context: Callable[[Exception | None], FakeStream], text: str
) -> None:
    healthy = cuda_context(None)
    assert not devices.is_device_failure(RuntimeError(text))
    assert healthy.synchronized == 1


def test_an_input_error_costs_no_probe(
    cuda_context: Callable[[Exception | None], FakeStream],
) -> None:
    lost = cuda_context(RuntimeError(f"CUDA error: {ILLEGAL}"))
    for error in (
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x4 and 8x3)"),
        RuntimeError("CUDA error: invalid configuration argument"),
        ValueError(CUBLAS),  # not what torch raises
    ):
        assert not devices.is_device_failure(error)
    assert lost.synchronized == 0


def test_without_cuda_in_use_the_probe_says_nothing_is_lost() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is in use here")
    assert not devices.context_lost()
    assert not devices.is_device_failure(RuntimeError(CUBLAS))


def test_a_runner_reports_a_lost_context_under_cublas_spelling(
    cuda_context: Callable[[Exception | None], FakeStream],
) -> None:
    """What a Predict whose GEMM met a lost context replies: the device failed (INTERNAL,
    health NOT_SERVING); with the context fine, the error as it was."""
    runner = Runner(None, torch.device("cpu"), torch.float32)

    def fails() -> None:
        raise RuntimeError(CUBLAS)

    cuda_context(None)
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        runner._device_step(fails)
    cuda_context(RuntimeError(f"CUDA error: {ILLEGAL}"))
    with pytest.raises(DeviceFailed, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        runner._device_step(fails)


@pytest.fixture
def fake_cuda_caches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """CUDA in use, its device and pinned-host cache releases recorded."""
    emptied: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append("device"))
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: emptied.append("host"), raising=False)
    return emptied


def test_release_memory_never_waits_for_a_cuda_graph_run(fake_cuda_caches: list[str]) -> None:
    """A CUDA-graph version compiles and captures under CUDA_GRAPHS (a new shape: seconds
    to minutes): an out-of-memory reply or an unload must not wait for it. It skips the
    release, and releases once the lock is free."""
    holding, done = threading.Event(), threading.Event()

    def compile_and_capture() -> None:
        with devices.CUDA_GRAPHS:
            holding.set()
            done.wait(10)

    thread = threading.Thread(target=compile_and_capture)
    thread.start()
    try:
        assert holding.wait(10)
        released = threading.Thread(
            target=devices.release_memory,
            args=(torch.device("cuda", 0),),
            kwargs={"collect": False},
        )
        released.start()
        released.join(5)
        assert not released.is_alive(), "release_memory waited for the CUDA-graph run"
        assert fake_cuda_caches == []
        assert not devices.release_host_memory()
    finally:
        done.set()
        thread.join()
    devices.release_memory(torch.device("cuda", 0), collect=False)
    assert fake_cuda_caches == ["device", "host"]
    assert devices.release_host_memory()
    assert fake_cuda_caches == ["device", "host", "host"]


def test_release_memory_leaves_cuda_alone_for_a_cpu_device(fake_cuda_caches: list[str]) -> None:
    devices.release_memory(torch.device("cpu"), collect=False)
    assert fake_cuda_caches == []


def test_pinned_host_memory_is_trimmed_past_the_host_budget_only(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a page-in from the host tier, cached pinned blocks stay for the next eviction
    while the pinned memory torch holds is within the host budget, and go back past it
    (or when torch does not say how much it holds)."""
    assert server.host is not None
    cache = server.host.models.cache
    trimmed: list[bool] = []
    monkeypatch.setattr(cache_module, "release_host_memory", lambda: trimmed.append(True))
    limit = cache.host_usage()[1]
    for held, trims in ((limit, False), (limit + 1, True), (None, True)):
        trimmed.clear()
        monkeypatch.setattr(cache_module, "pinned_host_bytes", lambda held=held: held)
        cache._trim_pinned()
        assert trimmed == ([True] if trims else []), held


def test_an_eviction_releases_memory_after_the_cache_lock_is_released(
    client: ModelHostClient, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An evicted module that a reference cycle keeps alive needs a collection (about
    0.2 s) and release_memory, which may wait on the GPU: never with the cache's lock held,
    which every load, page-in and metrics scrape takes."""
    assert server.host is not None
    cache = server.host.models.cache
    owned = getattr(cache._cond, "_is_owned")  # noqa: B009 - whether this thread holds it
    locked: list[bool] = []
    monkeypatch.setattr(cache_module, "release_memory", lambda *a, **k: locked.append(owned()))
    # Every evicted module looks held by a cycle (its weak reference stays alive).
    monkeypatch.setattr(cache_module, "weakref", types.SimpleNamespace(ref=lambda _: lambda: 1))
    for i in range(4):  # the budget holds three: the fourth evicts the least recently used
        load(client, f"m{i}", seed=i)
    assert locked == [False]
    x = np.zeros((1, ARGS["features"]), np.float32)
    assert client.predict("m0", x).shape == (1, ARGS["classes"])  # paged in: evicts again
    assert locked == [False, False]
