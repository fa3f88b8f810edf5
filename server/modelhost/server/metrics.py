"""Prometheus metrics, served on their own port (`metrics_port`).

Each server has its own registry, so several servers in one process (tests) do not
collide. Queue depth and device memory are read from the registry at scrape time.

Series labelled by model exist while the model is hosted: a version's own series
(batches, evictions, page-ins) go when it is unloaded, and the name's (requests,
latency, loads, background compiles) when its last version is. A value recorded for a
name that is not hosted (an unknown name, or one unloaded meanwhile) counts under
model="", so names that come and go cannot grow the scrape without bound.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any, Generic, Protocol, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from modelhost.server.hosted import HOST, RESIDENT, STORE
from modelhost.server.registry import Registry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PAGE_IN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

READ_TIMEOUT = 5.0
"""Seconds a /metrics connection has, from its accept, to send its whole request line and
headers (however it trickles them), and may then leave each write of the reply unread,
before it is closed."""
MAX_REQUEST_BYTES = 8 << 10
"""Most bytes of a /metrics request line and headers together (a scrape sends a few
hundred); a larger request gets 431 and its connection is closed."""
MAX_CONNECTIONS = 32
"""/metrics connections served at once (a thread each); more are closed unanswered."""


M = TypeVar("M", Counter, Histogram)


class _Names:
    """Which model names may label series: the hosted ones (every name, until `watch`)."""

    def __init__(self) -> None:
        # Held while a name-labelled series is looked up or made, and while a name's
        # series are removed: a value recorded after the removal cannot bring them back.
        self.lock = threading.Lock()
        self.registry: Registry | None = None

    def hosted(self, name: str) -> bool:
        return self.registry is None or self.registry.hosts(name)


class PerName(Generic[M]):
    """A metric family with a model label, whose series exist while that name is hosted.

    `labels` is the family's: a name that is not hosted when the value is recorded
    counts as model="". `forget` removes a name's series (its last version is gone)."""

    def __init__(self, family: M, model_at: int, names: _Names) -> None:
        self.family: M = family
        self._at = model_at
        self._names = names
        self._made: dict[str, set[tuple[str, ...]]] = {}  # label values by name

    def labels(self, *values: str) -> M:
        model = values[self._at]
        with self._names.lock:
            if model and not self._names.hosted(model):
                model = ""
                values = (*values[: self._at], "", *values[self._at + 1 :])
            if model:
                self._made.setdefault(model, set()).add(values)
            return self.family.labels(*values)

    def forget(self, model: str) -> None:
        """Removes `model`'s series (call holding the names' lock)."""
        for values in self._made.pop(model, ()):
            with contextlib.suppress(KeyError):
                self.family.remove(*values)


class CacheUsage(Protocol):
    def usage(self) -> dict[str, tuple[int, int | None]]: ...

    def host_usage(self) -> tuple[int, int]: ...


class Metrics:
    """The server's metrics; `describe()` lists them for the README."""

    def __init__(self) -> None:
        self._http: WSGIServer | None = None
        self.registry = CollectorRegistry()
        r = self.registry
        self._names = names = _Names()
        self.requests = PerName(
            Counter(
                "modelhost_requests",
                "RPCs handled, by method, model and status code.",
                ["method", "model", "code"],
                registry=r,
            ),
            1,
            names,
        )
        self.latency = PerName(
            Histogram(
                "modelhost_request_seconds",
                "RPC wall time in seconds, by method and model.",
                ["method", "model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            1,
            names,
        )
        self.batch_rows = Histogram(
            "modelhost_batch_rows",
            "Rows (batch dimension) per model run.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "modelhost_batch_requests",
            "Predict requests merged into one model run.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_errors = Counter(
            "modelhost_batch_errors",
            "Batches that failed outside the model call (a bug: their requests got INTERNAL).",
            ["model", "version"],
            registry=r,
        )
        self.batch_splits = Counter(
            "modelhost_batch_splits",
            "Batches that failed and ran again in halves, down to the request that fails (a "
            "request the model refuses, a batch over a memory bound or out of memory).",
            ["model", "version"],
            registry=r,
        )
        self.load_seconds = PerName(
            Histogram(
                "modelhost_load_seconds",
                "LoadModel time in seconds, by model.",
                ["model"],
                buckets=LOAD_BUCKETS,
                registry=r,
            ),
            0,
            names,
        )
        self.checkpoint_bytes = Counter(
            "modelhost_checkpoint_bytes",
            "Checkpoint bytes received (in) and sent (out).",
            ["direction"],
            registry=r,
        )

        self.evictions = Counter(
            "modelhost_evictions",
            "Versions taken off their device to make room, by model, version and the tier "
            "they went to (host, store).",
            ["model", "version", "tier"],
            registry=r,
        )
        self.page_ins = Counter(
            "modelhost_page_ins",
            "Versions brought back to their device, by model, version and the tier they came from.",
            ["model", "version", "tier"],
            registry=r,
        )
        self.page_ins_skipped = Counter(
            "modelhost_page_ins_skipped",
            "Page-ins not done because every request waiting for them had passed its deadline.",
            registry=r,
        )
        self.room_claims = Counter(
            "modelhost_room_claims",
            "Claims on room held by busy versions, by how they ended: got_room (it got its "
            "room), lapsed (its victims did not drain in time: nothing was evicted), "
            "given_up (its requests left, or its load failed or lost its caller).",
            ["outcome"],
            registry=r,
        )
        self.page_in_seconds = Histogram(
            "modelhost_page_in_seconds",
            "Page-in time in seconds (the copy or the load, after any wait for room), by "
            "the tier it came from.",
            ["tier"],
            buckets=PAGE_IN_BUCKETS,
            registry=r,
        )
        self.compiles = PerName(
            Counter(
                "modelhost_background_compiles",
                "Compiles of compiled versions for input shapes met after their load, by model "
                "and outcome (compiled, failed).",
                ["model", "outcome"],
                registry=r,
            ),
            0,
            names,
        )
        self.compile_seconds = Histogram(
            "modelhost_background_compile_seconds",
            "Time of a background compile in seconds (requests of its shape run uncompiled "
            "meanwhile).",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            "modelhost_cache_requests",
            "Requests for a version that found it resident (hit) or waited for its "
            "page-in (miss, also when the page-in failed); the hit ratio is hit / (hit + "
            "miss). Requests whose version was unloaded while they waited count in neither.",
            ["result"],
            registry=r,
        )

    def watch_cache(self, cache: CacheUsage) -> None:
        """Reports each device's resident bytes and budget at scrape time."""
        self.registry.register(_CacheCollector(cache))

    def watch(self, registry: Registry) -> None:
        """Reports queue depth and device memory of every hosted version at scrape time;
        from now on only names `registry` hosts label series."""
        self._names.registry = registry
        self.registry.register(_HostedCollector(registry))

    def batch_observer(self, model: str, version: int) -> Callable[[int, int], None]:
        rows = self.batch_rows.labels(model, str(version))
        requests = self.batch_requests.labels(model, str(version))

        def observe(count: int, total_rows: int) -> None:
            requests.observe(count)
            rows.observe(total_rows)

        return observe

    def compile_observer(self, model: str) -> Callable[[bool, float], None]:
        def observe(compiled: bool, seconds: float) -> None:
            self.compiles.labels(model, "compiled" if compiled else "failed").inc()
            self.compile_seconds.observe(seconds)

        return observe

    def forget_version(self, model: str, version: int) -> None:
        """Drops an unloaded version's series: kept, they would pile up with every rollout
        (and every scrape would carry them). Once no version of `model` is hosted, drops
        the name's series too (a version that replaces another keeps them counting)."""
        for family in (self.batch_rows, self.batch_requests, self.batch_errors, self.batch_splits):
            with contextlib.suppress(KeyError):
                family.remove(model, str(version))
        for family in (self.page_ins, self.evictions):
            for tier in (RESIDENT, HOST, STORE):
                with contextlib.suppress(KeyError):
                    family.remove(model, str(version), tier)
        with self._names.lock:
            if not self._names.hosted(model):
                self.requests.forget(model)
                self.latency.forget(model)
                self.load_seconds.forget(model)
                self.compiles.forget(model)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint; returns its port."""
        family, *_, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._http = _HTTPServer(family, (str(address[0]), port))
        self._http.set_app(make_wsgi_app(self.registry))
        threading.Thread(
            target=self._http.serve_forever, name="modelhost-metrics", daemon=True
        ).start()
        return int(self._http.server_port)

    def close(self) -> None:
        """Stops the /metrics endpoint, if it runs."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _TooLarge(Exception):
    """The request line and headers passed MAX_REQUEST_BYTES."""


class _RequestReader:
    """A connection's input, as `http.server` reads it (`readline`, `read`): everything
    must arrive within READ_TIMEOUT of the accept and within MAX_REQUEST_BYTES. A socket
    timeout alone bounds each read, so a caller that sent one byte every few seconds kept
    its connection, and one of MAX_CONNECTIONS, for as long as it liked (red team 8, L2):
    here each read waits only for what is left of the deadline."""

    def __init__(self, connection: socket.socket, deadline: float) -> None:
        self._connection = connection
        self._deadline = deadline
        self._buffer = bytearray()
        self._received = 0

    def _receive(self) -> bool:
        """Adds what arrives next to the buffer; False at the end of the input."""
        if self._received >= MAX_REQUEST_BYTES:
            raise _TooLarge
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the request did not arrive within {READ_TIMEOUT:g}s")
        self._connection.settimeout(left)
        chunk = self._connection.recv(min(4096, MAX_REQUEST_BYTES - self._received))
        self._received += len(chunk)
        self._buffer += chunk
        return bool(chunk)

    def _take(self, size: int) -> bytes:
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        return taken

    def readline(self, size: int | None = -1) -> bytes:
        limit = size if size is not None and size >= 0 else None
        if limit == 0:
            return b""
        while True:
            end = self._buffer.find(b"\n") + 1  # 0: no whole line yet
            if limit is not None and len(self._buffer) >= limit and not 0 < end <= limit:
                end = limit
            if end or not self._receive():
                return self._take(end or len(self._buffer))

    def read(self, size: int | None = -1) -> bytes:
        """`wsgi.input` (the /metrics app reads no body), under the same bounds."""
        while (size is None or size < 0 or len(self._buffer) < size) and self._receive():
            pass
        return self._take(len(self._buffer) if size is None or size < 0 else size)

    def close(self) -> None:
        """The server closes the connection itself."""


class _Handler(WSGIRequestHandler):
    timeout = READ_TIMEOUT  # of each write of the reply (reads: `_RequestReader`)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the buffered file `setup` made: unused
        self.rfile = _RequestReader(self.connection, time.monotonic() + READ_TIMEOUT)  # type: ignore[assignment]

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self.connection.settimeout(self.timeout)  # for each write of the reply
        return parsed

    def handle(self) -> None:
        try:
            super().handle()
        except _TooLarge:
            self.requestline = self.request_version = self.command = ""
            self.close_connection = True
            self.connection.settimeout(self.timeout)
            self.send_error(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                explain=f"the request line and headers pass {MAX_REQUEST_BYTES} bytes",
            )

    def log_message(self, format: str, *args: Any) -> None:
        """Logs nothing: scrapes are frequent."""


class _HTTPServer(socketserver.ThreadingMixIn, WSGIServer):
    """The HTTP server of prometheus_client's `start_http_server` (a thread per
    connection), with a deadline and a size bound on each request (`_RequestReader`) and
    at most MAX_CONNECTIONS connections, so idle or trickling connections cannot pile up
    threads or hold every slot."""

    daemon_threads = True
    block_on_close = False  # `close()` does not wait for connections still open

    def __init__(self, family: socket.AddressFamily, address: tuple[str, int]) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Closes timed-out and broken connections quietly; prints anything else."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _HostedCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "modelhost_queue_depth",
            "Predict requests waiting, by model version.",
            labels=["model", "version"],
        )
        memory = GaugeMetricFamily(
            "modelhost_model_device_bytes",
            "Bytes a resident version holds on its device (weights, buffers, warm-up "
            "workspace), by model version.",
            labels=["model", "version", "device"],
        )
        for hosted in self._registry.all():
            labels = [hosted.name, str(hosted.version)]
            depth.add_metric(labels, hosted.batcher.depth)
            if hosted.tier == RESIDENT:
                memory.add_metric([*labels, str(hosted.loaded.device)], hosted.device_bytes)
        yield depth
        yield memory


class _CacheCollector(Collector):
    def __init__(self, cache: CacheUsage) -> None:
        self._cache = cache

    def collect(self) -> Iterator[GaugeMetricFamily]:
        resident = GaugeMetricFamily(
            "modelhost_device_resident_bytes",
            "Bytes resident versions (and loads in progress) hold, by device.",
            labels=["device"],
        )
        budget = GaugeMetricFamily(
            "modelhost_device_budget_bytes",
            "The device memory budget (device_memory_budget), by device; absent: no limit.",
            labels=["device"],
        )
        for device, (used, limit) in sorted(self._cache.usage().items()):
            resident.add_metric([device], used)
            if limit is not None:
                budget.add_metric([device], limit)
        held, host_limit = self._cache.host_usage()
        yield resident
        yield budget
        yield GaugeMetricFamily(
            "modelhost_host_tier_bytes",
            "Host memory the weights of evicted versions hold (the host tier), counted as "
            "PyTorch's pinned allocator rounds it.",
            value=held,
        )
        yield GaugeMetricFamily(
            "modelhost_host_tier_budget_bytes",
            "The host tier's budget (host_memory_budget).",
            value=host_limit,
        )
