"""A raw HTTP/2 client for hostile tests: it starts gRPC calls and sends part of their
request, which a gRPC client never does (it sends whole messages, and honours the
server's stream limit)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import Any

CHECK = "/grpc.health.v1.Health/Check"
REFUSED_STREAM = 7

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
INITIAL_WINDOW = 65_535  # HTTP/2's, until the server's SETTINGS say otherwise


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing (names and values under 127 bytes)."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def _half_check() -> bytes:
    """The start of a gRPC message framing a 60 KB health Check: the rest never comes."""
    size = 60_000  # field 1 (service), a string of size - 4 bytes: 59,996 (a 3-byte varint)
    return b"\0" + struct.pack(">I", size) + b"\x0a\xdc\xd4\x03" + b"x" * 4_000


class Raw:
    """An HTTP/2 connection that starts gRPC calls and sends part of their request. It
    acknowledges the server's SETTINGS before it starts a stream (so the server enforces the
    stream limit it announced) and records what the server ends: RST_STREAM, trailers
    (HEADERS with END_STREAM), GOAWAY, and the connection closing. `send` honours the
    flow-control windows the server grants."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.port = port
        self.resets: dict[int, int] = {}  # stream -> error code
        self.ended: set[int] = set()  # streams the server ended with trailers
        self.goaway = False
        self.window = INITIAL_WINDOW  # the connection's send window
        self.initial = INITIAL_WINDOW  # a new stream's
        self.windows: dict[int, int] = {}
        self.closed = threading.Event()
        self._settled = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(SETTINGS, 0, 0))
        threading.Thread(target=self._read, daemon=True).start()
        assert self._settled.wait(30), "the server sent no SETTINGS"

    def _send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read(self) -> None:
        try:
            while True:
                head = self._exactly(9)
                size, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._exactly(size) if size else b""
                with self._changed:
                    if kind == SETTINGS and not flags & 1:
                        self._settings(payload)
                        self._send(_frame(SETTINGS, 1, 0))  # ACK, before any stream starts
                        self._settled.set()
                    elif kind == WINDOW_UPDATE:
                        grown = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                        if stream == 0:
                            self.window += grown
                        else:
                            self.windows[stream] = self.windows.get(stream, self.initial) + grown
                    elif kind == PING and not flags & 1:
                        self._send(_frame(PING, 1, 0, payload))
                    elif kind == RST_STREAM:
                        self.resets[stream] = int.from_bytes(payload[:4], "big")
                    elif kind == HEADERS and flags & 1:
                        self.ended.add(stream)
                    elif kind == GOAWAY:
                        self.goaway = True
                    self._changed.notify_all()
        except (EOFError, OSError):
            pass
        finally:
            with self._changed:
                self.closed.set()
                self._changed.notify_all()

    def start(
        self, stream: int, metadata: tuple[tuple[str, str], ...] = (), path: str = CHECK
    ) -> None:
        """Starts a call of `path` on `stream` and sends part of its request (the start of
        a 60 KB message)."""
        self._send(self._headers(stream, path, metadata) + _frame(0, 0, stream, _half_check()))

    def open(self, stream: int, path: str) -> None:
        """Starts a call of `path` on `stream`, its request not begun."""
        self._send(self._headers(stream, path, ()))

    def _headers(self, stream: int, path: str, metadata: tuple[tuple[str, str], ...]) -> bytes:
        fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        with self._changed:
            self.windows.setdefault(stream, self.initial)
        return _frame(HEADERS, 4, stream, b"".join(_literal(n, v) for n, v in fields))

    def _settings(self, payload: bytes) -> None:
        for at in range(0, len(payload), 6):
            key, value = struct.unpack(">HI", payload[at : at + 6])
            if key == 4:  # SETTINGS_INITIAL_WINDOW_SIZE
                for stream in self.windows:
                    self.windows[stream] += value - self.initial
                self.initial = value

    def send(self, stream: int, data: bytes, seconds: float) -> int:
        """Sends `data` on `stream` as far as the server's windows let it within `seconds`
        (never the end of the stream); the bytes sent."""
        sent, until = 0, time.monotonic() + seconds
        while sent < len(data):
            with self._changed:
                if (
                    not self._changed.wait_for(
                        lambda: (
                            (self.window > 0 and self.windows[stream] > 0) or self.closed.is_set()
                        ),
                        max(0.0, until - time.monotonic()),
                    )
                    or self.closed.is_set()
                    or stream in self.resets
                ):
                    return sent
                size = min(len(data) - sent, self.window, self.windows[stream], 16_384)
                self.window -= size
                self.windows[stream] -= size
            self._send(_frame(DATA, 0, stream, data[sent : sent + size]))
            sent += size
        return sent

    def cancel(self, stream: int) -> None:
        self._send(_frame(RST_STREAM, 0, stream, struct.pack(">I", 8)))  # CANCEL

    def wait(self, done: Any, seconds: float = 30) -> bool:
        """Waits until `done()` holds (True) or `seconds` pass (False)."""
        with self._changed:
            return self._changed.wait_for(done, seconds)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
