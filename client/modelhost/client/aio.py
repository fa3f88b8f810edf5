"""`AsyncModelHostClient`: the asyncio client on `grpc.aio`, one channel per instance.

Its methods are those of `ModelHostClient` (`sync`) as coroutines: the same names,
signatures and docstrings over the same `calls`, kept alike by a test. Only `_run`
differs: it awaits the call, and pulls a request stream (an upload's chunks) on a
worker thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Unpack, overload

import grpc.aio

from modelhost.client import calls
from modelhost.client.channel import ChannelConfig
from modelhost.client.errors import translate_errors
from modelhost.client.load_options import LoadOptions
from modelhost.client.predict import ImageSource
from modelhost.client.transfers import Progress, Source, Stall
from modelhost.client.types import Architecture, CheckpointInfo, ModelInfo

T = TypeVar("T")


class AsyncModelHostClient(calls.ClientBase):
    """Calls a modelhost server from asyncio. Use `async with`, or `await close()`.

    Methods and arguments are those of `ModelHostClient`, as coroutines.
    """

    def _connect(self, config: ChannelConfig, target: str) -> grpc.aio.Channel:
        return config.aio_channel(target)

    async def _run(self, call: calls.Call[T]) -> T:
        self._check_open(call)
        rpc, kw = self._stub[call.rpc], self._kw(call)
        stall = Stall(call.rpc, self.stall_timeout)
        request = call.request
        if isinstance(request, Iterator):  # an upload: each chunk sent is a move
            request = _pulled_in_thread(stall.sending(request))
        try:
            with translate_errors(), stall:
                started = rpc(request, **kw)
                if call.feed or isinstance(call.request, Iterator):
                    loop = asyncio.get_running_loop()
                    stall.start(lambda: loop.call_soon_threadsafe(started.cancel))
                if call.feed:  # a download: each message received is a move
                    reply = None
                    try:
                        async for message in started:
                            stall.received(message)
                            call.feed(message)
                    finally:
                        started.cancel()  # stops a server still sending (no-op once ended)
                else:
                    reply = await started
            return call.result(reply)
        finally:
            call.close()

    async def __aenter__(self) -> AsyncModelHostClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._closed = True
        await self._channel.close()

    # Checkpoints

    async def save_checkpoint(
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
        return await self._run(
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

    async def snapshot(
        self, model: str, checkpoint: str, *, version: int | None = None, overwrite: bool = False
    ) -> CheckpointInfo:
        """Has the server save a hosted model's state_dict as a checkpoint."""
        return await self._run(calls.snapshot(model, checkpoint, version, overwrite))

    @overload
    async def download_checkpoint(
        self, name: str, dest: None = None, *, progress: Progress | None = None
    ) -> Any: ...

    @overload
    async def download_checkpoint(
        self, name: str, dest: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> Path: ...

    async def download_checkpoint(
        self,
        name: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        progress: Progress | None = None,
    ) -> Path | Any:
        """Writes the checkpoint to `dest` and returns its path; without `dest`,
        returns it loaded (`torch.load(weights_only=True)` or safetensors), up to 2 GiB
        (`MAX_MEMORY_DOWNLOAD_BYTES`: pass `dest` for bigger ones)."""
        return await self._run(
            calls.download_checkpoint(name, dest, progress, self.max_download_bytes)
        )

    async def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every stored checkpoint, sorted by name."""
        return await self._run(calls.list_checkpoints())

    async def get_checkpoint(self, name: str) -> CheckpointInfo:
        """One stored checkpoint."""
        return await self._run(calls.get_checkpoint(name))

    async def delete_checkpoint(self, name: str) -> None:
        """Deletes a stored checkpoint (models loaded from it keep serving; refused while an
        on-demand version may be paged in from it again)."""
        return await self._run(calls.delete_checkpoint(name))

    # Models

    async def load_model(
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
        return await self._run(calls.load_model(name, architecture, checkpoint, options))

    async def unload_model(self, name: str, version: int | None = None) -> list[int]:
        """Stops serving one version (default: all versions); returns those removed."""
        return await self._run(calls.unload_model(name, version))

    async def list_models(self) -> list[ModelInfo]:
        """Every hosted model version."""
        return await self._run(calls.list_models())

    async def get_model(self, name: str, version: int | None = None) -> ModelInfo:
        """One hosted model version (default: the newest)."""
        return await self._run(calls.get_model(name, version))

    async def list_architectures(self) -> list[Architecture]:
        """Architectures the server can build."""
        return await self._run(calls.list_architectures())

    # Inference

    async def predict(
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
        return await self._run(
            calls.predict(
                model, inputs, images=images, top_k=top_k, version=version, timeout=timeout
            )
        )

    async def health(self, service: str = "") -> str:
        """The grpc.health.v1 status of `service` ("" is the whole server)."""
        return await self._run(calls.health(service))


async def _pulled_in_thread(items: Iterator[Any]) -> AsyncIterator[Any]:
    """`items` as an async iterator; each `next` (which may block) runs on a worker thread."""
    while (item := await asyncio.to_thread(next, items, None)) is not None:
        yield item
