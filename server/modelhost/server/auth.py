"""Bearer tokens with a management tier (`gate.Gate` applies them to every call).

- Health checks and reflection are always open (Kubernetes probes, grpcurl).
- Management RPCs (`TIERS`: SaveCheckpoint, DeleteCheckpoint, LoadModel, UnloadModel
  and the Open Inference Protocol's repository load/unload) need a management token
  when any is configured; an inference token there gets PERMISSION_DENIED.
- Every other RPC needs an inference or a management token when inference tokens
  are configured.
- No token or a wrong one: UNAUTHENTICATED. Tokens are compared in constant time.
- Tokens lose their surrounding whitespace, given by value or in a file (one a line;
  a UTF-8 byte order mark is dropped).
- A token file that holds no token, or a token that is only whitespace, stops the
  server at start: the operator wants authentication, so it must not turn it off.
- Token files are re-read when they change (`LiveTokens`: a stat per file at most every
  RELOAD_INTERVAL, started by a call and made on a thread, which that call waits for up
  to LOOK_WAIT: a file on a volume that hangs holds up no call for longer), so a rotation
  or a revoked token takes effect without a restart. A changed file that holds no token
  or cannot be read keeps the tokens read before (an ERROR is logged): a file caught
  mid-write never opens the server.
  A token file must be a regular file of at most MAX_TOKEN_FILE_BYTES (a FIFO, a device
  or a directory swapped in for it cannot be read).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from modelhost.server.settings import Settings

INFERENCE, MANAGEMENT = "inference", "management"
TIERS: dict[str, str] = {
    # Management: what changes the stored checkpoints or the hosted models.
    "/modelhost.v1.ModelHost/SaveCheckpoint": MANAGEMENT,
    "/modelhost.v1.ModelHost/DeleteCheckpoint": MANAGEMENT,
    "/modelhost.v1.ModelHost/LoadModel": MANAGEMENT,
    "/modelhost.v1.ModelHost/UnloadModel": MANAGEMENT,
    "/inference.GRPCInferenceService/RepositoryModelLoad": MANAGEMENT,
    "/inference.GRPCInferenceService/RepositoryModelUnload": MANAGEMENT,
    # Inference: reading and predicting.
    "/modelhost.v1.ModelHost/DownloadCheckpoint": INFERENCE,
    "/modelhost.v1.ModelHost/ListCheckpoints": INFERENCE,
    "/modelhost.v1.ModelHost/GetCheckpoint": INFERENCE,
    "/modelhost.v1.ModelHost/ListModels": INFERENCE,
    "/modelhost.v1.ModelHost/GetModel": INFERENCE,
    "/modelhost.v1.ModelHost/ListArchitectures": INFERENCE,
    "/modelhost.v1.ModelHost/Predict": INFERENCE,
    "/inference.GRPCInferenceService/ServerLive": INFERENCE,
    "/inference.GRPCInferenceService/ServerReady": INFERENCE,
    "/inference.GRPCInferenceService/ModelReady": INFERENCE,
    "/inference.GRPCInferenceService/ServerMetadata": INFERENCE,
    "/inference.GRPCInferenceService/ModelMetadata": INFERENCE,
    "/inference.GRPCInferenceService/ModelInfer": INFERENCE,
    "/inference.GRPCInferenceService/ModelConfig": INFERENCE,
    "/inference.GRPCInferenceService/RepositoryIndex": INFERENCE,
    "/inference.GRPCInferenceService/ModelStatistics": INFERENCE,
}
"""The tier of every RPC (tests/test_security.py checks every RPC of both services is
here). A method missing from it needs the management token: the table fails closed."""
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
RELOAD_INTERVAL = 1.0
"""Seconds between looks at the token files for a change (a stat of each, made by the
first call after the interval): a rotated or revoked token takes effect within about this."""
MAX_TOKEN_FILE_BYTES = 1 << 20
LOOK_WAIT = 1.0
"""Seconds a call that starts a look at the token files waits for it (`LiveTokens.judge`)."""
FRESH_SECONDS = 2.0
"""A token file modified less than this long ago is read again at the next look even if
its stat has not changed: file times have a coarse clock, so a rewrite of the same size
within one tick would otherwise go unseen."""

log = logging.getLogger(__name__)


def _value_tokens(setting: str, value: str) -> tuple[bytes, ...]:
    """The token given by value (`setting`), without surrounding whitespace: a secret put
    in the environment often ends with a newline."""
    if not value:
        return ()
    if not value.strip():
        raise ValueError(
            f"{setting} is only whitespace: "
            "refusing to start without the authentication it asks for"
        )
    return (value.strip().encode(),)


def _file_tokens(setting: str, path: str) -> tuple[bytes, ...]:
    """The tokens in a file (`setting`_file): one a line, without surrounding whitespace,
    neither blank lines nor comments. ValueError when it holds none, OSError when it
    cannot be read."""
    lines = (line.strip() for line in _read_token_file(path).splitlines())
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise ValueError(f"{setting}_file {path} holds no token (it is empty or only comments)")
    return tuple(token.encode() for token in found)


def _read_token_file(path: str) -> str:
    """A token file's text: a regular file (its links followed, as a Kubernetes Secret's
    are) of at most MAX_TOKEN_FILE_BYTES; opened without waiting for a writer (a FIFO)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = file.read(MAX_TOKEN_FILE_BYTES + 1)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_TOKEN_FILE_BYTES} bytes")
    return data.decode("utf-8-sig")


def _signature(path: str) -> tuple[int, ...] | None:
    """What tells a file's change, None when it cannot be stat'ed. The path is followed: a
    Kubernetes Secret volume changes its files by swapping a `..data` link."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _fresh(signature: tuple[int, ...] | None) -> bool:
    """Whether the file was modified in the last FRESH_SECONDS."""
    return signature is not None and abs(time.time() - signature[3] / 1e9) < FRESH_SECONDS


class _TokenFile:
    """A token file of one tier and the tokens last read from it."""

    def __init__(self, tier: str, setting: str, path: str) -> None:
        self.tier, self.setting, self.path = tier, setting, path
        self.signature = _signature(path)  # before the read: a change in between is seen
        try:
            self.tokens = _file_tokens(setting, path)
        except ValueError as error:
            raise ValueError(
                f"{error}: refusing to start without the authentication it asks for"
            ) from None
        self.reported: tuple[tuple[int, ...] | None, str] | None = None

    def _read(self) -> tuple[tuple[bytes, ...], str]:
        """The file's tokens, or why there are none."""
        try:
            return _file_tokens(self.setting, self.path), ""
        except UnicodeDecodeError as error:
            return (), f"is not UTF-8 text ({error.reason} at byte {error.start})"
        except OSError as error:
            return (), f"cannot be read ({error.strerror or error})"
        except ValueError:
            return (), "holds no token (it is empty or only comments)"

    def refresh(self) -> bool:
        """Reads the file again if its stat changed (or it is fresh); True when its tokens
        changed. One that holds no token or cannot be read keeps the tokens read before,
        with an ERROR logged once for each change."""
        signature = _signature(self.path)
        if signature == self.signature and not _fresh(signature):
            return False
        self.signature = signature
        tokens, problem = self._read()
        if problem:
            if self.reported != (signature, problem):
                self.reported = (signature, problem)
                log.error(
                    "%s_file %s changed but %s: keeping the %d tokens read from it before",
                    self.setting,
                    self.path,
                    problem,
                    len(self.tokens),
                )
            return False
        self.reported = None
        if tokens == self.tokens:
            return False
        log.info(
            "%s_file %s changed: %d tokens now (%d before)",
            self.setting,
            self.path,
            len(tokens),
            len(self.tokens),
        )
        self.tokens = tokens
        return True


def _matches(presented: bytes, tokens: Iterable[bytes]) -> bool:
    found = False
    for token in tokens:  # no early exit: the time does not depend on which one matches
        found |= hmac.compare_digest(presented, token)
    return found


@dataclass(frozen=True)
class Tokens:
    """The configured tokens."""

    inference: tuple[bytes, ...] = ()
    management: tuple[bytes, ...] = ()
    # Health and reflection need no token, unless probes have a port of their own: then
    # they need an inference token on the main port.
    open_prefixes: tuple[str, ...] = OPEN_PREFIXES

    @classmethod
    def from_settings(cls, settings: Settings) -> Tokens:
        """The tokens `settings` give, as they are now (ValueError: see the module)."""
        return LiveTokens(settings).current

    @property
    def enabled(self) -> bool:
        return bool(self.inference or self.management)

    def verdict(self, method: str, presented: bytes | None) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message that refuse it."""
        if method.startswith(self.open_prefixes):
            return None
        tier = INFERENCE if method.startswith(OPEN_PREFIXES) else TIERS.get(method, MANAGEMENT)
        if tier == MANAGEMENT and self.management:
            if presented is not None and _matches(presented, self.management):
                return None
            if presented is not None and _matches(presented, self.inference):
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} needs the management token; an inference token was given",
                )
            return _unauthenticated(method, presented)
        if not self.inference:
            return None
        if presented is not None and _matches(presented, self.inference + self.management):
            return None
        return _unauthenticated(method, presented)


class LiveTokens:
    """The configured tokens (`current`), with their files read again when they change:
    `verdict` looks at most every `interval` seconds (one stat per file; between looks a
    call costs a clock read). A changed file that holds no token or cannot be read keeps
    its previous tokens, and an ERROR is logged."""

    def __init__(self, settings: Settings, interval: float = RELOAD_INTERVAL) -> None:
        self._interval = interval
        self._fixed: dict[str, tuple[bytes, ...]] = {}
        self._files: list[_TokenFile] = []
        for tier, setting, value, path in (
            (INFERENCE, "token", settings.token, settings.token_file),
            (
                MANAGEMENT,
                "management_token",
                settings.management_token,
                settings.management_token_file,
            ),
        ):
            self._fixed[tier] = _value_tokens(setting, value)
            if path:
                self._files.append(_TokenFile(tier, setting, path))
        self._open_prefixes = () if settings.health_port else OPEN_PREFIXES
        self.current = self._assemble()
        self._due = time.monotonic() + interval
        self._looking = threading.Lock()  # held while a look at the files runs

    def _assemble(self) -> Tokens:
        found = dict(self._fixed)
        for file in self._files:
            found[file.tier] += file.tokens
        return Tokens(found[INFERENCE], found[MANAGEMENT], self._open_prefixes)

    @property
    def enabled(self) -> bool:
        """Never changes: a file that held tokens keeps some."""
        return self.current.enabled

    @property
    def open_prefixes(self) -> tuple[str, ...]:
        return self.current.open_prefixes

    def refresh(self) -> None:
        """Reads the token files that changed, if `interval` has passed since the last look."""
        if not self._files or time.monotonic() < self._due:
            return
        self._due = time.monotonic() + self._interval
        if [file for file in self._files if file.refresh()]:  # every file, not the first
            self.current = self._assemble()

    def verdict(self, method: str, presented: bytes | None) -> tuple[grpc.StatusCode, str] | None:
        """`Tokens.verdict` with the files' tokens of at most `interval` seconds ago (a
        look at them, when due, is made here: off the event loop, use `judge`)."""
        self.refresh()
        return self.current.verdict(method, presented)

    async def judge(
        self, method: str, presented: bytes | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """`verdict` for a call on the event loop: a look at the files, when due, runs on a
        thread, and the call waits up to LOOK_WAIT for it (so a revoked token is refused
        from the look on). A look that takes longer (a volume that hangs) goes on alone:
        calls meanwhile are judged by the tokens read before."""
        if self._files and time.monotonic() >= self._due and self._looking.acquire(False):
            look = _on_a_thread_of_its_own(self._look)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(look), LOOK_WAIT)
        return self.current.verdict(method, presented)

    def _look(self) -> None:
        try:
            self.refresh()
        except Exception:
            log.exception("reading the token files failed: keeping the tokens read before")
        finally:
            self._looking.release()


def _on_a_thread_of_its_own(work: Callable[[], None]) -> asyncio.Future[None]:
    """`work` on a daemon thread of its own, done when the future is: a look at the token
    files never queues behind other work on asyncio's default threads (red team 14, F6:
    behind loads waiting for another replica's store lock, a revoked token kept working
    for 25 s), and one that hangs on its volume never holds up the process's exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            work()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, done)

    threading.Thread(target=run, name="modelhost-token-look", daemon=True).start()
    return done


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _unauthenticated(method: str, presented: bytes | None) -> tuple[grpc.StatusCode, str]:
    what = "no bearer token" if presented is None else "an invalid bearer token"
    return (
        grpc.StatusCode.UNAUTHENTICATED,
        f"{method} was called with {what}; send 'authorization: Bearer <token>'",
    )


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> bytes | None:
    """The token of the `authorization: Bearer <token>` header, if there is exactly one
    such header (two are ambiguous: which one a proxy meant is not ours to guess)."""
    headers = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(headers) != 1:
        return None
    value = headers[0]
    text = value.decode() if isinstance(value, bytes) else str(value)
    scheme, _, token = text.partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" and token.strip() else None
