"""Token files take effect without a restart (red team 8, L4).

A rotation, or a leaked token revoked through the Kubernetes Secret, used to need every
pod restarted: the files were read once at start. They are now read again when their stat
changes (looked at by a call at most every RELOAD_INTERVAL), however the file changed: an
atomic replace, an in-place rewrite, or a Secret volume's `..data` link swap. A changed
file that holds no token or cannot be read keeps the tokens read before (an ERROR is
logged): a file caught empty mid-write must never open the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from modelhost.client import ChannelConfig, ModelHostClient, ModelHostError
from modelhost.server import Server, Settings, running
from modelhost.server import auth as auth_module
from modelhost.server.auth import FRESH_SECONDS, RELOAD_INTERVAL, LiveTokens

OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
PREDICT = "/modelhost.v1.ModelHost/Predict"
LOAD = "/modelhost.v1.ModelHost/LoadModel"
SOON = 2 * RELOAD_INTERVAL + 0.5  # the most a change may take, with room for a slow look


def code(server: Server, token: str, call: str = "list") -> grpc.StatusCode:
    """The status of a call made with `token` (list: an inference call; unload: a
    management one, NOT_FOUND once the token passes)."""
    with ModelHostClient(server.target, config=ChannelConfig(token=token), timeout=10) as c:
        try:
            c.list_models() if call == "list" else c.unload_model("nothing-here")
        except ModelHostError as error:
            return error.code
    return OK


def within(seconds: float, condition: Callable[[], bool]) -> float:
    """How long `condition` took to hold (asserts it did within `seconds`)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "the token file's change was not seen"
        time.sleep(0.1)
    return time.monotonic() - started


def replace_atomically(path: Path, text: str) -> None:
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    os.replace(staged, path)


def rewrite_in_place(path: Path, text: str) -> None:
    with path.open("r+") as file:  # the same inode: truncated, then written
        file.truncate(0)
        file.write(text)


def backdate(path: Path) -> None:
    """Makes `path` (not what it links to) look written a minute ago: a fresh file is read
    at every look (see test_a_rewrite_within_one_tick_of_the_file_clock_is_seen), which
    would let a change be seen that a look at the stat alone would miss."""
    old = time.time() - 60
    os.utime(path, (old, old), follow_symlinks=False)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("old-token\n")
    backdate(path)
    return path


@pytest.mark.parametrize("change", [replace_atomically, rewrite_in_place])
def test_a_changed_token_file_takes_effect_without_a_restart(
    settings: Settings, token_file: Path, change: Callable[[Path, str], None]
) -> None:
    with running(dataclasses.replace(settings, token_file=str(token_file))) as server:
        assert code(server, "old-token") == OK
        assert code(server, "new-token") == UNAUTH
        change(token_file, "# rotated\nnew-token\n")
        within(SOON, lambda: code(server, "old-token") == UNAUTH)
        assert code(server, "new-token") == OK


def test_a_management_token_file_is_read_again_too(settings: Settings, tmp_path: Path) -> None:
    admin = tmp_path / "admin"
    admin.write_text("old-admin\n")
    backdate(admin)
    configured = dataclasses.replace(settings, management_token_file=str(admin))
    with running(configured) as server:
        assert code(server, "old-admin", "unload") == grpc.StatusCode.NOT_FOUND
        replace_atomically(admin, "new-admin\n")
        within(SOON, lambda: code(server, "old-admin", "unload") == UNAUTH)
        assert code(server, "new-admin", "unload") == grpc.StatusCode.NOT_FOUND


def secret_volume(folder: Path, version: str, text: str) -> None:
    """What the kubelet does to a Secret volume: a new timestamped folder, a `..data`
    link swapped atomically to it; `tokens` links to `..data/tokens` throughout."""
    (folder / version).mkdir()
    (folder / version / "tokens").write_text(text)
    os.symlink(version, folder / "..data_tmp")
    os.replace(folder / "..data_tmp", folder / "..data")
    backdate(folder / version / "tokens")
    if not (folder / "tokens").is_symlink():
        os.symlink("..data/tokens", folder / "tokens")
        backdate(folder / "tokens")


def test_a_kubernetes_secret_update_takes_effect(settings: Settings, tmp_path: Path) -> None:
    volume = tmp_path / "secret"
    volume.mkdir()
    secret_volume(volume, "..2026_01_01_00_00_00.1", "old-token\n")
    with running(dataclasses.replace(settings, token_file=str(volume / "tokens"))) as server:
        assert code(server, "old-token") == OK
        secret_volume(volume, "..2026_01_01_00_01_00.2", "new-token\n")
        within(SOON, lambda: code(server, "old-token") == UNAUTH)
        assert code(server, "new-token") == OK


def test_an_emptied_or_unreadable_file_keeps_the_old_tokens(
    settings: Settings, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelhost.server.auth")
    with running(dataclasses.replace(settings, token_file=str(token_file))) as server:
        for broken, why in (
            (lambda: rewrite_in_place(token_file, ""), "holds no token"),  # mid-write
            (lambda: replace_atomically(token_file, "  \n\t\n"), "holds no token"),
            (lambda: replace_atomically(token_file, "# all revoked\n"), "holds no token"),
            (lambda: token_file.write_bytes(b"\xff\xfe\x00bad"), "is not UTF-8 text"),
            (token_file.unlink, "cannot be read"),
        ):
            caplog.clear()
            broken()
            # Files are looked at by calls: the old token keeps working meanwhile.
            within(SOON, lambda why=why: code(server, "old-token") == OK and why in caplog.text)  # type: ignore[misc]
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and "keeping the 1 tokens read from it before" in caplog.text
            assert "old-token" not in caplog.text
            assert code(server, "old-token") == OK
            assert code(server, "") == UNAUTH  # authentication stays on
        # Once the file holds tokens again, they take effect.
        replace_atomically(token_file, "new-token\n")
        within(SOON, lambda: code(server, "new-token") == OK)
        assert code(server, "old-token") == UNAUTH
        assert "token_file" in caplog.text and "1 tokens now" in caplog.text


def test_a_broken_file_is_reported_once(
    settings: Settings, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = LiveTokens(dataclasses.replace(settings, token_file=str(token_file)), interval=0)
    token_file.write_text("")
    for _ in range(5):
        assert tokens.verdict(PREDICT, b"old-token") is None
    assert [r.levelno for r in caplog.records] == [logging.ERROR]


def test_a_token_given_by_value_stays_beside_the_file(settings: Settings, token_file: Path) -> None:
    given = dataclasses.replace(settings, token="by-value", token_file=str(token_file))
    tokens = LiveTokens(given, interval=0)
    assert tokens.current.inference == (b"by-value", b"old-token")
    rewrite_in_place(token_file, "new")
    tokens.refresh()
    assert tokens.current.inference == (b"by-value", b"new")


def test_a_rewrite_within_one_tick_of_the_file_clock_is_seen(
    settings: Settings, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """File times have a coarse clock on many systems (a few ms before Linux 6.13): a
    rewrite of the same size within one tick leaves the stat as it was. A file modified in
    the last FRESH_SECONDS is read again at each look, so that change is seen all the same."""
    tokens = LiveTokens(dataclasses.replace(settings, token_file=str(token_file)), interval=0)
    stat = os.stat(token_file)
    now = time.time_ns()
    frozen = (stat.st_dev, stat.st_ino, 4, now, now)  # the stat the clock's tick leaves
    monkeypatch.setattr(auth_module, "_signature", lambda path: frozen)
    rewrite_in_place(token_file, "abc\n")
    tokens.refresh()
    assert tokens.current.inference == (b"abc",)
    rewrite_in_place(token_file, "xyz\n")  # the same size, the same tick
    tokens.refresh()
    assert tokens.current.inference == (b"xyz",)
    # Once the file is no longer fresh, an unchanged stat means an unchanged file.
    old = now - int((FRESH_SECONDS + 1) * 1e9)
    monkeypatch.setattr(auth_module, "_signature", lambda path: (*frozen[:3], old, old))
    tokens.refresh()  # the stat changed: read
    reads: list[str] = []

    def read(setting: str, path: str) -> tuple[bytes, ...]:
        reads.append(path)
        return ()

    monkeypatch.setattr(auth_module, "_file_tokens", read)
    tokens.refresh()
    assert reads == [] and tokens.current.inference == (b"xyz",)


def test_the_files_are_stat_ed_at_most_once_an_interval(
    settings: Settings, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between looks a call costs a clock read, not a system call."""
    tokens = LiveTokens(dataclasses.replace(settings, token_file=str(token_file)), interval=60)
    stats: list[str] = []
    real_stat = os.stat

    def counted(path: str, *args: object, **kwargs: object) -> os.stat_result:
        stats.append(str(path))
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(auth_module.os, "stat", counted)
    for _ in range(1000):
        assert tokens.verdict(PREDICT, b"old-token") is None
    assert stats == []
    token_file.write_text("new-token\n")
    real_monotonic = time.monotonic
    monkeypatch.setattr(auth_module.time, "monotonic", lambda: real_monotonic() + 3600)
    assert tokens.verdict(PREDICT, b"new-token") is None
    assert stats == [str(token_file)]


def test_a_token_file_that_blocks_or_never_ends_holds_up_no_call(
    settings: Settings, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Red team 13, F5: the files were read on the event loop. A FIFO swapped in for the
    file blocked its open, and with it every call, health checks included; a link to
    /dev/zero was read until memory ran out. Both keep the old tokens, with an ERROR."""
    with running(dataclasses.replace(settings, token_file=str(token_file))) as server:
        fifo = token_file.with_name("fifo")
        os.mkfifo(fifo)
        os.replace(fifo, token_file)

        def seen(words: str) -> bool:  # the calls start the looks at the file
            return code(server, "old-token") == OK and words in caplog.text

        within(SOON, lambda: seen("not a regular file"))
        assert code(server, "new-token") == UNAUTH
        caplog.clear()
        token_file.unlink()
        token_file.symlink_to("/dev/zero")
        within(SOON, lambda: seen("not a regular file"))
        big = token_file.with_name("big")
        big.write_text("new-token\n" + "#" * (1 << 20))
        os.replace(big, token_file)
        within(SOON, lambda: seen("larger than"))
        assert code(server, "new-token") == UNAUTH


def test_a_revoked_token_is_refused_from_the_first_call_after_the_look(
    settings: Settings, token_file: Path
) -> None:
    """The call that starts a look at the file waits for it (review 15b, M3: judged by the
    tokens read before, the first call after a revocation got in)."""
    with running(dataclasses.replace(settings, token_file=str(token_file))) as server:
        assert code(server, "old-token") == OK
        replace_atomically(token_file, "new-token\n")
        time.sleep(RELOAD_INTERVAL + 0.2)  # the next call starts a look
        with (  # exactly one call
            grpc.insecure_channel(server.target) as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            channel.unary_unary("/modelhost.v1.ModelHost/ListModels")(
                b"", metadata=(("authorization", "Bearer old-token"),), timeout=10
            )
        assert refused.value.code() == UNAUTH


def test_a_look_at_the_token_files_waits_for_no_other_work(
    settings: Settings, token_file: Path
) -> None:
    """Red team 14, F6: the look ran on asyncio's default threads, which parse large
    requests and once waited for another replica's store lock: with every one of them
    busy, a revoked token kept working until one came free. The look has a thread of its
    own now. Here every default thread of the server's loop is taken."""
    with running(dataclasses.replace(settings, token_file=str(token_file))) as server:
        assert server.loop is not None
        loop = server.loop
        release = threading.Event()
        workers = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default executor's size

        async def take_every_default_thread() -> None:
            for _ in range(workers):
                loop.run_in_executor(None, release.wait)

        asyncio.run_coroutine_threadsafe(take_every_default_thread(), loop).result(10)
        try:
            assert code(server, "old-token") == OK
            replace_atomically(token_file, "new-token\n")
            within(SOON, lambda: code(server, "old-token") == UNAUTH)
        finally:
            release.set()
