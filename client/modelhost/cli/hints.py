"""The `hint:` line under an error: what a command line user can do about it, in the
command's flags (the server's and gRPC's words are for every client)."""

from __future__ import annotations

import argparse
import errno
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

from modelhost.cli.parser import load_flag_names
from modelhost.client import ModelHostError

GRPC_SCHEMES = frozenset({"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock"})
TARGET_FORM = "targets are host:port, without a scheme (default 127.0.0.1:50051)"


def error_hint(error: ModelHostError, args: argparse.Namespace) -> str:
    """What a command line user can do about the commonest connection and token errors,
    as gRPC words them: the text of a `hint:` line, or ""."""
    code, message, target = error.code.name, error.message, args.target
    if getattr(args, "cli_hint", ""):  # the command's own (predict's NOT_FOUND)
        return str(args.cli_hint)
    if args.command == "load" and code == "NOT_FOUND" and message.startswith("checkpoint "):
        return "modelhost list checkpoints shows those stored; modelhost upload NAME FILE adds one"
    if args.command == "load" and code == "INVALID_ARGUMENT":
        return _load_hint(message)
    if getattr(args, "local", False) and code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return _local_hint(target, os.environ)
    if code == "UNAUTHENTICATED":
        return "pass the token with --token or MODELHOST_TOKEN"
    if code == "PERMISSION_DENIED":
        return "this call needs the management token: --token or MODELHOST_TOKEN"
    if code == "DEADLINE_EXCEEDED" and message == "Deadline Exceeded":  # gRPC's, no server's
        waited = f"within --timeout {args.timeout:g} s" if args.timeout else "in time"
        return (
            f"no answer from {target} {waited}: the server may be busy, or not running "
            "there (it is dialed again until the deadline); --timeout waits longer"
        )
    if code != "UNAVAILABLE":
        return ""
    scheme, sep, _ = target.partition("://")
    if "Misformatted domain name" in message or (sep and scheme not in GRPC_SCHEMES):
        return f"{TARGET_FORM}, not {target}"
    if "WRONG_VERSION_NUMBER" in message:
        return "the server speaks plaintext: leave out --tls"
    if "CERTIFICATE_VERIFY_FAILED" in message:
        return (
            "the server's certificate is signed by a CA this client does not trust: pass that "
            "CA with --ca-file"
        )
    if "Hostname Verification" in message:
        return (
            "the server's certificate is not for the name in --target: pass the name it "
            "carries with --server-name"
        )
    if "Socket closed" in message or "handshake" in message.lower():
        if args.tls:
            return "the server may want a client certificate (--cert-file, --key-file)"
        return "the server may speak TLS: add --tls (and --ca-file for a private CA)"
    if "Connection refused" in message or "Failed to connect" in message:
        if _without_port(target):
            return f"{target} has no port, so gRPC dialed 443: {TARGET_FORM}"
        return (
            f"no modelhost server answers at {target}: is `modelhost serve` running "
            "there? (--target or MODELHOST_TARGET)"
        )
    return ""


def _local_hint(target: str, environ: Mapping[str, str]) -> str:
    """Where `health --local` asked, and the variables that chose it (not --target)."""
    variables = ", ".join(
        f"{name}={environ[name]}" if environ.get(name, "").strip() else f"{name} unset"
        for name in ("MODELHOST_HEALTH_PORT", "MODELHOST_PORT", "MODELHOST_HOST")
    )
    return (
        f"--local asked {target} ({variables}): is the server running on this machine, "
        "and are these variables set as the server has them?"
    )


LOAD_HINTS = (
    (
        "LoadModel needs a checkpoint or pretrained weights",
        "give -c/--checkpoint NAME (a stored checkpoint: modelhost list checkpoints) or "
        "--weights NAME (torchvision's pretrained weights, e.g. IMAGENET1K_V1)",
    ),
    (
        "LoadModel takes a checkpoint or pretrained weights, not both",
        "give -c/--checkpoint or --weights, not both",
    ),
    ("see ListArchitectures", "see them with: modelhost list architectures"),
    (
        "name the architecture to build",
        "give -a/--architecture NAME (modelhost list architectures shows them)",
    ),
    (
        "leave architecture and its arguments empty",
        "leave out -a/--architecture and --arg",
    ),
)
"""Messages of LoadModel that name the call or its fields, and what they mean in
`modelhost load`'s flags."""


def _load_hint(message: str) -> str:
    """`modelhost load`'s flags for a LoadModel error that names the RPC or its fields
    (the server's words are for every client)."""
    for words, hint in LOAD_HINTS:
        if words in message:
            return hint
    flags = load_flag_names()
    named = [
        f"{field} is {flags[field]}"
        for field in sorted(set(re.findall(r"\b[a-z]+(?:_[a-z]+)+\b", message)))
        if field in flags
    ]
    return f"on the command line, {', '.join(named)}" if named else ""


def _without_port(target: str) -> bool:
    """Whether a target (`host`, `[::1]`, `dns:///host`) names no port."""
    address = target.rpartition("/")[2] if target.startswith("dns:") else target
    return ":" not in address.rpartition("]")[2]


def store_error(error: OSError, store: object) -> str:
    """An error creating a folder (the store's), with what is in the way: a file."""
    path = Path(error.filename) if isinstance(error.filename, str) else None
    if path is None or error.errno not in (errno.EEXIST, errno.ENOTDIR):
        return str(error)
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is None:
        return str(error)
    named = f"--store {store}" if store is not None else str(path)
    if blocking == path and (store is None or Path(str(store)) == path):
        return f"{named} is a file, not a directory"
    return f"{named}: {blocking} is a file, not a directory"


def bind_failure(address: str) -> str:
    """Why `address` (HOST:PORT) cannot be bound, as the system says when asked again."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, int(port)), family=family):
            return f"cannot bind {address}"
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return (
                f"port {port} on {host} is in use: is another modelhost serve running? "
                "(choose another port with --port)"
            )
        return f"cannot bind {address}: {error.strerror}"
