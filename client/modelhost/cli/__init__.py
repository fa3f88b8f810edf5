"""The `modelhost` command: run the server, or call one.

    modelhost serve --store ./store
    modelhost upload resnet18-v1 weights.pt
    modelhost load resnet18 --architecture resnet18 --checkpoint resnet18-v1
    modelhost predict resnet18 batch.npy --output logits.npy

Client commands take --target (default 127.0.0.1:50051, or MODELHOST_TARGET).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.metadata
import json
import math
import os
import re
import socket
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np

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
from modelhost.cli.inputs import read_inputs
from modelhost.client import (
    ChannelConfig,
    InvalidArgumentError,
    ModelHostClient,
    ModelHostError,
    NotFoundError,
)
from modelhost.client.channel import DEFAULT_MAX_MESSAGE_BYTES
from modelhost.client.load_options import LoadOptions
from modelhost.client.predict import SINGLE_OUTPUT
from modelhost.client.transfers import DEFAULT_MAX_DOWNLOAD_BYTES, DownloadTooLarge
from modelhost.client.types import CheckpointInfo, ModelInfo, TopClass
from modelhost.v1 import modelhost_pb2 as pb

Command = Callable[[ModelHostClient, argparse.Namespace], Any]


class ProgressBar:
    """A one-line transfer bar on stderr, drawn only when stderr is a terminal. Used as a
    context manager: its line ends with the transfer, however it ends, so an error
    message starts on a line of its own."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self.drawn = False
        self.started = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and done != total):
            return
        self._last = now
        rate = done / max(now - self.started, 1e-9) / 1e6
        if total:
            filled = int(30 * done / total)
            bar = "#" * filled + "-" * (30 - filled)
            text = (
                f"{self.label} [{bar}] {done / total:6.1%} {done / 1e6:,.1f}/{total / 1e6:,.1f} MB"
            )
        else:
            text = f"{self.label} {done / 1e6:,.1f} MB"
        sys.stderr.write(f"\r{text} {rate:,.1f} MB/s")
        sys.stderr.flush()
        self.drawn = True

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.drawn:
            sys.stderr.write("\n")


def _key_value(text: str) -> tuple[str, str]:
    """KEY=VALUE, for argparse (a malformed one is a usage error)."""
    key, sep, value = text.partition("=")
    if not (sep and key):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _json_value(flag: str, key: str, text: str) -> Any:
    """`text` decoded as JSON; text that is not JSON is sent as a string (--arg
    norm_layer=batch), with a note in case a number or list was meant."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        print(
            printable(
                f"note: {flag} {key}={text} is not JSON: sent as the string {json.dumps(text)}"
            ),
            file=sys.stderr,
        )
        return text


class _KeyJson(argparse.Action):
    """KEY=JSON (type `_key_value`), repeatable: collects a dict of decoded values."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        key, text = values
        entries = getattr(namespace, self.dest) or {}
        setattr(namespace, self.dest, {**entries, key: _json_value(str(option_string), key, text)})


def _shape(text: str) -> list[int]:
    try:
        return [int(dim) for dim in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 8,3,224,224") from None


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (a deadline of 0 or less fails every call
    at once, and a CLI where 0 often means "no limit" should not take it silently)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(
            f"must be a positive number of seconds, not {text!r} (leave it out for the default)"
        )
    return seconds


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _lines(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def printable(text: str) -> str:
    """`text` with each character a terminal would act on (escape sequences and other
    controls, newlines, bidirectional overrides) written as its Python escape, `\\x1b`:
    server-provided strings are printed through it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _show(result: Any, as_json: bool) -> None:
    """Prints a command's result: as JSON with --json; else its line or list of lines,
    each through `printable`."""
    if result is None:
        return
    if as_json:
        print(json.dumps(_plain(result), default=str, indent=1))
        return
    for line in [result] if isinstance(result, str) else result:
        print(printable(line))


def _scaled(n: float, space: str = "") -> str:
    """`n` with one decimal and a metric prefix: `11.7M`, or with `space` `44.8 M`."""
    for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{space}{prefix}"
    return f"{n}{space}"


def _few(items: Sequence[str], most: int = 5) -> str:
    """`a, b, c and 7 more`."""
    shown = ", ".join(items[:most])
    return f"{shown} and {len(items) - most} more" if len(items) > most else shown


def _checkpoint_line(c: CheckpointInfo) -> str:
    """`resnet18-v1: 44.8 MB, sha256 0c4d1a2b3c4d5e6f, state_dict`."""
    return f"{c.name}: {_scaled(c.size_bytes, ' ')}B, sha256 {c.sha256[:16]}, {c.format}"


def _loaded_line(m: ModelInfo) -> str:
    """`loaded classifier v1: resnet18 on cpu, float32, 11.7M parameters, ready in 0.11 s`,
    and the keys a `--no-strict` load left out."""
    line = (
        f"loaded {m.name} v{m.version}: {m.architecture or m.format} on {m.device}, {m.dtype}, "
        f"{_scaled(m.parameter_count)} parameters, ready in {m.load_seconds:.2f} s"
    )
    for what, keys in (("missing", m.missing_keys), ("unexpected", m.unexpected_keys)):
        if keys:
            line += f"; {what} keys: {_few(keys)}"
    return line


def _model_line(m: Any) -> str:
    """One line of `modelhost list` for a hosted version (a failed one says why)."""
    source = f"checkpoint {m.checkpoint}" if m.checkpoint else f"weights {m.weights}"
    if m.state == "failed":
        return f"{m.name} v{m.version} failed: {m.status_message} ({m.architecture}, {source})"
    return (
        f"{m.name} v{m.version} {m.state} {m.architecture} on {m.device} {m.dtype} "
        f"{m.tier}{' pinned' if m.residency == 'pinned' else ''} "
        f"({m.parameter_count:,} parameters, {source})"
    )


def _signature(parameters: Any) -> str:
    """`num_classes=1000, weights=None`: the parameters of a builder, as Python writes them."""
    return ", ".join(p.name if p.required else f"{p.name}={p.default!r}" for p in parameters)


def _plain(obj: Any) -> Any:
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj


# Client commands


def cmd_upload(client: ModelHostClient, args: argparse.Namespace) -> Any:
    with ProgressBar(f"upload {args.name}", not args.quiet) as bar:
        info = client.save_checkpoint(
            args.name,
            args.file,
            metadata=dict(args.metadata or ()),
            overwrite=args.overwrite,
            progress=bar,
        )
    return info if args.json else f"uploaded {_checkpoint_line(info)}"


def cmd_snapshot(client: ModelHostClient, args: argparse.Namespace) -> Any:
    info = client.snapshot(
        args.model, args.checkpoint, version=args.version, overwrite=args.overwrite
    )
    model, _, version = info.metadata.get("snapshot_of", "").rpartition(":")  # "classifier:1"
    of = f"{model} v{version}" if model else args.model
    return info if args.json else f"saved {_checkpoint_line(info)} (snapshot of {of})"


def cmd_download(client: ModelHostClient, args: argparse.Namespace) -> Any:
    # A folder gets DEST/NAME, as cp does; a symlink there is replaced, never followed.
    folder = args.dest.is_dir() and not args.dest.is_symlink()
    dest = args.dest / args.name if folder else args.dest
    client.max_download_bytes = args.max_bytes or None
    try:
        with ProgressBar(f"download {args.name}", not args.quiet) as bar:
            path = client.download_checkpoint(args.name, dest, progress=bar)
    except DownloadTooLarge as error:  # named as the flag the user gives
        raise DownloadTooLarge(error.size, error.limit, "--max-bytes") from None
    if args.json:
        return {"name": args.name, "path": str(path), "size_bytes": path.stat().st_size}
    return str(path)


def cmd_load(client: ModelHostClient, args: argparse.Namespace) -> Any:
    info = client.load_model(
        args.name,
        architecture=args.architecture,
        checkpoint=args.checkpoint,
        **load_options(args),
    )
    return info if args.json else _loaded_line(info)


LOAD_OPTION = "load_option:"
"""Prefix of the `load` flags' dests: "load_option:NAME" sets load_model's option NAME,
"load_option:NAME.KEY" one key of a mapping option (batching, preprocessing)."""


def load_options(args: argparse.Namespace) -> LoadOptions:
    """The load_model options the `load` flags given set (the others stay unset)."""
    options: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(LOAD_OPTION) or value is None:
            continue
        name, _, key = dest.removeprefix(LOAD_OPTION).partition(".")
        if key:
            options[name] = {**options.get(name, {}), key: value}
        else:
            options[name] = value
    return cast(LoadOptions, options)


def cmd_predict(client: ModelHostClient, args: argparse.Namespace) -> Any:
    inputs, images = read_inputs(args.inputs)
    if args.output:  # before the call, which may take long
        _check_output(args.output)
    try:
        outputs = client.predict(
            args.model,
            inputs or None,
            images=images or None,
            top_k=args.top_k,
            version=args.version,
            timeout=args.timeout,
        )
    except InvalidArgumentError as error:
        raise _named_images(error, images) from None
    except NotFoundError as error:
        if f"model {args.model!r} is not loaded" in error.message:
            args.cli_hint = _not_loaded_hint(client, args.model)
        raise
    if args.top_k:
        return _top_classes(outputs, images, args.json)
    if not isinstance(outputs, dict):  # one input, one output: the client gives the array
        outputs = {SINGLE_OUTPUT: outputs}
    if args.output:
        _save(args.output, outputs)
        if args.json:
            return {"path": str(args.output), "outputs": list(outputs)}
        return f"saved {', '.join(outputs)} to {args.output}"
    if args.json:  # every value, as nested lists
        return {
            name: {"dtype": str(a.dtype), "shape": list(a.shape), "values": a.tolist()}
            for name, a in outputs.items()
        }
    lines = []
    for name, a in outputs.items():
        lines.append(f"{name}: {a.dtype} {list(a.shape)}")
        lines += np.array2string(a, threshold=50, edgeitems=3, precision=5).splitlines()
    return lines


def _check_output(path: Path) -> None:
    """Refuses an --output that cannot be written: a folder, or in a folder that is
    missing or not writable (found before the call, not once the model has run)."""
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"--output {path} is a directory: name a file in it")
    if not folder.is_dir():
        missing = "does not exist" if not folder.exists() else "is not a directory"
        raise ValueError(f"--output {path}: the folder {folder} {missing}")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--output {path}: permission denied (cannot write there)")


def _named_images(error: InvalidArgumentError, images: list[str]) -> InvalidArgumentError:
    """The server names an image it cannot read by its place, "image 0": the same error
    with the file's name instead."""
    found = re.match(r"image (\d+) ", error.message)
    if found is None or int(found[1]) >= len(images):
        return error
    named = images[int(found[1])] + error.message[found.end() - 1 :]
    return InvalidArgumentError(named, error.code)


def _not_loaded_hint(client: ModelHostClient, name: str) -> str:
    """The hint of a predict on a name no model is served under: when a checkpoint has
    that name (one quick lookup), how to load it."""
    try:
        client.get_checkpoint(name)
    except ModelHostError:
        return "`modelhost list models` shows the models served"
    return (
        f"{name} is a stored checkpoint, not a model: load it first: "
        f"modelhost load NAME -a ARCHITECTURE -c {name}"
    )


def _top_classes(rows: list[list[TopClass]], images: list[str], as_json: bool) -> Any:
    """Top-k answers, a row each: `cat.jpg: 281 tabby (0.53), 285 (0.21)` (an image's row
    named by its file, a tensor's `row 0`), or with `as_json` a list of
    {"row", "image" (null for tensors), "top": [{"index", "score", "label"}]}."""
    sources: list[str | None] = list(images) or [None] * len(rows)
    if as_json:
        return [
            {"row": i, "image": source, "top": [asdict(c) for c in row]}
            for i, (source, row) in enumerate(zip(sources, rows, strict=False))
        ]
    return [
        f"{source or f'row {i}'}: {', '.join(_top_class(c) for c in row)}"
        for i, (source, row) in enumerate(zip(sources, rows, strict=False))
    ]


def _top_class(c: TopClass) -> str:
    """`281 tabby (0.53)`, or without a label `281 (0.53)`."""
    return f"{c.index}{f' {c.label}' if c.label else ''} ({c.score:.2f})"


def cmd_list(client: ModelHostClient, args: argparse.Namespace) -> Any:
    listing: dict[str, Any] = {}
    if args.what in ("models", "all"):
        listing["models"] = [
            _model_line(m) if not args.json else _plain(m) for m in client.list_models()
        ]
    if args.what in ("checkpoints", "all"):
        listing["checkpoints"] = [
            f"{c.name} {c.format} {c.size_bytes:,} bytes sha256 {c.sha256[:16]}"
            if not args.json
            else _plain(c)
            for c in client.list_checkpoints()
        ]
    if args.what == "architectures":
        listing["architectures"] = [
            f"{a.name}({_signature(a.parameters)}) ({a.source}, {a.task})"
            if not args.json
            else _plain(a)
            for a in client.list_architectures()
        ]
    if args.json:
        return listing
    return [
        line
        for section, rows in listing.items()
        for line in (f"{section}:", *(f"  {row}" for row in rows or ["(none)"]))
    ]


def cmd_unload(client: ModelHostClient, args: argparse.Namespace) -> Any:
    versions = client.unload_model(args.name, args.version)
    if args.json:
        return {"unloaded": versions}
    return f"unloaded {args.name} {', '.join(f'v{v}' for v in versions)}"


def cmd_delete(client: ModelHostClient, args: argparse.Namespace) -> Any:
    client.delete_checkpoint(args.name)
    return {"deleted": args.name} if args.json else f"deleted {args.name}"


def cmd_health(client: ModelHostClient, args: argparse.Namespace) -> Any:
    status = client.health(args.service)
    if status != "SERVING":
        raise SystemExit(f"{status}")
    return {"service": args.service, "status": status} if args.json else status


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


# Parser


def _client_parser(*, before_command: bool) -> argparse.ArgumentParser:
    """The flags every client command takes, before or after its name. After it, they
    default to nothing (SUPPRESS), so that they leave what was given before it alone."""
    common = argparse.ArgumentParser(add_help=False)

    def flag(*names: str, default: Any = None, **kwargs: Any) -> None:
        common.add_argument(
            *names, default=default if before_command else argparse.SUPPRESS, **kwargs
        )

    flag(
        "--target",
        default=os.environ.get("MODELHOST_TARGET", "127.0.0.1:50051"),
        help="server address host:port or dns:///name:port",
    )
    flag(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="deadline in seconds, more than 0 (default: 60 for list and health, none for "
        "the others)",
    )
    flag(
        "--token",
        default=os.environ.get("MODELHOST_TOKEN"),
        help="bearer token (or MODELHOST_TOKEN)",
    )
    flag("--tls", action="store_true", default=False, help="connect with TLS")
    flag("--ca-file", help="CA certificate that signed the server's certificate")
    flag("--cert-file", help="client certificate (mutual TLS)")
    flag("--key-file", help="client private key (mutual TLS)")
    flag("--server-name", help="name to expect in the server's certificate")
    flag(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest request or reply, as the server's --max-message-bytes "
        f"(default: {DEFAULT_MAX_MESSAGE_BYTES >> 20} MiB)",
    )
    flag(
        "--json",
        action="store_true",
        default=False,
        help="print the result as JSON (default: text)",
    )
    flag(
        "--quiet",
        "-q",
        action="store_true",
        default=False,
        help="no progress bars (drawn only when stderr is a terminal anyway)",
    )
    return common


def build_parser(*, serve_flags: bool = True) -> argparse.ArgumentParser:
    """The `modelhost` parser. `serve`'s flags come from the server's settings: without
    `serve_flags` they are left out, and nothing of the server is imported."""
    parser = argparse.ArgumentParser(
        prog="modelhost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_client_parser(before_command=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub, serve_flags)
    common = _client_parser(before_command=False)

    def command(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = command("upload", cmd_upload, "Upload a checkpoint file (state_dict, safetensors, ...).")
    p.add_argument("name", help="name to store the checkpoint under")
    p.add_argument("file", type=Path, help="the checkpoint file")
    p.add_argument(
        "--metadata",
        "-m",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="a string to keep with the checkpoint (repeatable)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint of that name")

    p = command("snapshot", cmd_snapshot, "Save a hosted model's weights as a checkpoint.")
    p.add_argument("model", help="the hosted model")
    p.add_argument("checkpoint", help="name to store the weights under")
    p.add_argument(
        "--version", type=int, metavar="N", help="the model's version (0 or left out: the newest)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint of that name")

    p = command("download", cmd_download, "Download a checkpoint to a file.")
    p.add_argument("name", help="the stored checkpoint")
    p.add_argument(
        "dest", type=Path, help="file to write (replaced if it exists), or a folder: DEST/NAME"
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_DOWNLOAD_BYTES,
        help="refuse a larger checkpoint "
        f"(0: no limit; default: {DEFAULT_MAX_DOWNLOAD_BYTES >> 30} GiB)",
    )

    p = command("load", cmd_load, "Build an architecture, load a checkpoint, serve it.")
    p.add_argument("name", help="name to serve the model under")
    _add_load_flags(p)

    p = command("predict", cmd_predict, "Run a model on .npy tensors or JPEG/PNG images.")
    p.add_argument("model", help="the hosted model")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="[NAME=]FILE.npy | IMAGE.jpg",
        help="input tensors (NAME: the forward argument; default: input), or JPEG/PNG images",
    )
    p.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="answer with the k most likely classes"
    )
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        metavar="FILE",
        help="save the outputs to FILE, named exactly so: one output as .npy, several as "
        ".npz (also one, when FILE ends in .npz)",
    )
    p.add_argument(
        "--version", type=int, metavar="N", help="the model's version (0 or left out: the newest)"
    )

    p = command("list", cmd_list, "List hosted models and stored checkpoints.")
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "models", "checkpoints", "architectures"],
        help="what to list (default: all, which is models and checkpoints)",
    )

    p = command("unload", cmd_unload, "Stop serving a model (one version or all).")
    p.add_argument("name", help="the hosted model")
    p.add_argument(
        "--version", type=int, metavar="N", help="only this version (0 or left out: all)"
    )

    p = command("delete", cmd_delete, "Delete a stored checkpoint.")
    p.add_argument("name", help="the stored checkpoint")

    p = command("health", cmd_health, "Check the server's health; exit 1 unless SERVING.")
    p.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help="the service to ask about: modelhost.v1.ModelHost, inference.GRPCInferenceService "
        '(default: "", the whole server)',
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="instead of --target, ask the server that this environment's MODELHOST_* "
        "variables configure (the image's HEALTHCHECK): its probe port "
        "(MODELHOST_HEALTH_PORT) when set, else its main port (MODELHOST_PORT); "
        "plaintext, no token",
    )
    return parser


BATCHING_HELP = {
    "max_batch_size": "most rows batched together (1: no batching; 0 or left out: the "
    "server's default, --max-batch-size of serve)",
    "max_queue_delay_us": "how long a batch waits to fill, in microseconds (0 or left out: "
    "the server's default)",
    "max_queue_size": "requests that may wait; more fail with RESOURCE_EXHAUSTED (0 or left "
    "out: the server's default)",
    "preferred_batch_size": "rows the batcher aims for (0 or left out: chosen at warm-up)",
}


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    """`load`'s flags: one per load_model option (or key of one), see `LOAD_OPTION`.
    The common --timeout is the `timeout` option: the client's deadline."""

    def option(flag: str, name: str, **kwargs: Any) -> None:
        p.add_argument(flag, dest=LOAD_OPTION + name, default=None, **kwargs)

    p.add_argument(
        "--architecture",
        "-a",
        default="",
        help="architecture to build (omit for exported programs / pickled models)",
    )
    p.add_argument("--checkpoint", "-c", default="", help="stored checkpoint with the weights")
    option(
        "--weights",
        "weights",
        metavar="NAME",
        help="torchvision pretrained weights instead, e.g. IMAGENET1K_V1",
    )
    option(
        "--arg",
        "architecture_args",
        action=_KeyJson,
        type=_key_value,
        metavar="KEY=JSON",
        help="builder argument, e.g. --arg num_classes=10 (repeatable)",
    )
    option(
        "--version",
        "version",
        type=int,
        metavar="N",
        help="version to register (0 or left out: the next, one above the newest)",
    )
    option(
        "--device", "device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: the server's)"
    )
    option("--dtype", "dtype", choices=["float32", "float16", "bfloat16"], help="weights' dtype")
    option("--no-strict", "strict", action="store_false", help="allow missing/unexpected keys")
    option(
        "--channels-last", "channels_last", action="store_true", help="channels_last memory format"
    )
    option(
        "--autocast", "autocast", choices=["float16", "bfloat16"], help="run under torch.autocast"
    )
    option(
        "--compile",
        "compile",
        metavar="MODE",
        help="torch.compile mode: default, reduce-overhead, max-autotune or "
        "max-autotune-no-cudagraphs",
    )
    option(
        "--warmup-shape",
        "warmup_shape",
        type=_shape,
        metavar="N,C,H,W",
        help="run a zero input of this shape at load, e.g. 8,3,224,224",
    )
    for field in pb.BatchingConfig.DESCRIPTOR.fields:  # every batching key, all integers
        flag = "--" + field.name.replace("_", "-")
        help = BATCHING_HELP.get(field.name, "batching: " + field.name)
        option(flag, "batching." + field.name, type=int, metavar="N", help=help)
    option(
        "--preprocessing",
        "preprocessing",
        type=_json_object,
        metavar="JSON",
        help='image preprocessing, e.g. \'{"resize": 256, "crop": 224, "mean": [...], '
        '"std": [...]}\'',
    )
    option(
        "--preprocessing-weights",
        "preprocessing.weights",
        metavar="NAME",
        help="image preprocessing of these torchvision weights, e.g. IMAGENET1K_V1",
    )
    option(
        "--pin",
        "residency",
        action="store_const",
        const="pinned",
        help="never evict it from its device (default: on demand, under the memory budget)",
    )
    option("--label", "labels", action="append", metavar="NAME", help="class name (repeatable)")
    option(
        "--labels-file",
        "labels",
        action="extend",
        type=_lines,
        metavar="PATH",
        help="class names, one per line",
    )


def command_names() -> list[str]:
    """Every subcommand of `modelhost`."""
    parser = build_parser(serve_flags=False)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def _add_serve(sub: Any, flags: bool) -> None:
    p = sub.add_parser(
        "serve",
        help="Run the server.",
        description="Run the server. Every flag can also be set in the environment as "
        "MODELHOST_<SETTING> (the flag's name in capitals, - as _; --architecture is "
        "MODELHOST_ARCHITECTURES, comma-separated); a MODELHOST_ variable that is no "
        "setting is logged at start.",
    )
    p.set_defaults(fn=None)
    if not flags:
        return
    try:
        from modelhost.server.settings import settings_fields, shown_default
    except ImportError as error:
        if _missing_extra(error):
            return  # client-only install: `serve` explains itself when run
        raise
    for name, kind, default, help in settings_fields():
        flag = "--" + name.replace("_", "-")
        shown = f"{help} (default: {shown_default(kind, default)})"
        if kind is bool:  # --x and --no-x: a flag also turns off what a variable turned on
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
        elif kind == list[str]:
            p.add_argument(
                flag.removesuffix("s"),
                dest=name,
                action="append",
                metavar="NAME=MODULE:CALLABLE" if name == "architectures" else None,
                help=help,
            )
        elif kind in (int, float):
            p.add_argument(flag, type=_number(kind, help), default=None, help=shown)
        else:
            p.add_argument(flag, type=kind, default=None, help=shown)


UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
UNITS.update({f"{prefix}i": 1 << 10 * (i + 1) for i, prefix in enumerate("kmgt")})
"""What the unit prefixes people write after a size mean: 2G, 2GB, 2GiB."""


def _number(kind: type[int] | type[float], help: str) -> Callable[[str], int | float]:
    """A `serve` flag's parser for a number of `kind`: a value with a unit (2GB, 512MiB)
    is refused with the number of bytes it means, as the settings take no units."""

    def parse(text: str) -> int | float:
        try:
            return kind(text)
        except ValueError:
            pass
        what = f"an {kind.__name__}" if kind is int else f"a {kind.__name__}"
        sized = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?)b?\s*", text, re.IGNORECASE)
        if sized is None or "bytes" not in help:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        value = float(sized[1]) * UNITS[sized[2].lower()]
        fraction = " or a fraction of the total (0.5)" if "fraction" in help else ""
        raise argparse.ArgumentTypeError(
            f"{text!r}: units are not accepted: give bytes ({value:.0f}){fraction}"
        )

    parse.__name__ = kind.__name__
    return parse


SERVER_EXTRA = frozenset(
    {"torch", "torchvision", "safetensors", "grpc_reflection", "prometheus_client"}
)
"""The modules of the packages `pip install 'modelhost[server]'` adds."""


def _missing_extra(error: ImportError) -> bool:
    """Whether `error` is a module of the server extra missing (any other ImportError is
    a broken install or a bug, shown as it is)."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return False
    return error.name.partition(".")[0] in SERVER_EXTRA


def _serve(argv: list[str]) -> int:
    """`modelhost serve`: settings errors, a port in use and a device this machine lacks
    end in one `error:` line."""
    try:
        from modelhost.server import Settings, serve
        from modelhost.server.errors import ModelHostFailure
        from modelhost.server.settings import settings_fields
    except ImportError as error:
        if not _missing_extra(error):
            raise
        print(
            f"error: the server needs `pip install 'modelhost[server]'` ({error})", file=sys.stderr
        )
        return 2
    # `serve`'s own parser, so that a mistake prints its usage, not the client commands'.
    args = _subparser(build_parser(), "serve").parse_args(argv[1:])
    overrides = {name: getattr(args, name) for name, *_ in settings_fields()}
    try:
        return serve(Settings.from_env(**overrides))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:  # the server says which port, and what to do
            print(f"error: {error.strerror}", file=sys.stderr)
            return 1
        print(f"error: {_store_error(error, overrides.get('store'))}", file=sys.stderr)
        return 2
    except (ValueError, ModelHostFailure) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # grpc's "Failed to bind to address HOST:PORT; set ..."
        unbound = re.match(r"Failed to bind to address (\S+?);", str(error))
        if unbound is None:
            raise
        print(f"error: {_bind_failure(unbound[1])}", file=sys.stderr)
        return 1


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of the command `name`."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return cast(argparse.ArgumentParser, sub.choices[name])


def _store_error(error: OSError, store: object) -> str:
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


def _bind_failure(address: str) -> str:
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


GRPC_SCHEMES = frozenset({"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock"})
TARGET_FORM = "targets are host:port, without a scheme (default 127.0.0.1:50051)"


def _hint(error: ModelHostError, args: argparse.Namespace) -> str:
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
    flags = _load_flag_names()
    named = [
        f"{field} is {flags[field]}"
        for field in sorted(set(re.findall(r"\b[a-z]+(?:_[a-z]+)+\b", message)))
        if field in flags
    ]
    return f"on the command line, {', '.join(named)}" if named else ""


def _load_flag_names() -> dict[str, str]:
    """The LoadModelRequest fields (and batching keys) with an underscore in their name,
    which messages quote as they are, and the `load` flags that set them."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_load_flags(parser)
    flags: dict[str, str] = {}
    for action in parser._actions:
        name = action.dest.removeprefix(LOAD_OPTION).rpartition(".")[2]
        if action.dest.startswith(LOAD_OPTION) and "_" in name and action.option_strings:
            shown = action.option_strings[0]
            flags[name] = f"{shown} {action.metavar}" if action.metavar else shown
    return flags


def _without_port(target: str) -> bool:
    """Whether a target (`host`, `[::1]`, `dns:///host`) names no port."""
    address = target.rpartition("/")[2] if target.startswith("dns:") else target
    return ":" not in address.rpartition("]")[2]


def _save(path: Path, outputs: dict[str, np.ndarray]) -> None:
    """Writes the outputs to `path` as named (no suffix added): one output as .npy;
    several, or any number when `path` ends in .npz, as .npz with entries named as the
    outputs, whatever the names (`np.savez` would take "file" or "allow_pickle" as its
    own arguments). Several outputs are refused a .npy name."""
    if len(outputs) > 1 and path.suffix == ".npy":
        raise ValueError(
            f"{path}: a .npy file holds one array and the model answered "
            f"{len(outputs)} outputs ({_few(list(outputs))}): name an .npz file"
        )
    with path.open("wb") as file:
        if len(outputs) == 1 and path.suffix != ".npz":
            np.save(file, next(iter(outputs.values())), allow_pickle=False)
            return
        with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in outputs.items():
                with archive.open(name + ".npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)


def _version() -> str:
    """The installed package's version."""
    try:
        return importlib.metadata.version("modelhost")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


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
        hint = _hint(error, args)
        print(f"error: {printable(str(error))}", file=sys.stderr)
        if hint:
            print(f"hint: {printable(hint)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as error:
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return 1
    _show(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
