"""Running one module: preparing inputs, the device round trip, naming and finishing outputs."""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from modelhost.client import codec
from modelhost.client.predict import SINGLE_INPUT, SINGLE_OUTPUT  # the names on the wire
from modelhost.server.activations import ActivationCost, peak_bytes, probe_sides
from modelhost.server.detection import DetectionCost, detection_cost
from modelhost.server.devices import (
    CUDA_GRAPHS,
    adopt,
    is_device_failure,
    is_oom,
    out_of_memory,
    prepare_cuda_graphs_on_this_thread,
    reported,
    thread_stream,
)
from modelhost.server.errors import (
    DeviceFailed,
    InvalidArgument,
    InvalidInput,
    LimitExceeded,
    ModelHostFailure,
    Refused,
    ShuttingDown,
)
from modelhost.server.images import Preprocessing, check_elements, decode_images
from modelhost.server.names import listing
from modelhost.server.settings import Settings
from modelhost.v1 import modelhost_pb2 as pb

Tensors = dict[str, torch.Tensor]
T = TypeVar("T")
log = logging.getLogger(__name__)


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
            takes = (
                f"floating-point input (float16, bfloat16, float32 or float64; it runs in "
                f"{_name(self.dtype)})"
                if self.dtype.is_floating_point
                else _name(self.dtype)
            )
            raise InvalidInput(
                f"input {given!r}: dtype {_name(tensor.dtype)} does not fit the model, "
                f"which takes {takes}"
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


@dataclass(frozen=True)
class Prepared:
    """Inputs ready for the batcher, the float dtype the caller gets outputs in, and (for
    inputs made on a GPU by a preprocessing thread) the event that says they are done."""

    tensors: Tensors
    out_dtype: torch.dtype
    ready: torch.cuda.Event | None = None


CUDA_GRAPH_MODES = {"reduce-overhead", "max-autotune"}
"""torch.compile modes that capture CUDA graphs."""

MAX_COMPILED_SHAPES = 8
"""Input shapes a compiled version compiles for after its warm-up; others run uncompiled."""
RECOMPILE_LIMIT = 64
"""TorchDynamo's graphs per code object (`torch._dynamo.config.recompile_limit`, 8 by
default), which every compiled version of one model class shares (resnet18 and resnet50
share ResNet.forward's): past it, whatever has no graph yet runs uncompiled."""
MAX_BACKGROUND_COMPILES_PER_CLASS = RECOMPILE_LIMIT // 2
"""Background compiles (for shapes met after a load) per model class in a process: callers'
shapes can never take the graphs that the warm-ups of later loads need."""
_class_compiles: collections.Counter[Any] = collections.Counter()
_class_compiles_lock = threading.Lock()

ShapeKey = tuple[tuple[str, torch.dtype, int, tuple[int, ...]], ...]


def uses_cuda_graphs(device: torch.device, compile_mode: str) -> bool:
    """Whether a model compiled with `compile_mode` runs as CUDA graphs on `device`."""
    return device.type == "cuda" and compile_mode in CUDA_GRAPH_MODES


def shape_key(batch: Tensors) -> ShapeKey:
    """What decides which compiled graph runs a batch: each input's dtype and shape, its
    rows counted as 1 or more (TorchDynamo compiles one graph for 1 row and, once it has
    seen a second row count, one for any count above 1)."""
    return tuple(
        (name, t.dtype, min(int(t.shape[0]), 2) if t.dim() else -1, tuple(t.shape[1:]))
        for name, t in sorted(batch.items())
    )


PREPROCESSING_BYTES = 13
"""Bytes per element of a uint8 image's largest step that preprocessing it takes, at most:
the resize's uint8 output, its float32 conversion, and normalization's two float32
temporaries alive with it (red team 11, L1: 12 measured when enlarging)."""


class Runner:
    """Runs a module on its device. `run` is called by one worker thread at a time."""

    def __init__(
        self,
        module: nn.Module | None,
        device: torch.device,
        dtype: torch.dtype,
        inputs: Sequence[InputSpec] = (),
        *,
        channels_last: bool = False,
        preprocessing: Preprocessing | None = None,
        autocast: torch.dtype | None = None,
        compile_mode: str = "",
        max_image_pixels: int = Settings.max_image_pixels,
        max_elements: int = Settings.max_tensor_elements,
        max_detection_bytes: int = Settings.max_detection_bytes,
        max_predict_bytes: int = Settings.max_predict_bytes,
        stream: torch.cuda.Stream | None = None,
        compiler: Executor | None = None,
        on_compiled: Callable[[bool, float], None] = lambda compiled, seconds: None,
    ) -> None:
        self.module: nn.Module | None = None
        self.device = device
        self.dtype = dtype
        self.inputs = tuple(inputs)
        self.outputs: tuple[InputSpec, ...] = ()  # learned from the first successful run
        self.channels_last = channels_last
        self.preprocessing = preprocessing
        self.autocast = autocast
        self.max_image_pixels = max_image_pixels
        self.max_elements = max_elements  # of decoded images, checked from their headers
        self.max_detection_bytes = max_detection_bytes
        self._cost: DetectionCost | None = None  # a detection model's (detection.py)
        self.max_predict_bytes = max_predict_bytes
        self.activations: ActivationCost | None = None  # any other model's, once measured
        self.compile_mode = compile_mode
        # On a GPU the model runs on its lane's stream (the lane thread's current stream).
        self._stream = (stream or torch.cuda.Stream(device)) if device.type == "cuda" else None
        # CUDA graphs keep per-thread state that lane threads must set up (devices.py).
        self._cuda_graphs = uses_cuda_graphs(device, compile_mode)
        # A compiled version compiles off its lane: `run(compile=True)` (warm-up) and jobs
        # on `compiler` for shapes it meets later; requests run only what is compiled
        # already (`_forward`), anything else uncompiled. CUDA graphs compile and capture
        # on the lane, as torch needs.
        self._compiler = compiler
        self._on_compiled = on_compiled  # (whether it compiled, seconds) of each job
        # Held around a background compile: keeps the version on its device (if it is).
        self.hold: Callable[[], contextlib.AbstractContextManager[bool]] = lambda: (
            contextlib.nullcontext(True)
        )
        self._compiled: set[ShapeKey] = set()  # compiled for, or queued
        self._shapes_lock = threading.Lock()
        self._forward: Callable[..., Any] = _released
        self._compiling: Callable[..., Any] = _released
        self._code: Any = None  # the module's forward code, for MAX_BACKGROUND_COMPILES_PER_CLASS
        self._parameters: Mapping[str, inspect.Parameter] | None = None  # of its forward
        if module is not None:  # None: a version registered before it is built (restore)
            self.attach(module)

    # Preparing inputs (on the event loop, or on a preprocessing thread for images)

    def prepare(
        self, inputs: Mapping[str, codec.TensorFields], images: Sequence[bytes] = ()
    ) -> Prepared:
        """Decodes request tensors (zero copy) or images, checks them against the model.

        Encoded images are decoded and preprocessed here, their headers checked before
        (`images.check_images`); a failed allocation raises OutOfMemory, a failed device
        DeviceFailed. On a GPU that
        work runs on this thread's own stream and `ready` tells the lane when it is done
        (no host synchronisation). uint8 image tensors stay as they came: the runner
        preprocesses them a batch at a time on the model's device (`_stage`: one pinned
        copy of the uint8 batch, a quarter of the float32 bytes); here they are only
        checked (their size before and after preprocessing).
        """
        stream = self._prep_stream(images)
        tensors, out_dtype = self._device_step(lambda: self._decoded(inputs, images, stream))
        ready = stream.record_event() if stream else None
        if self.inputs:
            self._check(self._as_the_model_sees(tensors))
        elif len(tensors) > 1:
            _check_keywords(self._parameters, tensors)
        self.check_cost(tensors)  # before it waits in a queue
        return Prepared(tensors, out_dtype, ready)

    def _decoded(
        self,
        inputs: Mapping[str, codec.TensorFields],
        images: Sequence[bytes],
        stream: torch.cuda.Stream | None,
    ) -> tuple[Tensors, torch.dtype]:
        """The request's tensors (on `stream`, when it has one) and its outputs' dtype."""
        with torch.cuda.stream(stream) if stream else nullcontext():
            if images:
                if inputs:
                    raise InvalidInput("send either inputs or images, not both")
                preprocessing = self._preprocessing()
                decoded = decode_images(
                    images,
                    self.device,
                    max_pixels=self.max_image_pixels,
                    max_elements=self.max_elements,
                    preprocessing=preprocessing,
                )
                return {SINGLE_INPUT: preprocessing(decoded, self.dtype)}, torch.float32
            tensors = self._decode(inputs)
            if self.preprocessing is not None:
                self._check_resized(tensors, self.preprocessing)
            return tensors, output_float_dtype(tensors)

    def _prep_stream(self, images: Sequence[bytes]) -> torch.cuda.Stream | None:
        """The calling thread's own stream, when this request's work runs on the GPU."""
        if self.device.type != "cuda" or not images:
            return None
        return thread_stream(self.device)

    def _as_the_model_sees(self, tensors: Tensors) -> Tensors:
        """uint8 images as shapes of what preprocessing will make of them (meta tensors)."""
        steps = self.preprocessing
        if steps is None:
            return tensors
        return {
            name: torch.empty(steps.output_shape(t.shape), dtype=self.dtype, device="meta")
            if _is_image(t)
            else t
            for name, t in tensors.items()
        }

    def _device_step(self, step: Callable[[], T], doing: str = "preparing the inputs") -> T:
        """`step()`; a failed allocation raised as OutOfMemory (RESOURCE_EXHAUSTED, not a
        bug), a failed device (a CUDA error while decoding or preprocessing on it) as
        DeviceFailed, other errors as they are."""
        return reported(
            step,
            self.device,
            lambda e: self._failure(e, doing) if is_oom(e) or is_device_failure(e) else None,
        )

    def _check_resized(self, tensors: Tensors, preprocessing: Preprocessing) -> None:
        """Refuses uint8 images that preprocessing would blow up (a resize of a thin strip)."""
        check_elements(
            sum(
                t.shape[0] * preprocessing.elements(t.shape[3], t.shape[2], t.shape[1])
                for t in tensors.values()
                if _is_image(t)
            ),
            self.max_elements,
        )

    def _preprocessing(self) -> Preprocessing:
        if self.preprocessing is None:
            raise InvalidInput(
                "this model takes no images: load it with preprocessing (or pretrained "
                "weights) to send uint8 or encoded images"
            )
        return self.preprocessing

    def _decode(self, inputs: Mapping[str, codec.TensorFields]) -> Tensors:
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
        rows = {t.shape[0] for t in tensors.values()}
        if len(rows) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {sorted(rows)}")
        return tensors

    def check_shape_cost(self, shape: Sequence[int], what: str) -> None:
        """Refuses (InvalidArgument, naming `what`) a shape a load would run that would
        cost more than the model's limit (see `check_cost`)."""
        self.check_cost(self._zeros_of(shape), InvalidArgument, f"{what}: ")

    def estimated_bytes(self, shape: Sequence[int]) -> int | None:
        """What a batch of zeros of `shape` is estimated to take beyond the weights: a
        detection model's estimate, any other model's measured activations; None when the
        model has neither (the same estimates `check_cost` bounds)."""
        seen = self._as_the_model_sees(self._zeros_of(shape)).values()
        if self._cost is not None:
            return sum(self._cost.estimate(t.shape) for t in seen)
        return (
            None if self.activations is None else self.activations.estimate([t.shape for t in seen])
        )

    def _zeros_of(self, shape: Sequence[int]) -> Tensors:
        """A batch of `shape` as a warm-up would make it (on the meta device: no memory)."""
        dtype = self.inputs[0].dtype if self.inputs else self.dtype
        return {SINGLE_INPUT: torch.empty(tuple(shape), dtype=dtype, device="meta")}

    @property
    def is_detection(self) -> bool:
        """Whether its cost is a detection model's estimate (not measured)."""
        return self._cost is not None

    def check_cost(
        self, batch: Tensors, refuse: type[ModelHostFailure] = LimitExceeded, what: str = ""
    ) -> None:
        """Refuses a batch (a request, a merged group, the load's warm-up) that would take
        more memory than its limit: a detection model's estimate over
        `max_detection_bytes`, any other model's measured activations
        (`activations.py`) over `max_predict_bytes`."""
        if self._cost is not None and self.max_detection_bytes:
            for tensor in self._as_the_model_sees(batch).values():
                estimate = self._cost.estimate(tensor.shape)
                if estimate > self.max_detection_bytes:
                    raise refuse(
                        f"{what}{self._cost.describe(tensor.shape)} would take about "
                        f"{estimate / 1e9:.1f} GB; the limit is {self.max_detection_bytes} "
                        "bytes (max_detection_bytes)"
                    )
        elif self._cost is None and self.activations is not None and self.max_predict_bytes:
            shapes = [t.shape for t in self._as_the_model_sees(batch).values()]
            preprocessing = self._preprocessing_bytes(batch)
            estimate = self.activations.estimate(shapes) + preprocessing
            if estimate > self.max_predict_bytes:
                images = f" and {preprocessing} for its images" if preprocessing else ""
                raise refuse(
                    f"{what}an input of {', '.join('x'.join(map(str, s)) for s in shapes)} "
                    f"would take about {estimate / 1e9:.1f} GB of activations "
                    f"({self.activations.describe()}{images}); the limit is "
                    f"{self.max_predict_bytes} bytes (max_predict_bytes)"
                )

    def _preprocessing_bytes(self, tensors: Tensors) -> int:
        """The most preprocessing uint8 images takes: PREPROCESSING_BYTES per element of
        each image's largest step (a resize converts the whole image to float32 first:
        red team 10, L1)."""
        steps = self.preprocessing
        if steps is None:
            return 0
        return sum(
            PREPROCESSING_BYTES * t.shape[0] * steps.elements(t.shape[3], t.shape[2], t.shape[1])
            for t in tensors.values()
            if _is_image(t)
        )

    def batch_elements(self, limit: int) -> int:
        """Most input elements a merged batch may hold: `limit` (max_tensor_elements), or
        fewer where its measured activations would pass max_predict_bytes in rows of the
        size it was measured at (a batch of larger rows may still: `check_cost`)."""
        if self.activations is None or not self.max_predict_bytes or len(self.inputs) != 1:
            return limit
        shape = self.inputs[0].shape
        side = probe_sides(shape)[0]
        row = [side if d == -1 else d for d in shape[1:]]
        return min(limit, self.activations.elements_within(self.max_predict_bytes, row))

    def peak_bytes(self, batch: Tensors) -> int:
        """Runs one batch uncompiled and returns the most bytes its tensors held at once
        (`activations.peak_bytes`); it finds the outputs, as any first run does."""
        return peak_bytes(lambda: self.run_uncompiled(batch))

    def run_uncompiled(self, batch: Tensors) -> Tensors:
        """Runs one batch as the module is (no compile queued for its shape): a load's
        checks."""
        assert self.module is not None
        return self._run_with(batch, self.module)

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

    # Running (on the model's worker thread)

    def adopt(self, tensors: Tensors, ready: torch.cuda.Event) -> None:
        """Makes inputs prepared on another thread's stream safe to use on this one."""
        adopt(tensors.values(), ready, self.device)

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Concatenates a batch. Host rows bound for a GPU go straight into pinned memory:
        one host copy, then one DMA (`cat` then `pin_memory` copied twice)."""
        if self._stream is None or parts[0].is_cuda:
            return torch.cat(parts)
        rows = sum(int(p.shape[0]) for p in parts)
        out = torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
        return torch.cat(parts, out=out)

    @property
    def asynchronous(self) -> bool:
        """Whether `launch` returns before the device is done (a GPU: the lane pipelines)."""
        return self._stream is not None

    def run(self, batch: Tensors, *, compile: bool = False) -> Tensors:
        """Runs one batch (host or device tensors in, CPU tensors out, named outputs); with
        `compile`, a compiled version compiles for its shape first if it has not yet."""
        if compile and self.compile_mode:
            with self._shapes_lock:
                self._compiled.add(shape_key(batch))
            return self._run_with(batch, self._compiling)
        return self.launch(batch)()

    def launch(self, batch: Tensors) -> Callable[[], Tensors]:
        """Starts one batch and returns what collects its outputs.

        On a GPU the copies, kernels and the copy back are queued on the model's stream and
        this returns at once: the lane can stage the next batch while this one computes,
        and the collect call waits for the device. On the CPU the batch has run already.
        Failures are classified outside the `except` block that caught them, once their
        traceback (and the activations its frames hold) is gone and memory is released.
        """
        if self._compiler is not None and self.compile_mode and not self._cuda_graphs:
            self._compile_later(shape_key(batch))
        host, done = self._guarded(lambda: self._launch(batch, self._forward))
        return lambda: self._collect(host, done)

    def _compile_later(self, key: ShapeKey) -> None:
        """Queues a compile for a batch shape this version has not compiled for (the batch
        runs uncompiled meanwhile), up to MAX_COMPILED_SHAPES; a batch without rows has
        nothing worth compiling for."""
        if any(rows == 0 for _, _, rows, _ in key):
            return
        with self._shapes_lock:
            if key in self._compiled or len(self._compiled) >= MAX_COMPILED_SHAPES:
                return
            if not _class_may_compile(self._code):
                return
            self._compiled.add(key)
            full = len(self._compiled) == MAX_COMPILED_SHAPES
        self._submit_compile(key)
        if full:
            log.warning(
                "a compiled version met %d input shapes: new shapes from now on run "
                "uncompiled (warmup_shape compiles the shapes it serves at load)",
                MAX_COMPILED_SHAPES,
            )

    def _compile_for(self, key: ShapeKey) -> None:
        """Compiles for `key`'s shape by running zeros of it (on the compile thread, keeping
        the version on its device meanwhile): one row, or two rows marked dynamic (one
        graph for any count above one, compiled at no more rows than the request that
        queued it had). Skipped if the version is not on its device."""
        count = 1 if key and key[0][2] == 1 else 2
        started = time.perf_counter()
        with self.hold() as held:
            if not held:
                return
            try:
                zeros = {
                    name: torch.zeros((count, *rest) if rows != -1 else (), dtype=dtype)
                    for name, dtype, rows, rest in key
                }
                self._run_with(zeros, self._compiling, dynamic_rows=count > 1)
            except ModelHostFailure as error:  # that shape keeps running uncompiled
                log.warning("compiling for input shape %s failed: %s", _shapes(key), error)
                self._on_compiled(False, time.perf_counter() - started)
                return
        took = time.perf_counter() - started
        log.info("compiled for input shape %s (%.1fs)", _shapes(key), took)
        self._on_compiled(True, took)

    def compile_again(self) -> None:
        """Runs each shape compiled for before once more on the compile thread, compiling
        it where torch's graphs do not fit the module now attached (a page-in brings a new
        one; they usually fit). Not counted against any budget: no new shape."""
        with self._shapes_lock:
            keys = list(self._compiled)
        if self._compiler is not None and not self._cuda_graphs:
            for key in keys:
                self._submit_compile(key)

    def _submit_compile(self, key: ShapeKey) -> None:
        """Queues `_compile_for(key)` on the compile thread; what it raises is logged (a
        future nobody reads would swallow it)."""
        assert self._compiler is not None
        job = self._compiler.submit(self._compile_for, key)
        job.add_done_callback(_log_failure)

    def _run_with(
        self, batch: Tensors, forward: Callable[..., Any], *, dynamic_rows: bool = False
    ) -> Tensors:
        host, done = self._guarded(lambda: self._launch(batch, forward, dynamic_rows))
        return self._collect(host, done)

    def _collect(self, host: Tensors, done: torch.cuda.Event | None) -> Tensors:
        if done is not None:
            self._guarded(done.synchronize)
        if not self.outputs:
            unsendable = [f"{name} ({t.dtype})" for name, t in host.items() if not sendable(t)]
            if unsendable:
                raise Refused(
                    f"the model returns outputs of a dtype modelhost cannot send: "
                    f"{', '.join(unsendable[:5])}; cast them in its forward (to float32, "
                    "float16, bfloat16, float64, an integer or bool dtype)"
                )
            self.outputs = tuple(
                InputSpec(name, t.dtype, (-1, *t.shape[1:]) if t.dim() else ())
                for name, t in host.items()
            )
        return host

    def _guarded(self, step: Callable[[], T]) -> T:
        """`step()`, its failures reported as out of memory, a failed device or bad input."""
        return reported(step, self.device, self._failure)

    def _launch(
        self, batch: Tensors, forward: Callable[..., Any], dynamic_rows: bool = False
    ) -> tuple[Tensors, torch.cuda.Event | None]:
        """Queues the batch's work through `forward`; host outputs (valid once the returned
        event is done). With `dynamic_rows`, a compile treats the row count as dynamic."""
        self.check_cost(batch)
        if self._cuda_graphs:
            prepare_cuda_graphs_on_this_thread()
        if self._stream is not None:
            # The batch was made (cat, or adopted from a preprocessing stream) on this
            # thread's current stream: the model's stream must not read it before then,
            # nor its memory be reused while the model's kernels may still read it.
            current = torch.cuda.current_stream(self.device)
            if current != self._stream:
                self._stream.wait_stream(current)
            for tensor in batch.values():
                if tensor.is_cuda:
                    tensor.record_stream(self._stream)
        with self._on_stream(), torch.inference_mode(), self._autocast():
            staged = {name: self._stage(t) for name, t in batch.items()}
            if dynamic_rows:
                for tensor in staged.values():
                    if tensor.dim():
                        torch._dynamo.maybe_mark_dynamic(tensor, 0)
            with CUDA_GRAPHS if self._cuda_graphs else nullcontext():
                if len(staged) == 1:
                    result = forward(next(iter(staged.values())))
                else:
                    result = forward(**staged)
            outputs = flatten_outputs(result)
            host = {name: t.to("cpu", non_blocking=True) for name, t in outputs.items()}
        done = self._stream.record_event() if self._stream is not None else None
        return host, done

    def _failure(self, error: Exception, doing: str = "running the model") -> ModelHostFailure:
        """What a failed step reports: out of memory, a failed device, or the input."""
        if is_oom(error):
            return out_of_memory(error, doing, self.device)
        first_line = (str(error).splitlines() or [""])[0]
        if is_device_failure(error):
            return DeviceFailed(f"the device {self.device} failed: {first_line}")
        return InvalidInput(f"the model rejected the input: {type(error).__name__}: {first_line}")

    def attach(self, module: nn.Module) -> None:
        """Runs `module` from now on, compiled with its mode if it has one: requests run
        what is compiled for their shape (`torch._dynamo.run`: never compiles), compiles
        happen off the lane (see `run`, `_compile_later`)."""
        self.module = module
        self._cost = detection_cost(module)
        self._forward = self._compiling = module
        self._code = getattr(module.forward, "__code__", None)  # where torch keeps graphs
        self._parameters = _parameters(module)  # read once, not per request
        if self.compile_mode:
            mode = None if self.compile_mode == "default" else self.compile_mode
            self._compiling = _compiled(module, mode)
            self._forward = self._compiling if self._cuda_graphs else _run_only(module)

    def detach(self) -> nn.Module | None:
        """Drops the module (and its compiled form) and returns it: a run now fails. Waits
        for the model's stream first: a batch whose callers all left may still be running
        on the weights."""
        if self._stream is not None:
            with contextlib.suppress(Exception):  # a failed device runs nothing any more
                self._stream.synchronize()
        module, self.module = self.module, None
        self._forward = self._compiling = _released
        return module

    def warm_up(
        self,
        shape: Sequence[int],
        *,
        measure: bool = False,
        on_lane: Callable[[Callable[[], float]], float] = lambda run: run(),
        first_here: bool = False,
    ) -> dict[int, float]:
        """Runs zeros of `shape` (and of each smaller power-of-two batch) through the model.

        With `measure`, runs each size three times more, in rounds across the sizes, and
        returns rows/s by batch size from its fastest run (a busy moment on a shared
        machine only ever slows a run down, so the fastest is the least disturbed).
        Each run is one call of `on_lane` (a job on the model's lane): on the shared CPU
        lane the other models' batches run between them, not after the whole warm-up.
        The first (untimed) run of each size compiles, for a compiled model; with
        `first_here` it runs on this thread.
        """
        dtype = self.inputs[0].dtype if self.inputs else self.dtype
        self.check_shape_cost(shape, "warmup_shape")
        batches = sorted({shape[0], *(1 << i for i in range(16) if 1 << i < shape[0])})
        seconds = {rows: float("inf") for rows in batches}
        for run in range(4 if measure else 1):  # the first run of each size is not timed
            for rows in batches:
                # The first run of each size compiles (a compiled version), the others not.
                timed = functools.partial(
                    self._timed_run, (rows, *shape[1:]), dtype, compile=not run
                )
                took = timed() if first_here and not run else on_lane(timed)
                if run:
                    seconds[rows] = min(seconds[rows], took)
        return {rows: rows / seconds[rows] for rows in batches} if measure else {}

    def _timed_run(self, shape: Sequence[int], dtype: torch.dtype, *, compile: bool) -> float:
        """Seconds one run of zeros of `shape` takes, to its outputs on the host."""
        zeros = self._device_step(
            lambda: torch.zeros(tuple(shape), dtype=dtype), "allocating the warm-up input"
        )
        started = time.perf_counter()
        self.run({SINGLE_INPUT: zeros}, compile=compile)
        return time.perf_counter() - started

    def _stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """An input on the model's device in the form it runs: copied (from pinned memory,
        on the model's stream), uint8 images preprocessed, dtype, memory format."""
        if self._stream is not None and not tensor.is_cuda:  # host rows: pinned, then copied
            if not tensor.is_pinned():
                tensor = tensor.pin_memory()
            tensor = tensor.to(self.device, non_blocking=True)
        if self.preprocessing is not None and _is_image(tensor):
            tensor = self.preprocessing(tensor, self.dtype)
        if tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        if self._stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._stream)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def _is_image(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.uint8 and tensor.dim() == 4


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


def fixed_batch(inputs: Iterable[InputSpec]) -> bool:
    """Whether a model takes a fixed number of rows (an input's first dimension is a size,
    not -1: an exported program with a static batch)."""
    return any(given.shape and given.shape[0] != -1 for given in inputs)


def sendable(tensor: torch.Tensor) -> bool:
    """Whether a tensor can travel in a reply (its dtype has a DataType; a float one is
    sent in the caller's float dtype)."""
    return tensor.is_floating_point() or codec.sendable(tensor.dtype)


def output_float_dtype(inputs: Tensors) -> torch.dtype:
    """The dtype of the first floating-point input, float32 when there is none."""
    for tensor in inputs.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


@dataclass(frozen=True)
class Answer:
    """What one caller gets back: named outputs, or the top classes per row."""

    outputs: dict[str, pb.Tensor]
    top_k: list[pb.TopClasses]
    paged_in: bool = False  # its version was not resident: it waited for a page-in


def encode_answer(outputs: Tensors, float_dtype: torch.dtype) -> Answer:
    """Encodes outputs, floating-point ones in the caller's float dtype."""
    encoded = {
        name: codec.from_torch(t.to(float_dtype) if t.is_floating_point() else t)
        for name, t in outputs.items()
    }
    return Answer(encoded, [])


def top_classes(outputs: Tensors, k: int, labels: Sequence[str]) -> Answer:
    """The k most likely classes per row (softmax over the single output's last dimension)."""
    if len(outputs) != 1:
        raise InvalidInput(
            f"top_k needs a model with one output; this one has {len(outputs)}: "
            + listing(list(outputs))
        )
    logits = next(iter(outputs.values())).float()
    if logits.dim() != 2:
        raise InvalidInput(f"top_k needs [batch, classes] outputs, not {list(logits.shape)}")
    scores, indices = logits.softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
    rows = []
    for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True):
        names = [labels[i] if i < len(labels) else str(i) for i in row_indices] if labels else []
        rows.append(pb.TopClasses(indices=row_indices, scores=row_scores, labels=names))
    return Answer({}, rows)


def _class_may_compile(code: Any) -> bool:
    """Counts one background compile against its model class's share of the graphs torch
    keeps per code object; False once that share is spent (logged once)."""
    with _class_compiles_lock:
        if _class_compiles[code] >= MAX_BACKGROUND_COMPILES_PER_CLASS:
            return False
        _class_compiles[code] += 1
        spent = _class_compiles[code] == MAX_BACKGROUND_COMPILES_PER_CLASS
    if spent:
        log.warning(
            "compiled versions of %s met %d input shapes after their loads: new shapes of "
            "this model class from now on run uncompiled",
            getattr(code, "co_qualname", code),
            MAX_BACKGROUND_COMPILES_PER_CLASS,
        )
    return True


def _compiled(module: nn.Module, mode: str | None) -> Callable[..., Any]:
    """`torch.compile(module)`, whose compiles may keep RECOMPILE_LIMIT graphs per code
    object (TorchDynamo's settings are per thread: set on the thread that compiles)."""
    compiled = torch.compile(module, mode=mode)

    def run(*args: Any, **kwargs: Any) -> Any:
        config = torch._dynamo.config
        if config.recompile_limit < RECOMPILE_LIMIT:  # noqa: PLR1730 (set only if lower: a set is not free)
            config.recompile_limit = RECOMPILE_LIMIT
        return compiled(*args, **kwargs)

    return run


def _run_only(module: nn.Module) -> Callable[..., Any]:
    """`torch._dynamo.run(module)`: runs the graphs compiled for a call's shape, else the
    module as it is; never compiles. Before torch 2.12 (about) FX kept "tracing now" in
    one flag for the whole process, so while a background compile traced on the compile
    thread, such a call on a lane raised "using FX to symbolically trace a
    dynamo-optimized function" (a request failed): with `error_on_nested_fx_trace` off
    (set where it runs, as `_compiled` sets its limit) it runs the module as it is."""
    run = torch._dynamo.run(module)

    def run_only(*args: Any, **kwargs: Any) -> Any:
        config = torch._dynamo.config
        if config.error_on_nested_fx_trace:
            config.error_on_nested_fx_trace = False
        return run(*args, **kwargs)

    return run_only


def _log_failure(job: Future[None]) -> None:
    if not job.cancelled() and (error := job.exception()) is not None:
        log.error("a background compile failed", exc_info=error)


def _shapes(key: ShapeKey) -> str:
    """A shape key as logs show it: "x [N, 3, 224, 224] float32" (N: any rows above 1)."""
    shown = {-1: [], 0: ["0"], 1: ["1"], 2: ["N"]}
    return ", ".join(
        f"{name} [{', '.join([*shown[rows], *map(str, rest)])}] {_name(dtype)}"
        for name, dtype, rows, rest in key
    )


def _parameters(module: nn.Module) -> Mapping[str, inspect.Parameter] | None:
    """The parameters of `module`'s forward; None when it has no signature to read."""
    try:
        return inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None


def _check_keywords(parameters: Mapping[str, inspect.Parameter] | None, tensors: Tensors) -> None:
    """A model that declares no inputs gets several inputs as keyword arguments of its
    forward: each must name a parameter that takes an input (no default, or None; and,
    when it is annotated, a tensor), never a setting such as RAFT's `num_flow_updates=12`
    or a `max_steps: int | None = None`, which a one-number tensor would set (red team
    10, H2: a 1.5 MB request held the CPU lane for 9 s). Without a signature to read,
    the model says at its run."""
    if parameters is None:
        return
    any_name = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for name in tensors:
        parameter = parameters.get(name)
        if parameter is None and any_name:
            continue
        if parameter is None or parameter.kind not in (
            parameter.POSITIONAL_OR_KEYWORD,
            parameter.KEYWORD_ONLY,
        ):
            raise InvalidInput(f"input {name!r} is not a parameter of the model's forward")
        if parameter.default is not parameter.empty and parameter.default is not None:
            raise InvalidInput(
                f"input {name!r} would set a setting of the model's forward (its default "
                f"is {parameter.default!r:.40}): inputs fill parameters without a default, "
                "or whose default is None"
            )
        annotation = parameter.annotation
        if annotation is not parameter.empty and "Tensor" not in str(annotation):
            raise InvalidInput(
                f"input {name!r} would set a setting of the model's forward (it is "
                f"annotated {str(annotation)!r:.60}, not a tensor)"
            )


def _released(*args: Any, **kwargs: Any) -> Any:
    raise ShuttingDown("this model version has been unloaded")
