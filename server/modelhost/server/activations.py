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

import dataclasses
import itertools
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
    convolutional network's activations have no such term), at least `floor` (what its
    smallest row took: a feature map is never smaller than one pixel, a window never
    smaller than its size), with each dimension of a row counted as at least `least`
    (a one-pixel-high image keeps every feature map one pixel high: it costs as one
    `least` pixels high would). Rows add up; several inputs' elements add up."""

    linear: float
    quadratic: float = 0.0
    floor: float = 0.0
    least: tuple[float, ...] = ()  # by dimension of a row (the batch aside)

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

    def estimate(self, shapes: Sequence[Sequence[int]]) -> int:
        """Bytes, estimated, for a batch of inputs of `shapes` (each with the rows first)."""
        rows = shapes[0][0] if shapes and shapes[0] else 1
        return math.ceil(max(rows, 0) * self.row_bytes([shape[1:] for shape in shapes]))

    def row_bytes(self, rows: Sequence[Sequence[int]]) -> float:
        """Bytes, estimated, for one row of each input, of these shapes (no batch)."""
        elements = sum(math.prod(self._counted(row)) for row in rows)
        return max(self.floor, elements * (self.linear + self.quadratic * elements))

    def _counted(self, row: Sequence[int]) -> Sequence[float]:
        if len(row) != len(self.least):
            return row
        return [
            least * math.ceil(size / least) for size, least in zip(row, self.least, strict=True)
        ]

    def scaled(self, factor: float) -> ActivationCost:
        """The cost with every byte times `factor` (measured in float32, run in bfloat16)."""
        return ActivationCost(
            self.linear * factor, self.quadratic * factor, self.floor * factor, self.least
        )

    def elements_within(self, limit: int, row: Sequence[int]) -> int:
        """Most input elements, in rows of shape `row`, whose estimate is within `limit`."""
        return max(1, int(limit / self.row_bytes([row]) * math.prod(row)))

    def describe(self) -> str:
        growth = f" plus {self.quadratic:.3g} x its row's elements" if self.quadratic else ""
        floor = f"; a row at least {self.floor:.0f} bytes" if self.floor else ""
        return f"{self.linear:.0f} bytes per input element{growth}, measured at load{floor}"


def peak_bytes(run: Callable[[], object]) -> int:
    """The most bytes the tensors `run()` made held at once (on this thread)."""
    with LiveTensors() as live:
        run()
    return live.peak


TINY_SIDES = (1, 2, 4, 8, 16, 32, 64)
"""Sizes of a row's open dimensions tried, smallest first, for its least cost (`floor`)."""


def measure(
    peak: Callable[[list[list[int]]], int], shapes: Sequence[Sequence[int]], *, meta: bool = False
) -> ActivationCost | None:
    """The cost of a model whose inputs have `shapes` (-1: open), from `peak(rows)`: the
    peak bytes of one row of zeros of each of `rows` through it (of as many rows as a
    static batch has). A size whose run raises is one the model does not take; None if
    no size ran.

    - The growth is fitted through the two largest sizes that run, of `probe_sides` (on
      the `meta` device, where runs cost no memory, also 2 and 4 times the side: RAFT's
      correlation volume only shows its square growth past 224 pixels; and 8 times a
      video's 37, whose models pool more than 37 frames away).
    - The smallest size that runs, of `TINY_SIDES` and `probe_sides`, gives the `floor`.
    - Thin rows give each open dimension's least size (`_least`).
    """
    runs = _Runs(peak, shapes)
    side, *smaller = probe_sides(shapes[0])
    factors = (8, 4, 2) if len(runs.opened) > 2 else (4, 2)  # a video's side is 37
    larger = [side * f for f in factors] if meta and runs.opened else []
    fits: list[tuple[int, int]] = []
    for size in (*larger, side, *smaller):
        if len(fits) < 2 and (found := runs({}, size)) is not None:
            fits.append(found)
    fitted = ActivationCost.measured(fits)
    if fitted is None or not runs.opened:
        return fitted
    tiny = next((size for size in sorted({*TINY_SIDES, *smaller, side}) if runs({}, size)), 0)
    if not tiny:  # only larger sizes run (a video model): the fit alone
        return fitted
    floor = runs({}, tiny)[1]  # type: ignore[index]  # it ran
    least = _least(runs, fitted, tiny, side) if tiny < side else ()
    return dataclasses.replace(fitted, floor=floor, least=least)


class _Runs:
    """One-row runs of a model's inputs, their open dimensions at given sizes: (elements,
    peak bytes) per row, or None where the model refused them; each size runs once."""

    def __init__(self, peak: Callable[[list[list[int]]], int], shapes: Sequence[Sequence[int]]):
        self.shapes = shapes
        self.opened = [i for i, size in enumerate(shapes[0]) if i and size == -1]
        self._peak = peak
        self._batch = max(1, shapes[0][0] if shapes[0] else 1)  # a static batch runs as is
        self._done: dict[tuple[int, ...], tuple[int, int] | None] = {}

    def rows(self, sizes: dict[int, int], side: int, batch: int = 1) -> list[list[int]]:
        """Each input's shape with dimension i open at `sizes[i]`, or else at `side`."""
        return [
            [batch if i == 0 else sizes.get(i, side) if d == -1 else d for i, d in enumerate(s)]
            for s in self.shapes
        ]

    def __call__(self, sizes: dict[int, int], side: int) -> tuple[int, int] | None:
        rows = self.rows(sizes, side, self._batch)
        key = tuple(size for row in rows for size in row)
        if key not in self._done:
            try:
                elements = sum(math.prod(row[1:]) for row in rows)
                self._done[key] = elements, self._peak(rows) // self._batch
            except Exception as error:
                log.debug("no activations measured at %s: %s", rows, error)
                self._done[key] = None
        return self._done[key]


def _least(runs: _Runs, fitted: ActivationCost, tiny: int, side: int) -> tuple[float, ...]:
    """Each dimension's least size, as thin rows show it: with two or more open, one run
    per open dimension at `tiny` (the others at `side`) gives the size whose rows cost as
    that run did (a one-pixel-high image keeps every map a pixel high); for a video, one
    run per pair of them raises the pair's sizes to what the pair took (T x 1 x 1 keeps
    every map a pixel wide and high, which each alone does not show)."""
    if len(runs.opened) < 2 or any(len(s) != len(runs.shapes[0]) for s in runs.shapes):
        return ()
    least = [1.0] * (len(runs.shapes[0]) - 1)
    for i in runs.opened:
        thin = runs({i: tiny}, side)
        linear = fitted.row_bytes([[thin[0]]]) if thin else 0
        least[i - 1] = max(1.0, tiny * thin[1] / linear) if thin and linear else tiny
    for i, j in itertools.combinations(runs.opened if len(runs.opened) > 2 else (), 2):
        found = runs({i: tiny, j: tiny}, side)
        rows = [row[1:] for row in runs.rows({i: tiny, j: tiny}, side)]
        estimate = dataclasses.replace(fitted, least=tuple(least)).row_bytes(rows)
        if found and estimate and found[1] > estimate:
            grow = math.sqrt(found[1] / estimate)
            least[i - 1], least[j - 1] = least[i - 1] * grow, least[j - 1] * grow
    return tuple(least)


def probe_sides(shape: Sequence[int]) -> tuple[int, ...]:
    """The sizes of its open dimensions (the batch aside) a model with this input shape
    is measured at: two when it has open dimensions (224 and 112; with three or more,
    as many elements as two of 224: a video's 37 frames of 37 x 37), else one (as given)."""
    open_dims = sum(1 for d in shape[1:] if d == -1)
    if not open_dims:
        return (1,)
    side = round(PROBE_SIDE ** (min(2, open_dims) / open_dims))
    return side, side // 2
