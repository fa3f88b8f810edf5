"""Users' own models: entry points, configured builders, exported programs, whole pickles."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from tiny_vision.models import TinyCNN

from conftest import expect, images, reference, resnet18
from modelhost.client import ModelHostClient
from modelhost.server import Server, Settings, running

IA = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def unsafe_client(settings: Settings) -> Iterator[ModelHostClient]:
    """A server that allows pickled models and exported programs."""
    unsafe = dataclasses.replace(settings, allow_pickled_models=True)
    with running(unsafe) as server, ModelHostClient(server.target, timeout=120) as client:
        yield client


def pickled(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def exported(model: torch.nn.Module, dynamic_batch: bool = True) -> bytes:
    example = (torch.randn(2, 3, 16, 16),)
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic_batch else None
    program = torch.export.export(model, example, dynamic_shapes=shapes)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def tiny(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    model = TinyCNN(num_classes=5, width=8)
    norm = model.features[1]
    assert isinstance(norm, torch.nn.BatchNorm2d) and norm.running_mean is not None
    norm.running_mean.uniform_(-0.5, 0.5)  # make BatchNorm state matter
    return model.eval()


def test_entry_point_architecture_from_upload_to_predict(client: ModelHostClient) -> None:
    listed = {a.name: a for a in client.list_architectures()}
    assert listed["tiny_cnn"].source == "entry-point"
    params = {p.name: p for p in listed["tiny_cnn"].parameters}
    assert params["num_classes"].default == 10 and not params["num_classes"].required
    assert listed["tiny_mlp"].source == "setting"
    model = tiny()
    client.save_checkpoint("tiny-w", model.state_dict())
    info = client.load_model(
        "tiny",
        architecture="tiny_cnn",
        checkpoint="tiny-w",
        architecture_args={"num_classes": 5, "width": 8},
    )
    assert info.architecture_args == {"num_classes": 5, "width": 8}
    x = images(3, size=16)
    np.testing.assert_array_equal(client.predict("tiny", x), reference(model, x))


def test_architecture_setting_from_environment() -> None:
    settings = Settings.from_env(
        {"MODELHOST_ARCHITECTURES": "a=helpers.models:tiny_mlp, b=helpers.models:memory_hog"}
    )
    assert settings.architectures == ["a=helpers.models:tiny_mlp", "b=helpers.models:memory_hog"]


def test_requests_cannot_name_import_paths(client: ModelHostClient) -> None:
    client.save_checkpoint("w", tiny().state_dict())
    for name in ("os:system", "helpers.models:tiny_mlp", "subprocess.run", "tiny_vision.models"):
        expect(
            IA,
            partial(client.load_model, "m", architecture=name, checkpoint="w"),
            "unknown architecture",
        )


def test_a_misspelt_architecture_gets_a_suggestion(client: ModelHostClient) -> None:
    client.save_checkpoint("w", tiny().state_dict())
    for name, meant in (
        ("ResNet18", "resnet18"),
        ("resnet-18", "resnet18"),
        ("tiny-cnn", "tiny_cnn"),
    ):
        expect(
            IA,
            partial(client.load_model, "m", architecture=name, checkpoint="w"),
            f"unknown architecture {name!r}: did you mean {meant!r}?",
        )
    error = expect(
        IA, partial(client.load_model, "m", architecture="zzz", checkpoint="w"), "unknown"
    )
    assert "did you mean" not in error.message


def test_builder_errors_are_invalid_and_register_nothing(client: ModelHostClient) -> None:
    client.save_checkpoint("w", tiny().state_dict())
    expect(
        IA, lambda: client.load_model("m", architecture="broken", checkpoint="w"), "always fails"
    )
    expect(
        IA,
        lambda: client.load_model(
            "m", architecture="tiny_cnn", checkpoint="w", architecture_args={"depth": 3}
        ),
        "depth",
    )
    assert client.list_models() == []


def test_whole_model_pickle_refused_by_default(client: ModelHostClient, server: Server) -> None:
    """FAILED_PRECONDITION: the server's setting refuses them, as LoadModel does; the advice
    is to send the weights (not an exported program, refused alike)."""
    for checkpoint, what in (
        (pickled(tiny()), "tiny_vision.models.TinyCNN"),
        (exported(tiny()), "torch.export.load"),
    ):
        error = expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            partial(client.save_checkpoint, "whole", checkpoint),
            what,
            "state_dict",
            "--allow-pickled-models",
        )
        assert "export program" not in error.message
    assert client.list_checkpoints() == []
    assert list((server.settings.store / "blobs").iterdir()) == []


def test_whole_model_tutorial_flow_when_allowed(unsafe_client: ModelHostClient) -> None:
    client = unsafe_client
    model = tiny()
    info = client.save_checkpoint("whole", pickled(model))  # torch.save(model, PATH)
    assert info.format == "pickled_model"
    loaded = client.load_model("whole", checkpoint="whole")  # model = torch.load(PATH)
    assert loaded.format == "pickled_model" and loaded.architecture == ""
    x = images(2, size=16)
    np.testing.assert_array_equal(client.predict("whole", x), reference(model, x))
    expect(
        IA,
        lambda: client.load_model("w2", architecture="tiny_cnn", checkpoint="whole"),
        "leave architecture",
    )


def test_exported_program_when_allowed(unsafe_client: ModelHostClient) -> None:
    client = unsafe_client
    model = tiny()
    info = client.save_checkpoint("prog", exported(model))
    assert info.format == "exported_program" and info.tensor_count > 0
    loaded = client.load_model("prog", checkpoint="prog")
    assert loaded.inputs[0].shape == (-1, 3, 16, 16)
    assert loaded.batching.max_batch_size > 1
    x = images(4, size=16)
    np.testing.assert_allclose(client.predict("prog", x), reference(model, x), rtol=1e-5, atol=1e-6)
    expect(IA, lambda: client.predict("prog", images(1, size=20)), "shape", "[-1, 3, 16, 16]")
    client.save_checkpoint("static", exported(model, dynamic_batch=False))
    static = client.load_model("static", checkpoint="static")
    assert static.batching.max_batch_size == 1  # a fixed batch dimension cannot batch
    expect(IA, lambda: client.predict("static", images(3, size=16)), "shape")
    np.testing.assert_allclose(
        client.predict("static", images(2, size=16)),
        reference(model, images(2, size=16)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_graph_checkpoints_refused_after_the_setting_is_turned_off(settings: Settings) -> None:
    unsafe = dataclasses.replace(settings, allow_pickled_models=True)
    with running(unsafe) as server, ModelHostClient(server.target) as client:
        client.save_checkpoint("whole", pickled(tiny()))
    with running(settings) as server, ModelHostClient(server.target) as client:
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            lambda: client.load_model("m", checkpoint="whole"),
            "does not allow",
        )
        assert client.list_models() == []


def test_general_checkpoint_resume_matches_continuing_in_process(
    client: ModelHostClient,
) -> None:
    torch.manual_seed(0)
    model = TinyCNN(num_classes=5, width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))) for _ in range(3)]

    def step(
        m: torch.nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> float:
        m.train()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(batch[0]), batch[1])
        loss.backward()
        opt.step()
        return float(loss.detach())

    loss = 0.0
    for batch in batches[:2]:
        loss = step(model, optimizer, batch)
    model.eval()
    info = client.save_checkpoint(
        "epoch-2",
        {
            "epoch": 2,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": loss,
        },
    )
    assert (info.format, info.epoch) == ("general_checkpoint", 2)
    assert info.loss == pytest.approx(loss)
    client.load_model(
        "serving",
        architecture="tiny_cnn",
        checkpoint="epoch-2",
        architecture_args={"num_classes": 5, "width": 8},
    )
    x = images(2, size=16)
    np.testing.assert_array_equal(client.predict("serving", x), reference(model, x))

    # Another trainer downloads the checkpoint and resumes.
    resumed = client.download_checkpoint("epoch-2")
    assert isinstance(resumed, dict)
    other = TinyCNN(num_classes=5, width=8)
    other.load_state_dict(resumed["model_state_dict"])
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-2)
    other_opt.load_state_dict(resumed["optimizer_state_dict"])
    assert resumed["epoch"] == 2
    step(model, optimizer, batches[2])
    step(other, other_opt, batches[2])
    for (key, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_channels_last_and_half_precision(client: ModelHostClient) -> None:
    model = resnet18()
    client.save_checkpoint("w", model.state_dict())
    info = client.load_model(
        "cl",
        architecture="resnet18",
        checkpoint="w",
        architecture_args={"num_classes": 10},
        channels_last=True,
    )
    assert info.channels_last
    x = images(2)
    np.testing.assert_allclose(client.predict("cl", x), reference(model, x), rtol=1e-4, atol=1e-4)
    half = client.load_model(
        "fp16",
        architecture="resnet18",
        checkpoint="w",
        architecture_args={"num_classes": 10},
        dtype="float16",
    )
    assert half.dtype == "float16"
    out = client.predict("fp16", x.astype(np.float16))
    assert out.dtype == np.float16
    np.testing.assert_allclose(out, reference(model, x), rtol=0.05, atol=0.05)


def test_pretrained_weights_through_torchvision_cache(
    client: ModelHostClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    model = resnet18(num_classes=1000, seed=3)
    torch.save(model.state_dict(), cache / url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    info = client.load_model("pre", architecture="resnet18", weights="IMAGENET1K_V1")
    assert (info.weights, info.checkpoint) == ("IMAGENET1K_V1", "")
    x = images(1)
    np.testing.assert_array_equal(client.predict("pre", x), reference(model, x))
    # Weights neither in the cache nor downloadable (a proxy that refuses at once): the
    # refusal names the cache folder as this server resolves it, and the way around it.
    for proxy in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: client.load_model("p3", architecture="resnet34", weights="IMAGENET1K_V1"),
        f"not in the cache ({cache})",
        "upload the weights as a checkpoint",
    )
    error = expect(
        IA,
        lambda: client.load_model("p2", architecture="resnet18", weights="NOPE"),
        "known: DEFAULT, IMAGENET1K_V1",
    )
    assert error.message.count("DEFAULT") == 1
    expect(
        IA,
        lambda: client.load_model(
            "p4", architecture="resnet18", weights="IMAGENET1K_V1", checkpoint="w"
        ),
        "a checkpoint or pretrained weights, not both",
    )
    expect(
        IA,
        lambda: client.load_model("p3", architecture="tiny_cnn", weights="DEFAULT"),
        "torchvision",
    )
