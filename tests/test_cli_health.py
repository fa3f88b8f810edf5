"""`modelhost health --local`, the image's HEALTHCHECK: it asks the server that the
`MODELHOST_*` variables configure, on its probe port (MODELHOST_HEALTH_PORT) when that is
set, else on its main port; plaintext and without a token, against real servers."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.certs import make_pki
from helpers.processes import free_port
from modelhost.cli import local_target, main
from modelhost.server import Server, Settings
from modelhost.server.app import running

SERVICE = "modelhost.v1.ModelHost"
VARIABLES = (
    "MODELHOST_HOST",
    "MODELHOST_PORT",
    "MODELHOST_HEALTH_PORT",
    "MODELHOST_TLS_CERT_FILE",
    "MODELHOST_TOKEN",
    "MODELHOST_TARGET",
)


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The process environment without any of the variables these tests set."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def health(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["health", *argv])
    except SystemExit as status:  # not SERVING: cmd_health exits with the status
        code = 1 if status.code else 0
        print(status.code, file=sys.stderr)
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err


def test_asks_the_probe_port_without_a_token_when_it_is_set(
    settings: Settings, environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    probed = dataclasses.replace(settings, token="s3cret", health_port=free_port())
    with running(probed) as server:
        environ.setenv("MODELHOST_HOST", "0.0.0.0")  # as in the image: asks 127.0.0.1
        environ.setenv("MODELHOST_PORT", str(server.port))
        environ.setenv("MODELHOST_HEALTH_PORT", str(server.health_port))
        environ.setenv("MODELHOST_TARGET", "127.0.0.1:1")  # --local ignores the target
        assert health(capsys, "--local", "--service", SERVICE)[:2] == (0, "SERVING")
        # The same check of the main port, without a token, is refused there.
        code, _, err = health(capsys, "--target", server.target, "--service", SERVICE)
        assert code == 1 and "UNAUTHENTICATED" in err
        # --local sends no token, not even the caller's: the probe port needs none.
        environ.setenv("MODELHOST_TOKEN", "wrong")
        assert health(capsys, "--local")[:2] == (0, "SERVING")
        # A service the server does not have is not healthy.
        code, _, err = health(capsys, "--local", "--service", "no.such.Service")
        assert code == 1 and "NOT_FOUND" in err


def test_asks_the_main_port_without_a_probe_port(
    server: Server, environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environ.setenv("MODELHOST_HOST", "127.0.0.1")
    environ.setenv("MODELHOST_PORT", str(server.port))
    environ.setenv("MODELHOST_HEALTH_PORT", "0")  # off, as the setting reads it
    assert health(capsys, "--local", "--service", SERVICE)[:2] == (0, "SERVING")
    # A probe port that nothing listens on fails the check: no silent fallback.
    environ.setenv("MODELHOST_HEALTH_PORT", str(free_port()))
    code, _, err = health(capsys, "--local", "--timeout", "5")
    assert code == 1 and "UNAVAILABLE" in err


def test_with_tls_on_the_main_port_only_the_probe_port_can_be_asked(
    settings: Settings,
    environ: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path)
    tls = dataclasses.replace(
        settings,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        health_port=free_port(),
    )
    with running(tls) as server:
        environ.setenv("MODELHOST_PORT", str(server.port))
        environ.setenv("MODELHOST_TLS_CERT_FILE", str(pki.server_cert))
        environ.setenv("MODELHOST_HEALTH_PORT", str(server.health_port))
        assert health(capsys, "--local", "--service", SERVICE)[:2] == (0, "SERVING")
        # Without a probe port the plaintext check cannot ask a TLS port: it says so.
        environ.delenv("MODELHOST_HEALTH_PORT")
        code, _, err = health(capsys, "--local")
        assert code == 1 and "MODELHOST_HEALTH_PORT" in err and "TLS" in err


def test_local_target() -> None:
    assert local_target({}) == "127.0.0.1:50051"
    assert local_target({"MODELHOST_HOST": "::", "MODELHOST_PORT": "7"}) == "127.0.0.1:7"
    assert local_target({"MODELHOST_HOST": "::1", "MODELHOST_PORT": "7"}) == "[::1]:7"
    both = {"MODELHOST_HOST": "10.1.2.3", "MODELHOST_PORT": "7", "MODELHOST_HEALTH_PORT": "8"}
    assert local_target(both) == "10.1.2.3:8"
    with pytest.raises(ValueError, match="not a port"):
        local_target({"MODELHOST_HEALTH_PORT": "probe"})
    with pytest.raises(ValueError, match="picks the port at start"):
        local_target({"MODELHOST_PORT": "0"})
    with pytest.raises(ValueError, match="not a port"):
        local_target({"MODELHOST_PORT": "grpc"})
    for spelled in ("+50052", "50_052", "\uff15\uff10\uff10\uff15\uff12"):  # as int() reads them
        assert local_target({"MODELHOST_HEALTH_PORT": spelled}) == "127.0.0.1:50052"


def test_the_healthcheck_command_runs_as_a_process(settings: Settings) -> None:
    """What the image runs: the `modelhost` command in a process of its own."""
    probed = dataclasses.replace(settings, token="s3cret", health_port=free_port())
    with running(probed) as server:
        env = {key: value for key, value in os.environ.items() if key not in VARIABLES}
        env |= {
            "MODELHOST_PORT": str(server.port),
            "MODELHOST_HEALTH_PORT": str(server.health_port),
        }
        command = [sys.executable, "-m", "modelhost.cli", "health", "--local", "--timeout", "5"]

        def check(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*command, *argv], env=env, capture_output=True, text=True, timeout=60, check=False
            )

        done = check("--service", SERVICE)
        assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr
        env["MODELHOST_HEALTH_PORT"] = "0"  # the main port, which wants a token here
        done = check()
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr, done.stderr
