"""The built image, run the way users and deploy/kubernetes run it: uid 10001, read-only
root, a tmpfs on /tmp, no capabilities, no new privileges, the store on a named volume,
tokens and TLS material in read-only mounted files, the configmap's settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from conftest import expect, images, reference
from container import docker as d
from container.conftest import (
    IMAGE_UID,
    MAX_SIZE_ABOVE_BASE,
    STORE,
    TLS_DIR,
    Containers,
    Image,
    Tokens,
)
from container.service import MODEL, check_predict, connect, metrics, predicts, serve_model
from helpers.certs import Pki
from helpers.triton import start_child
from modelhost.cli import build_parser, local_target

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEPLOYMENT = d.ROOT / "deploy" / "kubernetes" / "deployment.yaml"


def healthcheck(docker: d.Docker, image: str) -> list[str]:
    """The image's HEALTHCHECK command (`docker image inspect`)."""
    config = json.loads(docker.out("image", "inspect", "--format={{json .Config}}", image))
    test: list[str] = config["Healthcheck"]["Test"]
    assert test[0] == "CMD", test
    return test[1:]


def test_image_is_lean_non_root_and_holds_no_build_leftovers(
    docker: d.Docker, image: Image
) -> None:
    config = json.loads(docker.out("image", "inspect", "--format={{json .Config}}", image.tag))
    assert config["User"] == f"{IMAGE_UID}:0"
    assert config["Entrypoint"] + config["Cmd"] == ["modelhost", "serve"]
    assert STORE in config["Volumes"]
    print(f"image size above its base: {image.size_above_base / 1e6:.0f} MB")
    assert 0 < image.size_above_base < MAX_SIZE_ABOVE_BASE
    # No compiler or build tool, no sources, no pip cache anywhere in the image.
    script = (
        "for tool in gcc cc c++ g++ clang make ld; do command -v $tool; done; "
        "ls -d /src 2>/dev/null; "
        "find / -xdev \\( -path '*/.cache/pip' -o -path '*/pip/http*' \\) -print 2>/dev/null; "
        "id -u"
    )
    found = docker.out("run", "--rm", "--network=none", "--entrypoint=sh", image.tag, "-c", script)
    assert found.splitlines() == [str(IMAGE_UID)], found
    # The build stage's pip settings (build arguments) stay out of the final image.
    history = docker.out("history", "--no-trunc", "--format={{.CreatedBy}}", image.tag)
    base = docker.out("history", "--no-trunc", "--format={{.CreatedBy}}", image.base)
    added = history.splitlines()[: len(history.splitlines()) - len(base.splitlines())]
    assert added and not [line for line in added if "PIP_" in line], added
    assert "PIP_CERT" not in json.dumps(config)


def test_kubernetes_probes_and_the_healthcheck_ask_the_same_health_service(
    docker: d.Docker, image: Image
) -> None:
    """Docker's HEALTHCHECK and Kubernetes' probes both ask grpc.health.v1 on the probe
    port (MODELHOST_HEALTH_PORT, set by the configmap) for the ModelHost service: healthy
    means models restored and serving. The image leaves the probe port off (containers
    sharing a host network would fight over a fixed one): its check then asks the main
    port, where health is open while there is no probe port."""
    (deployment,) = [doc for doc in yaml.safe_load_all(DEPLOYMENT.read_text()) if doc]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    readiness = container["readinessProbe"]["grpc"]
    command = healthcheck(docker, image.tag)
    assert command[:3] == ["modelhost", "health", "--local"], command
    args = build_parser(serve_flags=False).parse_args(command[1:])
    assert args.service == readiness["service"] == "modelhost.v1.ModelHost", command
    env = dict(
        item.split("=", 1)
        for item in json.loads(
            docker.out("image", "inspect", "--format={{json .Config.Env}}", image.tag)
        )
    )
    config = d.configmap_env()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == ports["probe"], probe
    assert ports["probe"] == int(config["MODELHOST_HEALTH_PORT"])
    assert ports["grpc"] == int(env["MODELHOST_PORT"]) == int(config["MODELHOST_PORT"])
    # Where the check asks: the image alone, then with the configmap's settings.
    assert "MODELHOST_HEALTH_PORT" not in env
    assert local_target(env) == f"127.0.0.1:{ports['grpc']}"
    assert local_target(env | config) == f"127.0.0.1:{ports['probe']}"


def test_serves_read_only_with_mounted_tokens(
    docker: d.Docker, image: Image, tokens: Tokens, containers: Containers
) -> None:
    server = containers.run("server", tokens=tokens)
    # The image's own HEALTHCHECK (run every second here) turns the container healthy.
    waited = server.wait_healthy()
    inspected = docker.inspect(server.name)
    assert inspected["Config"]["Healthcheck"]["Test"][1:] == healthcheck(docker, image.tag)
    host = inspected["HostConfig"]
    assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    # The server runs as 10001 with no capabilities at all.
    status = server.exec("cat", "/proc/1/status")
    assert re.search(rf"^Uid:\s+{IMAGE_UID}\s", status, re.MULTILINE), status
    assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE), status
    print(f"healthy {waited:.1f}s after docker run")

    # The probe port answers health without a token, and nothing else. On the main port
    # health then needs a token like every call: the HEALTHCHECK asked the probe port.
    with connect(server.probe_target) as probe:
        assert probe.health("modelhost.v1.ModelHost") == "SERVING"
        expect(grpc.StatusCode.UNIMPLEMENTED, probe.list_models)
    assert "SERVING" in inspected["State"]["Health"]["Log"][-1]["Output"]
    # Without a token: refused; with the inference token: no uploads.
    with connect(server.target) as anonymous:
        expect(grpc.StatusCode.UNAUTHENTICATED, anonymous.health)
        expect(grpc.StatusCode.UNAUTHENTICATED, anonymous.list_models)
    with connect(server.target, tokens.inference) as reader:
        assert reader.health() == "SERVING"
        expect(grpc.StatusCode.PERMISSION_DENIED, lambda: reader.save_checkpoint("x", b"0"))

    # Upload, load and predict from the host, as the management tier.
    with connect(server.target, tokens.management) as client:
        model = serve_model(client)
        check_predict(client, model)
        assert [c.name for c in client.list_checkpoints()] == [f"{MODEL}-weights"]

    # tritonclient over the Open Inference Protocol, with the inference token.
    x = images(2, 32, seed=3)
    with start_child() as child:
        from container.oip_child import infer

        answer = child.submit(infer, server.target, MODEL, x, tokens.inference).result()
    assert answer["live"] and answer["ready"]
    np.testing.assert_allclose(answer["output"], reference(model, x), rtol=1e-4, atol=1e-4)

    # /metrics answers on its own port and counts those calls.
    assert "modelhost_request_seconds" in metrics(server)
    assert predicts(server)["OK"] >= 1


def test_writes_nothing_outside_the_store_and_tmp(
    docker: d.Docker, tokens: Tokens, containers: Containers
) -> None:
    """The same work on a writable root: `docker diff` shows that nothing but the store
    (a volume) and /tmp (a tmpfs) was written, so --read-only costs nothing. Without a
    probe port (the image's default): the HEALTHCHECK asks the main port, where health is
    then open."""
    server = containers.run(
        "writable",
        tokens=tokens,
        read_only=False,
        mounts=("type=tmpfs,target=/tmp",),
        probes=False,
    )
    assert "MODELHOST_HEALTH_PORT" not in "".join(docker.inspect(server.name)["Config"]["Env"])
    server.wait_healthy()
    with connect(server.target) as anonymous:
        assert anonymous.health("modelhost.v1.ModelHost") == "SERVING"
    with connect(server.target, tokens.management) as client:
        model = serve_model(client)
        check_predict(client, model)
        client.snapshot(MODEL, "snapshot")
        client.download_checkpoint("snapshot")
    # Docker itself makes the mount points (and their parent folders): not the server.
    mounted = [m["Destination"] for m in docker.inspect(server.name)["Mounts"]]
    written = [
        change
        for change in server.diff()
        if not any(t == change[2:] or t.startswith(change[2:] + "/") for t in mounted)
    ]
    assert written == []


def test_tls_and_tokens_from_mounted_files(
    tokens: Tokens, pki: Pki, containers: Containers
) -> None:
    """TLS certificate and key read from a read-only mount (like a Kubernetes TLS
    Secret), tokens too. The HEALTHCHECK speaks plaintext: with a probe port (always
    plaintext) it works with TLS on the main port."""
    folder = Path(pki.ca).parent
    server = containers.run(
        "tls",
        tokens=tokens,
        mounts=(f"type=bind,source={folder},target={TLS_DIR},readonly",),
        env={
            "MODELHOST_TLS_CERT_FILE": f"{TLS_DIR}/{pki.server_cert.name}",
            "MODELHOST_TLS_KEY_FILE": f"{TLS_DIR}/{pki.server_key.name}",
        },
    )
    server.wait_healthy()
    with connect(server.probe_target) as probe:
        assert probe.health("modelhost.v1.ModelHost") == "SERVING"
    with connect(server.target, tokens.inference, ca_file=str(pki.ca)) as client:
        assert client.health("modelhost.v1.ModelHost") == "SERVING"
        assert client.list_models() == []
    with connect(server.target, ca_file=str(pki.ca)) as anonymous:
        expect(grpc.StatusCode.UNAUTHENTICATED, anonymous.list_models)
    with connect(server.target, tokens.inference, timeout=5, retries=False) as plaintext:
        expect(grpc.StatusCode.UNAVAILABLE, plaintext.list_models)
    with connect(server.target, tokens.inference, ca_file=str(pki.other_ca), timeout=5) as wrong:
        expect(grpc.StatusCode.UNAVAILABLE, wrong.list_models)
