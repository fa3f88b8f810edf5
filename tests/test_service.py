"""End to end over a real server: store, load, predict, snapshot, download, versions."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save as save_safetensors

from conftest import (
    assert_same_detections,
    build,
    expect,
    images,
    reference,
    resnet18,
    serve,
    serve_detector,
)
from modelhost.client import ModelHostClient, NotFoundError
from modelhost.server import Server, Settings, running


def test_upload_load_predict_matches_in_process(client: ModelHostClient) -> None:
    model = resnet18()
    info = client.save_checkpoint("r18-weights", model.state_dict(), metadata={"run": "7"})
    assert info.format == "state_dict"
    assert info.tensor_count == len(model.state_dict())
    assert info.metadata == {"run": "7"}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert info.size_bytes == len(buffer.getvalue())

    loaded = client.load_model(
        "r18",
        architecture="resnet18",
        checkpoint="r18-weights",
        architecture_args={"num_classes": 10},
    )
    assert (loaded.name, loaded.version, loaded.state) == ("r18", 1, "ready")
    assert loaded.device == "cpu" and loaded.dtype == "float32"
    assert loaded.parameter_count == sum(p.numel() for p in model.parameters())
    assert loaded.device_bytes >= loaded.parameter_count * 4
    assert loaded.checkpoint_sha256 == info.sha256

    x = images(3)
    out = client.predict("r18", x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, 10)
    np.testing.assert_array_equal(out, reference(model, x))


def test_torch_tensors_in_give_torch_tensors_back(
    client: ModelHostClient, served_resnet: torch.nn.Module
) -> None:
    x = torch.from_numpy(images(2))
    out = client.predict("r18", x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, served_resnet(x).detach(), rtol=0, atol=0)
    out_dict = client.predict("r18", {"images": x})
    assert set(out_dict) == {"output"}
    torch.testing.assert_close(out_dict["output"], out, rtol=0, atol=0)


def test_upload_from_file_and_bytes(client: ModelHostClient, tmp_path: Path) -> None:
    model = resnet18()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    from_file = client.save_checkpoint("from-file", path)
    from_bytes = client.save_checkpoint("from-bytes", path.read_bytes())
    assert from_file.sha256 == from_bytes.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [c.name for c in client.list_checkpoints()] == ["from-bytes", "from-file"]


def test_snapshot_download_bit_for_bit(
    client: ModelHostClient, served_resnet: torch.nn.Module, tmp_path: Path
) -> None:
    info = client.snapshot("r18", "r18-snapshot")
    assert info.format == "state_dict" and info.metadata["snapshot_of"] == "r18:1"
    state = client.download_checkpoint("r18-snapshot")
    assert isinstance(state, dict)
    original = served_resnet.state_dict()
    assert state.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(state[key], tensor), key
        assert state[key].dtype == tensor.dtype
    path = client.download_checkpoint("r18-snapshot", tmp_path / "snap.pt")
    assert path == tmp_path / "snap.pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
    assert not (tmp_path / "snap.pt.part").exists()


def test_general_checkpoint_serves_model_and_keeps_training_state(
    client: ModelHostClient, tmp_path: Path
) -> None:
    model = resnet18()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(torch.from_numpy(images(4))).sum().backward()
    optimizer.step()
    model.eval()
    checkpoint = {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": 0.25,
    }
    info = client.save_checkpoint("train-3", checkpoint)
    assert (info.format, info.epoch, info.loss) == ("general_checkpoint", 3, 0.25)
    client.load_model(
        "trained",
        architecture="resnet18",
        checkpoint="train-3",
        architecture_args={"num_classes": 10},
    )
    x = images(2)
    np.testing.assert_array_equal(client.predict("trained", x), reference(model, x))
    back = client.download_checkpoint("train-3")
    assert isinstance(back, dict)
    assert back["epoch"] == 3 and back["loss"] == 0.25
    assert back["optimizer_state_dict"]["param_groups"][0]["momentum"] == 0.9


@pytest.mark.parametrize(
    ("epoch", "loss"), [(7, float("nan")), (7, float("inf")), (2**63 - 1, -float("inf"))]
)
def test_a_diverged_runs_checkpoint_stays_listed_and_loads(
    client: ModelHostClient, epoch: int, loss: float
) -> None:
    """A loss of NaN or infinity (a run that diverged), or the largest int64 epoch, is
    stored as it is, and the checkpoint stays listed, readable and loadable."""
    model = build("tiny_mlp", seed=4)
    checkpoint = {"model_state_dict": model.state_dict(), "epoch": epoch, "loss": loss}
    stored = client.save_checkpoint("diverged", checkpoint)
    [listed] = client.list_checkpoints()
    for info in (stored, listed, client.get_checkpoint("diverged")):
        assert info.epoch == epoch and info.loss is not None
        assert info.loss == loss or (math.isnan(info.loss) and math.isnan(loss))
    client.load_model("m", architecture="tiny_mlp", checkpoint="diverged")
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(client.predict("m", x), reference(model, x), rtol=1e-5)


def test_safetensors_checkpoint(client: ModelHostClient) -> None:
    model = resnet18()
    data = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
    info = client.save_checkpoint("r18-st", data)
    assert info.format == "safetensors" and info.tensor_count == len(model.state_dict())
    client.load_model(
        "st", architecture="resnet18", checkpoint="r18-st", architecture_args={"num_classes": 10}
    )
    x = images(2)
    np.testing.assert_array_equal(client.predict("st", x), reference(model, x))
    back = client.download_checkpoint("r18-st")
    assert isinstance(back, dict)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(client: ModelHostClient, prefix: str) -> None:
    model = resnet18()
    wrapped = {prefix + k: v for k, v in model.state_dict().items()}
    client.save_checkpoint("wrapped", wrapped)
    client.load_model(
        "plain",
        architecture="resnet18",
        checkpoint="wrapped",
        architecture_args={"num_classes": 10},
    )
    x = images(1)
    np.testing.assert_array_equal(client.predict("plain", x), reference(model, x))


def test_dtype_conversion_at_load(client: ModelHostClient) -> None:
    model = resnet18()
    client.save_checkpoint("w", model.state_dict())
    info = client.load_model(
        "half",
        architecture="resnet18",
        checkpoint="w",
        architecture_args={"num_classes": 10},
        dtype="bfloat16",
    )
    assert info.dtype == "bfloat16"
    assert info.device_bytes < sum(t.numel() * 4 for t in model.state_dict().values()) * 0.6
    x = images(2)
    out = client.predict("half", x)
    assert out.dtype == np.float32  # floating outputs come back in the input's dtype
    twin = model.to(torch.bfloat16)  # the same dtype as served, so a tight comparison
    with torch.inference_mode():
        expected = twin(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-2, atol=1e-2)
    assert np.abs(out - expected).max() < 0.02 * np.abs(expected).max()


def test_versions_route_to_newest_and_unload(client: ModelHostClient) -> None:
    first, second = resnet18(seed=1), resnet18(seed=2)
    client.save_checkpoint("v1", first.state_dict())
    client.save_checkpoint("v2", second.state_dict())
    args = {"num_classes": 10}
    assert (
        client.load_model(
            "m", architecture="resnet18", checkpoint="v1", architecture_args=args
        ).version
        == 1
    )
    assert (
        client.load_model(
            "m", architecture="resnet18", checkpoint="v2", architecture_args=args
        ).version
        == 2
    )
    x = images(1)
    np.testing.assert_array_equal(client.predict("m", x), reference(second, x))
    np.testing.assert_array_equal(client.predict("m", x, version=1), reference(first, x))
    info = client.get_model("m")
    assert (info.version, info.versions) == (2, (1, 2))
    assert [(m.name, m.version) for m in client.list_models()] == [("m", 1), ("m", 2)]
    assert client.unload_model("m", version=2) == [2]
    np.testing.assert_array_equal(client.predict("m", x), reference(first, x))
    assert client.unload_model("m") == [1]
    with pytest.raises(NotFoundError):
        client.predict("m", x)
    assert client.list_models() == []


def test_delete_checkpoint_keeps_loaded_model_serving(
    client: ModelHostClient, served_resnet: torch.nn.Module
) -> None:
    client.delete_checkpoint("r18-weights")
    assert client.list_checkpoints() == []
    x = images(1)
    np.testing.assert_array_equal(client.predict("r18", x), reference(served_resnet, x))
    with pytest.raises(NotFoundError):
        client.delete_checkpoint("r18-weights")


def test_overwrite_replaces_atomically(client: ModelHostClient) -> None:
    a, b = resnet18(seed=1), resnet18(seed=2)
    first = client.save_checkpoint("w", a.state_dict())
    second = client.save_checkpoint("w", b.state_dict(), overwrite=True)
    assert first.sha256 != second.sha256
    assert client.get_checkpoint("w").sha256 == second.sha256
    back = client.download_checkpoint("w")
    assert isinstance(back, dict)
    assert all(torch.equal(back[k], v) for k, v in b.state_dict().items())


def test_tuple_and_dict_outputs_are_named(client: ModelHostClient) -> None:
    torch.manual_seed(0)
    model = torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=True
    ).eval()
    serve(
        client,
        "seg",
        model,
        architecture="fcn_resnet50",
        checkpoint="fcn",
        architecture_args={"num_classes": 3, "aux_loss": True},
    )
    x = images(1, size=32)
    out = client.predict("seg", x)
    assert set(out) == {"out", "aux"}
    with torch.inference_mode():
        expected = model(torch.from_numpy(x))
    np.testing.assert_allclose(out["out"], expected["out"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["aux"], expected["aux"].numpy(), rtol=1e-5, atol=1e-5)


def test_detection_model_lists_per_image_outputs(client: ModelHostClient) -> None:
    model = serve_detector(client)
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    assert_same_detections(model, x, client.predict("det", x))


def test_labels_are_one_per_class_and_bounded(client: ModelHostClient) -> None:
    """tiny_mlp has 3 classes (known at load from its warm-up): 3 labels name them in
    top-k; 2 or 4 are refused (top-k would mix labels and class numbers), and so are a
    100,001 (MAX_LABELS and one; a million are refused before they are parsed, see
    test_nested_limits), or one of 2 KB."""
    client.save_checkpoint("w", build("tiny_mlp").state_dict())
    for labels, words in (
        (["a", "b"], ("2 labels", "3 classes")),
        (["a", "b", "c", "d"], ("4 labels", "3 classes")),
        ([str(i) for i in range(100_001)], ("100001 labels", "at most 100000")),
        (["x" * 2048, "b", "c"], ("more than 1024 bytes",)),
    ):
        expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            partial(
                client.load_model,
                "m",
                architecture="tiny_mlp",
                checkpoint="w",
                labels=labels,
                warmup_shape=(1, 4),
            ),
            *words,
        )
    assert client.list_models() == []
    info = client.load_model("m", architecture="tiny_mlp", checkpoint="w", labels=["a", "b", "c"])
    assert info.label_count == 3
    (top,) = client.predict("m", np.ones((1, 4), np.float32), top_k=3)
    assert sorted(c.label for c in top) == ["a", "b", "c"]


def test_health_and_architectures(client: ModelHostClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("modelhost.v1.ModelHost") == "SERVING"
    expect(  # an unknown service: the ones there are, rather than a bare NOT_FOUND
        grpc.StatusCode.NOT_FOUND,
        lambda: client.health("foo"),
        "no health status for service 'foo'",
        "'inference.GRPCInferenceService', 'modelhost.v1.ModelHost'",
    )
    names = {a.name: a for a in client.list_architectures()}
    assert {"resnet18", "vgg16", "fasterrcnn_resnet50_fpn", "deeplabv3_resnet50"} <= set(names)
    assert names["resnet18"].source == "torchvision"
    assert "num_classes" in {p.name for p in names["resnet18"].parameters}


def test_server_reflection_lists_the_services(client: ModelHostClient) -> None:
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(client.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "modelhost.v1.ModelHost",
            "grpc.health.v1.Health",
            "inference.GRPCInferenceService",
        } <= services
        predict = database.FindFileContainingSymbol("modelhost.v1.ModelHost")
        assert predict.package == "modelhost.v1"


def test_dns_targets_balance_round_robin(server: Server, settings: Settings) -> None:
    """`dns:///name:port` resolves the name; calls over several addresses go round-robin
    (this machine's `localhost` has one address, so two servers come as an address list)."""
    with ModelHostClient(f"dns:///localhost:{server.port}", timeout=30) as client:
        assert client.health() == "SERVING"
        client.save_checkpoint("on-first", _marker())
    other = dataclasses.replace(settings, store=settings.store.parent / "other")
    with running(other) as second:
        with ModelHostClient(second.target, timeout=30) as client:
            client.save_checkpoint("on-second", _marker())
        target = f"ipv4:127.0.0.1:{server.port},127.0.0.1:{second.port}"
        with ModelHostClient(target, timeout=30) as client:
            seen = [tuple(c.name for c in client.list_checkpoints()) for _ in range(8)]
    # Both serve (the first calls go to whichever address connected first).
    assert set(seen) == {("on-first",), ("on-second",)}
    assert min(seen.count(("on-first",)), seen.count(("on-second",))) >= 2, seen


def _marker() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buffer)
    return buffer.getvalue()
