"""Dynamic batching: a queue per hosted model version, drained by a worker thread (a lane).

Callers `submit` decoded inputs and get a future. The lane takes the oldest request
of a queue, gathers more that are already queued (or arrive within
`max_queue_delay_us`, while fewer are queued than joined that queue's previous batch and
no other work waits for the lane),
groups them by input signature (names, dtypes, device, shape past the batch
dimension), runs each group as one batch, and hands every caller exactly its own rows.

GPU model versions run on their device's lanes (`LanePool`: a few worker threads, each
with its CUDA stream, shared by the versions, kept when versions leave), and a GPU lane
pipelines: it launches a batch (copies and kernels queued on the stream), then stages and
launches the next batch from what is queued while the first computes, and only then
finishes the first (waits for it, splits and encodes its rows). So the GPU does not idle
while the host concatenates inputs or encodes outputs; at most two batches are in
flight, and a request waits behind at most one batch launched after its own. All CPU models
share one lane: a second thread doing parallel CPU work would start a second OpenMP
team on the same cores, which made resnet18 25-35% slower on this 2-core machine.
A lane also runs other jobs for its device between batches, for the same reason: warm-ups,
and a CPU model's image preprocessing (a GPU model's images are prepared on the
preprocessing threads, each on its own CUDA stream).

A request whose deadline passed while queued is dropped without running. When a
merged batch fails, it runs again in halves, a failing half in halves again, so a bad
request fails only itself and the others still run batched. Models whose outputs
cannot be split by rows (e.g. detection's per-image lists) are run one request at a
time. A batch holds at most `max_elements` input elements (`--max-tensor-elements`,
what one request may hold). An unexpected error outside the
model call (a bug) fails only the requests of that group (INTERNAL, logged, counted
by `on_error`): the lane keeps serving every other model on it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from modelhost.server.errors import DeadlineExpired, LimitExceeded, ModelHostFailure, ShuttingDown
from modelhost.server.inference import Answer, Tensors
from modelhost.server.statistics import Statistics

log = logging.getLogger(__name__)
R = TypeVar("R")

Finish = Callable[[Tensors], Answer]
"""Turns one caller's rows of the outputs into its answer (on the worker thread)."""

Collect = Callable[[], Tensors]
"""Waits for a launched batch and returns its outputs (Runner.launch)."""

Then = Callable[[], None]
"""What finishes a launched batch: the lane calls it after launching the next one."""


@dataclass(frozen=True)
class BatchPolicy:
    """How one model version batches; `max_batch_size` 1 turns batching off."""

    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    preferred_batch_size: int = 0  # 0: max_batch_size

    @property
    def batch_rows(self) -> int:
        """Rows a gathered batch stops at."""
        return self.preferred_batch_size or self.max_batch_size


@dataclass
class Request:
    """A queued Predict: its inputs, deadline, how to finish it, and the caller's future."""

    inputs: Tensors
    deadline: float | None
    finish: Finish
    ready: Any = None  # an event to wait for before using the inputs (Runner.adopt)
    future: Future[Answer] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def elements(self) -> int:
        return sum(t.numel() for t in self.inputs.values())

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

ErrorObserver = Callable[[], None]
"""Called once for each group of requests that failed outside the model call."""


Job = tuple[Callable[[], Any], Future[Any]]
"""A call to run on a lane's thread between batches, and its future."""


class Lane:
    """A worker thread that drains the queues of its batchers and runs jobs, in turn."""

    def __init__(
        self, name: str, *, shared: bool = False, stream: torch.cuda.Stream | None = None
    ) -> None:
        self.shared = shared
        self.stream = stream  # a GPU lane's: its thread's current stream, the models' too
        self.pool: LanePool | None = None  # the pool it is one of (a GPU's lanes)
        self.cond = threading.Condition()
        self._batchers: list[Batcher] = []
        self._jobs: collections.deque[Job] = collections.deque()
        self._turn = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"lane-{name}", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., R], *args: Any) -> Future[R]:
        """Runs `fn(*args)` on the lane's thread, between batches."""
        future: Future[R] = Future()
        with self.cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._jobs.append((lambda: fn(*args), future))
            self.cond.notify_all()
        return future

    def attach(self, batcher: Batcher) -> None:
        with self.cond:
            self._batchers.append(batcher)

    def detach(self, batcher: Batcher) -> None:
        with self.cond:
            self._batchers.remove(batcher)

    def release(self) -> None:
        """A version it ran has left: its pool counts one fewer, or it stops (a shared
        lane stays)."""
        if self.pool is not None:
            self.pool.give_back(self)
        elif not self.shared:
            self.close()

    def close(self) -> None:
        """Finishes the jobs queued, then stops the thread (batchers close first)."""
        with self.cond:
            self._closed = True
            self.cond.notify_all()
        self._thread.join()

    def _work(self) -> None:
        if self.stream is not None:
            torch.cuda.set_stream(self.stream)  # this thread's current stream, for good
        in_flight: Then | None = None  # a launched batch, finished after the next launch
        while True:
            task = None  # the last batch is not kept (its inputs, its futures) while waiting
            task = self._take(wait=in_flight is None)
            if callable(task):  # a gathered batch: launch it, then finish the one before
                launched = self._safely(task)
                if in_flight is not None:
                    self._safely(in_flight)
                in_flight = launched
                continue
            if in_flight is not None:  # nothing to launch now, or a job (a warm-up...):
                self._safely(in_flight)  # finish what is in flight first
                in_flight = None
            elif task is None:  # closed and idle
                return
            if task is not None:
                _run_job(*task)

    def _safely(self, step: Callable[[], Then | None]) -> Then | None:
        """Batcher.run and what it returns answer their callers; never let the lane die."""
        try:
            return step()
        except Exception:
            log.exception("lane %s: unexpected error", self._thread.name)
            return None

    def _take(self, *, wait: bool) -> Job | Callable[[], Then | None] | None:
        """The next job, or a gathered batch ready to run. None once closed and idle, or
        (without `wait`, while a batch is in flight) when nothing is queued now."""
        with self.cond:
            while True:
                if self._jobs:
                    return self._jobs.popleft()
                batcher = self._next_batcher()
                if batcher is not None:
                    batch = batcher.gather(wait=wait)
                    return lambda: batcher.run(batch)
                if self._closed or not wait:
                    return None
                self.cond.wait()

    def busy_elsewhere(self, batcher: Batcher) -> bool:
        """Whether a job or another batcher's requests wait for this lane (call with
        `cond` held): a batch filling up must not hold the lane from them."""
        return bool(self._jobs) or any(b.depth for b in self._batchers if b is not batcher)

    def _next_batcher(self) -> Batcher | None:
        """The next batcher with queued requests, round-robin (call with `cond` held)."""
        count = len(self._batchers)
        for step in range(count):
            batcher = self._batchers[(self._turn + step) % count]
            if batcher.depth:
                self._turn = (self._turn + step + 1) % count
                return batcher
        return None


def preferred_batch_size(rates: Mapping[int, float], max_batch_size: int) -> int:
    """The smallest batch size within 5% of the best rows/s measured, when a larger
    measured size is slower; else 0 (no preference: bigger batches may pay more)."""
    usable = {rows: rate for rows, rate in rates.items() if rows <= max_batch_size}
    if not usable:
        return 0
    best = max(usable.values())
    chosen = min(rows for rows, rate in usable.items() if rate >= 0.95 * best)
    return 0 if chosen == max(usable) else chosen


def _run_job(job: Callable[[], Any], future: Future[Any]) -> None:
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(job())
        except BaseException as error:
            future.set_exception(error)


class LanePool:
    """A device's lanes: at most `size`, made as needed; each new version runs on the one
    that runs the fewest versions (a new lane while every one has some and there is room).

    Lanes outlive their versions, and their number is bounded: cuBLAS keeps a workspace
    (32 MiB on recent GPUs) for every thread and stream pair that ran a matrix product and
    never frees it, so a thread and stream per version would leave one behind at every
    unload, and hold one for every version ever registered."""

    def __init__(self, name: str, size: int, new_lane: Callable[[str], Lane]) -> None:
        self._name = name
        self._size = max(1, size)
        self._new_lane = new_lane
        self._lock = threading.Lock()
        self._users: dict[Lane, int] = {}  # versions on each lane (being built included)

    def take(self) -> Lane:
        with self._lock:
            lanes = self._users
            if len(lanes) < self._size and all(lanes.values()):
                lane = self._new_lane(f"{self._name}-{len(lanes)}")
                lane.pool = self
                lanes[lane] = 0
            else:
                lane = min(lanes, key=lanes.__getitem__)
            lanes[lane] += 1
            return lane

    def give_back(self, lane: Lane) -> None:
        with self._lock:
            if lane in self._users:
                self._users[lane] -= 1

    def usage(self) -> list[int]:
        """Versions on each lane, in the order they were made."""
        with self._lock:
            return list(self._users.values())

    def close(self) -> None:
        """Stops every lane (their versions have left)."""
        with self._lock:
            lanes, self._users = list(self._users), {}
        for lane in lanes:
            lane.close()


class Batcher:
    """Queues requests for one runner; its lane runs them in batches."""

    def __init__(
        self,
        run: Callable[[Tensors], Tensors],
        policy: BatchPolicy,
        lane: Lane,
        *,
        observe: BatchObserver | None = None,
        on_error: ErrorObserver | None = None,
        on_split: ErrorObserver | None = None,
        join: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat,
        adopt: Callable[[Tensors, Any], None] | None = None,
        launch: Callable[[Tensors], Collect] | None = None,
        max_elements: int | None = None,
        vectors_are_rows: bool = False,
    ) -> None:
        self.policy = policy
        # Whether a rank-1 input's one dimension is rows (its model declares its inputs,
        # whose first dimension is the batch); else a request with one runs alone.
        self._vectors_are_rows = vectors_are_rows
        self._max_elements = max_elements  # a batch's inputs in all (max_tensor_elements)
        self._run = run
        self._launch = launch  # an asynchronous runner's (Runner.launch): the lane pipelines
        self._join = join  # concatenates a group's inputs (Runner.join: pinned staging)
        self._adopt = adopt  # readies inputs made on another stream (Runner.adopt)
        self._lane = lane
        self._cond = lane.cond
        self._observe = observe
        self._on_error = on_error
        self._on_split = on_split  # a failed batch runs again in halves (`_in_halves`)
        self._queue: collections.deque[Request] = collections.deque()
        self._closed = False
        self._left = False  # closed, and off its lane
        self._running = 0
        self._splittable = policy.max_batch_size > 1
        self._last_batch = 1
        self.statistics = Statistics()
        lane.attach(self)

    @property
    def lane(self) -> Lane:
        """The lane that runs this batcher's batches (and its device's other jobs)."""
        return self._lane

    @property
    def depth(self) -> int:
        """Requests waiting in the queue."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        """Whether a batch is running (its callers may all have left meanwhile)."""
        return self._running > 0

    def submit(
        self, inputs: Tensors, deadline: float | None, finish: Finish, ready: Any = None
    ) -> Future[Answer]:
        """Queues a request; RESOURCE_EXHAUSTED (LimitExceeded) at once when the queue is full.
        `ready`: the event after which inputs made on another CUDA stream may be read."""
        request = Request(inputs, deadline, finish, ready)
        with self._cond:
            if self._closed:
                raise ShuttingDown("this model version is being unloaded")
            if len(self._queue) >= self.policy.max_queue_size:
                raise LimitExceeded(
                    f"queue full: {self.policy.max_queue_size} requests already waiting "
                    "(max_queue_size)"
                )
            self._queue.append(request)
            self._cond.notify_all()
        return request.future

    def close(self) -> None:
        """Stops taking requests, waits for those queued and running, leaves the lane (once:
        closing it again does nothing). Queued requests whose callers have left are
        dropped at once: they would wait for the lane's turn only to be dropped there."""
        with self._cond:
            if self._left:
                return
            self._closed = True
            for request in [r for r in self._queue if r.future.cancelled()]:
                self._queue.remove(request)
                self.statistics.failed(request.enqueued)
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._queue and not self._running)
            self._left = True
        self._lane.detach(self)
        self._lane.release()

    # On the lane's thread

    def gather(self, *, wait: bool = True) -> list[Request]:
        """Takes the oldest request and collects a batch around it (call with `cond` held);
        without `wait`, of the requests queued now."""
        batch = [self._queue.popleft()]
        rows = batch[0].rows
        elements = batch[0].elements if self._max_elements is not None else 0
        until = batch[0].enqueued + self.policy.max_queue_delay_us / 1e6
        while self._splittable and not self._alone(batch[0]) and rows < self.policy.batch_rows:
            if self._queue:
                following = self._queue[0]
                if rows + following.rows > self.policy.batch_rows:
                    break
                if self._max_elements is not None:
                    # A batch holds no more than one request may: the model's activations
                    # grow with it (a segmentation model's, ~45x the input's bytes).
                    elements += following.elements
                    if elements > self._max_elements:
                        break
                batch.append(self._queue.popleft())
                rows += following.rows
                continue
            remaining = until - time.monotonic()
            if (
                remaining <= 0
                or len(batch) >= self._last_batch
                or self._closed
                or not wait
                or self._lane.busy_elsewhere(self)
            ):
                break
            self._cond.wait(remaining)
        self._last_batch = len(batch)
        self._running += 1
        return batch

    def run(self, batch: list[Request]) -> Then | None:
        """Runs a gathered batch: drops expired requests, launches each signature group.
        With an asynchronous runner, returns what finishes the batch (the lane calls it
        after launching the next one); otherwise finishes it before returning."""
        launched: list[tuple[list[Request], Then]] = []
        try:
            for group in self._groups(batch):
                try:
                    launched.append((group, self._start(group)))
                except Exception as error:
                    self._fail_group(group, error)
        except BaseException as error:  # a bug: its callers are told, not left waiting
            self._done()
            for request in batch:
                request.fail(error)
            raise

        def finish() -> None:
            try:
                for group, then in launched:
                    try:
                        then()
                    except Exception as error:
                        self._fail_group(group, error)
            finally:
                self._done()

        if self._launch is None:
            finish()
            return None
        return finish

    def _groups(self, batch: list[Request]) -> list[list[Request]]:
        """The live requests of a batch, by signature; the expired and cancelled dropped."""
        now = time.monotonic()
        groups: dict[object, list[Request]] = {}
        for request in batch:
            if not request.future.set_running_or_notify_cancel():
                self.statistics.failed(request.enqueued)
                continue  # the caller went away
            if request.deadline is not None and now > request.deadline:
                self.statistics.failed(request.enqueued)
                request.fail(DeadlineExpired("deadline passed while the request was queued"))
                continue
            groups.setdefault(self._group_of(request), []).append(request)
        return list(groups.values())

    def _group_of(self, request: Request) -> object:
        """What a request may be concatenated with: requests of its signature."""
        return id(request) if self._alone(request) else request.signature

    def _alone(self, request: Request) -> bool:
        """Whether a request runs alone: a vector (or a scalar) of a model that does not
        say its first dimension is rows. `nn.Linear` takes a vector as one sample, and two
        callers' halves of one would make a vector whose answer is split between them
        (red team 15, F3)."""
        return not self._vectors_are_rows and any(t.dim() < 2 for t in request.inputs.values())

    def _done(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def _start(
        self, group: list[Request], failed: Callable[[list[Request]], None] | None = None
    ) -> Then:
        """Launches a group as one batch; what finishes it. If the batch fails, `failed`
        gets the group (by default it runs again in halves: `_in_halves`)."""
        if len(group) == 1:
            return self._start_one(group[0])
        if not self._splittable:
            self._one_by_one(group)
            return _nothing
        failed = failed or self._in_halves  # to the request that causes the failure
        started = time.monotonic()
        self._ready(group)
        try:
            inputs = {n: self._join([r.inputs[n] for r in group]) for n in group[0].inputs}
        except Exception:  # no memory to join them in (pinned, for a GPU): smaller batches
            failed(group)
            return _nothing
        joined = time.monotonic()
        collect = self._try_launch(inputs)
        del inputs  # out of the except block: a failed allocation gets its memory back
        if collect is None:
            failed(group)
            return _nothing
        return lambda: self._finish_group(group, collect, (started, joined), failed)

    def _try_launch(self, inputs: Tensors) -> Collect | None:
        try:
            return self._launch_or_run(inputs)
        except Exception:
            return None

    def _launch_or_run(self, inputs: Tensors) -> Collect:
        if self._launch is not None:
            return self._launch(inputs)
        outputs = self._run(inputs)
        return lambda: outputs

    def _finish_group(
        self,
        group: list[Request],
        collect: Collect,
        times: tuple[float, float],
        failed: Callable[[list[Request]], None],
    ) -> None:
        """Waits for a launched group, then splits its outputs and answers each caller."""
        try:
            outputs = collect()
        except Exception:
            outputs = None
        if outputs is None:
            failed(group)
            return
        ran = time.monotonic()
        rows = [r.rows for r in group]
        total = sum(rows)
        if any(t.dim() == 0 or t.shape[0] != total for t in outputs.values()):
            log.info("outputs cannot be split by rows: batching off for this model")
            self._splittable = False
            self._one_by_one(group)
            return
        self._notify(len(group), total)
        parts = {name: torch.split(t, rows) for name, t in outputs.items()}
        answers = [
            self._finish(request, {name: chunks[index] for name, chunks in parts.items()})
            for index, request in enumerate(group)
        ]
        self._deliver(group, answers, (*times, ran, time.monotonic()))

    def _one_by_one(self, group: list[Request]) -> None:
        """Runs each request alone, to the end (rows that don't split)."""
        for request in group:
            self._start_one(request)()

    def _in_halves(self, group: list[Request]) -> None:
        """Runs a failed batch again as two batches, to the end; a half that fails alone is
        halved in turn, down to the request that fails. A caller whose rows make the model
        fail then costs a batch about 2*log2(n) runs, and the others still run batched
        (one by one, it cost n runs of one request each: red team 8's M2). When both
        halves fail, failing rows are many: each request then runs alone (n runs more,
        not the 2n that halving each half would take: red team 9's L6)."""
        if self._on_split:
            self._on_split()
        half = len(group) // 2
        failures: list[list[Request]] = []
        for part in (group[:half], group[half:]):
            self._start(part, failures.append)()
        if len(failures) == 2:
            for part in failures:
                self._one_by_one(part)
        elif failures:
            self._in_halves(failures[0])

    def _fail_group(self, group: list[Request], error: Exception) -> None:
        """Fails the requests of a group that broke outside the model call (a bug: each
        caller gets INTERNAL with a request id)."""
        log.error("batch of %d requests failed outside the model call", len(group), exc_info=error)
        if self._on_error:
            self._on_error()
        for request in group:
            if not request.future.done():
                self.statistics.failed(request.enqueued)
                request.fail(error)

    def _ready(self, requests: list[Request]) -> None:
        for request in requests:
            if request.ready is not None and self._adopt is not None:
                self._adopt(request.inputs, request.ready)
                request.ready = None

    def _start_one(self, request: Request) -> Then:
        """Launches one request alone; what finishes it."""
        started = time.monotonic()
        self._ready([request])
        try:
            collect = self._launch_or_run(request.inputs)
        except Exception as error:
            self._failed(request, error)
            return _nothing

        def then() -> None:
            try:
                outputs = collect()
            except Exception as error:
                self._failed(request, error)
                return
            ran = time.monotonic()
            self._notify(1, request.rows)
            answer = self._finish(request, outputs)
            self._deliver([request], [answer], (started, started, ran, time.monotonic()))

        return then

    def _failed(self, request: Request, error: Exception) -> None:
        self.statistics.failed(request.enqueued)
        request.fail(error if isinstance(error, ModelHostFailure) else _unexpected(error))

    def _finish(self, request: Request, outputs: Tensors) -> Answer | Exception:
        """Encodes a request's outputs, or says why that failed."""
        try:
            return request.finish(outputs)
        except Exception as error:
            return error if isinstance(error, ModelHostFailure) else _unexpected(error)

    def _deliver(
        self,
        group: list[Request],
        answers: list[Answer | Exception],
        times: tuple[float, float, float, float],
    ) -> None:
        """Records the batch's statistics, then answers its callers (so a caller that
        has its answer also finds it counted)."""
        requests = [
            (r.rows, r.enqueued, not isinstance(answer, Exception))
            for r, answer in zip(group, answers, strict=True)
        ]
        self.statistics.batch(requests, times)
        for request, answer in zip(group, answers, strict=True):
            if isinstance(answer, Exception):
                request.fail(answer)
            elif not request.future.done():
                request.future.set_result(answer)

    def _notify(self, requests: int, rows: int) -> None:
        if self._observe:
            self._observe(requests, rows)


def _nothing() -> None:
    """What finishes a group that is finished already."""


def _unexpected(error: Exception) -> Exception:
    log.error("model run failed", exc_info=error)
    return error
