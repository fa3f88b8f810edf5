"""The `modelhost` parser: its client flags, one subcommand per `cmd_*` of `commands`, the
`load` flags (one per load_model option) and `serve`'s (from the server's settings), and
the types that parse the flags' values."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from modelhost.cli.commands import (
    LOAD_OPTION,
    cmd_delete,
    cmd_download,
    cmd_health,
    cmd_list,
    cmd_load,
    cmd_predict,
    cmd_snapshot,
    cmd_unload,
    cmd_upload,
    printable,
)
from modelhost.client import ModelHostClient
from modelhost.client.channel import DEFAULT_MAX_MESSAGE_BYTES
from modelhost.client.transfers import DEFAULT_MAX_DOWNLOAD_BYTES
from modelhost.v1 import modelhost_pb2 as pb

DESCRIPTION = """The `modelhost` command: run the server, or call one.

    modelhost serve --store ./store
    modelhost upload resnet18-v1 weights.pt
    modelhost load resnet18 --architecture resnet18 --checkpoint resnet18-v1
    modelhost predict resnet18 batch.npy --output logits.npy

Client commands take --target (default 127.0.0.1:50051, or MODELHOST_TARGET).
"""
"""The description `modelhost --help` starts with."""

Command = Callable[[ModelHostClient, argparse.Namespace], Any]
"""A client command: `cmd_*` of `commands`."""


# Types of the flags' values


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


def _version() -> str:
    """The installed package's version."""
    try:
        return importlib.metadata.version("modelhost")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


# The parser


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
        description=DESCRIPTION,
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


def load_flag_names() -> dict[str, str]:
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


def command_names() -> list[str]:
    """Every subcommand of `modelhost`."""
    parser = build_parser(serve_flags=False)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of the command `name`."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return cast(argparse.ArgumentParser, sub.choices[name])


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
        if missing_extra(error):
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


def missing_extra(error: ImportError) -> bool:
    """Whether `error` is a module of the server extra missing (any other ImportError is
    a broken install or a bug, shown as it is)."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return False
    return error.name.partition(".")[0] in SERVER_EXTRA
