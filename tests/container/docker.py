"""A Docker daemon, the image under test and its containers, for tests/container/.

Everything here is real: Debian's `docker.io` (installed with apt when `dockerd` is
missing), a daemon started for the test session when none answers, the repository's
Dockerfile built with it, and containers run from that image.

- `Daemon.ensure()`: a daemon that answers; started here (no bridge, no iptables, its own
  data root, exec root, pid file and socket) when none does, and stopped by pid afterwards.
  Its data root persists between runs, so base layers and build-stage layers are cached.
- `base_image()`: the Dockerfile's BASE_IMAGE when it can be pulled, else a stand-in made
  from Debian's packages (debootstrap) plus torch and torchvision from this machine's pip
  configuration, tagged by a hash of its recipe so that it is built once per machine.
- `build_image()`: `docker build` of the repository, as a user runs it.
- `Container`: `docker run` with the options the deployment uses (read-only root, /tmp
  tmpfs, no capabilities, no new privileges, host network on 127.0.0.1), and the
  configmap's settings with ports of its own (gRPC, probes, metrics): containers share the
  host's network, so the configmap's fixed ports would collide.

Every container, volume and image made here carries the label `LABEL`, with the session's
id as value, and is removed by the fixtures (tests/container/conftest.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"

# The daemon this module starts: its state persists (cached layers), its runtime files not.
DATA_ROOT = Path(os.environ.get("MODELHOST_TEST_DOCKER_ROOT", "/var/lib/modelhost-docker"))
RUN_DIR = Path("/run/modelhost-docker")
SOCKET = RUN_DIR / "docker.sock"
PIDFILE = RUN_DIR / "dockerd.pid"
DAEMON_LOG = RUN_DIR / "dockerd.log"

LABEL = "org.modelhost.test"  # value: the session id
SESSION = uuid.uuid4().hex[:10]

# The stand-in base: what the Dockerfile needs of pytorch/pytorch:<torch>-cuda...-runtime.
SUITE = "bookworm"  # Python 3.11, like the real base
BASE_PACKAGES = (
    "python3",
    "python3-venv",
    "python3-pip",
    "python-is-python3",
    "passwd",  # useradd
    "ca-certificates",
)
TORCH = {"2.14.1": "0.29.1"}  # torch -> torchvision, as in the real base
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# This machine's pip settings (`pip config list`): local wheel folders and a constraint file.
PIP_FOLDERS = (Path("/opt/wheels"), Path("/opt/pypi"), Path("/opt/pypi-more"))
PIP_CONSTRAINT = Path("/etc/xdg/pip/constraints.txt")


class DockerError(AssertionError):
    """A docker command failed (an AssertionError: a test failure, never a skip)."""


def say(message: str) -> None:
    """Progress of the slow steps, on the terminal (pytest -s) and in the captured log."""
    print(f"[container] {message}", flush=True)


@dataclass
class Docker:
    """The docker client, pointed at one daemon."""

    host: str
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.env = {
            **os.environ,
            "DOCKER_HOST": self.host,
            # Debian's docker.io has no buildx: the classic builder, without the warning.
            "DOCKER_BUILDKIT": "0",
            "DOCKER_CLI_HINTS": "false",
        }

    def run(
        self,
        *args: str,
        timeout: float = 120,
        check: bool = True,
        stdin: Any = None,
    ) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(
                [docker_client(), *args],
                env=self.env,
                stdin=stdin,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise DockerError(f"docker {' '.join(args)}: no answer in {timeout:.0f}s") from err
        if check and result.returncode != 0:
            raise DockerError(
                f"docker {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def out(self, *args: str, timeout: float = 120) -> str:
        return self.run(*args, timeout=timeout).stdout.strip()

    def answers(self) -> bool:
        try:
            result = self.run("version", "--format", "{{.Server.Version}}", timeout=15, check=False)
        except DockerError:
            return False
        return result.returncode == 0 and bool(result.stdout.strip())

    def inspect(self, what: str) -> dict[str, Any]:
        (found,) = json.loads(self.out("inspect", what))
        return found

    def exists(self, kind: str, name: str) -> bool:
        return self.run(kind, "inspect", name, check=False).returncode == 0

    def image_size(self, image: str) -> int:
        return int(self.out("image", "inspect", "--format", "{{.Size}}", image))

    def remove_labelled(self, session: str | None = None) -> None:
        """Removes the containers and volumes labelled by tests (of `session`, or of any
        session: leftovers of a run that was killed)."""
        selector = f"label={LABEL}" + (f"={session}" if session else "")
        containers = self.out("ps", "-aq", "--filter", selector).split()
        if containers:
            self.run("rm", "-f", "-v", *containers, timeout=120)
        volumes = self.out("volume", "ls", "-q", "--filter", selector).split()
        if volumes:
            self.run("volume", "rm", "-f", *volumes)
        self.run("image", "prune", "--force", "--filter", selector)  # untagged ones only


def docker_client() -> str:
    found = shutil.which("docker")
    if not found:
        raise DockerError("no docker client on PATH (apt-get install docker.io)")
    return found


def timed(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: says how long `what` took."""

    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            began = time.monotonic()
            result = function(*args, **kwargs)
            TIMINGS[what] = time.monotonic() - began
            say(f"{what}: {TIMINGS[what]:.1f}s")
            return result

        return timed_call

    return wrap


TIMINGS: dict[str, float] = {}
"""Seconds each setup step took in this session (printed in the terminal summary)."""


# Packages and the daemon


def apt_install(packages: Sequence[str]) -> None:
    """apt-get install, after an `apt-get update` if the package lists are missing or stale."""
    if os.geteuid() != 0:
        raise DockerError(f"installing {', '.join(packages)} needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DockerError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")


def install_tools() -> None:
    """Installs Debian's docker.io and debootstrap where `dockerd` or `debootstrap` is missing."""
    missing = [
        package
        for tool, package in (("dockerd", "docker.io"), ("debootstrap", "debootstrap"))
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    ]
    if missing:
        timed(f"apt-get install {' '.join(missing)}")(apt_install)(missing)


@dataclass
class Daemon:
    """A daemon that answers; `process` is set when this session started it."""

    docker: Docker
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def ensure(cls) -> Daemon:
        """The daemon of DOCKER_HOST, of this module's socket or the default socket, if one
        answers; else starts one (installing docker.io first if needed)."""
        hosts = [
            os.environ.get("DOCKER_HOST", ""),
            f"unix://{SOCKET}",
            "unix:///var/run/docker.sock",
        ]
        for host in filter(None, hosts):
            docker = Docker(host)
            if docker.answers():
                say(f"using the docker daemon at {host}")
                return cls(docker)
        install_tools()
        return cls.start()

    @classmethod
    @timed("start dockerd")
    def start(cls) -> Daemon:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        stale_daemon()
        dockerd = shutil.which("dockerd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if not dockerd:
            raise DockerError("dockerd is missing after installing docker.io")
        command = [
            dockerd,
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            f"--data-root={DATA_ROOT}",
            f"--exec-root={RUN_DIR / 'exec'}",
            f"--pidfile={PIDFILE}",
            f"--host=unix://{SOCKET}",
        ]
        with DAEMON_LOG.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        docker = Docker(f"unix://{SOCKET}")
        deadline = time.monotonic() + 90
        while not docker.answers():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                tail = DAEMON_LOG.read_text(errors="replace")[-4000:]
                raise DockerError(f"dockerd did not start ({' '.join(command)}):\n{tail}")
            time.sleep(0.5)
        say(f"started dockerd (pid {process.pid}, data root {DATA_ROOT})")
        return cls(docker, process)

    def stop(self) -> None:
        """Stops the daemon if this session started it (SIGTERM, then SIGKILL)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        say(f"stopped dockerd (pid {self.process.pid})")


def stale_daemon() -> None:
    """Ends the daemon a killed session left behind that no longer answers (its pid file
    names it; only a process whose command line is that dockerd's is signalled)."""
    if not PIDFILE.exists():
        return
    with contextlib.suppress(ValueError, OSError):
        pid = int(PIDFILE.read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ours = f"--pidfile={PIDFILE}".encode() in command
        if Path(command[0].decode()).name == "dockerd" and ours:
            os.kill(pid, signal.SIGKILL)
            time.sleep(1)
    PIDFILE.unlink(missing_ok=True)


# The base image


def dockerfile_base() -> str:
    """The default BASE_IMAGE of the Dockerfile."""
    found = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert found, "the Dockerfile has no ARG BASE_IMAGE=<default>"
    return found[1]


def apt_mirror() -> str:
    """The Debian mirror of this machine's apt sources (one-line or deb822 format)."""
    sources = [Path("/etc/apt/sources.list")]
    sources += sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):  # deb822: URIs / Suites
            uris = re.search(r"^URIs:\s*(.+)$", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.MULTILINE)
            if uris and suites and SUITE in suites[1].split():
                return uris[1].split()[0]
        for line in text.splitlines():  # deb [options] URI SUITE COMPONENTS
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    return "http://deb.debian.org/debian"


def standin_recipe() -> tuple[str, str, str]:
    """(tag, torch, torchvision) of the stand-in for the Dockerfile's base."""
    real = dockerfile_base()
    found = re.match(r"pytorch/pytorch:(\d+\.\d+\.\d+)-", real)
    assert found, f"unexpected BASE_IMAGE {real}: update tests/container/docker.py"
    torch = found[1]
    assert torch in TORCH, f"no torchvision known for torch {torch}: add it to TORCH here"
    recipe = {
        "version": 1,
        "suite": SUITE,
        "packages": BASE_PACKAGES,
        "torch": torch,
        "torchvision": TORCH[torch],
        "ca": hashlib.sha256(HOST_CA.read_bytes()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return f"modelhost-test-base:{digest}", torch, TORCH[torch]


def base_image(docker: Docker) -> tuple[str, bool]:
    """(image, stand_in): the real base when it is here or can be pulled, else the
    stand-in (built once per machine and recipe)."""
    real = dockerfile_base()
    if docker.exists("image", real):
        return real, False
    began = time.monotonic()
    pulled = docker.run("pull", real, timeout=1800, check=False)
    TIMINGS["docker pull (base)"] = time.monotonic() - began
    if pulled.returncode == 0:
        return real, False
    say(f"cannot pull {real} ({pulled.stderr.strip()[-200:]})")
    tag, torch, torchvision = standin_recipe()
    if docker.exists("image", tag):
        say(f"stand-in base {tag} is cached")
        return tag, True
    build_standin(docker, tag, torch, torchvision)
    return tag, True


@timed("stand-in base image (debootstrap, docker import, pip install torch)")
def build_standin(docker: Docker, tag: str, torch: str, torchvision: str) -> None:
    """Debian bookworm (minbase, Python 3.11, `python`, venv, useradd) imported as an image,
    then torch and torchvision installed in it with pip from this machine's wheel folders,
    committed as `tag`. The host's CA bundle goes in too: the build stage's pip needs it to
    reach the package registry through this machine's proxy."""
    install_tools()
    mirror = apt_mirror()
    os_tag = f"{tag}-os"
    work = Path(tempfile.mkdtemp(prefix="modelhost-rootfs-", dir="/var/tmp"))
    rootfs = work / "rootfs"
    try:
        began = time.monotonic()
        command = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            SUITE,
            str(rootfs),
            mirror,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log = (rootfs / "debootstrap" / "debootstrap.log").read_text(errors="replace")
            raise DockerError(f"{' '.join(command)} failed:\n{result.stderr}\n{log[-4000:]}")
        TIMINGS["  debootstrap"] = time.monotonic() - began
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        shutil.copyfile(HOST_CA, rootfs / HOST_CA.relative_to("/"))
        began = time.monotonic()
        with subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        ) as tar:
            docker.run(
                "import",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                'CMD ["python"]',
                "-",
                os_tag,
                stdin=tar.stdout,
                timeout=600,
            )
        TIMINGS["  docker import"] = time.monotonic() - began
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # pip inside the image, with this machine's settings given on the command line only
    # (`docker commit` keeps the container's environment, not the command's).
    mounts = [f"--volume={folder}:{folder}:ro" for folder in PIP_FOLDERS if folder.is_dir()]
    settings = {
        "PIP_CERT": str(HOST_CA),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DEFAULT_TIMEOUT": "180",
    }
    if Path("/opt/wheels").is_dir():
        settings["PIP_FIND_LINKS"] = "/opt/wheels"
    indexes = [f"file://{f}/simple" for f in PIP_FOLDERS if (f / "simple").is_dir()]
    if indexes:
        settings["PIP_EXTRA_INDEX_URL"] = " ".join(indexes)
    if PIP_CONSTRAINT.is_file():
        mounts.append(f"--volume={PIP_CONSTRAINT}:/tmp/pip-constraints.txt:ro")
        settings["PIP_CONSTRAINT"] = "/tmp/pip-constraints.txt"
    assignments = " ".join(f"{key}='{value}'" for key, value in settings.items())
    script = (
        f"{assignments} python -m pip install --break-system-packages -q "
        f"torch=={torch} torchvision=={torchvision} 2>&1 | grep -v 'is ignored' ; "
        "python -c 'import torch, torchvision'"
    )
    name = f"modelhost-test-torch-{SESSION}"
    began = time.monotonic()
    try:
        result = docker.run(
            "run",
            f"--name={name}",
            f"--label={LABEL}={SESSION}",
            "--network=host",
            *mounts,
            os_tag,
            "sh",
            "-c",
            script,
            timeout=1200,
            check=False,
        )
        if result.returncode != 0:
            raise DockerError(f"installing torch in the stand-in failed:\n{result.stdout}")
        TIMINGS["  pip install torch"] = time.monotonic() - began
        began = time.monotonic()
        docker.run("commit", "--change", 'CMD ["python"]', name, tag, timeout=1200)
        TIMINGS["  docker commit"] = time.monotonic() - began
    finally:
        docker.run("rm", "-f", "-v", name, check=False)
        docker.run("rmi", os_tag, check=False)  # untags; its layer stays under `tag`


# The image under test

BUILD_CACHE = "modelhost-test-cache:build-stage"
"""The Dockerfile's build stage, tagged so that its layers (the pip install) stay cached
without leaving an untagged image behind."""


@timed("docker build (the repository's Dockerfile)")
def build_image(docker: Docker, base: str, stand_in: bool, tag: str) -> None:
    """Builds the repository's Dockerfile as `tag` on `base`. With the stand-in base, the
    build stage's pip gets the machine's CA bundle (it is in the stand-in) as PIP_CERT."""
    args = [f"--build-arg=BASE_IMAGE={base}"]
    if stand_in:
        args.append(f"--build-arg=PIP_CERT={HOST_CA}")
    common = ["build", "--network=host", "--force-rm", *args]
    old = docker.run("image", "inspect", "--format={{.Id}}", BUILD_CACHE, check=False)
    docker.run(*common, "--target=build", f"--tag={BUILD_CACHE}", str(ROOT), timeout=1200)
    # No --label here: the classic builder would put it in every stage's config, and the
    # build stage would miss the cache.
    docker.run(*common, f"--tag={tag}", str(ROOT), timeout=1200)
    new = docker.out("image", "inspect", "--format={{.Id}}", BUILD_CACHE)
    if old.returncode == 0 and old.stdout.strip() != new:
        docker.run("rmi", old.stdout.strip(), check=False)  # the previous sources' stage


def retag(docker: Docker, image: str, tag: str, version: str) -> None:
    """A newer image for rolling replacements: `image` rebuilt with one more label (the
    classic builder adds it as a last layer: a new image id, every other layer cached)."""
    with tempfile.TemporaryDirectory() as context:
        dockerfile = Path(context) / "Dockerfile"
        dockerfile.write_text(f"FROM {image}\nLABEL org.opencontainers.image.version={version}\n")
        docker.run("build", f"--label={LABEL}={SESSION}", f"--tag={tag}", context)


# Containers


def configmap_env() -> dict[str, str]:
    """The server settings of deploy/kubernetes/configmap.yaml."""
    import yaml

    config = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    return {str(k): str(v) for k, v in config["data"].items()}


@dataclass
class Container:
    """One container of the image (created by `run`)."""

    docker: Docker
    name: str
    port: int = 0
    metrics_port: int = 0
    health_port: int = 0  # the probe port (MODELHOST_HEALTH_PORT); 0: none

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def probe_target(self) -> str:
        """The probe port's address (health and reflection only, no token)."""
        assert self.health_port, f"{self.name} runs without a probe port"
        return f"127.0.0.1:{self.health_port}"

    def state(self) -> dict[str, Any]:
        return self.docker.inspect(self.name)["State"]

    def logs(self, tail: int = 200) -> str:
        result = self.docker.run("logs", f"--tail={tail}", self.name, check=False)
        return result.stdout + result.stderr

    def log_lines(self) -> list[str]:
        """Every line of its output (stdout and stderr), each after its RFC 3339 time."""
        result = self.docker.run("logs", "--timestamps", self.name)
        return sorted((result.stdout + result.stderr).splitlines())

    def health(self) -> str:
        """The HEALTHCHECK's status: starting, healthy or unhealthy ("" without one)."""
        return str((self.state().get("Health") or {}).get("Status", ""))

    def wait_healthy(self, timeout: float = 180) -> float:
        """Waits for the image's HEALTHCHECK to say healthy; returns the seconds waited."""
        began = time.monotonic()
        while True:
            state = self.state()
            status = (state.get("Health") or {}).get("Status")
            if status == "healthy":
                return time.monotonic() - began
            if not state["Running"]:
                raise DockerError(f"{self.name} exited ({state['ExitCode']}):\n{self.logs()}")
            if time.monotonic() - began > timeout:
                probes = json.dumps((state.get("Health") or {}).get("Log", [])[-3:], indent=1)
                raise DockerError(
                    f"{self.name} not healthy in {timeout:.0f}s (status {status}):\n"
                    f"{probes}\n{self.logs()}"
                )
            time.sleep(0.25)

    def stop(self, grace: float = 45) -> float:
        """`docker stop -t grace` (SIGTERM, SIGKILL after `grace`); returns its seconds."""
        began = time.monotonic()
        self.docker.run("stop", f"--time={grace:.0f}", self.name, timeout=grace + 60)
        return time.monotonic() - began

    def kill(self) -> None:
        self.docker.run("kill", "--signal=KILL", self.name)

    def start(self) -> None:
        self.docker.run("start", self.name)

    def exec(self, *command: str) -> str:
        return self.docker.out("exec", self.name, *command)

    def diff(self) -> list[str]:
        """What the container changed in its image's filesystem (`docker diff`)."""
        return self.docker.out("diff", self.name).splitlines()

    def remove(self) -> None:
        self.docker.run("rm", "-f", "-v", self.name, check=False)


def run_container(
    docker: Docker,
    image: str,
    *,
    name: str,
    port: int,
    metrics_port: int,
    health_port: int,
    env: Mapping[str, str] = {},
    mounts: Sequence[str] = (),
    read_only: bool = True,
    healthcheck: str = "fast",
    stop_timeout: int = 45,
) -> Container:
    """`docker run -d` of `image`, locked down like deploy/kubernetes/deployment.yaml: the
    configmap's settings, on 127.0.0.1:`port` (host network), probes on `health_port`
    (0: no probe port, MODELHOST_HEALTH_PORT left out), metrics on `metrics_port`.

    `mounts`: `--mount` values (e.g. a named store volume, read-only token files).
    `healthcheck`: "fast" keeps the image's HEALTHCHECK command and makes it run every
    second; "image" keeps it as it is; "none" turns it off."""
    settings = configmap_env() | {
        "MODELHOST_HOST": "127.0.0.1",
        "MODELHOST_PORT": str(port),
        "MODELHOST_HEALTH_PORT": str(health_port),
        "MODELHOST_METRICS_HOST": "127.0.0.1",
        "MODELHOST_METRICS_PORT": str(metrics_port),
        **env,
    }
    if not health_port:
        del settings["MODELHOST_HEALTH_PORT"]  # as an image run without it
    args = [
        "run",
        "--detach",
        f"--name={name}",
        f"--label={LABEL}={SESSION}",
        "--network=host",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        f"--stop-timeout={stop_timeout}",
        *(f"--env={key}={value}" for key, value in settings.items()),
        *(f"--mount={mount}" for mount in mounts),
    ]
    if read_only:
        args += ["--read-only", "--tmpfs=/tmp:rw,nosuid,nodev,size=1g"]
    if healthcheck == "fast":
        args += ["--health-interval=1s", "--health-start-period=120s", "--health-retries=3"]
    elif healthcheck == "none":
        args.append("--no-healthcheck")
    docker.run(*args, image)
    return Container(docker, name, port, metrics_port, health_port)


def volume(docker: Docker, name: str) -> str:
    """Creates a labelled named volume; returns its name."""
    docker.run("volume", "create", f"--label={LABEL}={SESSION}", name)
    return name
