"""The rows check: whether a user's model answers a row differently in a batch than alone
(`x @ x.T`, a normalisation over the batch). Dynamic batching would give such a model's
callers values computed from each other's inputs, so a load turns batching off for it
(`rows_policy`), and for one the check cannot tell about unless the load asks for a
max_batch_size itself."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from modelhost.client.predict import SINGLE_INPUT
from modelhost.server.batching import BatchPolicy, Lane
from modelhost.server.inference import InputSpec, Runner
from modelhost.server.loading import LoadRequest, probe_shape

log = logging.getLogger(__name__)

ROWS_CHECK_SIZE = 32
"""The size a rows check gives each dimension a model's declared input leaves open: small,
so that two rows stay within max_predict_bytes (not the warm-up's row size)."""

ROWS_CHECK_DRAWS = {"normal": "standard normal rows", "uniform": "uniform rows in [0, 1)"}
"""The rows check's draws of float rows, in order: uniform ones for a model that refuses
negative values or answers NaN for them (a square root, a log, a check of pixel values)."""

ROWS_CHECK_TOLERANCE = 0.05
"""How far a row's floating-point outputs may move in a batch, as a share of their
largest finite magnitude alone: batched kernels round differently (TF32, bfloat16)."""


def mixes_rows(
    runner: Runner, lane: Lane, inputs: list[InputSpec], warmup_shape: Sequence[int]
) -> tuple[bool | None, str]:
    """Whether the user's model answers a row differently in a batch of two distinct
    random rows than alone (`x @ x.T`, a normalisation over the batch): dynamic batching
    would give such a model's callers values computed from each other's inputs.

    Returns (True, the rows that showed it); (False, "") when no draw showed a
    difference, none gave random outputs, and at least one compared finite outputs; or
    (None, why) when it cannot tell. It fails closed: `rows_policy` turns batching off
    for None as for True, unless the load asks for a max_batch_size. It cannot tell when
    no draw of rows gives finite outputs the model answers alike twice: the model fails
    on them (it refuses their values, or two rows cost more than max_predict_bytes), its
    outputs are not finite (NaN, inf: they may hide what moved), or they are random
    (sampling, dropout left on: a row alone, run twice, differs, so no difference proves
    anything either way).

    Rows are drawn twice (`ROWS_CHECK_DRAWS`): a draw that shows a difference decides;
    otherwise one that compares finite outputs is enough, so a model that is undefined
    on negative values is still checked, and batched when it passes. They are shaped by
    the declared input, each open dimension `ROWS_CHECK_SIZE`, and failing that by the
    load's `warmup_shape` (whose rows may cost more). Without either, nothing is checked
    and (False, "") is returned, as the README says."""
    shapes: list[list[InputSpec]] = [inputs] if inputs else []
    if warmup_shape and len(inputs) <= 1:
        name = inputs[0].name if inputs else SINGLE_INPUT
        dtype = inputs[0].dtype if inputs else runner.dtype
        warm = [InputSpec(name, dtype, (-1, *warmup_shape[1:]))]
        if not inputs or any(d == -1 for d in inputs[0].shape[1:]):
            shapes.append(warm)
    reasons: list[str] = []
    for specs in shapes:
        mixes, why = _rows_check(runner, lane, specs)
        if mixes is not None:
            return mixes, why
        size = "x".join(map(str, probe_shape(specs[0], 2, ROWS_CHECK_SIZE)))
        reasons.append(f"{size} inputs {why}" if len(shapes) > 1 else why)
    return (None, "; ".join(reasons)) if reasons else (False, "")


def _rows_check(runner: Runner, lane: Lane, specs: list[InputSpec]) -> tuple[bool | None, str]:
    """`mixes_rows` at one shape of rows: each draw's pair run together, and its first
    row alone twice."""
    generator = torch.Generator().manual_seed(0)
    told = random = False
    unknown: dict[str, list[str]] = {}  # why a draw cannot tell: its rows
    for draw, rows in ROWS_CHECK_DRAWS.items():
        pair = {
            given.name if len(specs) > 1 else SINGLE_INPUT: _random_rows(
                probe_shape(given, 2, ROWS_CHECK_SIZE), given.dtype, generator, draw
            )
            for given in specs
        }
        first = {name: tensor[:1] for name, tensor in pair.items()}
        try:
            together = lane.call(runner.run_uncompiled, pair).result()
            alone = lane.call(runner.run_uncompiled, first).result()
            again = lane.call(runner.run_uncompiled, first).result()
        except Exception as error:
            unknown.setdefault(f"it fails: {_briefly(error)}", []).append(rows)
            continue
        if not _same_outputs(again, alone):
            random = True  # sampling, dropout left on: no difference proves anything
            why = "its outputs are random (a row alone twice differs)"
            unknown.setdefault(why, []).append(rows)
            continue
        if together.keys() != alone.keys() or not all(
            tensor.dim() > 0 and _alike(tensor[:1], alone[name])
            for name, tensor in together.items()
        ):
            return True, rows
        if all(_finite(tensor) for tensor in alone.values()):
            told = True
        else:
            unknown.setdefault("its outputs are not finite", []).append(rows)
    if told and not random:
        return False, ""
    return None, "; ".join(f"with {' and '.join(on)}, {why}" for why, on in unknown.items())


def _random_rows(
    shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator, draw: str
) -> torch.Tensor:
    """Rows of `draw` ("normal", "uniform") for a float input; 0 or 1 for any other (ids
    every vocabulary has, booleans)."""
    if not dtype.is_floating_point:
        return torch.randint(0, 2, tuple(shape), generator=generator).to(dtype)
    if draw == "uniform":
        return torch.rand(tuple(shape), generator=generator).to(dtype)
    return torch.randn(tuple(shape), generator=generator).to(dtype)


def _briefly(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 300 else text[:297] + "..."


def _same_outputs(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(_alike(first[n], t) for n, t in second.items())


def _finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def _alike(batched: torch.Tensor, alone: torch.Tensor) -> bool:
    """Whether `batched` answers as `alone`: the same shape; for floating-point outputs
    NaN, +inf and -inf at the same places and the finite values within
    `ROWS_CHECK_TOLERANCE` of the largest finite magnitude alone; any other dtype (ids,
    classes, booleans) equal."""
    if batched.shape != alone.shape or batched.dtype != alone.dtype:
        return False
    if not alone.is_floating_point():
        return torch.equal(batched, alone)
    alone, batched = alone.double(), batched.double()
    for mark in (torch.isnan, torch.isposinf, torch.isneginf):
        if not torch.equal(mark(batched), mark(alone)):
            return False
    finite = torch.isfinite(alone) & torch.isfinite(batched)  # the same places, by now
    if not bool(finite.any()):
        return True
    alone, batched = alone[finite], batched[finite]
    largest = float(alone.abs().max())
    return float((batched - alone).abs().max()) <= ROWS_CHECK_TOLERANCE * largest + 1e-6


def rows_policy(
    found: tuple[bool | None, str], policy: BatchPolicy, request: LoadRequest, name: str
) -> BatchPolicy:
    """The batching a rows check leaves (`mixes_rows`). Rows found independent keep
    `policy`. Rows found to depend on the batch turn batching off (max_batch_size 1),
    even against the load's own max_batch_size: batched, callers would get values
    computed from each other's inputs. A check that cannot tell turns it off too (fails
    closed) unless the load gave batching a max_batch_size itself: that explicit
    max_batch_size is the opt-in for a model whose rows are independent in a way the
    check cannot see (random outputs, values it refuses), and it is kept, with a
    warning."""
    mixes, why = found
    if mixes is False:
        return policy
    if mixes:
        asked = f"; the load's max_batch_size {request.max_batch_size} is not kept"
        log.warning(
            "%s: a row's outputs depend on the other rows of its batch (they differ run "
            "alone, with %s): batching off (max_batch_size 1%s), or callers batched together "
            "would get values computed from each other's inputs",
            name,
            why,
            asked if request.max_batch_size > 1 else "",
        )
    elif request.max_batch_size > 1:
        log.warning(
            "%s: the rows check cannot tell whether a row's outputs depend on the other "
            "rows of its batch: %s. Batched as the load asks (max_batch_size %d): if they "
            "do, callers batched together get values computed from each other's inputs",
            name,
            why,
            request.max_batch_size,
        )
        return policy
    else:
        log.warning(
            "%s: the rows check cannot tell whether a row's outputs depend on the other "
            "rows of its batch: %s. Batching off (max_batch_size 1); if each row's "
            "outputs depend on its own input row only, load it with batching "
            "max_batch_size above 1 to batch it",
            name,
            why,
        )
    return dataclasses.replace(policy, max_batch_size=1, preferred_batch_size=0)
