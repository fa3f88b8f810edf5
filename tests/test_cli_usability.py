"""The `modelhost` command's answers to a new user's mistakes and its everyday output
(UX review 12), against real servers on 127.0.0.1: one-line errors with a hint, no
tracebacks, human summaries by default and JSON with --json."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from conftest import resnet18
from helpers.certs import make_pki
from helpers.processes import free_port
from modelhost.cli import build_parser, main
from modelhost.client import ModelHostClient
from modelhost.server import Server, Settings, running

LABELS = [f"class{i}" for i in range(10)]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli(*argv: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """`modelhost ARGV` as a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "modelhost.cli", *argv],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def classifier(server: Server) -> Iterator[str]:
    """A resnet18 of 10 labelled classes that takes images, hosted as "cls"; its target."""
    with ModelHostClient(server.target, timeout=120) as client:
        client.save_checkpoint("r18", resnet18().state_dict())
        client.load_model(
            "cls",
            architecture="resnet18",
            checkpoint="r18",
            architecture_args={"num_classes": 10},
            preprocessing={"resize": 32, "crop": 32},
            labels=LABELS,
        )
    yield server.target


def _png(path: Path) -> str:
    pixels = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=torch.Generator())
    path.write_bytes(encode_png(pixels).numpy().tobytes())
    return str(path)


# A1, B11, B13: predict


def test_predict_an_image_without_top_k(
    classifier: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An image and no --top-k: the client answers a bare array, shown as "output"."""
    image, target = _png(tmp_path / "cat.png"), ("--target", classifier)
    code, out, err = run(capsys, "predict", "cls", image, *target)
    assert code == 0, err
    assert out.startswith("output: float32 [1, 10]\n[[")
    code, out, err = run(capsys, "predict", "cls", image, "--json", *target)
    assert code == 0, err
    printed = json.loads(out)["output"]
    assert printed["shape"] == [1, 10] and len(printed["values"][0]) == 10
    code, out, err = run(capsys, "predict", "cls", image, "-o", str(tmp_path / "y.npy"), *target)
    assert (code, out) == (0, f"saved output to {tmp_path / 'y.npy'}\n"), err
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), [printed["values"][0]], rtol=1e-6)


def test_top_k_prints_a_line_per_row(
    classifier: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, target = _png(tmp_path / "cat.png"), ("--target", classifier)
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 32, 32), np.float32))
    code, out, err = run(capsys, "predict", "cls", image, "--top-k", "2", *target)
    assert code == 0, err
    (line,) = out.splitlines()
    assert line.startswith(f"{image}: ") and line.count(" (0.") == 2 and " class" in line
    code, out, err = run(capsys, "predict", "cls", str(tmp_path / "x.npy"), "--top-k", "3", *target)
    rows = out.splitlines()
    assert [row.split(":")[0] for row in rows] == ["row 0", "row 1"], out
    code, out, err = run(
        capsys, "predict", "cls", str(tmp_path / "x.npy"), "--top-k", "3", "--json", *target
    )
    answer = json.loads(out)
    assert [(row["row"], row["image"], len(row["top"])) for row in answer] == [
        (0, None, 3),
        (1, None, 3),
    ]
    best = answer[0]["top"][0]
    assert rows[0].startswith(f"row 0: {best['index']} {best['label']} ({best['score']:.2f}), ")


def test_output_is_written_under_the_name_given(
    classifier: str, server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-o writes exactly the file named (numpy would add .npy); several outputs are
    refused a .npy name."""
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    x, target = str(tmp_path / "x.npy"), ("--target", classifier)
    code, out, err = run(capsys, "predict", "cls", x, "-o", str(tmp_path / "logits"), *target)
    assert (code, out) == (0, f"saved output to {tmp_path / 'logits'}\n"), err
    assert not (tmp_path / "logits.npy").exists()
    assert np.load(tmp_path / "logits").shape == (1, 10)
    code, _, err = run(capsys, "predict", "cls", x, "-o", str(tmp_path / "one.npz"), *target)
    with np.load(tmp_path / "one.npz") as saved:
        assert saved.files == ["output"]

    with ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("scale", {"scale": torch.tensor(3.0)})
        client.load_model("named", architecture="named_outputs", checkpoint="scale")
    np.save(tmp_path / "v.npy", np.ones((2, 3), np.float32))
    code, _, err = run(
        capsys, "predict", "named", str(tmp_path / "v.npy"), "-o", str(tmp_path / "y.npy"), *target
    )
    assert code == 1 and "a .npy file holds one array" in err and ".npz" in err, err
    assert not (tmp_path / "y.npy").exists()


# A5: serve


def test_serve_in_a_used_port_or_on_a_missing_gpu_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        used = cli("serve", "--port", str(port), "--store", str(tmp_path / "a"))
    assert used.returncode == 1, used.stderr
    assert used.stderr.splitlines() == [  # one line: gRPC's own log line of a failed bind too
        f"error: port {port} on 127.0.0.1 is in use: is another modelhost serve running? "
        "(choose another port with --port)"
    ], used.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for flag in ("--health-port", "--metrics-port"):
            used = cli("serve", "--port", "0", flag, str(port), "--store", str(tmp_path / "a"))
            assert used.returncode == 1, used.stderr
            assert used.stderr.splitlines() == [
                f"error: port {port} on 127.0.0.1 is in use: is another modelhost serve "
                f"running? (choose another port with {flag})"
            ], used.stderr
    if torch.cuda.is_available():
        return
    gpu = cli("serve", "--port", "0", "--device", "cuda", "--store", str(tmp_path / "b"))
    assert gpu.returncode == 2 and "Traceback" not in gpu.stderr, gpu.stderr
    assert gpu.stderr.splitlines()[-1] == (
        "error: device 'cuda' requested, but this server has no GPU"
    )


def test_serve_names_the_extra_only_for_its_missing_modules(tmp_path: Path) -> None:
    """Without torch: the extra to install. A module of modelhost's own missing (a broken
    install, not a missing extra): the error as it is."""
    blocked = (
        "import sys; sys.modules[{!r}] = None; from modelhost.cli import main; sys.exit(main())"
    )
    store = str(tmp_path / "store")
    for module, extra in (("torch", True), ("modelhost.server.settings", False)):
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                blocked.format(module),
                "serve",
                "--port",
                "0",
                "--store",
                store,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode != 0
        assert ("pip install 'modelhost[server]'" in done.stderr) == extra, done.stderr
        assert f"import of {module} halted" in done.stderr, done.stderr


def test_upload_of_a_directory(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(Path(__file__).parent)
    code, _, err = run(capsys, "upload", "d", folder, "--target", server.target)
    assert (code, err) == (1, f"error: {folder} is a directory\n")


def test_output_into_a_closed_pipe_ends_quietly(server: Server) -> None:
    """`modelhost list architectures | head -1`: the reader went away; no traceback."""
    read, write = os.pipe()
    os.close(read)  # nobody reads: the first write fails with EPIPE
    try:
        done = cli("list", "architectures", "--target", server.target, stdout=write)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


# B2, B3, B9: hints


def hint(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The hint line of a failing `modelhost health ARGV`."""
    code, _, err = run(capsys, "health", "--timeout", "5", *argv)
    assert code == 1, err
    hints = [line for line in err.splitlines() if line.startswith("hint: ")]
    assert len(hints) == 1, err
    return hints[0].removeprefix("hint: ")


def test_tls_mistakes_get_a_tls_hint(
    settings: Settings, server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = make_pki(tmp_path)
    tls = dataclasses.replace(
        settings, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key)
    )
    mutual = dataclasses.replace(tls, tls_client_ca_file=str(pki.ca))
    with running(tls) as secure, running(mutual) as strict:
        target = ("--target", secure.target)
        assert "add --tls" in hint(capsys, *target)
        assert "--ca-file" in hint(capsys, *target, "--tls")
        assert "--server-name" in hint(
            capsys, *target, "--tls", "--ca-file", str(pki.ca), "--server-name", "elsewhere"
        )
        assert "client certificate" in hint(
            capsys, "--target", strict.target, "--tls", "--ca-file", str(pki.ca)
        )
    assert "leave out --tls" in hint(capsys, "--target", server.target, "--tls")


def test_a_failed_handshake_is_one_error_and_one_hint(server: Server) -> None:
    """gRPC core's own lines (a failed handshake, twice) are not printed around them."""
    done = cli("list", "--tls", "--target", server.target, "--timeout", "10")
    assert done.returncode == 1
    assert [line.partition(":")[0] for line in done.stderr.splitlines()] == ["error", "hint"]


def test_target_mistakes_get_a_target_hint(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hint(capsys, "--target", "127.0.0.1") == (
        "127.0.0.1 has no port, so gRPC dialed 443: targets are host:port, without a "
        "scheme (default 127.0.0.1:50051)"
    )
    assert hint(capsys, "--target", f"http://{server.target}").startswith(
        "targets are host:port, without a scheme"
    )
    assert "no modelhost server answers" in hint(capsys, "--target", f"127.0.0.1:{free_port()}")
    # a deadline that ends while gRPC dials again (its retries take about 2 s to give up)
    port = free_port()
    assert hint(capsys, "--target", f"127.0.0.1:{port}", "--timeout", "0.3") == (
        f"no answer from 127.0.0.1:{port} within --timeout 0.3 s: the server may be "
        "busy, or not running there (it is dialed again until the deadline); --timeout "
        "waits longer"
    )


def test_an_inference_token_on_a_management_call_gets_a_hint(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = dataclasses.replace(settings, token="infer", management_token="manage")
    with running(tokens) as server:
        code, _, err = run(capsys, "delete", "x", "--target", server.target, "--token", "infer")
    assert code == 1 and "PERMISSION_DENIED" in err, err
    assert err.splitlines()[-1] == (
        "hint: this call needs the management token: --token or MODELHOST_TOKEN"
    )


# B5, B6: download destinations


def test_download_into_a_folder_or_a_missing_one(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("ck", {"w": torch.arange(1000.0)})
    target = ("--target", server.target)
    code, out, err = run(capsys, "download", "ck", str(tmp_path), *target)
    assert (code, out) == (0, f"{tmp_path / 'ck'}\n"), err
    assert torch.load(tmp_path / "ck", weights_only=True)["w"].shape == (1000,)

    # A symlink to a folder is replaced, as the library replaces any symlink at its dest:
    # nothing is written into the folder it pointed to.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    code, out, err = run(capsys, "download", "ck", str(link), *target)
    assert (code, out) == (0, f"{link}\n"), err
    assert not link.is_symlink() and link.is_file() and list(elsewhere.iterdir()) == []

    missing = tmp_path / "nowhere"
    code, _, err = run(capsys, "download", "ck", str(missing / "ck.pt"), *target)
    assert code == 1 and f"'{missing}'" in err and ".part" not in err, err

    code, _, err = run(capsys, "download", "ck", str(tmp_path / "x"), "--max-bytes", "10", *target)
    assert code == 1 and "more than --max-bytes (10)" in err, err
    code, out, err = run(capsys, "download", "ck", str(tmp_path / "y"), "--json", *target)
    assert json.loads(out) == {
        "name": "ck",
        "path": str(tmp_path / "y"),
        "size_bytes": (tmp_path / "y").stat().st_size,
    }


# B10, B4: usage


@pytest.mark.parametrize(
    "argv",
    [["load", "m", "--arg", "num_classes"], ["upload", "c", "f.pt", "-m", "novalue"]],
    ids=["arg", "metadata"],
)
def test_a_pair_without_equals_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"modelhost {argv[0]}: error: argument " in err and "is not KEY=VALUE" in err, err


def test_an_arg_that_is_not_json_is_sent_as_a_string_with_a_note(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser(serve_flags=False)
    args = parser.parse_args(["load", "m", "--arg", "num_classes=five", "--arg", "depth=3"])
    assert args.__dict__["load_option:architecture_args"] == {"num_classes": "five", "depth": 3}
    assert capsys.readouterr().err == (
        'note: --arg num_classes=five is not JSON: sent as the string "five"\n'
    )


# B11, B12: output


def test_client_flags_go_before_or_after_the_command(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    before = run(capsys, "--json", "--target", server.target, "health")
    after = run(capsys, "health", "--json", "--target", server.target)
    assert before == after and json.loads(before[1])["status"] == "SERVING"
    # After the command wins; a flag given once, before, is not reset by the defaults after.
    code, out, err = run(capsys, "--target", "127.0.0.1:1", "health", "--target", server.target)
    assert (code, out) == (0, "SERVING\n"), err
    with pytest.raises(SystemExit) as exit:
        main(["--json", "serve"])
    assert exit.value.code == 2
    assert "`serve` comes first" in capsys.readouterr().err


def test_health_json(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "health", "--json", "--target", server.target)
    assert (code, json.loads(out)) == (0, {"service": "", "status": "SERVING"})


def test_progress_bars_only_on_a_terminal_and_an_error_on_a_line_of_its_own(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1000)}, weights)
    upload = ["upload", "w", str(weights), "--target", server.target]
    assert main(upload) == 0
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(upload) == 1  # ALREADY_EXISTS, once the bytes are sent
    bar, error = terminal.getvalue().split("\n")[:2]
    assert bar.startswith("\rupload w [") and "100.0%" in bar and bar.endswith("MB/s")
    assert error.startswith("error: ALREADY_EXISTS")
    assert main([*upload, "--overwrite", "-q"]) == 0
    assert "upload w" not in terminal.getvalue().split("ALREADY_EXISTS")[1]


# B15: version and help


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"modelhost {importlib.metadata.version('modelhost')}\n"


def test_every_argument_has_help() -> None:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if a.choices and a.dest == "command")
    assert isinstance(commands.choices, dict)
    for name, command in commands.choices.items():
        silent = [a.dest for a in command._actions if not a.help]
        assert not silent, (name, silent)


def test_importing_the_cli_leaves_the_environment_alone() -> None:
    """Only the `modelhost` command quiets gRPC core's log (GRPC_VERBOSITY): a program that
    imports the CLI module keeps its environment, and so do the processes it starts (this
    suite's servers among them: it once hid gRPC's own line of a failed bind from them)."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    code = "import os, modelhost.cli; print(os.environ.get('GRPC_VERBOSITY'))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "None", done.stderr


# UX review 16


def _bad_inputs(folder: Path) -> dict[str, str]:
    """Files predict cannot send, and what its one error line says of each."""
    np.save(folder / "u16.npy", np.ones((2, 3), np.uint16))
    np.save(folder / "c64.npy", np.ones((2, 3), np.complex64))
    np.save(folder / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(folder / "arr.npz", input=np.ones((2, 3), np.float32))
    torch.save({"w": torch.zeros(3)}, folder / "weights.pt")
    (folder / "notes.txt").write_text("a few words\n")
    (folder / "cat.webp").write_bytes(b"RIFF\x9c\x03\x00\x00WEBPVP8 " + bytes(64))
    (folder / "fake.jpg").write_text("not an image\n")
    supported = "(supported: float32, float16, bfloat16, float64, uint8, int8, int16, int32, "
    return {
        "u16.npy": f"u16.npy: dtype uint16 is not supported {supported}",
        "c64.npy": f"c64.npy: dtype complex64 is not supported {supported}",
        "obj.npy": "obj.npy holds Python objects (an array of dtype object)",
        "arr.npz": "arr.npz is an .npz archive of 1 array (np.savez): predict takes one .npy "
        "file per input, NAME=FILE.npy",
        "weights.pt": "weights.pt is a torch.save file, not a .npy array: predict takes .npy "
        "arrays (as np.save writes them) and JPEG or PNG images (a checkpoint is uploaded "
        "with `modelhost upload NAME FILE`)",
        "notes.txt": "notes.txt is a text file: predict takes .npy arrays",
        "cat.webp": "cat.webp is a WebP image: images must be JPEG or PNG",
        "fake.jpg": "fake.jpg is a text file, not a JPEG or PNG image",
    }


def test_predict_refuses_what_is_no_npy_array_or_image_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """F1, F2: one `error:` line that names the file and what predict takes, before any
    call (nothing listens at the target); never numpy's advice to unpickle."""
    monkeypatch.chdir(tmp_path)
    unreachable = ("--target", f"127.0.0.1:{free_port()}")
    for name, message in _bad_inputs(tmp_path).items():
        code, out, err = run(capsys, "predict", "m", name, *unreachable)
        assert (code, out) == (1, ""), err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
        assert "allow_pickle" not in err and "UNAVAILABLE" not in err, err
    _png(tmp_path / "cat.png")
    code, _, err = run(capsys, "predict", "m", "input=cat.png", *unreachable)
    assert code == 1 and err.startswith("error: cat.png is an image: images take no NAME="), err
    np.save(tmp_path / "x.npy", np.ones((1, 3), np.float32))
    code, _, err = run(capsys, "predict", "m", "x.npy", "x.npy", *unreachable)
    assert code == 1 and "input 'input' is given twice (x.npy and x.npy)" in err, err


def test_a_file_that_is_no_npy_array_ends_the_command_without_a_traceback(
    tmp_path: Path,
) -> None:
    """F1 as the command runs it: the .pt of the quick start given as the batch."""
    torch.save({"w": torch.zeros(3)}, tmp_path / "weights.pt")
    done = cli("predict", "m", str(tmp_path / "weights.pt"), "--target", "127.0.0.1:1")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines() == [
        f"error: {tmp_path / 'weights.pt'} is a torch.save file, not a .npy array: predict "
        "takes .npy arrays (as np.save writes them) and JPEG or PNG images (a checkpoint is "
        "uploaded with `modelhost upload NAME FILE`)"
    ]


def test_an_image_the_server_cannot_read_is_named_by_its_file(
    classifier: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """F17: the server says "image 1"; the command says which file that is."""
    good = _png(tmp_path / "cat.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 40)  # a PNG signature, then no IHDR
    code, _, err = run(capsys, "predict", "cls", good, str(broken), "--target", classifier)
    assert code == 1, err
    assert err.startswith(f"error: INVALID_ARGUMENT: {broken} has no readable JPEG or PNG "), err
    assert "image 1" not in err


def test_an_output_that_cannot_be_written_fails_before_the_call(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """F17: -o in a missing folder, or a folder, is refused before the model runs (here
    the model does not exist: the call would have said NOT_FOUND)."""
    np.save(tmp_path / "x.npy", np.ones((1, 3), np.float32))
    x, target = str(tmp_path / "x.npy"), ("--target", server.target)
    missing = tmp_path / "nowhere"
    code, _, err = run(capsys, "predict", "m", x, "-o", str(missing / "y.npy"), *target)
    assert (code, err) == (
        1,
        f"error: --output {missing / 'y.npy'}: the folder {missing} does not exist\n",
    )
    code, _, err = run(capsys, "predict", "m", x, "-o", str(tmp_path), *target)
    assert (code, err) == (1, f"error: --output {tmp_path} is a directory: name a file in it\n")


def test_predict_on_a_checkpoint_name_hints_at_load(
    classifier: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """F17: "r18" is a stored checkpoint, not a model."""
    np.save(tmp_path / "x.npy", np.ones((1, 3, 32, 32), np.float32))
    x, target = str(tmp_path / "x.npy"), ("--target", classifier)
    code, _, err = run(capsys, "predict", "r18", x, *target)
    assert code == 1 and err.splitlines() == [
        "error: NOT_FOUND: model 'r18' is not loaded",
        "hint: r18 is a stored checkpoint, not a model: load it first: modelhost load NAME "
        "-a ARCHITECTURE -c r18",
    ], err
    code, _, err = run(capsys, "predict", "nothing", x, *target)
    assert err.splitlines()[-1] == "hint: `modelhost list models` shows the models served", err


def test_load_errors_hint_at_the_command_line_flags(
    classifier: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """F8: the server names LoadModel and its fields; the command adds its own flags."""
    target = ("--target", classifier)
    cases = [
        (
            ["-a", "resnet18"],
            "LoadModel needs a checkpoint or pretrained weights",
            "give -c/--checkpoint NAME (a stored checkpoint: modelhost list checkpoints) or "
            "--weights NAME (torchvision's pretrained weights, e.g. IMAGENET1K_V1)",
        ),
        (
            ["-a", "resnet19", "-c", "r18"],
            "did you mean 'resnet18'?",
            "see them with: modelhost list architectures",
        ),
        (
            ["-c", "r18"],
            "holds weights only",
            "give -a/--architecture NAME (modelhost list architectures shows them)",
        ),
        (
            ["-a", "resnet18", "-c", "r18", "--warmup-shape", "0,3"],
            "warmup_shape [0, 3] must be positive",
            "on the command line, warmup_shape is --warmup-shape N,C,H,W",
        ),
        (
            ["-a", "resnet18", "-c", "nope"],
            "NOT_FOUND: checkpoint 'nope' not found",
            "modelhost list checkpoints shows those stored; modelhost upload NAME FILE adds one",
        ),
    ]
    for flags, error, hint in cases:
        code, _, err = run(capsys, "load", "m", *flags, *target)
        assert code == 1 and error in err.splitlines()[0], err
        assert err.splitlines()[1:] == [f"hint: {hint}"], err


def test_health_local_hints_at_the_variables_it_read(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """F5: --local asks where MODELHOST_* say, not --target: the hint names those."""
    port = free_port()
    monkeypatch.setenv("MODELHOST_PORT", str(port))
    monkeypatch.delenv("MODELHOST_HEALTH_PORT", raising=False)
    monkeypatch.delenv("MODELHOST_HOST", raising=False)
    assert hint(capsys, "--local") == (
        f"--local asked 127.0.0.1:{port} (MODELHOST_HEALTH_PORT unset, MODELHOST_PORT={port}, "
        "MODELHOST_HOST unset): is the server running on this machine, and are these "
        "variables set as the server has them?"
    )


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_a_timeout_must_be_positive(timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    """F10: a deadline of 0 or less failed every call at once, as DEADLINE_EXCEEDED."""
    for argv in (["list", "--timeout", timeout], ["--timeout", timeout, "list"]):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert "error: argument --timeout: must be a positive number of seconds" in err, err


def test_help_says_what_0_means(capsys: pytest.CaptureFixture[str]) -> None:
    """F11: --max-batch-size 0 and --version 0 are the defaults, as the help says."""
    helps = {}
    for command in ("load", "predict", "unload", "snapshot"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "(1: no batching; 0 or left out: the server's default" in helps["load"]
    assert "version to register (0 or left out: the next" in helps["load"]
    assert "(0 or left out: the newest)" in helps["predict"]
    assert "(0 or left out: the newest)" in helps["snapshot"]
    assert "only this version (0 or left out: all)" in helps["unload"]


def test_a_serve_usage_error_shows_serves_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """F16: a misspelt serve flag, and a size with a unit, which no setting takes."""
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--prot", "50163"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: modelhost serve ") and "{serve,upload" not in err, err
    assert err.endswith("modelhost serve: error: unrecognized arguments: --prot 50163\n"), err
    for flag, value, message in (
        ("--device-memory-budget", "2GB", "give bytes (2000000000) or a fraction of the total"),
        ("--max-checkpoint-bytes", "1GiB", "give bytes (1073741824)\n"),
        ("--port", "fifty", "'fifty' is not an int\n"),
    ):
        with pytest.raises(SystemExit) as exit:
            main(["serve", flag, value])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and f"error: argument {flag}: " in err, err
        assert message in err, err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--architecture NAME=MODULE:CALLABLE" in capsys.readouterr().out


def test_a_store_that_is_a_file_is_named_as_the_flag(tmp_path: Path) -> None:
    """F16: not "[Errno 17] File exists"."""
    file = tmp_path / "passwd"
    file.write_text("root:x:0:0\n")
    for store, message in (
        (file, f"error: --store {file} is a file, not a directory"),
        (file / "x", f"error: --store {file / 'x'}: {file} is a file, not a directory"),
    ):
        done = cli("serve", "--port", "0", "--store", str(store))
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines()[-1] == message, done.stderr


@contextlib.contextmanager
def silent_target() -> Iterator[tuple[str, threading.Event]]:
    """A port that accepts connections and never says a word: a call there waits (gRPC
    waits for the HTTP/2 handshake); the event is set once the client has connected."""
    connected, done = threading.Event(), threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.1)
        held: list[socket.socket] = []

        def accept() -> None:
            while not done.is_set():
                try:
                    held.append(listener.accept()[0])
                except TimeoutError:
                    continue
                connected.set()

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield f"127.0.0.1:{listener.getsockname()[1]}", connected
        finally:
            done.set()
            thread.join()
            for connection in held:
                connection.close()


def _python(script: str, *argv: str) -> subprocess.Popen[str]:
    """`python -c script argv...` as a process of its own, its output captured."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GRPC_VERBOSITY": "NONE"},
    )


INTERRUPTIBLE = (
    # Python's own SIGINT handler, even where this suite runs with SIGINT ignored (a
    # background job of a shell): the command as a terminal runs it.
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from modelhost.cli import main; sys.exit(main())"
)


@pytest.mark.parametrize(
    ("command", "signals"),
    [("upload", 1), ("upload", 2), ("list", 1)],
    ids=["upload", "upload-twice", "list"],
)
def test_ctrl_c_ends_a_client_command_in_one_line(
    command: str, signals: int, tmp_path: Path
) -> None:
    """F4: ctrl-C while the call waits: `interrupted` and status 130, no traceback. A
    second SIGINT while the command cleans up (`timeout -s INT` sends two) changes
    nothing: once, one that landed in gRPC's channel close left the process hung."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(bytes(1 << 20))
    argv = ["upload", "w", str(weights)] if command == "upload" else ["list"]
    with silent_target() as (target, connected):
        process = _python(INTERRUPTIBLE, *argv, "--target", target)
        try:
            assert connected.wait(60), "the command never called"
            time.sleep(0.3)
            for _ in range(signals):
                process.send_signal(signal.SIGINT)
                time.sleep(0.05)
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    said = "interrupted\n"
    if command == "upload":  # it changes the server: the interrupt may have come late
        said += f"hint: {UPLOAD_MAY_HAVE_LANDED}\n"
    assert (process.returncode, out, err) == (130, "", said)


UPLOAD_MAY_HAVE_LANDED = (
    "the server may have finished the upload before it saw the call cancelled: "
    "`modelhost list` shows the stored checkpoints"
)

INTERRUPTED_CLOSE = """
import signal, sys, threading

class Condition(threading.Condition):
    # A KeyboardInterrupt in the first wait of the main thread once close() began: where
    # gRPC's channel close waits for the cancelled call (it then stays half-closed).
    armed = False

    def wait(self, timeout=None):
        if Condition.armed and threading.current_thread() is threading.main_thread():
            Condition.armed = False
            raise KeyboardInterrupt
        return super().wait(timeout)

threading.Condition = Condition  # before gRPC makes its channel's
signal.signal(signal.SIGINT, signal.default_int_handler)
from modelhost.client import sync

close = sync.ModelHostClient.close

def interrupted_close(self):
    Condition.armed = True
    close(self)

sync.ModelHostClient.close = interrupted_close
from modelhost.cli import main
sys.exit(main())
"""


def test_an_interrupt_inside_the_channel_close_does_not_hang_the_exit(tmp_path: Path) -> None:
    """F4, the hang once seen: a second KeyboardInterrupt inside gRPC's channel close
    leaves the channel closed but never destroyed, and at interpreter exit grpc's
    `_ChannelCallState.__del__` closes it again, waiting forever for the first close to
    finish. The command ends without interpreter shutdown after ctrl-C."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(bytes(4 << 20))
    with silent_target() as (target, connected):
        argv = ["upload", "w", str(weights), "--target", target]
        process = _python(INTERRUPTED_CLOSE, *argv)
        try:
            assert connected.wait(60), "the command never called"
            time.sleep(0.3)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the interrupted command hung at exit")
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert (process.returncode, out, err) == (
        130,
        "",
        f"interrupted\nhint: {UPLOAD_MAY_HAVE_LANDED}\n",
    )
