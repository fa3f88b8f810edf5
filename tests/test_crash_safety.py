"""Crash safety: SIGKILL a server process in the middle of uploads, again and again.

Several clients upload real checkpoints of different sizes (some replacing existing
names) while the server is killed at a random moment; then it is restarted on the
same store. After every restart:

- the store holds no temp files and no blob that no entry refers to;
- every listed checkpoint downloads with a matching sha256, and its bytes are one
  of the versions uploaded under that name;
- a name is never lost or mixed up: it holds its previous version or one of the
  uploads that may have committed meanwhile (acknowledged uploads are durable,
  uploads the server refused are not stored, an upload acknowledged before another
  one started is superseded by it).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from helpers.processes import ServerProcess
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc as pb_grpc

NAMES = ("ck-a", "ck-b", "ck-c", "ck-d")
PAYLOAD_MB = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
CHUNK_BYTES = 128 << 10
UPLOADERS = 4
KILLS_MID_UPLOAD = 20  # rounds in which the kill hit at least one upload in flight
MAX_ROUNDS = 40
CALL_TIMEOUT = 60.0
DEFINITE_FAILURES = {grpc.StatusCode.ALREADY_EXISTS}  # answers that mean "not stored"

Stored = dict[str, str]  # name -> sha256


@dataclass
class Payload:
    data: bytes
    sha256: str


@dataclass
class Attempt:
    """One upload: what it sent and what came of it (None: still in flight)."""

    name: str
    sha256: str
    overwrite: bool
    started: float
    finished: float | None = None
    code: grpc.StatusCode | None = None


def make_payloads(seed: int) -> list[Payload]:
    """torch.save'd state_dicts (and one general checkpoint) of various sizes."""
    generator = torch.Generator().manual_seed(seed)
    payloads = []
    for index, megabytes in enumerate(PAYLOAD_MB):
        floats = int(megabytes * (1 << 20) / 4)
        state = {
            "layer.weight": torch.randn(floats - 64, generator=generator),
            "layer.bias": torch.randn(64, generator=generator),
        }
        obj: object = state
        if index % 3 == 2:
            obj = {"model_state_dict": state, "epoch": index, "loss": 0.5}
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getvalue()
        payloads.append(Payload(data, hashlib.sha256(data).hexdigest()))
    return payloads


def upload_stream(
    name: str, payload: Payload, overwrite: bool, pace: float
) -> Iterator[pb.SaveCheckpointRequest]:
    header = pb.SaveCheckpointHeader(
        name=name,
        overwrite=overwrite,
        upload=pb.Upload(size_bytes=len(payload.data), sha256=payload.sha256),
    )
    yield pb.SaveCheckpointRequest(header=header)
    view = memoryview(payload.data)
    for start in range(0, len(view), CHUNK_BYTES):
        if pace:
            time.sleep(pace)  # a slower client: more kills land mid-stream
        yield pb.SaveCheckpointRequest(chunk=bytes(view[start : start + CHUNK_BYTES]))


class Uploaders:
    """Threads that upload random payloads under random names until stopped."""

    def __init__(self, target: str, payloads: list[Payload], rng: random.Random) -> None:
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._payloads = payloads
        self._seeds = [rng.randrange(1 << 30) for _ in range(UPLOADERS)]
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.ModelHostStub(self._channel)
        self._threads = [
            threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in self._seeds
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            name = rng.choice(NAMES)
            payload = rng.choice(self._payloads)
            attempt = Attempt(name, payload.sha256, rng.random() < 0.8, time.monotonic())
            pace = rng.choice((0.0, 0.0, 0.002, 0.005))
            with self._lock:
                self.attempts.append(attempt)
            try:
                self._stub.SaveCheckpoint(
                    upload_stream(name, payload, attempt.overwrite, pace), timeout=CALL_TIMEOUT
                )
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
            attempt.code = code
            attempt.finished = time.monotonic()
            if code not in (grpc.StatusCode.OK, *DEFINITE_FAILURES):
                return  # the server is gone

    def in_flight(self) -> list[Attempt]:
        with self._lock:
            return [a for a in self.attempts if a.finished is None]

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT + 10)
            assert not thread.is_alive(), "an upload did not end after the server died"
        self._channel.close()


def possible_states(before: str | None, attempts: list[Attempt]) -> set[str | None]:
    """What a name may hold after a crash, given what it held before and this round's uploads."""
    acked = [a for a in attempts if a.code == grpc.StatusCode.OK]
    possible: set[str | None] = set() if acked else {before}
    for attempt in attempts:
        if attempt.code in DEFINITE_FAILURES:
            continue  # refused: never stored
        finished = attempt.finished
        if attempt.code == grpc.StatusCode.OK and any(
            finished is not None and finished < later.started for later in acked
        ):
            continue  # committed, then replaced by an upload that started later
        possible.add(attempt.sha256)
    return possible


def check_disk(store: Path) -> Stored:
    """No temp files (only the running server's owner lock), no unreferenced or corrupt
    blobs; returns the entries."""
    leftovers = sorted(p.name for p in (store / "tmp").iterdir())
    owners = [name for name in leftovers if name.endswith(".owner")]
    assert len(owners) == 1, f"owner locks after restart: {owners}"
    assert leftovers == owners, f"temp files left after restart: {leftovers}"
    entries: Stored = {}
    for path in (store / "checkpoints").glob("*.json"):
        entries[path.stem] = json.loads(path.read_bytes())["sha256"]
    blobs = {p.name for p in (store / "blobs").iterdir()}
    assert blobs == set(entries.values()), (
        f"unreferenced blobs {sorted(blobs - set(entries.values()))}, "
        f"missing blobs {sorted(set(entries.values()) - blobs)}"
    )
    for blob in blobs:
        assert hashlib.sha256((store / "blobs" / blob).read_bytes()).hexdigest() == blob
    return entries


def check_served(target: str, known: dict[str, Payload]) -> Stored:
    """Lists and downloads every checkpoint over gRPC; each must pass its sha256."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ModelHostStub(channel)
        listed = stub.ListCheckpoints(pb.ListCheckpointsRequest(), timeout=CALL_TIMEOUT)
        found: Stored = {}
        for info in listed.checkpoints:
            digest = hashlib.sha256()
            size = 0
            header = None
            for message in stub.DownloadCheckpoint(
                pb.DownloadCheckpointRequest(name=info.name), timeout=CALL_TIMEOUT
            ):
                if message.HasField("info"):
                    header = message.info
                else:
                    digest.update(message.chunk)
                    size += len(message.chunk)
            assert header is not None and header.sha256 == info.sha256
            assert digest.hexdigest() == info.sha256, f"{info.name}: bytes fail their sha256"
            assert size == info.size_bytes == len(known[info.sha256].data), info.name
            found[info.name] = info.sha256
        return found


@pytest.mark.slow
def test_sigkill_during_uploads_leaves_a_consistent_store(tmp_path: Path) -> None:
    rng = random.Random(20261128)
    payloads = make_payloads(seed=rng.randrange(1 << 30))
    known = {p.sha256: p for p in payloads}
    store = tmp_path / "store"
    state: Stored = {}  # what the store held at the last check
    mid_upload_kills = overwrites_killed = rounds = 0
    recovered_temp_files = 0
    began = time.monotonic()

    with ServerProcess.start(store) as server:
        while mid_upload_kills < KILLS_MID_UPLOAD:
            rounds += 1
            assert rounds <= MAX_ROUNDS, f"only {mid_upload_kills} kills hit an upload"
            uploaders = Uploaders(server.target, payloads, rng)
            time.sleep(rng.uniform(0.05, 1.0))
            kill_time = time.monotonic()
            in_flight = uploaders.in_flight()
            server.kill()
            uploaders.stop()

            attempts = uploaders.attempts
            early = [
                (a.name, a.code)
                for a in attempts
                if a.finished is not None
                and a.finished < kill_time
                and a.code not in (grpc.StatusCode.OK, *DEFINITE_FAILURES)
            ]
            assert early == [], f"uploads failed while the server was up: {early}"
            mid_upload_kills += bool(in_flight)
            overwrites_killed += any(a.overwrite and a.name in state for a in in_flight)

            recovered_temp_files += sum(
                1 for path in (store / "tmp").iterdir() if path.suffix != ".owner"
            )
            server.launch()
            on_disk = check_disk(store)
            served = check_served(server.target, known)
            assert served == on_disk
            for name in NAMES:
                mine = [a for a in attempts if a.name == name]
                allowed = possible_states(state.get(name), mine)
                assert served.get(name) in allowed, (
                    f"round {rounds}: {name} holds {served.get(name)}, expected one of "
                    f"{allowed} (before: {state.get(name)}, uploads: {mine})"
                )
            assert set(served) <= set(NAMES)
            state = served

    elapsed = time.monotonic() - began
    print(
        f"\ncrash safety: {rounds} kills ({mid_upload_kills} mid-upload, {overwrites_killed} "
        f"during an overwrite), {recovered_temp_files} temp files left by kills, "
        f"last start {server.start_seconds:.1f}s, {elapsed:.0f}s in all"
    )
    assert recovered_temp_files > 0, "no kill ever left a temp file: the test hit nothing"
    assert overwrites_killed > 0, "no kill ever hit an overwrite of a stored checkpoint"
