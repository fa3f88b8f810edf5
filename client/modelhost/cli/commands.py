"""The client commands, `cmd_*` (a client and the parsed arguments in, the result to print
out), and how results are printed: their lines, JSON, progress bars, saved outputs.
`printable` escapes what a terminal would act on in any text from the server."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np

from modelhost.cli.inputs import read_inputs
from modelhost.client import InvalidArgumentError, ModelHostClient, ModelHostError, NotFoundError
from modelhost.client.load_options import LoadOptions
from modelhost.client.predict import SINGLE_OUTPUT
from modelhost.client.transfers import DownloadTooLarge
from modelhost.client.types import CheckpointInfo, ModelInfo, TopClass


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


def printable(text: str) -> str:
    """`text` with each character a terminal would act on (escape sequences and other
    controls, newlines, bidirectional overrides) written as its Python escape, `\\x1b`:
    server-provided strings are printed through it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def show(result: Any, as_json: bool) -> None:
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
