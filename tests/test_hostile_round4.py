"""Fourth red-team round: what a detection model's builder arguments make every Predict
cost, unauthenticated streams that stay open, and a warm-up shape of too many dimensions."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_hostile_round3 import refused_load

from conftest import assert_same_detections, build, detector, expect, serve
from helpers.processes import free_port
from modelhost.client import ModelHostClient
from modelhost.server import Server, Settings, probes, running

IA = grpc.StatusCode.INVALID_ARGUMENT
SIDE = "a whole number from 1 to 2048"
COUNT = "a whole number from 1 to 10000"


def test_detection_arguments_used_at_every_predict_are_bounded(client: ModelHostClient) -> None:
    """torchvision's detection models resize every image to `min_size`/`max_size` inside
    their forward: loaded with 3500, a 12 KB Predict (and the load's own output probe)
    took 2.3 GB, growing as the square. Such arguments are refused before anything is
    built, naming the argument, its bound and why."""
    for architecture, args, words in (
        (
            "fasterrcnn_mobilenet_v3_large_fpn",
            {"num_classes": 3, "min_size": 3500, "max_size": 3500},
            ("min_size=3500", SIDE, "resizes every image"),
        ),
        ("retinanet_resnet50_fpn", {"max_size": 20000}, ("max_size=20000", SIDE)),
        ("maskrcnn_resnet50_fpn", {"min_size": [800, 4000]}, ("min_size=[800, 4000]", SIDE)),
        ("fcos_resnet50_fpn", {"fixed_size": [4096, 4096]}, ("fixed_size", "list of 2")),
        ("fasterrcnn_resnet50_fpn", {"size_divisible": 100_000}, ("from 1 to 128", "pads")),
        ("fasterrcnn_resnet50_fpn", {"box_detections_per_img": 10**6}, ("box_det", COUNT)),
        ("keypointrcnn_resnet50_fpn", {"rpn_post_nms_top_n_test": 10**6}, (COUNT,)),
        ("ssdlite320_mobilenet_v3_large", {"topk_candidates": 10**6}, ("topk", COUNT)),
        ("fasterrcnn_resnet50_fpn", {"min_size": True}, ("min_size=true", SIDE)),
        ("retinanet_resnet50_fpn", {"image_mean": [0.5, 0.5]}, ("list of 3", "finite")),
        ("ssd300_vgg16", {"image_std": [1, float("nan"), 1]}, ("image_std", "list of 3")),
    ):
        refused_load(client, architecture, args, IA, *words)
    assert client.list_models() == []


def test_a_detection_model_with_modest_runtime_arguments_still_loads(
    client: ModelHostClient,
) -> None:
    """Sizes, counts and normalization within the bounds build, load and answer as the
    same model does in-process."""
    args: dict[str, Any] = {
        "min_size": [224, 256],
        "max_size": 384,
        "size_divisible": 64,
        "rpn_post_nms_top_n_test": 200,
        "box_detections_per_img": 50,
        "box_score_thresh": 0.0,
        "image_mean": [0.4, 0.5, 0.6],
        "image_std": [0.2, 0.25, 0.3],
    }
    model = detector(**args)
    architecture = "fasterrcnn_mobilenet_v3_large_320_fpn"
    serve(
        client, "det", model, architecture=architecture, architecture_args=args | {"num_classes": 3}
    )
    x = np.random.default_rng(0).random((1, 3, 64, 96), dtype=np.float32)
    assert_same_detections(model, x, client.predict("det", x))


@pytest.fixture
def three_streams(server: Server) -> Iterator[grpc.Channel]:
    """A channel to a server that keeps at most 3 open streams that need no token."""
    server.streams.most = 3
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def _watch(channel: grpc.Channel, service: str = "") -> Any:
    """A health Watch stream, once it has answered its first status."""
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=service), timeout=30
    )
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    return stream


def _refused(call: Callable[[], Any], code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value
    for word in words:
        assert word in (caught.value.details() or ""), caught.value.details()


def test_open_health_watch_and_reflection_streams_are_capped(
    three_streams: grpc.Channel, server: Server
) -> None:
    """Watch and reflection need no token and take no slot: a client kept 10,000 Watch
    streams open (21 KB each). Past the cap one more is RESOURCE_EXHAUSTED at once, Check
    (what probes use) still answers, and a place comes back when a stream ends."""
    channel = three_streams
    health = health_pb2_grpc.HealthStub(channel)
    streams = [_watch(channel), _watch(channel, "modelhost.v1.ModelHost"), _watch(channel)]
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    _refused(lambda: _watch(channel), exhausted, "3 health Watch and reflection streams")
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    _refused(lambda: next(reflect(iter([listing]), timeout=30)), exhausted, "use health Check")
    check = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert check.status == health_pb2.HealthCheckResponse.SERVING

    streams.pop().cancel()
    deadline = time.monotonic() + 10
    while server.streams.open == 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # the server sees the cancellation on its own thread
    streams.append(_watch(channel))
    for stream in streams:
        stream.cancel()


def test_one_address_holds_only_its_share_of_the_open_streams(
    three_streams: grpc.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One caller cannot take every open stream (all the others' Watch would be refused):
    past its address's share, its next stream is RESOURCE_EXHAUSTED; Check still answers."""
    monkeypatch.setattr(probes, "MAX_OPEN_STREAMS_PER_ADDRESS", 2)
    channel = three_streams
    streams = [_watch(channel), _watch(channel)]
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    _refused(lambda: _watch(channel), exhausted, "2 health Watch", "from your address")
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    for stream in streams:
        stream.cancel()


def test_watch_of_an_unknown_service_is_not_found_at_once(three_streams: grpc.Channel) -> None:
    """The services are set before the port opens and never change: a Watch of another
    name (up to max_message_bytes of it) is NOT_FOUND, as Check answers, and holds
    nothing."""
    name = "x" * 1_000_000
    for _ in range(5):  # more than the cap: none stays open
        _refused(lambda: _watch(three_streams, name), grpc.StatusCode.NOT_FOUND)
    _watch(three_streams).cancel()


def test_reflection_requests_are_small(three_streams: grpc.Channel) -> None:
    """A reflection stream keeps its last request while it waits for the next: one of a
    megabyte is refused; a listing answers."""
    reflect = reflection_pb2_grpc.ServerReflectionStub(three_streams).ServerReflectionInfo
    huge = reflection_pb2.ServerReflectionRequest(file_containing_symbol="x" * 1_000_000)
    _refused(lambda: next(reflect(iter([huge]), timeout=30)), IA, "at most 4096")
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    services = next(reflect(iter([listing]), timeout=30)).list_services_response.service
    assert "modelhost.v1.ModelHost" in {service.name for service in services}


def test_a_warmup_shape_of_more_dimensions_than_a_tensor_may_have_is_refused(
    client: ModelHostClient,
) -> None:
    """Rank 70 used to reach the model ("the model rejected the input"); a Predict input
    may have at most 64 dimensions, and so may the warm-up's."""
    client.save_checkpoint("w", build("tiny_mlp").state_dict())
    expect(
        IA,
        lambda: client.load_model(
            "m", architecture="tiny_mlp", checkpoint="w", warmup_shape=(1,) * 70
        ),
        "70 dimensions",
        "at most 64",
    )


def test_probes_on_a_port_of_their_own_take_only_small_requests(settings: Settings) -> None:
    """gRPC buffers a whole request before any check: without a token, a caller could send
    most of a 256 MiB health Check and stop, and the server held it. With `health_port`,
    probes answer there without a token and requests over 64 KiB are refused; on the main
    port health and reflection then need a token, refused before the body is read."""
    probed = dataclasses.replace(settings, token="s3cret", health_port=free_port())
    check = health_pb2.HealthCheckRequest(service="modelhost.v1.ModelHost")
    with running(probed) as server:
        assert server.health_port == probed.health_port
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as probes:
            health = health_pb2_grpc.HealthStub(probes)
            answer = health.Check(check, timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            huge = health_pb2.HealthCheckRequest(service="x" * (100 << 10))
            _refused(lambda: health.Check(huge, timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED)
            reflect = reflection_pb2_grpc.ServerReflectionStub(probes).ServerReflectionInfo
            listing = reflection_pb2.ServerReflectionRequest(list_services="")
            listed = next(reflect(iter([listing]), timeout=30)).list_services_response
            assert "modelhost.v1.ModelHost" in {service.name for service in listed.service}
        with grpc.insecure_channel(server.target) as main:
            health = health_pb2_grpc.HealthStub(main)
            _refused(lambda: health.Check(check, timeout=30), grpc.StatusCode.UNAUTHENTICATED)
            token = [("authorization", "Bearer s3cret")]
            answer = health.Check(check, timeout=30, metadata=token)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
