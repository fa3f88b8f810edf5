"""A hosted model version, and its whole Predict path, top to bottom.

    page-in  a version that is not resident is brought back first (cache.py)
    decode   Runner.prepare: request tensors become zero-copy views (codec); encoded
             images are decoded and preprocessed (images.py) where the device's tensor
             work runs: the CPU lane for CPU models, a thread pool (each thread its own
             CUDA stream) for GPU models
    queue    Batcher.submit: the version's queue, bounded (batching.py)
    batch    the lane gathers queued requests with the same signature into one batch
    run      Runner.launch: join (pinned for a GPU) -> device -> uint8 images preprocessed
             -> the model under inference_mode -> CPU; on a GPU queued on the model's
             stream, and the lane launches the next batch before it collects this one
    split    each caller gets exactly its own rows of the outputs
    encode   `finish`: typed tensors in the first floating input's dtype, or top-k classes

A request holds a lease on its version from the moment it finds it until it has its
answer; `retire` waits for those leases before it frees the model, and the model cache
(cache.py) evicts only versions no request holds. A request for a version that is not
resident pages it in first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modelhost.client import codec
from modelhost.server.batching import Batcher, Finish
from modelhost.server.devices import release_memory
from modelhost.server.errors import InvalidArgument, VersionUnloaded
from modelhost.server.inference import (
    Answer,
    InputSpec,
    Prepared,
    Runner,
    encode_answer,
    top_classes,
    uses_cuda_graphs,
)
from modelhost.server.loading import PINNED, LoadedModule, LoadRequest, LoadSpec

if TYPE_CHECKING:
    from modelhost.server.cache import ModelCache, RoomClaim
    from modelhost.server.host_tier import HostCopy

RESIDENT, HOST, STORE = "resident", "host", "store"
"""Where a version's weights are (its `tier`): on its device, in host memory, only in the
store (cache.py moves versions between them)."""


def stays_resident(request: LoadRequest, device: torch.device) -> bool:
    """Whether a version never leaves its device: loaded `residency=pinned`, or compiled
    with CUDA graphs (their memory pool stays with torch's compiled function whether the
    version leaves or not, so evicting it would give nothing back)."""
    return request.residency == PINNED or uses_cuda_graphs(device, request.compile)


@dataclass(frozen=True)
class Served:
    """What a version serves as: its weights' dtype, its inputs and outputs, and what it
    holds on its device (weights and workspace; None if not known), measured on `device`."""

    dtype: torch.dtype
    inputs: tuple[InputSpec, ...]
    outputs: tuple[InputSpec, ...]
    device_bytes: int | None = None
    device: str = ""


@dataclass
class HostedModel:
    """One model version on its device, with its batcher."""

    name: str
    version: int
    spec: LoadSpec
    loaded: LoadedModule
    runner: Runner
    batcher: Batcher
    prep: Executor  # where a GPU model's images are prepared (CPU models use their lane)
    loaded_at: float
    request: LoadRequest  # what it was loaded with, its version filled in (kept for restore)
    labels: list[str] = field(default_factory=list)
    load_seconds: float = 0.0  # LoadModel, request to ready (0: registered at restart, unbuilt)
    retiring: bool = False
    cache: ModelCache | None = None
    workspace_bytes: int = 0  # what its warm-up needed on the device beyond the weights
    tier: str = RESIDENT
    page_ins: int = 0
    last_used: float = 0.0  # wall time of the last Predict; 0: none yet
    used_order: int = 0  # larger: used more recently (the cache's LRU order)
    host_copy: HostCopy | None = None  # its weights while in the host tier
    paging: Any = None  # the page-in in progress (a concurrent Future), if any
    paging_until: float = 0.0  # the latest deadline of the requests waiting for it
    paging_waiters: int = 0  # requests waiting for it to be paged in
    claim: RoomClaim | None = None  # the claim on its room that drains it (cache.py)
    built: bool = True  # False: registered at restart, built at its first page-in
    recorded: Served | None = None  # what the restore record says it served as (unbuilt)

    def __post_init__(self) -> None:
        self._leases = 0
        self._parked = 0  # of those, requests waiting while a claim drains it
        self._compiles = 0  # background compiles running on its module
        self._idle = threading.Condition()
        self._on_idle: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.runner.hold = self.held_if_resident

    def served(self) -> Served | None:
        """What it serves as; unbuilt, what the record said (None if it said nothing)."""
        if not self.built:
            if self.recorded is None:
                return None
            # What the record said, unless it has learnt more: a budget that caps it here
            # need not cap it at the next start (review 19, 2).
            said = self.recorded.device_bytes or 0
            return dataclasses.replace(self.recorded, device_bytes=max(said, self.device_bytes))
        return Served(
            self.loaded.dtype,
            self.runner.inputs,
            self.runner.outputs,
            self.device_bytes,
            str(self.loaded.device),
        )

    @property
    def stays(self) -> bool:
        """Whether it never leaves its device (pinned, or compiled with CUDA graphs)."""
        return stays_resident(self.request, self.loaded.device)

    @property
    def may_leave(self) -> bool:
        """Whether the cache may evict it: on demand, on a device with a memory budget."""
        return (
            not self.stays
            and self.cache is not None
            and self.cache.limit(self.loaded.device) is not None
        )

    @property
    def pages_in_from(self) -> str:
        """The checkpoint bytes (sha256) it would be paged in from; "" if none (it never
        leaves its device, or its pretrained weights come from torchvision's cache)."""
        record = self.loaded.record
        return record.sha256 if record and self.may_leave else ""

    @property
    def device_bytes(self) -> int:
        """What it holds on its device when resident: weights, buffers and workspace."""
        return self.loaded.device_bytes + self.workspace_bytes

    async def ensure_resident(self, deadline: float | None = None) -> bool:
        """Pages it in if it is not on its device (the caller holds a lease); True if it
        was not (a cache miss)."""
        return self.cache is not None and await self.cache.ensure_resident(self, deadline)

    async def predict(
        self,
        inputs: Mapping[str, codec.TensorFields],
        images: Sequence[bytes] = (),
        top_k: int = 0,
        deadline: float | None = None,
    ) -> Answer:
        """Decodes, queues, batches, runs, splits and encodes one request."""
        if top_k < 0:
            raise InvalidArgument(f"top_k must not be negative, got {top_k}")
        missed = await self.ensure_resident(deadline)
        if self.cache is not None:
            self.cache.touch(self)
        prepared = await self._prepare(inputs, images)
        finish: Finish
        if top_k:
            finish = functools.partial(top_classes, k=top_k, labels=self.labels)
        else:
            finish = functools.partial(encode_answer, float_dtype=prepared.out_dtype)
        # No local holds the future: one that failed would hold this frame (a cycle).
        answer = await asyncio.wrap_future(
            self.batcher.submit(prepared.tensors, deadline, finish, prepared.ready)
        )
        return dataclasses.replace(answer, paged_in=missed) if missed else answer

    async def _prepare(
        self, inputs: Mapping[str, codec.TensorFields], images: Sequence[bytes]
    ) -> Prepared:
        """Request tensors as views at once; encoded images decoded off the event loop."""
        runner = self.runner
        if not images:
            return runner.prepare(inputs)
        if runner.device.type == "cpu":  # CPU tensor work stays on the CPU lane
            return await asyncio.wrap_future(self.batcher.lane.call(runner.prepare, inputs, images))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prep, runner.prepare, inputs, images)

    # Leases

    def acquire(self) -> None:
        with self._idle:
            self._leases += 1

    @contextlib.contextmanager
    def held_if_resident(self) -> Iterator[bool]:
        """Keeps it on its device (no eviction) during work on its module off the request
        path (a background compile), if it is there: yields whether it was. An unload does
        not wait for that work: the module is freed once the work lets go of it."""
        with self._idle:
            held = self.tier == RESIDENT and not self.retiring
            self._compiles += held
        try:
            yield held
        finally:
            if held:
                with self._idle:
                    self._compiles -= 1
                if self.cache is not None:
                    self.cache.idle()

    @contextlib.contextmanager
    def parked(self) -> Iterator[None]:
        """Its request waits while a claim on its room drains it (cache.py): meanwhile that
        request's lease does not keep it on its device."""
        with self._idle:
            self._parked += 1
            drained = self._parked == self._leases  # no other request holds it
        if drained and self.cache is not None:
            self.cache.idle()
        try:
            yield
        finally:
            with self._idle:
                self._parked -= 1

    def release(self) -> None:
        with self._idle:
            self._leases -= 1
            idle = self._leases == 0
            if idle:
                self._idle.notify_all()
                waiting, self._on_idle = self._on_idle, []
            drained = self._leases == self._parked  # only requests a claim holds back left
        if idle:
            for loop, event in waiting:
                with contextlib.suppress(RuntimeError):  # its loop has closed
                    loop.call_soon_threadsafe(event.set)
        if drained and self.cache is not None:
            self.cache.idle()

    # Residency (called by the model cache, under its lock)

    @property
    def idle(self) -> bool:
        """Resident, and held by no request nor work on its module (`leave_device` would
        take it off its device now)."""
        with self._idle:
            return not self._held()

    def _held(self) -> bool:
        """Whether it must stay on its device now (call with `_idle` held)."""
        held = self._leases > self._parked or self._compiles
        if held or self.retiring or self.tier != RESIDENT:
            return True
        # No request holds it, yet a batch whose callers have all left may still run on
        # its module (read after the leases: no new request can come meanwhile).
        return self.batcher.running

    def leave_device(self, tier: str) -> nn.Module | None:
        """Takes the module off this version if no request holds it (None if one does):
        from now on a request finds it in `tier` and pages it in."""
        with self._idle:
            if self._held():
                return None
            self.tier = tier
        module = self.runner.detach()
        self.loaded.module = None
        return module

    def take_over(self, built: HostedModel) -> None:
        """Becomes `built` (this version built at its first page-in: a restart registered it
        from the restore record only); keeps its own statistics, leases and routing. If it
        was unloaded meanwhile and no request waits for it any more, `built` is freed
        instead (VersionUnloaded): its batcher on the lane and its module would otherwise
        outlive it, counted by no budget."""
        old = self.batcher
        with self._idle:
            gone = self._retired()
            if not gone:
                self.spec, self.loaded, self.runner = built.spec, built.loaded, built.runner
                self.batcher, self.labels = built.batcher, built.labels
        if gone:
            built.batcher.close()
            built.runner.detach()
            built.loaded.module = None
            raise VersionUnloaded(f"model {self.name!r} version {self.version} was unloaded")
        self.runner.hold = self.held_if_resident
        self.workspace_bytes = built.workspace_bytes
        self.loaded_at = built.loaded_at
        self.built = True
        built.batcher.statistics = old.statistics
        old.close()

    def return_to_device(self, module: nn.Module) -> None:
        """Serves again with `module`, paged in (a version built at its first page-in has
        its runner on it already: no second compile wrapper). Unloaded meanwhile with no
        request waiting for it any more, it stays off its device (the module is dropped):
        the unload freed it already. Requests still waiting are answered first."""
        with self._idle:  # an unload frees it after this, or finds it retired here
            if self._retired():
                return
            attach = self.runner.module is not module
            if attach:
                self.runner.attach(module)
            self.loaded.module = module
            self.page_ins += 1
            self.tier = RESIDENT
        if attach:  # torch's graphs fit the new module unless their guards say otherwise
            self.runner.compile_again()

    def record(self, measure: Callable[[], object]) -> None:
        """Runs `measure` (its metrics) unless it is being unloaded: its series go with the
        unload (`Metrics.forget_version`, once `retiring` is set under this lock), and
        recording after that would bring them back for good."""
        with self._idle:
            if not self.retiring:
                measure()

    def _retired(self) -> bool:
        """Unloaded, with no request left to answer (call with `_idle` held): `retire`
        frees it, or has."""
        return self.retiring and not self._leases

    async def retiring_until_idle(self) -> None:
        """Marks it as leaving and returns once no request holds it: an unload of a busy
        version waits on the event loop, not on one of asyncio's threads (many at once
        would hold them all)."""
        with self._idle:
            self.retiring = True
            if not self._leases:
                return
            event = asyncio.Event()
            self._on_idle.append((asyncio.get_running_loop(), event))
        await event.wait()

    def retire(self) -> None:
        """Frees it: its batcher (once a batch its callers left is done, if one runs), its
        module and its host copy. Call once no request holds it: `retiring_until_idle`
        for a registered version (out of routing, it gets no new request); one never
        registered has none."""
        with self._idle:
            self.retiring = True
        self.batcher.close()
        host_module = self.host_copy.module if self.host_copy else None
        modules = [weakref.ref(m) for m in (self.runner.module, host_module) if m]
        del host_module  # the local would keep the host copy's pinned buffer alive
        self.runner.detach()  # the module and its compiled form
        self.loaded.module = None
        self.host_copy = None
        # A collection (about 0.2 s with torch loaded) only when a cycle keeps one alive.
        release_memory(self.loaded.device, collect=any(ref() is not None for ref in modules))
