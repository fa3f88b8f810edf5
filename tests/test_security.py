"""Safe by default: loopback binding, TLS and mutual TLS, bearer tokens with a management tier."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import expect, images, resnet18, serve
from helpers.certs import make_pki
from modelhost.cli import main as cli
from modelhost.client import ChannelConfig, ModelHostClient
from modelhost.server import Settings, running
from modelhost.server.auth import Tokens

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def test_default_settings_bind_loopback_only() -> None:
    assert Settings().host == "127.0.0.1"


def test_public_address_needs_a_token_mutual_tls_or_insecure(
    settings: Settings, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    public = dataclasses.replace(settings, host="0.0.0.0")
    with pytest.raises(ValueError, match="without a token or mutual TLS"), running(public):
        pass
    # Server-side TLS encrypts but authenticates nobody: not enough on a public bind.
    pki = make_pki(tmp_path)
    tls = dataclasses.replace(
        public, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key)
    )
    with pytest.raises(ValueError, match="authenticates nobody"), running(tls):
        pass
    mutual = dataclasses.replace(tls, tls_client_ca_file=str(pki.ca))
    config = ChannelConfig(
        ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
    )
    with (
        running(mutual) as server,
        ModelHostClient(f"127.0.0.1:{server.port}", config=config) as client,
    ):
        assert client.list_models() == []
    with (
        caplog.at_level(logging.WARNING),
        running(dataclasses.replace(public, insecure=True)) as server,
        ModelHostClient(f"127.0.0.1:{server.port}") as client,
    ):
        assert client.health() == "SERVING"
    assert "INSECURE" in caplog.text
    with (
        running(dataclasses.replace(public, token="s3cret")) as server,
        ModelHostClient(f"127.0.0.1:{server.port}", config=ChannelConfig(token="s3cret")) as client,
    ):
        assert client.list_models() == []


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, Path]:
    inference = tmp_path / "token"
    inference.write_text("# rotated weekly\nold-inference-token\ninference-token\n")
    management = tmp_path / "management-token"
    management.write_text("management-token\n")
    return inference, management


def test_tokens_guard_inference_and_management(
    settings: Settings, tokens: tuple[Path, Path]
) -> None:
    guarded = dataclasses.replace(
        settings, token_file=str(tokens[0]), management_token_file=str(tokens[1])
    )
    with running(guarded) as server:

        def client(token: str | None) -> ModelHostClient:
            return ModelHostClient(server.target, config=ChannelConfig(token=token), timeout=60)

        with client("management-token") as admin:
            serve(admin, "m", checkpoint="w")
            assert admin.predict("m", images(1)).shape == (1, 10)  # management covers inference
        with client(None) as anonymous:
            assert anonymous.health() == "SERVING"  # probes stay open
            expect(UNAUTH, lambda: anonymous.predict("m", images(1)), "no bearer token")
            expect(UNAUTH, anonymous.list_models)
            expect(UNAUTH, lambda: anonymous.save_checkpoint("x", b"123"))
        with client("wrong") as intruder:
            expect(UNAUTH, lambda: intruder.predict("m", images(1)), "invalid bearer token")
            expect(
                UNAUTH, lambda: intruder.load_model("m", architecture="resnet18", checkpoint="w")
            )
        for token in ("inference-token", "old-inference-token"):
            with client(token) as user:
                assert user.predict("m", images(1)).shape == (1, 10)
                assert [c.name for c in user.list_checkpoints()] == ["w"]
                expect(
                    DENIED,
                    partial(user.load_model, "m2", architecture="resnet18", checkpoint="w"),
                    "management token",
                )
                expect(DENIED, partial(user.save_checkpoint, "x", b"123"))
                expect(DENIED, partial(user.delete_checkpoint, "w"))
                expect(DENIED, partial(user.unload_model, "m"))
        with client("management-token") as admin:
            assert [m.version for m in admin.list_models()] == [1]


def test_management_token_alone_leaves_inference_open(settings: Settings) -> None:
    guarded = dataclasses.replace(settings, management_token="admin")
    with running(guarded) as server, ModelHostClient(server.target) as anonymous:
        expect(UNAUTH, lambda: anonymous.save_checkpoint("w", b"123"))
        assert anonymous.list_checkpoints() == []


def test_refused_calls_are_logged_without_flooding_and_the_start_says_what_needs_a_token(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator sees that calls are refused and from where: the first at once, then one
    line every REFUSALS_LOGGED_EVERY seconds counting the others (a client retrying with a
    bad token cannot flood the log). The start-up line says which calls need a token."""
    guarded = dataclasses.replace(settings, management_token="admin")
    caplog.set_level(logging.INFO, logger="modelhost.server")
    with running(guarded) as server, ModelHostClient(server.target) as anonymous:
        assert "modelhost serving on" in caplog.text
        assert "management calls need a token, inference is open" in caplog.text
        for _ in range(5):
            expect(UNAUTH, lambda: anonymous.delete_checkpoint("w"))
    refusals = [r.getMessage() for r in caplog.records if "for their token" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert refusals[0].startswith("refused 1 call(s) for their token; the last: ")
    assert "/modelhost.v1.ModelHost/DeleteCheckpoint from ipv4:127.0.0.1:" in refusals[0]
    assert refusals[0].endswith("(UNAUTHENTICATED)")


def test_a_public_server_with_a_management_token_only_warns_what_is_open(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing binds beyond loopback here: the start-up check is called as the server
    calls it, for a public address."""
    from modelhost.server.app import check_exposure
    from modelhost.server.auth import Tokens

    public = dataclasses.replace(settings, host="0.0.0.0", management_token="admin")
    check_exposure(public, Tokens.from_settings(public), mutual_tls=False)
    assert "DownloadCheckpoint" in caplog.text and "token_file" in caplog.text
    caplog.clear()
    both = dataclasses.replace(public, token="inference", tls_cert_file="c", tls_key_file="k")
    check_exposure(both, Tokens.from_settings(both), mutual_tls=False)
    assert caplog.text == ""  # (without TLS, it warns that tokens travel in clear text)
    with pytest.raises(ValueError, match=r"refusing to serve on 0\.0\.0\.0"):
        bare = dataclasses.replace(settings, host="0.0.0.0")
        check_exposure(bare, Tokens.from_settings(bare), mutual_tls=False)


@pytest.mark.parametrize(
    ("inference", "management"),
    [
        ("", None),
        ("# only a comment\n\n", None),
        (None, ""),
        ("inference-token\n", "  \n# rotated\n"),
        ("# none\n", "management-token\n"),
    ],
)
def test_token_files_without_tokens_stop_start_up(
    settings: Settings, tmp_path: Path, inference: str | None, management: str | None
) -> None:
    """Naming a token file asks for authentication: an empty one must not turn it off."""
    files: dict[str, Any] = {}  # Settings fields by name, for dataclasses.replace
    for setting, text in (("token_file", inference), ("management_token_file", management)):
        if text is not None:
            path = tmp_path / setting
            path.write_text(text)
            files[setting] = str(path)
    empty = next(name for name, text in files.items() if not _tokens_in(Path(text)))
    with (
        pytest.raises(ValueError, match=f"{empty} .* holds no token"),
        running(dataclasses.replace(settings, **files)),
    ):
        pass


def _tokens_in(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def test_token_verdicts_do_not_depend_on_prefixes() -> None:
    tokens = Tokens(inference=(b"abcdef",), management=(b"123456",))
    method = "/modelhost.v1.ModelHost/Predict"
    assert tokens.verdict(method, b"abcdef") is None
    for presented in (b"abcde", b"abcdefg", b"", b"ABCDEF", None):
        verdict = tokens.verdict(method, presented)
        assert verdict is not None and verdict[0] == UNAUTH
    assert tokens.verdict("/grpc.health.v1.Health/Check", None) is None


def test_tls_and_mutual_tls(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = make_pki(tmp_path)
    tls = dataclasses.replace(
        settings, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key)
    )
    with running(tls) as server:
        with ModelHostClient(server.target, config=ChannelConfig(ca_file=str(pki.ca))) as client:
            assert client.health() == "SERVING"
            client.save_checkpoint("w", resnet18().state_dict())
        with ModelHostClient(server.target, timeout=5) as plaintext:
            expect(grpc.StatusCode.UNAVAILABLE, plaintext.list_models)
        wrong_ca = ChannelConfig(ca_file=str(pki.other_ca))
        with ModelHostClient(server.target, timeout=5, config=wrong_ca) as fooled:
            expect(grpc.StatusCode.UNAVAILABLE, fooled.list_models)
        assert cli(["health", "--target", server.target, "--tls", "--ca-file", str(pki.ca)]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"

    mutual = dataclasses.replace(tls, tls_client_ca_file=str(pki.ca))
    with running(mutual) as server:
        with ModelHostClient(
            server.target, timeout=5, config=ChannelConfig(ca_file=str(pki.ca))
        ) as anonymous:
            expect(grpc.StatusCode.UNAVAILABLE, anonymous.list_models)
        config = ChannelConfig(
            ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
        )
        with ModelHostClient(server.target, config=config) as client:
            assert [c.name for c in client.list_checkpoints()] == ["w"]
            client.load_model(
                "m", architecture="resnet18", checkpoint="w", architecture_args={"num_classes": 10}
            )
            out = client.predict("m", images(1))
            assert np.isfinite(out).all()


def test_tls_settings_must_be_complete(settings: Settings, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with (
        pytest.raises(ValueError, match="both"),
        running(dataclasses.replace(settings, tls_cert_file=str(pki.server_cert))),
    ):
        pass
    with (
        pytest.raises(ValueError, match="tls_cert_file"),
        running(dataclasses.replace(settings, tls_client_ca_file=str(pki.ca))),
    ):
        pass


def test_serve_refuses_public_address_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli(["serve", "--host", "0.0.0.0", "--port", "0", "--store", str(tmp_path / "s")])
    assert code == 2
    assert "without a token or mutual TLS" in capsys.readouterr().err


def test_checkpoint_files_are_private(client: ModelHostClient, settings: Settings) -> None:
    client.save_checkpoint("w", {"weight": torch.ones(2)})
    for path in settings.store.rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, path


# The security contract, written independently of auth.py: these RPCs change what the
# server stores or hosts, and need the management token.
MANAGEMENT_RPCS = {
    "/modelhost.v1.ModelHost/SaveCheckpoint",
    "/modelhost.v1.ModelHost/DeleteCheckpoint",
    "/modelhost.v1.ModelHost/LoadModel",
    "/modelhost.v1.ModelHost/UnloadModel",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
}


def _every_rpc() -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every RPC of both services."""
    from modelhost.oip import grpc_service_pb2
    from modelhost.v1 import modelhost_pb2

    return [
        (f"/{service.full_name}/{method.name}", method.client_streaming, method.server_streaming)
        for module in (modelhost_pb2, grpc_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def _call(channel: grpc.Channel, rpc: tuple[str, bool, bool], token: str | None) -> grpc.StatusCode:
    path, client_streaming, server_streaming = rpc
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    kind = {
        (False, False): channel.unary_unary,
        (True, False): channel.stream_unary,
        (False, True): channel.unary_stream,
        (True, True): channel.stream_stream,
    }[(client_streaming, server_streaming)]
    request: object = iter([b""]) if client_streaming else b""
    try:
        reply = kind(path)(request, metadata=metadata, timeout=30)
        if server_streaming:
            list(reply)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_every_rpc_has_a_tier() -> None:
    """The tier table covers every RPC of both services, and names no other."""
    from modelhost.server.auth import MANAGEMENT, TIERS

    assert set(TIERS) == {path for path, _, _ in _every_rpc()}
    assert {path for path, tier in TIERS.items() if tier == MANAGEMENT} == MANAGEMENT_RPCS


def test_every_rpc_checks_its_token_tier(settings: Settings, tokens: tuple[Path, Path]) -> None:
    """Each RPC of both services, from their descriptors (a new RPC is covered as it is
    added), against no token, the inference token and the management token."""
    rpcs = _every_rpc()
    assert {path for path, _, _ in rpcs} >= MANAGEMENT_RPCS
    guarded = dataclasses.replace(
        settings, token_file=str(tokens[0]), management_token_file=str(tokens[1])
    )
    refusals = {UNAUTH, DENIED}
    with running(guarded) as server, grpc.insecure_channel(server.target) as channel:
        for rpc in rpcs:
            path = rpc[0]
            assert _call(channel, rpc, None) == UNAUTH, path
            assert _call(channel, rpc, "wrong") == UNAUTH, path
            by_user = _call(channel, rpc, "inference-token")
            if path in MANAGEMENT_RPCS:
                assert by_user == DENIED, path
            else:
                assert by_user not in refusals, path
            by_admin = _call(channel, rpc, "management-token")
            assert by_admin not in refusals, path
            for code in (by_user, by_admin):  # an empty request is the caller's error
                assert code not in {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}, path
