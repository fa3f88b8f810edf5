"""What a model's forward takes beyond its weights, measured at load: the bound on every
Predict of a model that is not a detection model (`--max-predict-bytes`; detection models
have their own estimate, `detection.py`).

A load runs the model on one row of zeros at two sizes (`probe_sides`) under
`LiveTensors`, which counts the bytes of the tensors its operations make that are alive
at once: a catalog architecture's skeleton on the meta device (no memory, no compute,
the same tensors as a real run), any other model for real on its lane. A request's
estimate grows with its rows, and with each row's elements as the two runs grew
(`ActivationCost`): a convolutional network's activations grow linearly, attention's
scores with the square of a sequence's length. Memory an operation takes and frees
inside its kernel (a convolution's scratch) is not counted.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

log = logging.getLogger(__name__)

PROBE_SIDE = 224
"""The size of a probe's open dimensions (the batch aside), and half of it: two runs show
how the activations grow with a row's size."""


class LiveTensors(TorchDispatchMode):
    """While active on this thread: `peak`, the most bytes that the tensors operations
    made were holding at one time (their storages, each counted once, until freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self._alive: dict[int, weakref.finalize] = {}  # by storage (its C++ object)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._count(value.untyped_storage())
        self.peak = max(self.peak, self.now)
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key not in self._alive:  # a view or an in-place result: counted already
            nbytes = storage.nbytes()
            self.now += nbytes
            self._alive[key] = weakref.finalize(storage, self._freed, key, nbytes)

    def _freed(self, key: int, nbytes: int) -> None:
        self.now -= nbytes
        self._alive.pop(key, None)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for finalizer in self._alive.values():  # outputs still alive: nothing to count now
            finalizer.detach()
        self._alive.clear()


@dataclass(frozen=True)
class ActivationCost:
    """A model's measured forward: a row of `e` elements takes `linear * e + quadratic * e**2`
    bytes (attention's scores grow with the square of a sequence's length; a
    convolutional network's activations have no such term), and rows add up."""

    linear: float
    quadratic: float = 0.0

    @classmethod
    def measured(cls, runs: Sequence[tuple[int, int]]) -> ActivationCost | None:
        """From (elements, peak bytes) of one-row runs: fitted through two of them; from
        one, or when the two show no growth faster than linear, the larger's bytes per
        element (an overhead that does not grow is then counted as if it did)."""
        runs = sorted(run for run in runs if run[0] > 0 and run[1] > 0)
        if not runs:
            return None
        (small, small_bytes), (large, large_bytes) = runs[0], runs[-1]
        if large > small:
            quadratic = (large_bytes / large - small_bytes / small) / (large - small)
            if quadratic > 0:
                linear = max(0.0, small_bytes / small - quadratic * small)
                quadratic = max(quadratic, (large_bytes / large - linear) / large)
                return cls(linear, quadratic)
        return cls(large_bytes / large)

    def estimate(self, shape: Sequence[int]) -> int:
        """Bytes, estimated, for an input of `shape` (its first dimension the rows)."""
        rows = shape[0] if shape else 1
        row = math.prod(shape[1:])
        return math.ceil(max(rows, 0) * row * (self.linear + self.quadratic * row))

    def scaled(self, factor: float) -> ActivationCost:
        """The cost with every byte times `factor` (measured in float32, run in bfloat16)."""
        return ActivationCost(self.linear * factor, self.quadratic * factor)

    def elements_within(self, limit: int, row: int) -> int:
        """Most input elements, in rows of `row` elements, whose estimate is within `limit`."""
        return max(1, int(limit / (self.linear + self.quadratic * row)))

    def describe(self) -> str:
        growth = f" plus {self.quadratic:.3g} x its row's elements" if self.quadratic else ""
        return f"{self.linear:.0f} bytes per input element{growth}, measured at load"


def peak_bytes(run: Callable[[], object]) -> int:
    """The most bytes the tensors `run()` made held at once (on this thread)."""
    with LiveTensors() as live:
        run()
    return live.peak


def measure(peak: Callable[[list[int]], int], shape: Sequence[int]) -> ActivationCost | None:
    """The cost of a model whose input has `shape` (-1: open), from `peak(row)`: the
    peak bytes of one row of zeros of shape `row` through it, at each of `probe_sides`.
    A size whose run raises is taken as one the model does not take; None if none ran."""
    runs = []
    for side in probe_sides(shape):
        row = [1 if i == 0 else side if d == -1 else d for i, d in enumerate(shape)]
        try:
            runs.append((math.prod(row[1:]), peak(row)))
        except Exception as error:
            log.debug("no activations measured at %s: %s", row, error)
    return ActivationCost.measured(runs)


def probe_sides(shape: Sequence[int]) -> tuple[int, ...]:
    """The sizes of its open dimensions (the batch aside) a model with this input shape
    is measured at: two when it has open dimensions (224 and 112; with three or more,
    as many elements as two of 224: a video's 37 frames of 37 x 37), else one (as given)."""
    open_dims = sum(1 for d in shape[1:] if d == -1)
    if not open_dims:
        return (1,)
    side = round(PROBE_SIDE ** (min(2, open_dims) / open_dims))
    return side, side // 2
