"""Devices: choosing one; recognising out-of-memory and failed-device errors and raising
them as domain errors (`reported`); giving memory back; per-thread CUDA streams and the
thread state CUDA graphs expect; background threads' priority; and measuring a model's
workspace (`Workspace`)."""

from __future__ import annotations

import collections
import gc
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from modelhost.server.errors import InvalidArgument, ModelHostFailure, OutOfMemory

T = TypeVar("T")

log = logging.getLogger(__name__)


CGROUP_MEMORY_LIMITS = (
    "/sys/fs/cgroup/memory.max",  # cgroup v2 ("max": none)
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
)


def host_memory_bytes() -> int:
    """The memory this process may use: the machine's, or its container's (a cgroup
    limit, as a Kubernetes pod's memory limit sets) when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path) as file:
                text = file.read(64).strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def resolve_device(requested: str, default: str) -> torch.device:
    """ "" -> the server default; "auto" -> cuda when present, else cpu; checks it exists."""
    name = (requested or default).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidArgument(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument(f"device {name!r} requested, but this server has no GPU")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise InvalidArgument(
                f"device {name!r} does not exist (this server has {torch.cuda.device_count()})"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise InvalidArgument(f"device type {device.type!r} is not supported: use cpu or cuda")
    if device.index not in (None, 0):
        raise InvalidArgument(f"device {name!r}: there is one cpu device; use cpu")
    return torch.device("cpu")


def is_oom(error: BaseException) -> bool:
    """Whether `error` is a failed allocation, on a GPU or on the host."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def out_of_memory(error: BaseException, doing: str, device: torch.device) -> OutOfMemory:
    """Says what ran out. Raise it after leaving the `except` block, once `release_memory`
    ran: inside it the traceback still holds the frames, and so the tensors, that used
    the memory."""
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    return OutOfMemory(f"out of memory {doing} on {device}: {reason}")


def reported(
    step: Callable[[], T],
    device: torch.device,
    report: Callable[[Exception], ModelHostFailure | None],
) -> T:
    """`step()`; an error that `report` turns into a domain failure is raised as that,
    other errors (and domain failures) as they were. The failure is raised after the
    `except` block, so the traceback holding the failed step's frames, and the tensors
    they allocated, is gone before an OutOfMemory's `release_memory` runs."""
    try:
        return step()
    except ModelHostFailure:  # said already
        raise
    except Exception as error:
        failure = report(error)
        if failure is None:
            raise
    if isinstance(failure, OutOfMemory):
        release_memory(device)
    raise failure


def oom_while(doing: str, device: torch.device) -> Callable[[Exception], OutOfMemory | None]:
    """A `report` for `reported`: out-of-memory errors only."""
    return lambda error: out_of_memory(error, doing, device) if is_oom(error) else None


STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "illegal address",
    "illegal instruction",
    "misaligned address",
    "device-side assert",
    "unspecified launch failure",
    "launch timed out",
    "ECC error",
    "hardware stack error",
    "invalid program counter",
    "unknown error",
)
"""CUDA's sticky errors: after one the device's context is lost for the whole process."""


PROBED_CUDA_ERRORS = (
    "Triton Error [CUDA]",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR",
    "Failed to synchronize CUDA stream",
)
"""Spellings under which a lost context may reach a caller without one of CUDA's sticky
phrases: Triton's launcher (every torch.compile version: `Triton Error [CUDA]: ...`, not
an AcceleratorError, no "CUDA error"), cuBLAS and cuDNN (their own status names), and
torchvision's nvJPEG decoder (a numeric code only). Each may also be an ordinary failure
of one call, so none decides by itself: it triggers a probe of the context
(`context_lost`)."""


def is_device_failure(error: BaseException) -> bool:
    """Whether `error` says the device itself failed (an illegal address, a device-side
    assert: one of CUDA's sticky errors): its context is lost, and nothing on it can be
    trusted until a restart. Other CUDA errors (a launch configuration an input's shape
    made invalid, an operation refused during a graph capture) fail that call only: a
    request must not be able to take the server out of service.

    A CUDA error (torch's "CUDA error", an AcceleratorError, Triton's "Triton Error
    [CUDA]") naming a sticky error is one. A spelling that may hide one
    (`PROBED_CUDA_ERRORS`: cuBLAS's, cuDNN's, nvJPEG's, Triton's without a sticky phrase)
    is one when the context is lost (`context_lost`: a sticky error repeats at the next
    synchronisation). Called on error paths only; the probe (a synchronisation of this
    thread's stream) runs only for those spellings, never for an input's plain error."""
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    accelerator_error = getattr(torch, "AcceleratorError", None)
    cuda = (
        "CUDA error" in text
        or "Triton Error [CUDA]" in text
        or (accelerator_error is not None and isinstance(error, accelerator_error))
    )
    lowered = text.lower()
    if cuda and any(sticky.lower() in lowered for sticky in STICKY_CUDA_ERRORS):
        return True
    return any(spelling in text for spelling in PROBED_CUDA_ERRORS) and context_lost()


def context_lost(device: torch.device | None = None) -> bool:
    """Whether the CUDA context of `device` (default: this thread's current device) is
    lost: after a sticky error every later synchronisation raises it again. Synchronises
    this thread's current stream only (its own work; a device-wide synchronisation could
    meet another thread's graph capture). False without CUDA in use."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return False
    try:
        torch.cuda.current_stream(device).synchronize()
    except RuntimeError as error:  # AcceleratorError is one
        log.error("the CUDA context is lost: a synchronisation raised %s", error)
        return True
    return False


def free_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on `device` (host: MemAvailable), if known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # What PyTorch's caching allocator holds but does not use is free to it as well.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ensure_room(needed: int, device: torch.device, what: str) -> None:
    """Raises OutOfMemory before allocating `needed` bytes that `device` cannot hold."""
    free = free_bytes(device)
    if free is not None and needed > free:
        raise OutOfMemory(
            f"out of memory: {what} needs {needed / 1e9:,.2f} GB on {device}, "
            f"{free / 1e9:,.2f} GB are free"
        )


CUDA_GRAPHS = threading.RLock()
"""Held while a model compiled with CUDA graphs runs, and while cached GPU blocks go back
to the driver. CUDA graph trees may record (capture) during any run, and `empty_cache`
during a capture fails an internal assert; two versions of one architecture share one
compiled function, whose graph tree manager is not safe to drive from two lanes at once
(torch serialises neither before 2.14). A replay only queues work, but a run that meets a
new shape compiles and captures under it (seconds to minutes): `release_memory` never
waits for it."""


def release_memory(device: torch.device | None = None, *, collect: bool = True) -> None:
    """Collects garbage (unless told it need not), then returns cached GPU blocks and
    cached pinned host blocks to the driver, if no CUDA-graph run holds `CUDA_GRAPHS`.

    It never waits for that lock: a CUDA-graph version compiles and captures under it (a
    new shape, a warm-up), and the callers (an out-of-memory reply, an unload, an eviction)
    must not wait for a compile. Skipping loses little: emptying the caches only hands
    unused blocks back to the driver, and torch's allocator frees its cached blocks and
    retries by itself before it raises out of memory; the next release empties them. Held
    by this thread (a failure inside its own CUDA-graph run), it empties them as before."""
    if collect:
        gc.collect()
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return
    if not CUDA_GRAPHS.acquire(blocking=False):
        log.debug("cached CUDA memory not released: a CUDA-graph run holds the lock")
        return
    try:
        torch.cuda.empty_cache()
        _empty_host_cache()
    finally:
        CUDA_GRAPHS.release()


def release_host_memory() -> bool:
    """Returns the pinned host blocks torch's host allocator keeps cached (freed, kept for
    reuse) to the driver, unless a CUDA-graph run holds `CUDA_GRAPHS` (never waits for
    it); whether it did. Page-locked memory cannot be swapped, and without this the
    allocator keeps every block it ever handed out (`empty_cache` is device-only)."""
    if not torch.cuda.is_available() or not CUDA_GRAPHS.acquire(blocking=False):
        return False
    try:
        return _empty_host_cache()
    finally:
        CUDA_GRAPHS.release()


def _empty_host_cache() -> bool:
    empty = getattr(torch._C, "_host_emptyCache", None)  # torch 2.1 and later
    if empty is None or not torch.cuda.is_initialized():
        return False
    empty()
    return True


def pinned_host_bytes() -> int | None:
    """Bytes of pinned host memory torch's host allocator holds (in use and cached), if
    known (torch.cuda.host_memory_stats, CUDA in use)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    value = stats().get("allocated_bytes.current")
    return None if value is None else int(value)


def settle_fake_tensor_device_guard() -> None:
    """On a machine without a usable GPU, puts in place the no-op CUDA device guard that
    torch's FakeTensorMode (torch.compile's tracing) would otherwise put in place at its
    first use, on whatever thread that is. With torch 2.11's CUDA wheels on such a
    machine, that call on a thread other than the main one crashed the process (a
    segfault in `_ensureCUDADeviceGuardSet`: on a fresh thread at once, and in half the
    runs of tests/test_compiled.py, where background compiles made it); made once on the
    main thread first, never. Runs when this module is imported (on the main thread)."""
    ensure = getattr(torch._C, "_ensureCUDADeviceGuardSet", None)
    if ensure is not None and not torch.cuda.is_available():
        ensure()


settle_fake_tensor_device_guard()


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def prepare_cuda_graphs_on_this_thread() -> None:
    """Sets up, on the calling thread, the thread-local state CUDA graph trees (torch.compile
    "reduce-overhead", "max-autotune") expect. Before torch set it up lazily itself
    (pytorch#123177), only the thread that imported them had it, and a model compiled and
    run on a lane thread failed on `assert torch._C._is_key_in_tls(...)`. Whether a torch
    release sets it up lazily is not told by its version or by which helpers it has, so
    this looks at the state itself. Cheap when done."""
    from torch._inductor import cudagraph_trees as trees

    if torch._C._is_key_in_tls("tree_manager_containers"):
        return  # this thread has it
    local = trees.local
    initialize = getattr(trees, "_initialize_tls", None)
    if initialize is not None:
        initialize(local)
        return
    local.tree_manager_containers = {}
    local.tree_manager_locks = collections.defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)


_threads = threading.local()


BACKGROUND_NICENESS = 10
"""How much lower than the server's the priority of page-in and compile threads is."""


def lower_priority(niceness: int = BACKGROUND_NICENESS) -> None:
    """Lowers the calling thread's CPU priority (Linux: a thread's own nice value; no
    privilege needed to lower it). Elsewhere it does nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError) as error:
        log.debug("could not lower the priority of %s: %s", threading.current_thread().name, error)


def thread_stream(device: torch.device) -> torch.cuda.Stream:
    """The calling thread's own CUDA stream on `device`, made on first use.

    Preprocessing threads decode and preprocess images on their own streams: on a shared
    default stream, memory one thread just freed could be handed to another while kernels
    still read it (torchvision's GPU decode writes on a stream of its own, too)."""
    streams: dict[torch.device, torch.cuda.Stream] = _threads.__dict__.setdefault("streams", {})
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device)
    return stream


def adopt(tensors: Iterable[torch.Tensor], ready: torch.cuda.Event, device: torch.device) -> None:
    """Hands tensors made on another thread's stream to this thread's current stream: it
    waits for `ready` (recorded after they were made), and the allocator keeps their memory
    until the work this stream queues on them is done (`record_stream`)."""
    stream = torch.cuda.current_stream(device)
    stream.wait_event(ready)
    for tensor in tensors:
        if tensor.is_cuda:
            tensor.record_stream(stream)


_MEASURING: collections.defaultdict[int, threading.Lock] = collections.defaultdict(threading.Lock)
"""One lock per GPU (by index): a warm-up measured there holds it."""


class Workspace:
    """What running a module needs on its device beyond its weights, measured around its
    warm-up (`with Workspace(module, device) as w: ...; w.bytes`). On a GPU: the peak of
    what PyTorch allocated beyond what it held before. On the CPU, which keeps no such
    count, a rough estimate: the largest inputs plus outputs of any one layer (a load
    counts the model's measured activations instead where it knows them). GPU peaks are
    counted per device, not per thread, so the warm-ups on one GPU are measured one at a
    time (other models' batches running meanwhile may still add theirs: the estimate errs
    on the side of more); a compiled version compiles before it is measured (see
    `models.Models._finish_build`), so that wait is not minutes long."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.bytes = 0
        self._module = module
        self._device = device
        self._start = 0
        self._hooks: list[Any] = []

    def __enter__(self) -> Workspace:
        if self._device.type == "cuda":
            self._lock().acquire()
            try:
                torch.cuda.reset_peak_memory_stats(self._device)
                self._start = int(torch.cuda.memory_allocated(self._device))
            except BaseException:
                self._lock().release()
                raise
        else:
            self._hooks = [
                layer.register_forward_hook(self._layer)
                for layer in self._module.modules()
                if not any(True for _ in layer.children())
            ]
        return self

    def _layer(self, layer: nn.Module, inputs: Any, output: Any) -> None:
        self.bytes = max(self.bytes, _tensor_bytes(inputs) + _tensor_bytes(output))

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        if self._device.type == "cuda":
            try:
                peak = int(torch.cuda.max_memory_allocated(self._device))
                self.bytes = max(0, peak - self._start)
            finally:
                self._lock().release()

    def _lock(self) -> threading.Lock:
        """The lock of this GPU's measurements ("cuda" is the current device)."""
        index = self._device.index
        return _MEASURING[torch.cuda.current_device() if index is None else index]


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0
