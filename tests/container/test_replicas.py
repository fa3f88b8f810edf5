"""Two replicas on one store volume, like the Deployment's pods on their shared claim:
what one stores the other loads, a client of both spreads its calls over both, and a
rolling replacement of both under load fails no call."""

from __future__ import annotations

import time
from functools import partial

import pytest

from conftest import images, reference
from container import docker as d
from container.conftest import Containers, Image, Tokens, wait_until
from container.service import MODEL, Load, check_predict, connect, predicts, serve_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def pair(containers: Containers, tokens: Tokens) -> tuple[str, list[d.Container]]:
    """A new store volume and replicas "a" and "b" on it, both healthy."""
    store = containers.volume()
    replicas = [containers.run(role, store=store, tokens=tokens) for role in "ab"]
    for replica in replicas:
        replica.wait_healthy()
    return store, replicas


def both(replicas: list[d.Container]) -> str:
    return "ipv4:" + ",".join(replica.target for replica in replicas)


def load_stored(target: str, tokens: Tokens) -> None:
    """Loads the model on the replica at `target` from the checkpoint already stored."""
    with connect(target, tokens.management) as client:
        assert f"{MODEL}-weights" in [c.name for c in client.list_checkpoints()]
        client.load_model(
            MODEL,
            architecture="resnet18",
            checkpoint=f"{MODEL}-weights",
            architecture_args={"num_classes": 10},
        )


def takes_calls(replica: d.Container) -> bool:
    return predicts(replica).get("OK", 0) >= 20


def test_replicas_share_the_store_and_the_calls(tokens: Tokens, containers: Containers) -> None:
    _, (a, b) = pair(containers, tokens)
    with connect(a.target, tokens.management) as through_a:
        model = serve_model(through_a)
    load_stored(b.target, tokens)  # uploaded through "a", loaded through "b"
    with connect(b.target, tokens.inference) as through_b:
        check_predict(through_b, model)
    before = {r.name: predicts(r).get("OK", 0) for r in (a, b)}

    # One client, both addresses: round-robin spreads the calls over both replicas.
    calls = 40
    with connect(both([a, b]), tokens.inference) as client:
        for _ in range(calls):
            check_predict(client, model)
    share = {r.name: predicts(r).get("OK", 0) - before[r.name] for r in (a, b)}
    assert sum(share.values()) == calls, share
    assert min(share.values()) >= calls // 4, share


def test_rolling_replacement_under_load_fails_no_call(
    docker: d.Docker, image: Image, tokens: Tokens, containers: Containers
) -> None:
    """Replace "a" by a container of a newer image (same port, same store), wait until
    it is healthy (its models restored), then the same for "b", while 16 threads call
    Predict through one client of both addresses (the library's default settings)."""
    newer = f"{image.tag}-next"
    d.retag(docker, image.tag, newer, "next")
    image.tags.append(newer)
    store, old = pair(containers, tokens)
    with connect(old[0].target, tokens.management) as client:
        model = serve_model(client)
    load_stored(old[1].target, tokens)

    x = images(1, 32, seed=5)
    steps: list[tuple[float, str]] = []
    new: list[d.Container] = []
    with connect(both(old), tokens.inference) as client:
        load = Load(client, threads=16, x=x, expected=reference(model, x))
        with load.running():
            load.wait_calls(200)
            for replica in old:
                steps.append((time.time(), f"docker stop {replica.name}"))
                replica.stop(grace=45)
                steps.append((time.time(), f"stopped; docker run {replica.name}-next"))
                role = replica.name.rsplit("-", 1)[1]
                started = containers.run(
                    f"{role}-next", store=store, tokens=tokens, image=newer, port=replica.port
                )
                started.wait_healthy()
                steps.append((time.time(), f"{started.name} healthy"))
                # The rollout goes on once the client uses the new replica: it reconnects
                # to a restarted address after its reconnect backoff, not at once.
                wait_until(partial(takes_calls, started), 60, f"calls reaching {started.name}")
                steps.append((time.time(), f"{started.name} takes calls"))
                new.append(started)
            steps.append((time.time(), "done"))

    zero = min(call.began for call in load.calls)
    timeline = [f"{at - zero:7.2f}s {what}" for at, what in steps]
    failures = [
        f"{c.began - zero:7.2f}s to {c.ended - zero:7.2f}s {c.error}" for c in load.calls if c.error
    ]
    assert not failures, "\n".join(["failed calls:", *failures[:40], "steps:", *timeline])
    assert load.wrong == 0
    for replica in new:
        assert docker.inspect(replica.name)["Config"]["Image"] == newer
        assert predicts(replica).get("OK", 0) > 0, f"{replica.name} got no calls"
    print(f"{len(load.calls)} calls, none failed:\n" + "\n".join(timeline))
