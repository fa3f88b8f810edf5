"""Fixtures of the container tests: a Docker daemon, the image built from the repository's
Dockerfile, token and TLS files to mount, and a factory of containers that removes what
it made. Setup from nothing takes a few minutes (docker.py says what it does); a failure
to get a daemon or to build the image fails the tests, it never skips them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from container import docker as d
from helpers.certs import Pki, make_pki

IMAGE_UID = 10001
# The image may add at most this much to its base: the server's virtual environment
# (grpcio, protobuf, safetensors, ...). 44 MB when this was written.
MAX_SIZE_ABOVE_BASE = 150 * 10**6
# Where deploy/kubernetes mounts the tokens Secret (configmap.yaml names the files in it).
TOKENS_DIR = "/etc/modelhost/tokens"
TLS_DIR = "/etc/modelhost/tls"
STORE = "/var/lib/modelhost/store"


@dataclass
class Image:
    """The image under test and what it was built on."""

    tag: str
    base: str
    stand_in: bool  # the base is the Debian stand-in, not the Dockerfile's BASE_IMAGE
    size_above_base: int
    tags: list[str] = field(default_factory=list)  # every tag made from it (retag)


@dataclass(frozen=True)
class Tokens:
    """Token files as deploy/kubernetes mounts them (read-only, group-readable)."""

    folder: Path
    inference: str
    management: str

    def mount(self) -> str:
        return f"type=bind,source={self.folder},target={TOKENS_DIR},readonly"


def host_folder(folder: Path) -> Path:
    """Makes `folder` reachable by the image's user (uid 10001, group 0), like a Secret
    mounted with fsGroup: the files owned by 10001:0 and group-readable, nobody else."""
    os.chown(folder, IMAGE_UID, 0)
    folder.chmod(0o750)
    for path in folder.iterdir():
        os.chown(path, IMAGE_UID, 0)
        path.chmod(0o440)
    return folder


@pytest.fixture(scope="package")
def daemon() -> Iterator[d.Daemon]:
    """A daemon that answers (started here if none does, stopped at the end if so). Removes
    the labelled containers and volumes of earlier, killed sessions first."""
    daemon = d.Daemon.ensure()
    daemon.docker.remove_labelled()
    try:
        yield daemon
    finally:
        try:
            daemon.docker.remove_labelled(d.SESSION)
        finally:
            daemon.stop()


@pytest.fixture(scope="package")
def docker(daemon: d.Daemon) -> d.Docker:
    return daemon.docker


@pytest.fixture(scope="package")
def image(docker: d.Docker) -> Iterator[Image]:
    """The repository's Dockerfile built on its BASE_IMAGE or, when that cannot be pulled,
    on the stand-in (a warning says so)."""
    base, stand_in = d.base_image(docker)
    if stand_in:
        warnings.warn(
            f"{d.dockerfile_base()} cannot be pulled here: the image under test is built "
            f"on a stand-in base, {base} (Debian {d.SUITE}, Python 3.11, torch and "
            "torchvision of the same versions, CPU only)",
            stacklevel=1,
        )
    tag = f"modelhost-test:{d.SESSION}"
    d.build_image(docker, base, stand_in, tag)
    built = Image(tag, base, stand_in, docker.image_size(tag) - docker.image_size(base), [tag])
    d.TIMINGS["image size above base (MB)"] = built.size_above_base / 1e6
    d.say(f"built {tag} on {base}: {built.size_above_base / 1e6:.0f} MB above the base")
    try:
        yield built
    finally:
        docker.run("rmi", *built.tags, check=False, timeout=300)


@pytest.fixture(scope="package")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Tokens:
    folder = tmp_path_factory.mktemp("tokens")
    inference, management = secrets.token_hex(16), secrets.token_hex(16)
    (folder / "token").write_text(inference + "\n")
    (folder / "management-token").write_text(management + "\n")
    return Tokens(host_folder(folder), inference, management)


@pytest.fixture(scope="package")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a server certificate for 127.0.0.1; the key files readable by the image."""
    folder = tmp_path_factory.mktemp("tls")
    found = make_pki(folder)
    host_folder(folder)
    return found


def free_ports(count: int) -> list[int]:
    """`count` different ports free on 127.0.0.1 now (held together while they are picked,
    so that no two are the same)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


class Containers:
    """Makes containers and volumes for one test; `cleanup()` removes them."""

    def __init__(self, docker: d.Docker, image: Image, test: str) -> None:
        self.docker = docker
        self.image = image
        self.prefix = f"modelhost-test-{d.SESSION}-{test[:30]}"
        self.made: list[d.Container] = []
        self.volumes: list[str] = []

    def volume(self) -> str:
        name = f"{self.prefix}-store-{uuid.uuid4().hex[:6]}"
        self.volumes.append(d.volume(self.docker, name))
        return name

    def run(
        self,
        role: str,
        *,
        store: str | None = None,
        tokens: Tokens | None = None,
        image: str | None = None,
        port: int | None = None,
        probes: bool = True,
        mounts: tuple[str, ...] = (),
        **options: Any,
    ) -> d.Container:
        """A container of the image (or `image`) on a free port (or `port`), with a probe
        port of its own (a free one; none without `probes`), its store on the named volume
        `store` (a new one by default), `tokens` mounted read-only where deploy/kubernetes
        mounts them; `options` go to docker.run_container."""
        store = store or self.volume()
        picked = iter(p for p in free_ports(3) if p != port)
        all_mounts = [f"type=volume,source={store},target={STORE}", *mounts]
        if tokens is not None:
            all_mounts.append(tokens.mount())
        container = d.run_container(
            self.docker,
            image or self.image.tag,
            name=f"{self.prefix}-{role}",
            port=port or next(picked),
            metrics_port=next(picked),
            health_port=next(picked) if probes else 0,
            mounts=all_mounts,
            **options,
        )
        self.made.append(container)
        return container

    def cleanup(self) -> None:
        for container in self.made:
            container.remove()
        if self.volumes:
            self.docker.run("volume", "rm", "-f", *self.volumes, check=False)


@pytest.fixture
def containers(
    docker: d.Docker, image: Image, request: pytest.FixtureRequest
) -> Iterator[Containers]:
    made = Containers(docker, image, request.node.name.replace("[", "-").strip("]"))
    request.node.stash[CONTAINERS] = made
    try:
        yield made
    finally:
        made.cleanup()


CONTAINERS = pytest.StashKey[Containers]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report carries the logs of its containers."""
    report = yield
    made = item.stash.get(CONTAINERS, None)
    if report.failed and made is not None and call.when == "call":
        for container in made.made:
            report.sections.append((f"docker logs {container.name}", container.logs(400)))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if d.TIMINGS:
        terminalreporter.section("container setup")
        for what, seconds in d.TIMINGS.items():
            terminalreporter.write_line(f"{what}: {seconds:.1f}")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.2)
