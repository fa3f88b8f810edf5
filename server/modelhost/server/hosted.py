"""A hosted model version, and its whole Predict path, top to bottom.

    decode   Runner.prepare: request tensors become zero-copy views (codec); images
             are decoded and preprocessed (images.py) where the device's tensor work
             runs: the CPU lane for CPU models, a thread pool for GPU models
    queue    Batcher.submit: the version's queue, bounded (batching.py)
    batch    the lane gathers queued requests with the same signature into one batch
    run      Runner.run: cat -> device -> the model under inference_mode -> CPU
    split    each caller gets exactly its own rows of the outputs
    encode   `finish`: typed tensors in the first floating input's dtype, or top-k classes

A request holds a lease on its version from the moment it finds it until it has its
answer; `retire` waits for those leases before it frees the model.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from modelhost.client import codec
from modelhost.server.batching import Batcher, Finish
from modelhost.server.devices import release_memory
from modelhost.server.errors import InvalidArgument
from modelhost.server.inference import Answer, Prepared, Runner, encode_answer, top_classes
from modelhost.server.loading import LoadedModule, LoadRequest, LoadSpec


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
    retiring: bool = False

    def __post_init__(self) -> None:
        self._leases = 0
        self._idle = threading.Condition()

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
        prepared = await self._prepare(inputs, images)
        finish: Finish
        if top_k:
            finish = functools.partial(top_classes, k=top_k, labels=self.labels)
        else:
            finish = functools.partial(encode_answer, float_dtype=prepared.out_dtype)
        submitted = self.batcher.submit(prepared.tensors, deadline, finish, prepared.ready)
        return await asyncio.wrap_future(submitted)

    async def _prepare(
        self, inputs: Mapping[str, codec.TensorFields], images: Sequence[bytes]
    ) -> Prepared:
        """Request tensors as views at once; image work off the event loop."""
        runner = self.runner
        if not (images or (runner.preprocessing and _has_uint8(inputs))):
            return runner.prepare(inputs)
        if runner.device.type == "cpu":  # CPU tensor work stays on the CPU lane
            return await asyncio.wrap_future(self.batcher.lane.call(runner.prepare, inputs, images))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prep, runner.prepare, inputs, images)

    # Leases

    def acquire(self) -> None:
        with self._idle:
            self._leases += 1

    def release(self) -> None:
        with self._idle:
            self._leases -= 1
            if self._leases == 0:
                self._idle.notify_all()

    def retire(self) -> None:
        """Blocks until no request holds this version, then frees it."""
        with self._idle:
            self.retiring = True
            self._idle.wait_for(lambda: self._leases == 0)
        self.batcher.close()
        self.runner.release()  # the module and its compiled form
        del self.loaded.module
        release_memory(self.loaded.device)


_UINT8 = codec.parse_dtype("uint8")


def _has_uint8(inputs: Mapping[str, codec.TensorFields]) -> bool:
    return any(t.dtype == _UINT8 for t in inputs.values())
