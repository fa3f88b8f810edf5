"""Stopping and crashing a container: `docker stop` drains the calls in flight and exits
0 within the grace period; `docker kill` during an upload, then `docker start`, leaves a
store of complete checkpoints only, and the hosted models come back (MODELHOST_RESTORE)."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest
import torch

from conftest import images, reference
from container.conftest import STORE, Containers, Tokens, wait_until
from container.docker import configmap_env
from container.service import MODEL, Load, check_predict, connect, serve_model
from modelhost.client import ModelHostError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

GRACE = float(configmap_env()["MODELHOST_GRACE_SECONDS"])
# How much sooner than the server's "signal received" log line a call must have begun
# to count as in flight at SIGTERM: by then its request (2.4 MB, encoded and sent by one of
# six threads of a busy client on two cores) has surely reached the server.
IN_FLIGHT_MARGIN = 0.25


def log_time(line: str) -> float:
    """The time (time.time()) of a `docker logs --timestamps` line."""
    stamp = line.split(" ", 1)[0]  # 2026-01-01T10:00:00.123456789Z
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{seconds}.{fraction[:6]}+00:00").timestamp()


def test_docker_stop_drains_predicts_in_flight_and_exits_0(
    tokens: Tokens, containers: Containers
) -> None:
    server = containers.run("server", tokens=tokens)
    server.wait_healthy()
    with connect(server.target, tokens.management) as client:
        model = serve_model(client)
    # Calls of about a second each (batches of 4-image 224x224 requests on the CPU), so
    # that several are in flight at any time; no retries, so that a call cut off shows.
    x = images(4, 224, seed=1)
    with connect(server.target, tokens.inference, retries=False) as client:
        load = Load(client, threads=6, x=x, expected=reference(model, x))
        with load.running():
            load.wait_calls(12)
            stop_seconds = server.stop(grace=45)
    state = server.state()
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert stop_seconds < GRACE + 5, f"docker stop took {stop_seconds:.1f}s"

    lines = server.log_lines()
    (signal_line,) = [line for line in lines if "signal received" in line]
    assert any("modelhost stopped" in line for line in lines), lines[-10:]
    signalled = log_time(signal_line)
    in_flight = [call for call in load.calls if call.began < signalled - IN_FLIGHT_MARGIN]
    failed = [call for call in in_flight if call.error]
    assert not failed, f"{len(failed)} of {len(in_flight)} calls in flight at SIGTERM failed: " + (
        ", ".join(
            f"{c.error} {c.began - signalled:+.3f}s..{c.ended - signalled:+.3f}s" for c in failed
        )
    )
    # Calls were running at SIGTERM, and finished during the drain.
    drained = [c for c in load.calls if c.began < signalled < c.ended and not c.error]
    assert drained, "no call was in flight at SIGTERM: the test proves nothing"
    assert load.wrong == 0
    # Calls that came as it stopped are refused: UNAVAILABLE (GOAWAY, or the port closed),
    # or CANCELLED (reached the server as it began to shut down, before any handler).
    assert set(load.failures()) <= {"UNAVAILABLE", "CANCELLED"}, load.failures()
    print(
        f"stop took {stop_seconds:.1f}s; {len(drained)} calls drained after SIGTERM; "
        f"after it: {dict(load.failures())}"
    )


def test_docker_kill_during_an_upload_then_start(tokens: Tokens, containers: Containers) -> None:
    server = containers.run("server", tokens=tokens)
    server.wait_healthy()
    with connect(server.target, tokens.management) as client:
        model = serve_model(client)

    def partial_uploads() -> list[str]:
        found = server.exec("find", f"{STORE}/tmp", "-name", "*.upload-*", "-size", "+1k")
        return found.split()

    # A 200 MB upload, slowed down (20 ms per 2 MiB chunk), killed once part of it is in
    # the store's tmp/.
    big = {"weight": torch.zeros(50_000_000)}
    failure: list[BaseException] = []

    def upload() -> None:
        try:
            with connect(server.target, tokens.management) as uploader:
                uploader.save_checkpoint("partial", big, progress=lambda *_: time.sleep(0.02))
        except ModelHostError as error:
            failure.append(error)

    uploading = threading.Thread(target=upload)
    uploading.start()
    wait_until(lambda: bool(partial_uploads()), 60, "a partial upload in the store")
    server.kill()
    uploading.join(60)
    assert failure, "the upload finished before the kill: the test proves nothing"
    assert server.state()["ExitCode"] == 137

    server.start()
    server.wait_healthy()  # healthy: the hosted models are restored
    with connect(server.target, tokens.management) as client:
        assert [c.name for c in client.list_checkpoints()] == [f"{MODEL}-weights"]
        assert [(m.name, m.version, m.state) for m in client.list_models()] == [(MODEL, 1, "ready")]
        check_predict(client, model)
    assert partial_uploads() == []
