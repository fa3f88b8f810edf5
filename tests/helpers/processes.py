"""`modelhost serve` as a child process: start it, find its port, watch it, kill it.

Used by the crash-safety tests and by `bench/soak.py`:

    with ServerProcess.start(store) as server:
        with ModelHostClient(server.target) as client: ...
        server.kill()             # SIGKILL, like a crash or an OOM kill
        server.restart()          # same store, new port

Its output (the server's log) is read on a thread, kept in `lines`, and never
fills the pipe.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

READY = "serving on "


def free_port() -> int:
    """A port free on 127.0.0.1 now (for a server that must be told its port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerFailed(RuntimeError):
    """The server process exited or never said where it serves."""


class ServerProcess:
    """A running `python -m modelhost.cli serve` process on 127.0.0.1 and a free port."""

    def __init__(
        self,
        store: Path,
        *,
        args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.store = Path(store)
        self.args = list(args)
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.lines: list[str] = []
        self.target = ""
        self.start_seconds = 0.0
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()

    @classmethod
    def start(
        cls,
        store: Path,
        *,
        args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout: float = 120.0,
    ) -> ServerProcess:
        """Starts a server on `store` and waits until it serves."""
        server = cls(store, args=args, env=env, start_timeout=start_timeout)
        server.launch()
        return server

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "modelhost.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--store",
            str(self.store),
            "--device",
            "cpu",
            *self.args,
        ]

    @property
    def pid(self) -> int:
        if self._process is None:
            raise ServerFailed("the server is not running")
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def launch(self) -> None:
        """Starts the process; returns once it logged where it serves (sets `target`)."""
        if self._process is not None and self._process.poll() is None:
            raise ServerFailed("the server is already running")
        self.lines = []
        self.target = ""
        self._ready = threading.Event()
        began = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        process = subprocess.Popen(
            self.command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self._process = process
        self._reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._reader.start()
        if not self._ready.wait(self.start_timeout) or not self.target:
            exited = process.poll()
            self.kill()
            why = f"exited with code {exited}" if exited is not None else "did not start"
            raise ServerFailed(
                f"the server {why} (waited up to {self.start_timeout:.0f}s); its output:\n"
                + "".join(self.lines[-40:])
            )
        self.start_seconds = time.monotonic() - began

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)
            if not self.target and READY in line:
                self.target = line.split(READY, 1)[1].split()[0]
                self._ready.set()
        self._ready.set()  # exited: wake a waiting launch()

    def log_count(self, text: str) -> int:
        """How many log lines so far contain `text`."""
        return sum(text in line for line in list(self.lines))

    def logged(self, text: str, timeout: float = 10.0) -> int:
        """`log_count(text)` once it is not 0, or at `timeout`: a line the server wrote
        after its reply is read from its stderr by another thread, a moment later."""
        deadline = time.monotonic() + timeout
        while not (count := self.log_count(text)) and time.monotonic() < deadline:
            time.sleep(0.02)
        return count

    def memory(self) -> dict[str, int]:
        """Memory figures of the process in bytes, from /proc/<pid>/status: VmRSS (resident),
        RssAnon (heap and other anonymous pages), RssFile (mapped files), VmHWM (peak)."""
        found = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in {"VmRSS", "RssAnon", "RssFile", "VmHWM"}:
                    found[key] = int(value.split()[0]) * 1024
        return found

    def rss_bytes(self) -> int:
        """The process's resident memory (VmRSS)."""
        return self.memory()["VmRSS"]

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a crash. Waits for the process to go."""
        self._end(signal.SIGKILL, 30.0)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), then SIGKILL after `timeout`; returns the exit code."""
        self._end(signal.SIGTERM, timeout)
        return self.returncode if self.returncode is not None else -1

    def restart(self) -> None:
        """Kills the process if it still runs, then starts a new one on the same store."""
        self.kill()
        self.launch()

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kill()
