"""Fixtures: a real server on 127.0.0.1 (port 0) with a temp store, and clients of it."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Unpack

import grpc
import numpy as np
import pytest
import torch
import torchvision

from modelhost.client import ModelHostClient, ModelHostError
from modelhost.client.load_options import LoadOptions
from modelhost.server import Server, Settings, running

TEST_ARCHITECTURES = [
    "memory_hog=helpers.models:memory_hog",
    "tiny_mlp=helpers.models:tiny_mlp",
    "slow_mlp=helpers.models:slow_mlp",
    "slow_load_mlp=helpers.models:slow_load_mlp",
    "reload_hog=helpers.models:reload_hog",
    "broken=helpers.models:broken",
    "recorder=helpers.models:recorder",
    "slow_builder=helpers.models:slow_builder",
    "echo=helpers.models:echo",
    "device_failure=helpers.models:device_failure",
    "launch_refused=helpers.models:launch_refused",
    "thread_namer=helpers.models:thread_namer",
    "compile_marker=helpers.models:compile_marker",
    "named_outputs=helpers.models:named_outputs",
    "attention=helpers.models:attention",
    "blend=helpers.models:blend",
    "fixed_size=helpers.models:fixed_size",
    "complex_out=helpers.models:complex_out",
    "gram=helpers.models:gram",
    "centered=helpers.models:centered",
    "sampler=helpers.models:sampler",
    "slow_embedding=helpers.models:slow_embedding",
]


def pytest_configure(config: pytest.Config) -> None:
    torch.manual_seed(0)
    # The tests compare GPU outputs with the CPU's: TF32 rounding alone would use most of
    # their tolerance. The server's own default stays PyTorch's (README).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Server settings: loopback, any free port, a temp store, CPU."""
    return Settings(
        host="127.0.0.1",
        port=0,
        store=tmp_path / "store",
        device="cpu",
        architectures=list(TEST_ARCHITECTURES),
    )


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    with running(settings) as srv:
        yield srv


@pytest.fixture
def client(server: Server) -> Iterator[ModelHostClient]:
    with ModelHostClient(server.target, timeout=120) as c:
        yield c


REPLICA_BUDGET = 400  # bytes: room for one tiny_mlp (268 bytes of weights), not two


@pytest.fixture
def replicas(settings: Settings) -> Iterator[tuple[ModelHostClient, ModelHostClient]]:
    """Clients of two servers on one store: A has a budget (its versions are evictable,
    so it holds the bytes it pages in from)."""
    with contextlib.ExitStack() as stack:
        budget = dataclasses.replace(settings, device_memory_budget=REPLICA_BUDGET)
        a = stack.enter_context(running(budget))
        b = stack.enter_context(running(settings))
        yield (
            stack.enter_context(ModelHostClient(a.target, timeout=60)),
            stack.enter_context(ModelHostClient(b.target, timeout=60)),
        )


def temp_files(store: Path) -> list[str]:
    """What is in the store's tmp/ besides the servers' owner locks: uploads in progress."""
    return sorted(p.name for p in (store / "tmp").iterdir() if p.suffix != ".owner")


def expect(code: grpc.StatusCode, call: Callable[[], Any], *words: str) -> ModelHostError:
    """Asserts `call` fails with `code` and a message containing every one of `words`."""
    with pytest.raises(ModelHostError) as caught:
        call()
    assert caught.value.code == code, caught.value
    for word in words:
        assert word in caught.value.message, caught.value.message
    return caught.value


def assert_same_detections(
    model: torch.nn.Module, x: np.ndarray, out: Mapping[str, np.ndarray]
) -> None:
    """The served outputs of detection model `model` for images `x` ("0.boxes", ...)
    equal the in-process model's, image by image."""
    with torch.inference_mode():
        expected = model(torch.from_numpy(x))
    assert {key.split(".")[0] for key in out} == {str(i) for i in range(len(x))}
    for index, per_image in enumerate(expected):
        for key in ("boxes", "labels", "scores"):
            np.testing.assert_allclose(
                out[f"{index}.{key}"], per_image[key].numpy(), rtol=1e-4, atol=1e-4
            )


def detector(seed: int = 0, **args: object) -> torch.nn.Module:
    """torchvision's smallest detection model (3 classes, random weights), in eval mode."""
    torch.manual_seed(seed)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, **args
    ).eval()


DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"


def serve_detector(
    client: ModelHostClient, name: str = "det", **options: Unpack[LoadOptions]
) -> torch.nn.Module:
    """`detector(box_score_thresh=0.0)` (every box kept, so there are outputs to compare)
    uploaded and loaded as `name`, `options` going to load_model; returns it."""
    options.setdefault("architecture_args", {"num_classes": 3, "box_score_thresh": 0.0})
    return serve(client, name, detector(box_score_thresh=0.0), architecture=DETECTOR, **options)


def resnet18(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A small torchvision model with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


def images(n: int = 2, size: int = 32, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def reference(model: torch.nn.Module, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The in-process model's output on the same input."""
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def build(
    architecture: str, architecture_args: Mapping[str, Any] | None = None, seed: int = 0
) -> torch.nn.Module:
    """`architecture` (one of TEST_ARCHITECTURES, else torchvision's) built in-process with
    `architecture_args` and seeded random weights, in eval mode."""
    entries = dict(entry.split("=", 1) for entry in TEST_ARCHITECTURES)
    torch.manual_seed(seed)
    model: torch.nn.Module
    if architecture in entries:
        module, _, function = entries[architecture].partition(":")
        model = getattr(importlib.import_module(module), function)(**(architecture_args or {}))
    else:
        model = torchvision.models.get_model(architecture, **(architecture_args or {}))
    return model.eval()


def serve(
    client: ModelHostClient,
    name: str,
    model: torch.nn.Module | None = None,
    *,
    architecture: str = "resnet18",
    checkpoint: str | None = None,
    overwrite: bool = False,
    **options: Unpack[LoadOptions],
) -> torch.nn.Module:
    """Uploads `model`'s state_dict as `checkpoint` (default: `name`) and loads it as `name`.

    `model` defaults to `build(architecture, architecture_args)`: for the default resnet18
    that is `resnet18()`, seed 0. A resnet18 gets architecture_args={"num_classes": 10}
    unless told otherwise (architecture_args=None sends none). `overwrite` goes to
    save_checkpoint, every other keyword to load_model. Returns the in-process twin, in
    eval mode, to compare the served outputs with.
    """
    if architecture == "resnet18":
        options.setdefault("architecture_args", {"num_classes": 10})
    if model is None:
        model = build(architecture, options.get("architecture_args"))
    client.save_checkpoint(checkpoint or name, model.state_dict(), overwrite=overwrite)
    client.load_model(name, architecture=architecture, checkpoint=checkpoint or name, **options)
    return model.eval()


@pytest.fixture
def served_resnet(client: ModelHostClient) -> torch.nn.Module:
    """resnet18 (10 classes) uploaded and loaded as model "r18"; returns the in-process twin."""
    return serve(client, "r18", checkpoint="r18-weights")
