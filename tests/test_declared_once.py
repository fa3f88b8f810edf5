"""What is declared once stays complete: the proto is the table, the code follows it."""

from __future__ import annotations

import dataclasses

import torch

from modelhost.server import formats, messages
from modelhost.server.images import Preprocessing
from modelhost.server.loading import LoadRequest
from modelhost.v1 import modelhost_pb2 as pb

FORMATS = [
    formats.STATE_DICT,
    formats.GENERAL_CHECKPOINT,
    formats.SAFETENSORS,
    formats.EXPORTED_PROGRAM,
    formats.PICKLED_MODEL,
]


def test_every_checkpoint_format_has_its_proto_value() -> None:
    codes = {messages._format(name) for name in FORMATS}
    assert pb.CHECKPOINT_FORMAT_UNSPECIFIED not in codes
    named = {v.number for v in pb.CheckpointFormat.DESCRIPTOR.values if v.number}
    assert codes == named


def _flat_fields() -> set[str]:
    """LoadModelRequest's fields, its batching fields flattened (as LoadRequest has them)."""
    fields = {field.name for field in pb.LoadModelRequest.DESCRIPTOR.fields} - {"batching"}
    return fields | {field.name for field in pb.BatchingConfig.DESCRIPTOR.fields}


def test_load_request_declares_every_load_model_option() -> None:
    assert {field.name for field in dataclasses.fields(LoadRequest)} == _flat_fields()


def test_load_model_options_survive_the_round_trip() -> None:
    """Every option set to a non-default value comes through messages.load_request, and
    back through load_message (the restore record), unchanged."""
    request = LoadRequest(
        name="m",
        architecture="resnet18",
        architecture_args={"num_classes": "10"},
        checkpoint="w",
        version=3,
        device="cpu",
        dtype=torch.bfloat16,
        strict=False,
        weights="",
        channels_last=True,
        preprocessing=Preprocessing(resize=256, crop=224, mean=(0.5,), std=(0.25,), weights=""),
        labels=("cat", "dog"),
        warmup_shape=(8, 3, 224, 224),
        compile="default",
        autocast=torch.float16,
        residency="pinned",
        max_batch_size=16,
        max_queue_delay_us=250,
        max_queue_size=64,
        preferred_batch_size=8,
    )
    defaults = LoadRequest(name="")
    changed = {
        f.name
        for f in dataclasses.fields(LoadRequest)
        if getattr(request, f.name) != getattr(defaults, f.name)
    }
    assert changed == _flat_fields() - {"weights"}  # weights and checkpoint exclude each other
    message = messages.load_message(request)
    assert messages.load_request(message) == request
    assert messages.RECORDS.load(messages.RECORDS.dump(request)) == request


def test_every_load_model_option_is_an_oip_load_parameter() -> None:
    """RepositoryModelLoad takes every LoadModelRequest field as a parameter, and each one
    lands in the same LoadRequest as LoadModel's message with that field set."""
    from modelhost.oip import grpc_service_pb2 as oip
    from modelhost.server import oip_load

    assert set(oip_load.KEYS) == _flat_fields() - {"name"}
    P = oip.ModelRepositoryParameter
    given = {
        "architecture": P(string_param="resnet18"),
        "architecture_args": P(string_param='{"num_classes": 10}'),
        "checkpoint": P(string_param="w"),
        "version": P(int64_param=3),
        "device": P(string_param="cpu"),
        "dtype": P(string_param="bfloat16"),
        "strict": P(bool_param=False),
        "weights": P(string_param="IMAGENET1K_V1"),
        "channels_last": P(string_param="true"),
        "preprocessing": P(string_param='{"resize": 256, "crop": 224}'),
        "labels": P(string_param='["cat", "dog"]'),
        "warmup_shape": P(string_param="[8, 3, 224, 224]"),
        "compile": P(string_param="default"),
        "autocast": P(string_param="float16"),
        "residency": P(string_param="pinned"),
        "max_batch_size": P(int64_param=16),
        "max_queue_delay_us": P(string_param="250"),
        "max_queue_size": P(int64_param=64),
        "preferred_batch_size": P(int64_param=8),
    }
    assert set(given) == set(oip_load.KEYS)
    expected = pb.LoadModelRequest(
        name="m",
        architecture="resnet18",
        architecture_args={"num_classes": "10"},
        checkpoint="w",
        version=3,
        device="cpu",
        dtype=pb.DATA_TYPE_BFLOAT16,
        strict=False,
        weights="IMAGENET1K_V1",
        channels_last=True,
        preprocessing=pb.ImagePreprocessing(resize=256, crop=224),
        labels=["cat", "dog"],
        warmup_shape=[8, 3, 224, 224],
        compile="default",
        autocast=pb.DATA_TYPE_FLOAT16,
        residency=pb.RESIDENCY_PINNED,
        batching=pb.BatchingConfig(
            max_batch_size=16, max_queue_delay_us=250, max_queue_size=64, preferred_batch_size=8
        ),
    )
    assert oip_load.load_request("m", given) == messages.load_request(expected)
