"""The `modelhost` command: run the server, or call one (`parser.DESCRIPTION` has examples).

This module: `main`, which runs `serve` or a client command (and prints its error with a
hint), and `local_target`, where `health --local` asks. The rest of the package:
`parser` (the flags, and the types of their values), `commands` (what each client
command does, and how its result is printed), `hints` (the `hint:` lines under errors),
`inputs` (predict's input files) and `interrupts` (ctrl-C).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# gRPC core's own log lines, read once when grpc is imported. A client command says
# what went wrong in its `error:` line, so they only repeat it (each failed TLS handshake
# twice). The server keeps gRPC's errors and drops its INFO lines, which any client can
# provoke (a failed handshake). GRPC_VERBOSITY set by the user wins. Only the command
# itself sets it: its script, or `python -m modelhost.cli` (argv[0] is "-m" while Python
# imports the package to find its __main__); a program that imports this module keeps
# its own environment, and so do the processes it starts.
if Path(sys.argv[0]).stem == "modelhost" or sys.argv[0] == "-m":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if sys.argv[1:2] == ["serve"] else "NONE")

from modelhost.cli import interrupts
from modelhost.cli.commands import LOAD_OPTION, load_options, printable, show
from modelhost.cli.hints import bind_failure, error_hint, store_error
from modelhost.cli.parser import build_parser, command_names, missing_extra, subparser
from modelhost.client import ChannelConfig, ModelHostClient, ModelHostError

__all__ = [
    "LOAD_OPTION",
    "build_parser",
    "command_names",
    "load_options",
    "local_target",
    "main",
    "printable",
]


def main(argv: Sequence[str] | None = None) -> int:
    """The `modelhost` command; returns its exit status. Output into a pipe closed early
    (`modelhost list | head -1`) ends it quietly, with status 0: every command prints
    only once its call is done, so the reader has stopped reading, nothing failed."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    serving = arguments[:1] == ["serve"]  # the server handles its own signals
    with contextlib.nullcontext() if serving else interrupts.clean_up_uninterrupted():
        try:
            code = _main(arguments)
            sys.stdout.flush()
        except BrokenPipeError:
            # As the Python docs advise: what is still buffered goes nowhere, not to a
            # traceback at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except KeyboardInterrupt as interrupt:  # ctrl-C: the call was cancelled as it unwound
            hint = interrupt.hint if isinstance(interrupt, interrupts.Interrupted) else ""
            if argv is None:  # the command itself: it ends without interpreter shutdown
                interrupts.exit_interrupted(hint)
            interrupts.report(hint)
            return interrupts.INTERRUPTED
    return code


CHANGES = {
    "upload": "the stored checkpoints",
    "snapshot": "the stored checkpoints",
    "delete": "the stored checkpoints",
    "load": "the hosted models",
    "unload": "the hosted models",
}
"""Commands that change the server, and where `modelhost list` shows whether they did."""


def _main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        return _serve(argv)
    # Client commands never import the server (nor torch): only `serve` needs its settings.
    parser = build_parser(serve_flags=False)
    args = parser.parse_args(argv)
    if args.command == "serve":
        parser.error("the flags before a command are client flags: `serve` comes first")
    config = ChannelConfig(
        token=args.token,
        tls=args.tls,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        server_name=args.server_name,
        max_message_bytes=args.max_message_bytes,
    )
    if getattr(args, "local", False):
        try:
            args.target = local_target(os.environ)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        config = ChannelConfig(max_message_bytes=args.max_message_bytes)
    try:
        with ModelHostClient(args.target, timeout=args.timeout, config=config) as client:
            result = args.fn(client, args)
    except KeyboardInterrupt:
        if args.command in CHANGES:
            raise interrupts.Interrupted(
                f"the server may have finished the {args.command} before it saw the call "
                f"cancelled: `modelhost list` shows {CHANGES[args.command]}"
            ) from None
        raise
    except ModelHostError as error:
        hint = error_hint(error, args)
        print(f"error: {printable(str(error))}", file=sys.stderr)
        if hint:
            print(f"hint: {printable(hint)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as error:
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return 1
    show(result, args.json)
    return 0


def _serve(argv: list[str]) -> int:
    """`modelhost serve`: settings errors, a port in use and a device this machine lacks
    end in one `error:` line."""
    try:
        from modelhost.server import Settings, serve
        from modelhost.server.errors import ModelHostFailure
        from modelhost.server.settings import settings_fields
    except ImportError as error:
        if not missing_extra(error):
            raise
        print(
            f"error: the server needs `pip install 'modelhost[server]'` ({error})", file=sys.stderr
        )
        return 2
    # `serve`'s own parser, so that a mistake prints its usage, not the client commands'.
    args = subparser(build_parser(), "serve").parse_args(argv[1:])
    overrides = {name: getattr(args, name) for name, *_ in settings_fields()}
    try:
        return serve(Settings.from_env(**overrides))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:  # the server says which port, and what to do
            print(f"error: {error.strerror}", file=sys.stderr)
            return 1
        print(f"error: {store_error(error, overrides.get('store'))}", file=sys.stderr)
        return 2
    except (ValueError, ModelHostFailure) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # grpc's "Failed to bind to address HOST:PORT; set ..."
        unbound = re.match(r"Failed to bind to address (\S+?);", str(error))
        if unbound is None:
            raise
        print(f"error: {bind_failure(unbound[1])}", file=sys.stderr)
        return 1


WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def local_target(environ: Mapping[str, str]) -> str:
    """Where `health --local` asks: the server that the `MODELHOST_*` variables of
    `environ` configure (as the image's HEALTHCHECK runs it, inside the container). Its
    probe port (MODELHOST_HEALTH_PORT) when set, which is plaintext and needs no token;
    else its main port (MODELHOST_PORT), unless that one speaks TLS. On 127.0.0.1 when
    MODELHOST_HOST binds every address, else on MODELHOST_HOST."""
    host = environ.get("MODELHOST_HOST", "").strip()
    host = "127.0.0.1" if host in WILDCARDS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    probes = _port(environ, "MODELHOST_HEALTH_PORT", "0")
    if probes:
        return f"{host}:{probes}"
    if environ.get("MODELHOST_TLS_CERT_FILE", "").strip():
        raise ValueError(
            "the main port speaks TLS and this check plaintext: give probes a port of their "
            "own (MODELHOST_HEALTH_PORT, always plaintext), or turn the check off"
        )
    port = _port(environ, "MODELHOST_PORT", "50051")
    if not port:
        raise ValueError(
            "MODELHOST_PORT=0 picks the port at start, which this check cannot know: give "
            "probes a port of their own (MODELHOST_HEALTH_PORT)"
        )
    return f"{host}:{port}"


def _port(environ: Mapping[str, str], name: str, default: str) -> int:
    """A port from the environment, read as the server reads its settings (`int`)."""
    value = environ.get(name, "").strip() or default
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"{name}={value!r} is not a port")
    return port


if __name__ == "__main__":
    sys.exit(main())
