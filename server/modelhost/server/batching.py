"""Dynamic batching: one worker thread per hosted model version.

Callers `submit` decoded inputs and get a future. The worker takes the oldest
request, gathers more that are already queued (or arrive within
`max_queue_delay_us`, while fewer are queued than joined the previous batch),
groups them by input signature (names, dtypes, shape past the batch dimension),
runs each group as one batch, and hands every caller exactly its own rows.

A request whose deadline passed while queued is dropped without running. When a
merged batch fails, its requests are re-run one by one, so a bad request fails
only itself. Models whose outputs cannot be split by rows (e.g. detection's
per-image lists) are run one request at a time.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from modelhost.server.errors import DeadlineExpired, LimitExceeded, ModelHostFailure, ShuttingDown
from modelhost.server.inference import Answer, Tensors

log = logging.getLogger(__name__)

Finish = Callable[[Tensors], Answer]
"""Turns one caller's rows of the outputs into its answer (on the worker thread)."""


@dataclass(frozen=True)
class BatchPolicy:
    """How one model version batches; `max_batch_size` 1 turns batching off."""

    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int


@dataclass
class Request:
    """A queued Predict: its inputs, deadline, how to finish it, and the caller's future."""

    inputs: Tensors
    deadline: float | None
    finish: Finish
    future: Future[Answer] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def signature(self) -> tuple[tuple[str, torch.dtype, str, tuple[int, ...]], ...]:
        """Requests with equal signatures can be concatenated along the batch dimension."""
        return tuple(
            sorted((k, t.dtype, str(t.device), tuple(t.shape[1:])) for k, t in self.inputs.items())
        )

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


BatchObserver = Callable[[int, int], None]
"""Called after each run with (requests, rows)."""


class Batcher:
    """Queues requests for one runner and runs them in batches on a worker thread."""

    def __init__(
        self,
        run: Callable[[Tensors], Tensors],
        policy: BatchPolicy,
        label: str,
        observe: BatchObserver | None = None,
    ) -> None:
        self.policy = policy
        self._run = run
        self._observe = observe
        self._queue: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._splittable = policy.max_batch_size > 1
        self._last_batch = 1
        self._thread = threading.Thread(target=self._work, name=f"batcher-{label}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting in the queue."""
        return len(self._queue)

    def submit(self, inputs: Tensors, deadline: float | None, finish: Finish) -> Future[Answer]:
        """Queues a request; RESOURCE_EXHAUSTED (LimitExceeded) at once when the queue is full."""
        request = Request(inputs, deadline, finish)
        with self._cond:
            if self._closed:
                raise ShuttingDown("this model version is being unloaded")
            if len(self._queue) >= self.policy.max_queue_size:
                raise LimitExceeded(
                    f"queue full: {self.policy.max_queue_size} requests already waiting "
                    "(max_queue_size)"
                )
            self._queue.append(request)
            self._cond.notify()
        return request.future

    def close(self) -> None:
        """Stops taking requests, finishes those queued, and stops the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    # Worker

    def _work(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            groups: dict[object, list[Request]] = {}
            for request in batch:
                groups.setdefault(request.signature, []).append(request)
            self._last_batch = len(batch)
            for group in groups.values():
                self._run_group(group)

    def _gather(self) -> list[Request] | None:
        """Waits for a request, then collects a batch; None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            until = batch[0].enqueued + self.policy.max_queue_delay_us / 1e6
            while self._splittable and rows < self.policy.max_batch_size:
                if self._queue:
                    if rows + self._queue[0].rows > self.policy.max_batch_size:
                        break
                    batch.append(self._queue.popleft())
                    rows += batch[-1].rows
                    continue
                remaining = until - time.monotonic()
                if remaining <= 0 or len(batch) >= self._last_batch or self._closed:
                    break
                self._cond.wait(remaining)
        now = time.monotonic()
        live = []
        for request in batch:
            if not request.future.set_running_or_notify_cancel():
                continue  # the caller went away
            if request.deadline is not None and now > request.deadline:
                request.fail(DeadlineExpired("deadline passed while the request was queued"))
                continue
            live.append(request)
        return live

    def _run_group(self, group: list[Request]) -> None:
        if len(group) == 1 or not self._splittable:
            for request in group:
                self._run_one(request)
            return
        inputs = {name: torch.cat([r.inputs[name] for r in group]) for name in group[0].inputs}
        rows = [r.rows for r in group]
        try:
            outputs = self._run(inputs)
        except Exception:
            for request in group:  # isolate the failure to the request that causes it
                self._run_one(request)
            return
        total = sum(rows)
        if any(t.dim() == 0 or t.shape[0] != total for t in outputs.values()):
            log.info("outputs cannot be split by rows: batching off for this model")
            self._splittable = False
            for request in group:
                self._run_one(request)
            return
        self._notify(len(group), total)
        parts = {name: torch.split(t, rows) for name, t in outputs.items()}
        for index, request in enumerate(group):
            own = {name: chunks[index] for name, chunks in parts.items()}
            self._deliver(request, own)

    def _run_one(self, request: Request) -> None:
        try:
            outputs = self._run(request.inputs)
        except Exception as error:
            request.fail(error if isinstance(error, ModelHostFailure) else _unexpected(error))
            return
        self._notify(1, request.rows)
        self._deliver(request, outputs)

    def _deliver(self, request: Request, outputs: Tensors) -> None:
        try:
            answer = request.finish(outputs)
        except Exception as error:
            request.fail(error if isinstance(error, ModelHostFailure) else _unexpected(error))
            return
        if not request.future.done():
            request.future.set_result(answer)

    def _notify(self, requests: int, rows: int) -> None:
        if self._observe:
            self._observe(requests, rows)


def _unexpected(error: Exception) -> Exception:
    log.error("model run failed", exc_info=error)
    return error
