"""Typed server settings: defaults, then `MODELHOST_*` environment variables, then flags.

Each field's `help` is its documentation: `modelhost serve --help` prints it and the
README's configuration table is written from the same text.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "MODELHOST_"
MiB = 1 << 20


def _setting(default: Any, help: str, *, secret: bool = False) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help}, repr=not secret)


@dataclass
class Settings:
    """Everything the server can be told at start."""

    host: str = _setting(
        "127.0.0.1",
        "Address to bind; anything but loopback needs tokens, mutual TLS or --insecure.",
    )
    port: int = _setting(50051, "gRPC port (0 picks a free one).")
    store: Path = _setting(Path("store"), "Folder of the checkpoint store (created if missing).")
    device: str = _setting(
        "auto", "Default device for models: auto (cuda when present), cpu, cuda, cuda:N."
    )
    max_message_bytes: int = _setting(
        256 * MiB, "Largest unary request or reply (Predict) in bytes."
    )
    chunk_bytes: int = _setting(2 * MiB, "Chunk size of DownloadCheckpoint streams in bytes.")
    max_checkpoint_bytes: int = _setting(0, "Largest checkpoint accepted, in bytes (0: no limit).")
    direct_io: bool = _setting(
        True,
        "Write checkpoints with direct I/O where the file system allows: uploads skip the "
        "page cache, and the first load of a checkpoint reads it from disk.",
    )
    max_batch_size: int = _setting(
        32, "Default most rows batched together per model (1: no batching)."
    )
    max_queue_delay_us: int = _setting(1000, "Default wait for a batch to fill, in microseconds.")
    max_queue_size: int = _setting(512, "Default Predict requests that may wait per model version.")
    load_workers: int = _setting(
        2,
        "Threads that load checkpoints and build models (page-ins have one thread per device).",
    )
    device_memory_budget: float = _setting(
        0.0,
        "Device memory hosted versions may hold: bytes, or a fraction (up to 1) of each "
        "device's total; 0: 0.9 of what is free at start on a GPU, no limit on the CPU. "
        "Past it, loads and page-ins evict the least recently used on-demand versions.",
    )
    host_memory_budget: float = _setting(
        0.25,
        "Host memory evicted GPU versions may keep their weights in (a page-in is then one "
        "copy): bytes, or a fraction (up to 1) of the machine's memory; past it they drop "
        "to the store tier.",
    )
    preprocess_workers: int = _setting(4, "Threads that decode and preprocess image inputs.")
    gpu_lanes: int = _setting(
        4,
        "Worker threads per GPU, each with its own CUDA stream, that run the GPU models: "
        "each model version runs on one, the one with the fewest versions.",
    )
    gpu_pipelining: bool = _setting(
        True,
        "GPU models: launch the next batch while one computes (two batches in flight), so "
        "the GPU does not wait for the host to join inputs or encode outputs.",
    )
    grace_seconds: float = _setting(10.0, "On SIGTERM/SIGINT, how long in-flight calls may finish.")
    log_level: str = _setting("info", "Logging level: debug, info, warning, error.")
    architectures: list[str] = _setting(
        [], "Extra architectures as NAME=MODULE:CALLABLE (repeatable; comma-separated in env)."
    )
    allow_pickled_models: bool = _setting(
        False,
        "UNSAFE: accept whole pickled models (torch.save(model)) and exported programs. "
        "Loading them runs code from the file: only for checkpoints you trust.",
    )
    insecure: bool = _setting(
        False, "Allow a non-loopback host without tokens or mutual TLS (logs a warning at start)."
    )
    tls_cert_file: str = _setting("", "Server certificate (PEM): serve TLS.")
    tls_key_file: str = _setting("", "Private key (PEM) of the server certificate.")
    tls_client_ca_file: str = _setting(
        "", "CA (PEM) that signs client certificates: turns on mutual TLS."
    )
    token: str = _setting("", "Inference bearer token (prefer --token-file).", secret=True)
    token_file: str = _setting("", "File of inference bearer tokens, one per line.")
    management_token: str = _setting(
        "", "Management bearer token (prefer --management-token-file).", secret=True
    )
    management_token_file: str = _setting(
        "",
        "File of management tokens, one per line: required by SaveCheckpoint, "
        "DeleteCheckpoint, LoadModel and UnloadModel.",
    )
    max_concurrent_rpcs: int = _setting(
        1000,
        "RPCs served at once; more get RESOURCE_EXHAUSTED (health checks and reflection "
        "are not counted; 0: no limit).",
    )
    max_streams_per_connection: int = _setting(
        100,
        "Calls one client connection may have open at once (HTTP/2 streams); its further "
        "calls wait for one to end (0: gRPC's default, no limit).",
    )
    max_receiving_bytes: int = _setting(
        0,
        "Bytes the requests the server holds may take in all: a request being received "
        "counts as --max-message-bytes, one received as its size until its call is done "
        "with it (an upload's chunks until they are written); past it, requests wait "
        "for room within --request-read-timeout (0: a "
        "quarter of the memory, or of the container's memory limit; at least two of "
        "--max-message-bytes).",
    )
    request_read_timeout: float = _setting(
        30.0,
        "Seconds a call may take to send its request (and an upload between chunks), or "
        "to take its next reply message (a download), before it ends with "
        "DEADLINE_EXCEEDED and frees its slot.",
    )
    max_request_inputs: int = _setting(
        256,
        "Most input tensors in one Predict request; in one OIP ModelInfer, most inputs, raw "
        "contents, requested outputs and parameters, each.",
    )
    max_request_images: int = _setting(256, "Most images in one Predict request.")
    max_tensor_elements: int = _setting(
        1 << 28,
        "Most tensor elements in one Predict request (all inputs together, images counted "
        "as decoded and preprocessed), and in one batch of requests. It bounds what callers "
        "send; --max-predict-bytes bounds the memory a model takes for it.",
    )
    max_predict_bytes: int = _setting(
        4 << 30,
        "Most memory, in bytes, the activations of one Predict or one batch may take, "
        "by the model's own cost measured at load (rows of zeros run at several sizes); "
        "more is refused with RESOURCE_EXHAUSTED before it runs, and batches stop short "
        "of it (0: no limit). A model of known inputs that takes none of those sizes "
        "needs a warmup_shape while it is on. Detection models have --max-detection-bytes "
        "instead.",
    )
    max_detection_bytes: int = _setting(
        4 << 30,
        "Most memory, in bytes, one Predict of a torchvision detection model may take by the "
        "server's estimate (its images as the model resizes them, its proposals and "
        "detections, Mask R-CNN's masks at the input's size); more is refused with "
        "RESOURCE_EXHAUSTED before it runs (0: no limit).",
    )
    max_image_pixels: int = _setting(
        40_000_000,
        "Most pixels (width x height, read from the header before decoding) of one JPEG "
        "or PNG image input (0: no limit).",
    )
    health_port: int = _setting(
        0,
        "Port (on --host, plaintext) of a second gRPC listener with only health and "
        "reflection, for probes: no token, requests of at most 64 KiB. When set, health and "
        "reflection on the main port need a token like every other call (0: off).",
    )
    metrics_port: int = _setting(0, "Port of the Prometheus /metrics endpoint (0: off).")
    metrics_host: str = _setting(
        "127.0.0.1",
        "Address of the /metrics endpoint (its own, so a public gRPC port does not expose "
        "metrics; 0.0.0.0 for a Prometheus scraping pods).",
    )
    restore: bool = _setting(
        False, "Record hosted models in the store and load them again at start."
    )

    def __post_init__(self) -> None:
        self.store = Path(self.store)
        for name, (least, most) in _RANGES.items():
            value = getattr(self, name)
            if not least <= value <= most:
                bound = f"at least {least:,}" if most == math.inf else f"{least:,} to {most:,}"
                raise ValueError(f"{flag(name)} must be {bound}, not {value!r}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(
                f"{flag('log_level')} must be one of {', '.join(LOG_LEVELS)}, "
                f"not {self.log_level!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, replaced by `MODELHOST_<FIELD>` variables, replaced by `overrides`."""
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + item.name.upper())
            if raw is not None:
                values[item.name] = parse_value(hints[item.name], raw, item.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def is_loopback(self) -> bool:
        """Whether the server binds only to this machine."""
        return self.host in {"127.0.0.1", "localhost", "::1", "[::1]"}


MAX_BATCH_SIZE = 1 << 16
MAX_QUEUE_SIZE = 1 << 20
MAX_QUEUE_DELAY_US = 60_000_000
LOG_LEVELS = ("debug", "info", "warning", "error")
_RANGES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("port", "health_port", "metrics_port"), (0, 65535)),
    **dict.fromkeys(
        ("max_message_bytes", "chunk_bytes"),
        (1, (1 << 31) - 1),  # gRPC's sizes are int32
    ),
    "max_streams_per_connection": (0, (1 << 31) - 1),  # an int32 gRPC option too
    "max_tensor_elements": (1, math.inf),
    **dict.fromkeys(("load_workers", "preprocess_workers", "gpu_lanes"), (1, 1024)),
    "max_batch_size": (1, MAX_BATCH_SIZE),
    "max_queue_size": (1, MAX_QUEUE_SIZE),
    "max_queue_delay_us": (0, MAX_QUEUE_DELAY_US),
    "request_read_timeout": (0.001, math.inf),
    **dict.fromkeys(
        (
            "max_checkpoint_bytes",
            "device_memory_budget",
            "host_memory_budget",
            "grace_seconds",
            "max_concurrent_rpcs",
            "max_receiving_bytes",
            "max_request_inputs",
            "max_request_images",
            "max_predict_bytes",
            "max_detection_bytes",
            "max_image_pixels",
        ),
        (0, math.inf),
    ),
}
"""The values each numeric setting may take; the server refuses to start with others."""


def flag(name: str) -> str:
    """A setting as its users write it: `--max-batch-size (MODELHOST_MAX_BATCH_SIZE)`."""
    return f"--{name.replace('_', '-')} ({ENV_PREFIX}{name.upper()})"


CLIENT_VARIABLES = frozenset({"TARGET", "TOKEN"})
"""`MODELHOST_TARGET` and `MODELHOST_TOKEN` are the command line client's, not settings."""


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each `MODELHOST_*` variable that is no setting (a misspelt one would
    otherwise be ignored without a word), with the setting it may have meant."""
    environ = os.environ if environ is None else environ
    known = {item.name.upper() for item in dataclasses.fields(Settings)} | CLIENT_VARIABLES
    warnings = []
    for variable in sorted(environ):
        name = variable.removeprefix(ENV_PREFIX)
        if variable.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            warnings.append(f"{variable} is not a setting and is ignored{hint}")
    return warnings


def parse_value(kind: Any, raw: str, name: str) -> Any:
    """Parses an environment string into the field's type."""
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean")
    if kind == list[str]:
        return [part.strip() for part in raw.split(",") if part.strip()]
    try:
        return kind(raw)
    except ValueError:
        units = ""
        if kind in (int, float) and re.fullmatch(r"\s*[0-9.]+\s*[KMGT]i?B?\s*", raw, re.I):
            units = ": units are not accepted, give bytes (2000000000, not 2GB)"
            if kind is float:
                units += " or a fraction of the total (0.5)"
        raise ValueError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}{units}"
        ) from None


def shown_default(kind: Any, default: Any) -> str:
    """A setting's default as the help and README show it: on/off, or "-" for none."""
    if kind is bool:
        return "on" if default else "off"
    return "-" if default in ("", [], 0) and kind is not int else str(default)


def settings_fields() -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, help) of every setting, for the CLI and the docs."""
    hints = get_type_hints(Settings)
    defaults = Settings()
    return [
        (f.name, hints[f.name], getattr(defaults, f.name), f.metadata["help"])
        for f in dataclasses.fields(Settings)
    ]
