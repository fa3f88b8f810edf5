"""Ctrl-C in a client command: one `interrupted` line (and a hint, for a command that
changes the server) and exit status 130, however many times it comes while the command
cleans up.

The first SIGINT raises `KeyboardInterrupt` where the command waits (its call), and the
clean-up runs as it unwinds: the call cancelled, the upload's reader thread stopped, a
partial download removed, the channel closed. A second SIGINT must not interrupt that
clean-up: one that lands in gRPC's channel close (which waits for the cancelled call to
end) leaves the channel closed but never destroyed, and such a process was once seen
to hang at exit. `timeout -s INT` sends two at once (to the process, then to its
group), so a second one within `GRACE_SECONDS` of the first is ignored; one after that
ends the process at once, should the clean-up itself hang.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import FrameType

INTERRUPTED = 130
"""The exit status of a command ended by SIGINT, as shells report it (128 + 2)."""
GRACE_SECONDS = 2.0
"""How long after the first SIGINT another one is taken as the same ctrl-C."""
MESSAGE = "interrupted"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command that changes the server: the server may have done the
    change before it saw the call cancelled, which `hint` says (and how to look)."""

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint


@contextmanager
def clean_up_uninterrupted() -> Iterator[None]:
    """Within the block, the first SIGINT raises KeyboardInterrupt; later ones do not
    interrupt the clean-up it starts (see the module). Where SIGINT is not Python's
    default (a program that set its own handler) or off the main thread, the block
    runs as it is."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    first: list[float] = []

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if not first:
            first.append(time.monotonic())
            raise KeyboardInterrupt
        if time.monotonic() - first[0] >= GRACE_SECONDS:
            exit_interrupted()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_interrupted(hint: str = "") -> None:
    """Says `interrupted` and ends the process now, with status 130: no interpreter
    shutdown, which waits on what the interrupted command left (gRPC's threads)."""
    report(hint)
    os._exit(INTERRUPTED)


def report(hint: str = "") -> None:
    """What an interrupted command prints, after what it printed (flushed): one line, and
    a `hint:` line if there is one."""
    with suppress(OSError, ValueError):  # a closed pipe: nothing more to say there
        sys.stdout.flush()
    with suppress(OSError, ValueError):
        sys.stderr.write(f"{MESSAGE}\n" + (f"hint: {hint}\n" if hint else ""))
        sys.stderr.flush()
