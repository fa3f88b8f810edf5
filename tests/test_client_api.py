"""The client's shape: the two clients alike (in their signatures and against a server),
every LoadModelRequest field reachable from `load_model` and from `modelhost load`, and
client code that imports neither torch nor the server."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import build, reference
from modelhost.cli import LOAD_OPTION, build_parser, load_options, main
from modelhost.client import AsyncModelHostClient, ModelHostClient, ModelHostError, transfers
from modelhost.client.load_options import CLIENT_OPTIONS, LoadOptions, load_request
from modelhost.server import Server
from modelhost.v1 import modelhost_pb2 as pb

FIELDS = pb.LoadModelRequest.DESCRIPTOR.fields


def public_methods(cls: type) -> dict[str, Any]:
    return {
        name: getattr(cls, name)
        for name in dir(cls)
        if not name.startswith("_") and callable(getattr(cls, name))
    }


def test_the_two_clients_have_the_same_methods() -> None:
    sync, aio = public_methods(ModelHostClient), public_methods(AsyncModelHostClient)
    assert set(sync) == set(aio)
    assert {"load_model", "predict", "health", "close"} <= set(sync)
    for name in sorted(sync):
        # The same parameters, defaults and annotations (an `async def` is annotated with
        # what it returns once awaited, so the return annotations match too).
        assert inspect.signature(sync[name]) == inspect.signature(aio[name]), name
        assert sync[name].__doc__ and sync[name].__doc__ == aio[name].__doc__, name
        assert not inspect.iscoroutinefunction(sync[name]), name
        assert inspect.iscoroutinefunction(aio[name]), name
    assert inspect.signature(ModelHostClient) == inspect.signature(AsyncModelHostClient)


# LoadModelRequest fields and load_model's options

LOAD_MODEL_PARAMETERS = ("name", "architecture", "checkpoint")
"""Fields that are load_model's own parameters (every other field is an option)."""

SAMPLE: LoadOptions = {
    "version": 3,
    "device": "cpu",
    "dtype": "float16",
    "architecture_args": {"num_classes": 10, "layers": [2, 2]},
    "strict": False,
    "weights": "IMAGENET1K_V1",
    "batching": {field.name: 7 for field in pb.BatchingConfig.DESCRIPTOR.fields},
    "channels_last": True,
    "autocast": "bfloat16",
    "compile": "reduce-overhead",
    "warmup_shape": [8, 3, 224, 224],
    "preprocessing": {"resize": 256, "crop": 224, "mean": [0.5], "std": [0.25], "weights": "W"},
    "labels": ["cat", "dog"],
    "residency": "pinned",
    "timeout": 5.0,
}
"""A value other than the default for every option."""


def is_set(request: pb.LoadModelRequest, field: Any) -> bool:
    if field.has_presence:
        return request.HasField(field.name)
    value = getattr(request, field.name)
    return len(value) > 0 if field.is_repeated else value != field.default_value


def test_every_load_field_is_a_load_model_option() -> None:
    parameters = set(inspect.signature(ModelHostClient.load_model).parameters)
    assert set(LOAD_MODEL_PARAMETERS) <= parameters
    options = set(LoadOptions.__annotations__)
    missing = {f.name for f in FIELDS} - set(LOAD_MODEL_PARAMETERS) - options
    assert not missing, f"LoadModelRequest fields without a LoadOptions entry: {missing}"
    assert options - {f.name for f in FIELDS} == CLIENT_OPTIONS  # options that name no field


def test_load_request_sets_every_field_from_its_option() -> None:
    assert set(SAMPLE) == set(LoadOptions.__annotations__), "give the new option a SAMPLE value"
    request = load_request("m", "resnet18", "ckpt", SAMPLE)
    unset = [f.name for f in FIELDS if not is_set(request, f)]
    assert not unset, f"fields the options did not set: {unset}"
    assert dict(request.architecture_args) == {"num_classes": "10", "layers": "[2, 2]"}
    assert (request.dtype, request.autocast) == (pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16)
    assert request.batching.max_batch_size == 7 and request.preprocessing.weights == "W"


def test_options_left_out_leave_their_fields_unset() -> None:
    assert load_request("m", "", "", {}) == pb.LoadModelRequest(name="m")
    nones: Any = dict.fromkeys(LoadOptions.__annotations__)
    assert load_request("m", "", "", nones) == pb.LoadModelRequest(name="m")
    empty: LoadOptions = {"batching": {}, "preprocessing": {}, "dtype": "", "labels": []}
    assert load_request("m", "", "", empty) == pb.LoadModelRequest(name="m")
    with pytest.raises(TypeError, match="unexpected arguments \\['colour'\\]"):
        load_request("m", "", "", {"colour": "red"})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(TypeError, match="go in architecture_args"):
        load_request("m", "", "", {"num_classes": 10})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(ValueError, match="preprocessing: unknown key 'size' \\(its keys: re"):
        load_request("m", "", "", {"preprocessing": {"size": 64}})
    with pytest.raises(ValueError, match="batching: unknown key 'max_batch'"):
        load_request("m", "", "", {"batching": {"max_batch": 8}})


# The CLI's load flags


def load_dests() -> set[str]:
    parser = build_parser(serve_flags=False)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest for action in commands.choices["load"]._actions}


def test_every_load_field_is_a_cli_flag() -> None:
    dests = load_dests()
    flags = {f"{LOAD_OPTION}{name}" for name in LoadOptions.__annotations__}
    for field in FIELDS:
        if field.name in LOAD_MODEL_PARAMETERS:
            assert field.name in dests, field.name
        elif field.message_type is not None and f"{LOAD_OPTION}{field.name}" not in dests:
            # A sub-message without a flag of its own (batching): a flag per sub-field.
            for sub in field.message_type.fields:
                assert f"{LOAD_OPTION}{field.name}.{sub.name}" in dests, (field.name, sub.name)
        else:
            assert f"{LOAD_OPTION}{field.name}" in dests, f"`modelhost load` lacks {field.name}"
    assert "timeout" in dests  # the `timeout` option is the common --timeout
    stray = {d for d in dests if d.startswith(LOAD_OPTION)} - flags
    assert all(d.partition(".")[0] in flags for d in stray), stray


def test_load_flags_build_the_same_request_as_the_options(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("dog\n\n")
    batching = [
        arg
        for field in pb.BatchingConfig.DESCRIPTOR.fields
        for arg in ("--" + field.name.replace("_", "-"), "7")
    ]
    argv = [
        "load", "m", "-a", "resnet18", "-c", "ckpt", "--version", "3", "--device", "cpu",
        "--dtype", "float16", "--arg", "num_classes=10", "--arg", "layers=[2, 2]",
        "--no-strict", "--weights", "IMAGENET1K_V1", *batching, "--channels-last",
        "--autocast", "bfloat16", "--compile", "reduce-overhead",
        "--warmup-shape", "8,3,224,224",
        "--preprocessing", '{"resize": 256, "crop": 224, "mean": [0.5], "std": [0.25]}',
        "--preprocessing-weights", "W",
        "--label", "cat", "--labels-file", str(tmp_path / "labels.txt"), "--pin",
        "--timeout", "5",
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    options = load_options(args)
    assert options == {k: v for k, v in SAMPLE.items() if k not in CLIENT_OPTIONS}
    assert args.timeout == SAMPLE["timeout"]
    from_flags = load_request(args.name, args.architecture, args.checkpoint, options)
    assert from_flags == load_request("m", "resnet18", "ckpt", SAMPLE)
    assert load_options(build_parser().parse_args(["load", "m"])) == {}


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--warmup-shape", "8x3"], "not a shape"),
        (["--preprocessing", "[1]"], "not a JSON object"),
        (["--preprocessing", "{"], "not JSON"),
        (["--labels-file", "/nonexistent/labels"], "No such file"),
    ],
)
def test_bad_load_flags_are_usage_errors(
    flags: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["load", "m", *flags])
    assert exited.value.code == 2 and error in capsys.readouterr().err


def test_serve_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from modelhost.server.settings import settings_fields

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for name, kind, _, _ in settings_fields():
        flag = "--" + name.replace("_", "-")
        assert (flag.removesuffix("s") if kind == list[str] else flag) in out, name


# Imports


def modules_after(code: str) -> set[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


HEAVY = {"torch", "modelhost.server.app", "modelhost.server.host"}


def test_client_commands_import_neither_torch_nor_the_server() -> None:
    unreachable = "--target", "127.0.0.1:1", "--timeout", "0.5"
    commands = [["health"], ["list"], ["predict", "m", "/nonexistent/x.npy"], ["unload", "m"]]
    code = "from modelhost.cli import main\n" + "\n".join(
        f"assert main({[*command, *unreachable]!r}) == 1" for command in commands
    )
    loaded = modules_after(code)
    assert "modelhost.cli" in loaded
    assert not loaded & HEAVY, loaded & HEAVY
    assert not any(m.startswith("modelhost.server") for m in loaded)


def test_importing_the_client_or_the_settings_imports_no_torch() -> None:
    loaded = modules_after("import modelhost.client")
    assert "modelhost.client.sync" in loaded and not loaded & HEAVY, loaded & HEAVY
    assert not any(m.startswith("modelhost.server") for m in loaded)
    loaded = modules_after("import modelhost.server.settings")
    assert not loaded & HEAVY, loaded & HEAVY
    # The package's names still import on first use.
    loaded = modules_after("from modelhost.server import Settings, create_server")
    assert "modelhost.server.app" in loaded


# Transfers


def test_closing_a_prefetch_stops_a_consumer_waiting_for_it() -> None:
    """An upload the server ends early closes its Prefetch while the asyncio client's
    worker thread may be waiting in `next()`: that thread must end (it used to wait
    forever, and `asyncio.run` with it)."""
    release = threading.Event()

    def slow() -> Iterator[int]:
        release.wait(10)
        yield 1

    prefetch = transfers.Prefetch(slow())
    got: list[int | None] = []
    consumer = threading.Thread(target=lambda: got.append(next(prefetch, None)))
    consumer.start()
    time.sleep(0.05)
    prefetch.close()
    consumer.join(timeout=5)
    release.set()
    assert not consumer.is_alive() and got == [None]


# Both clients against one server


def test_the_two_clients_answer_alike(server: Server, tmp_path: Path) -> None:
    """Every method through each client: the same results, the same errors."""
    model = build("tiny_mlp")
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)

    def scenario(call: Callable[..., Any], p: str) -> dict[str, Any]:
        """Every method, as `call(method, *args, **kwargs)`; every name starts with `p`."""
        seen: dict[str, Any] = {}
        progress: list[tuple[int, int]] = []
        info = call(
            "save_checkpoint",
            p + "w",
            weights,
            metadata={"k": "v"},
            progress=lambda *done: progress.append(done),
        )
        seen["upload"] = info.format, info.size_bytes, info.sha256, info.metadata, progress[-1]
        seen["chunks"] = len(progress) > 3  # chunk_bytes=64
        loaded = call(
            "load_model",
            p + "m",
            architecture="tiny_mlp",
            checkpoint=p + "w",
            labels=["a", "b", "c"],
            batching={"max_batch_size": 2},
            timeout=60,
        )
        seen["load"] = loaded.version, loaded.state, loaded.label_count, loaded.batching
        out = call("predict", p + "m", x)
        np.testing.assert_allclose(out, reference(model, x), rtol=1e-6, atol=1e-6)
        seen["predict"] = out.tolist()
        top = call("predict", p + "m", x, top_k=2, version=1, timeout=30)
        seen["top_k"] = [[(c.index, c.label) for c in row] for row in top]
        snap = call("snapshot", p + "m", p + "snap", version=1)
        seen["snapshot"] = snap.format, snap.tensor_count, snap.metadata["snapshot_of"] == p + "m:1"
        path = call("download_checkpoint", p + "snap", tmp_path / (p + "snap.pt"))
        seen["download"] = sorted(torch.load(path, weights_only=True))
        state = call("download_checkpoint", p + "w")
        seen["in_memory"] = all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        seen["get_checkpoint"] = call("get_checkpoint", p + "w").sha256 == info.sha256
        seen["checkpoints"] = [
            c.name.removeprefix(p) for c in call("list_checkpoints") if c.name.startswith(p)
        ]
        seen["models"] = [
            m.name.removeprefix(p) for m in call("list_models") if m.name.startswith(p)
        ]
        seen["get_model"] = call("get_model", p + "m", 1).parameter_count
        seen["architectures"] = sorted(a.name for a in call("list_architectures"))
        seen["health"] = call("health"), call("health", "modelhost.v1.ModelHost")
        seen["errors"] = []
        failing: list[tuple[str, list[Any], dict[str, Any]]] = [
            ("get_model", ["missing"], {}),
            ("download_checkpoint", ["missing", tmp_path / (p + "missing.pt")], {}),
            ("snapshot", ["missing", p + "x"], {}),
            ("load_model", [p + "m2"], {"architecture": "tiny_mlp", "checkpoint": "missing"}),
            ("load_model", [p + "m2"], {"architecture": "tiny_mlp", "colour": "red"}),
        ]
        for method, args, kwargs in failing:
            with pytest.raises((ModelHostError, TypeError)) as caught:
                call(method, *args, **kwargs)
            seen["errors"].append((type(caught.value).__name__, str(caught.value)))
        seen["partial_files"] = list(tmp_path.glob(p + "missing*"))
        seen["unload"] = call("unload_model", p + "m")
        seen["delete"] = call("delete_checkpoint", p + "snap"), call("delete_checkpoint", p + "w")
        return seen

    with ModelHostClient(server.target, timeout=60, chunk_bytes=64) as client:
        blocking = scenario(lambda method, *a, **k: getattr(client, method)(*a, **k), "s-")

    async def on_asyncio() -> dict[str, Any]:
        async with AsyncModelHostClient(server.target, timeout=60, chunk_bytes=64) as client:
            loop = asyncio.get_running_loop()

            def call(method: str, *args: Any, **kwargs: Any) -> Any:
                """Awaits the method on the loop, from the scenario's thread."""
                coroutine = getattr(client, method)(*args, **kwargs)
                return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

            return await asyncio.to_thread(scenario, call, "a-")

    assert asyncio.run(on_asyncio()) == blocking
    assert blocking["chunks"] and blocking["in_memory"] and blocking["get_checkpoint"]
    assert [(kind, message[:15]) for kind, message in blocking["errors"]] == [
        ("NotFoundError", "NOT_FOUND: mode"),
        ("NotFoundError", "NOT_FOUND: chec"),
        ("NotFoundError", "NOT_FOUND: mode"),
        ("NotFoundError", "NOT_FOUND: chec"),
        ("TypeError", "load_model got "),
    ]
    assert blocking["health"] == ("SERVING", "SERVING") and blocking["partial_files"] == []
    assert blocking["unload"] == [1] and blocking["delete"] == (None, None)
