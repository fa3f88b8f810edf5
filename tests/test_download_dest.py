"""Where a download to `dest` writes, against a real server on 127.0.0.1: only a
partial file it creates itself (a new name, O_EXCL|O_NOFOLLOW, once the header is in),
then `dest` by rename. A symlink planted at the old `DEST.part` name, or at `dest`, is
never written through, and nothing else in the folder is touched, however the call
ends (round 8, L1)."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from modelhost.cli import main
from modelhost.client import AsyncModelHostClient, ModelHostClient, NotFoundError, transfers
from modelhost.server import Server

VICTIM = b"# the victim's precious file\n" * 10
CLIENTS = pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
_UMASK = os.umask(0)  # read at import, before any server thread runs
os.umask(_UMASK)


class Interrupted(Exception):
    """Raised from a progress callback: the download stops half-way."""


def _checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4096.0)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def stored(server: Server) -> Iterator[tuple[str, bytes]]:
    """The target of a server holding checkpoint "ck", and its bytes."""
    data = _checkpoint()
    with ModelHostClient(server.target, timeout=60) as client:
        client.save_checkpoint("ck", data)
    yield server.target, data


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A folder someone else can write to: a symlink at the old partial name `ck.pt.part`
    to a victim file outside it, and a file of the user's."""
    folder = tmp_path / "shared"
    folder.mkdir()
    (tmp_path / "victim").write_bytes(VICTIM)
    (folder / "ck.pt.part").symlink_to(tmp_path / "victim")
    (folder / "notes.txt").write_bytes(b"mine\n")
    return folder


def _listing(folder: Path) -> dict[str, tuple[str, bytes | str]]:
    """Each entry of `folder`: a symlink's target, or a file's bytes."""
    return {
        entry.name: ("link", os.readlink(entry))
        if entry.is_symlink()
        else ("file", entry.read_bytes())
        for entry in folder.iterdir()
    }


def _download(target: str, aio: bool, name: str, dest: Path, **kwargs: Any) -> Any:
    if aio:

        async def run() -> Any:
            async with AsyncModelHostClient(target, timeout=60) as client:
                return await client.download_checkpoint(name, dest, **kwargs)

        return asyncio.run(run())
    with ModelHostClient(target, timeout=60) as client:
        return client.download_checkpoint(name, dest, **kwargs)


@CLIENTS
def test_a_failed_download_touches_nothing_in_the_folder(
    stored: tuple[str, bytes], shared: Path, tmp_path: Path, aio: bool
) -> None:
    """NOT_FOUND: no byte came, so no file was opened, created, truncated or removed."""
    before = _listing(shared)
    with pytest.raises(NotFoundError):
        _download(stored[0], aio, "nope", shared / "ck.pt")
    assert _listing(shared) == before
    assert (tmp_path / "victim").read_bytes() == VICTIM


@CLIENTS
def test_a_download_writes_dest_and_nothing_else(
    stored: tuple[str, bytes], shared: Path, tmp_path: Path, aio: bool
) -> None:
    """`dest` ends a regular file holding the checkpoint's bytes, with the mode
    `open("wb")` gives; the planted symlink, its target and the other file are as
    they were, and no partial file is left."""
    target, data = stored
    before = _listing(shared)
    dest = shared / "ck.pt"
    assert _download(target, aio, "ck", dest) == dest
    assert not dest.is_symlink() and dest.is_file()
    assert dest.read_bytes() == data
    assert dest.stat().st_mode & 0o777 == 0o666 & ~_UMASK
    assert _listing(shared) == {**before, "ck.pt": ("file", data)}
    assert (tmp_path / "victim").read_bytes() == VICTIM


@CLIENTS
def test_a_symlink_at_dest_is_replaced_not_written_through(
    stored: tuple[str, bytes], shared: Path, tmp_path: Path, aio: bool
) -> None:
    """rename(2) replaces the link itself: its target keeps its bytes."""
    target, data = stored
    (tmp_path / "linked").write_bytes(VICTIM)
    dest = shared / "ck.pt"
    dest.symlink_to(tmp_path / "linked")
    before = _listing(shared)
    assert _download(target, aio, "ck", dest) == dest
    assert not dest.is_symlink() and dest.read_bytes() == data
    assert (tmp_path / "linked").read_bytes() == VICTIM
    assert (tmp_path / "victim").read_bytes() == VICTIM
    assert _listing(shared) == {**before, "ck.pt": ("file", data)}


@CLIENTS
def test_an_interrupted_download_leaves_no_partial_file(
    stored: tuple[str, bytes], shared: Path, tmp_path: Path, aio: bool
) -> None:
    """Mid-stream, the bytes go to a new regular file of the client's own (not the
    planted name); when the download is interrupted, that file alone is removed."""
    before = _listing(shared)
    during: list[dict[str, tuple[str, bytes | str]]] = []

    def progress(done: int, total: int) -> None:
        during.append(_listing(shared))
        raise Interrupted

    with pytest.raises(Interrupted):
        _download(stored[0], aio, "ck", shared / "ck.pt", progress=progress)
    (added,) = set(during[0]) - set(before)
    assert added.startswith(".ck.pt.") and added.endswith(".part")
    assert during[0][added][0] == "file"
    assert {k: v for k, v in during[0].items() if k != added} == before
    assert _listing(shared) == before
    assert (tmp_path / "victim").read_bytes() == VICTIM


def test_the_cli_download_keeps_off_a_planted_partial(
    stored: tuple[str, bytes],
    shared: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`modelhost download`, failing then succeeding: the round 8 repro, in process."""
    target, data = stored
    before = _listing(shared)
    dest = str(shared / "ck.pt")
    assert main(["download", "nope", dest, "--target", target, "-q"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert _listing(shared) == before
    assert main(["download", "ck", dest, "--target", target, "-q"]) == 0
    assert capsys.readouterr().out.strip() == dest
    assert _listing(shared) == {**before, "ck.pt": ("file", data)}
    assert (tmp_path / "victim").read_bytes() == VICTIM


def test_a_partial_file_is_never_an_existing_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A symlink planted at the very name the client draws is refused (O_EXCL), not
    followed: the client draws another name."""
    names = iter(["planted", "fresh"])
    monkeypatch.setattr(transfers.secrets, "token_hex", lambda n: next(names))
    (tmp_path / "victim").write_bytes(VICTIM)
    (tmp_path / ".ck.pt.planted.part").symlink_to(tmp_path / "victim")
    part, file = transfers.create_partial(tmp_path / "ck.pt")
    with file:
        file.write(b"new")
    assert part == tmp_path / ".ck.pt.fresh.part"
    assert part.read_bytes() == b"new" and not part.is_symlink()
    assert (tmp_path / "victim").read_bytes() == VICTIM
    assert os.readlink(tmp_path / ".ck.pt.planted.part") == str(tmp_path / "victim")
