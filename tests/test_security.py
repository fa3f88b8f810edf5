"""Safe by default: loopback binding, TLS and mutual TLS, bearer tokens with a management tier."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from conftest import expect, images, resnet18
from helpers.certs import make_pki
from modelhost.cli import main as cli
from modelhost.client import ChannelConfig, ModelHostClient
from modelhost.server import Settings, running
from modelhost.server.auth import Tokens

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def test_default_settings_bind_loopback_only() -> None:
    assert Settings().host == "127.0.0.1"


def test_public_address_needs_tls_a_token_or_insecure(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    public = dataclasses.replace(settings, host="0.0.0.0")
    with pytest.raises(ValueError, match="TLS or a token"), running(public):
        pass
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
            admin.save_checkpoint("w", resnet18().state_dict())
            admin.load_model(
                "m", architecture="resnet18", checkpoint="w", architecture_args={"num_classes": 10}
            )
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
                    lambda u=user: u.load_model("m2", architecture="resnet18", checkpoint="w"),
                    "management token",
                )
                expect(DENIED, lambda u=user: u.save_checkpoint("x", b"123"))
                expect(DENIED, lambda u=user: u.delete_checkpoint("w"))
                expect(DENIED, lambda u=user: u.unload_model("m"))
        with client("management-token") as admin:
            assert [m.version for m in admin.list_models()] == [1]


def test_management_token_alone_leaves_inference_open(settings: Settings) -> None:
    guarded = dataclasses.replace(settings, management_token="admin")
    with running(guarded) as server, ModelHostClient(server.target) as anonymous:
        expect(UNAUTH, lambda: anonymous.save_checkpoint("w", b"123"))
        assert anonymous.list_checkpoints() == []


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
    assert "without TLS or a token" in capsys.readouterr().err


def test_checkpoint_files_are_private(client: ModelHostClient, settings: Settings) -> None:
    client.save_checkpoint("w", {"weight": torch.ones(2)})
    for path in settings.store.rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, path
