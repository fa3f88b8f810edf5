"""Calling the server in a container from the host: clients, a model, load, metrics."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import images, reference, serve
from container.docker import Container
from modelhost.client import ChannelConfig, ModelHostClient, ModelHostError

MODEL = "r18"


def connect(
    target: str,
    token: str | None = None,
    *,
    timeout: float = 60,
    retries: bool = True,
    ca_file: str | None = None,
) -> ModelHostClient:
    """A client with the library's defaults but for the token (and a CA for TLS)."""
    config = ChannelConfig(token=token, ca_file=ca_file, retries=retries)
    return ModelHostClient(target, timeout=timeout, config=config)


def serve_model(client: ModelHostClient, name: str = MODEL) -> torch.nn.Module:
    """Uploads resnet18 (10 classes, seed 0) and loads it as `name`; returns its twin."""
    return serve(client, name, checkpoint=f"{name}-weights")


def check_predict(client: ModelHostClient, model: torch.nn.Module, name: str = MODEL) -> None:
    """A Predict through `client` answers what the in-process model computes."""
    x = images(2, 32, seed=7)
    np.testing.assert_allclose(client.predict(name, x), reference(model, x), rtol=1e-4, atol=1e-4)


def metrics(container: Container) -> str:
    url = f"http://127.0.0.1:{container.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        return answer.read().decode()


def predicts(container: Container, model: str = MODEL) -> dict[str, float]:
    """The replica's Predict calls of `model` by status code, from its /metrics."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics(container)):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "modelhost_requests_total"
                and labels.get("method") == "Predict"
                and labels.get("model") == model
            ):
                counts[labels["code"]] = counts.get(labels["code"], 0) + sample.value
    return counts


@dataclass
class Call:
    began: float  # time.time()
    ended: float
    error: str = ""  # the status code name of a failed call


@dataclass
class Load:
    """Predict calls from `threads` threads, each in a loop, until stopped."""

    client: ModelHostClient
    threads: int
    x: np.ndarray[Any, Any]
    expected: np.ndarray[Any, Any]
    calls: list[Call] = field(default_factory=list)
    wrong: int = 0  # calls that answered something else than the in-process model
    _stop: threading.Event = field(default_factory=threading.Event)

    def _work(self) -> None:
        while not self._stop.is_set():
            began = time.time()
            try:
                out = self.client.predict(MODEL, self.x)
            except ModelHostError as error:
                code = error.code.name if error.code else type(error).__name__
                self.calls.append(Call(began, time.time(), code))
                time.sleep(0.01)
                continue
            self.calls.append(Call(began, time.time()))
            if not np.allclose(out, self.expected, rtol=1e-4, atol=1e-4):
                self.wrong += 1

    @contextmanager
    def running(self) -> Iterator[Load]:
        workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.threads)]
        for worker in workers:
            worker.start()
        try:
            yield self
        finally:
            self._stop.set()
            for worker in workers:
                worker.join(120)

    def failures(self) -> Counter[str]:
        return Counter(call.error for call in self.calls if call.error)

    def wait_calls(self, count: int, timeout: float = 60) -> None:
        """Waits until `count` more calls have ended."""
        goal = len(self.calls) + count
        deadline = time.monotonic() + timeout
        while len(self.calls) < goal:
            assert time.monotonic() < deadline, f"{len(self.calls)} calls, wanted {goal}"
            time.sleep(0.05)
