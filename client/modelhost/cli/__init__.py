"""The `modelhost` command: run the server, or call one.

    modelhost serve --store ./store
    modelhost upload resnet18-v1 weights.pt
    modelhost load resnet18 --architecture resnet18 --checkpoint resnet18-v1
    modelhost predict resnet18 batch.npy --output logits.npy

Client commands take --target (default 127.0.0.1:50051, or MODELHOST_TARGET).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np

from modelhost.client import ChannelConfig, ModelHostClient, ModelHostError
from modelhost.client.channel import DEFAULT_MAX_MESSAGE_BYTES
from modelhost.client.load_options import LoadOptions
from modelhost.client.transfers import DEFAULT_MAX_DOWNLOAD_BYTES
from modelhost.v1 import modelhost_pb2 as pb

Command = Callable[[ModelHostClient, argparse.Namespace], Any]


class ProgressBar:
    """A one-line transfer bar on stderr."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
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

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _pairs(items: Sequence[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what} {item!r} must be KEY=VALUE")
        pairs[key] = value
    return pairs


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word is a string: --arg norm_layer=batch


class _KeyJson(argparse.Action):
    """KEY=JSON, repeatable: collects a dict of decoded values (a bare word is a string)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        key, sep, value = str(values).partition("=")
        if not sep:
            raise SystemExit(f"{option_string} {values!r} must be KEY=VALUE")
        entries = getattr(namespace, self.dest) or {}
        setattr(namespace, self.dest, {**entries, key: _json_value(value)})


def _shape(text: str) -> list[int]:
    try:
        return [int(dim) for dim in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 8,3,224,224") from None


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


def _show(value: Any) -> None:
    if isinstance(value, str):
        print(printable(value))
    elif value is not None:
        print(json.dumps(value, default=str, indent=1))


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
    bar = ProgressBar(f"upload {args.name}", not args.quiet)
    info = client.save_checkpoint(
        args.name,
        args.file,
        metadata=_pairs(args.metadata, "--metadata"),
        overwrite=args.overwrite,
        progress=bar,
    )
    bar.done()
    return info


def cmd_snapshot(client: ModelHostClient, args: argparse.Namespace) -> Any:
    return client.snapshot(
        args.model, args.checkpoint, version=args.version, overwrite=args.overwrite
    )


def cmd_download(client: ModelHostClient, args: argparse.Namespace) -> Any:
    bar = ProgressBar(f"download {args.name}", not args.quiet)
    client.max_download_bytes = args.max_bytes or None
    path = client.download_checkpoint(args.name, args.dest, progress=bar)
    bar.done()
    return str(path)


def cmd_load(client: ModelHostClient, args: argparse.Namespace) -> Any:
    return client.load_model(
        args.name,
        architecture=args.architecture,
        checkpoint=args.checkpoint,
        **load_options(args),
    )


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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def cmd_predict(client: ModelHostClient, args: argparse.Namespace) -> Any:
    images = [item for item in args.inputs if item.lower().endswith(IMAGE_SUFFIXES)]
    inputs = {}
    for item in args.inputs:
        if item not in images:
            name, sep, path = item.rpartition("=")
            inputs[name if sep else "input"] = np.load(path, allow_pickle=False)
    outputs = client.predict(
        args.model,
        inputs or None,
        images=images or None,
        top_k=args.top_k,
        version=args.version,
        timeout=args.timeout,
    )
    if args.top_k:
        return [
            {"image": source, "top": [_plain(c) for c in classes]}
            for source, classes in zip(images or ["row"] * len(outputs), outputs, strict=False)
        ]
    if args.output:
        saved = _save(args.output, outputs)
        return printable(f"saved {', '.join(outputs)} to {saved}")
    if args.json:  # every value, as nested lists
        return {
            name: {"dtype": str(a.dtype), "shape": list(a.shape), "values": a.tolist()}
            for name, a in outputs.items()
        }
    np.set_printoptions(threshold=50, edgeitems=3, precision=5)
    for name, a in outputs.items():
        print(printable(f"{name}: {a.dtype} {list(a.shape)}"))
        print(np.array2string(a))
    return None


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
    for section, rows in listing.items():
        print(f"{section}:")
        for row in rows or ["(none)"]:
            print(f"  {printable(row)}")
    return None


def cmd_unload(client: ModelHostClient, args: argparse.Namespace) -> Any:
    return {"unloaded": client.unload_model(args.name, args.version)}


def cmd_delete(client: ModelHostClient, args: argparse.Namespace) -> Any:
    client.delete_checkpoint(args.name)
    return f"deleted {args.name}"


def cmd_health(client: ModelHostClient, args: argparse.Namespace) -> Any:
    status = client.health(args.service)
    if status != "SERVING":
        raise SystemExit(f"{status}")
    return status


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


def _client_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get("MODELHOST_TARGET", "127.0.0.1:50051"),
        help="server address host:port or dns:///name:port",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="deadline in seconds (default: 60 for list and health, none for the others)",
    )
    common.add_argument(
        "--token",
        default=os.environ.get("MODELHOST_TOKEN"),
        help="bearer token (or MODELHOST_TOKEN)",
    )
    common.add_argument("--tls", action="store_true", help="connect with TLS")
    common.add_argument("--ca-file", help="CA certificate that signed the server's certificate")
    common.add_argument("--cert-file", help="client certificate (mutual TLS)")
    common.add_argument("--key-file", help="client private key (mutual TLS)")
    common.add_argument("--server-name", help="name to expect in the server's certificate")
    common.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest request or reply, as the server's --max-message-bytes "
        f"(default: {DEFAULT_MAX_MESSAGE_BYTES >> 20} MiB)",
    )
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return common


def build_parser(*, serve_flags: bool = True) -> argparse.ArgumentParser:
    """The `modelhost` parser. `serve`'s flags come from the server's settings: without
    `serve_flags` they are left out, and nothing of the server is imported."""
    parser = argparse.ArgumentParser(
        prog="modelhost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub, serve_flags)
    common = _client_parser()

    def command(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = command("upload", cmd_upload, "Upload a checkpoint file (state_dict, safetensors, ...).")
    p.add_argument("name")
    p.add_argument("file", type=Path)
    p.add_argument("--metadata", "-m", action="append", metavar="KEY=VALUE")
    p.add_argument("--overwrite", action="store_true")

    p = command("snapshot", cmd_snapshot, "Save a hosted model's weights as a checkpoint.")
    p.add_argument("model")
    p.add_argument("checkpoint")
    p.add_argument("--version", type=int)
    p.add_argument("--overwrite", action="store_true")

    p = command("download", cmd_download, "Download a checkpoint to a file.")
    p.add_argument("name")
    p.add_argument("dest", type=Path)
    p.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_DOWNLOAD_BYTES,
        help="refuse a larger checkpoint "
        f"(0: no limit; default: {DEFAULT_MAX_DOWNLOAD_BYTES >> 30} GiB)",
    )

    p = command("load", cmd_load, "Build an architecture, load a checkpoint, serve it.")
    p.add_argument("name")
    _add_load_flags(p)

    p = command("predict", cmd_predict, "Run a model on .npy tensors or JPEG/PNG images.")
    p.add_argument("model")
    p.add_argument("inputs", nargs="+", metavar="[NAME=]FILE.npy | IMAGE.jpg")
    p.add_argument("--top-k", type=int, default=0, help="answer with the k most likely classes")
    p.add_argument("--output", "-o", type=Path, help="save outputs to .npy (.npz if several)")
    p.add_argument("--version", type=int)

    p = command("list", cmd_list, "List hosted models and stored checkpoints.")
    p.add_argument(
        "what", nargs="?", default="all", choices=["all", "models", "checkpoints", "architectures"]
    )

    p = command("unload", cmd_unload, "Stop serving a model (one version or all).")
    p.add_argument("name")
    p.add_argument("--version", type=int)

    p = command("delete", cmd_delete, "Delete a stored checkpoint.")
    p.add_argument("name")

    p = command("health", cmd_health, "Check the server's health; exit 1 unless SERVING.")
    p.add_argument("--service", default="")
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
    "max_batch_size": "most rows batched together (1: no batching; default: the server's)",
    "max_queue_delay_us": "how long a batch waits to fill, in microseconds",
    "max_queue_size": "requests that may wait; more fail with RESOURCE_EXHAUSTED",
    "preferred_batch_size": "rows the batcher aims for (default: chosen at warm-up)",
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
        metavar="KEY=JSON",
        help="builder argument, e.g. --arg num_classes=10 (repeatable)",
    )
    option("--version", "version", type=int, metavar="N", help="version to register")
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
        help="torch.compile mode: default, reduce-overhead or max-autotune",
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
        from modelhost.server.settings import settings_fields
    except ImportError:
        return  # client-only install: `serve` explains itself when run
    for name, kind, default, help in settings_fields():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            p.add_argument(flag, action=action, default=None, help=help)
        elif kind == list[str]:
            p.add_argument(flag.removesuffix("s"), dest=name, action="append", help=help)
        else:
            p.add_argument(flag, type=kind, default=None, help=f"{help} (default: {default})")


def _serve(args: argparse.Namespace) -> int:
    try:
        from modelhost.server import Settings, serve
        from modelhost.server.settings import settings_fields
    except ImportError as error:
        print(
            f"error: the server needs `pip install 'modelhost[server]'` ({error})", file=sys.stderr
        )
        return 2
    overrides = {name: getattr(args, name) for name, *_ in settings_fields()}
    try:
        return serve(Settings.from_env(**overrides))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _hint(error: ModelHostError, target: str) -> str:
    """What a command line user can do about the commonest connection errors."""
    code, message = error.code.name, error.message
    if code == "UNAVAILABLE" and ("Connection refused" in message or "connect" in message):
        return (
            f"\nhint: no modelhost server answers at {target}: is `modelhost serve` running "
            "there? (--target or MODELHOST_TARGET)"
        )
    if code == "UNAVAILABLE" and ("Socket closed" in message or "handshake" in message.lower()):
        return (
            "\nhint: the server may speak TLS (--tls, --ca-file) or want a client certificate "
            "(--cert-file, --key-file)"
        )
    if code == "UNAUTHENTICATED":
        return "\nhint: pass the token with --token or MODELHOST_TOKEN"
    return ""


def _save(path: Path, outputs: dict[str, np.ndarray]) -> Path:
    """Saves one output as .npy, several as .npz (entries named as the outputs, whatever
    the names: `np.savez` would take "file" or "allow_pickle" as its own arguments);
    returns the file written (numpy's suffix added where missing, as `np.save` does)."""
    if len(outputs) == 1:
        path = path if path.suffix == ".npy" else path.with_name(path.name + ".npy")
        np.save(path, next(iter(outputs.values())), allow_pickle=False)
        return path
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in outputs.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Client commands never import the server (nor torch): only `serve` needs its settings.
    args = build_parser(serve_flags=argv[:1] == ["serve"]).parse_args(argv)
    if args.command == "serve":
        return _serve(args)
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
    except ModelHostError as error:
        print(f"error: {printable(str(error))}{_hint(error, args.target)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return 1
    _show(_plain(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
