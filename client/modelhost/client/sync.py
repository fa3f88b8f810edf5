"""`ModelHostClient`: the blocking client, one channel per instance."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

from modelhost.client import calls
from modelhost.client.channel import ChannelConfig
from modelhost.client.errors import translate_errors
from modelhost.client.health import check_health
from modelhost.client.types import Architecture, CheckpointInfo, ModelInfo
from modelhost.v1 import modelhost_pb2 as pb
from modelhost.v1 import modelhost_pb2_grpc as pb_grpc


class ModelHostClient:
    """Calls a modelhost server. Use as a context manager, or call `close()`.

    `timeout` (seconds) is the default deadline of every call; methods that
    take `timeout=` override it. Every failure raises `ModelHostError`.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = None,
        chunk_bytes: int = calls.DEFAULT_CHUNK_BYTES,
        config: ChannelConfig | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._config = config or ChannelConfig()
        self._channel = self._config.channel(target)
        self._stub = pb_grpc.ModelHostStub(self._channel)
        self._wire = calls.WireStub(self._channel)

    def __enter__(self) -> ModelHostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _kw(self, timeout: float | None = None) -> dict[str, Any]:
        return self._config.call_kwargs(timeout if timeout is not None else self.timeout)

    # Checkpoints

    def save_checkpoint(
        self,
        name: str,
        source: calls.Source,
        *,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
        progress: calls.Progress | None = None,
        timeout: float | None = None,
    ) -> CheckpointInfo:
        """Uploads a checkpoint: a file path, bytes, or a state_dict / checkpoint dict."""
        upload = calls.Upload(
            name,
            source,
            metadata=metadata,
            overwrite=overwrite,
            chunk_bytes=self.chunk_bytes,
            progress=progress,
        )
        frames = calls.Prefetch(iter(upload))
        try:
            with translate_errors():
                reply = self._wire.SaveCheckpoint(frames, **self._kw(timeout))
        finally:
            frames.close()
        return upload.verify(reply)

    def snapshot(
        self, model: str, checkpoint: str, *, version: int | None = None, overwrite: bool = False
    ) -> CheckpointInfo:
        """Has the server save a hosted model's state_dict as a checkpoint."""
        stream = calls.snapshot_request(model, checkpoint, version, overwrite)
        with translate_errors():
            reply = self._stub.SaveCheckpoint(iter(stream), **self._kw())
        return CheckpointInfo.from_proto(reply)

    def download_checkpoint(
        self,
        name: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        progress: calls.Progress | None = None,
    ) -> Path | Any:
        """Writes the checkpoint to `dest` and returns its path; without `dest`,
        returns it loaded (`torch.load(weights_only=True)` or safetensors)."""
        download = calls.Download(dest, progress)
        try:
            with translate_errors():
                for message in self._wire.DownloadCheckpoint(
                    pb.DownloadCheckpointRequest(name=name), **self._kw()
                ):
                    download.feed(message)
        except BaseException:
            download.abort()
            raise
        return download.finish()

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every stored checkpoint, sorted by name."""
        with translate_errors():
            reply = self._stub.ListCheckpoints(pb.ListCheckpointsRequest(), **self._kw())
        return [CheckpointInfo.from_proto(c) for c in reply.checkpoints]

    def get_checkpoint(self, name: str) -> CheckpointInfo:
        """One stored checkpoint."""
        with translate_errors():
            reply = self._stub.GetCheckpoint(pb.GetCheckpointRequest(name=name), **self._kw())
        return CheckpointInfo.from_proto(reply)

    def delete_checkpoint(self, name: str) -> None:
        """Deletes a stored checkpoint (models loaded from it keep serving)."""
        with translate_errors():
            self._stub.DeleteCheckpoint(pb.DeleteCheckpointRequest(name=name), **self._kw())

    # Models

    def load_model(
        self,
        name: str,
        *,
        architecture: str = "",
        checkpoint: str = "",
        **options: Unpack[calls.LoadOptions],
    ) -> ModelInfo:
        """Builds `architecture`, loads `checkpoint` into it and serves it as `name`.

        Exported programs and pickled models need no `architecture`; `weights` loads
        torchvision pretrained weights instead of a checkpoint. Options: `LoadOptions`.
        """
        request = calls.load_request(name, architecture, checkpoint, options)
        with translate_errors():
            reply = self._stub.LoadModel(request, **self._kw(options.get("timeout")))
        return ModelInfo.from_proto(reply)

    def unload_model(self, name: str, version: int | None = None) -> list[int]:
        """Stops serving one version (default: all versions); returns those removed."""
        request = pb.UnloadModelRequest(name=name, version=version or 0)
        with translate_errors():
            reply = self._stub.UnloadModel(request, **self._kw())
        return list(reply.versions)

    def list_models(self) -> list[ModelInfo]:
        """Every hosted model version."""
        with translate_errors():
            reply = self._stub.ListModels(pb.ListModelsRequest(), **self._kw())
        return [ModelInfo.from_proto(m) for m in reply.models]

    def get_model(self, name: str, version: int | None = None) -> ModelInfo:
        """One hosted model version (default: the newest)."""
        request = pb.GetModelRequest(name=name, version=version or 0)
        with translate_errors():
            reply = self._stub.GetModel(request, **self._kw())
        return ModelInfo.from_proto(reply)

    def list_architectures(self) -> list[Architecture]:
        """Architectures the server can build."""
        with translate_errors():
            reply = self._stub.ListArchitectures(pb.ListArchitecturesRequest(), **self._kw())
        return [Architecture.from_proto(a) for a in reply.architectures]

    # Inference

    def predict(
        self,
        model: str,
        inputs: Any = None,
        *,
        images: Sequence[calls.ImageSource] | None = None,
        top_k: int = 0,
        version: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Runs `model`. An array (numpy or torch) in gives the same kind back; a dict
        of them gives a dict of outputs back. `images` sends JPEG/PNG files or bytes
        instead (the model needs preprocessing). With `top_k`, returns the k most likely
        classes of each row as lists of `TopClass`."""
        call = calls.PredictCall(model, inputs, version, images=images, top_k=top_k)
        with translate_errors():
            reply = self._wire.Predict(call.payload, **self._kw(timeout))
        return call.result(reply)

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status of `service` ("" is the whole server)."""
        with translate_errors():
            return check_health(self._channel, service, **self._kw())
