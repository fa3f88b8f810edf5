"""Hostile peers, second round: idle /metrics connections, a download longer than its
header, an error message that echoes a long non-ASCII name, tokens given with a newline."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import expect
from helpers.processes import free_port
from modelhost.client import DataLossError, ModelHostClient
from modelhost.server import Settings, running
from modelhost.server.auth import Tokens
from modelhost.server.metrics import READ_TIMEOUT
from modelhost.v1 import modelhost_pb2 as pb

PREDICT = "/modelhost.v1.ModelHost/Predict"


def test_idle_metrics_connections_are_closed(settings: Settings) -> None:
    observed = dataclasses.replace(settings, metrics_port=free_port())
    with running(observed) as server:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        urllib.request.urlopen(url, timeout=10).read()
        baseline = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", server.metrics_port)) for _ in range(60)]
        try:
            for connection in idle:
                connection.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            time.sleep(1)
            assert threading.active_count() <= baseline + 40  # at most MAX_CONNECTIONS
            time.sleep(READ_TIMEOUT + 2)
            assert threading.active_count() <= baseline + 2
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            assert "modelhost_requests_total" in text
        finally:
            for connection in idle:
                connection.close()


class _Liar:
    """A DownloadCheckpoint that announces 10 bytes, then streams 64 MiB."""

    def __init__(self) -> None:
        self.sent = 0

    def download(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        info = pb.CheckpointInfo(
            name=request.name,
            size_bytes=10,
            sha256="0" * 64,
            format=pb.CHECKPOINT_FORMAT_STATE_DICT,
        )
        yield pb.DownloadCheckpointResponse(info=info)
        chunk = b"\0" * (1 << 20)
        for _ in range(64):
            if not context.is_active():
                return
            self.sent += len(chunk)
            yield pb.DownloadCheckpointResponse(chunk=chunk)


@pytest.fixture
def liar() -> Iterator[tuple[str, _Liar]]:
    fake = _Liar()
    handler = grpc.method_handlers_generic_handler(
        "modelhost.v1.ModelHost",
        {
            "DownloadCheckpoint": grpc.unary_stream_rpc_method_handler(
                fake.download,
                request_deserializer=pb.DownloadCheckpointRequest.FromString,
                response_serializer=pb.DownloadCheckpointResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", fake
    server.stop(0)


@pytest.mark.parametrize("to_file", [False, True])
def test_download_longer_than_announced_stops_at_once(
    liar: tuple[str, _Liar], tmp_path: Path, to_file: bool
) -> None:
    target, fake = liar
    dest = tmp_path / "x.pt" if to_file else None
    seen: list[tuple[int, int]] = []
    with ModelHostClient(target, timeout=60) as client:
        started = time.monotonic()
        with pytest.raises(DataLossError) as caught:
            client.download_checkpoint("x", dest, progress=lambda *done: seen.append(done))
        assert time.monotonic() - started < 10
    assert all(got <= 10 for got, _ in seen), seen[-1]
    assert "more than the 10 bytes it announced" in caught.value.message
    assert fake.sent < 32 << 20  # the server was cut off, not read to its end
    assert list(tmp_path.iterdir()) == []  # neither dest nor dest.part


def test_error_echoing_a_long_non_ascii_name_keeps_its_status(client: ModelHostClient) -> None:
    architecture = "\U0001f600" * 1900
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.load_model("m", architecture=architecture, weights="DEFAULT"),
        "\U0001f600",
    )
    assert len(error.message.encode()) <= 1024 and error.message.endswith("…")


def tokens_given(settings: Settings, setting: str, value: str) -> Tokens:
    given: dict[str, Any] = {setting: value}
    return Tokens.from_settings(dataclasses.replace(settings, **given))


@pytest.mark.parametrize("setting", ["token", "management_token"])
def test_tokens_given_by_value_lose_surrounding_whitespace(
    settings: Settings, setting: str
) -> None:
    tokens = tokens_given(settings, setting, " secret\n")
    assert tokens.inference + tokens.management == (b"secret",)
    assert tokens.verdict(PREDICT, b"secret") is None


@pytest.mark.parametrize("setting", ["token", "management_token"])
def test_a_token_of_only_whitespace_stops_the_server(settings: Settings, setting: str) -> None:
    with pytest.raises(ValueError, match=f"{setting} is only whitespace"):
        tokens_given(settings, setting, " \n")


def test_a_token_file_with_a_byte_order_mark(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("\ufeffsecret\n", encoding="utf-8")
    tokens = Tokens.from_settings(dataclasses.replace(settings, token_file=str(path)))
    assert tokens.verdict(PREDICT, b"secret") is None
