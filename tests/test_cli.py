"""The `modelhost` command against a real server, and `modelhost serve` as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import images, reference, resnet18
from helpers.processes import ServerProcess, free_port
from modelhost.cli import main
from modelhost.client import ModelHostClient
from modelhost.server import Server


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_client_commands(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ("--target", server.target)
    model = resnet18()
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)

    code, out, err = run(
        capsys, "upload", "w", str(weights), "-m", "team=vision", "--json", *target
    )
    assert code == 0, err
    info = json.loads(out)
    assert info["name"] == "w" and info["metadata"] == {"team": "vision"}
    assert err == ""  # no progress bar: stderr is not a terminal
    size = f"{weights.stat().st_size / 1e6:.1f} MB"
    code, out, err = run(capsys, "upload", "w", str(weights), "--overwrite", *target)
    assert out == f"uploaded w: {size}, sha256 {info['sha256'][:16]}, state_dict\n", err

    code, out, err = run(
        capsys,
        "load",
        "m",
        "-a",
        "resnet18",
        "-c",
        "w",
        "--arg",
        "num_classes=10",
        "--max-batch-size",
        "4",
        *target,
    )
    assert code == 0, err
    assert out.startswith("loaded m v1: resnet18 on cpu, float32, 11.2M parameters, ready in ")
    assert out.endswith(" s\n") and out.count("\n") == 1
    code, out, err = run(capsys, "load", "m", "-a", "resnet18", "-c", "w", "--arg",
                         "num_classes=10", "--max-batch-size", "4", "--json", *target)  # fmt: skip
    loaded = json.loads(out)
    assert loaded["version"] == 2 and loaded["batching"]["max_batch_size"] == 4

    x = images(2)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run(
        capsys, "predict", "m", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"), *target
    )
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), reference(model, x))
    code, out, _ = run(capsys, "predict", "m", str(tmp_path / "x.npy"), *target)
    assert out.startswith("output: float32 [2, 10]\n")
    code, out, _ = run(capsys, "predict", "m", str(tmp_path / "x.npy"), "--json", *target)
    printed = json.loads(out)["output"]  # every value, as JSON numbers
    assert printed["shape"] == [2, 10]
    np.testing.assert_allclose(printed["values"], reference(model, x), rtol=1e-6)

    code, out, err = run(capsys, "snapshot", "m", "snap", "--version", "1", *target)
    assert code == 0 and out.startswith("saved snap: 44.8 MB, sha256 "), err
    assert out.endswith(", state_dict (snapshot of m v1)\n")
    code, out, err = run(capsys, "snapshot", "m", "snap2", "--json", *target)
    assert code == 0 and json.loads(out)["metadata"]["snapshot_of"] == "m:2"
    code, out, err = run(capsys, "download", "snap", str(tmp_path / "snap.pt"), *target)
    assert (code, out, err) == (0, f"{tmp_path / 'snap.pt'}\n", "")
    state = torch.load(tmp_path / "snap.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    code, out, _ = run(capsys, "list", *target)
    assert "m v1 ready resnet18" in out and "snap state_dict" in out
    code, out, _ = run(capsys, "list", "architectures", "--json", *target)
    assert any(a["name"] == "vgg16" for a in json.loads(out)["architectures"])
    code, out, _ = run(capsys, "list", "architectures", *target)
    assert "  resnet18(num_classes=1000, zero_init_residual=False," in out
    code, out, _ = run(capsys, "health", *target)
    assert (code, out.strip()) == (0, "SERVING")
    code, out, _ = run(capsys, "unload", "m", "--version", "2", *target)
    assert out == "unloaded m v2\n"
    code, out, _ = run(capsys, "unload", "m", "--json", *target)
    assert json.loads(out) == {"unloaded": [1]}
    code, out, _ = run(capsys, "delete", "snap", *target)
    assert (code, out) == (0, "deleted snap\n")
    code, out, _ = run(capsys, "delete", "snap2", "--json", *target)
    assert (code, json.loads(out)) == (0, {"deleted": "snap2"})

    code, _, err = run(capsys, "predict", "m", str(tmp_path / "x.npy"), *target)
    assert code == 1 and "NOT_FOUND" in err and "'m'" in err


def test_serve_process_starts_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {
        "MODELHOST_GRACE_SECONDS": "2",
        "MODELHOST_LOG_LEVEL": "debug",
        "MODELHOST_ARCHITECTURE": "x=y:z",  # misspelt: the setting is ARCHITECTURES
        "MODELHOST_TARGET": "127.0.0.1:1",  # the client's: no warning
    }
    with ServerProcess.start(tmp_path / "store", env=env) as server:
        assert server.log_count("MODELHOST_ARCHITECTURE is not a setting and is ignored") == 1
        assert server.log_count("did you mean MODELHOST_ARCHITECTURES?") == 1
        assert server.log_count("MODELHOST_TARGET") == 0
        with ModelHostClient(server.target, timeout=10) as client:
            assert client.health() == "SERVING"
            assert client.list_checkpoints() == []
        assert (tmp_path / "store" / "checkpoints").is_dir()
        assert server.logged("rpc=ListCheckpoints") == 1  # the env set the log level
        assert server.stop(timeout=30) == 0  # SIGTERM
        assert server.log_count("modelhost stopped") == 1


def test_common_mistakes_get_a_hint_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "list", "--target", f"127.0.0.1:{free_port()}", "--timeout", "5")
    assert code == 1 and "hint: no modelhost server answers at 127.0.0.1:" in err
    serving = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelhost.cli",
            "serve",
            "--port",
            "0",
            "--store",
            str(tmp_path / "store"),
            "--architecture",
            "mynet=no_such_package.models:build",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert serving.returncode == 2, serving.stderr
    assert "cannot import no_such_package.models (No module named 'no_such_package')" in (
        serving.stderr
    )
    assert "Traceback" not in serving.stderr


def test_serve_flags_turn_settings_on_and_off() -> None:
    from modelhost.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--no-direct-io"]).direct_io is False
    assert parser.parse_args(["serve", "--direct-io", "--restore"]).direct_io is True
    assert parser.parse_args(["serve"]).direct_io is None  # the environment or the default


def test_predict_saves_outputs_whatever_their_names(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Several outputs go to one .npz, entries named as the outputs, even names that
    `np.savez` takes as its own arguments ("file", "allow_pickle"), under the name given."""
    with ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("w", {"scale": torch.tensor(3.0)})
        client.load_model("named", architecture="named_outputs", checkpoint="w")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run(
        capsys, "predict", "named", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npz"),
        "--target", server.target,
    )  # fmt: skip
    assert code == 0, err
    assert out == f"saved allow_pickle, file to {tmp_path / 'y.npz'}\n"
    with np.load(tmp_path / "y.npz") as saved:
        assert sorted(saved.files) == ["allow_pickle", "file"]
        np.testing.assert_array_equal(saved["file"], x * 3)
        np.testing.assert_array_equal(saved["allow_pickle"], x * 6)
