"""Model lifecycle: a LoadRequest -> a checked spec and batching policy -> a built,
warmed-up `HostedModel` in the registry; unloading; restoring at start.

The newest version of a name serves as soon as it is registered; unloading takes a
version out of routing at once and frees it once its requests are done. With
`--restore`, the record (restore.py) is written before either takes effect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from modelhost.server.activations import measure
from modelhost.server.architectures import ArchitectureCatalog
from modelhost.server.batching import Batcher, BatchPolicy, Lane, LanePool, preferred_batch_size
from modelhost.server.cache import ROOM_WAIT_SECONDS, ModelCache, NoRoomInTime
from modelhost.server.devices import Workspace, resolve_device
from modelhost.server.errors import (
    DeviceFailed,
    InvalidArgument,
    ModelHostFailure,
    ModelNotFound,
    Refused,
    ShuttingDown,
)
from modelhost.server.hosted import STORE, HostedModel, Served, stays_resident
from modelhost.server.images import Preprocessing
from modelhost.server.inference import InputSpec, Runner, fixed_batch, uses_cuda_graphs
from modelhost.server.load_checks import (
    batch_policy,
    check_label_count,
    check_request,
    check_warmup_fits,
)
from modelhost.server.loading import (
    PROBE_SIZES,
    WEIGHT_DTYPES,
    LoadedModule,
    LoadRequest,
    LoadSpec,
    load_module,
    planned,
    probe_shape,
    probe_skeleton,
    require_bytes,
)
from modelhost.server.metrics import Metrics
from modelhost.server.names import check_name
from modelhost.server.registry import Registry
from modelhost.server.restore import RestoreRecord
from modelhost.server.rows_check import mixes_rows, rows_policy
from modelhost.server.settings import (
    Settings,
)
from modelhost.server.store import CheckpointRecord, CheckpointStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class Models:
    """Loads, unloads and restores the hosted model versions."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: CheckpointStore,
        catalog: ArchitectureCatalog,
        registry: Registry,
        metrics: Metrics,
        record: RestoreRecord,
        cache: ModelCache,
        cpu_lane: Lane,
        loads: Executor,
        prep: Executor,
        compiles: Executor | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.record = record
        self.cache = cache
        cache.rebuild = self._rebuild
        self.default_device = resolve_device(settings.device, "auto")
        if self.default_device.type == "cuda":  # its budget from what is free at start
            cache.limit(self.default_device)
        self._store = store
        self._catalog = catalog
        self._metrics = metrics
        self._cpu_lane = cpu_lane
        self._gpu_lanes: dict[str, LanePool] = {}
        self._lanes_lock = threading.Lock()
        self._loads = loads
        self._prep = prep
        # Told when a load meets a failed device (host.py: health turns NOT_SERVING).
        self.on_device_failure: Callable[[DeviceFailed], Awaitable[None]] | None = None
        self._compiles = compiles
        self._closing = False
        # Record writes (an fsync: on a thread, off the event loop) and the registry
        # changes they record happen in the order they were asked for.
        self._commits = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()  # clean-up for callers that left
        # Store work that may wait for the store's lock (up to LOCK_WAIT while another
        # replica holds it): holds, let-gos, record writes. On threads of its own, so
        # request parsing and token looks (asyncio's default threads) never queue behind
        # it (red team 14, F6: eight LoadModels waiting for the lock stalled every request
        # over 1 MiB, and a revoked token's refusal, for 30 s).
        self._store_work = ThreadPoolExecutor(4, thread_name_prefix="modelhost-store")
        # Freeing unloaded versions: `retire` waits for the batch its callers left, if one
        # runs, then frees (a collection, when a cycle holds the module). Not on asyncio's
        # threads either (review 17, 1: unloads of versions whose callers had left held
        # them for as long as those batches ran).
        self._frees = ThreadPoolExecutor(2, thread_name_prefix="modelhost-free")

    async def load(
        self, request: LoadRequest, loaded_from: CheckpointRecord | None = None
    ) -> HostedModel:
        """Builds, loads and registers a model version; the newest serves at once.

        `loaded_from` (a restore) loads those bytes rather than what the checkpoint name holds
        now. With `restore`, the record is written before the version serves: if that
        fails (a full store), the version is thrown away and nothing has changed.
        """
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        started = time.perf_counter()
        spec = check_request(request, self.settings, self.default_device)
        # The bytes this load reads are held from before they are read: a DeleteCheckpoint
        # meanwhile must not take bytes it may be paged in from again. The version takes
        # the hold over once registered (if it may be paged in from them), else it is let go.
        if loaded_from is not None or spec.checkpoint:
            loaded_from = await self._hold(spec.checkpoint, loaded_from)
        try:
            hosted = await self._build_and_commit(spec, request, loaded_from)
        except DeviceFailed as failure:  # a warm-up or probe met a lost device context
            if self.on_device_failure is not None:
                await self.on_device_failure(failure)
            raise
        hosted.load_seconds = time.perf_counter() - started
        self._metrics.load_seconds.labels(spec.name).observe(hosted.load_seconds)
        log.info(
            "serving %s version %d (%s from %s on %s: weights in %.2fs, ready in %.2fs)",
            spec.name,
            hosted.version,
            spec.architecture,
            spec.checkpoint or spec.weights,
            hosted.loaded.device,
            hosted.loaded.seconds,
            hosted.load_seconds,
        )
        return hosted

    async def _hold(self, checkpoint: str, record: CheckpointRecord | None) -> CheckpointRecord:
        """Holds `record`'s bytes, or those `checkpoint` names now (DATA_LOSS if they are
        gone); returns what is held. A caller that leaves meanwhile (the hold may wait for
        the store's lock) leaves nothing held."""
        job = asyncio.ensure_future(self._on_store_thread(self._hold_bytes, checkpoint, record))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(self._let_go_if_held)
            raise

    def _on_store_thread(self, work: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`work(*args)` on the store's threads (see `_store_work`)."""
        return _on(self._store_work, work, *args)

    def _let_go_if_held(self, job: asyncio.Future[CheckpointRecord]) -> None:
        if not job.cancelled() and job.exception() is None:
            self._in_background(self._let_go(job.result().sha256))

    def _hold_bytes(self, checkpoint: str, record: CheckpointRecord | None) -> CheckpointRecord:
        if record is None:
            record = self._store.get(checkpoint)
            self._store.blob_path(record)
        self._store.hold(record.sha256)
        return record

    async def _let_go(self, sha256: str) -> None:
        """Lets go of a hold ("": none), even if the caller leaves meanwhile."""
        if sha256:
            await asyncio.shield(self._on_store_thread(self._store.let_go, sha256))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs clean-up nobody waits for (a caller that left); a failure is logged."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_background)

    async def _build_and_commit(
        self, spec: LoadSpec, request: LoadRequest, loaded_from: CheckpointRecord | None
    ) -> HostedModel:
        """Builds and registers a version; the hold on `loaded_from`'s bytes becomes the
        version's or is let go, however this ends (a caller that leaves included)."""
        held = loaded_from.sha256 if loaded_from else ""
        try:
            version = self.registry.reserve(spec.name, request.version)
        except BaseException:
            await self._let_go(held)
            raise
        loop = asyncio.get_running_loop()
        left = threading.Event()
        # A load whose caller has left stops waiting for room, and claims none (red team 16, F6).
        room = functools.partial(self._make_room, (spec.name, version), spec.device, left=left)
        build = functools.partial(self._build, spec, version, request, loaded_from, room)
        job = loop.run_in_executor(self._loads, build)
        try:
            hosted = await asyncio.shield(job)
        except asyncio.CancelledError:  # the caller left: finish, then throw it away
            left.set()
            job.add_done_callback(lambda _: self._forget(spec.name, version))
            job.add_done_callback(_discard_load)
            # The build may read the bytes on: held until it ends (never, if it hangs).
            job.add_done_callback(lambda _: self._in_background(self._let_go(held)))
            raise
        except BaseException:
            self._forget(spec.name, version)
            await self._let_go(held)
            raise
        # Once the record is being written the load goes through, even if the caller left.
        await _to_the_end(self._commit_load(hosted, held))
        return hosted

    async def _commit_load(self, hosted: HostedModel, held: str) -> None:
        """Records a built version, then registers it, with the hold on its bytes if it may
        be paged in from them (else that hold is let go); throws it away if the record
        cannot be written."""
        assert hosted.pages_in_from in ("", held)
        key = (hosted.name, hosted.version)
        async with self._commits:
            try:
                await self._on_store_thread(self.record.write, [*self.registry.all(), hosted])
            except BaseException:
                self._forget(*key)
                await _on(self._frees, hosted.retire)
                await self._let_go(held)
                raise
            self.cache.touch(hosted)
            self._register(hosted)
            self.cache.unreserve(key)  # from now on it counts as resident
        if not hosted.pages_in_from:
            await self._let_go(held)

    def _forget(self, name: str, version: int) -> None:
        """A load that will not register: its version number and device room go back."""
        self.registry.cancel(name, version)
        self.cache.unreserve((name, version))

    def _make_room(
        self,
        key: tuple[str, int],
        device: torch.device,
        nbytes: int,
        *,
        left: threading.Event,
    ) -> None:
        """Reserves a LoadModel's room on its device, waiting up to ROOM_WAIT_SECONDS while
        busy versions hold it, or until its caller has `left`."""
        try:
            self.cache.reserve(
                key,
                device,
                nbytes,
                deadline=time.monotonic() + ROOM_WAIT_SECONDS,
                caller_gone=left.is_set,
            )
        except NoRoomInTime as error:  # the server's wait, not the caller's deadline
            raise error.waited_too_long() from None

    def _room_now(self, hosted: HostedModel, nbytes: int) -> None:
        """A first page-in's room (a version registered at restart knows its weights, not
        yet its workspace): taken at once or not at all, never waited for on the device's
        page-in thread (red team 14, F5). Without room, the bytes it asked for are kept as
        its size: its requests wait off that thread (NoRoomInTime) and the next page-in
        reserves them all before it builds."""
        key = (hosted.name, hosted.version)
        # Never less than the page-in reserved (weights and the workspace learnt): the
        # weights' room asked first must not give the workspace's back meanwhile.
        wanted = max(nbytes, hosted.device_bytes)
        try:
            self.cache.reserve(
                key, hosted.spec.device, wanted, deadline=time.monotonic(), asks_again=True
            )
        except NoRoomInTime:
            hosted.workspace_bytes = max(
                hosted.workspace_bytes, nbytes - hosted.loaded.device_bytes
            )
            raise

    def _rebuild(self, hosted: HostedModel) -> torch.nn.Module:
        """A version's module loaded again from the bytes it was loaded from (a page-in
        from the store tier; the cache has reserved its room)."""
        if not hosted.built:  # registered at restart: built in full the first time
            built = self._build(
                hosted.spec,
                hosted.version,
                hosted.request,
                hosted.loaded.record,
                room=functools.partial(self._room_now, hosted),
            )
            hosted.take_over(built)
            assert built.loaded.module is not None
            return built.loaded.module
        loaded = load_module(
            hosted.spec,
            self._store,
            self._catalog,
            allow_pickled=self.settings.allow_pickled_models,
            loaded_from=hosted.loaded.record,
        )
        assert loaded.module is not None
        return loaded.module

    def _build(
        self,
        spec: LoadSpec,
        version: int,
        request: LoadRequest,
        loaded_from: CheckpointRecord | None,
        room: Callable[[int], None],
    ) -> HostedModel:
        """Loads, wraps and warms up a model version (on a load or page-in thread); `room`
        reserves its bytes on the device (a LoadModel's `_make_room`, a first page-in's
        `_room_now`)."""
        settings = self.settings
        loaded = load_module(
            spec,
            self._store,
            self._catalog,
            allow_pickled=settings.allow_pickled_models,
            loaded_from=loaded_from,
            make_room=room,
        )
        assert loaded.module is not None
        policy = batch_policy(request, settings)
        if fixed_batch(loaded.inputs):
            policy = dataclasses.replace(policy, max_batch_size=1)  # a fixed batch size
        lane = self._lane(loaded.device)
        runner = Runner(
            loaded.module,
            loaded.device,
            loaded.dtype,
            loaded.inputs,
            channels_last=spec.channels_last,
            preprocessing=self._preprocessing(spec, request, loaded),
            autocast=request.autocast,
            compile_mode=request.compile,
            max_image_pixels=settings.max_image_pixels,
            max_elements=settings.max_tensor_elements,
            max_detection_bytes=settings.max_detection_bytes,
            max_predict_bytes=settings.max_predict_bytes,
            stream=lane.stream,
            compiler=self._compiles,
            on_compiled=self._metrics.compile_observer(spec.name),
        )
        try:
            _check_one_image_fits(runner, loaded.inputs)
            probed = probe_skeleton(self._catalog, spec, loaded.inputs, loaded.dtype)
            runner.outputs, runner.activations = probed.outputs, probed.activations
            return self._finish_build(
                spec, version, policy, request, loaded=loaded, runner=runner, lane=lane, room=room
            )
        except BaseException:
            lane.release()  # a GPU lane counts one version fewer
            raise

    def _lane(self, device: torch.device) -> Lane:
        """The lane a new version on `device` runs on: the shared CPU lane, or one of the
        device's GPU lanes (its thread and stream, shared with the fewest versions)."""
        if device.type == "cpu":
            return self._cpu_lane
        with self._lanes_lock:
            pool = self._gpu_lanes.get(str(device))
            if pool is None:
                pool = self._gpu_lanes[str(device)] = LanePool(
                    str(device),
                    self.settings.gpu_lanes,
                    lambda name: Lane(name, stream=torch.cuda.Stream(device)),
                )
        return pool.take()

    def _finish_build(
        self,
        spec: LoadSpec,
        version: int,
        policy: BatchPolicy,
        request: LoadRequest,
        *,
        loaded: LoadedModule,
        runner: Runner,
        lane: Lane,
        room: Callable[[int], None],
    ) -> HostedModel:
        """Finds the outputs, warms up and wraps a built version (on a load thread); counts
        the workspace the warm-up needed against the device's budget (`room`): on a GPU
        the allocator's peak around it, on the CPU the estimate for its largest batch."""
        assert loaded.module is not None
        check_label_count(request.labels, runner.outputs)  # before a warm-up is spent
        check_warmup_fits(request.warmup_shape, runner.inputs)
        if _compiles_first(loaded.device, request):
            # Compiling takes seconds to minutes: done before the measured warm-up, which
            # holds the device's measurements, and not counted (it is not serving's need).
            runner.warm_up(request.warmup_shape, first_here=True)
        workspace = Workspace(loaded.module, loaded.device)
        with workspace:
            policy = self._warm_up(
                spec, policy, request, runner=runner, lane=lane, inputs=loaded.inputs
            )
        workspace_bytes = workspace.bytes
        if loaded.device.type == "cpu" and request.warmup_shape:
            estimated = runner.estimated_bytes(request.warmup_shape)
            workspace_bytes = workspace.bytes if estimated is None else estimated
        if workspace_bytes:
            room(loaded.device_bytes + workspace_bytes)
        categories = loaded.weights_meta.get("categories", [])
        check_label_count(request.labels, runner.outputs)  # outputs the warm-up found
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
                observe=self._metrics.batch_observer(spec.name, version),
                on_error=self._metrics.batch_errors.labels(spec.name, str(version)).inc,
                on_split=self._metrics.batch_splits.labels(spec.name, str(version)).inc,
                join=runner.join,
                adopt=runner.adopt,
                launch=runner.launch
                if runner.asynchronous and self.settings.gpu_pipelining
                else None,
                max_elements=runner.batch_elements(self.settings.max_tensor_elements),
                vectors_are_rows=bool(runner.inputs),  # declared: checked, rows first
            ),
            prep=self._prep,
            loaded_at=time.time(),
            labels=list(request.labels or categories),
            request=dataclasses.replace(request, version=version),
            cache=self.cache,
            workspace_bytes=workspace_bytes,
        )

    def _warm_up(
        self,
        spec: LoadSpec,
        policy: BatchPolicy,
        request: LoadRequest,
        *,
        runner: Runner,
        lane: Lane,
        inputs: list[InputSpec],
    ) -> BatchPolicy:
        """Finds the outputs by running, or warms up; returns the policy with the preferred
        batch size the warm-up measured."""
        # Compiling takes seconds to minutes: it runs on this load thread, not on the lane
        # the other versions on the device run on (CUDA graphs must be captured on their
        # lane's thread and stream).
        compiles_here = bool(request.compile) and not uses_cuda_graphs(
            runner.device, request.compile
        )
        if runner.is_detection:
            if len(inputs) == 1 and not runner.outputs and not request.warmup_shape:
                _outputs_by_running(runner, lane, inputs[0], spec.name)
        elif inputs and runner.activations is None:
            _measure_by_running(runner, lane, inputs, request.warmup_shape)
            _check_measured(runner, spec.name)
        if runner.activations is not None:
            log.info("%s: activations %s", spec.name, runner.activations.describe())
        if policy.max_batch_size > 1 and not runner.is_detection and self._user_code(spec):
            found = mixes_rows(runner, lane, inputs, request.warmup_shape)
            policy = rows_policy(found, policy, request, spec.name)
        if not request.warmup_shape:
            return policy
        measure = policy.max_batch_size > 1 and not policy.preferred_batch_size
        rates = runner.warm_up(
            request.warmup_shape,
            measure=measure,
            on_lane=lambda run: lane.call(run).result(),
            first_here=compiles_here,
        )
        if rates:
            preferred = preferred_batch_size(rates, policy.max_batch_size)
            policy = dataclasses.replace(policy, preferred_batch_size=preferred)
            log.info(
                "%s: rows/s by batch size %s; preferred batch size %s",
                spec.name,
                {rows: round(rate, 1) for rows, rate in rates.items()},
                preferred or "-",
            )
        return policy

    def _user_code(self, spec: LoadSpec) -> bool:
        """Whether the module is the user's code (not a torchvision architecture, whose
        rows are independent in eval mode)."""
        return not spec.architecture or self._catalog.get(spec.architecture).source != "torchvision"

    def _preprocessing(
        self, spec: LoadSpec, request: LoadRequest, loaded: LoadedModule
    ) -> Preprocessing | None:
        wanted = request.preprocessing
        if wanted is not None and wanted.weights:
            member, _ = self._catalog.get(spec.architecture).pretrained(wanted.weights)
            return Preprocessing.from_weights(member, wanted.weights)
        if wanted is None and spec.weights:
            try:
                return Preprocessing.from_weights(loaded.weights_meta["weights"], spec.weights)
            except InvalidArgument:
                return None  # e.g. detection weights: the model resizes by itself
        return wanted

    async def unload(self, name: str, version: int = 0) -> list[int]:
        """Removes versions from routing, lets their requests finish, frees them.

        With `restore`, the record is written first: if that fails, nothing is removed.
        Versions the record holds but that were not restored are dropped from it too.
        """
        return await _to_the_end(self._unload(check_name(name, "model"), version))

    async def _unload(self, name: str, version: int) -> list[int]:
        async with self._commits:
            removed, forgotten = await self._commit_unload(name, version)
        await asyncio.gather(*map(self._retire, removed))
        for hosted in removed:
            await self._let_go(hosted.pages_in_from)
            self._metrics.forget_version(hosted.name, hosted.version)
        log.info("unloaded %s versions %s", name, [h.version for h in removed])
        return sorted({hosted.version for hosted in removed} | {v for _, v in forgotten})

    async def _commit_unload(
        self, name: str, version: int
    ) -> tuple[list[HostedModel], list[tuple[str, int]]]:
        """Records the versions leaving, then takes them out of routing (call holding
        `_commits`): the removed versions, and the unrestored entries dropped."""
        unrestored = self.record.unrestored
        forgotten = [key for key in unrestored if key[0] == name and version in (0, key[1])]
        try:
            leaving = self.registry.select(name, version)
        except ModelNotFound:
            if not forgotten:
                raise
            leaving = []
        if not self._closing:  # closing keeps the record as it is
            gone = {(h.name, h.version) for h in leaving} | set(forgotten)
            await self._on_store_thread(self.record.write, self.registry.all(), gone)
        for key in forgotten:
            unrestored.pop(key, None)
        if not leaving:
            return [], forgotten
        # Counted on their devices until their requests are done (`_retire`).
        return self.cache.leaving(lambda: self.registry.remove(name, version)), forgotten

    async def _retire(self, hosted: HostedModel) -> None:
        """Frees an unloaded version once its requests are answered."""
        try:
            await hosted.retiring_until_idle()
            await _on(self._frees, hosted.retire)
        finally:
            self.cache.left(hosted)

    def get(self, name: str, version: int = 0) -> HostedModel:
        """The version asked for (0: the newest); NOT_FOUND says why one was not restored."""
        name = check_name(name, "model")
        try:
            return self.registry.get(name, version)
        except ModelNotFound as error:
            reasons = [
                f"version {v} was not restored: {unrestored.reason}"
                for (n, v), unrestored in sorted(self.record.unrestored.items())
                if n == name and version in (0, v)
            ]
            if reasons:
                raise ModelNotFound(f"{error}; " + "; ".join(reasons)) from None
            raise

    async def restore(self) -> list[str]:
        """Brings back what the record holds; returns "name:version" of each.

        Pinned versions, and versions on a device without a memory budget, are loaded
        again; on-demand versions on a device with one are registered at the store tier
        and built at their first request (no reload of everything at start). Each uses
        the checkpoint bytes it loaded before (a record written before those were
        recorded: what the checkpoint name holds now). One that fails is logged and
        stays in the record, the others still come up: GetModel and ListModels say why,
        a later start retries it (say, once its bytes are uploaded again), and
        UnloadModel drops it.
        """
        restored = []
        for request, loaded_from, served in self.record.read():
            key = (request.name, request.version)
            if key not in self.record.unrestored:
                continue  # a client loaded or unloaded that version meanwhile
            try:
                if self._on_demand(request):
                    hosted = self._register_unbuilt(request, loaded_from, served)
                else:
                    hosted = await self.load(request, loaded_from)
            except Exception as error:
                known = isinstance(error, ModelHostFailure)
                reason = str(error) if known else f"{type(error).__name__}: {error}"
                log.error("could not restore %s version %d: %s", *key, reason, exc_info=not known)
                if key in self.record.unrestored:
                    self.record.unrestored[key].reason = reason
                continue
            restored.append(f"{hosted.name}:{hosted.version}")
        log.info("restored %d model versions: %s", len(restored), ", ".join(restored) or "-")
        return restored

    def _on_demand(self, request: LoadRequest) -> bool:
        """Whether a recorded version may wait at the store tier until it is used."""
        device = resolve_device(request.device, str(self.default_device))
        return not stays_resident(request, device) and self.cache.limit(device) is not None

    def _register_unbuilt(
        self, request: LoadRequest, loaded_from: CheckpointRecord | None, served: Served | None
    ) -> HostedModel:
        """Registers a recorded version at the store tier without loading it; its first
        request builds it (`_rebuild`). Until then ModelInfo knows what the record does
        (the request, and what the version served as: its dtype, inputs and outputs), and
        its parameters and the bytes its weights will take in that dtype (its
        architecture's skeleton on the meta device: an architecture no longer configured,
        or arguments it no longer takes, leave it unrestored with the reason, as a PINNED
        version's failed load does). Its workspace is what the record says it held beyond
        those weights, within the device's budget (its build measures it again)."""
        spec = check_request(request, self.settings, self.default_device)
        record = loaded_from or (self._store.get(spec.checkpoint) if spec.checkpoint else None)
        if record is not None:
            require_bytes(self._store, record, spec.checkpoint)
        if served is not None and served.dtype not in WEIGHT_DTYPES:
            served = None  # not a dtype a version serves in: the record was not ours
        dtype = spec.dtype or (served.dtype if served else torch.float32)
        nbytes, parameters = planned(dataclasses.replace(spec, dtype=dtype), record, self._catalog)
        version = self.registry.reserve(spec.name, request.version)
        loaded = LoadedModule(
            module=None,
            record=record,
            device=spec.device,
            dtype=dtype,
            parameter_count=parameters,
            device_bytes=nbytes,
        )
        runner = Runner(
            None,
            spec.device,
            dtype,
            served.inputs if served else (),
            preprocessing=request.preprocessing,
        )
        runner.outputs = served.outputs if served else ()
        hosted = HostedModel(
            name=spec.name,
            version=version,
            spec=spec,
            loaded=loaded,
            runner=runner,
            batcher=Batcher(
                runner.run,
                batch_policy(request, self.settings),
                self._cpu_lane,
                max_elements=self.settings.max_tensor_elements,
            ),
            prep=self._prep,
            loaded_at=time.time(),
            labels=list(request.labels),
            request=request,
            cache=self.cache,
            tier=STORE,
            built=False,
            recorded=served,
            workspace_bytes=_recorded_workspace(served, nbytes, spec.device, self.cache),
        )
        if hosted.pages_in_from:
            try:
                self._store.hold(hosted.pages_in_from)
            except BaseException:
                self.registry.cancel(spec.name, version)
                raise
        self._register(hosted)
        return hosted

    def _register(self, hosted: HostedModel) -> None:
        """Publishes a version (it serves from now on; the caller holds the bytes it may be
        paged in from); it is no longer one the record still has to restore."""
        self.registry.put(hosted)
        self.record.unrestored.pop((hosted.name, hosted.version), None)

    async def close(self) -> None:
        """Unloads every model; the restore record stays as it was."""
        self._closing = True
        for hosted in self.registry.all():
            await self.unload(hosted.name, hosted.version)
        # Clean-up for callers that left (a let-go: milliseconds) ends first.
        await asyncio.gather(*self._background, return_exceptions=True)
        with self._lanes_lock:
            pools, self._gpu_lanes = list(self._gpu_lanes.values()), {}
        for pool in pools:
            await asyncio.to_thread(pool.close)
        self._store_work.shutdown(wait=False)
        self._frees.shutdown(wait=False)


def _recorded_workspace(
    served: Served | None, weights: int, device: torch.device, cache: ModelCache
) -> int:
    """The workspace a restored version held beyond its `weights`, as its record says
    (red team 16, F8: without it, its first page-in reserved its weights only and had to
    claim again for its workspace). Only if measured on a device of the same kind (a GPU
    allocator's peak says nothing of a CPU estimate), and never more than the budget
    leaves beside its weights: a record written under a larger budget, or mangled, must
    not make it not fit (what pinned versions leave: `ModelCache._reserve_page_in`)."""
    if served is None or served.device_bytes is None:
        return 0
    if served.device.partition(":")[0] != device.type:
        return 0
    limit = cache.limit(device)
    held = served.device_bytes if limit is None else min(served.device_bytes, limit)
    return max(0, held - weights)


def _check_one_image_fits(runner: Runner, inputs: list[InputSpec]) -> None:
    """Refuses a detection model whose every Predict would be refused: one small image (the
    probe's) already costs more than max_detection_bytes by its estimate (its arguments
    allow too many proposals or detections, or too large a resized image)."""
    if len(inputs) == 1:
        runner.check_shape_cost(probe_shape(inputs[0], *PROBE_SIZES[0]), "architecture_args")


def _outputs_by_running(runner: Runner, lane: Lane, spec: InputSpec, name: str) -> None:
    """A detection model's outputs (data-dependent steps the meta device cannot run): one
    real run of one row of zeros on its lane. One that refuses zeros keeps them unknown
    until it runs."""
    zeros = torch.zeros(probe_shape(spec, *PROBE_SIZES[0]), dtype=spec.dtype)
    try:
        lane.call(runner.run, {spec.name: zeros}).result()
    except ModelHostFailure as error:
        log.info("%s: outputs not known until the first request: %s", name, error)


def _compiles_first(device: torch.device, request: LoadRequest) -> bool:
    """Whether a version compiles (on its load thread) before its GPU warm-up is measured:
    a compiled one with a warm-up, unless it runs as CUDA graphs, whose pool, made as they
    are captured, is memory it keeps (measured, then). On the CPU the warm-up waits for no
    other load, and compiling twice (once more with the measuring hooks) would be waste."""
    return (
        device.type == "cuda"
        and bool(request.compile)
        and bool(request.warmup_shape)
        and not uses_cuda_graphs(device, request.compile)
    )


def _measure_by_running(
    runner: Runner, lane: Lane, inputs: list[InputSpec], warmup_shape: Sequence[int]
) -> None:
    """The activations of a model the meta device could not measure (an exported program,
    a builder with no skeleton, a model that takes none of the probe sizes), by real runs
    of zeros on its lane (uncompiled, `activations.py`); at the load's `warmup_shape`
    (a size the model takes) when those sizes fail too."""

    def peak(rows: list[list[int]]) -> int:
        zeros = {
            given.name: torch.zeros(row, dtype=given.dtype)
            for given, row in zip(inputs, rows, strict=True)
        }
        return lane.call(runner.peak_bytes, zeros).result()

    runner.activations = measure(peak, [given.shape for given in inputs])
    if runner.activations is None and warmup_shape and len(inputs) == 1:
        runner.activations = measure(peak, [(-1, *warmup_shape[1:])])


def _check_measured(runner: Runner, name: str) -> None:
    """Refuses a model whose inputs are known but whose activations could not be measured
    while max_predict_bytes bounds them: its Predicts would not be bounded (red team 10:
    s3d, MViT and a ViT of another image_size took none of the probe sizes)."""
    if runner.activations is None and runner.max_predict_bytes:
        shapes = ", ".join("x".join(map(str, given.shape)) for given in runner.inputs)
        raise Refused(
            f"{name}: its activations could not be measured (it took none of the probe "
            f"sizes of its input {shapes}, -1 being open), so max_predict_bytes could not "
            "bound its Predicts: give a warmup_shape it takes, where it is measured, or "
            "serve with max_predict_bytes 0"
        )


def _on(executor: ThreadPoolExecutor, work: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """`work(*args)` on `executor`'s threads; once they are shut down (a clean-up that ends
    after `Models.close`), on asyncio's."""
    loop = asyncio.get_running_loop()
    try:
        return loop.run_in_executor(executor, work, *args)
    except RuntimeError:  # cannot schedule new futures after shutdown
        return loop.run_in_executor(None, work, *args)


async def _to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Awaits `work`, which runs to its end even if the caller is cancelled (a change
    half made: a record written but the registry not changed, a version not freed)."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, not logged
    return await asyncio.shield(task)


def _discard_load(job: asyncio.Future[HostedModel]) -> None:
    """Frees a version built for a caller that left."""
    if not job.cancelled() and job.exception() is None:
        job.result().retire()


def _log_background(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("clean-up after a caller that left failed", exc_info=task.exception())
