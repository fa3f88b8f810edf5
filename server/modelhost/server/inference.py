"""Running one module: decoding and checking inputs, the device round trip, naming outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelhost.client import codec
from modelhost.server.devices import is_oom, release_memory
from modelhost.server.errors import InvalidInput, OutOfMemory
from modelhost.v1 import modelhost_pb2 as pb

SINGLE_OUTPUT = "output"
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class InputSpec:
    """A tensor the model takes or returns; -1 in `shape` is any size."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def check(self, tensor: torch.Tensor, given: str) -> None:
        """Raises InvalidInput unless `tensor` fits this spec (floats of any width fit floats)."""
        compatible = tensor.dtype == self.dtype or (
            tensor.dtype.is_floating_point and self.dtype.is_floating_point
        )
        if not compatible:
            raise InvalidInput(
                f"input {given!r}: dtype {_name(tensor.dtype)} does not fit the model, "
                f"which expects {_name(self.dtype)}"
            )
        if tensor.dim() != len(self.shape) or any(
            want not in (-1, got) for want, got in zip(self.shape, tensor.shape, strict=False)
        ):
            raise InvalidInput(
                f"input {given!r}: shape {list(tensor.shape)} does not fit the model, which "
                f"expects {list(self.shape)} (-1: any size)"
            )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Runner:
    """Runs a module on its device. Thread-compatible: one worker thread calls `run`."""

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        inputs: Sequence[InputSpec] = (),
        *,
        channels_last: bool = False,
    ) -> None:
        self.module = module
        self.channels_last = channels_last
        self.device = device
        self.dtype = dtype
        self.inputs = tuple(inputs)
        self.outputs: tuple[InputSpec, ...] = ()  # learned from the first successful run
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def decode(self, inputs: Mapping[str, pb.Tensor]) -> Tensors:
        """Decodes request tensors (zero copy) and checks them against the model's inputs."""
        if not inputs:
            raise InvalidInput("the request has no inputs")
        tensors: Tensors = {}
        for name, message in inputs.items():
            try:
                tensor = codec.to_torch(message, what=f"input {name!r}")
            except codec.TensorError as error:
                raise InvalidInput(str(error)) from None
            if tensor.dim() == 0:
                raise InvalidInput(f"input {name!r} is a scalar; the first dimension is the batch")
            tensors[name] = tensor
        if self.inputs:
            self._check(tensors)
        return tensors

    def _check(self, tensors: Tensors) -> None:
        if len(tensors) == 1 and len(self.inputs) == 1:
            ((name, tensor),) = tensors.items()
            self.inputs[0].check(tensor, name)
            return
        specs = {spec.name: spec for spec in self.inputs}
        if tensors.keys() != specs.keys():
            raise InvalidInput(
                f"inputs {sorted(tensors)} do not match the model's inputs {sorted(specs)}"
            )
        for name, tensor in tensors.items():
            specs[name].check(tensor, name)

    def run(self, batch: Tensors) -> Tensors:
        """Runs one batch (CPU tensors in, CPU tensors out, named as in PredictResponse)."""
        try:
            with self._on_stream(), torch.inference_mode():
                staged = {name: self._stage(t) for name, t in batch.items()}
                if len(staged) == 1:
                    result = self.module(next(iter(staged.values())))
                else:
                    result = self.module(**staged)
                outputs = flatten_outputs(result)
                host = {name: t.to("cpu", non_blocking=True) for name, t in outputs.items()}
                if self._stream is not None:
                    self._stream.synchronize()
            if not self.outputs:
                self.outputs = tuple(
                    InputSpec(name, t.dtype, (-1, *t.shape[1:]) if t.dim() else ())
                    for name, t in host.items()
                )
            return host
        except (InvalidInput, OutOfMemory):
            raise
        except Exception as error:
            if is_oom(error):
                release_memory(self.device)
                raise OutOfMemory(
                    f"out of memory running the model on {self.device}: "
                    f"{str(error).splitlines()[0]}"
                ) from None
            raise InvalidInput(
                f"the model rejected the input: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}"
            ) from None

    def _stage(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._stream is not None:
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        if tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        if self._stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._stream)


def flatten_outputs(result: Any) -> Tensors:
    """Names a model's outputs: "output", or "0", "1", ... / dict keys, joined by "."."""
    flat = dict(_walk(result, ""))
    if not flat:
        raise InvalidInput(f"the model returned no tensors (a {type(result).__name__})")
    return flat


def _walk(value: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path or SINGLE_OUTPUT, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}.{index}" if path else str(index))
    elif isinstance(value, (int, float, bool)):
        yield path or SINGLE_OUTPUT, torch.tensor(value)


def encode_outputs(outputs: Tensors, float_dtype: torch.dtype) -> dict[str, pb.Tensor]:
    """Encodes outputs, floating-point ones in the caller's float dtype."""
    return {
        name: codec.from_torch(t.to(float_dtype) if t.is_floating_point() else t)
        for name, t in outputs.items()
    }


def output_float_dtype(inputs: Tensors) -> torch.dtype:
    """The dtype of the first floating-point input, float32 when there is none."""
    for tensor in inputs.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
