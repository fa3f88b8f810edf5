"""What a failure or an unload leaves behind: no references to model memory, no threads,
and a failed device reported as the server's fault, with health NOT_SERVING."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from conftest import expect, serve
from modelhost.client import ModelHostClient
from modelhost.server import Server
from modelhost.server.errors import OutOfMemory
from modelhost.server.inference import Runner

KEPT: list[weakref.ref[torch.Tensor]] = []


class RunsOutOfMemory(nn.Module):
    """Holds an activation, then fails as a full device does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activation = torch.ones(1 << 20)
        KEPT.append(weakref.ref(activation))
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_lets_go_of_the_activations_before_it_is_reported() -> None:
    runner = Runner(RunsOutOfMemory(), torch.device("cpu"), torch.float32)
    KEPT.clear()
    with pytest.raises(OutOfMemory) as caught:
        runner.run({"input": torch.zeros(2, 3)})
    assert caught.value.__context__ is None and caught.value.__cause__ is None
    assert KEPT and KEPT[0]() is None  # nothing the failed run allocated is still held


def test_unloading_drops_every_reference_to_the_module(
    client: ModelHostClient, server: Server
) -> None:
    serve(client, "m", architecture="tiny_mlp")
    assert server.host is not None
    hosted = server.host.models.get("m")
    module = weakref.ref(hosted.runner.module)
    assert client.predict("m", np.zeros((1, 4), np.float32)).shape == (1, 3)
    del hosted
    assert client.unload_model("m") == [1]
    gc.collect()
    assert module() is None  # nothing (the runner's forward included) keeps it alive


def test_a_cuda_error_that_is_not_sticky_fails_only_that_call(client: ModelHostClient) -> None:
    """A launch an input's shape made invalid fails its request; the device is fine, so
    health stays SERVING (a caller must not be able to take the server out of service)."""
    client.save_checkpoint("w", {"marker": torch.zeros(1)})
    client.load_model("odd", architecture="launch_refused", checkpoint="w")
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.predict("odd", np.zeros((1, 4), np.float32)),
        "invalid configuration argument",
    )
    assert client.health("") == "SERVING"
    serve(client, "fine", architecture="tiny_mlp")


def test_a_failed_device_is_internal_and_turns_health_not_serving(
    client: ModelHostClient,
) -> None:
    client.save_checkpoint("w", {"marker": torch.zeros(1)})
    client.load_model("broken-gpu", architecture="device_failure", checkpoint="w")
    serve(client, "fine", architecture="tiny_mlp")
    assert client.health("modelhost.v1.ModelHost") == "SERVING"
    expect(
        grpc.StatusCode.INTERNAL,
        lambda: client.predict("broken-gpu", np.zeros((1, 4), np.float32)),
        "device cpu failed",
        "device-side assert",
    )
    for service in ("", "modelhost.v1.ModelHost", "inference.GRPCInferenceService"):
        assert client.health(service) == "NOT_SERVING", service


def test_a_failed_device_during_a_load_turns_health_not_serving(client: ModelHostClient) -> None:
    """A load's warm-up (or probe) runs on the device too: a lost context met there is as
    fatal as one a Predict meets (INTERNAL, health NOT_SERVING), not only that load's."""
    client.save_checkpoint("w", {"marker": torch.zeros(1)})
    serve(client, "fine", architecture="tiny_mlp")
    assert client.health("") == "SERVING"
    expect(
        grpc.StatusCode.INTERNAL,
        lambda: client.load_model(
            "broken-gpu", architecture="device_failure", checkpoint="w", warmup_shape=(2, 4)
        ),
        "device cpu failed",
        "device-side assert",
    )
    for service in ("", "modelhost.v1.ModelHost", "inference.GRPCInferenceService"):
        assert client.health(service) == "NOT_SERVING", service


def test_memory_of_a_step_that_ran_out_is_unreferenced_when_it_is_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`devices.reported` raises OutOfMemory after its `except` block: when it releases
    memory, the traceback no longer holds the failed step's tensors (before, one path kept
    them alive through a context manager's frame)."""
    from modelhost.server import devices
    from modelhost.server.errors import OutOfMemory

    alive: list[bool] = []
    held: list[weakref.ref[torch.Tensor]] = []
    monkeypatch.setattr(
        devices, "release_memory", lambda *a, **k: alive.append(held[0]() is not None)
    )

    def step() -> None:
        workspace = torch.empty(1 << 20)
        held.append(weakref.ref(workspace))
        raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 MiB")

    runner = Runner(None, torch.device("cpu"), torch.float32)
    with pytest.raises(OutOfMemory, match="out of memory preparing the inputs"):
        runner._device_step(step)
    assert alive == [False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_failed_gpu_loads_leave_no_lane_thread_behind(client: ModelHostClient) -> None:
    client.save_checkpoint("w", {"marker": torch.zeros(1)})

    def fail() -> set[str]:
        with pytest.raises(Exception):  # noqa: B017 - the failing warm-up's status is not the point
            client.load_model(
                "fails",
                architecture="device_failure",
                checkpoint="w",
                device="cuda",
                warmup_shape=(2, 4),
            )
        return {t.name for t in threading.enumerate() if t.name.startswith("lane-")}

    first = fail()  # made the device's first lane, which stays for the next versions
    for _ in range(5):
        assert fail() == first


def _tree_state_on_a_new_thread(prepare: bool) -> object:
    """What CUDA graph trees find on a fresh thread (an exception when they find nothing)."""
    from torch._inductor import cudagraph_trees as trees

    from modelhost.server.devices import prepare_cuda_graphs_on_this_thread

    found: list[object] = []

    def lane() -> None:
        try:
            if prepare:
                prepare_cuda_graphs_on_this_thread()
            found.append(trees.get_obj(trees.local, "tree_manager_containers"))
        except BaseException as error:
            found.append(error)

    thread = threading.Thread(target=lane)
    thread.start()
    thread.join()
    return found[0]


def test_lane_threads_set_up_what_cuda_graphs_expect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch before pytorch#123177 set up CUDA graph trees' thread state only on the thread
    that imported them: a lane thread found nothing (torch 2.11 is such a release).
    Simulated on later releases by taking away their lazy set-up."""
    from torch._inductor import cudagraph_trees as trees

    monkeypatch.delattr(trees, "_initialize_tls", raising=False)
    assert isinstance(_tree_state_on_a_new_thread(prepare=False), BaseException)
    assert _tree_state_on_a_new_thread(prepare=True) == {}


def test_lane_threads_set_up_cuda_graphs_state_whatever_helpers_torch_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A torch that has the set-up helper (`_initialize_tls`) but whose lookup still only
    asserts the state is there (as before pytorch#123177 was fixed): the lane thread must
    set it up itself; knowing the helper exists is not enough."""
    from torch._inductor import cudagraph_trees as trees

    def asserting_get_obj(local: object, attr_name: str) -> object:
        if hasattr(local, attr_name):
            return getattr(local, attr_name)
        assert torch._C._is_key_in_tls(attr_name)
        return torch._C._get_obj_in_tls(attr_name)

    monkeypatch.setattr(trees, "get_obj", asserting_get_obj)
    assert isinstance(_tree_state_on_a_new_thread(prepare=False), AssertionError)
    assert _tree_state_on_a_new_thread(prepare=True) == {}


def test_a_cuda_error_while_preparing_inputs_is_a_failed_device() -> None:
    """Decoding and preprocessing run on the GPU for GPU models: a CUDA error there (what a
    lost context raises) is the device's failure, DeviceFailed (INTERNAL, health
    NOT_SERVING), not the caller's bad image; other errors pass through unchanged."""
    from modelhost.server.errors import DeviceFailed

    runner = Runner(None, torch.device("cpu"), torch.float32)

    def raising(error: Exception) -> Callable[[], None]:
        def step() -> None:
            raise error

        return step

    with pytest.raises(DeviceFailed, match="device-side assert"):
        runner._device_step(raising(RuntimeError("CUDA error: device-side assert triggered")))
    with pytest.raises(ValueError, match="not the device"):
        runner._device_step(raising(ValueError("not the device")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_models_compiled_with_cuda_graphs_serve(client: ModelHostClient) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    for name in ("g1", "g2"):
        model = serve(client, name, device="cuda", compile="reduce-overhead")
        with torch.inference_mode():
            expected = model.cuda()(torch.from_numpy(x).cuda()).cpu().numpy()
        for _ in range(3):  # the first runs record the graphs, later ones replay them
            np.testing.assert_allclose(client.predict(name, x), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_and_unload_give_gpu_memory_back(client: ModelHostClient) -> None:
    """50 load/unload cycles end where they started: allocated bytes, and what the driver
    says is free once the cache is emptied."""
    # The CUDA context, cuDNN, and the lane's cuBLAS workspace (32 MiB on Hopper, allocated
    # through the caching allocator at the first GEMM and kept for the lane's life) set up
    # first: a load runs no forward (its probe is on the meta device), so a Predict on the
    # lane the loop's versions will use (lane 0: the idle lane with the least) must.
    serve(client, "warm", device="cuda")
    client.predict("warm", np.zeros((2, 3, 32, 32), np.float32))
    client.unload_model("warm")
    gc.collect()
    torch.cuda.empty_cache()
    allocated, (free, _) = torch.cuda.memory_allocated(), torch.cuda.mem_get_info()
    for cycle in range(50):
        client.load_model(
            "m",
            architecture="resnet18",
            checkpoint="warm",
            device="cuda",
            architecture_args={"num_classes": 10},
        )
        client.predict("m", np.zeros((2, 3, 32, 32), np.float32))
        assert client.unload_model("m") == [1], cycle
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() == allocated
    assert abs(torch.cuda.mem_get_info()[0] - free) < 64 << 20
