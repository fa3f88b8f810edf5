"""The Open Inference Protocol endpoint, driven by Triton's unmodified tritonclient.

The server runs in this process (conftest's fixtures); tritonclient runs in a
spawned child (helpers/triton.py says why: its protos and ours share the package
`inference`, which protobuf cannot load twice).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from conftest import images, reference, resnet18, serve
from helpers.triton import Triton, TritonError, start_child
from modelhost.client import ModelHostClient
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.oip import grpc_service_pb2_grpc as oip_grpc
from modelhost.server import Server, Settings, running

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def child() -> Iterator[Any]:
    with start_child() as executor:
        yield executor


@pytest.fixture
def triton(child: Any, server: Server) -> Triton:
    return Triton(child, server.target)


def ints(values: list[str]) -> list[int]:
    """int64 fields come back from protobuf's JSON mapping as strings."""
    return [int(v) for v in values]


def fails(status: str, call: Any, *args: Any, **kwargs: Any) -> str:
    """Calls, expects a TritonError with `status`, returns its message."""
    with pytest.raises(TritonError) as caught:
        call(*args, **kwargs)
    assert caught.value.status == status, caught.value
    return caught.value.message


def test_the_child_never_loads_modelhost_protos(triton: Triton) -> None:
    assert triton.call("is_server_live") is True
    loaded = triton.modules()
    assert "tritonclient.grpc.service_pb2" in loaded
    assert not [m for m in loaded if m.startswith("modelhost")]


def test_oip_protos_and_tritonclient_cannot_share_a_process() -> None:
    """Why tritonclient runs in a child: each order of imports fails the same way."""
    for first, second in [
        ("modelhost.oip.grpc_service_pb2", "tritonclient.grpc"),
        ("tritonclient.grpc", "modelhost.oip.grpc_service_pb2"),
    ]:
        run = subprocess.run(
            [sys.executable, "-c", f"import {first}\nimport {second}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode != 0
        assert "duplicate symbol 'inference." in run.stderr.splitlines()[-1]


def test_our_protos_are_wire_compatible_with_tritonclients(triton: Triton, tmp_path: Path) -> None:
    out = tmp_path / "oip.binpb"
    protos = ROOT / "protos"
    subprocess.run(
        [
            *(sys.executable, "-m", "grpc_tools.protoc", f"-I{protos}", "--include_imports"),
            *(f"--descriptor_set_out={out}", "modelhost/oip/grpc_service.proto"),
        ],
        check=True,
    )
    assert triton.compare_protos(out.read_bytes()) == []


def test_server_health_metadata_and_reflection(triton: Triton, server: Server) -> None:
    assert triton.call("is_server_live") is True
    assert triton.call("is_server_ready") is True
    metadata = triton.call("get_server_metadata", as_json=True)
    assert metadata["name"] == "modelhost"
    assert {"model_repository", "model_configuration"} <= set(metadata["extensions"])
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health.Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in database.get_services()
        found = database.FindFileContainingSymbol("inference.ModelInferRequest")
        assert found.name == "modelhost/oip/grpc_service.proto"


def test_model_ready(triton: Triton, served_resnet: torch.nn.Module) -> None:
    assert triton.call("is_model_ready", "r18") is True
    assert triton.call("is_model_ready", "r18", "1") is True
    assert triton.call("is_model_ready", "r18", "2") is False
    assert triton.call("is_model_ready", "nope") is False
    fails("INVALID_ARGUMENT", triton.call, "is_model_ready", "r18", "latest")


def test_metadata_and_config_know_outputs_before_the_first_run(
    triton: Triton, served_resnet: torch.nn.Module
) -> None:
    metadata = triton.call("get_model_metadata", "r18", as_json=True)
    assert metadata["name"] == "r18" and metadata["versions"] == ["1"]
    assert metadata["platform"] == "pytorch_libtorch"
    (spec,) = metadata["inputs"]
    assert (spec["name"], spec["datatype"], ints(spec["shape"])) == (
        "input",
        "FP32",
        [-1, 3, -1, -1],
    )
    # Outputs are known once LoadModel returns (found on the meta device), before any run:
    # tritonclient's flow (metadata, then InferRequestedOutput of its outputs) works at once.
    (before,) = metadata["outputs"]
    assert (before["name"], before["datatype"], ints(before["shape"])) == (
        "output",
        "FP32",
        [-1, 10],
    )

    config = triton.call("get_model_config", "r18", as_json=True)["config"]
    assert config["max_batch_size"] == 32  # the server's default batching
    assert ints(config["input"][0]["dims"]) == [3, -1, -1]  # without the batch dimension
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 1000
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
    assert parameters["architecture"] == "resnet18"
    assert parameters["checkpoint"] == "r18-weights"
    assert json.loads(parameters["architecture_args"]) == {"num_classes": 10}

    (output,) = config["output"]
    assert ints(output["dims"]) == [10] and output["name"] == "output"
    x = images(2)
    _, outputs = triton.infer("r18", {"input": x}, outputs=[before["name"]])
    datatype, got = outputs["output"]
    assert datatype == before["datatype"] and list(got.shape) == [2, 10]
    np.testing.assert_allclose(got, reference(served_resnet, x), rtol=1e-5, atol=1e-5)
    (after,) = triton.call("get_model_metadata", "r18", as_json=True)["outputs"]
    assert after == before


def test_the_config_of_a_model_with_a_fixed_batch_says_so(child: Any, settings: Settings) -> None:
    """An exported program with a static batch of 2 takes exactly 2 rows: Triton's config
    for that is max_batch_size 0 with the full shape as dims (red team 12, F4), and a
    request shaped from the config answers as the in-process model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).eval()
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(model, (torch.ones(2, 8),)), buffer)
    unsafe = dataclasses.replace(settings, allow_pickled_models=True)
    with running(unsafe) as server, ModelHostClient(server.target) as client:
        client.save_checkpoint("fixed", buffer.getvalue())
        client.load_model("fixed", checkpoint="fixed")
        triton = Triton(child, server.target)
        config = triton.call("get_model_config", "fixed", as_json=True)["config"]
        assert config.get("max_batch_size", 0) == 0 and "dynamic_batching" not in config
        (given,) = config["input"]
        assert ints(given["dims"]) == [2, 8]
        assert ints(config["output"][0]["dims"])[1:] == [3]  # its full shape: [-1 or 2, 3]
        x = np.random.default_rng(1).standard_normal(ints(given["dims"])).astype(np.float32)
        _, outputs = triton.infer("fixed", {given["name"]: x})
        ((_, got),) = outputs.values()
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_infer_fp32_matches_the_in_process_model(
    triton: Triton, served_resnet: torch.nn.Module
) -> None:
    x = images(3)
    version, outputs = triton.infer("r18", {"input": x})
    assert version == "1"
    datatype, out = outputs["output"]
    assert datatype == "FP32" and out.dtype == np.float32 and out.shape == (3, 10)
    np.testing.assert_array_equal(out, reference(served_resnet, x))


def test_infer_half_precision_inputs(triton: Triton, served_resnet: torch.nn.Module) -> None:
    """Floating-point outputs come back in the input's dtype, as with Predict."""
    x16 = images(2).astype(np.float16)
    _, outputs = triton.infer("r18", {"input": x16})
    datatype, out = outputs["output"]
    expected = reference(served_resnet, x16.astype(np.float32))
    assert datatype == "FP16" and out.dtype == np.float16
    np.testing.assert_array_equal(out, expected.astype(np.float16))

    # BF16: tritonclient sends and returns ml_dtypes.bfloat16 arrays.
    xbf = images(2).astype(ml_dtypes.bfloat16)
    _, outputs = triton.infer("r18", {"input": xbf})
    datatype, out = outputs["output"]
    expected = reference(served_resnet, xbf.astype(np.float32)).astype(ml_dtypes.bfloat16)
    assert datatype == "BF16" and out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.astype(np.float32), expected.astype(np.float32))


def test_typed_contents_instead_of_raw(triton: Triton, served_resnet: torch.nn.Module) -> None:
    x = images(2)
    reply = triton.raw_infer(
        {
            "model_name": "r18",
            "id": "req-7",
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "contents": {"fp32_contents": x.ravel().tolist()},
                }
            ],
        }
    )
    (output,) = reply["outputs"]
    assert output["name"] == "output" and ints(output["shape"]) == [2, 10]
    out = np.frombuffer(reply["raw_output_contents"][0], "<f4").reshape(2, 10)
    np.testing.assert_array_equal(out, reference(served_resnet, x))


def test_predict_and_model_infer_give_the_same_answer(
    triton: Triton, client: ModelHostClient, served_resnet: torch.nn.Module
) -> None:
    x = images(4, seed=3)
    _, outputs = triton.infer("r18", {"input": x}, outputs=["output"])
    np.testing.assert_array_equal(outputs["output"][1], client.predict("r18", x))


def test_unknown_models_and_versions(triton: Triton, served_resnet: torch.nn.Module) -> None:
    x = images(1)
    assert "nope" in fails("NOT_FOUND", triton.infer, "nope", {"input": x})
    fails("NOT_FOUND", triton.infer, "r18", {"input": x}, version="5")
    fails("INVALID_ARGUMENT", triton.infer, "r18", {"input": x}, version="v1")
    fails("NOT_FOUND", triton.call, "get_model_metadata", "nope")
    fails("NOT_FOUND", triton.call, "get_model_config", "r18", "5")
    fails("INVALID_ARGUMENT", triton.infer, "r18", {"input": x}, outputs=["logits"])


def _request(datatype: str, shape: list[int], raw: bytes, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "input", "datatype": datatype, "shape": shape, **extra}
    return {"model_name": "r18", "inputs": [tensor], "raw_input_contents": [raw] if raw else []}


@pytest.mark.parametrize(
    ("request_", "complaint"),
    [
        (_request("BYTES", [1, 3, 8, 8], bytes(192)), "datatype 'BYTES'"),
        (_request("FP31", [1, 3, 8, 8], bytes(768)), "datatype 'FP31'"),
        (_request("FP32", [1, 3, 8, 8], bytes(700)), "needs 768 bytes"),
        (_request("FP32", [3, 8, 8], bytes(768)), "shape [3, 8, 8]"),
        (_request("FP32", [1, -3, 8, 8], bytes(768)), "negative"),
        (_request("INT64", [1, 3, 8, 8], bytes(1536)), "dtype int64"),
        (_request("FP16", [1, 3], b"", contents={"fp32_contents": [1, 2, 3]}), "raw_input"),
        (_request("FP32", [1, 3], b"", contents={"fp32_contents": [1, 2]}), "needs 3 elements"),
        (_request("INT8", [1, 3], b"", contents={"int_contents": [1, 2, 300]}), "out of range"),
        (
            {**_request("FP32", [1, 3, 8, 8], bytes(768)), "raw_input_contents": [b"", b""]},
            "2 entries for 1 inputs",
        ),
    ],
)
def test_malformed_inputs_are_invalid_argument(
    triton: Triton, served_resnet: torch.nn.Module, request_: dict[str, Any], complaint: str
) -> None:
    assert complaint in fails("INVALID_ARGUMENT", triton.raw_infer, request_)
    _, outputs = triton.infer("r18", {"input": images(1)})  # still serving
    assert outputs["output"][1].shape == (1, 10)


def _config(**parameters: Any) -> str:
    """A Triton model config (JSON) carrying modelhost's load parameters."""
    return json.dumps(
        {
            "max_batch_size": 4,
            "dynamic_batching": {"max_queue_delay_microseconds": 200},
            "parameters": {key: {"string_value": value} for key, value in parameters.items()},
        }
    )


def test_repository_load_reload_and_unload(triton: Triton, client: ModelHostClient) -> None:
    first, second = resnet18(seed=1), resnet18(seed=2)
    client.save_checkpoint("w1", first.state_dict())
    client.save_checkpoint("w2", second.state_dict())
    config = _config(
        architecture="resnet18", checkpoint="w1", architecture_args='{"num_classes": 10}'
    )
    triton.call("load_model", "m", config=config)

    assert triton.call("is_model_ready", "m") is True
    loaded = triton.call("get_model_config", "m", as_json=True)["config"]
    assert loaded["max_batch_size"] == 4
    assert int(loaded["dynamic_batching"]["max_queue_delay_microseconds"]) == 200
    x = images(2)
    np.testing.assert_array_equal(
        triton.infer("m", {"input": x})[1]["output"][1], reference(first, x)
    )

    # A model's config goes back into a load: same settings, new weights, new version.
    again = triton.call("get_model_config", "m", as_json=True)["config"]
    again["parameters"]["checkpoint"] = {"string_value": "w2"}
    triton.call("load_model", "m", config=json.dumps(again))
    version, outputs = triton.infer("m", {"input": x})
    assert version == "2"
    np.testing.assert_array_equal(outputs["output"][1], reference(second, x))
    _, outputs = triton.infer("m", {"input": x}, version="1")
    np.testing.assert_array_equal(outputs["output"][1], reference(first, x))
    assert triton.call("get_model_config", "m", as_json=True)["config"]["max_batch_size"] == 4
    index = triton.call("get_model_repository_index", as_json=True)["models"]
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("m", "1", "READY"),
        ("m", "2", "READY"),
    ]
    assert [m.version for m in client.list_models()] == [1, 2]  # the same registry

    triton.call("unload_model", "m")
    assert triton.call("is_model_ready", "m") is False
    assert client.list_models() == []
    fails("NOT_FOUND", triton.call, "unload_model", "m")


def test_repository_load_failures(triton: Triton, client: ModelHostClient) -> None:
    client.save_checkpoint("w", resnet18().state_dict())
    message = fails("INVALID_ARGUMENT", triton.call, "load_model", "m")
    assert "no model repository" in message
    no_architecture = _config(checkpoint="w")
    fails("INVALID_ARGUMENT", triton.call, "load_model", "m", config=no_architecture)
    missing = _config(architecture="resnet18", checkpoint="absent")
    fails("NOT_FOUND", triton.call, "load_model", "m", config=missing)
    unknown_key = json.dumps({"parameters": {"weights": {"string_value": "x"}}})
    assert "weights" in fails(
        "INVALID_ARGUMENT", triton.call, "load_model", "m", config=unknown_key
    )
    files = {"file:1/model.pt": b"\0"}
    message = fails("INVALID_ARGUMENT", triton.call, "load_model", "m", config="{}", files=files)
    assert "SaveCheckpoint" in message
    assert triton.call("get_model_repository_index", as_json=True) == {}


def test_model_statistics(
    triton: Triton, client: ModelHostClient, served_resnet: torch.nn.Module
) -> None:
    """Triton's statistics extension: ModelInfer and Predict share one count."""
    client.load_model(
        "counted",
        architecture="resnet18",
        checkpoint="r18-weights",
        architecture_args={"num_classes": 10},
    )
    before_ms = int(time.time() * 1000)
    triton.infer("counted", {"input": images(2)})
    client.predict("counted", images(3))
    (entry,) = triton.call("get_inference_statistics", "counted")["model_stats"]
    assert (entry["name"], entry["version"]) == ("counted", "1")
    assert int(entry["inference_count"]) == 5
    assert int(entry["execution_count"]) == 2
    assert int(entry["last_inference"]) >= before_ms
    stats = entry["inference_stats"]
    assert int(stats["success"]["count"]) == 2 and int(stats["queue"]["count"]) == 2
    assert "fail" not in stats or stats["fail"] == {}
    assert int(stats["compute_infer"]["ns"]) > int(stats["compute_output"].get("ns", 0))
    assert sorted(int(b["batch_size"]) for b in entry["batch_stats"]) == [2, 3]
    (memory,) = entry["memory_usage"]
    assert memory["type"] == "CPU"
    assert int(memory["byte_size"]) == client.get_model("counted").device_bytes
    everything = triton.call("get_inference_statistics")["model_stats"]
    assert {"counted", "r18"} <= {m["name"] for m in everything}
    assert "statistics" in triton.call("get_server_metadata")["extensions"]
    assert "nope" in fails("NOT_FOUND", triton.call, "get_inference_statistics", "nope")
    fails("NOT_FOUND", triton.call, "get_inference_statistics", "counted", "7")


# Hostile requests, sent with our own stub (tritonclient checks some fields itself) ----

Param = oip.ModelRepositoryParameter


@pytest.fixture
def stub(server: Server) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def refused(call: Any, *words: str, case: object = "") -> str:
    """Asserts `call` fails with INVALID_ARGUMENT and a short message holding `words`."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, error)
    message: str = error.details()
    assert len(message) < 500, (case, message)
    for word in words:
        assert word in message, (case, message)
    return message


def _load(stub: oip_grpc.GRPCInferenceServiceStub, name: str = "m", **parameters: Param) -> Any:
    """A RepositoryModelLoad of resnet18 (10 classes) from "r18-weights", and `parameters`."""
    valid = {
        "architecture": Param(string_param="resnet18"),
        "checkpoint": Param(string_param="r18-weights"),
        "architecture_args": Param(string_param='{"num_classes": 10}'),
    }
    request = oip.RepositoryModelLoadRequest(model_name=name, parameters=valid | parameters)
    return lambda: stub.RepositoryModelLoad(request)


def _hosted(stub: oip_grpc.GRPCInferenceServiceStub) -> list[tuple[str, str]]:
    index = stub.RepositoryIndex(oip.RepositoryIndexRequest())
    return [(m.name, m.version) for m in index.models]


VERSIONS = ["²", "٣", "\uff11", " 1", "0", "-1", "+1", str(2**63), "1" * 5000]


def test_versions_are_ascii_decimals_within_int64(
    stub: oip_grpc.GRPCInferenceServiceStub, served_resnet: torch.nn.Module
) -> None:
    """str.isdigit() takes "²" (which int() refuses: INTERNAL) and "٣" (which int() reads
    as 3: served as version 3); 2**63 does not fit an int64."""
    x = images(1, size=8)
    tensor = oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape)
    for version in VERSIONS:
        infer = oip.ModelInferRequest(
            model_name="r18",
            model_version=version,
            inputs=[tensor],
            raw_input_contents=[x.tobytes()],
        )
        unload = oip.RepositoryModelUnloadRequest(
            model_name="r18", parameters={"version": Param(string_param=version)}
        )
        for method, request in [
            (stub.ModelInfer, infer),
            (stub.ModelReady, oip.ModelReadyRequest(name="r18", version=version)),
            (stub.ModelMetadata, oip.ModelMetadataRequest(name="r18", version=version)),
            (stub.ModelConfig, oip.ModelConfigRequest(name="r18", version=version)),
            (stub.ModelStatistics, oip.ModelStatisticsRequest(name="r18", version=version)),
            (stub.RepositoryModelUnload, unload),
        ]:
            refused(functools.partial(method, request), "version", case=version)
        if version != "0":  # a load's "0" is the next version, as int64_param 0 is
            load = _load(stub, version=Param(string_param=version))
            refused(load, "version", case=version)
    assert _hosted(stub) == [("r18", "1")]


def test_unload_version_of_a_wrong_type_unloads_nothing(
    stub: oip_grpc.GRPCInferenceServiceStub, served_resnet: torch.nn.Module
) -> None:
    """A bool "version" was read as "" (every version): it unloaded the whole model."""
    for param in [Param(bool_param=True), Param(), Param(int64_param=-1)]:
        request = oip.RepositoryModelUnloadRequest(model_name="r18", parameters={"version": param})
        refused(lambda r=request: stub.RepositoryModelUnload(r), "'version'", case=param)
    assert _hosted(stub) == [("r18", "1")]


DEEP = "[" * 100_000 + "]" * 100_000
BAD_CONFIGS = [
    (DEEP, ["'config'", "deep"]),
    ('{"a": ' * 40 + "1" + "}" * 40, ["'config'", "deep"]),
    ('{"max_batch_size": ' + "9" * 5000 + "}", ["'config'", "digits"]),
    ('{"max_batch_size": 1e400}', ["max_batch_size", "inf"]),
    ('{"max_batch_size": true}', ["max_batch_size"]),
    ('{"max_batch_size": "٤"}', ["max_batch_size"]),
    ('{"max_batch_size": ' + str(2**63) + "}", ["max_batch_size"]),
    ('{"dynamic_batching": {"preferred_batch_size": 4}}', ["preferred_batch_size", "list"]),
    ('{"dynamic_batching": {"preferred_batch_size": [4, "a"]}}', ["preferred_batch_size"]),
    ('{"dynamic_batching": {"preferred_batch_size": [[4]]}}', ["preferred_batch_size"]),
    ('{"dynamic_batching": [1]}', ["dynamic_batching", "object"]),
    ('{"dynamic_batching": {"max_queue_delay_microseconds": "1.5"}}', ["max_queue_delay"]),
    ('{"parameters": []}', ["parameters", "object"]),
    ('{"parameters": {"version": {"string_value": "٣"}}}', ["version"]),
    ('{"parameters": {"dtype": {"string_value": 16}}}', ["dtype", "string"]),
    ("[]", ["'config'", "object"]),
    ('{"max_batch_size": ' + str(2**40) + "}", ["max_batch_size", "out of range"]),
    ('{"dynamic_batching": {"preferred_batch_size": [8589934592]}}', ["preferred_batch_size"]),
]


def test_configs_of_a_wrong_shape_are_invalid_argument(
    stub: oip_grpc.GRPCInferenceServiceStub, served_resnet: torch.nn.Module
) -> None:
    """Deep nesting raised RecursionError, a 5000-digit number ValueError, and a scalar
    preferred_batch_size TypeError (all INTERNAL); a list for dynamic_batching and
    Arabic-Indic digits were accepted."""
    for config, words in BAD_CONFIGS:
        refused(_load(stub, config=Param(string_param=config)), *words, case=config[:80])
    int32s = {  # values of int32 fields beyond their range: INTERNAL before
        "max_batch_size": _load(stub, max_batch_size=Param(int64_param=2**31)),
        "max_queue_size": _load(stub, max_queue_size=Param(int64_param=3_000_000_000)),
    }
    for key, load in int32s.items():
        refused(load, key, "out of range", case=key)
    for args in [DEEP, '{"num_classes": ' + "[" * 40 + "]" * 40 + "}", "9" * 5000, "[10]"]:
        load = _load(stub, architecture_args=Param(string_param=args))
        refused(load, "architecture_args", case=args[:80])
    # 12 MB of JSON took 20 times its size parsed (red team 9, L4): refused unparsed.
    huge = '{"labels": [' + ",".join(['"x"'] * 3_000_000) + "]}"
    refused(_load(stub, config=Param(string_param=huge)), "'config'", "characters of JSON")
    assert _hosted(stub) == [("r18", "1")]


# Negative and boundary values of every datatype modelhost serves.
EDGES: dict[str, np.ndarray[Any, Any]] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 1, 255]], np.uint8),
    "INT8": np.array([[-128, -1, 127]], np.int8),
    "INT16": np.array([[-32768, -1, 32767]], np.int16),
    "INT32": np.array([[-(2**31), -1, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), -1, 2**63 - 1]], np.int64),
    "FP16": np.array([[-65504, -0.0, 6e-8]], np.float16),
    "BF16": np.array([[-3.0e38, -1.5, 1e-38]], ml_dtypes.bfloat16),
    "FP32": np.array([[-3.4e38, -0.1, 1.4e-45]], np.float32),
    "FP64": np.array([[-1e30, -0.1, 1e-30]], np.float64),
}
# The typed `contents` field each datatype travels in (none for FP16 and BF16).
TYPED = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
NUMPY = {name: array.dtype for name, array in EDGES.items()}


def _as_model_sees_it(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A float32 model receives floating inputs as float32 and answers in the input's type."""
    if array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16:
        return array.astype(np.float32).astype(array.dtype)
    return array


@pytest.fixture
def echo_model(client: ModelHostClient) -> str:
    serve(client, "echo", architecture="echo")
    return "echo"


@pytest.mark.parametrize("datatype", list(EDGES))
def test_every_datatype_round_trips_raw_and_typed(
    triton: Triton, echo_model: str, datatype: str
) -> None:
    """Each datatype's edge values reach the model as they were sent and come back with
    the same datatype: through tritonclient's raw path and through typed contents."""
    x = EDGES[datatype]
    expected = _as_model_sees_it(x)
    # Raw: tritonclient's InferInput.
    _, outputs = triton.infer(echo_model, {"input": x}, datatypes={"input": datatype})
    got_type, got = outputs["output"]
    assert got_type == datatype
    np.testing.assert_array_equal(np.asarray(got).astype(expected.dtype), expected)
    # Typed contents, where the datatype has them.
    request: dict[str, Any] = {
        "model_name": echo_model,
        "inputs": [{"name": "input", "datatype": datatype, "shape": list(x.shape)}],
    }
    if datatype not in TYPED:
        request["inputs"][0]["contents"] = {"fp32_contents": x.astype(np.float32).ravel().tolist()}
        assert "raw_input_contents" in fails("INVALID_ARGUMENT", triton.raw_infer, request)
        return
    request["inputs"][0]["contents"] = {TYPED[datatype]: x.ravel().tolist()}
    reply = triton.raw_infer(request)
    (output,) = reply["outputs"]
    assert output["datatype"] == datatype and ints(output["shape"]) == list(x.shape)
    got = np.frombuffer(reply["raw_output_contents"][0], NUMPY[datatype]).reshape(x.shape)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("datatype", ["UINT16", "UINT32", "UINT64"])
def test_datatypes_modelhost_does_not_serve_are_refused(
    triton: Triton, echo_model: str, datatype: str
) -> None:
    x = np.array([[0, 1, 2]], np.dtype(datatype.lower()))
    message = fails("INVALID_ARGUMENT", triton.infer, echo_model, {"input": x})
    assert datatype in message and "not supported" in message
    typed = {
        "model_name": echo_model,
        "inputs": [
            {
                "name": "input",
                "datatype": datatype,
                "shape": [1, 3],
                "contents": {"uint_contents": [0, 1, 2]},
            }
        ],
    }
    assert "not supported" in fails("INVALID_ARGUMENT", triton.raw_infer, typed)


def test_triton_parameters_modelhost_does_not_serve_are_refused(
    client: ModelHostClient, server: Server
) -> None:
    """Red team 13, F6: shared memory, sequences and priorities were ignored (a Triton
    client reading its output region got stale bytes); `timeout` (microseconds) is the
    request's deadline when sooner than the call's."""
    serve(client, "m", architecture="tiny_mlp")
    serve(client, "slow", architecture="slow_mlp", architecture_args={"delay": 1.0})
    x = np.ones((2, 4), np.float32)
    Input = oip.ModelInferRequest.InferInputTensor
    Output = oip.ModelInferRequest.InferRequestedOutputTensor
    Param = oip.InferParameter
    shared = {
        "shared_memory_region": Param(string_param="r"),
        "shared_memory_byte_size": Param(int64_param=24),
    }

    def infer(model: str = "m", **fields: Any) -> oip.ModelInferResponse:
        with grpc.insecure_channel(server.target) as channel:
            request = oip.ModelInferRequest(
                model_name=model,
                inputs=[Input(name="x", datatype="FP32", shape=[2, 4], **fields.pop("input", {}))],
                raw_input_contents=[]
                if "no_contents" in fields.pop("flags", ())
                else [x.tobytes()],
                **fields,
            )
            return oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)

    def refused(code: grpc.StatusCode, *words: str, **fields: Any) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            infer(**fields)
        assert caught.value.code() == code, caught.value.details()
        assert all(word in caught.value.details() for word in words), caught.value.details()

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    refused(invalid, "shared-memory", outputs=[Output(name="output", parameters=shared)])
    refused(invalid, "shared-memory", input={"parameters": shared}, flags=("no_contents",))
    sequence = {"sequence_id": Param(int64_param=7), "sequence_start": Param(bool_param=True)}
    refused(invalid, "sequence", parameters=sequence)
    refused(invalid, "priorit", parameters={"priority": Param(uint64_param=2)})
    refused(invalid, "timeout", parameters={"timeout": Param(string_param="soon")})
    assert infer(parameters={"priority": Param(int64_param=0)}).raw_output_contents
    assert infer(parameters={"timeout": Param(int64_param=10_000_000)}).raw_output_contents
    # As Triton's: a request still queued when its timeout passes is dropped, not run.
    blocker = threading.Thread(target=infer, kwargs={"model": "slow"})
    blocker.start()
    time.sleep(0.2)
    timeout = {"timeout": Param(int64_param=200_000)}
    refused(grpc.StatusCode.DEADLINE_EXCEEDED, model="slow", parameters=timeout)
    blocker.join()
