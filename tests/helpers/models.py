"""Architectures the tests register with `--architecture NAME=helpers.models:FN`."""

from __future__ import annotations

import threading
import time
import types
from typing import Any, ClassVar

import torch
from torch import nn


class MemoryHog(nn.Module):
    """Allocates `x[0, 0]` gigabytes per call: a real out-of-memory on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gigabytes = int(x[0, 0].item())
        if gigabytes > 0:
            block = torch.ones(gigabytes << 28, dtype=torch.float32, device=x.device)
            del block
        return x * self.scale


def memory_hog() -> nn.Module:
    return MemoryHog()


def tiny_mlp(features: int = 4, hidden: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class SlowMLP(nn.Sequential):
    """tiny_mlp that sleeps `delay` seconds per call (a busy version)."""

    def __init__(self, features: int, hidden: int, classes: int, delay: float) -> None:
        super().__init__(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.delay)
        return super().forward(x)


def slow_mlp(features: int = 4, hidden: int = 8, classes: int = 3, delay: float = 1.0) -> nn.Module:
    return SlowMLP(features, hidden, classes, delay)


class SlowLoadMLP(nn.Sequential):
    """tiny_mlp whose weights take `seconds` to load (a big checkpoint, paged in); each
    load is recorded in LOADS: (thread name, its nice value, start, end)."""

    def __init__(self, features: int, hidden: int, classes: int, seconds: float) -> None:
        super().__init__(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.seconds = seconds

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        import os
        import threading
        import time

        started = time.monotonic()
        time.sleep(self.seconds)
        niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        LOADS.append((threading.current_thread().name, niceness, started, time.monotonic()))
        super()._load_from_state_dict(*args, **kwargs)


LOADS: list[tuple[str, int, float, float]] = []


class ReloadHog(nn.Sequential):
    """tiny_mlp whose weights cannot be loaded while FAIL is set: the load asks for far
    more memory than there is (a real out-of-memory, as a page-in on a full device)."""

    FAIL: ClassVar[bool] = False

    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        if ReloadHog.FAIL:
            torch.empty(1 << 62, dtype=torch.uint8)
        super()._load_from_state_dict(*args, **kwargs)


def reload_hog(features: int = 4, hidden: int = 8, classes: int = 3) -> nn.Module:
    return ReloadHog(features, hidden, classes)


def slow_load_mlp(
    features: int = 4, hidden: int = 8, classes: int = 3, seconds: float = 0.3
) -> nn.Module:
    return SlowLoadMLP(features, hidden, classes, seconds)


def broken(**kwargs: object) -> nn.Module:
    raise ValueError("this builder always fails (a test of builder errors)")


class Recorder(nn.Module):
    """Doubles its input; records the first column of every batch it runs (its request ids).

    Sleeps `delay` seconds per call plus `row_delay` per row past `free_rows`, and fails
    on negative ids when `picky`.
    """

    calls: ClassVar[list[list[float]]] = []

    def __init__(
        self, delay: float = 0.0, picky: bool = False, row_delay: float = 0.0, free_rows: int = 0
    ) -> None:
        super().__init__()
        self.delay = delay
        self.row_delay = row_delay
        self.free_rows = free_rows
        self.picky = picky
        self.scale = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        Recorder.calls.append(x[:, 0].tolist())
        delay = self.delay + self.row_delay * max(0, x.shape[0] - self.free_rows)
        if delay:
            time.sleep(delay)
        if self.picky and bool((x[:, 0] < 0).any()):
            raise ValueError("negative ids are refused")
        return x * self.scale


def recorder(
    delay: float = 0.0, picky: bool = False, row_delay: float = 0.0, free_rows: int = 0
) -> nn.Module:
    return Recorder(delay=delay, picky=picky, row_delay=row_delay, free_rows=free_rows)


def slow_builder(seconds: float = 1.0) -> nn.Module:
    """Takes `seconds` to build (a stand-in for a big checkpoint)."""
    import time

    time.sleep(seconds)
    return Recorder()


class Echo(nn.Module):
    """Answers its input as it received it (a copy): what the server handed the model."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("marker", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def echo() -> nn.Module:
    return Echo()


class DeviceFailure(nn.Module):
    """Fails the way a device-side assert does (the error CUDA reports at the next sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("marker", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: device-side assert triggered")


def device_failure() -> nn.Module:
    return DeviceFailure()


class LaunchRefused(DeviceFailure):
    """Fails the way a kernel launch an input's shape made invalid does (not sticky)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: invalid configuration argument")


def launch_refused() -> nn.Module:
    return LaunchRefused()


THREADS_SEEN: list[str] = []
"""The threads `ThreadNamer` versions ran on, in order (in-process servers only)."""


class ThreadNamer(nn.Module):
    """Multiplies its input by `scale`; records the name of the thread each call runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import threading

        THREADS_SEEN.append(threading.current_thread().name)
        return x * self.scale


def thread_namer() -> nn.Module:
    return ThreadNamer()


TRACE_SECONDS = 0.0
"""How long each trace of a CompileMarker's forward takes on top (a slow compile)."""
TRACING = threading.Event()
"""Set when a CompileMarker's forward is being traced."""
TRACES: list[str] = []
"""The thread of each trace of a CompileMarker's forward (a graph compiled), in order."""


@torch._dynamo.assume_constant_result
def _traced() -> bool:
    """True while TorchDynamo traces the calling thread's code (a constant of the compiled
    graph), False when run uncompiled; unlike `torch.compiler.is_compiling()`, which says
    whether any thread is compiling."""
    from torch._guards import TracingContext

    tracing = TracingContext.try_get() is not None
    if tracing:
        TRACES.append(threading.current_thread().name)
        TRACING.set()
        time.sleep(TRACE_SECONDS)
    return tracing


class CompileMarker(nn.Module):
    """Multiplies its input by `scale`; its output "compiled" is 1 per row when the call ran
    as code TorchDynamo compiled, 0 when it ran uncompiled."""

    def __init__(self, padding: int = 0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.padding = nn.Parameter(torch.zeros(padding))  # to take room in a budget

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        compiled = 1.0 if _traced() else 0.0
        return {"y": x * self.scale, "compiled": x.new_full((x.shape[0],), compiled)}


_MARKERS: dict[int, type[CompileMarker]] = {}


def compile_marker(padding: int = 0, variant: int = 0) -> nn.Module:
    """A CompileMarker whose forward has a code object of its own per `variant`: TorchDynamo
    keeps what it compiled (and which dimensions it found dynamic) per code object, shared
    by every instance, so tests that use distinct variants do not see each other's."""
    if variant not in _MARKERS:
        forward = CompileMarker.forward
        code = forward.__code__.replace(co_name=f"forward_{variant}")
        own = types.FunctionType(code, forward.__globals__, code.co_name)
        _MARKERS[variant] = type(f"CompileMarker{variant}", (CompileMarker,), {"forward": own})
    return _MARKERS[variant](padding)


class NamedOutputs(nn.Module):
    """Answers `x * scale` under names that are also keyword names of `np.savez`."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"file": x * self.scale, "allow_pickle": x * self.scale * 2}


def named_outputs() -> nn.Module:
    return NamedOutputs()


class Attention(nn.Module):
    """Self-attention over token ids written out: its scores grow with the square of the
    sequence's length, as a transformer's do."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, width)
        self.query = nn.Linear(width, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        q = self.query(x)
        scores = torch.softmax(q @ q.transpose(1, 2), dim=-1)
        return (scores @ x).mean(dim=1)


def attention(width: int = 64) -> nn.Module:
    """A builder that declares its input: token ids of any number and length."""
    return Attention(width)


attention.input_shape = (-1, -1)  # type: ignore[attr-defined]
attention.input_dtype = "int64"  # type: ignore[attr-defined]


class SlowEmbedding(nn.Module):
    """One row of `width` numbers per token id, `delay` seconds per call: its declared
    input is a vector whose one dimension is rows."""

    def __init__(self, ids: int, width: int, delay: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(ids, width)
        self.delay = delay

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.delay)
        return self.embed(ids)


def slow_embedding(ids: int = 16, width: int = 4, delay: float = 0.3) -> nn.Module:
    return SlowEmbedding(ids, width, delay)


slow_embedding.input_shape = (-1,)  # type: ignore[attr-defined]
slow_embedding.input_dtype = "int64"  # type: ignore[attr-defined]


def badly_declared() -> nn.Module:
    return Attention()


badly_declared.input_shape = (3, -1)  # type: ignore[attr-defined]  # no batch dimension


class Blend(nn.Module):
    """Two inputs by name, an optional one (`mask=None`) and settings (`times=3`, and
    `limit: int | None = None`), as RAFT's `forward(image1, image2, num_flow_updates=12)`:
    a model that declares no inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 0.5))

    def forward(
        self,
        image: torch.Tensor,
        other: torch.Tensor,
        mask: torch.Tensor | None = None,
        times: int = 3,
        limit: int | None = None,
    ) -> torch.Tensor:
        out = (image + other) * self.scale
        if mask is not None:
            out = out * mask
        for _ in range(times if limit is None else min(times, limit)):
            out = out + 1
        return out


def blend() -> nn.Module:
    return Blend()


class FixedSize(nn.Module):
    """Takes 48 x 48 images only (as a ViT built for another image_size takes one size):
    none of the sizes a load measures activations at."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 48 * 48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (48, 48):
            raise ValueError(f"takes 48 x 48 images only, not {tuple(x.shape[-2:])}")
        return self.fc(x.flatten(1))


def fixed_size() -> nn.Module:
    return FixedSize()


fixed_size.input_shape = (-1, 3, -1, -1)  # type: ignore[attr-defined]


class ComplexOut(nn.Module):
    """Returns its input as complex numbers: a dtype no reply can carry."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).to(torch.complex64)


def complex_out() -> nn.Module:
    return ComplexOut()


class Gram(nn.Module):
    """`x @ x.T`: every output row holds the dot products of its row with all the rows of
    its batch (a similarity head); the rows are not independent."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ x.T) * self.scale


def gram() -> nn.Module:
    return Gram()


gram.input_shape = (-1, 2)  # type: ignore[attr-defined]


class Centered(nn.Module):
    """`x - x.mean(0)`: a normalisation over the batch; declares no inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0, keepdim=True)) * self.scale


def centered() -> nn.Module:
    return Centered()


class Sampler(nn.Module):
    """`x * scale + noise`, noise drawn for each row (a VAE's sampling): its rows are
    independent, yet no two runs answer alike."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + torch.randn_like(x)


def sampler() -> nn.Module:
    return Sampler()


sampler.input_shape = (-1, 2)  # type: ignore[attr-defined]


class Domain(nn.Module):
    """`f(x)` per value, minus its mean over the batch when `mixes` (rows that depend on
    the batch). For values below `floor`, `f` answers NaN ("nan": `sqrt(x - floor)`, as
    a log or a square root of pixel values do) or refuses them ("raise", as a model
    that checks its inputs); with "" it is `x`, defined everywhere. Its input is
    declared `[-1, -1]`; with `width` it takes rows of `width` values only."""

    def __init__(self, mixes: bool, negatives: str, width: int, floor: float) -> None:
        super().__init__()
        self.mixes = mixes
        self.negatives = negatives
        self.width = width
        self.floor = floor
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width and x.shape[1] != self.width:
            raise ValueError(f"takes rows of {self.width} values only, not {x.shape[1]}")
        if self.negatives == "raise" and bool((x < self.floor).any()):
            raise ValueError(f"inputs must be at least {self.floor}")
        y = (x - self.floor).sqrt() if self.negatives == "nan" else x
        if self.mixes:
            y = y - y.mean(0, keepdim=True)
        return y * self.scale


def domain(
    mixes: bool = True, negatives: str = "nan", width: int = 0, floor: float = 0.0
) -> nn.Module:
    return Domain(mixes, negatives, width, floor)


domain.input_shape = (-1, -1)  # type: ignore[attr-defined]
