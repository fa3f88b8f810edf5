"""LoadModel's work: build the architecture, load the weights, move to the device.

The fast path allocates nothing twice: the module is built on the meta device,
the checkpoint is memory-mapped, `load_state_dict(assign=True)` adopts the mapped
tensors as parameters, and `.to(device, dtype)` makes the only copy. Modules that
cannot take that path (non-persistent buffers, missing keys with strict=False, a
builder that needs real tensors) are built on the CPU and loaded by copy.

Exported programs and pickled whole models carry their own graph or class; they
are loaded only when the operator allowed them (`allow_pickled_models`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelhost.server import formats
from modelhost.server.activations import ActivationCost, measure, peak_bytes
from modelhost.server.architectures import ArchitectureCatalog, Builder
from modelhost.server.devices import ensure_room, module_bytes, oom_while, reported
from modelhost.server.errors import (
    CheckpointNotFound,
    InvalidArgument,
    InvalidCheckpoint,
    Refused,
)
from modelhost.server.images import Preprocessing
from modelhost.server.inference import InputSpec, flatten_outputs, sendable
from modelhost.server.names import listing
from modelhost.server.store import CheckpointRecord, CheckpointStore

log = logging.getLogger(__name__)

_GRAPH_FORMATS = {formats.PICKLED_MODEL, formats.EXPORTED_PROGRAM}


ON_DEMAND, PINNED = "on_demand", "pinned"
"""LoadRequest.residency: may leave its device for others (the model cache), or never."""


@dataclass(frozen=True)
class LoadRequest:
    """LoadModel's options, one field per `LoadModelRequest` field (its `batching` fields
    flattened): the server's one declaration of them. `messages.load_request` fills it
    from the message by field name, `models.py` checks it, the code that uses an option
    reads it here. Restore records keep the message itself (`messages.RECORDS`)."""

    name: str
    architecture: str = ""
    architecture_args: dict[str, str] = field(default_factory=dict)
    checkpoint: str = ""
    version: int = 0
    device: str = ""
    dtype: torch.dtype | None = None
    strict: bool = True
    weights: str = ""
    channels_last: bool = False
    preprocessing: Preprocessing | None = None
    labels: tuple[str, ...] = ()
    warmup_shape: tuple[int, ...] = ()
    compile: str = ""
    autocast: torch.dtype | None = None
    residency: str = ON_DEMAND
    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    max_queue_size: int = 0
    preferred_batch_size: int = 0


@dataclass(frozen=True)
class LoadSpec:
    """What to load: validated request fields."""

    name: str
    architecture: str
    args: dict[str, Any]
    checkpoint: str
    device: torch.device
    dtype: torch.dtype | None
    strict: bool = True
    weights: str = ""
    channels_last: bool = False


@dataclass
class LoadedModule:
    """An eval-mode module on its device, and what loading it found."""

    module: nn.Module | None  # None once it left its device (cache.py) or was unloaded
    record: CheckpointRecord | None
    device: torch.device
    dtype: torch.dtype
    parameter_count: int
    device_bytes: int
    inputs: list[InputSpec] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    weights_meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def format(self) -> str:
        return self.record.format if self.record else formats.STATE_DICT


@dataclass
class _Built:
    module: nn.Module
    inputs: list[InputSpec]
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    weights_meta: dict[str, Any] = field(default_factory=dict)
    exported: bool = False


def require_bytes(store: CheckpointStore, record: CheckpointRecord, checkpoint: str) -> None:
    """CheckpointNotFound unless the store still holds the bytes `record` names (those a
    version was loaded from, whatever its checkpoint name holds now)."""
    if not store.has_blob(record.sha256):
        raise CheckpointNotFound(
            f"checkpoint {checkpoint!r} (sha256 {record.sha256}) as it was loaded "
            "is no longer in the store"
        )


def load_module(
    spec: LoadSpec,
    store: CheckpointStore,
    catalog: ArchitectureCatalog,
    *,
    allow_pickled: bool = False,
    loaded_from: CheckpointRecord | None = None,
    make_room: Callable[[int], None] | None = None,
) -> LoadedModule:
    """Builds and loads `spec`; raises InvalidCheckpoint naming keys that do not fit.

    `loaded_from` (a restore, a page-in) loads those bytes of the checkpoint, not what its name
    holds now. `make_room` is told the bytes the weights will take on the device before
    they move there (the model cache evicts others to fit them).
    """
    started = time.perf_counter()
    if loaded_from is not None:
        require_bytes(store, loaded_from, spec.checkpoint)
        record: CheckpointRecord | None = loaded_from
    else:
        record = store.get(spec.checkpoint) if spec.checkpoint else None
    built = reported(
        lambda: _build_on_device(
            spec, record, store, catalog, allow_pickled=allow_pickled, make_room=make_room
        ),
        spec.device,
        oom_while(f"loading {spec.name!r}", spec.device),
    )
    module = built.module
    dtype = _float_dtype(module)
    return LoadedModule(
        module=module,
        record=record,
        device=spec.device,
        dtype=dtype,
        parameter_count=sum(p.numel() for p in module.parameters()),
        device_bytes=module_bytes(module),
        inputs=[
            InputSpec(s.name, dtype if s.dtype.is_floating_point else s.dtype, s.shape)
            for s in built.inputs
        ],
        missing_keys=built.missing,
        unexpected_keys=built.unexpected,
        weights_meta=built.weights_meta,
        seconds=time.perf_counter() - started,
    )


def _build_on_device(
    spec: LoadSpec,
    record: CheckpointRecord | None,
    store: CheckpointStore,
    catalog: ArchitectureCatalog,
    *,
    allow_pickled: bool,
    make_room: Callable[[int], None] | None,
) -> _Built:
    """`spec`'s module with its weights, on its device, in its dtype and memory format,
    in eval mode and without gradients."""
    if record is not None and record.format in _GRAPH_FORMATS:
        built = _load_graph(spec, record, store, allow_pickled)
    else:
        built = _load_weights(spec, record, store, catalog, make_room)
    module = built.module
    if make_room is not None:
        make_room(_nbytes(module, spec.dtype))
    if spec.device.type == "cuda":
        ensure_room(_nbytes(module, spec.dtype), spec.device, f"model {spec.name!r}")
    module.to(device=spec.device, dtype=spec.dtype)
    if spec.channels_last:
        module.to(memory_format=torch.channels_last)
    if not built.exported:  # an exported graph is fixed in the mode it was exported in
        module.eval()
    module.requires_grad_(False)
    if spec.device.type == "cuda":  # its own copies, not the other models' batches
        torch.cuda.current_stream(spec.device).synchronize()
    return built


def planned(
    spec: LoadSpec, record: CheckpointRecord | None, catalog: ArchitectureCatalog
) -> tuple[int, int]:
    """The bytes `spec`'s weights will take on its device, and its parameter count, from
    its architecture's skeleton on the meta device (nothing is read or allocated; an
    unknown architecture or bad arguments raise as a load would). A graph checkpoint,
    which has no skeleton, counts its file size (and parameters unknown: 0)."""
    if record is not None and record.format in _GRAPH_FORMATS:
        return record.size_bytes, 0
    builder, args, _ = _builder(spec, catalog)
    skeleton = builder.skeleton(args)
    return _nbytes(skeleton, spec.dtype), sum(p.numel() for p in skeleton.parameters())


def _builder(spec: LoadSpec, catalog: ArchitectureCatalog) -> tuple[Builder, dict[str, Any], Any]:
    """The architecture's builder, its arguments (with those pretrained weights imply),
    and the pretrained weights' enum member (None without)."""
    if not spec.architecture:
        raise InvalidArgument(
            f"checkpoint {spec.checkpoint!r} holds weights only: name the architecture to build"
        )
    builder = catalog.get(spec.architecture)
    if not spec.weights:
        return builder, dict(spec.args), None
    member, implied = builder.pretrained(spec.weights)
    return builder, {**implied, **spec.args}, member


def _seed(spec: LoadSpec, record: CheckpointRecord | None) -> int:
    """A seed that only the weights and the architecture (with its arguments) decide."""
    source = record.sha256 if record is not None else spec.weights
    key = json.dumps([source, spec.architecture, spec.args], sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


_SEEDED = threading.Lock()  # one seeded build at a time: they share the CPU generator


def _load_weights(
    spec: LoadSpec,
    record: CheckpointRecord | None,
    store: CheckpointStore,
    catalog: ArchitectureCatalog,
    make_room: Callable[[int], None] | None,
) -> _Built:
    builder, args, member = _builder(spec, catalog)
    weights_meta: dict[str, Any] = {}
    if member is not None:
        weights_meta = {"weights": member, **member.meta}
        state = _fetch_pretrained(member.url)
    elif record is not None:
        with store.open_blob(record) as blob:  # a symlink or FIFO there: DATA_LOSS, at once
            state = formats.read_weights(blob, record.format)  # mapped: valid once it closes
    else:
        raise InvalidArgument("LoadModel needs a checkpoint or pretrained weights")
    module = builder.skeleton(args)
    expected = module.state_dict()
    state = formats.strip_wrapper_prefixes(state, expected.keys())
    state, missing, unexpected = _fit(spec, state, expected)
    if _on_meta(module):
        module.load_state_dict(state, strict=spec.strict, assign=True)
    if _on_meta(module):  # something the checkpoint does not hold: build for real
        if make_room is not None:  # the budget first: a load that cannot fit allocates nothing
            make_room(_nbytes(module, spec.dtype))
        ensure_room(_nbytes(module, None), torch.device("cpu"), f"building {spec.architecture}")
        with _SEEDED, torch.random.fork_rng(devices=[]):
            # What the checkpoint lacks is initialised the same way at every load, page-in
            # and restore of these bytes: a version answers the same after each.
            torch.manual_seed(_seed(spec, record))
            module = builder.build(args, "cpu")
        module.load_state_dict(state, strict=spec.strict)
    inputs = [InputSpec(name, dtype, shape) for name, shape, dtype in builder.inputs]
    return _Built(module, inputs, missing, unexpected, weights_meta)


def _fetch_pretrained(url: str) -> dict[str, torch.Tensor]:
    """torchvision's download cache, but loaded with weights_only=True."""
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except OSError as error:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise Refused(
            f"pretrained weights {url} are not in the cache ({cache}) and could not be "
            f"downloaded ({error}): put the file there, or upload the weights as a "
            "checkpoint and load that"
        ) from None
    return state


def _load_graph(
    spec: LoadSpec, record: CheckpointRecord, store: CheckpointStore, allow_pickled: bool
) -> _Built:
    if spec.architecture or spec.args:
        raise InvalidArgument(
            f"checkpoint {spec.checkpoint!r} is a {record.format} and brings its own graph: "
            "leave architecture and its arguments empty"
        )
    if not allow_pickled:
        raise Refused(
            f"checkpoint {spec.checkpoint!r} is a {record.format}, and loading one runs code "
            f"from the file; this server does not allow that. {formats.UNSAFE_ADVICE}"
        )
    with store.open_blob(record) as blob:  # a symlink or FIFO there: DATA_LOSS, at once
        if record.format == formats.PICKLED_MODEL:
            return _Built(formats.load_pickled_model(blob), [])
        program = formats.load_exported_program(blob)
    if spec.device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, spec.device)
    return _Built(program.module(), _exported_inputs(program), exported=True)


def _exported_inputs(program: torch.export.ExportedProgram) -> list[InputSpec]:
    user_inputs = set(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if (
            node.op == "placeholder"
            and node.name in user_inputs
            and isinstance(value, torch.Tensor)
        ):
            shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
            specs.append(InputSpec(node.name, value.dtype, shape))
    return specs


WEIGHT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
"""The dtypes weights are served in: those LoadModel's `dtype` (and `autocast`) may ask
for, and those a checkpoint's weights are served in as they are, when LoadModel asks for
none and they all share one (an all-float16 checkpoint serves in float16)."""


def _fit(
    spec: LoadSpec, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The checkpoint's tensors checked against the skeleton's (InvalidCheckpoint naming
    the keys that do not fit) and made what `load_state_dict(assign=True)` may adopt: in
    the skeleton's dtype where in-process loading (which copies into the skeleton's
    tensors) would cast; its missing and unexpected keys."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    sparse = [key for key in expected if key in state and state[key].layout != torch.strided]
    shared = [key for key in expected if key in state and key not in sparse]
    mismatched = [
        f"{key} (checkpoint {list(state[key].shape)}, model {list(expected[key].shape)})"
        for key in shared
        if state[key].shape != expected[key].shape
    ]
    kinds = [  # a float parameter from integers, booleans or complex numbers
        f"{key} (checkpoint {state[key].dtype}, model {expected[key].dtype})"
        for key in shared
        if expected[key].is_floating_point() != state[key].is_floating_point()
        and (expected[key].is_floating_point() or state[key].is_complex())
    ]
    overlapping = [key for key in shared if _shares_memory(state[key])]
    problems = []
    if sparse:
        problems.append("sparse tensors (save them with .to_dense()): " + listing(sparse))
    if mismatched:
        problems.append("shape mismatch: " + listing(mismatched))
    if kinds:
        problems.append("dtype mismatch: " + listing(kinds))
    if overlapping:
        problems.append(
            "tensors whose elements share memory (expanded views; save them with "
            ".contiguous()): " + listing(overlapping)
        )
    if spec.strict and missing:
        problems.append("missing keys: " + listing(missing))
    if spec.strict and unexpected:
        problems.append("unexpected keys: " + listing(unexpected))
    if problems:
        source = f"checkpoint {spec.checkpoint!r}" if spec.checkpoint else spec.weights
        raise InvalidCheckpoint(
            f"{source} does not fit architecture {spec.architecture!r} "
            f"with arguments {spec.args}: " + "; ".join(problems)
        )
    floats = {state[key].dtype for key in shared if expected[key].is_floating_point()}
    # Weights served as they are: in the dtype asked for (`module.to`), or in the one dtype
    # they share. Several dtypes (a float32 head on float16 layers) or float64 would fail
    # at every Predict or run slowly: as in-process loading, in the skeleton's.
    as_stored = spec.dtype is not None or (len(floats) <= 1 and floats <= WEIGHT_DTYPES)
    fitted = dict(state)
    for key in shared:
        wanted = expected[key].dtype
        if state[key].dtype != wanted and not (as_stored and wanted.is_floating_point):
            fitted[key] = state[key].to(wanted)
    return fitted, missing, unexpected


def _shares_memory(tensor: torch.Tensor) -> bool:
    """Whether a tensor's elements take more bytes than its storage holds: some share
    memory (an expanded view stores a few bytes and takes its full size at every use)."""
    return tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes()


def _nbytes(module: nn.Module, dtype: torch.dtype | None) -> int:
    """Bytes of the module's tensors once floating-point ones are in `dtype`."""
    total = 0
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        size = tensor.element_size()
        if dtype is not None and tensor.is_floating_point():
            size = torch.empty((), dtype=dtype).element_size()
        total += tensor.numel() * size
    return total


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _float_dtype(module: nn.Module) -> torch.dtype:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


PROBE_SIZES = ((1, 224), (2, 256))
"""(batch, spatial size) of the meta-device runs that find a model's outputs."""


@dataclass(frozen=True)
class Probed:
    """What a catalog architecture's skeleton showed on the meta device."""

    outputs: tuple[InputSpec, ...] = ()  # () when it could not tell
    activations: ActivationCost | None = None  # per row, in float32 (`activations.py`)


_PROBED: dict[tuple[str, str, tuple[tuple[int, ...], ...], tuple[str, ...]], Probed] = {}
_PROBE_LOCK = threading.Lock()


def probe_skeleton(
    catalog: ArchitectureCatalog, spec: LoadSpec, inputs: list[InputSpec], dtype: torch.dtype
) -> Probed:
    """The outputs (names, dtypes, shapes with -1 where they follow the input) and the
    activations' cost of a catalog architecture whose inputs are known, found by running
    its skeleton on the meta device (no memory, no compute): the outputs at two batch and
    image sizes (or one, when the model takes one image size only), the cost at the sizes
    `activations.measure` tries. Remembered per architecture and arguments, so new
    versions of a hosted architecture pay nothing. Both in `dtype` where it is a float."""
    if not inputs or not spec.architecture:
        return Probed()
    shapes = tuple(given.shape for given in inputs)
    kinds = tuple(str(_probe_dtype(given)) for given in inputs)
    key = (spec.architecture, json.dumps(spec.args, sort_keys=True, default=repr), shapes, kinds)
    with _PROBE_LOCK:
        found = _PROBED.get(key)
    if found is None:
        found = _probe(catalog, spec, inputs)
        with _PROBE_LOCK:
            _PROBED[key] = found
            if len(_PROBED) > 256:  # arguments come from callers: keep the memory bounded
                del _PROBED[next(iter(_PROBED))]
    activations = found.activations
    if activations is not None and dtype.is_floating_point:
        activations = activations.scaled(dtype.itemsize / 4)  # activations in its dtype
    return Probed(
        tuple(
            dataclasses.replace(out, dtype=dtype) if out.dtype.is_floating_point else out
            for out in found.outputs
        ),
        activations,
    )


def probe_shape(given: InputSpec, batch: int, size: int) -> list[int]:
    """`given`'s shape with `batch` rows and `size` for every other dimension it leaves open."""
    return [batch if i == 0 else size if d == -1 else d for i, d in enumerate(given.shape)]


def call_with(module: Callable[..., Any], inputs: Sequence[InputSpec], tensors: list[Any]) -> Any:
    """`module` on one tensor per input: one positionally, several by name (as Predict)."""
    if len(inputs) == 1:
        return module(tensors[0])
    return module(**{given.name: tensor for given, tensor in zip(inputs, tensors, strict=True)})


def _probe_dtype(given: InputSpec) -> torch.dtype:
    """What an input is probed in: float32 for every float input (the cost is remembered
    in float32 and scaled to the version's dtype), its own dtype otherwise (token ids)."""
    return torch.float32 if given.dtype.is_floating_point else given.dtype


def _probe(catalog: ArchitectureCatalog, spec: LoadSpec, inputs: list[InputSpec]) -> Probed:
    try:
        module = catalog.get(spec.architecture).skeleton(spec.args).eval()
    except Exception as error:
        log.debug("%s: no skeleton to probe (%s)", spec.name, error)
        return Probed()

    def zeros(shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return [
            torch.zeros(tuple(shape), dtype=_probe_dtype(given), device="meta")
            for given, shape in zip(inputs, shapes, strict=True)
        ]

    def run(batch: int, size: int) -> Any:
        return call_with(module, inputs, zeros([probe_shape(g, batch, size) for g in inputs]))

    def peak(rows: list[list[int]]) -> int:  # of what the model makes (not its inputs)
        made = zeros(rows)
        return peak_bytes(lambda: call_with(module, inputs, made))

    shapes = [given.shape for given in inputs]
    with torch.inference_mode():
        return Probed(_outputs(spec, run), measure(peak, shapes, meta=True))


def _outputs(spec: LoadSpec, run: Callable[[int, int], Any]) -> tuple[InputSpec, ...]:
    runs: list[dict[str, torch.Tensor]] = []
    try:
        for batch, size in PROBE_SIZES:
            runs.append(flatten_outputs(run(batch, size)))
    except Exception as error:  # data-dependent ops (detection) have no meta kernels
        log.debug("%s: outputs not found on the meta device (%s)", spec.name, error)
    if not runs:
        return ()
    first = runs[0]
    if not all(sendable(tensor) for tensor in first.values()):
        return ()  # its first run says why, with a status (inference.Runner._collect)
    second = (
        runs[1] if len(runs) > 1 else {k: t.new_empty((0, *t.shape[1:])) for k, t in first.items()}
    )
    if set(first) != set(second) or any(first[k].dim() != second[k].dim() for k in first):
        return ()
    return tuple(
        InputSpec(
            name,
            tensor.dtype,
            tuple(
                a if a == b else -1 for a, b in zip(tensor.shape, second[name].shape, strict=True)
            ),
        )
        for name, tensor in first.items()
    )
