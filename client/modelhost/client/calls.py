"""Request building and response parsing shared by the sync and the asyncio client."""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict, TypeVar, cast

from modelhost.client import codec, wire
from modelhost.client.errors import DataLossError
from modelhost.client.types import CheckpointInfo, TopClass
from modelhost.v1 import modelhost_pb2 as pb

DEFAULT_CHUNK_BYTES = 2 << 20
SINGLE_INPUT = "input"
SINGLE_OUTPUT = "output"

T = TypeVar("T")

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes in all; 0 when unknown) as a transfer proceeds."""

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | Mapping[str, Any]


def channel_options(max_message_bytes: int = -1) -> list[tuple[str, Any]]:
    """gRPC channel options used by both clients: the server enforces the limits."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.lb_policy_name", "round_robin"),
    ]


def serialize_source(source: Source) -> tuple[Iterator[memoryview], int]:
    """The bytes of a checkpoint source, as chunks of any size, and the total size."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return _read_file(path), path.stat().st_size
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        return iter([view]), view.nbytes
    if isinstance(source, Mapping):
        import torch

        buffer = io.BytesIO()
        torch.save(source, buffer)
        view = buffer.getbuffer()
        return iter([view]), view.nbytes
    if hasattr(source, "state_dict"):
        raise TypeError("pass model.state_dict(), not the module itself")
    raise TypeError(f"cannot upload a {type(source).__name__}: pass a path, bytes or a dict")


def _read_file(path: Path, block: int = 8 << 20) -> Iterator[memoryview]:
    with path.open("rb") as file:
        while data := file.read(block):
            yield memoryview(data)


class WireStub:
    """The calls whose large messages the clients write or read themselves (see `wire`).

    Like the generated stub, it works on a blocking or an asyncio channel.
    """

    def __init__(self, channel: Any) -> None:
        service = "/modelhost.v1.ModelHost/"
        self.SaveCheckpoint = channel.stream_unary(
            service + "SaveCheckpoint",
            request_serializer=wire.passthrough,
            response_deserializer=pb.CheckpointInfo.FromString,
        )
        self.DownloadCheckpoint = channel.unary_stream(
            service + "DownloadCheckpoint",
            request_serializer=pb.DownloadCheckpointRequest.SerializeToString,
            response_deserializer=wire.chunk_parser(pb.DownloadCheckpointResponse.FromString),
        )
        self.Predict = channel.unary_unary(
            service + "Predict",
            request_serializer=wire.passthrough,
            response_deserializer=pb.PredictResponse.FromString,
        )


class Prefetch(Iterator[T]):
    """Runs `source` on a thread of its own, up to `depth` items ahead of the consumer.

    An upload reads, hashes and frames the next chunks while gRPC sends the current
    one. `close()` (also on exhaustion or error) stops the thread.
    """

    def __init__(self, source: Iterator[T], depth: int = 4) -> None:
        self._queue: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(
            target=self._run, args=(source,), name="modelhost-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put((True, item)):
                    return
        except BaseException as error:  # handed to the consumer
            self._put((False, error))
            return
        self._put((False, None))

    def _put(self, entry: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        if self._ended:
            raise StopIteration
        has_item, value = self._queue.get()
        if has_item:
            return cast(T, value)
        self.close()
        if value is not None:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stops the producer thread; further items are dropped."""
        self._ended = True
        self._stop.set()


class Upload:
    """The request stream of an upload; hashes what it sends so the reply can be checked.

    Iterating gives the serialized requests: the header, then the chunks.
    """

    def __init__(
        self,
        name: str,
        source: Source,
        *,
        metadata: Mapping[str, str] | None,
        overwrite: bool,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        progress: Progress | None = None,
    ) -> None:
        self._blocks, self.size = serialize_source(source)
        self._header = pb.SaveCheckpointHeader(
            name=name,
            metadata=dict(metadata or {}),
            overwrite=overwrite,
            upload=pb.Upload(size_bytes=self.size),
        )
        self._chunk_bytes = chunk_bytes
        self._progress = progress
        self._sha256 = hashlib.sha256()

    def __iter__(self) -> Iterator[bytes]:
        yield pb.SaveCheckpointRequest(header=self._header).SerializeToString()
        sent = 0
        for block in self._blocks:
            for start in range(0, block.nbytes, self._chunk_bytes):
                chunk = block[start : start + self._chunk_bytes]
                self._sha256.update(chunk)
                sent += chunk.nbytes
                yield wire.chunk_message(chunk)
                if self._progress:
                    self._progress(sent, self.size)

    def verify(self, reply: pb.CheckpointInfo) -> CheckpointInfo:
        """Checks the server stored exactly what was sent."""
        if reply.sha256 != self._sha256.hexdigest():
            raise DataLossError(
                f"checkpoint {reply.name!r}: server stored sha256 {reply.sha256}, "
                f"sent {self._sha256.hexdigest()}"
            )
        return CheckpointInfo.from_proto(reply)


def snapshot_request(
    model: str, checkpoint: str, version: int | None, overwrite: bool
) -> list[pb.SaveCheckpointRequest]:
    """The one-message stream that asks the server to save a hosted model."""
    header = pb.SaveCheckpointHeader(
        name=checkpoint,
        overwrite=overwrite,
        snapshot=pb.Snapshot(model=model, version=version or 0),
    )
    return [pb.SaveCheckpointRequest(header=header)]


class Download:
    """Receives a DownloadCheckpoint stream into a file (`dest`) or memory."""

    def __init__(self, dest: str | os.PathLike[str] | None, progress: Progress | None = None):
        self.dest = Path(dest) if dest is not None else None
        self.info: pb.CheckpointInfo | None = None
        self._progress = progress
        self._sha256 = hashlib.sha256()
        self._received = 0
        self._buffer = io.BytesIO()
        self._part = self.dest.with_name(self.dest.name + ".part") if self.dest else None
        self._file = self._part.open("wb") if self._part else None

    def feed(self, message: pb.DownloadCheckpointResponse | memoryview) -> None:
        """Takes the next message of the stream (a chunk may come as a view)."""
        if isinstance(message, memoryview):
            chunk: bytes | memoryview = message
        elif message.HasField("info"):
            self.info = message.info
            return
        else:
            chunk = message.chunk  # each access copies
        self._sha256.update(chunk)
        self._received += len(chunk)
        (self._file or self._buffer).write(chunk)
        if self._progress:
            self._progress(self._received, self.info.size_bytes if self.info else 0)

    def abort(self) -> None:
        """Removes the partial file after a failed stream."""
        if self._file:
            self._file.close()
        if self._part:
            self._part.unlink(missing_ok=True)

    def finish(self) -> Path | Any:
        """Verifies the checksum; returns the file's path, or the loaded checkpoint."""
        info = self.info
        if info is None or info.sha256 != self._sha256.hexdigest():
            self.abort()
            expected = info.sha256 if info else "(no header)"
            raise DataLossError(
                f"download: sha256 {self._sha256.hexdigest()} does not match {expected}"
            )
        if self._file and self._part and self.dest:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._part.replace(self.dest)
            return self.dest
        return load_checkpoint_bytes(self._buffer.getvalue(), info.format)


def load_checkpoint_bytes(data: bytes, fmt: int) -> Any:
    """Loads downloaded bytes safely: safetensors, or torch.load(weights_only=True)."""
    if fmt == pb.CHECKPOINT_FORMAT_SAFETENSORS:
        from safetensors.torch import load

        return load(data)
    if fmt in (pb.CHECKPOINT_FORMAT_STATE_DICT, pb.CHECKPOINT_FORMAT_GENERAL_CHECKPOINT):
        import torch

        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    raise ValueError("this checkpoint cannot be loaded safely in memory; pass dest= to save it")


class LoadOptions(TypedDict, total=False):
    """Optional arguments of `load_model`, shared by both clients.

    - version: version to register (default: next). device: "cpu", "cuda", "cuda:N".
    - dtype: "float32" | "float16" | "bfloat16" for the weights.
    - architecture_args: builder keyword arguments, e.g. {"num_classes": 10}.
    - strict: require exact key match (default True).
    - weights: torchvision pretrained weights (e.g. "IMAGENET1K_V1") instead of a checkpoint.
    - batching: {"max_batch_size", "max_queue_delay_us", "max_queue_size",
      "preferred_batch_size"}.
    - channels_last, autocast ("float16" | "bfloat16"), compile ("default", "reduce-overhead",
      "max-autotune"), warmup_shape (e.g. (8, 3, 224, 224)).
    - preprocessing: {"resize", "crop", "mean", "std"} or {"weights": "IMAGENET1K_V1"}, for
      uint8 and JPEG/PNG inputs. labels: class names for top_k answers.
    - timeout: deadline of this call in seconds.
    """

    version: int | None
    device: str | None
    dtype: str | None
    architecture_args: Mapping[str, Any] | None
    strict: bool
    weights: str | None
    batching: Mapping[str, int] | None
    channels_last: bool
    autocast: str | None
    compile: str
    warmup_shape: Sequence[int]
    preprocessing: Mapping[str, Any] | None
    labels: Sequence[str]
    timeout: float | None


def load_request(
    name: str, architecture: str, checkpoint: str, options: LoadOptions
) -> pb.LoadModelRequest:
    """Builds a LoadModelRequest; builder arguments travel as JSON literals."""
    unknown = set(options) - set(LoadOptions.__annotations__)
    if unknown:
        raise TypeError(f"load_model got unexpected arguments {sorted(unknown)}")
    dtype, autocast = options.get("dtype"), options.get("autocast")
    preprocessing = options.get("preprocessing")
    return pb.LoadModelRequest(
        name=name,
        architecture=architecture,
        architecture_args={
            k: json.dumps(v) for k, v in (options.get("architecture_args") or {}).items()
        },
        checkpoint=checkpoint,
        version=options.get("version") or 0,
        device=options.get("device") or "",
        dtype=codec.parse_dtype(dtype) if dtype else pb.DATA_TYPE_UNSPECIFIED,
        strict=options.get("strict", True),
        batching=pb.BatchingConfig(**(options.get("batching") or {})),
        weights=options.get("weights") or "",
        channels_last=options.get("channels_last", False),
        preprocessing=pb.ImagePreprocessing(**preprocessing) if preprocessing else None,
        labels=options.get("labels", ()),
        warmup_shape=options.get("warmup_shape", ()),
        compile=options.get("compile", ""),
        autocast=codec.parse_dtype(autocast) if autocast else pb.DATA_TYPE_UNSPECIFIED,
    )


ImageSource = str | os.PathLike[str] | bytes


class PredictCall:
    """Encodes Predict inputs and decodes the outputs into the caller's kind of tensor."""

    def __init__(
        self,
        model: str,
        inputs: Any,
        version: int | None,
        *,
        images: Sequence[ImageSource] | None = None,
        top_k: int = 0,
    ) -> None:
        self.single = not isinstance(inputs, Mapping)
        named = {} if inputs is None else {SINGLE_INPUT: inputs} if self.single else dict(inputs)
        if not named and not images:
            raise ValueError("predict needs inputs or images")
        if named and images:
            raise ValueError("predict takes inputs or images, not both")
        self.as_torch = bool(named) and codec.is_torch(next(iter(named.values())))
        self.top_k = top_k
        self.payload = wire.predict_request(
            model,
            version or 0,
            {key: codec.raw(value) for key, value in named.items()},
            [_image_bytes(image) for image in images or ()],
            top_k,
        )

    @property
    def request(self) -> pb.PredictRequest:
        """The request as a message (the call itself sends `payload`, its serialized form)."""
        return pb.PredictRequest.FromString(self.payload)

    def result(self, response: pb.PredictResponse) -> Any:
        """With top_k, the top classes per row; else one array for one input and one
        output, or a dict of them by output name."""
        if self.top_k:
            return [_top_classes(row) for row in response.top_k]
        outputs = {
            key: codec.to_torch(tensor).clone() if self.as_torch else codec.to_numpy(tensor)
            for key, tensor in response.outputs.items()
        }
        if self.single and set(outputs) == {SINGLE_OUTPUT}:
            return outputs[SINGLE_OUTPUT]
        return outputs


def _top_classes(row: pb.TopClasses) -> list[TopClass]:
    labels = list(row.labels) or [""] * len(row.indices)
    return [TopClass(i, s, n) for i, s, n in zip(row.indices, row.scores, labels, strict=True)]


def _image_bytes(image: ImageSource) -> bytes:
    if isinstance(image, bytes):
        return image
    return Path(image).read_bytes()
