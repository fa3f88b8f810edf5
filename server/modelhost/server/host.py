"""The server's core: store, catalog and registry, and the operations the service exposes.

Everything here speaks domain types and raises domain errors; `service` turns
requests into calls of these methods and errors into gRPC statuses. Blocking work
(file I/O, hashing, model loading) runs on executors, never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from modelhost.client import codec
from modelhost.server import formats
from modelhost.server.architectures import ArchitectureCatalog, parse_args
from modelhost.server.batching import Batcher, BatchPolicy, Finish, Lane, preferred_batch_size
from modelhost.server.devices import resolve_device
from modelhost.server.errors import (
    ChecksumMismatch,
    InvalidArgument,
    InvalidInput,
    LimitExceeded,
    ModelHostFailure,
    ModelNotFound,
    ShuttingDown,
)
from modelhost.server.images import Preprocessing
from modelhost.server.inference import Answer, Runner, encode_answer, top_classes
from modelhost.server.loading import LoadedModule, LoadRequest, LoadSpec, load_module
from modelhost.server.metrics import Metrics
from modelhost.server.names import check_name
from modelhost.server.registry import HostedModel, Registry
from modelhost.server.settings import Settings
from modelhost.server.store import CheckpointRecord, CheckpointStore, Contents, PendingWrite
from modelhost.v1 import modelhost_pb2 as pb

log = logging.getLogger(__name__)

HOSTED_STATE = "hosted-models"
PINNED = "loaded_checkpoint"  # a restore record entry's key: the bytes it loaded
SPOOL_CHUNKS = 8
MAX_BATCH_SIZE = 1 << 16
MAX_QUEUE_SIZE = 1 << 20
MAX_QUEUE_DELAY_US = 60_000_000
MAX_METADATA_ENTRIES = 64
MAX_METADATA_BYTES = 4096
_LOAD_DTYPES = {pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16}
COMPILE_MODES = {"", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"}


class Host:
    """Owns the store, the architecture catalog and the registry of hosted models."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = CheckpointStore(
            settings.store,
            max_checkpoint_bytes=settings.max_checkpoint_bytes,
            direct_io=settings.direct_io,
        )
        self.store.recover()
        self.catalog = ArchitectureCatalog(settings.architectures)
        self.registry = Registry()
        self.metrics = Metrics()
        self.metrics.watch(self.registry)
        self.default_device = resolve_device(settings.device, "auto")
        self._io = ThreadPoolExecutor(4, thread_name_prefix="io")
        self._loads = ThreadPoolExecutor(settings.load_workers, thread_name_prefix="load")
        self._prep = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="prep")
        # All CPU tensor work of predictions runs on this one thread (see batching.py).
        self._cpu_lane = Lane("cpu", shared=True)
        self._closing = False
        self._unsafe = settings.allow_pickled_models
        # Restore record entries not hosted (yet): kept in the record, with the reason.
        self._unrestored: dict[tuple[str, int], tuple[dict[str, Any], str]] = {}
        self._recorded: Any = None  # the restore record as last read or written

    # Checkpoints

    async def save_upload(
        self, header: pb.SaveCheckpointHeader, chunks: AsyncIterator[bytes | memoryview]
    ) -> CheckpointRecord:
        """Streams an upload into the store; nothing is visible unless all of it is valid."""
        name, metadata = self._check_header(header)
        limit = self.settings.max_checkpoint_bytes
        if limit and header.upload.size_bytes > limit:
            raise LimitExceeded(
                f"the upload announces {header.upload.size_bytes} bytes; the limit is {limit} "
                "bytes (max_checkpoint_bytes)"
            )
        loop = asyncio.get_running_loop()
        with self.store.begin() as pending:
            await self._spool(chunks, pending)
            expected = header.upload.size_bytes
            if expected and pending.size != expected:
                raise InvalidArgument(
                    f"upload announced {expected} bytes but sent {pending.size}; nothing stored"
                )
            await loop.run_in_executor(self._io, pending.finish)
            wanted = header.upload.sha256.lower()
            if wanted and wanted != pending.sha256:
                raise ChecksumMismatch(
                    f"upload has sha256 {pending.sha256}, announced {wanted}; nothing stored"
                )
            contents = await loop.run_in_executor(
                self._io, lambda: formats.inspect(pending.path, allow_pickled=self._unsafe)
            )
            record = await self._commit(pending, name, contents, metadata, header.overwrite)
        self.metrics.checkpoint_bytes.labels("in").inc(record.size_bytes)
        return record

    async def _spool(
        self, chunks: AsyncIterator[bytes | memoryview], pending: PendingWrite
    ) -> None:
        """Hashes and writes chunks in order on an I/O thread while the next ones arrive.

        Up to SPOOL_CHUNKS chunks wait in memory: reading never stops for a write, so
        HTTP/2 flow control does not stall the sender. On any failure the write in
        flight finishes before the caller discards the file.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | memoryview | None] = asyncio.Queue(maxsize=SPOOL_CHUNKS)
        failures: list[BaseException] = []
        inflight: list[asyncio.Future[Any]] = []

        async def write() -> None:
            while (chunk := await queue.get()) is not None:
                if failures:
                    continue  # drain, so the reader never blocks on a full queue
                inflight[:] = [loop.run_in_executor(self._io, pending.write, chunk)]
                try:
                    await inflight[0]
                except Exception as error:
                    failures.append(error)

        writer: asyncio.Future[Any] = asyncio.create_task(write())
        try:
            async for chunk in chunks:
                if failures:
                    break
                await queue.put(chunk)
            await queue.put(None)
            await writer
        except BaseException:
            writer.cancel()
            await asyncio.wait([writer, *inflight])
            raise
        if failures:
            raise failures[0]

    async def save_snapshot(self, header: pb.SaveCheckpointHeader) -> CheckpointRecord:
        """Saves a hosted model's state_dict (on the CPU, in its served dtype)."""
        name, metadata = self._check_header(header)
        model = check_name(header.snapshot.model, "model")
        loop = asyncio.get_running_loop()
        with self.registry.lease(model, header.snapshot.version) as hosted:
            metadata = {
                "snapshot_of": f"{hosted.name}:{hosted.version}",
                "architecture": hosted.spec.architecture,
                **metadata,
            }
            with self.store.begin() as pending:
                count = await loop.run_in_executor(self._io, _save_state_dict, hosted, pending)
                await loop.run_in_executor(self._io, pending.finish)
                contents = Contents(formats.STATE_DICT, count)
                return await self._commit(pending, name, contents, metadata, header.overwrite)

    def _check_header(self, header: pb.SaveCheckpointHeader) -> tuple[str, dict[str, str]]:
        name = check_name(header.name, "checkpoint")
        metadata = dict(header.metadata)
        if len(metadata) > MAX_METADATA_ENTRIES:
            raise InvalidArgument(f"metadata has {len(metadata)} entries; the limit is 64")
        for key, value in metadata.items():
            size = len(key.encode()) + len(value.encode())  # UTF-8 bytes, not characters
            if size > MAX_METADATA_BYTES:
                raise InvalidArgument(
                    f"metadata entry {key!r:.80} is {size} bytes (UTF-8); "
                    f"the limit is {MAX_METADATA_BYTES}"
                )
        self.store.check_free(name, header.overwrite)
        return name, metadata

    async def _commit(
        self,
        pending: PendingWrite,
        name: str,
        contents: Contents,
        metadata: dict[str, str],
        overwrite: bool,
    ) -> CheckpointRecord:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._io,
            lambda: self.store.commit(
                pending, name, contents, metadata=metadata, overwrite=overwrite
            ),
        )

    async def download(self, name: str) -> AsyncIterator[CheckpointRecord | bytes]:
        """The checkpoint's record, then its bytes in chunks."""
        loop = asyncio.get_running_loop()
        with self.store.open(check_name(name, "checkpoint")) as (record, file):
            yield record
            sent = self.metrics.checkpoint_bytes.labels("out")
            while chunk := await loop.run_in_executor(
                self._io, file.read, self.settings.chunk_bytes
            ):
                sent.inc(len(chunk))
                yield chunk

    def list_checkpoints(self) -> list[CheckpointRecord]:
        return self.store.list()

    def get_checkpoint(self, name: str) -> CheckpointRecord:
        return self.store.get(check_name(name, "checkpoint"))

    def delete_checkpoint(self, name: str) -> None:
        self.store.delete(check_name(name, "checkpoint"))

    # Models

    async def load_model(
        self, request: LoadRequest, pinned: CheckpointRecord | None = None
    ) -> HostedModel:
        """Builds, loads and registers a model version; the newest serves at once.

        `pinned` (a restore) loads those bytes rather than what the checkpoint name holds
        now. With `restore`, the record is written before the version serves: if that
        fails (a full store), the version is thrown away and nothing has changed.
        """
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        spec = self._load_spec(request)
        policy = self._policy(request)
        version = self.registry.reserve(spec.name, request.version)
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._loads, self._build, spec, version, policy, request, pinned)
        try:
            hosted = await asyncio.shield(job)
        except asyncio.CancelledError:  # the caller left: finish, then throw it away
            job.add_done_callback(lambda _: self.registry.cancel(spec.name, version))
            job.add_done_callback(_discard_load)
            raise
        except BaseException:
            self.registry.cancel(spec.name, version)
            raise
        try:
            self._record_hosted(adding=hosted)
        except BaseException:
            self.registry.cancel(spec.name, version)
            await asyncio.to_thread(hosted.retire)
            raise
        self.registry.put(hosted)
        self._unrestored.pop((spec.name, version), None)
        self.metrics.load_seconds.labels(spec.name).observe(hosted.loaded.seconds)
        log.info(
            "serving %s version %d (%s from %s on %s, %.2fs)",
            spec.name,
            version,
            spec.architecture,
            spec.checkpoint or spec.weights,
            hosted.loaded.device,
            hosted.loaded.seconds,
        )
        return hosted

    def _load_spec(self, request: LoadRequest) -> LoadSpec:
        if request.dtype not in _LOAD_DTYPES | {pb.DATA_TYPE_UNSPECIFIED}:
            raise InvalidArgument(
                f"dtype {codec.dtype_name(request.dtype)} cannot hold weights: "
                "use float32, float16 or bfloat16"
            )
        if request.version < 0:
            raise InvalidArgument(f"version {request.version} is negative")
        if request.compile not in COMPILE_MODES:
            raise InvalidArgument(
                f"compile mode {request.compile!r} is not one of {sorted(COMPILE_MODES)}"
            )
        if request.autocast not in {pb.DATA_TYPE_UNSPECIFIED, *_LOAD_DTYPES}:
            raise InvalidArgument(
                f"autocast {codec.dtype_name(request.autocast)}: use float16 or bfloat16"
            )
        shape = f"warmup_shape {list(request.warmup_shape)!s:.100}"
        if any(dim < 1 for dim in request.warmup_shape):
            raise InvalidArgument(f"{shape} must be positive")
        elements = functools.reduce(int.__mul__, request.warmup_shape, 1)
        if elements > self.settings.max_tensor_elements:
            raise InvalidArgument(
                f"{shape} has {elements} elements; the limit is "
                f"{self.settings.max_tensor_elements} (max_tensor_elements)"
            )
        if bool(request.checkpoint) == bool(request.weights):
            raise InvalidArgument("LoadModel needs either a checkpoint or pretrained weights")
        return LoadSpec(
            name=check_name(request.name, "model"),
            architecture=request.architecture,
            args=parse_args(request.architecture_args),
            checkpoint=check_name(request.checkpoint, "checkpoint") if request.checkpoint else "",
            device=resolve_device(request.device, str(self.default_device)),
            dtype=codec.torch_dtype(request.dtype) if request.dtype else None,
            strict=request.strict,
            weights=request.weights,
            channels_last=request.channels_last,
        )

    def _policy(self, request: LoadRequest) -> BatchPolicy:
        s = self.settings
        policy = BatchPolicy(
            max_batch_size=request.max_batch_size or s.max_batch_size,
            max_queue_delay_us=request.max_queue_delay_us or s.max_queue_delay_us,
            max_queue_size=request.max_queue_size or s.max_queue_size,
            preferred_batch_size=request.preferred_batch_size,
        )
        for field, value, limit in (
            ("max_batch_size", policy.max_batch_size, MAX_BATCH_SIZE),
            ("max_queue_size", policy.max_queue_size, MAX_QUEUE_SIZE),
            ("max_queue_delay_us", policy.max_queue_delay_us + 1, MAX_QUEUE_DELAY_US + 1),
        ):
            if not 1 <= value <= limit:
                raise InvalidArgument(
                    f"batching {field}={getattr(policy, field)} is outside its range "
                    f"(at most {limit})"
                )
        if not 0 <= policy.preferred_batch_size <= policy.max_batch_size:
            raise InvalidArgument(
                f"batching preferred_batch_size={policy.preferred_batch_size} must be between 0 "
                f"and max_batch_size ({policy.max_batch_size})"
            )
        return policy

    def _build(
        self,
        spec: LoadSpec,
        version: int,
        policy: BatchPolicy,
        request: LoadRequest,
        pinned: CheckpointRecord | None,
    ) -> HostedModel:
        """Loads, wraps and warms up a model version (on a load thread)."""
        loaded = load_module(
            spec, self.store, self.catalog, allow_pickled=self._unsafe, pinned=pinned
        )
        if any(s.shape and s.shape[0] != -1 for s in loaded.inputs):
            policy = dataclasses.replace(policy, max_batch_size=1)  # a fixed batch size
        runner = Runner(
            loaded.module,
            loaded.device,
            loaded.dtype,
            loaded.inputs,
            channels_last=spec.channels_last,
            preprocessing=self._preprocessing(spec, request, loaded),
            autocast=codec.torch_dtype(request.autocast) if request.autocast else None,
            compile_mode=request.compile,
            max_image_pixels=self.settings.max_image_pixels,
            max_elements=self.settings.max_tensor_elements,
        )
        lane = self._cpu_lane if loaded.device.type == "cpu" else Lane(f"{spec.name}-{version}")
        if request.warmup_shape:
            measure = policy.max_batch_size > 1 and not policy.preferred_batch_size
            warm_up = functools.partial(runner.warm_up, measure=measure)
            rates = lane.call(warm_up, request.warmup_shape).result()
            if rates:
                preferred = preferred_batch_size(rates, policy.max_batch_size)
                policy = dataclasses.replace(policy, preferred_batch_size=preferred)
                log.info(
                    "%s: rows/s by batch size %s; preferred batch size %s",
                    spec.name,
                    {rows: round(rate, 1) for rows, rate in rates.items()},
                    preferred or "-",
                )
        categories = loaded.weights_meta.get("categories", [])
        return HostedModel(
            name=spec.name,
            version=version,
            spec=spec,
            loaded=loaded,
            runner=runner,
            batcher=Batcher(
                runner.run,
                policy,
                lane,
                observe=self.metrics.batch_observer(spec.name, version),
                on_error=self.metrics.batch_errors.labels(spec.name, str(version)).inc,
            ),
            loaded_at=time.time(),
            labels=list(request.labels or categories),
            request=dataclasses.replace(request, version=version),
        )

    def _preprocessing(
        self, spec: LoadSpec, request: LoadRequest, loaded: LoadedModule
    ) -> Preprocessing | None:
        wanted = request.preprocessing
        if wanted is not None and wanted.weights:
            member, _ = self.catalog.get(spec.architecture).pretrained(wanted.weights)
            return Preprocessing.from_weights(member, wanted.weights)
        if wanted is None and spec.weights:
            try:
                return Preprocessing.from_weights(loaded.weights_meta["weights"], spec.weights)
            except InvalidArgument:
                return None  # e.g. detection weights: the model resizes by itself
        return wanted

    async def unload_model(self, name: str, version: int = 0) -> list[int]:
        """Removes versions from routing, lets their requests finish, frees them.

        With `restore`, the record is written first: if that fails, nothing is removed.
        Versions the record holds but that were not restored are dropped from it too.
        """
        name = check_name(name, "model")
        forgotten = [key for key in self._unrestored if key[0] == name and version in (0, key[1])]
        try:
            leaving = self.registry.select(name, version)
        except ModelNotFound:
            if not forgotten:
                raise
            leaving = []
        self._record_hosted(removing=leaving, forgetting=forgotten)
        for key in forgotten:
            self._unrestored.pop(key, None)
        removed = self.registry.remove(name, version) if leaving else []
        await asyncio.gather(*(asyncio.to_thread(hosted.retire) for hosted in removed))
        log.info("unloaded %s versions %s", name, [h.version for h in removed])
        return sorted({hosted.version for hosted in removed} | {v for _, v in forgotten})

    def get_model(self, name: str, version: int = 0) -> HostedModel:
        """The version asked for (0: the newest); NOT_FOUND says why one was not restored."""
        name = check_name(name, "model")
        try:
            return self.registry.get(name, version)
        except ModelNotFound as error:
            reasons = [
                f"version {v} was not restored: {reason}"
                for (n, v), (_, reason) in sorted(self._unrestored.items())
                if n == name and version in (0, v)
            ]
            if reasons:
                raise ModelNotFound(f"{error}; " + "; ".join(reasons)) from None
            raise

    # Inference

    async def predict(
        self,
        model: str,
        version: int,
        inputs: Mapping[str, codec.TensorFields],
        timeout: float | None,
        *,
        images: Sequence[bytes] = (),
        top_k: int = 0,
    ) -> tuple[HostedModel, Answer]:
        """Runs a hosted model through its batcher; images are preprocessed off the loop."""
        if top_k < 0:
            raise InvalidArgument(f"top_k must not be negative, got {top_k}")
        self.check_request_size(len(inputs), len(images))
        elements = sum(_element_count(name, tensor) for name, tensor in inputs.items())
        if elements > self.settings.max_tensor_elements:
            raise LimitExceeded(
                f"the request has {elements} tensor elements; the limit is "
                f"{self.settings.max_tensor_elements} (max_tensor_elements)"
            )
        deadline = time.monotonic() + timeout if timeout is not None else None
        loop = asyncio.get_running_loop()
        with self.registry.lease(check_name(model, "model"), version) as hosted:
            runner = hosted.runner
            if images or (runner.preprocessing and _has_uint8(inputs)):
                if runner.device.type == "cpu":  # CPU tensor work stays on the CPU lane
                    job = self._cpu_lane.call(runner.prepare, inputs, images)
                    prepared = await asyncio.wrap_future(job)
                else:
                    prepared = await loop.run_in_executor(
                        self._prep, runner.prepare, inputs, images
                    )
            else:
                prepared = runner.prepare(inputs)
            finish: Finish
            if top_k:
                finish = functools.partial(top_classes, k=top_k, labels=hosted.labels)
            else:
                finish = functools.partial(encode_answer, float_dtype=prepared.out_dtype)
            future = hosted.batcher.submit(prepared.tensors, deadline, finish)
            answer = await asyncio.wrap_future(future)
        return hosted, answer

    def is_hosted(self, name: str) -> bool:
        """Whether any version of `name` is hosted."""
        return bool(self.registry.versions(name))

    def unrestored(self) -> list[tuple[dict[str, Any], str]]:
        """Recorded versions that are not serving (not restored, or not yet), with why."""
        return [self._unrestored[key] for key in sorted(self._unrestored)]

    def check_request_size(self, inputs: int, images: int) -> None:
        """Refuses a Predict request with more inputs or images than the settings allow."""
        for count, what, setting in (
            (inputs, "input tensors", "max_request_inputs"),
            (images, "images", "max_request_images"),
        ):
            limit = getattr(self.settings, setting)
            if count > limit:
                raise LimitExceeded(
                    f"the request has {count} {what}; the limit is {limit} ({setting})"
                )

    # Lifecycle

    def _record_hosted(
        self,
        adding: HostedModel | None = None,
        removing: Sequence[HostedModel] = (),
        forgetting: Collection[tuple[str, int]] = (),
    ) -> None:
        """With `restore`, writes into the store what is hosted, how it was loaded and
        the checkpoint bytes it loaded (pinned there), as it is once `adding` serves and
        `removing` and `forgetting` are gone. Versions not restored (yet) stay in it."""
        if not self.settings.restore or self._closing:
            return
        hosted = [*self.registry.all(), *([adding] if adding else [])]
        entries = {(h.name, h.version): _record_entry(h) for h in hosted}
        for key, (entry, _) in self._unrestored.items():
            entries.setdefault(key, entry)
        leaving = {(h.name, h.version) for h in removing} | set(forgetting)
        kept = json.loads(json.dumps([entries[k] for k in sorted(entries) if k not in leaving]))
        if kept == self._recorded:
            return  # e.g. a version restored as recorded: nothing to write (on a full disk)
        pins = {sha for entry in kept if (sha := _pinned_sha(entry))}
        self.store.write_state(HOSTED_STATE, kept, pins)
        self._recorded = kept

    async def restore(self) -> list[str]:
        """Loads again what the store records as hosted; returns "name:version" of each.

        Each version loads the checkpoint bytes it loaded before (a record written
        before those were recorded: what the checkpoint name holds now). One that fails
        is logged and stays in the record, the others still come up: GetModel says why,
        a later start retries it (say, once its bytes are uploaded again), and
        UnloadModel drops it.
        """
        state = self._recorded = self.store.read_state(HOSTED_STATE) or []
        entries = [entry for entry in state if isinstance(entry, dict)]
        pending = "the server is still restoring"
        self._unrestored = {_key(entry): (entry, pending) for entry in entries}
        restored = []
        for entry in entries:
            key = _key(entry)
            if key not in self._unrestored:
                continue  # a client loaded or unloaded that version meanwhile
            try:
                fields = {k: v for k, v in entry.items() if k != PINNED}
                pinned = CheckpointRecord(**entry[PINNED]) if entry.get(PINNED) else None
                hosted = await self.load_model(LoadRequest.from_dict(fields), pinned)
            except Exception as error:
                known = isinstance(error, ModelHostFailure)
                reason = str(error) if known else f"{type(error).__name__}: {error}"
                log.error("could not restore %s version %d: %s", *key, reason, exc_info=not known)
                if key in self._unrestored:
                    self._unrestored[key] = (entry, reason)
                continue
            restored.append(f"{hosted.name}:{hosted.version}")
        log.info("restored %d model versions: %s", len(restored), ", ".join(restored) or "-")
        return restored

    async def close(self) -> None:
        """Unloads every model (the restore record stays as it was) and stops the executors."""
        self._closing = True
        for hosted in self.registry.all():
            await self.unload_model(hosted.name, hosted.version)
        self._loads.shutdown(wait=True, cancel_futures=True)
        self._prep.shutdown(wait=True)
        self._cpu_lane.close()
        self._io.shutdown(wait=True)
        self.store.close()


def _record_entry(hosted: HostedModel) -> dict[str, Any]:
    """A restore record entry: the LoadModel request and the checkpoint bytes it loaded."""
    entry = dataclasses.asdict(hosted.request)
    if hosted.loaded.record is not None:
        loaded = dataclasses.replace(hosted.loaded.record, metadata={})
        entry[PINNED] = dataclasses.asdict(loaded)
    return entry


def _key(entry: dict[str, Any]) -> tuple[str, int]:
    version = entry.get("version")
    return str(entry.get("name")), version if isinstance(version, int) else 0


def _pinned_sha(entry: dict[str, Any]) -> str | None:
    loaded = entry.get(PINNED)
    sha = loaded.get("sha256") if isinstance(loaded, dict) else None
    return sha if isinstance(sha, str) else None


def _save_state_dict(hosted: HostedModel, pending: PendingWrite) -> int:
    state = {
        key: tensor.detach().cpu() for key, tensor in hosted.loaded.module.state_dict().items()
    }
    torch.save(state, pending)  # type: ignore[arg-type]
    return len(state)


def _discard_load(job: Future[Any] | asyncio.Future[Any]) -> None:
    if not job.cancelled() and job.exception() is None:
        hosted: HostedModel = job.result()
        hosted.retire()


def _element_count(name: str, tensor: codec.TensorFields) -> int:
    try:
        return codec.element_count(tensor, what=f"input {name!r}")
    except codec.TensorError as error:
        raise InvalidInput(str(error)) from None


def _has_uint8(inputs: Mapping[str, codec.TensorFields]) -> bool:
    return any(t.dtype == pb.DATA_TYPE_UINT8 for t in inputs.values())
