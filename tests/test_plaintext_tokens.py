"""Bearer tokens over plaintext beyond this machine are warned about (red team 8, L3).

The server logs a WARNING at start when it takes tokens on a non-loopback address without
TLS; the client logs one, once per channel, when it attaches a token to a plaintext
channel to an address beyond this machine. Neither refuses: plain gRPC inside a cluster
whose service mesh encrypts the traffic (mutual TLS) is a supported deployment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest

from helpers.certs import make_pki
from modelhost.client import AsyncModelHostClient, ChannelConfig, ModelHostClient
from modelhost.client.channel import is_local_target
from modelhost.server import Settings, running
from modelhost.server.app import check_exposure
from modelhost.server.auth import Tokens

SECRET = "s3cret-management-token"


def server_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "modelhost.server.app" and r.levelno == logging.WARNING
    ]


def client_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "modelhost.client.channel"]


def exposure(settings: Settings, mutual_tls: bool = False) -> None:
    """The start-up check, called as the server calls it (nothing binds beyond loopback)."""
    check_exposure(settings, Tokens.from_settings(settings), mutual_tls=mutual_tls)


def test_a_public_plaintext_server_with_tokens_warns(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    public = dataclasses.replace(settings, host="0.0.0.0")
    for given in (
        dataclasses.replace(public, token="t"),
        dataclasses.replace(public, management_token="m"),
        dataclasses.replace(public, token="t", management_token="m"),
    ):
        caplog.clear()
        exposure(given)
        plaintext = [w for w in server_warnings(caplog) if "clear text" in w]
        assert len(plaintext) == 1, server_warnings(caplog)
        assert "0.0.0.0" in plaintext[0] and "tls_cert_file" in plaintext[0]
        assert "mutual TLS" in plaintext[0]


def test_no_plaintext_warning_on_loopback_or_with_tls(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = dataclasses.replace(settings, token="t", management_token="m")
    exposure(tokens)  # loopback
    exposure(dataclasses.replace(tokens, host="::1"))
    tls = dataclasses.replace(tokens, host="0.0.0.0", tls_cert_file="c", tls_key_file="k")
    exposure(tls)
    exposure(dataclasses.replace(tls, tls_client_ca_file="ca"), mutual_tls=True)
    insecure = dataclasses.replace(settings, host="0.0.0.0", insecure=True)
    exposure(insecure)  # no token: its own INSECURE warning, not this one
    assert not [w for w in server_warnings(caplog) if "clear text" in w]


def test_a_server_started_beyond_loopback_warns(
    settings: Settings, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A real start on 127.0.0.2: loopback to the kernel, not to `is_loopback`."""
    caplog.set_level(logging.INFO, logger="modelhost.server.app")
    tokens = tmp_path / "tokens"
    tokens.write_text("t\n")
    public = dataclasses.replace(settings, host="127.0.0.2", token_file=str(tokens))
    with running(public):
        pass
    assert [w for w in server_warnings(caplog) if "clear text" in w]
    caplog.clear()
    pki = make_pki(tmp_path)
    tls = dataclasses.replace(
        public, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key)
    )
    with running(tls):
        pass
    assert "modelhost ready" in caplog.text
    assert not [w for w in server_warnings(caplog) if "clear text" in w]


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("127.0.0.1:50051", True),
        ("127.0.0.3:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("dns:///localhost:50051", True),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", True),
        ("ipv6:[::1]:50051", True),
        ("unix:/run/modelhost.sock", True),
        ("unix:///run/modelhost.sock", True),
        ("10.0.0.5:50051", False),
        ("modelhost.default.svc:50051", False),
        ("dns:///modelhost:50051", False),
        ("ipv4:127.0.0.1:1,10.0.0.5:2", False),
        ("[2001:db8::1]:50051", False),
        ("localhost.example.com:50051", False),
        ("0.0.0.0:50051", False),
    ],
)
def test_local_targets(target: str, local: bool) -> None:
    assert is_local_target(target) is local


def test_a_token_on_a_plaintext_channel_beyond_this_machine_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ChannelConfig(token=SECRET)
    config.channel("10.255.255.1:50051").close()
    config.channel("dns:///modelhost.example:50051").close()

    async def aio() -> None:
        await config.aio_channel("10.255.255.1:50051").close()

    asyncio.run(aio())
    warnings = client_warnings(caplog)
    assert len(warnings) == 3, warnings
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert "10.255.255.1:50051" in warnings[0] and "modelhost.example" in warnings[1]
    assert all("plaintext" in w and "TLS" in w for w in warnings)
    assert SECRET not in caplog.text


def test_no_warning_without_a_token_with_tls_or_on_loopback(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ChannelConfig().channel("10.255.255.1:50051").close()  # no token
    pki = make_pki(tmp_path)
    tls = ChannelConfig(token=SECRET, tls=True, ca_file=str(pki.ca))
    tls.channel("10.255.255.1:50051").close()
    for target in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "unix:/tmp/sock"):
        ChannelConfig(token=SECRET).channel(target).close()
    assert client_warnings(caplog) == []


def test_a_client_warns_once_per_channel_and_still_sends_the_token(
    settings: Settings, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """0.0.0.0 reaches this machine's listeners, but is no loopback address: the client
    cannot tell, so it warns; the token is still sent (not refused)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{SECRET}\n")
    with running(dataclasses.replace(settings, token_file=str(tokens))) as server:
        config = ChannelConfig(token=SECRET)
        with ModelHostClient(f"0.0.0.0:{server.port}", config=config, timeout=30) as client:
            for _ in range(3):
                assert client.list_models() == []
        assert len(client_warnings(caplog)) == 1

        async def aio() -> None:
            target = f"0.0.0.0:{server.port}"
            async with AsyncModelHostClient(target, config=config, timeout=30) as client:
                for _ in range(3):
                    assert await client.list_models() == []

        asyncio.run(aio())
        assert len(client_warnings(caplog)) == 2
