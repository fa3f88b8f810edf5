"""The composition root below the servicers: the parts of a server, wired together.

The servicers talk to this front only: `checkpoints` (checkpoints.py: uploads,
snapshots, downloads), `models` (models.py: load, unload, restore), `predict` (which
checks a request and runs it through its hosted version: hosted.py), and a few
read-only views. Everything here speaks domain types and raises domain errors.
Blocking work runs on executors, never on the event loop.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from modelhost.client import codec
from modelhost.server.architectures import ArchitectureCatalog, Builder
from modelhost.server.batching import Lane
from modelhost.server.cache import ModelCache
from modelhost.server.checkpoints import Checkpoints
from modelhost.server.devices import lower_priority
from modelhost.server.errors import DeviceFailed, LimitExceeded, ModelNotFound, VersionUnloaded
from modelhost.server.hosted import HostedModel
from modelhost.server.inference import Answer
from modelhost.server.metrics import Metrics
from modelhost.server.models import Models
from modelhost.server.names import check_name
from modelhost.server.registry import Registry
from modelhost.server.request_limits import check_element_count, element_count
from modelhost.server.restore import RecordFormat, RestoreRecord, Unrestored
from modelhost.server.settings import Settings
from modelhost.server.store import CheckpointStore

log = logging.getLogger(__name__)


class Host:
    """A server's store, catalog, registry, executors and lanes, and the operations on them."""

    def __init__(self, settings: Settings, records: RecordFormat) -> None:
        self.settings = settings
        store = CheckpointStore(
            settings.store,
            max_checkpoint_bytes=settings.max_checkpoint_bytes,
            direct_io=settings.direct_io,
        )
        store.recover()
        self._store = store
        self._catalog = ArchitectureCatalog(settings.architectures)
        self._registry = registry = Registry()
        self.metrics = Metrics()
        self.metrics.watch(registry)
        self._io = ThreadPoolExecutor(4, thread_name_prefix="io")
        self._loads = ThreadPoolExecutor(settings.load_workers, thread_name_prefix="load")
        self._prep = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="prep")
        # Compiles for input shapes compiled versions meet after their load (inference.py).
        self._compiles = ThreadPoolExecutor(
            1, thread_name_prefix="compile", initializer=lower_priority
        )
        # All CPU tensor work of predictions runs on this one thread (see batching.py).
        self._cpu_lane = Lane("cpu", shared=True)
        self.checkpoints = Checkpoints(
            store,
            registry,
            self.metrics,
            self._io,
            chunk_bytes=settings.chunk_bytes,
            allow_pickled=settings.allow_pickled_models,
        )
        self.device_lost = False
        # Called once when a device fails (app.py: health turns NOT_SERVING).
        self.on_device_failure: Callable[[], Awaitable[None]] | None = None
        self.models = Models(
            settings,
            store=store,
            catalog=self._catalog,
            registry=registry,
            metrics=self.metrics,
            record=RestoreRecord(store, records, enabled=settings.restore),
            cache=ModelCache(
                registry,
                self.metrics,
                device_budget=settings.device_memory_budget,
                host_budget=settings.host_memory_budget,
            ),
            cpu_lane=self._cpu_lane,
            loads=self._loads,
            prep=self._prep,
            compiles=self._compiles,
        )
        self.models.on_device_failure = self._device_failed  # a load's, as a Predict's

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
        """Checks a request against the limits, then runs it through its version."""
        self.check_request_size(len(inputs), len(images))
        elements = sum(element_count(name, tensor) for name, tensor in inputs.items())
        check_element_count(elements, self.settings.max_tensor_elements)
        deadline = time.monotonic() + timeout if timeout is not None else None
        name = check_name(model, "model")
        run = functools.partial(
            self._predict, inputs=inputs, images=images, top_k=top_k, deadline=deadline
        )
        try:
            return await run(name, version)
        except VersionUnloaded as unloaded:
            # It waited for a page-in of the version it found (a claim may have evicted it
            # under it), and that version was unloaded: a rollout. Asked for the newest, it
            # goes to the newest one left, as a request that came a moment later would.
            if version != 0:
                raise
            try:
                return await run(name, version)
            except ModelNotFound:
                raise unloaded from None

    async def _predict(
        self,
        name: str,
        version: int,
        *,
        inputs: Mapping[str, codec.TensorFields],
        images: Sequence[bytes],
        top_k: int,
        deadline: float | None,
    ) -> tuple[HostedModel, Answer]:
        """One try of `predict` on the version `version` resolves to now."""
        with self._registry.lease(name, version) as hosted:
            try:
                return hosted, await hosted.predict(inputs, images, top_k, deadline)
            except DeviceFailed as failure:
                await self._device_failed(failure)
                raise

    async def _device_failed(self, failure: DeviceFailed) -> None:
        """A lost device context is fatal: say so once, and report NOT_SERVING."""
        if self.device_lost:
            return
        self.device_lost = True
        log.critical("%s: this server cannot serve until it is restarted", failure)
        if self.on_device_failure is not None:
            await self.on_device_failure()

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

    # Read-only views

    @property
    def default_device(self) -> str:
        return str(self.models.default_device)

    def hosted(self, name: str = "") -> list[HostedModel]:
        """Every hosted version (of `name`, when given), by name then version."""
        return [h for h in self._registry.all() if not name or h.name == name]

    def versions(self, name: str) -> list[int]:
        """Hosted versions of `name`, ascending."""
        return self._registry.versions(name)

    def is_hosted(self, name: str) -> bool:
        """Whether any version of `name` is hosted."""
        return bool(self._registry.versions(name))

    def unrestored(self) -> list[Unrestored]:
        """Recorded versions that are not serving (not restored, or not yet), with why."""
        unrestored = self.models.record.unrestored
        return [unrestored[key] for key in sorted(unrestored)]

    def architectures(self) -> list[Builder]:
        return self._catalog.all()

    async def close(self) -> None:
        """Unloads every model (the restore record stays as it was) and stops the executors.
        Loads and page-ins still running are not waited for: their calls have ended (a
        compile or a hung builder could take minutes), and what they build is thrown away
        (`serve` then exits without them)."""
        await self.models.close()
        self._loads.shutdown(wait=False, cancel_futures=True)
        self._compiles.shutdown(wait=False, cancel_futures=True)
        self.models.cache.close()
        self._prep.shutdown(wait=True)
        self._cpu_lane.close()
        self._io.shutdown(wait=True)
        self._store.close()
