"""Per-version inference statistics: what the OIP ModelStatistics extension reports.

The batcher records every batch it runs and every request it fails; readers take a
consistent `snapshot`. Durations are monotonic nanoseconds.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Duration:
    """How many times something happened and how long it took in all."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class Phases:
    """The three parts of running a batch."""

    input: Duration = field(default_factory=Duration)  # joining requests into one batch
    infer: Duration = field(default_factory=Duration)  # device round trip and the model
    output: Duration = field(default_factory=Duration)  # splitting and encoding answers

    def add(self, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.input.add(input_ns)
        self.infer.add(infer_ns)
        self.output.add(output_ns)


@dataclass
class Statistics:
    """Counts and cumulative durations of one model version; safe across threads."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Phases = field(default_factory=Phases)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Phases] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def batch(
        self,
        requests: Sequence[tuple[int, float, bool]],
        times: tuple[float, float, float, float],
    ) -> None:
        """A batch ran: each request as (rows, enqueued, answered), and the monotonic
        times it started, was joined, had run and was delivered."""
        started, joined, ran, done = (int(t * 1e9) for t in times)
        phases = (joined - started, ran - joined, done - ran)
        with self._lock:
            self.execution_count += 1
            self.batches.setdefault(sum(rows for rows, *_ in requests), Phases()).add(*phases)
            for rows, enqueued, answered in requests:
                since = int(enqueued * 1e9)
                self.queue.add(started - since)
                self.compute.add(*phases)
                if answered:
                    self.success.add(done - since)
                    self.inference_count += rows
                else:
                    self.fail.add(done - since)
            self.last_inference_ms = int(time.time() * 1000)

    def failed(self, enqueued: float) -> None:
        """A request failed before its batch ran (deadline passed, model refused it)."""
        now = time.monotonic()
        with self._lock:
            self.fail.add(int((now - enqueued) * 1e9))

    def snapshot(self) -> Statistics:
        """A consistent copy."""
        with self._lock:
            return Statistics(
                success=copy.copy(self.success),
                fail=copy.copy(self.fail),
                queue=copy.copy(self.queue),
                compute=copy.deepcopy(self.compute),
                inference_count=self.inference_count,
                execution_count=self.execution_count,
                last_inference_ms=self.last_inference_ms,
                batches=copy.deepcopy(self.batches),
            )
