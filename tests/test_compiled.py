"""Compiled versions compile off the lanes: requests run what is compiled for their shape,
and a new shape runs uncompiled while the compile thread compiles for it (inference.py)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any

import numpy as np
import pytest
import torch

from modelhost.client import ModelHostClient
from modelhost.server import Server, Settings, inference, running

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
_VARIANTS = itertools.count(1)  # a code object per test: TorchDynamo's state stays apart


def _load(
    client: ModelHostClient,
    name: str,
    scale: float,
    padding: int = 0,
    variant: int = 0,
    **options: Any,
) -> int:
    """Loads a compiled CompileMarker multiplying by `scale`; returns its variant."""
    variant = variant or next(_VARIANTS)
    weights = {"scale": torch.tensor(scale), "padding": torch.zeros(padding)}
    client.save_checkpoint(name, weights, overwrite=True)
    client.load_model(
        name,
        architecture="compile_marker",
        checkpoint=name,
        compile="default",
        architecture_args={"padding": padding, "variant": variant},
        **options,
    )
    return variant


def _run(client: ModelHostClient, name: str, shape: tuple[int, ...]) -> bool:
    """Predicts ones of `shape`, checks the answer, and says whether it ran compiled."""
    outputs = client.predict(name, np.ones(shape, np.float32))
    scale = float(name.rsplit("x", 1)[1])
    np.testing.assert_array_equal(outputs["y"], np.full(shape, scale, np.float32))
    marks = set(outputs["compiled"].tolist())
    assert len(marks) == 1, marks
    return marks == {1.0}


def _compiled_soon(client: ModelHostClient, name: str, shape: tuple[int, ...]) -> bool:
    """Whether requests of `shape` run compiled within a minute (a compile in the back)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _run(client, name, shape):
            return True
        time.sleep(0.2)
    return False


def _compile_thread_caught_up(client: ModelHostClient, name: str, shape: tuple[int, ...]) -> None:
    """Waits until a compile queued now (for a new `shape` of `name`) has run: the compile
    thread is one, first in first out, so whatever was queued before it has run too. A
    test that asserts nothing compiled waits for this, not for a fixed time (which a slow
    machine can outlast)."""
    assert not _run(client, name, shape)
    assert _compiled_soon(client, name, shape)


def _compiled_on(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The threads that logged a finished background compile."""
    return [str(r.threadName) for r in caplog.records if r.getMessage().startswith("compiled for")]


def test_warm_up_shapes_run_compiled_code_and_any_row_count_does(
    client: ModelHostClient,
) -> None:
    _load(client, "m-x2", 2.0, warmup_shape=(2, 3))
    assert _run(client, "m-x2", (1, 3))
    assert _run(client, "m-x2", (3, 3))  # rows other than 1 are dynamic after the warm-up


def test_a_new_shape_runs_uncompiled_at_once_and_compiles_on_the_compile_thread(
    client: ModelHostClient, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A request of a shape the version has not compiled for answers at once, uncompiled:
    nothing compiles on the lane the other CPU versions share. The compile thread compiles
    for it, and the later requests of that shape run compiled."""
    caplog.set_level(logging.INFO, logger="modelhost.server.inference")
    _load(client, "m-x3", 3.0, warmup_shape=(2, 3))
    assert not _run(client, "m-x3", (2, 5))
    assert _compiled_soon(client, "m-x3", (2, 5))
    assert _run(client, "m-x3", (7, 5))  # compiled for any row count above one
    assert _compiled_on(caplog) and all(t.startswith("compile") for t in _compiled_on(caplog))
    assert server.host is not None
    samples = server.host.metrics.registry.get_sample_value
    compiled = {"model": "m-x3", "outcome": "compiled"}
    assert samples("modelhost_background_compiles_total", compiled) == len(_compiled_on(caplog))
    assert samples("modelhost_background_compile_seconds_count") == len(_compiled_on(caplog))


def test_without_warmup_shape_the_first_requests_compile_in_the_background(
    client: ModelHostClient,
) -> None:
    _load(client, "m-x4", 4.0)
    assert not _run(client, "m-x4", (1, 6))
    assert _compiled_soon(client, "m-x4", (1, 6))


def test_a_background_compile_makes_one_graph_for_any_row_count_above_one(
    client: ModelHostClient,
) -> None:
    """A request of several rows queues one compile, at two rows marked dynamic: not a
    graph for two rows and another for three (twice the compiles, and more rows than a
    two-row request brought, red team 4's L5)."""
    from helpers import models

    _load(client, "m-x9", 9.0)
    before = len(models.TRACES)
    assert not _run(client, "m-x9", (4, 5))
    assert _compiled_soon(client, "m-x9", (4, 5))
    assert _run(client, "m-x9", (2, 5))
    assert _run(client, "m-x9", (11, 5))
    traces = models.TRACES[before:]
    assert len(traces) == 1 and traces[0].startswith("compile"), traces


def test_a_batch_without_rows_queues_no_compile(
    client: ModelHostClient, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch of no rows has nothing worth compiling for: it answers (empty) and takes
    none of the version's shapes (a compile of it used to run two rows of its other
    sizes, counted against nothing; red team 5's H1), and its shape logs readably."""
    from helpers import models

    caplog.set_level(logging.INFO, logger="modelhost.server.inference")
    _load(client, "m-x10", 10.0, warmup_shape=(2, 3))
    before = len(models.TRACES)
    for shape in [(0, 3), (0, 5), (0, 2, 4)]:
        outputs = client.predict("m-x10", np.ones(shape, np.float32))
        assert outputs["y"].shape == shape
    _compile_thread_caught_up(client, "m-x10", (2, 7))  # the one compile there is
    traces = models.TRACES[before:]
    assert len(traces) == 1 and traces[0].startswith("compile"), traces
    assert len(_compiled_on(caplog)) == 1
    assert server.host is not None
    samples = server.host.metrics.registry.get_sample_value
    compiled = {"model": "m-x10", "outcome": "compiled"}
    assert samples("modelhost_background_compiles_total", compiled) == 1
    key = inference.shape_key({"x": torch.ones(0, 3)})
    assert inference._shapes(key) == "x [0, 3] float32"


def test_a_failing_compile_job_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """What a compile job raises outside the model (a bug) is logged, not lost in its
    future."""
    from concurrent.futures import Future

    caplog.set_level(logging.ERROR, logger="modelhost.server.inference")
    job: Future[None] = Future()
    job.set_exception(KeyError(0))
    inference._log_failure(job)
    assert [r.getMessage() for r in caplog.records] == ["a background compile failed"]
    assert caplog.records[0].exc_info is not None


def test_new_shapes_past_the_limit_stay_uncompiled(
    client: ModelHostClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller sending ever new shapes cannot keep the compile thread busy for ever."""
    monkeypatch.setattr(inference, "MAX_COMPILED_SHAPES", 3)
    caplog.set_level(logging.INFO, logger="modelhost.server.inference")
    _load(client, "m-x5", 5.0, warmup_shape=(2, 3))  # two shapes: 1 row, and more rows
    assert not _run(client, "m-x5", (1, 4))  # the third: compiled in the background
    assert _compiled_soon(client, "m-x5", (1, 4))
    new_ranks = [(1, 2, 4), (1, 2, 2, 4), (1, 2, 2, 2, 4)]  # no graph of another rank fits
    for shape in new_ranks:
        assert not _run(client, "m-x5", shape)
    _load(client, "n-x6", 6.0)  # another version, whose shapes still compile
    _compile_thread_caught_up(client, "n-x6", (1, 4))
    assert not _run(client, "m-x5", new_ranks[0])
    assert len(_compiled_on(caplog)) == 2  # m-x5's third shape, and n-x6's
    assert any("met 3 input shapes" in r.getMessage() for r in caplog.records)


def test_the_graphs_of_a_model_class_are_not_all_spent_on_callers_shapes(
    client: ModelHostClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TorchDynamo keeps a limited number of graphs per code object, shared by every
    version of one model class: background compiles (callers' shapes) may take only a
    share of them, so the warm-ups of later loads still compile."""
    monkeypatch.setattr(inference, "MAX_BACKGROUND_COMPILES_PER_CLASS", 1)
    caplog.set_level(logging.WARNING, logger="modelhost.server.inference")
    variant = _load(client, "a-x2", 2.0, warmup_shape=(2, 3))
    _load(client, "b-x3", 3.0, variant=variant, warmup_shape=(2, 3))  # the same class
    assert not _run(client, "a-x2", (1, 2, 4))
    assert _compiled_soon(client, "a-x2", (1, 2, 4))  # the class's one background compile
    assert not _run(client, "b-x3", (1, 2, 2, 4))
    _load(client, "d-x5", 5.0)  # a class of its own, whose shapes still compile
    _compile_thread_caught_up(client, "d-x5", (1, 4))
    assert not _run(client, "b-x3", (1, 2, 2, 4))  # none left for this class
    assert any("met 1 input shapes after their loads" in r.getMessage() for r in caplog.records)
    _load(client, "c-x4", 4.0, variant=variant, warmup_shape=(2, 5))  # a load still compiles
    assert _run(client, "c-x4", (3, 5))


def test_a_model_class_keeps_more_graphs_than_torchs_default(
    client: ModelHostClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TorchDynamo keeps 8 graphs per code object by default, then runs whatever has none
    uncompiled: the server allows RECOMPILE_LIMIT on the threads that compile."""
    monkeypatch.setattr(inference, "MAX_COMPILED_SHAPES", 16)
    _load(client, "m-x8", 8.0, warmup_shape=(2, 3))  # two graphs
    shapes = [(1,) + (2,) * rank + (3,) for rank in range(1, 10)]  # nine more, by rank
    for shape in shapes:
        assert not _run(client, "m-x8", shape)
    assert all(_compiled_soon(client, "m-x8", shape) for shape in shapes)


def test_a_paged_in_version_compiles_again_in_the_background(settings: Settings) -> None:
    """A page-in brings a new module: the version answers with its own weights at once,
    and runs compiled code again (TorchDynamo's guards decide whether what was compiled
    fits the new module; the compile thread compiles again for the shapes it had)."""
    budget = dataclasses.replace(settings, device_memory_budget=1 << 20)
    with running(budget) as server, ModelHostClient(server.target, timeout=120) as client:
        variant = _load(client, "m-x6", 6.0, padding=150_000, warmup_shape=(2, 3))  # 600 KB
        _load(client, "other-x1", 1.0, padding=150_000, variant=variant)  # evicts m-x6
        assert client.get_model("m-x6").tier == "store"
        assert _compiled_soon(client, "m-x6", (3, 3))  # and its own weights (checked)
        assert client.get_model("m-x6").page_ins == 1
        assert _compiled_soon(client, "other-x1", (3, 3))  # paged in too: weights apart
        assert client.get_model("other-x1").page_ins == 1


def test_an_unload_does_not_wait_for_a_background_compile_of_its_version(
    client: ModelHostClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background compile keeps its version on its device, but an unload does not wait
    for it (a compile can take minutes): the module is freed when the compile ends."""
    from helpers import models

    _load(client, "m-x7", 7.0, warmup_shape=(1, 3))
    monkeypatch.setattr(models, "TRACE_SECONDS", 5.0)
    models.TRACING.clear()
    assert not _run(client, "m-x7", (1, 2, 9))  # its compile starts in the background
    assert models.TRACING.wait(30)
    started = time.monotonic()
    client.unload_model("m-x7")
    assert time.monotonic() - started < 2.5  # the compile had 5 s to go
    assert client.list_models() == []
    monkeypatch.setattr(models, "TRACE_SECONDS", 0.0)
    _load(client, "m-x7", 7.0, warmup_shape=(1, 3))  # the name serves again
    assert _run(client, "m-x7", (1, 3))


def test_a_request_while_another_thread_fx_traces_runs_uncompiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Torch releases before about 2.12 (2.11 is the GPU machine's) keep FX's "tracing
    now" in one flag for the whole process: while a background compile traced
    (AOTAutograd's make_fx) on the compile thread, a request of a compiled version on a
    lane failed with "using FX to symbolically trace a dynamo-optimized function". It
    runs uncompiled instead. The flag is simulated here (TorchDynamo reads it through
    this function, looked up when `torch._dynamo.run` wraps the module)."""
    from helpers import models

    monkeypatch.setattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", lambda: True)
    module = models.compile_marker(variant=next(_VARIANTS)).eval()
    runner = inference.Runner(module, torch.device("cpu"), torch.float32, compile_mode="default")
    with torch.inference_mode():
        outputs = runner.run({"x": torch.full((2, 3), 2.0)})
    np.testing.assert_array_equal(outputs["y"].numpy(), np.full((2, 3), 2.0, np.float32))
    assert outputs["compiled"].tolist() == [0.0, 0.0]
