"""/metrics requests have a deadline from accept and a size bound (red team 8, L2).

A socket timeout alone bounds each read: 32 connections trickling one header byte every
few seconds held every slot (MAX_CONNECTIONS) for as long as they liked, and every scrape
failed. The request line and headers must now arrive within READ_TIMEOUT of the accept,
in at most MAX_REQUEST_BYTES.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from helpers.processes import free_port
from modelhost.server import Server, Settings, running
from modelhost.server.metrics import MAX_CONNECTIONS, MAX_REQUEST_BYTES, READ_TIMEOUT


@pytest.fixture
def observed(settings: Settings) -> Iterator[Server]:
    with running(dataclasses.replace(settings, metrics_port=free_port())) as server:
        yield server


def scrape(server: Server, timeout: float = 3) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


def closed(connection: socket.socket) -> bool:
    """Whether the server closed `connection` (nothing else is ever sent to it here)."""
    connection.setblocking(False)
    try:
        return connection.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True
    finally:
        connection.setblocking(True)


def test_trickled_headers_do_not_hold_every_slot(observed: Server) -> None:
    scrape(observed)
    connections: list[socket.socket] = []
    stop = threading.Event()

    def trickle() -> None:  # one byte a second each: never READ_TIMEOUT silent
        while not stop.wait(1):
            for connection in list(connections):
                with contextlib.suppress(OSError):  # closed by the server
                    connection.sendall(b"a")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        for _ in range(MAX_CONNECTIONS + 8):  # the extra ones are closed on accept
            connection = socket.create_connection(("127.0.0.1", observed.metrics_port))
            connection.sendall(b"GET /metrics HTTP/1.1\r\nX-a: ")
            connections.append(connection)
        # The deadline counts from accept. Connecting may have taken seconds (the listen
        # backlog is small): every connection was accepted by the time the last returned.
        time.sleep(READ_TIMEOUT + 1)
        started = time.monotonic()
        assert "modelhost_requests" in scrape(observed)  # while they still trickle
        assert time.monotonic() - started < 3
        assert all(closed(connection) for connection in connections)
    finally:
        stop.set()
        trickler.join()
        for connection in connections:
            connection.close()


def test_an_oversized_request_is_refused_and_closed(observed: Server) -> None:
    with socket.create_connection(("127.0.0.1", observed.metrics_port), timeout=3) as connection:
        # Under http.server's own bounds (64 KiB a line, 100 lines), not under ours.
        header = b"X-a: " + b"a" * (16 << 10) + b"\r\n"
        assert len(header) > MAX_REQUEST_BYTES
        try:
            connection.sendall(b"GET /metrics HTTP/1.1\r\n" + header + b"\r\n")
            reply = b""
            while chunk := connection.recv(4096):  # until the server closes it
                reply += chunk
        except ConnectionResetError:  # closed with the rest of the request unread
            reply = b""
    assert reply == b"" or reply.startswith(b"HTTP/1.0 431 "), reply[:100]
    assert b"modelhost_" not in reply
    scrape(observed)  # and the endpoint still serves


def test_a_request_just_under_the_bound_is_served(observed: Server) -> None:
    with socket.create_connection(("127.0.0.1", observed.metrics_port), timeout=3) as connection:
        head = b"GET /metrics HTTP/1.0\r\nX-a: "
        pad = b"a" * (MAX_REQUEST_BYTES - len(head) - 4)
        connection.sendall(head + pad + b"\r\n\r\n")
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 200 ") and b"modelhost_requests" in reply
