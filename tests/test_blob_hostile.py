"""Blobs that someone with write access to the store planted (red team 9, L2 and L5).

`blobs/<sha256>` is read by LoadModel, a page-in from the store tier, a restore and
DownloadCheckpoint: a symlink there is not followed (nothing outside the store is
served), a FIFO is not waited on (the load workers are never blocked), a blob cut short
or made longer in place is not memory-mapped (past its end, that would end the process
with SIGBUS), and each answers DATA_LOSS naming the checkpoint, while the other models
keep serving. A write that the
file system refuses as too large (EFBIG: `ulimit -f`, FAT's 4 GiB) is a full store:
RESOURCE_EXHAUSTED, and nothing is left behind."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import build, expect, reference, temp_files
from helpers.processes import ServerProcess
from modelhost.client import ModelHostClient
from modelhost.server import Settings, running

DL = grpc.StatusCode.DATA_LOSS
X = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
PROMPT = 5.0  # seconds: a refusal takes milliseconds; a blocked open would take forever
WHAT = {"symlink": "symbolic link", "fifo": "FIFO", "truncated": "not the", "extended": "not the"}


def save(client: ModelHostClient, name: str, seed: int) -> tuple[torch.nn.Module, str]:
    """A tiny_mlp of `seed` stored as checkpoint `name`: its twin and its sha256."""
    model = build("tiny_mlp", seed=seed)
    return model, client.save_checkpoint(name, model.state_dict()).sha256


def load(client: ModelHostClient, name: str, checkpoint: str, **options: Any) -> Any:
    return client.load_model(name, architecture="tiny_mlp", checkpoint=checkpoint, **options)


def same(actual: Any, expected: Any) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def fifos_opened_at_the_end(settings: Settings) -> Iterator[None]:
    """After each test, opens each FIFO in the store's blobs for writing, once: a reader
    blocked in its open (a regression) then reads its end, and the test process can exit."""
    yield
    for path in (settings.store / "blobs").glob("*"):
        if stat.S_ISFIFO(path.lstat().st_mode):
            with contextlib.suppress(OSError):  # ENXIO: no reader waits
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def plant(store: Path, sha: str, kind: str, outside: Path | None = None) -> None:
    """Replaces the blob `sha` with a symlink to `outside` (a checkpoint of other weights,
    outside the store) or a FIFO nobody writes to, or changes it in place: cut to half its
    length, or one zero byte longer."""
    blob = store / "blobs" / sha
    if kind in ("truncated", "extended"):
        size = blob.stat().st_size
        os.truncate(blob, size // 2 if kind == "truncated" else size + 1)
        return
    blob.unlink()
    if kind == "symlink":
        assert outside is not None
        torch.save(build("tiny_mlp", seed=99).state_dict(), outside)
        blob.symlink_to(outside)
    else:
        os.mkfifo(blob, 0o600)


def refused_promptly(call: Callable[[], Any], *words: str) -> None:
    """`call` answers DATA_LOSS naming `words` well within PROMPT seconds."""
    start = time.monotonic()
    expect(DL, call, *words)
    assert time.monotonic() - start < PROMPT


@pytest.mark.parametrize("kind", ["symlink", "fifo", "truncated", "extended"])
def test_a_planted_blob_is_data_loss_at_load_and_download(
    settings: Settings, tmp_path: Path, kind: str
) -> None:
    with (
        running(settings) as server,
        ModelHostClient(server.target, timeout=30) as client,
        ModelHostClient(server.target, timeout=PROMPT) as fast,  # a regression fails, not hangs
    ):
        twin, _ = save(client, "good", 1)
        load(client, "good", "good")
        planted, sha = save(client, "w", 2)
        plant(settings.store, sha, kind, tmp_path / "outside.pt")
        # More refused loads than there are load workers: none of them is left blocked.
        for _ in range(settings.load_workers + 1):
            refused_promptly(lambda: load(fast, "m", "w"), "'w'", WHAT[kind], sha)
        refused_promptly(lambda: fast.download_checkpoint("w"), "'w'", WHAT[kind], sha)
        assert [m.name for m in client.list_models()] == ["good"]  # nothing from outside
        same(fast.predict("good", X), reference(twin, X))
        load(fast, "good", "good")  # a load worker is free: a new version
        assert client.get_model("good").version == 2
        # The same bytes uploaded again replace what was planted: the load works.
        assert client.save_checkpoint("w", planted.state_dict(), overwrite=True).sha256 == sha
        assert (settings.store / "blobs" / sha).is_file()
        assert not (settings.store / "blobs" / sha).is_symlink()
        load(client, "m", "w")
        same(client.predict("m", X), reference(planted, X))


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_deleting_a_checkpoint_whose_blob_was_planted_removes_the_plant_only(
    settings: Settings, tmp_path: Path, kind: str
) -> None:
    outside = tmp_path / "outside.pt"
    with running(settings) as server, ModelHostClient(server.target, timeout=30) as client:
        _, sha = save(client, "w", 2)
        plant(settings.store, sha, kind, outside)
        client.delete_checkpoint("w")
        assert client.list_checkpoints() == []
        assert not os.path.lexists(settings.store / "blobs" / sha)
    assert outside.exists() == (kind == "symlink")  # what the link pointed to is not touched


@pytest.mark.parametrize("kind", ["symlink", "fifo", "truncated"])
def test_a_page_in_from_a_planted_blob_is_data_loss_and_others_serve(
    settings: Settings, tmp_path: Path, kind: str
) -> None:
    """The bytes of a version at the store tier are read again at its page-in."""
    budget = dataclasses.replace(settings, device_memory_budget=400)  # one tiny_mlp
    with (
        running(budget) as server,
        ModelHostClient(server.target, timeout=30) as client,
        ModelHostClient(server.target, timeout=PROMPT) as fast,
    ):
        _, sha = save(client, "a", 1)
        load(client, "a", "a")
        twin, _ = save(client, "b", 2)
        load(client, "b", "b")  # a leaves for the store tier
        assert {m.name: m.tier for m in client.list_models()} == {"a": "store", "b": "resident"}
        plant(settings.store, sha, kind, tmp_path / "outside.pt")
        for _ in range(3):
            refused_promptly(lambda: fast.predict("a", X), "'a'", WHAT[kind], sha)
        same(fast.predict("b", X), reference(twin, X))
        assert client.get_model("a").tier == "store"


@pytest.mark.timeout(120)  # a start blocked on the FIFO fails here rather than hangs
def test_a_restore_from_a_planted_fifo_starts_and_says_why(settings: Settings) -> None:
    """A version loaded at start (no budget: not on demand) from a FIFO neither keeps the
    port from opening nor the other versions from coming back."""
    restoring = dataclasses.replace(settings, restore=True)
    with running(restoring) as server, ModelHostClient(server.target, timeout=30) as client:
        _, sha = save(client, "w", 1)
        load(client, "m", "w")
        twin, _ = save(client, "good", 2)
        load(client, "good", "good")
    plant(settings.store, sha, "fifo")
    start = time.monotonic()
    with running(restoring) as server, ModelHostClient(server.target, timeout=30) as client:
        assert time.monotonic() - start < 60
        states = {m.name: (m.state, m.status_message) for m in client.list_models()}
        assert states["good"] == ("ready", "")
        assert states["m"][0] == "failed" and "FIFO" in states["m"][1], states
        expect(grpc.StatusCode.NOT_FOUND, lambda: client.get_model("m"), "not restored", "FIFO")
        same(client.predict("good", X), reference(twin, X))


FSIZE = 2 << 20  # bytes: RLIMIT_FSIZE of the server below


class FileSizeLimited(ServerProcess):
    """A server process whose files may not grow past FSIZE bytes (RLIMIT_FSIZE, as
    `ulimit -f` sets it; CPython ignores SIGXFSZ, so a write past it fails with EFBIG)."""

    @property
    def command(self) -> list[str]:
        limit = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE}, "
            "resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
            "os.execv(sys.executable, sys.argv[1:])"
        )
        return [sys.executable, "-c", limit, *super().command]


def test_a_file_larger_than_the_file_system_takes_is_resource_exhausted(
    tmp_path: Path,
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    if hard != resource.RLIM_INFINITY and hard < FSIZE:
        pytest.skip(f"the file-size limit is {hard} bytes here already")
    store = tmp_path / "store"
    small = build("tiny_mlp", seed=1)
    big = {"w": torch.zeros(2 * FSIZE // 4)}  # twice the limit
    tests = os.pathsep.join(
        filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])
    )
    with (
        FileSizeLimited.start(
            store,
            args=["--restore", "--architecture", "tiny_mlp=helpers.models:tiny_mlp"],
            env={"PYTHONPATH": tests},
        ) as server,
        ModelHostClient(server.target, timeout=60) as client,
    ):
        kept = client.save_checkpoint("small", small.state_dict())
        for save_big in (
            lambda: client.save_checkpoint("big", big),
            lambda: client.save_checkpoint("small", big, overwrite=True),
        ):
            expect(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                save_big,
                "refused a file this large",
                "too large",
            )
        assert [(c.name, c.sha256) for c in client.list_checkpoints()] == [("small", kept.sha256)]
        assert temp_files(store) == []
        assert sorted(p.name for p in (store / "blobs").iterdir()) == [kept.sha256]
        load(client, "m", "small")
        same(client.predict("m", X), reference(small, X))
        downloaded = client.download_checkpoint("small")
        assert isinstance(downloaded, dict)
        assert all(torch.equal(downloaded[k], v) for k, v in small.state_dict().items())
        assert server.returncode is None
