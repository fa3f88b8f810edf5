"""Property-based fuzzing of Predict, SaveCheckpoint, LoadModel and OIP against real servers.

Requests go through the raw generated stub, so no client-side validation filters
them. Each example starts from a valid request and breaks none, one or a few of
its parts: names with path tricks, unicode or 10,000 characters; unknown enum
numbers; negative, huge and zero-size shapes of rank 0 to 6; byte strings of the
wrong length; extra inputs; chunk streams with the header missing, repeated or
misplaced; torch.save'd random objects; truncated checkpoints; safetensors with
damaged headers; architectures and builder arguments that are not JSON; odd
devices, versions and batching settings. For every example:

- the answer is OK or one of the documented error codes, never INTERNAL or UNKNOWN;
- what succeeded is right (Predict outputs match the in-process model; a stored
  checkpoint has the sha256 of the bytes sent), what failed changed nothing;
- nothing half-written is left in the store (tmp/ empty, no unreferenced blob);
- no thread of the server died of an exception;
- the server still answers a valid Predict with the in-process model's output
  (and a model LoadModel accepted answers bursts of valid Predicts).

A second server, with inference and management tokens, takes hostile requests sent
with any token or none: Open Inference Protocol calls with version strings of any
text ("²", "٣", 20 digits), RepositoryModelLoad parameters of every type and configs
of any JSON structure and nesting; LoadModel with any warm-up shape and builder
arguments nested past the recursion limit or holding 5000-digit numbers; and message
bytes that need not be protobuf at all, to every method. Each answer is OK, a
documented code, UNAUTHENTICATED or PERMISSION_DENIED, never INTERNAL or UNKNOWN.

`MODELHOST_FUZZ_SCALE` multiplies the number of examples (100 for Predict, 150 for
SaveCheckpoint, 60 sequences of LoadModel calls, 100 OIP calls, 60 hostile LoadModels,
100 undecodable bodies); `pytest --hypothesis-show-statistics` shows which answers
they got.

The test_regression_* tests at the end are minimal reproducers of bugs the fuzzing
found; each fails until its bug is fixed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors
from torch import nn

from conftest import TEST_ARCHITECTURES, images, reference, serve, temp_files
from helpers.models import tiny_mlp
from modelhost.client import ChannelConfig, ModelHostClient, codec
from modelhost.oip import grpc_service_pb2 as oip
from modelhost.oip import grpc_service_pb2_grpc as oip_grpc
from modelhost.server import Server, Settings, running
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc as pb_grpc

Code: TypeAlias = grpc.StatusCode
DOCUMENTED = {
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.ALREADY_EXISTS,
    Code.RESOURCE_EXHAUSTED,
    Code.FAILED_PRECONDITION,
    Code.DATA_LOSS,
    Code.DEADLINE_EXCEEDED,
}
TIMEOUT = 120.0
SCALE = float(os.environ.get("MODELHOST_FUZZ_SCALE", "1"))
FUZZ = settings(
    max_examples=round(100 * SCALE),
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
T = TypeVar("T")

# Strategies: names, numbers, dtypes ------------------------------------------------

INT64 = st.one_of(
    st.integers(-3, 5),
    st.sampled_from([-(2**63), -(2**31), 2**31 - 1, 2**32, 2**62, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)
INT32 = st.one_of(
    st.integers(-3, 70), st.sampled_from([-(2**31), 2**31 - 1]), st.integers(-(2**31), 2**31 - 1)
)
UNICODE = st.text(st.characters(codec="utf-8"), max_size=200)  # any but lone surrogates
VALID_NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,24}", fullmatch=True).filter(
    lambda s: ".." not in s
)
TRICKY_NAMES = st.sampled_from(
    [
        "",
        ".",
        "..",
        "../r18",
        "r18/../r18",
        "/etc/passwd",
        "../../tmp/evil",
        "a/b",
        "a\\b",
        "..\\x",
        "-x",
        ".hidden",
        "_x",
        "r18\x00",
        "r18\n",
        " r18",
        "r18 ",
        "%2e%2e",
        "~root",
        "${HOME}",
        "CON",
        "tmp",
        "blobs",
        "r18-weights.json",
        "r18.",
        "é",
        "模型",
        "a" * 128,
        "a" * 129,
        "x" * 10_000,
    ]
)
DTYPE_CODES = st.one_of(st.integers(0, 11), INT32).map(pb.DataType.ValueType)
DIM = st.one_of(
    st.integers(0, 4),
    st.integers(-3, 40),
    st.sampled_from([2**31, 2**32 + 3, 2**62, 2**63 - 1]),
    st.sampled_from([-1, -(2**63)]),
)
# Any rank 0..6; also no elements at all, however large the other dimensions.
SHAPES = st.one_of(
    st.lists(DIM, max_size=6),
    st.lists(DIM, max_size=5).flatmap(lambda dims: st.permutations([0, *dims])),
)


def names(*known: str) -> st.SearchStrategy[str]:
    """Existing names, valid new ones, path tricks and any unicode."""
    return st.one_of(st.sampled_from(known), VALID_NAME, TRICKY_NAMES, UNICODE)


def maybe(draw: st.DrawFn, broken: set[str], key: str, fuzz: st.SearchStrategy[T], ok: T) -> T:
    """The fuzzed value when `key` is to be broken, else the valid one."""
    return draw(fuzz) if key in broken else ok


def rng_of(draw: st.DrawFn) -> np.random.Generator:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def _code_of(call: Callable[[], object]) -> Code:
    try:
        call()
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return Code.OK


# Fixtures ---------------------------------------------------------------------------


class Fuzzed:
    """The server under test, the raw stub, and the in-process twins of its models."""

    def __init__(
        self,
        server: Server,
        stub: pb_grpc.ModelHostStub,
        store: Path,
        twins: dict[str, nn.Module],
    ) -> None:
        self.server = server
        self.stub = stub
        self.store = store
        self.twins = twins
        self.thread_errors: list[str] = []

    def __repr__(self) -> str:
        return f"Fuzzed(server at {self.server.target})"

    def call(self, what: str, call: Callable[[], object]) -> tuple[Code, Any]:
        """Runs one raw call; asserts a documented answer; returns (code, reply)."""
        try:
            reply = call()
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            event(f"{what.split(maxsplit=1)[0]}: {code.name}")
            assert code in DOCUMENTED, f"{what}: {code.name}: {error.details()}"
            return code, None
        event(f"{what.split(maxsplit=1)[0]}: OK")
        return Code.OK, reply

    def checkpoints(self) -> dict[str, str]:
        try:
            reply = self.stub.ListCheckpoints(pb.ListCheckpointsRequest(), timeout=TIMEOUT)
        except grpc.RpcError as error:
            raise AssertionError(
                f"ListCheckpoints: {error.code().name}: {error.details()} "
                "(an earlier example may have stored an entry it cannot describe)"
            ) from None
        return {info.name: info.sha256 for info in reply.checkpoints}

    def check_store(self) -> None:
        """No temp file, no blob without an entry, no entry without its blob."""
        leftovers = temp_files(self.store)
        assert leftovers == [], f"left in the store's tmp/: {leftovers}"
        entries = {
            json.loads(p.read_bytes())["sha256"] for p in (self.store / "checkpoints").iterdir()
        }
        blobs = {p.name for p in (self.store / "blobs").iterdir()}
        assert blobs == entries, f"blobs {blobs} != entries {entries}"

    def check_serves(self) -> None:
        """A valid Predict on each original model gives the in-process model's output."""
        for model, x in (("r18", images(2, seed=7)), ("mlp", MLP_INPUT)):
            request = pb.PredictRequest(
                model=model, version=1, inputs={"input": codec.from_numpy(x)}
            )
            reply = self.stub.Predict(request, timeout=TIMEOUT)
            out = codec.to_numpy(reply.outputs["output"])
            np.testing.assert_allclose(out, reference(self.twins[model], x), rtol=1e-4, atol=1e-4)

    def check_threads(self) -> None:
        """No thread of the (in-process) server died of an exception."""
        assert self.thread_errors == [], f"server threads died: {self.thread_errors}"

    def check_all(self) -> None:
        self.check_threads()
        self.check_store()
        self.check_serves()


MLP_INPUT = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)


def saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@contextlib.contextmanager
def recording_thread_errors(errors: list[str]) -> Iterator[None]:
    """Collects exceptions that end any thread (a dying worker is a bug even if every
    call answered)."""
    default_hook = threading.excepthook

    def record(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        errors.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")
        default_hook(args)

    threading.excepthook = record
    try:
        yield
    finally:
        threading.excepthook = default_hook


def mlp_twin() -> nn.Module:
    torch.manual_seed(5)
    return tiny_mlp().eval()


@pytest.fixture
def fuzzed(server: Server, client: ModelHostClient, served_resnet: nn.Module) -> Iterator[Fuzzed]:
    """One server hosting "r18" (resnet18) and "mlp" (tiny_mlp), with a few checkpoints."""
    mlp = serve(client, "mlp", mlp_twin(), architecture="tiny_mlp", checkpoint="mlp-weights")
    state = mlp.state_dict()
    client.save_checkpoint("mlp-general", {"model_state_dict": state, "epoch": 3, "loss": 0.25})
    client.save_checkpoint("mlp-safetensors", save_safetensors(dict(state)))
    channel = grpc.insecure_channel(
        server.target, options=[("grpc.max_receive_message_length", -1)]
    )
    fuzz = Fuzzed(
        server,
        pb_grpc.ModelHostStub(channel),
        Path(server.settings.store),
        {"r18": served_resnet, "mlp": mlp},
    )
    with recording_thread_errors(fuzz.thread_errors):
        fuzz.check_all()
        yield fuzz
        channel.close()


# Predict ----------------------------------------------------------------------------


@dataclass
class PredictCase:
    request: pb.PredictRequest
    note: str


def tensor_bytes(rng: np.random.Generator, dtype: codec.DataType, count: int) -> bytes:
    """Plausible elements: normal floats, small integers, 0/1 booleans."""
    if dtype not in codec.ITEMSIZE:
        return b"\0" * count
    if dtype in codec.FLOATING:
        values = torch.from_numpy(rng.standard_normal(count).astype(np.float32))
    elif dtype == pb.DATA_TYPE_BOOL:
        values = torch.from_numpy(rng.integers(0, 2, count).astype(np.bool_))
    else:
        values = torch.from_numpy(rng.integers(-100, 100, count))
    return codec.from_torch(values.to(codec.torch_dtype(dtype))).data


@st.composite
def random_tensors(draw: st.DrawFn) -> pb.Tensor:
    """Any dtype number, any shape of rank 0..6, bytes of the right or a wrong length."""
    dtype = draw(DTYPE_CODES)
    shape = draw(SHAPES)
    itemsize = codec.ITEMSIZE.get(dtype)
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    if itemsize and 0 <= count * itemsize <= 1 << 16 and draw(st.booleans()):
        data = tensor_bytes(rng_of(draw), dtype, count)
    else:
        data = draw(st.binary(max_size=512))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def predict_cases(draw: st.DrawFn) -> PredictCase:
    """A valid request for r18 or mlp with a few of its parts broken (or none)."""
    parts = ["model", "version", "name", "dtype", "shape", "data", "extra", "empty", "recode"]
    broken = draw(st.sets(st.sampled_from(parts), max_size=3))
    model = draw(st.sampled_from(["r18", "mlp"]))
    rng = rng_of(draw)
    if model == "r18":
        n, h, w = draw(st.integers(1, 3)), draw(st.integers(8, 40)), draw(st.integers(8, 40))
        shape: list[int] = [n, 3, h, w]
    else:
        shape = [draw(st.integers(0, 4)), *draw(st.lists(st.integers(1, 3), max_size=2)), 4]
    count = math.prod(shape)
    float32 = pb.DATA_TYPE_FLOAT32
    tensor = pb.Tensor(dtype=float32, shape=shape, data=tensor_bytes(rng, float32, count))
    if "recode" in broken:  # another valid dtype, data to match
        dtype = draw(st.sampled_from(sorted(codec.ITEMSIZE)))
        tensor = pb.Tensor(dtype=dtype, shape=shape, data=tensor_bytes(rng, dtype, count))
    if "dtype" in broken:
        tensor.dtype = draw(DTYPE_CODES)
    if "shape" in broken:
        tensor.ClearField("shape")
        tensor.shape.extend(draw(SHAPES))
        fits = all(d >= 0 for d in tensor.shape) and math.prod(tensor.shape) <= 1 << 14
        if fits and draw(st.booleans()):  # data to match: only the shape is odd
            tensor.data = tensor_bytes(rng, tensor.dtype, math.prod(tensor.shape))
    if "data" in broken:
        tensor.data = draw(
            st.one_of(
                st.binary(max_size=1024),
                st.just(tensor.data[:-1]),
                st.just(tensor.data + b"\0"),
                st.binary(min_size=len(tensor.data), max_size=len(tensor.data)),
            )
        )
    inputs = {maybe(draw, broken, "name", UNICODE, "input"): tensor}
    if "extra" in broken:
        inputs.update(draw(st.dictionaries(UNICODE, random_tensors(), min_size=1, max_size=3)))
    if "empty" in broken:
        inputs = {}
    request = pb.PredictRequest(
        model=maybe(draw, broken, "model", names("r18", "mlp", "r18-weights"), model),
        version=maybe(draw, broken, "version", INT64, draw(st.sampled_from([0, 1]))),
        inputs=inputs,
    )
    return PredictCase(request, f"broken: {sorted(broken)}")


TOLERANCE = {
    pb.DATA_TYPE_FLOAT32: 1e-4,
    pb.DATA_TYPE_FLOAT64: 1e-4,
    pb.DATA_TYPE_FLOAT16: 2e-3,
    pb.DATA_TYPE_BFLOAT16: 2e-2,
}


def check_prediction(fuzz: Fuzzed, request: pb.PredictRequest, reply: pb.PredictResponse) -> None:
    """A successful Predict on a known model: the twin's output, in the input's float type."""
    twin = fuzz.twins.get(request.model)
    assert reply.model == request.model
    assert reply.version == (request.version or 1)
    if twin is None or len(request.inputs) != 1:
        return
    (given,) = request.inputs.values()
    x = codec.to_torch(given).clone()
    if not x.is_floating_point():
        return  # integer inputs: the model's own business
    with torch.inference_mode():
        expected = twin(x.float()).numpy()
    out = reply.outputs["output"]
    assert out.dtype == given.dtype, "floating outputs take the dtype of the input"
    tol = TOLERANCE[given.dtype]
    np.testing.assert_allclose(
        codec.to_numpy(out),
        expected,
        rtol=tol,
        atol=tol * max(1.0, float(np.abs(expected).max(initial=0))),
    )


@FUZZ
@given(case=predict_cases())
def test_fuzz_predict(fuzzed: Fuzzed, case: PredictCase) -> None:
    # A valid request runs at the same time: the fuzzed one may share its batch.
    valid = pb.PredictRequest(model="r18", inputs={"input": codec.from_numpy(images(1, seed=1))})
    fuzzed_call = fuzzed.stub.Predict.future(case.request, timeout=TIMEOUT)
    valid_call = fuzzed.stub.Predict.future(valid, timeout=TIMEOUT)
    code, reply = fuzzed.call(f"Predict ({case.note})", fuzzed_call.result)
    if code == Code.OK:
        check_prediction(fuzzed, case.request, reply)
    valid_reply = valid_call.result()
    np.testing.assert_allclose(
        codec.to_numpy(valid_reply.outputs["output"]),
        reference(fuzzed.twins["r18"], images(1, seed=1)),
        rtol=1e-4,
        atol=1e-4,
    )
    fuzzed.check_all()


# SaveCheckpoint ---------------------------------------------------------------------


class Unpicklable:
    """A class weights_only loading must refuse (harmless if it did not)."""

    def __init__(self, value: int) -> None:
        self.value = value


@st.composite
def torch_tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(
        st.sampled_from(
            [
                torch.float32,
                torch.float16,
                torch.bfloat16,
                torch.float64,
                torch.int64,
                torch.int8,
                torch.uint8,
                torch.bool,
                torch.complex64,
            ]
        )
    )
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    tensor = (torch.randn(shape, generator=generator) * 10).to(dtype)
    if tensor.dim() >= 2 and draw(st.booleans()):
        tensor = tensor.transpose(0, 1)  # a non-contiguous view
    return tensor


LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 2**64]),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    torch_tensors(),
    st.builds(Unpicklable, st.integers()),
)
NUMBERS = st.one_of(
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**400, float("nan"), float("-inf"), 1e300]),
    LEAVES,
    torch_tensors(),
)
OBJECTS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)
STATE_DICTS = st.dictionaries(st.text(max_size=16), torch_tensors(), max_size=5)
TORCH_OBJECTS = st.one_of(
    OBJECTS,
    STATE_DICTS,
    st.fixed_dictionaries(
        {"model_state_dict": STATE_DICTS},
        optional={"epoch": LEAVES, "loss": LEAVES, "optimizer_state_dict": OBJECTS},
    ),
    st.fixed_dictionaries({"state_dict": STATE_DICTS, "model": OBJECTS}),
)


def real_checkpoint() -> bytes:
    return saved(mlp_twin().state_dict())


REAL = real_checkpoint()
SAFETENSORS_HEAD = b"\x08" + 7 * b"\0" + b"{"
REAL_SAFETENSORS = save_safetensors(dict(mlp_twin().state_dict()))


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """A checkpoint file, whole or broken, or something else entirely."""
    kind = draw(
        st.sampled_from(
            [
                "real",
                "truncated",
                "truncated",
                "random",
                "torch",
                "torch",
                "training",
                "training",
                "training",
                "safetensors",
                "safetensors-bad",
                "empty",
            ]
        )
    )
    if kind == "training":  # real weights, anything for epoch and loss
        extra = draw(st.fixed_dictionaries({"epoch": NUMBERS}, optional={"loss": NUMBERS}))
        return saved({"model_state_dict": mlp_twin().state_dict(), **extra})
    if kind == "real":
        return draw(st.sampled_from([REAL, REAL_SAFETENSORS]))
    if kind == "truncated":
        whole = draw(st.sampled_from([REAL, REAL_SAFETENSORS, saved(draw(TORCH_OBJECTS))]))
        return whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
    if kind == "random":
        prefix = draw(
            st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x08" + 7 * b"\0" + b"{"])
        )
        return prefix + draw(st.binary(max_size=4096))
    if kind == "torch":
        return saved(draw(TORCH_OBJECTS))
    if kind == "safetensors-bad":
        data = bytearray(REAL_SAFETENSORS)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, min(len(data) - 1, 200)))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "safetensors":
        tensors = draw(st.dictionaries(VALID_NAME, torch_tensors(), max_size=4))
        tensors = {k: v.contiguous() for k, v in tensors.items() if v.dtype != torch.complex64}
        return save_safetensors(tensors)
    return b""


def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@dataclass
class SaveCase:
    messages: list[pb.SaveCheckpointRequest]
    name: str
    payload: bytes
    note: str
    broken: frozenset[str] = frozenset()


@st.composite
def save_cases(draw: st.DrawFn) -> SaveCase:
    """An upload (or snapshot) stream with a few of its parts broken (or none)."""
    parts = ["name", "metadata", "size", "sha", "source", "layout", "payload", "snapshot"]
    broken = draw(st.sets(st.sampled_from(parts), max_size=3))
    payload = (
        draw(payloads()) if "payload" in broken else draw(st.sampled_from([REAL, REAL_SAFETENSORS]))
    )
    sha = hashlib.sha256(payload).hexdigest()
    name = maybe(
        draw,
        broken,
        "name",
        names("fz-a", "r18-weights", "mlp-weights"),
        draw(st.sampled_from(["fz-a", "fz-b"])),
    )
    header = pb.SaveCheckpointHeader(
        name=name,
        overwrite=maybe(draw, broken, "overwrite", st.booleans(), True),
        metadata=maybe(
            draw,
            broken,
            "metadata",
            st.one_of(
                st.dictionaries(UNICODE, UNICODE, max_size=70),
                st.dictionaries(VALID_NAME, st.text(min_size=4090, max_size=5000), max_size=2),
            ),
            {"run": "fuzz"},
        ),
    )
    if "snapshot" in broken:
        header.snapshot.model = draw(names("r18", "mlp"))
        header.snapshot.version = draw(INT64)
    elif "source" not in broken:
        header.upload.size_bytes = maybe(
            draw, broken, "size", INT64, draw(st.sampled_from([0, len(payload)]))
        )
        header.upload.sha256 = maybe(
            draw,
            broken,
            "sha",
            st.one_of(st.just(sha.upper()), st.just("0" * 64), UNICODE),
            draw(st.sampled_from(["", sha])),
        )
    first = pb.SaveCheckpointRequest(header=header)
    chunks = [pb.SaveCheckpointRequest(chunk=c) for c in split(draw, payload)]
    layout = "normal"
    messages = [first, *chunks]
    if "layout" in broken:
        layout = draw(st.sampled_from(["no-header", "twice", "late", "header-only", "nothing"]))
        messages = {
            "no-header": chunks,
            "twice": [first, first, *chunks],
            "late": [*chunks[:1], first, *chunks[1:]],
            "header-only": [first],
            "nothing": [],
        }[layout]
    note = f"broken: {sorted(broken)}, layout {layout}, {len(payload)} bytes"
    return SaveCase(messages, name, payload, note, frozenset(broken))


def _wrong_sha_upload() -> SaveCase:
    """A valid checkpoint announced with another file's sha256: only the sha is wrong."""
    header = pb.SaveCheckpointHeader(
        name="wrong-sha", upload=pb.Upload(size_bytes=len(REAL), sha256="0" * 64)
    )
    messages = [
        pb.SaveCheckpointRequest(header=header),
        pb.SaveCheckpointRequest(chunk=REAL),
    ]
    return SaveCase(messages, "wrong-sha", REAL, "only the sha256 is wrong", frozenset({"sha"}))


@settings(FUZZ, max_examples=round(150 * SCALE))
@example(case=_wrong_sha_upload())
@given(case=save_cases())
def test_fuzz_save_checkpoint(fuzzed: Fuzzed, case: SaveCase) -> None:
    before = fuzzed.checkpoints()
    code, reply = fuzzed.call(
        f"SaveCheckpoint ({case.note})",
        lambda: fuzzed.stub.SaveCheckpoint(iter(case.messages), timeout=TIMEOUT),
    )
    after = fuzzed.checkpoints()
    if code == Code.OK:
        assert reply.name == case.name
        assert after == {**before, case.name: reply.sha256}
        header = case.messages[0].header
        if header.HasField("upload"):
            assert reply.sha256 == hashlib.sha256(case.payload).hexdigest()
            assert reply.size_bytes == len(case.payload)
    else:
        assert after == before, "a failed SaveCheckpoint changed the store"
    # An announced sha256 that the bytes sent do not have is never accepted.
    first = case.messages[0] if case.messages else pb.SaveCheckpointRequest()
    announced = first.header.upload.sha256 if first.header.HasField("upload") else ""
    sent = b"".join(m.chunk for m in case.messages[1:] if m.HasField("chunk"))
    if announced and announced.lower() != hashlib.sha256(sent).hexdigest():
        assert code != Code.OK, "an upload with a wrong sha256 was stored"
        if case.broken == {"sha"} and re.fullmatch(r"[0-9a-fA-F]{64}", announced):
            assert code == Code.DATA_LOSS, code
    fuzzed.check_all()


# LoadModel --------------------------------------------------------------------------

# Small builders only: one that cannot be built on the meta device is built for real.
IMAGE_ARCHITECTURES = ["resnet18", "alexnet", "squeezenet1_1", "mobilenet_v3_small"]
ARCHITECTURES = st.one_of(
    st.sampled_from([*IMAGE_ARCHITECTURES, "tiny_mlp", "broken"]),
    st.sampled_from(
        [
            "",
            "helpers.models:tiny_mlp",
            "os:system",
            "torch.nn.Linear",
            "../resnet18",
            "ResNet18",
            "resnet18 ",
            "__import__",
        ]
    ),
    UNICODE,
)
ARG_KEYS = st.one_of(
    st.sampled_from(
        [
            "num_classes",
            "features",
            "hidden",
            "classes",
            "dropout",
            "groups",
            "width_per_group",
            "zero_init_residual",
            "init_weights",
            "norm_layer",
            "block",
            "__class__",
            "self",
        ]
    ),
    UNICODE,
)
# Sizes stay small, or overflow at once: a builder argument of 10**9 would make
# a CPU fallback build allocate real gigabytes (see the report on LoadModel limits).
JSON_NUMBERS = st.one_of(
    st.integers(-3, 64),
    st.sampled_from([2**62, 2**63 - 1, 2**63, 2**64, 10**30]),
    st.floats(-1e3, 1e3),
    st.sampled_from([float("nan"), float("inf"), -0.0, 1e308]),
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), JSON_NUMBERS, st.text(max_size=12)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
ARG_TEXT = st.one_of(
    JSON_VALUES.map(json.dumps),
    st.sampled_from(
        ["", "ten", "{", "[1,", "'a'", "NaN", "None", "1_000", "0x10", "__import__('os')"]
    ),
    UNICODE,
)
DEVICES = st.one_of(
    st.sampled_from(
        ["", "cpu", "CPU", " cpu ", "cpu:0", "cpu:1", "cpu:-1", "auto", "cuda", "cuda:0", "cuda:9"]
    ),
    st.sampled_from(["meta", "mps", "xla", "hpu", "cpu,cuda", "cuda:-1", "cuda:99999999999"]),
    UNICODE,
)
LOAD_DTYPES = [
    pb.DATA_TYPE_UNSPECIFIED,
    pb.DATA_TYPE_FLOAT32,
    pb.DATA_TYPE_FLOAT16,
    pb.DATA_TYPE_BFLOAT16,
]
VERSIONS = st.one_of(st.sampled_from([1, 2, 2**63 - 1]), INT64)
DELAYS = st.one_of(st.sampled_from([2**62, 2**63 - 1, 2**53, 10**13]), st.integers(0, 5000), INT64)
# Never a real weights enum member: that would download weights from the internet.
NOT_WEIGHTS = UNICODE.filter(lambda s: not re.fullmatch(r"[A-Z0-9_]+", s))


@dataclass
class LoadCase:
    request: pb.LoadModelRequest
    note: str


BASES = [
    ("resnet18", {"num_classes": "10"}, "r18-weights"),
    ("tiny_mlp", {}, "mlp-weights"),
    ("tiny_mlp", {"features": "4"}, "mlp-general"),
    ("tiny_mlp", {"classes": "3"}, "mlp-safetensors"),
]


@st.composite
def load_cases(draw: st.DrawFn) -> LoadCase:
    """A valid LoadModel with a few of its fields broken (or none)."""
    parts = [
        "name",
        "architecture",
        "args",
        "checkpoint",
        "version",
        "version",  # twice as often: versions pile up and overflow
        "device",
        "dtype",
        "strict",
        "batch_size",
        "queue_delay",
        "queue_delay",
        "queue_delay",
        "queue_size",
        "weights",
        "channels_last",
    ]
    broken = draw(st.sets(st.sampled_from(parts), max_size=2))
    architecture, args, checkpoint = draw(st.sampled_from(BASES))
    request = pb.LoadModelRequest(
        name=maybe(draw, broken, "name", names("fz-m", "r18", "mlp"), "fz-m"),
        architecture=maybe(draw, broken, "architecture", ARCHITECTURES, architecture),
        checkpoint=maybe(
            draw,
            broken,
            "checkpoint",
            names("r18-weights", "mlp-weights", "mlp-general", "mlp-safetensors"),
            checkpoint,
        ),
        version=maybe(draw, broken, "version", VERSIONS, 0),
        device=maybe(draw, broken, "device", DEVICES, draw(st.sampled_from(["", "cpu"]))),
        dtype=maybe(draw, broken, "dtype", DTYPE_CODES, draw(st.sampled_from(LOAD_DTYPES))),
        weights=maybe(draw, broken, "weights", NOT_WEIGHTS, ""),
        channels_last=maybe(draw, broken, "channels_last", st.booleans(), False),
    )
    if "args" in broken:
        extra = draw(st.dictionaries(ARG_KEYS, ARG_TEXT, max_size=4))
        args = {**args, **extra} if draw(st.booleans()) else extra
    request.architecture_args.update(args)
    if "strict" in broken:
        request.strict = draw(st.booleans())
    if bool(broken & {"batch_size", "queue_delay", "queue_size"}) or draw(st.booleans()):
        batching = request.batching
        batching.max_batch_size = maybe(draw, broken, "batch_size", INT32, draw(st.integers(0, 8)))
        batching.max_queue_delay_us = maybe(
            draw, broken, "queue_delay", DELAYS, draw(st.integers(0, 5000))
        )
        batching.max_queue_size = maybe(draw, broken, "queue_size", INT32, draw(st.integers(0, 64)))
    return LoadCase(request, f"broken: {sorted(broken)}")


def probe_inputs(request: pb.LoadModelRequest) -> np.ndarray[Any, Any] | None:
    """An input a model loaded by `request` must accept, when the request implies one."""
    if request.architecture in IMAGE_ARCHITECTURES:
        return images(1, size=64, seed=11)
    if request.architecture == "tiny_mlp":
        try:
            features = json.loads(request.architecture_args.get("features", "4"))
        except json.JSONDecodeError:
            return None
        if isinstance(features, int) and not isinstance(features, bool) and 0 < features <= 64:
            return np.ones((1, features), np.float32)
    return None


def exercise(fuzz: Fuzzed, request: pb.LoadModelRequest, reply: pb.ModelInfo) -> None:
    """A freshly loaded model serves bursts of concurrent requests (its batcher works)."""
    x = probe_inputs(request)
    if x is None:
        return
    predict = pb.PredictRequest(
        model=reply.name, version=reply.version, inputs={"input": codec.from_numpy(x)}
    )
    burst = 6
    allowed = {Code.OK}
    if reply.batching.max_queue_size < burst:
        allowed.add(Code.RESOURCE_EXHAUSTED)  # a full queue may turn some away
    # The first request of a batch may wait max_queue_delay_us for others to join:
    # with a long one, a request may outlive its deadline (but no thread may die).
    patient = reply.batching.max_queue_delay_us <= 1_000_000
    event(f"exercised ({'short' if patient else 'long'} queue delay)")
    if not patient:
        allowed.add(Code.DEADLINE_EXCEEDED)
    outputs = []
    for _ in range(3 if patient else 1):
        calls = [
            fuzz.stub.Predict.future(predict, timeout=15 if patient else 3) for _ in range(burst)
        ]
        codes = [_code_of(call.result) for call in calls]
        assert set(codes) <= allowed, f"a loaded model fails valid Predicts: {codes}"
        outputs += [
            codec.to_numpy(call.result().outputs["output"])
            for call, code in zip(calls, codes, strict=True)
            if code == Code.OK
        ]
    if patient:
        assert outputs, "no valid Predict succeeded"
    fuzz.check_threads()
    if not outputs:
        return
    tol = TOLERANCE[reply.dtype]
    scale = max(1.0, float(np.abs(outputs[0]).max(initial=0)))
    for out in outputs[1:]:
        np.testing.assert_allclose(out, outputs[0], rtol=tol, atol=tol * scale)
    same_as_r18 = (
        request.architecture == "resnet18"
        and request.checkpoint == "r18-weights"
        and reply.dtype == pb.DATA_TYPE_FLOAT32
        and not reply.missing_keys
    )
    if same_as_r18:
        np.testing.assert_allclose(
            outputs[0], reference(fuzz.twins["r18"], x), rtol=1e-4, atol=1e-4
        )


@settings(FUZZ, max_examples=round(60 * SCALE), phases=NO_SHRINK)  # no shrinking: a
@given(cases=st.lists(load_cases(), min_size=1, max_size=3))  # hung model costs seconds
def test_fuzz_load_model(fuzzed: Fuzzed, cases: list[LoadCase]) -> None:
    loaded: list[tuple[str, int]] = []
    for case in cases:  # in sequence: versions pile up, names collide
        request = case.request
        code, reply = fuzzed.call(
            f"LoadModel ({case.note})",
            functools.partial(fuzzed.stub.LoadModel, request, timeout=TIMEOUT),
        )
        if code == Code.OK:
            assert reply.name == request.name
            assert request.version in (0, reply.version)
            loaded.append((reply.name, reply.version))
            exercise(fuzzed, request, reply)
        # ListModels must still describe every hosted version.
        listed = fuzzed.call(
            "ListModels", lambda: fuzzed.stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
        )
        assert listed[0] == Code.OK
    for name, version in loaded:
        unload = pb.UnloadModelRequest(name=name, version=version)
        assert fuzzed.stub.UnloadModel(unload, timeout=TIMEOUT).versions == [version]
    fuzzed.check_all()


# Open Inference Protocol and LoadModel with tokens -----------------------------------

INFERENCE_TOKEN, MANAGEMENT_TOKEN = "fuzz-inference", "fuzz-management"
# Who calls: mostly the management token (every request reaches its servicer), else no
# token or a wrong one (refused), or an inference token (refused management calls).
TOKENS = st.sampled_from(
    [MANAGEMENT_TOKEN, MANAGEMENT_TOKEN, MANAGEMENT_TOKEN, INFERENCE_TOKEN, "wrong", None]
)
GUARDED = DOCUMENTED | {Code.UNAUTHENTICATED, Code.PERMISSION_DENIED}
GUARDED_MAX_ELEMENTS = 1 << 16  # warm-ups the fuzzing asks for stay cheap


@dataclass
class Guarded:
    """A server with inference and management tokens, hosting "mlp" (tiny_mlp)."""

    server: Server
    channel: grpc.Channel
    stub: pb_grpc.ModelHostStub
    oip: oip_grpc.GRPCInferenceServiceStub
    thread_errors: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Guarded(server at {self.server.target})"

    def call(self, what: str, method: Any, request: Any, token: str | None) -> Code:
        """Calls `method` with `token`; asserts a documented answer; returns its code."""
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        try:
            method(request, timeout=TIMEOUT, metadata=metadata)
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            event(f"{what}: {code.name}")
            assert code in GUARDED, f"{what}: {code.name}: {error.details()}"
            return code
        event(f"{what}: OK")
        return Code.OK

    def check_serves(self) -> None:
        """No server thread died, and "mlp" answers ModelInfer with its twin's output."""
        assert self.thread_errors == [], f"server threads died: {self.thread_errors}"
        metadata = (("authorization", f"Bearer {INFERENCE_TOKEN}"),)
        reply = self.oip.ModelInfer(infer_request("mlp"), timeout=TIMEOUT, metadata=metadata)
        out = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(len(MLP_INPUT), -1)
        np.testing.assert_allclose(out, reference(mlp_twin(), MLP_INPUT), rtol=1e-4, atol=1e-4)

    def unload(self, name: str) -> None:
        """Unloads every version of `name`, if any is hosted."""
        request = oip.RepositoryModelUnloadRequest(model_name=name)
        self.call("cleanup", self.oip.RepositoryModelUnload, request, MANAGEMENT_TOKEN)


def infer_request(model: str, version: str = "") -> oip.ModelInferRequest:
    """A ModelInfer of MLP_INPUT."""
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=MLP_INPUT.shape
    )
    return oip.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=[tensor],
        raw_input_contents=[MLP_INPUT.tobytes()],
    )


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Guarded]:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        store=tmp_path / "guarded",
        device="cpu",
        architectures=list(TEST_ARCHITECTURES),
        token=INFERENCE_TOKEN,
        management_token=MANAGEMENT_TOKEN,
        max_tensor_elements=GUARDED_MAX_ELEMENTS,
    )
    admin_config = ChannelConfig(token=MANAGEMENT_TOKEN)
    with (
        running(settings) as server,
        ModelHostClient(server.target, config=admin_config, timeout=TIMEOUT) as admin,
        grpc.insecure_channel(server.target) as channel,
    ):
        serve(admin, "mlp", mlp_twin(), architecture="tiny_mlp", checkpoint="mlp-weights")
        fuzz = Guarded(
            server,
            channel,
            pb_grpc.ModelHostStub(channel),
            oip_grpc.GRPCInferenceServiceStub(channel),
        )
        with recording_thread_errors(fuzz.thread_errors):
            fuzz.check_serves()
            yield fuzz


Param = oip.ModelRepositoryParameter
# What str.isdigit() takes but int() refuses ("²") or reads ("٣", fullwidth "1"); over int64.
VERSION_TEXT = st.one_of(
    st.sampled_from(
        ["", "1", "2", "0", "01", "-1", "+1", " 1", "1 ", "1_0", "1.0", "0x1", "²", "٣", "\uff11"]
    ),
    st.sampled_from([str(2**63 - 1), str(2**63), str(2**64), "9" * 19, "9" * 20, "1" * 5000]),
    st.from_regex(r"-?[0-9]{1,25}", fullmatch=True),
    st.text(st.sampled_from("0123456789²³¹⁰①٣٤\uff11"), min_size=1, max_size=6),
    UNICODE,
)
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    JSON_NUMBERS,
    st.sampled_from([-(2**63) - 1, 2**63, 10**30, 1e400, -1e400]),
    VERSION_TEXT,
    st.text(max_size=12),
)
JSON_ANY = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
LOAD_KEYS = ["architecture", "checkpoint", "architecture_args", "device", "dtype", "version"]


def nested(depth: int, kind: str) -> str:
    """JSON text `depth` containers deep (past the recursion limit, or just below it)."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a": ' * depth + "1" + "}" * depth


DEEP_JSON = st.builds(
    nested,
    st.one_of(st.integers(1, 40), st.integers(900, 1100), st.sampled_from([3000, 100_000])),
    st.sampled_from(["list", "object"]),
)
# Over Python's int max str digits (4300): json.loads raises ValueError.
HUGE_NUMBERS = st.sampled_from(["9" * 5000, "[-" + "9" * 4400 + "]", '{"a": ' + "9" * 5000 + "}"])
JSON_TEXT = st.one_of(
    JSON_ANY.map(json.dumps),
    DEEP_JSON,
    st.sampled_from(["", "{", "[1,", "{'a': 1}", "NaN"]),
    HUGE_NUMBERS,
    UNICODE,
)
PARAMETER_VALUES = st.one_of(
    JSON_ANY,
    st.fixed_dictionaries({"string_value": JSON_ANY}),
    st.fixed_dictionaries(
        {"string_value": st.sampled_from(["tiny_mlp", "mlp-weights", "cpu", "float16", "1"])}
    ),
)
CONFIGS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.just("fz"), JSON_ANY),
        "max_batch_size": JSON_ANY,
        "dynamic_batching": st.one_of(
            JSON_ANY,
            st.fixed_dictionaries(
                {},
                optional={
                    "max_queue_delay_microseconds": JSON_ANY,
                    "preferred_batch_size": JSON_ANY,
                },
            ),
        ),
        "parameters": st.one_of(
            JSON_ANY,
            st.dictionaries(
                st.one_of(st.sampled_from(LOAD_KEYS), st.text(max_size=8)),
                PARAMETER_VALUES,
                max_size=4,
            ),
        ),
    },
)
CONFIG_TEXT = st.one_of(CONFIGS.map(json.dumps), JSON_TEXT)
# Each key with values of every type: the right one (string, or int64 for a version)
# carrying anything, and the wrong ones.
REPOSITORY_PARAMETERS = st.dictionaries(
    st.one_of(st.sampled_from([*LOAD_KEYS, "config", "file:1/model.pt"]), UNICODE),
    st.one_of(
        st.builds(Param, string_param=st.one_of(VERSION_TEXT, JSON_TEXT)),
        st.builds(Param, string_param=CONFIG_TEXT),
        st.builds(Param, int64_param=INT64),
        st.builds(Param, bool_param=st.booleans()),
        st.builds(Param, bytes_param=st.binary(max_size=64)),
        st.just(Param()),
    ),
    max_size=4,
)
OIP_MODELS = st.one_of(st.sampled_from(["mlp", "fz", "nope"]), TRICKY_NAMES, UNICODE)


@dataclass
class OipCase:
    method: str
    request: Any
    token: str | None


@st.composite
def oip_cases(draw: st.DrawFn) -> OipCase:
    """One OIP call with a hostile version, parameters or config (or none)."""
    method = draw(
        st.sampled_from(
            [
                "ModelInfer",
                "ModelReady",
                "ModelMetadata",
                "ModelConfig",
                "ModelStatistics",
                "RepositoryModelLoad",
                "RepositoryModelLoad",
                "RepositoryModelLoad",
                "RepositoryModelUnload",
            ]
        )
    )
    name, version = draw(OIP_MODELS), draw(VERSION_TEXT)
    # Loads and unloads never touch "mlp": check_serves needs it as it is.
    other = "fz" if name == "mlp" else name
    request: Any
    if method == "ModelInfer":
        request = infer_request(name, version)
    elif method == "RepositoryModelLoad":
        parameters = draw(REPOSITORY_PARAMETERS)
        if draw(st.booleans()):
            parameters["config"] = Param(string_param=draw(CONFIG_TEXT))
        if draw(st.booleans()):
            parameters["architecture_args"] = Param(string_param=draw(JSON_TEXT))
        if draw(st.booleans()):  # something to load, so the config and the rest matter
            parameters.setdefault("architecture", Param(string_param="tiny_mlp"))
            parameters.setdefault("checkpoint", Param(string_param="mlp-weights"))
        request = oip.RepositoryModelLoadRequest(model_name=other, parameters=parameters)
    elif method == "RepositoryModelUnload":
        parameters = draw(REPOSITORY_PARAMETERS)
        if draw(st.booleans()):
            parameters["version"] = draw(
                st.one_of(
                    st.builds(Param, string_param=VERSION_TEXT),
                    st.builds(Param, int64_param=INT64),
                    st.builds(Param, bool_param=st.booleans()),
                )
            )
        request = oip.RepositoryModelUnloadRequest(model_name=other, parameters=parameters)
    else:
        request_type = getattr(oip, f"{method}Request")
        request = request_type(name=name, version=version)
    return OipCase(method, request, draw(TOKENS))


def repository_load(config: str) -> oip.RepositoryModelLoadRequest:
    """A RepositoryModelLoad of tiny_mlp as "fz" with `config`."""
    parameters = {
        "architecture": Param(string_param="tiny_mlp"),
        "checkpoint": Param(string_param="mlp-weights"),
        "config": Param(string_param=config),
    }
    return oip.RepositoryModelLoadRequest(model_name="fz", parameters=parameters)


@settings(FUZZ, max_examples=round(100 * SCALE))
@given(case=oip_cases())
# Bugs this found (each answered INTERNAL): versions str.isdigit() takes but int()
# refuses, configs nested past the recursion limit, a preferred_batch_size that is no list.
@example(OipCase("ModelInfer", infer_request("mlp", "²"), MANAGEMENT_TOKEN))
@example(OipCase("RepositoryModelLoad", repository_load(nested(3000, "list")), MANAGEMENT_TOKEN))
@example(
    OipCase(
        "RepositoryModelLoad",
        repository_load('{"dynamic_batching": {"preferred_batch_size": 4}}'),
        MANAGEMENT_TOKEN,
    )
)
def test_fuzz_oip(guarded: Guarded, case: OipCase) -> None:
    """Hostile version strings, RepositoryModelLoad parameters and configs: never
    INTERNAL or UNKNOWN, with any token or none."""
    method = getattr(guarded.oip, case.method)
    code = guarded.call(case.method, method, case.request, case.token)
    if code == Code.OK and case.method == "RepositoryModelLoad":
        guarded.unload(case.request.model_name)
    guarded.check_serves()


WARMUP_SHAPES = st.one_of(
    SHAPES,
    st.sampled_from(
        [
            [2**40, 12],
            [2**40, 4],
            [2**62, 2**62],
            [2**63 - 1],
            [GUARDED_MAX_ELEMENTS // 4 + 1, 4],
            [GUARDED_MAX_ELEMENTS // 4, 4],
            [1] * 100,
        ]
    ),
    st.lists(st.integers(1, 8), min_size=1, max_size=3).map(lambda dims: [*dims, 4]),
)
HOSTILE_ARGS = st.dictionaries(
    st.one_of(st.sampled_from(["features", "hidden", "classes"]), ARG_KEYS),
    st.one_of(ARG_TEXT, JSON_TEXT, DEEP_JSON, HUGE_NUMBERS),
    max_size=3,
)


@dataclass
class HostileLoad:
    request: pb.LoadModelRequest
    token: str | None


@st.composite
def hostile_loads(draw: st.DrawFn) -> HostileLoad:
    """A LoadModel of tiny_mlp with a hostile warm-up shape and/or builder arguments."""
    request = tiny_load()
    broken = draw(st.sets(st.sampled_from(["warmup", "args"]), min_size=1))
    if "warmup" in broken:
        request.warmup_shape.extend(draw(WARMUP_SHAPES))
        request.batching.max_batch_size = draw(st.integers(0, 8))
    if "args" in broken:
        request.architecture_args.update(draw(HOSTILE_ARGS))
    return HostileLoad(request, draw(TOKENS))


def tiny_load(**fields: Any) -> pb.LoadModelRequest:
    """A LoadModel of tiny_mlp as "fz", with `fields`."""
    return pb.LoadModelRequest(
        name="fz", architecture="tiny_mlp", checkpoint="mlp-weights", **fields
    )


@settings(FUZZ, max_examples=round(60 * SCALE))
@given(case=hostile_loads())
# Bugs this found (each answered INTERNAL): builder arguments nested past the recursion
# limit, or holding an integer of over 4300 digits.
@example(
    HostileLoad(tiny_load(architecture_args={"features": nested(3000, "list")}), MANAGEMENT_TOKEN)
)
@example(HostileLoad(tiny_load(architecture_args={"features": "9" * 5000}), MANAGEMENT_TOKEN))
def test_fuzz_load_model_hostile(guarded: Guarded, case: HostileLoad) -> None:
    """Warm-up shapes of any size and builder arguments of any JSON (or none): never
    INTERNAL or UNKNOWN, with any token or none."""
    code = guarded.call("LoadModel", guarded.stub.LoadModel, case.request, case.token)
    if code == Code.OK:
        guarded.unload("fz")
    guarded.check_serves()


def _all_methods() -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every method of both services."""
    services = [
        pb.DESCRIPTOR.services_by_name["ModelHost"],
        oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    ]
    return [
        (f"/{service.full_name}/{method.name}", method.client_streaming, method.server_streaming)
        for service in services
        for method in service.methods
    ]


@settings(FUZZ, max_examples=round(100 * SCALE))
@given(
    method=st.sampled_from(_all_methods()),
    bodies=st.lists(st.binary(max_size=256), min_size=1, max_size=3),
    token=TOKENS,
)
def test_fuzz_undecodable_bodies(
    guarded: Guarded, method: tuple[str, bool, bool], bodies: list[bytes], token: str | None
) -> None:
    """Message bytes of any kind, most not protobuf at all, sent to every method.

    Needs the request gate (undecodable bodies answer INVALID_ARGUMENT); without it,
    grpc answers these with UNKNOWN or INTERNAL.
    """
    path, client_streaming, server_streaming = method
    kind = {
        (False, False): guarded.channel.unary_unary,
        (True, False): guarded.channel.stream_unary,
        (False, True): guarded.channel.unary_stream,
        (True, True): guarded.channel.stream_stream,
    }[(client_streaming, server_streaming)]
    call = kind(path, request_serializer=None, response_deserializer=None)

    def run(request: Any, **kwargs: Any) -> None:
        reply = call(iter(bodies) if client_streaming else bodies[0], **kwargs)
        if server_streaming:
            for _ in reply:
                pass

    guarded.call(path.rsplit("/", 1)[1], run, None, token)
    guarded.check_serves()


# Minimal reproducers of bugs the fuzzing found --------------------------------------


def test_regression_zero_size_tensor_with_overflowing_shape(fuzzed: Fuzzed) -> None:
    """[0, 2**62, 2**62] has no elements, so the byte length (0) matches, but torch
    cannot lay the shape out: the server answered INTERNAL."""
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[0, 2**62, 2**62], data=b"")
    request = pb.PredictRequest(model="mlp", inputs={"input": tensor})
    assert _code_of(lambda: fuzzed.stub.Predict(request, timeout=TIMEOUT)) in DOCUMENTED | {Code.OK}
    fuzzed.check_all()


def test_regression_version_overflow(fuzzed: Fuzzed) -> None:
    """Version 2**63-1, then "next version": 2**63 does not fit ModelInfo.version. The
    load answered INTERNAL yet registered the version, and every later ListModels
    answered INTERNAL."""
    load = pb.LoadModelRequest(
        name="big", architecture="tiny_mlp", checkpoint="mlp-weights", version=2**63 - 1
    )
    fuzzed.stub.LoadModel(load, timeout=TIMEOUT)
    load.version = 0
    assert _code_of(lambda: fuzzed.stub.LoadModel(load, timeout=TIMEOUT)) in DOCUMENTED
    fuzzed.stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
    fuzzed.check_all()


@pytest.mark.parametrize("epoch", [2**64, float("nan"), float("inf")])
def test_regression_general_checkpoint_epoch_out_of_range(fuzzed: Fuzzed, epoch: float) -> None:
    """A training checkpoint whose "epoch" is not an int64 (2**64, nan, inf): the upload
    answered INTERNAL; with 2**64 it was stored anyway, and ListCheckpoints answered
    INTERNAL from then on (even after a restart: the entry is on disk)."""
    data = saved({"model_state_dict": mlp_twin().state_dict(), "epoch": epoch})
    header = pb.SaveCheckpointHeader(name="odd-epoch", upload=pb.Upload())
    stream = [pb.SaveCheckpointRequest(header=header), pb.SaveCheckpointRequest(chunk=data)]
    code = _code_of(lambda: fuzzed.stub.SaveCheckpoint(iter(stream), timeout=TIMEOUT))
    assert code == Code.OK or code in DOCUMENTED, code
    fuzzed.stub.ListCheckpoints(pb.ListCheckpointsRequest(), timeout=TIMEOUT)
    fuzzed.check_all()


def test_regression_huge_queue_delay_kills_the_batcher(fuzzed: Fuzzed) -> None:
    """max_queue_delay_us=2**62 is accepted, but a batch that waits for it overflows
    Condition.wait: the batcher thread dies and every later Predict on the model hangs.

    A long delay may make a lone request wait (that is what it asks for), but a
    request that fills a whole batch runs at once, and no thread may die.
    """
    load = pb.LoadModelRequest(
        name="slow",
        architecture="tiny_mlp",
        checkpoint="mlp-weights",
        batching=pb.BatchingConfig(max_batch_size=4, max_queue_delay_us=2**62),
    )
    code = _code_of(lambda: fuzzed.stub.LoadModel(load, timeout=TIMEOUT))
    if code != Code.OK:  # refusing the setting is a fix too, if it says why
        assert code == Code.INVALID_ARGUMENT, code
        return
    one_row = pb.PredictRequest(model="slow", inputs={"input": codec.from_numpy(MLP_INPUT[:1])})
    for _ in range(3):
        calls = [fuzzed.stub.Predict.future(one_row, timeout=5) for _ in range(8)]
        assert {_code_of(call.result) for call in calls} <= {Code.OK, Code.DEADLINE_EXCEEDED}
    x = np.concatenate([MLP_INPUT, MLP_INPUT[:1]])  # 4 rows: a full batch
    full = pb.PredictRequest(model="slow", inputs={"input": codec.from_numpy(x)})
    reply = fuzzed.stub.Predict(full, timeout=15)
    np.testing.assert_allclose(
        codec.to_numpy(reply.outputs["output"]),
        reference(fuzzed.twins["mlp"], x),
        rtol=1e-4,
        atol=1e-4,
    )
    fuzzed.check_all()
