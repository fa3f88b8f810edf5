"""Dynamic batching: merged runs, own rows back, queue limits, deadlines, isolation."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import assert_same_detections, images, reference, serve, serve_detector
from helpers.models import Recorder, domain
from modelhost.client import ModelHostClient, ModelHostError, codec
from modelhost.server import Server, Settings, running
from modelhost.server.batching import Lane, LanePool, preferred_batch_size
from modelhost.server.statistics import Statistics


def concurrently(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Runs the calls on threads, released together; returns results or exceptions."""
    results: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = calls[index]()
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def load_recorder(client: ModelHostClient, name: str, **args: Any) -> None:
    batching = args.pop("batching", {})
    serve(
        client,
        name,
        architecture="recorder",
        checkpoint=f"{name}-w",
        overwrite=True,
        architecture_args=args,
        batching=batching,
    )


def ids(first: float, rows: int) -> np.ndarray[Any, Any]:
    return np.stack(
        [np.arange(first, first + rows, dtype=np.float32), np.ones(rows, np.float32)], axis=1
    )


@pytest.fixture(autouse=True)
def clear_recorder() -> None:
    Recorder.calls.clear()


def statistics(server: Server, model: str) -> Statistics:
    """What the OIP ModelStatistics call reports for the newest version of `model`."""
    assert server.host is not None
    return server.host.models.get(model).batcher.statistics.snapshot()


def test_concurrent_requests_get_their_own_rows(client: ModelHostClient, server: Server) -> None:
    model = serve(
        client, "m", checkpoint="w", batching={"max_batch_size": 16, "max_queue_delay_us": 50_000}
    )
    inputs = [
        images(rows, size=size, seed=i)
        for i, (rows, size) in enumerate(
            [(1, 32), (3, 32), (2, 40), (5, 32), (1, 40), (4, 32), (2, 32), (1, 32)]
        )
    ]
    clients = [ModelHostClient(server.target, timeout=60) for _ in inputs]
    try:
        outs = concurrently(
            [partial(c.predict, "m", x) for c, x in zip(clients, inputs, strict=True)]
        )
    finally:
        for c in clients:
            c.close()
    for x, out in zip(inputs, outs, strict=True):
        assert not isinstance(out, Exception), out
        assert out.shape == (x.shape[0], 10)
        np.testing.assert_allclose(out, reference(model, x), rtol=1e-4, atol=1e-5)


def test_requests_are_merged_and_split_by_rows(client: ModelHostClient, server: Server) -> None:
    load_recorder(
        client, "rec", delay=0.3, batching={"max_batch_size": 64, "max_queue_delay_us": 100_000}
    )
    sizes = [1, 2, 3, 4, 5, 6]
    requests = [ids(100 * i, rows) for i, rows in enumerate(sizes)]
    clients = [ModelHostClient(server.target, timeout=60) for _ in requests]
    try:
        # The first request occupies the model; the others queue up and run as one batch.
        first = threading.Thread(target=lambda: clients[0].predict("rec", requests[0]))
        first.start()
        time.sleep(0.1)
        outs = concurrently(
            [partial(c.predict, "rec", x) for c, x in zip(clients[1:], requests[1:], strict=True)]
        )
        first.join()
    finally:
        for c in clients:
            c.close()
    for x, out in zip(requests[1:], outs, strict=True):
        np.testing.assert_array_equal(out, x * 2)
    batches = sorted(len(call) for call in Recorder.calls)
    assert batches == [1, sum(sizes[1:])], Recorder.calls
    stats = statistics(server, "rec")
    assert (stats.execution_count, stats.inference_count) == (2, sum(sizes))
    assert sorted(stats.batches) == [1, sum(sizes[1:])]
    assert (stats.success.count, stats.queue.count, stats.fail.count) == (6, 6, 0)
    assert stats.compute.infer.ns >= 2 * 0.3e9  # the recorder sleeps 0.3 s per run


def queue_behind_a_blocker(
    server: Server, model: str, requests: list[Any], blocker_rows: int = 1
) -> list[Any]:
    """Occupies `model` with one request, queues `requests` meanwhile; their answers."""
    clients = [ModelHostClient(server.target, timeout=60) for _ in range(len(requests) + 1)]
    try:
        blocker = ids(-100, blocker_rows)
        first = threading.Thread(target=lambda: clients[0].predict(model, blocker))
        first.start()
        time.sleep(0.1)
        calls = [partial(c.predict, model, x) for c, x in zip(clients[1:], requests, strict=True)]
        outs = concurrently(calls)
        first.join()
    finally:
        for c in clients:
            c.close()
    return outs


def test_preferred_batch_size_splits_a_long_queue(client: ModelHostClient, server: Server) -> None:
    batching = {"max_batch_size": 64, "max_queue_delay_us": 100_000, "preferred_batch_size": 2}
    load_recorder(client, "pairs", delay=0.3, batching=batching)
    assert client.get_model("pairs").batching.preferred_batch_size == 2
    requests = [ids(10 * i, 1) for i in range(6)]
    outs = queue_behind_a_blocker(server, "pairs", requests)
    for x, out in zip(requests, outs, strict=True):
        np.testing.assert_array_equal(out, x * 2)
    assert sorted(len(call) for call in Recorder.calls) == [1, 2, 2, 2]


def test_warm_up_picks_the_batch_size_with_the_best_throughput(
    client: ModelHostClient, server: Server
) -> None:
    """A model that runs up to 4 rows in the same time, and more rows slower per row."""
    client.save_checkpoint("knee-w", {"scale": torch.full((1,), 2.0)})
    info = client.load_model(
        "knee",
        architecture="recorder",
        checkpoint="knee-w",
        architecture_args={"delay": 0.02, "row_delay": 0.02, "free_rows": 4},
        batching={"max_batch_size": 16, "max_queue_delay_us": 100_000},
        warmup_shape=(16, 2),
    )
    assert info.batching.preferred_batch_size == 4  # rows/s: 1: 50, 2: 100, 4: 200, 8: 80
    Recorder.calls.clear()
    requests = [ids(10 * i, 1) for i in range(8)]
    outs = queue_behind_a_blocker(server, "knee", requests, blocker_rows=16)  # runs 0.26 s
    for x, out in zip(requests, outs, strict=True):
        np.testing.assert_array_equal(out, x * 2)
    assert sorted(len(call) for call in Recorder.calls) == [4, 4, 16]


def test_a_warm_up_on_the_shared_lane_lets_other_models_run_between_its_runs(
    client: ModelHostClient,
) -> None:
    """A CPU model's warm-up (up to 4 rounds over every batch size) runs one batch at a time
    on the shared lane: another model's request runs between two of its runs, not after
    the whole warm-up (16 runs of 0.15 s here)."""
    load_recorder(client, "fast")
    client.save_checkpoint("warming-w", {"scale": torch.full((1,), 2.0)})
    loading = threading.Thread(
        target=lambda: client.load_model(
            "warming",
            architecture="recorder",
            checkpoint="warming-w",
            architecture_args={"delay": 0.15},
            batching={"max_batch_size": 8},
            warmup_shape=(8, 2),
        )
    )
    Recorder.calls.clear()
    loading.start()
    deadline = time.monotonic() + 30
    while not any(call and call[0] == 0.0 for call in Recorder.calls):  # zeros: the warm-up
        assert time.monotonic() < deadline, "the warm-up did not start"
        time.sleep(0.01)  # (the load's rows check runs random rows first)
    np.testing.assert_array_equal(client.predict("fast", ids(100, 1)), ids(100, 1) * 2)
    loading.join(60)
    warm_up_runs = [i for i, call in enumerate(Recorder.calls) if call and call[0] == 0.0]
    assert len(warm_up_runs) == 16  # sizes 1, 2, 4, 8; 4 rounds
    assert Recorder.calls.index([100.0]) < warm_up_runs[-1], Recorder.calls


def test_preferred_batch_size_above_the_maximum_is_refused(client: ModelHostClient) -> None:
    batching = {"max_batch_size": 4, "preferred_batch_size": 8}
    with pytest.raises(ModelHostError) as caught:
        load_recorder(client, "wrong", batching=batching)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "preferred_batch_size=8" in caught.value.message


def test_batching_off_runs_each_request_alone(client: ModelHostClient, server: Server) -> None:
    load_recorder(client, "solo", delay=0.05, batching={"max_batch_size": 1})
    requests = [ids(10 * i, 2) for i in range(4)]
    outs = concurrently([partial(client.predict, "solo", x) for x in requests])
    for x, out in zip(requests, outs, strict=True):
        np.testing.assert_array_equal(out, x * 2)
    assert sorted(len(call) for call in Recorder.calls) == [2, 2, 2, 2]
    assert client.get_model("solo").batching.max_batch_size == 1


def test_a_failing_request_fails_only_itself(client: ModelHostClient, server: Server) -> None:
    load_recorder(
        client,
        "picky",
        picky=True,
        delay=0.2,
        batching={"max_batch_size": 32, "max_queue_delay_us": 100_000},
    )
    blocker = threading.Thread(target=lambda: client.predict("picky", ids(0, 1)))
    blocker.start()
    time.sleep(0.05)
    requests = [ids(1, 2), ids(-5, 1), ids(10, 3)]
    outs = concurrently([partial(client.predict, "picky", x) for x in requests])
    blocker.join()
    assert isinstance(outs[1], ModelHostError)
    assert outs[1].code == grpc.StatusCode.INVALID_ARGUMENT and "negative" in outs[1].message
    np.testing.assert_array_equal(outs[0], requests[0] * 2)
    np.testing.assert_array_equal(outs[2], requests[2] * 2)
    stats = statistics(server, "picky")
    assert (stats.success.count, stats.fail.count, stats.inference_count) == (3, 1, 6)


def test_full_queue_answers_resource_exhausted_at_once(client: ModelHostClient) -> None:
    load_recorder(client, "slow", delay=0.5, batching={"max_batch_size": 1, "max_queue_size": 2})
    started = time.monotonic()
    outs = concurrently([partial(client.predict, "slow", ids(i, 1)) for i in range(6)])
    errors = [o for o in outs if isinstance(o, Exception)]
    assert errors, "some requests should find the queue full"
    for error in errors:
        assert isinstance(error, ModelHostError)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue_size" in error.message and "2" in error.message
    done = [o for o in outs if not isinstance(o, Exception)]
    assert 2 <= len(done) <= 3  # the one running plus the two that fit the queue
    assert time.monotonic() - started < 0.5 * len(outs)  # refusals did not wait their turn
    assert client.get_model("slow").batching.max_queue_size == 2


def test_expired_requests_are_dropped_not_run(client: ModelHostClient, server: Server) -> None:
    load_recorder(client, "slow", delay=0.6, batching={"max_batch_size": 1})
    blocker = threading.Thread(target=lambda: client.predict("slow", ids(1, 1)))
    blocker.start()
    time.sleep(0.1)
    with pytest.raises(ModelHostError) as caught:
        client.predict("slow", ids(2, 1), timeout=0.2)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    blocker.join()
    np.testing.assert_array_equal(client.predict("slow", ids(3, 1)), ids(3, 1) * 2)
    assert [call[0] for call in Recorder.calls] == [1.0, 3.0]  # request 2 never ran
    stats = statistics(server, "slow")
    assert (stats.execution_count, stats.success.count, stats.fail.count) == (2, 2, 1)


def test_deadline_expired_in_queue_reports_deadline_exceeded() -> None:
    """A deadline that passes in the queue fails the request with DeadlineExpired, without
    running it (the status table maps it to DEADLINE_EXCEEDED: tests/test_rpc.py; over a
    real server the call's own deadline cancels it at the same moment)."""
    from modelhost.server.batching import Batcher, BatchPolicy, Lane
    from modelhost.server.errors import DeadlineExpired
    from modelhost.server.inference import encode_answer

    release = threading.Event()
    seen: list[int] = []

    def run(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        release.wait(5)
        seen.append(int(batch["x"][0, 0]))
        return {"output": batch["x"]}

    batcher = Batcher(run, BatchPolicy(1, 0, 8), Lane("unit"))
    finish = lambda outs: encode_answer(outs, torch.float32)  # noqa: E731
    first = batcher.submit({"x": torch.zeros(1, 1)}, None, finish)
    late = batcher.submit({"x": torch.ones(1, 1)}, time.monotonic() + 0.05, finish)
    time.sleep(0.1)
    release.set()
    first.result(5)
    with pytest.raises(DeadlineExpired):
        late.result(5)
    batcher.close()
    assert seen == [0]


def test_inputs_made_on_another_stream_are_adopted_before_they_are_joined() -> None:
    """Inputs prepared on a preprocessing thread's CUDA stream come with an event: the lane
    adopts each request's inputs (waits for its event) before it concatenates or runs them.
    On the CPU the same order is observable through the batcher's two hooks."""
    from modelhost.server.batching import Batcher, BatchPolicy, Lane

    events: list[str] = []
    release = threading.Event()

    def run(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        release.wait(5)
        events.append(f"run {batch['x'].shape[0]}")
        return {"output": batch["x"] * 2}

    def join(parts: list[torch.Tensor]) -> torch.Tensor:
        events.append(f"join {len(parts)}")
        return torch.cat(parts)

    def adopt(inputs: dict[str, torch.Tensor], ready: object) -> None:
        events.append(f"adopt {ready}")

    lane = Lane("unit")
    batcher = Batcher(run, BatchPolicy(8, 50_000, 16), lane, join=join, adopt=adopt)
    doubled_behind_one(batcher, release, 2, ready=True)
    lane.close()
    assert events == ["adopt e0", "run 1", "adopt e1", "adopt e2", "join 2", "run 2"]


def doubled_behind_one(
    batcher: Any, release: threading.Event, queued: int, ready: bool = False
) -> None:
    """Submits one request, then `queued` more while it runs (they queue together, with
    "e<i>" as their ready events if `ready`), lets the runs go, checks each answer is its
    input doubled, and closes the batcher."""
    from modelhost.server.inference import encode_answer

    finish = lambda outs: encode_answer(outs, torch.float32)  # noqa: E731
    first = batcher.submit({"x": torch.zeros(1, 1)}, None, finish, "e0" if ready else None)
    time.sleep(0.2)  # the first runs alone and waits for release; the others queue
    rest = [
        batcher.submit({"x": torch.full((1, 1), i)}, None, finish, f"e{i}" if ready else None)
        for i in range(1, queued + 1)
    ]
    release.set()
    first.result(5)
    for i, future in enumerate(rest, 1):
        (output,) = future.result(5).outputs.values()
        assert codec.to_numpy(output).item() == 2 * i
    batcher.close()


def test_a_batch_that_cannot_be_joined_runs_in_smaller_batches() -> None:
    """Joining a group's rows can fail (on a GPU they go into pinned host memory, which may
    be short): its requests then run in halves, each answered, not INTERNAL ("a bug", as a
    failed join was: GPU review 18)."""
    from modelhost.server.batching import Batcher, BatchPolicy

    release = threading.Event()
    runs: list[int] = []

    def run(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        release.wait(5)
        runs.append(batch["x"].shape[0])
        return {"output": batch["x"] * 2}

    def join(parts: list[torch.Tensor]) -> torch.Tensor:
        if len(parts) > 2:
            raise RuntimeError("CUDA error: out of memory (pinned host memory)")
        return torch.cat(parts)

    lane = Lane("unit")
    doubled_behind_one(Batcher(run, BatchPolicy(8, 50_000, 16), lane, join=join), release, 4)
    lane.close()
    assert runs == [1, 2, 2]


def test_a_batcher_closed_twice_leaves_its_lane_once() -> None:
    """An unload and a page-in ending at once may both close a version's batcher: the
    second close does nothing (it raised, and the page-in's cleanup stopped halfway)."""
    from modelhost.server.batching import Batcher, BatchPolicy

    lane = Lane("unit")
    batcher = Batcher(lambda batch: batch, BatchPolicy(8, 0, 16), lane)
    other = Batcher(lambda batch: batch, BatchPolicy(8, 0, 16), lane)
    batcher.close()
    batcher.close()
    assert lane._batchers == [other]
    other.close()
    lane.close()


def test_a_long_queue_delay_does_not_hold_the_shared_lane_from_other_models() -> None:
    """A batch that waits to fill (max_queue_delay_us up to 60 s) stops waiting as soon as
    another model's request or a job waits for the shared CPU lane: it runs with what it
    has, and the other goes next (found by test_fuzz: a model with a 59 s delay made every
    other CPU model's requests miss their deadlines)."""
    from modelhost.server.batching import Batcher, BatchPolicy, Lane
    from modelhost.server.inference import encode_answer

    def double(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"output": batch["x"] * 2}

    lane = Lane("shared", shared=True)
    patient = Batcher(double, BatchPolicy(8, 30_000_000, 16), lane)
    other = Batcher(double, BatchPolicy(8, 0, 16), lane)
    finish = lambda outs: encode_answer(outs, torch.float32)  # noqa: E731
    x = {"x": torch.ones(1, 1)}
    blocker = lane.call(time.sleep, 0.2)  # two requests queue: its next batch waits for two
    for future in [patient.submit(x, None, finish) for _ in range(2)]:
        blocker.result(5)
        future.result(5)
    alone = patient.submit(x, None, finish)  # gathered alone: it would wait 30 s for another
    time.sleep(0.2)
    job = lane.call(lambda: "ran")
    assert job.result(5) == "ran"
    assert other.submit(x, None, finish).result(5).outputs["output"].shape == [1, 1]
    assert alone.result(5).outputs["output"].shape == [1, 1]
    patient.close()
    other.close()
    lane.close()


def test_an_asynchronous_runner_is_pipelined() -> None:
    """With an asynchronous runner (a GPU's `Runner.launch`), the lane launches the next
    batch from what is queued before it finishes the one in flight, so the device never
    waits for the host to split, encode or concatenate. A merged batch that fails when it
    is collected (an error the device reports late) is re-run one request at a time, so
    it fails only its own request; a job on the lane runs with nothing in flight."""
    from modelhost.server.batching import Batcher, BatchPolicy, Lane
    from modelhost.server.inference import encode_answer

    events: list[str] = []
    jobs: list[Any] = []
    release = threading.Event()

    def launch(batch: dict[str, torch.Tensor]) -> Callable[[], dict[str, torch.Tensor]]:
        x = batch["x"]
        events.append(f"launch {x.flatten().tolist()}")
        if x[0, 0] == 0:
            release.wait(5)  # the first batch: the test queues the next ones meanwhile
        if x.shape[0] == 3:
            jobs.append(lane.call(events.append, "job"))  # queued while this batch is in flight

        def collect() -> dict[str, torch.Tensor]:
            events.append(f"collect {x.flatten().tolist()}")
            if (x < 0).any():
                raise ValueError("a late error")
            return {"output": x * 2}

        return collect

    def run(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return launch(batch)()

    lane = Lane("unit")
    batcher = Batcher(run, BatchPolicy(8, 0, 16), lane, launch=launch)
    finish = lambda outs: encode_answer(outs, torch.float32)  # noqa: E731
    submit = lambda v: batcher.submit({"x": torch.full((1, 1), v)}, None, finish)  # noqa: E731
    first = submit(0.0)
    time.sleep(0.2)  # the first is launched (and blocked); the next two queue
    second = [submit(1.0), submit(2.0)]
    release.set()
    outputs = [codec.to_numpy(f.result(5).outputs["output"]).item() for f in [first, *second]]
    assert outputs == [0.0, 2.0, 4.0]
    assert events == ["launch [0.0]", "launch [1.0, 2.0]", "collect [0.0]", "collect [1.0, 2.0]"]

    events.clear()
    blocker = lane.call(time.sleep, 0.2)
    mixed = [submit(3.0), submit(-1.0), submit(5.0)]
    blocker.result(5)
    assert codec.to_numpy(mixed[0].result(5).outputs["output"]).item() == 6.0
    assert codec.to_numpy(mixed[2].result(5).outputs["output"]).item() == 10.0
    with pytest.raises(ValueError, match="a late error"):
        mixed[1].result(5)
    jobs[0].result(5)
    assert events[:2] == ["launch [3.0, -1.0, 5.0]", "collect [3.0, -1.0, 5.0]"]
    assert events[2:] == [  # run again in halves, the failing half halved in turn
        *(f"{step} {values}" for values in ([3.0], [-1.0, 5.0]) for step in ("launch", "collect")),
        *(f"{step} [{v}]" for v in (-1.0, 5.0) for step in ("launch", "collect")),
        "job",
    ]
    assert batcher.statistics.snapshot().fail.count == 1
    batcher.close()
    lane.close()


def test_incompatible_shapes_run_in_separate_batches(
    client: ModelHostClient, server: Server
) -> None:
    load_recorder(
        client, "rec", delay=0.3, batching={"max_batch_size": 64, "max_queue_delay_us": 100_000}
    )
    blocker = threading.Thread(target=lambda: client.predict("rec", ids(0, 1)))
    blocker.start()
    time.sleep(0.1)
    wide = np.ones((2, 3), np.float32) * 7
    requests = [ids(10, 2), wide, ids(20, 1)]
    outs = concurrently([partial(client.predict, "rec", x) for x in requests])
    blocker.join()
    for x, out in zip(requests, outs, strict=True):
        np.testing.assert_array_equal(out, x * 2)
    assert sorted(len(c) for c in Recorder.calls) == [1, 2, 3]


@pytest.mark.parametrize(
    ("rates", "limit", "chosen"),
    [
        ({1: 30.0, 2: 36.0, 4: 38.0, 8: 45.0, 16: 37.0, 32: 38.0}, 32, 8),
        ({1: 30.0, 2: 36.0, 4: 44.0, 8: 45.0, 16: 37.0}, 32, 4),  # within 5%: the smaller
        ({1: 30.0, 2: 36.0, 4: 40.0}, 32, 0),  # the largest measured is best: no cap
        ({1: 30.0, 2: 36.0, 4: 40.0, 8: 20.0}, 2, 0),  # only sizes up to the maximum count
        ({}, 32, 0),
    ],
)
def test_preferred_batch_size_choice(rates: dict[int, float], limit: int, chosen: int) -> None:
    assert preferred_batch_size(rates, limit) == chosen


def test_detection_model_answers_concurrent_callers(client: ModelHostClient) -> None:
    """Per-image outputs cannot be split by rows: merged requests must still get exactly
    their own detections (the batcher falls back to one request at a time)."""
    model = serve_detector(client, batching={"max_batch_size": 8, "max_queue_delay_us": 200_000})
    rng = np.random.default_rng(0)
    inputs = [rng.random((rows, 3, 64, 64), dtype=np.float32) for rows in (1, 2, 1, 1)]
    outs = concurrently([partial(client.predict, "det", x, timeout=120) for x in inputs])
    for x, out in zip(inputs, outs, strict=True):
        assert not isinstance(out, Exception), out
        assert_same_detections(model, x, out)


def test_lane_keeps_serving_after_an_unexpected_error() -> None:
    """A bug outside the model call fails only its own requests; the shared lane goes on."""
    from modelhost.server.batching import Batcher, BatchPolicy, Lane
    from modelhost.server.inference import encode_answer

    lane = Lane("shared", shared=True)
    errors: list[int] = []
    finish = lambda outs: encode_answer(outs, torch.float32)  # noqa: E731

    def broken(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"output": object()}  # not a tensor: splitting it fails outside the model

    def double(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"output": batch["x"] * 2}

    policy = BatchPolicy(8, 200_000, 8)
    bad = Batcher(broken, policy, lane, on_error=lambda: errors.append(1))
    good = Batcher(double, policy, lane)
    blocker = lane.call(time.sleep, 0.2)  # queue both requests of `bad` before it runs
    failing = [bad.submit({"x": torch.ones(1, 1)}, None, finish) for _ in range(2)]
    blocker.result(5)
    for future in failing:
        with pytest.raises(AttributeError):
            future.result(5)
    assert errors == [1]
    answer = good.submit({"x": torch.full((2, 1), 3.0)}, None, finish).result(5)
    assert answer.outputs["output"].shape == [2, 1]
    assert bad.statistics.snapshot().fail.count == 2
    bad.close()
    good.close()
    lane.close()


def test_a_bug_in_grouping_a_batch_fails_its_requests_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found while mending red team 15, F3 (a group key that could not be hashed): an
    unexpected error while a batch was split into groups was logged by the lane, and the
    batch's callers waited until their deadlines (for ever, without one)."""
    from modelhost.server.batching import Batcher, BatchPolicy, Lane
    from modelhost.server.inference import encode_answer

    def bug(self: Batcher, request: Any) -> object:
        raise RuntimeError("a bug")

    lane = Lane("shared", shared=True)
    finish = lambda outs: encode_answer(outs, torch.float32)  # noqa: E731
    batcher = Batcher(lambda batch: batch, BatchPolicy(8, 1000, 8), lane)
    with monkeypatch.context() as patched:
        patched.setattr(Batcher, "_group_of", bug)
        future = batcher.submit({"x": torch.ones(1, 1)}, None, finish)
        with pytest.raises(RuntimeError, match="a bug"):
            future.result(5)
    answer = batcher.submit({"x": torch.ones(2, 1)}, None, finish).result(5)
    assert answer.outputs["x"].shape == [2, 1]
    batcher.close()
    lane.close()


def test_unload_waits_for_requests_that_hold_the_version(client: ModelHostClient) -> None:
    """A request that found a version keeps it: unloading waits for it to finish."""
    load_recorder(client, "busy", delay=1.0, batching={"max_batch_size": 1})
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    model = serve(client, "r18", preprocessing={"mean": mean, "std": std})
    from torchvision.io import decode_jpeg, encode_jpeg

    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    jpegs = [encode_jpeg(torch.from_numpy(p)).numpy().tobytes() for p in pixels]
    finished: dict[str, float] = {}
    results: dict[str, Any] = {}

    def call(name: str, fn: Callable[[], Any]) -> threading.Thread:
        def run() -> None:
            try:
                results[name] = fn()
            except ModelHostError as error:
                results[name] = error
            finished[name] = time.monotonic()

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    threads = [call("busy", lambda: client.predict("busy", ids(0, 1)))]
    time.sleep(0.3)  # the CPU lane runs "busy" for a second
    # r18's images wait for the lane to decode them: the request holds version 1 ...
    threads.append(call("r18", lambda: client.predict("r18", images=jpegs)))
    time.sleep(0.3)
    # ... so unloading it must wait for that request, not pull the model from under it.
    threads.append(call("unload", lambda: client.unload_model("r18")))
    for thread in threads:
        thread.join()
    assert results["unload"] == [1]
    assert not isinstance(results["r18"], Exception), results["r18"]
    decoded = torch.stack(
        [decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)) for j in jpegs]
    )
    x = decoded.float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    np.testing.assert_allclose(results["r18"], reference(model, x.numpy()), rtol=1e-4, atol=1e-5)
    # The server answers r18 before the unload ends, but the two replies may reach their
    # threads in either order within a millisecond; an unload that did not wait would end
    # about 0.4 s before r18 (when it is called, while r18 still waits behind "busy").
    assert finished["unload"] >= finished["r18"] - 0.05
    assert client.list_models()[0].name == "busy"


def test_a_device_lane_pool_shares_a_bounded_number_of_lanes() -> None:
    """GPU versions share at most `size` lanes (threads and streams), the least used first;
    a version leaving gives its place back, and nothing makes a lane anew."""
    made: list[Lane] = []

    def new_lane(name: str) -> Lane:
        made.append(Lane(name))
        return made[-1]

    pool = LanePool("dev", 2, new_lane)
    try:
        a, b, c = pool.take(), pool.take(), pool.take()
        assert (a is not b, c is a, pool.usage()) == (True, True, [2, 1])
        b.release()  # b's only version left: b is the least used
        assert pool.take() is b and pool.usage() == [2, 1]
        for _ in range(20):  # versions come and go: the same two lanes serve them
            pool.take().release()
        assert len(made) == 2 and pool.usage() == [2, 1]
        assert all(lane.call(threading.current_thread).result().is_alive() for lane in made)
    finally:
        pool.close()
    assert not any(lane._thread.is_alive() for lane in made)


def test_a_batch_holds_no_more_input_elements_than_one_request_may() -> None:
    """Rows alone do not bound a batch: eight one-row requests of many elements each would
    make one batch of eight times what one request may hold (the model's activations grow
    with it, red team 8's M1). A batch stops before its inputs pass `max_elements`."""
    from modelhost.server.batching import Batcher, BatchPolicy, Lane
    from modelhost.server.inference import encode_answer

    lane = Lane("unit")
    sizes: list[int] = []

    def run(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sizes.append(batch["x"].shape[0])
        return {"output": batch["x"] * 2}

    batcher = Batcher(run, BatchPolicy(8, 200_000, 16), lane, max_elements=250)
    finish = lambda outs: encode_answer(outs, torch.float32)  # noqa: E731
    blocker = lane.call(time.sleep, 0.2)  # queue all eight before the first batch
    futures = [
        batcher.submit({"x": torch.full((1, 100), float(i))}, None, finish) for i in range(8)
    ]
    blocker.result(5)
    for i, future in enumerate(futures):
        assert future.result(5).outputs["output"].shape == [1, 100], i
    assert sizes == [2, 2, 2, 2]  # 200 elements each: a third request would make 300
    batcher.close()
    lane.close()


def run_with_bad_rows(bad: set[int], count: int = 16) -> tuple[list[int], list[int]]:
    """`count` one-row requests queued together (behind a blocker) on a Batcher whose
    model fails any batch holding a negative row; those at `bad` indexes hold one. Asserts
    only they fail and the others are answered right; returns the rows of every run, and
    the runs done before each split."""
    from modelhost.server.batching import Batcher, BatchPolicy, Lane
    from modelhost.server.errors import InvalidInput
    from modelhost.server.inference import encode_answer

    lane = Lane("unit")
    runs: list[int] = []

    def run(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        runs.append(batch["x"].shape[0])
        if bool((batch["x"] < 0).any()):  # as Runner reports what the model raised
            raise InvalidInput("the model rejected the input: IndexError: index out of range")
        return {"output": batch["x"] * 2}

    splits: list[int] = []
    batcher = Batcher(
        run, BatchPolicy(count, 200_000, 32), lane, on_split=lambda: splits.append(len(runs))
    )
    finish = lambda outs: encode_answer(outs, torch.float32)  # noqa: E731
    blocker = lane.call(time.sleep, 0.2)
    values = [-1.0 if i in bad else float(i) for i in range(count)]
    futures = [batcher.submit({"x": torch.full((1, 1), v)}, None, finish) for v in values]
    blocker.result(5)
    for value, future in zip(values, futures, strict=True):
        if value < 0:
            with pytest.raises(InvalidInput, match="index out of range"):
                future.result(5)
        else:
            assert codec.to_numpy(future.result(5).outputs["output"]).item() == value * 2
    batcher.close()
    lane.close()
    return runs, splits


def test_a_failed_batch_is_retried_in_halves_down_to_the_request_that_fails() -> None:
    """One caller whose rows make the model fail (an id past an embedding's vocabulary)
    must not cost every batch it joins one run per request (red team 8's M2: 16 callers'
    throughput fell to 0.61x with one such caller): the batch is run again in halves, the
    failing half halved in turn. Only that caller gets the error; the others are answered
    from batches of several requests."""
    runs, splits = run_with_bad_rows({5})
    # 0-15 fails: 0-7 fails, 8-15 runs; 0-3 runs, 4-7 fails; 4-5 fails, 6-7 runs; 4, 5.
    assert runs == [16, 8, 8, 4, 4, 2, 2, 1, 1]  # 9 runs, not 17 (16 of one request)
    assert splits == [1, 3, 5, 7]  # each failed batch of several, after its run


def test_when_both_halves_fail_each_request_runs_alone() -> None:
    """Many callers with failing rows (red team 9's L6: 8 of 24 cut the others to 0.22x):
    halving every failing half would cost about 2n runs; once both halves of a batch
    fail, each of their requests runs alone instead (n runs more)."""
    runs, splits = run_with_bad_rows(set(range(0, 16, 2)))
    assert runs == [16, 8, 8] + [1] * 16  # 19 runs; halving down to each: 31
    assert splits == [1]


# Red team 13, F2: rows that depend on the batch


PATIENT = {"max_queue_delay_us": 200_000}
"""Batching under which concurrent requests would be merged."""


def queued_together(client: ModelHostClient, name: str, rows: Sequence[Any]) -> list[Any]:
    """The answers to `rows`, each sent by a caller of its own while a request of the
    slow model "slow" (loaded) holds the CPU lane, which is shared: they queue up
    meanwhile, and run as one batch where `name` batches."""
    blocker = threading.Thread(target=client.predict, args=("slow", np.ones((1, 4), "f4")))
    blocker.start()
    time.sleep(0.1)
    outs = concurrently([partial(client.predict, name, x) for x in rows])
    blocker.join()
    return outs


def test_a_model_whose_rows_depend_on_the_batch_is_not_batched(
    client: ModelHostClient,
) -> None:
    """`x @ x.T` (declared input) and `x - x.mean(0)` (shaped by warmup_shape): batched,
    each caller would get values computed from the others' rows. Found at load: they run
    one request at a time, and each caller gets what it gets alone."""
    serve(client, "gram", architecture="gram", batching=PATIENT)
    serve(client, "centered", architecture="centered", warmup_shape=(1, 2), batching=PATIENT)
    serve(client, "slow", architecture="slow_mlp", architecture_args={"delay": 0.5})
    mixes = {"gram": lambda x: x @ x.T, "centered": lambda x: x - x.mean(0, keepdims=True)}
    for name, alone in mixes.items():
        assert client.get_model(name).batching.max_batch_size == 1
        rows = [np.array([[1.0, 0.0]], np.float32), np.array([[0.0, 7.0], [3.0, 4.0]], np.float32)]
        for x, out in zip(rows, queued_together(client, name, rows), strict=True):
            np.testing.assert_allclose(out, alone(x))


def test_a_model_whose_rows_are_independent_is_batched(
    client: ModelHostClient, server: Server
) -> None:
    """The rows check of the user's models finds nothing to refuse in an MLP (its runs of
    two rows and of one differ by rounding only): it keeps the server's batch size."""
    serve(client, "mlp", architecture="tiny_mlp", checkpoint="mlp-w", warmup_shape=(4, 4))
    assert client.get_model("mlp").batching.max_batch_size == server.settings.max_batch_size


# Red team 14, F4: a rows check that cannot tell fails closed


DOMAIN = "domain=helpers.models:domain"
"""Rows defined on part of the values, that depend on the batch or not (`Domain`)."""


@pytest.fixture
def domain_server(settings: Settings) -> Iterator[Server]:
    """The test server, with the `domain` architecture too."""
    with running(
        dataclasses.replace(settings, architectures=[*settings.architectures, DOMAIN])
    ) as srv:
        yield srv


@pytest.fixture
def domain_client(domain_server: Server) -> Iterator[ModelHostClient]:
    with ModelHostClient(domain_server.target, timeout=120) as c:
        serve(c, "slow", architecture="slow_mlp", architecture_args={"delay": 0.5})
        yield c


def serve_domain(
    client: ModelHostClient, name: str, warmup_shape: Sequence[int] = (), **args: Any
) -> torch.nn.Module:
    """`domain(**args)` served as `name` (batching `PATIENT`); its in-process twin."""
    return serve(
        client,
        name,
        domain(**args),
        architecture="domain",
        architecture_args=args,
        batching=PATIENT,
        warmup_shape=warmup_shape,
    )


def warnings_of(caplog: pytest.LogCaptureFixture, name: str) -> str:
    return "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(f"{name}: ")
    )


ROWS = [np.array([[4.0, 0.0]], np.float32), np.array([[0.0, 16.0], [9.0, 4.0]], np.float32)]
"""Two callers' rows, non-negative."""


@pytest.mark.parametrize(
    ("args", "shown_by"),
    [
        ({"negatives": "nan"}, "standard normal rows"),
        ({"negatives": "nan", "floor": 1.0}, "standard normal rows"),
        ({"negatives": "raise"}, "uniform rows in [0, 1)"),
    ],
    ids=["nan", "nan_below_one", "raise"],
)
def test_a_model_undefined_on_negative_values_whose_rows_depend_on_the_batch_is_not_batched(
    domain_client: ModelHostClient,
    caplog: pytest.LogCaptureFixture,
    args: dict[str, Any],
    shown_by: str,
) -> None:
    """`sqrt(x) - mean(sqrt(x))` over the batch is NaN for a negative value, and a model
    that checks its inputs refuses one: the check's normal rows, which have some, were
    taken as proof of nothing (an error) or as alike (NaN compared as close), and the
    model was batched. NaN are now compared where they are (a row alone has fewer: with
    NaN below 1, uniform rows in [0, 1) give NaN only, and this is what finds it), and
    uniform rows are drawn too (what finds the refusing model). Each is found to depend
    on the batch, and each caller gets what it gets alone."""
    client = domain_client
    with caplog.at_level(logging.WARNING, "modelhost.server.rows_check"):
        model = serve_domain(client, "m", **args)
    assert client.get_model("m").batching.max_batch_size == 1
    assert f"depend on the other rows of its batch (they differ run alone, with {shown_by})" in (
        warnings_of(caplog, "m")
    )
    for x, out in zip(ROWS, queued_together(client, "m", ROWS), strict=True):
        np.testing.assert_allclose(out, reference(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("negatives", ["nan", "raise"])
def test_a_model_undefined_on_negative_values_whose_rows_are_independent_is_batched(
    domain_client: ModelHostClient, domain_server: Server, negatives: str
) -> None:
    """The other side: `sqrt(x)` (NaN for negative values), or `x` refusing them, is found
    independent by its uniform rows, and keeps the server's batch size. Two callers'
    requests run as one batch, and each gets what the model answers it alone."""
    client = domain_client
    model = serve_domain(client, "m", mixes=False, negatives=negatives)
    assert client.get_model("m").batching.max_batch_size == domain_server.settings.max_batch_size
    outs = queued_together(client, "m", ROWS)
    for x, out in zip(ROWS, outs, strict=True):
        np.testing.assert_allclose(out, reference(model, x), rtol=1e-5, atol=1e-6)
    assert statistics(domain_server, "m").execution_count == 1  # merged
    if negatives == "nan":
        x = np.array([[-1.0, 4.0]], np.float32)
        np.testing.assert_array_equal(client.predict("m", x), reference(model, x))  # NaN, 2


WIDE = 200_000
"""Values per row of a warmup_shape whose two rows cost more than `COSTLY` (8 bytes of
activations per value), and one row less."""
COSTLY = 2 << 20


def test_a_rows_check_over_max_predict_bytes_runs_small_rows_or_fails_closed(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The check ran two rows of the warm-up's shape, which max_predict_bytes refused
    where it allowed one: the refusal proved nothing, and `x - x.mean(0)` was batched.
    Its open dimensions are now checked small (found to depend on the batch); a model
    that takes only rows as costly is not batched, and the log says why and how to opt
    in."""
    bounded = dataclasses.replace(
        settings, architectures=[*settings.architectures, DOMAIN], max_predict_bytes=COSTLY
    )
    with (
        running(bounded) as server,
        ModelHostClient(server.target, timeout=120) as client,
        caplog.at_level(logging.WARNING, "modelhost.server.rows_check"),
    ):
        serve(client, "slow", architecture="slow_mlp", architecture_args={"delay": 0.5})
        model = serve_domain(client, "open", negatives="", warmup_shape=(1, WIDE))
        serve_domain(client, "wide", negatives="", width=WIDE, warmup_shape=(1, WIDE))
        assert client.get_model("open").batching.max_batch_size == 1
        assert "a row's outputs depend on the other rows of its batch (they differ run alone" in (
            warnings_of(caplog, "open")
        )
        rows = [np.array([[1.0, 0.0]], np.float32), np.array([[0.0, 7.0]], np.float32)]
        for x, out in zip(rows, queued_together(client, "open", rows), strict=True):
            np.testing.assert_array_equal(out, reference(model, x))  # zeros, alone
        assert client.get_model("wide").batching.max_batch_size == 1
        said = warnings_of(caplog, "wide")
        assert "cannot tell whether a row's outputs depend on the other rows" in said
        assert "max_predict_bytes" in said and "Batching off (max_batch_size 1)" in said
        assert "load it with batching max_batch_size above 1" in said


def test_a_model_whose_outputs_are_random_is_batched_only_when_the_load_asks(
    client: ModelHostClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Random outputs (a sampler, dropout left on) tell nothing: a row run alone twice
    differs, so no difference proves the rows depend on the batch, nor does any prove
    they do not. Such a model is not batched unless the load gives a max_batch_size: the
    explicit opt-in. One whose rows are found to depend on the batch is not batched even
    then."""
    with caplog.at_level(logging.WARNING, "modelhost.server.rows_check"):
        serve(client, "sampler", architecture="sampler")
        serve(client, "asked", architecture="sampler", batching={"max_batch_size": 8})
        serve(client, "gram", architecture="gram", batching={"max_batch_size": 8})
    assert client.get_model("sampler").batching.max_batch_size == 1
    assert "its outputs are random" in warnings_of(caplog, "sampler")
    assert client.get_model("asked").batching.max_batch_size == 8
    assert "Batched as the load asks (max_batch_size 8)" in warnings_of(caplog, "asked")
    assert client.get_model("gram").batching.max_batch_size == 1
    assert "the load's max_batch_size 8 is not kept" in warnings_of(caplog, "gram")


def test_vectors_sent_to_a_model_without_declared_inputs_are_never_merged(
    client: ModelHostClient, server: Server
) -> None:
    """Red team 15, F3: rank-1 inputs of a model that declares no inputs were concatenated
    as if their one dimension were rows. Two callers' halves of a 4-feature vector made one
    vector whose answer was split between them (each got an answer computed from the
    other's data), and a group whose outputs did not split turned batching off for good
    (eight such requests cost every caller its batching). A vector runs alone now."""
    args = {"features": 4, "hidden": 8, "classes": 4, "delay": 0.3}
    twin = serve(
        client,
        "vec",
        architecture="slow_mlp",
        architecture_args=args,
        batching={"max_batch_size": 32, "max_queue_delay_us": 100_000},
    )
    assert client.get_model("vec").inputs == ()  # nothing declared: no shape is checked
    rng = np.random.default_rng(5)

    def behind_a_blocker(requests: list[np.ndarray[Any, Any]]) -> list[Any]:
        clients = [ModelHostClient(server.target, timeout=60) for _ in requests]
        try:
            blocker = threading.Thread(
                target=client.predict, args=("vec", np.ones((1, 4), np.float32))
            )
            blocker.start()
            time.sleep(0.1)  # the others queue up meanwhile
            outs = concurrently(
                [partial(c.predict, "vec", x) for c, x in zip(clients, requests, strict=True)]
            )
            blocker.join()
            return outs
        finally:
            for c in clients:
                c.close()

    halves = [rng.standard_normal(2).astype(np.float32) for _ in range(2)]
    for answer in behind_a_blocker(halves):  # not 4 features: each fails alone
        assert isinstance(answer, ModelHostError), answer
    vectors = [rng.standard_normal(4).astype(np.float32) for _ in range(3)]
    for x, answer in zip(vectors, behind_a_blocker(vectors), strict=True):  # one sample each
        np.testing.assert_allclose(answer, reference(twin, x), rtol=1e-5, atol=1e-6)
    rows = [rng.standard_normal((2, 4)).astype(np.float32) for _ in range(3)]
    for x, answer in zip(rows, behind_a_blocker(rows), strict=True):
        np.testing.assert_allclose(answer, reference(twin, x), rtol=1e-5, atol=1e-6)
    assert 6 in statistics(server, "vec").batches  # still batched: three requests, one run


def test_vectors_of_a_model_that_declares_them_as_rows_are_merged(
    client: ModelHostClient, server: Server
) -> None:
    """The other side of red team 15, F3: a model whose declared input is a vector of
    rows (token ids, -1 its one dimension) batches its vectors like any rows."""
    twin = serve(
        client,
        "emb",
        architecture="slow_embedding",
        architecture_args={"ids": 16, "width": 4, "delay": 0.3},
        batching={"max_batch_size": 32, "max_queue_delay_us": 100_000},
    )
    assert [tuple(i.shape) for i in client.get_model("emb").inputs] == [(-1,)]
    requests = [np.array(ids, np.int64) for ids in ([1, 2], [3, 4, 5], [6])]
    clients = [ModelHostClient(server.target, timeout=60) for _ in requests]
    try:
        blocker = threading.Thread(target=client.predict, args=("emb", np.array([0], np.int64)))
        blocker.start()
        time.sleep(0.1)  # the others queue up meanwhile
        outs = concurrently(
            [partial(c.predict, "emb", x) for c, x in zip(clients, requests, strict=True)]
        )
        blocker.join()
    finally:
        for c in clients:
            c.close()
    for x, answer in zip(requests, outs, strict=True):
        np.testing.assert_array_equal(answer, reference(twin, x))
    assert 6 in statistics(server, "emb").batches  # three requests, one run
