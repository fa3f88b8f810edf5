"""A service in another language: a Node.js client built from the protos alone (issue 13).

`examples/node-client/client.js` loads `protos/` at run time with @grpc/proto-loader (none
of our generated code), uploads a checkpoint in chunks, loads it, predicts, and calls an
unknown model. The test installs its npm dependencies (`npm ci`) when they are missing or
older than the lock file: the test command is plain `pytest` on a fresh machine.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import build, reference
from modelhost.server import Server, Settings, running

NODE_CLIENT = Path(__file__).resolve().parent.parent / "examples" / "node-client"
STAMP = NODE_CLIENT / "node_modules" / ".modelhost-lock-sha256"
TOKEN = "node-client-management-token"
CHUNK_BYTES = 64 << 10
ARGS = {"features": 64, "hidden": 1024, "classes": 10}  # about 300 KB of float32 weights


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"`{name}` is not on PATH: tests/test_node_client.py needs Node.js 18+ with npm "
            "(the examples/node-client client); install Node.js to run the test suite"
        )
    return found


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` binary, with examples/node-client/node_modules installed from the lock file.

    `npm ci` runs when node_modules lacks the stamp of the current package-lock.json (a hash,
    not an mtime: checkouts reset mtimes); a lock in the temp dir keeps concurrent runs on
    the same checkout from installing over each other.
    """
    node, npm = tool("node"), tool("npm")
    lock = hashlib.sha256((NODE_CLIENT / "package-lock.json").read_bytes()).hexdigest()
    mutex = Path(tempfile.gettempdir()) / (
        "modelhost-node-client-" + hashlib.sha256(str(NODE_CLIENT).encode()).hexdigest()[:16]
    )
    with mutex.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not STAMP.is_file() or STAMP.read_text() != lock:
            try:
                done = subprocess.run(
                    [npm, "ci", "--no-audit", "--no-fund"],
                    cwd=NODE_CLIENT,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
            except subprocess.TimeoutExpired as error:
                pytest.fail(f"npm ci in {NODE_CLIENT} took more than 300 s: {error.stderr!r}")
            if done.returncode != 0:
                pytest.fail(
                    f"npm ci in {NODE_CLIENT} failed ({done.returncode}):\n"
                    f"{done.stdout}\n{done.stderr}"
                )
            STAMP.write_text(lock)
    return node


@pytest.fixture
def secured(settings: Settings) -> Iterator[Server]:
    """The test server with a management token: the client's --token must reach it."""
    with running(dataclasses.replace(settings, management_token=TOKEN)) as server:
        yield server


def run_client(node: str, *args: str) -> dict[str, Any]:
    """Runs client.js with `args`; returns the JSON object it prints."""
    done = subprocess.run(
        [node, "client.js", *args],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (
        f"client.js failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_node_client_uploads_loads_and_predicts(node: str, secured: Server, tmp_path: Path) -> None:
    model = build("tiny_mlp", ARGS, seed=3)
    checkpoint = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), checkpoint)
    x = np.random.default_rng(0).standard_normal((3, ARGS["features"])).astype(np.float32)
    request = tmp_path / "input.json"
    request.write_text(
        json.dumps({"x": {"dtype": "float32", "shape": list(x.shape), "data": x.ravel().tolist()}})
    )

    result = run_client(
        node,
        f"--target={secured.target}",
        f"--token={TOKEN}",
        f"--checkpoint={checkpoint}",
        f"--chunk-bytes={CHUNK_BYTES}",
        "--name=node-mlp",
        "--checkpoint-name=node-mlp-weights",
        "--architecture=tiny_mlp",
        f"--architecture-args={json.dumps(ARGS)}",
        f"--input={request}",
        "--unknown-model=no-such-model",
    )

    data = checkpoint.read_bytes()
    assert result["checkpoint"] == {
        "name": "node-mlp-weights",
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "format": "CHECKPOINT_FORMAT_STATE_DICT",
        "tensor_count": 4,
        "chunks": math.ceil(len(data) / CHUNK_BYTES),
    }
    assert result["checkpoint"]["chunks"] > 1
    assert result["model"]["name"] == "node-mlp"
    assert result["model"]["state"] == "MODEL_STATE_READY"
    assert result["model"]["parameter_count"] == sum(p.numel() for p in model.parameters())

    prediction = result["prediction"]
    assert prediction["model"] == "node-mlp"
    assert prediction["version"] == 1
    assert set(prediction["outputs"]) == {"output"}
    output = prediction["outputs"]["output"]
    assert output["dtype"] == "DATA_TYPE_FLOAT32"
    assert output["shape"] == [3, ARGS["classes"]]
    served = np.asarray(output["values"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(served, reference(model, x), rtol=1e-5, atol=1e-6)

    unknown = result["unknown_model"]
    assert unknown["code"] == 5, unknown  # grpc.status.NOT_FOUND
    assert unknown["status"] == "NOT_FOUND"
    assert "no-such-model" in unknown["details"]


def test_node_client_reports_a_refused_call(node: str, secured: Server) -> None:
    """Without the token the upload fails UNAUTHENTICATED: the client prints the status
    and exits 1."""
    done = subprocess.run(
        [node, "client.js", f"--target={secured.target}", "--name=m", "--checkpoint=package.json"],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["code"] == 16, error  # grpc.status.UNAUTHENTICATED
    assert "Bearer" in error["details"]
