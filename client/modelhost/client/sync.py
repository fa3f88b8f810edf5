"""`ModelHostClient`: the blocking client, one channel per instance.

Each method builds its call with `calls` (what to send, how the reply becomes the
result) and makes it with `_run`; `AsyncModelHostClient` (`aio`) has the same methods,
signatures and docstrings over the same `calls`, and a test keeps the two alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Unpack, overload

import grpc

from modelhost.client import calls
from modelhost.client.channel import ChannelConfig
from modelhost.client.errors import translate_errors
from modelhost.client.load_options import LoadOptions
from modelhost.client.predict import ImageSource
from modelhost.client.transfers import Progress, Source, Stall
from modelhost.client.types import Architecture, CheckpointInfo, ModelInfo

T = TypeVar("T")


class ModelHostClient(calls.ClientBase):
    """Calls a modelhost server. Use as a context manager, or call `close()`.

    `timeout` (seconds) is the default deadline of every call; methods that take
    `timeout=` override it. Without one, only the calls that read the server's state
    (get_*, list_*, health) have a deadline: `calls.QUICK_TIMEOUT` (60 s).
    `stall_timeout` (60 s; None: off) ends an upload or download that moves no message
    for that long with `DeadlineExceededError`. `max_download_bytes` (64 GiB; None: no
    limit) refuses larger checkpoints. Every failed call raises `ModelHostError`;
    arguments that cannot be sent (a wrong type, an unknown option) raise `TypeError` or
    `ValueError` before any call is made, and so does a call on a closed client.
    """

    def _connect(self, config: ChannelConfig, target: str) -> grpc.Channel:
        return config.channel(target)

    def _run(self, call: calls.Call[T]) -> T:
        self._check_open(call)
        rpc, kw = self._stub[call.rpc], self._kw(call)
        stall = Stall(call.rpc, self.stall_timeout)
        try:
            with translate_errors(), stall:
                if call.feed:  # a download: each message received is a move
                    stream = rpc(call.request, **kw)
                    stall.start(stream.cancel)
                    try:
                        for message in stream:
                            stall.received(message)
                            call.feed(message)
                    finally:
                        stream.cancel()  # stops a server still sending (no-op once ended)
                    reply = None
                elif isinstance(call.request, Iterator):  # an upload: each chunk sent is one
                    future = rpc.future(stall.sending(call.request), **kw)
                    stall.start(future.cancel)
                    reply = future.result()
                else:
                    reply = rpc(call.request, **kw)
            return call.result(reply)
        finally:
            call.close()

    def __enter__(self) -> ModelHostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._closed = True
        self._channel.close()

    # Checkpoints

    def save_checkpoint(
        self,
        name: str,
        source: Source,
        *,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> CheckpointInfo:
        """Uploads a checkpoint: a file path, bytes, or a state_dict / checkpoint dict."""
        return self._run(
            calls.save_checkpoint(
                name,
                source,
                metadata=metadata,
                overwrite=overwrite,
                chunk_bytes=self.chunk_bytes,
                progress=progress,
                timeout=timeout,
            )
        )

    def snapshot(
        self, model: str, checkpoint: str, *, version: int | None = None, overwrite: bool = False
    ) -> CheckpointInfo:
        """Has the server save a hosted model's state_dict as a checkpoint."""
        return self._run(calls.snapshot(model, checkpoint, version, overwrite))

    @overload
    def download_checkpoint(
        self, name: str, dest: None = None, *, progress: Progress | None = None
    ) -> Any: ...

    @overload
    def download_checkpoint(
        self, name: str, dest: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> Path: ...

    def download_checkpoint(
        self,
        name: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        progress: Progress | None = None,
    ) -> Path | Any:
        """Writes the checkpoint to `dest` and returns its path; without `dest`,
        returns it loaded (`torch.load(weights_only=True)` or safetensors), up to 2 GiB
        (`MAX_MEMORY_DOWNLOAD_BYTES`: pass `dest` for bigger ones)."""
        return self._run(calls.download_checkpoint(name, dest, progress, self.max_download_bytes))

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every stored checkpoint, sorted by name."""
        return self._run(calls.list_checkpoints())

    def get_checkpoint(self, name: str) -> CheckpointInfo:
        """One stored checkpoint."""
        return self._run(calls.get_checkpoint(name))

    def delete_checkpoint(self, name: str) -> None:
        """Deletes a stored checkpoint (models loaded from it keep serving; refused while an
        on-demand version may be paged in from it again)."""
        return self._run(calls.delete_checkpoint(name))

    # Models

    def load_model(
        self,
        name: str,
        *,
        architecture: str = "",
        checkpoint: str = "",
        **options: Unpack[LoadOptions],
    ) -> ModelInfo:
        """Builds `architecture`, loads `checkpoint` into it and serves it as `name`.

        Exported programs and pickled models need no `architecture`; `weights` loads
        torchvision pretrained weights instead of a checkpoint. Options: `LoadOptions`.
        """
        return self._run(calls.load_model(name, architecture, checkpoint, options))

    def unload_model(self, name: str, version: int | None = None) -> list[int]:
        """Stops serving one version (default: all versions); returns those removed."""
        return self._run(calls.unload_model(name, version))

    def list_models(self) -> list[ModelInfo]:
        """Every hosted model version."""
        return self._run(calls.list_models())

    def get_model(self, name: str, version: int | None = None) -> ModelInfo:
        """One hosted model version (default: the newest)."""
        return self._run(calls.get_model(name, version))

    def list_architectures(self) -> list[Architecture]:
        """Architectures the server can build."""
        return self._run(calls.list_architectures())

    # Inference

    def predict(
        self,
        model: str,
        inputs: Any = None,
        *,
        images: Sequence[ImageSource] | None = None,
        top_k: int = 0,
        version: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Runs `model`. An array (numpy or torch) in gives the same kind back; a dict
        of them gives a dict of outputs back. `images` sends JPEG/PNG files or bytes
        instead (the model needs preprocessing). With `top_k`, returns the k most likely
        classes of each row as lists of `TopClass`."""
        return self._run(
            calls.predict(
                model, inputs, images=images, top_k=top_k, version=version, timeout=timeout
            )
        )

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status of `service` ("" is the whole server)."""
        return self._run(calls.health(service))
