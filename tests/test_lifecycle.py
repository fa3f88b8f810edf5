"""Hot swap under load, the seed's VGG16 flow, cancelled uploads, the async client."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torchvision

from conftest import images, reference, resnet18, temp_files
from modelhost.client import AsyncModelHostClient, ModelHostClient, NotFoundError
from modelhost.server import Server
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc as pb_grpc


def test_hot_swap_under_concurrent_predictions(client: ModelHostClient, server: Server) -> None:
    versions = [resnet18(seed=s) for s in (1, 2, 3, 4)]
    for index, model in enumerate(versions, 1):
        client.save_checkpoint(f"w{index}", model.state_dict())
    args = {"num_classes": 10}
    client.load_model("m", architecture="resnet18", checkpoint="w1", architecture_args=args)
    x = images(1)
    expected = [reference(model, x) for model in versions]
    seen: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def caller() -> None:
        with ModelHostClient(server.target, timeout=60) as own:
            while not stop.is_set():
                try:
                    out = own.predict("m", x)
                except BaseException as error:
                    failures.append(error)
                    return
                matches = [
                    i
                    for i, e in enumerate(expected, 1)
                    if np.allclose(out, e, rtol=1e-4, atol=1e-5)
                ]
                if len(matches) != 1:
                    failures.append(AssertionError(f"output matches versions {matches}"))
                    return
                seen.append(matches[0])

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for thread in threads:
        thread.start()
    for version in (2, 3, 4):
        time.sleep(0.4)
        info = client.load_model(
            "m", architecture="resnet18", checkpoint=f"w{version}", architecture_args=args
        )
        assert info.version == version
        client.unload_model("m", version=version - 1)  # retire the old one under load
    time.sleep(0.4)
    stop.set()
    for thread in threads:
        thread.join()
    assert failures == []
    assert set(seen) == {1, 2, 3, 4}
    assert seen[-1] == 4
    assert [m.version for m in client.list_models()] == [4]


@pytest.mark.slow
def test_seed_flow_vgg16(client: ModelHostClient, tmp_path: Path) -> None:
    """The tutorial: torch.save(model.state_dict()), rebuild, load_state_dict, eval, predict."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    path = tmp_path / "model_weights.pth"
    torch.save(model.state_dict(), path)
    info = client.save_checkpoint("vgg16-weights", path)
    assert info.tensor_count == 32
    loaded = client.load_model("vgg16", architecture="vgg16", checkpoint="vgg16-weights")
    assert loaded.parameter_count == 138_357_544
    x = images(2, size=64)
    out = client.predict("vgg16", x)
    assert out.shape == (2, 1000)
    np.testing.assert_allclose(out, reference(model, x), rtol=1e-5, atol=1e-5)


def test_cancelled_upload_leaves_nothing(client: ModelHostClient, server: Server) -> None:
    release = threading.Event()
    header = pb.SaveCheckpointRequest(
        header=pb.SaveCheckpointHeader(name="partial", upload=pb.Upload())
    )

    def stream() -> Iterator[pb.SaveCheckpointRequest]:
        yield header
        for _ in range(8):
            yield pb.SaveCheckpointRequest(chunk=b"\x00" * (1 << 20))
        release.wait(10)

    with grpc.insecure_channel(server.target) as channel:
        future = pb_grpc.ModelHostStub(channel).SaveCheckpoint.future(stream())
        store = server.settings.store
        deadline = time.monotonic() + 10
        while not temp_files(store) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert temp_files(store), "the upload never started"
        future.cancel()
        release.set()
        deadline = time.monotonic() + 10
        while temp_files(store) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert temp_files(store) == []
    assert list((server.settings.store / "blobs").iterdir()) == []
    with pytest.raises(NotFoundError):
        client.get_checkpoint("partial")


def test_async_client_end_to_end(server: Server) -> None:
    model = resnet18()
    x = images(2)

    async def scenario() -> None:
        async with AsyncModelHostClient(server.target, timeout=60) as client:
            info = await client.save_checkpoint("w", model.state_dict())
            assert info.format == "state_dict"
            await client.load_model(
                "m", architecture="resnet18", checkpoint="w", architecture_args={"num_classes": 10}
            )
            outs = await asyncio.gather(*(client.predict("m", x) for _ in range(8)))
            for out in outs:
                np.testing.assert_allclose(out, reference(model, x), rtol=1e-5, atol=1e-5)
            state = await client.download_checkpoint("w")
            assert isinstance(state, dict)
            assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
            assert [c.name for c in await client.list_checkpoints()] == ["w"]
            assert (await client.get_model("m")).version == 1
            assert await client.health() == "SERVING"
            with pytest.raises(NotFoundError):
                await client.predict("missing", x)
            assert await client.unload_model("m") == [1]
            await client.delete_checkpoint("w")

    asyncio.run(scenario())
