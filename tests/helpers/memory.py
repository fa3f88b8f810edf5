"""This process's memory, as Linux counts it (the in-process server runs in it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def status_mib(key: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM, ...) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    raise KeyError(key)


def peak_growth_mib(call: Callable[[], Any]) -> int:
    """How far the peak resident memory of this process rises during `call`."""
    before = status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    call()
    return status_mib("VmHWM") - before
