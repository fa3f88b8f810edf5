"""The catalog of architectures LoadModel can build.

Three sources, and nothing else: torchvision's model builders by name, the
`modelhost.architectures` entry point group of installed packages, and builders
the operator names in settings (`NAME=MODULE:CALLABLE`). A request only ever
names an architecture; it can never make the server import a module of its choosing.
"""

from __future__ import annotations

import collections
import copy
import difflib
import importlib
import inspect
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from modelhost.server.detection import check_detection_args
from modelhost.server.devices import is_oom
from modelhost.server.errors import InvalidArgument, UnknownArchitecture

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "modelhost.architectures"
# torchvision builder keywords the server sets itself (weights come from checkpoints).
_MANAGED = {"weights", "progress", "weights_backbone"}
_IMAGE = (-1, 3, -1, -1)
Input = tuple[str, tuple[int, ...], torch.dtype]
"""An input a model takes: its name, shape (-1: any size) and dtype."""
_TASK_INPUTS: dict[str, tuple[Input, ...]] = {
    "classification": (("input", _IMAGE, torch.float32),),
    "detection": (("input", _IMAGE, torch.float32),),
    "segmentation": (("input", _IMAGE, torch.float32),),
    "video": (("input", (-1, 3, -1, -1, -1), torch.float32),),
    # RAFT's forward(image1, image2, num_flow_updates=12): two images, by name
    "optical_flow": (("image1", _IMAGE, torch.float32), ("image2", _IMAGE, torch.float32)),
}


@dataclass(frozen=True)
class Parameter:
    """A keyword parameter of a builder, as far as its signature tells."""

    name: str
    required: bool
    default: str  # JSON literal, or "" when required or not expressible
    annotation: str


@dataclass(frozen=True)
class Builder:
    """Something that makes an `nn.Module` from keyword arguments."""

    name: str
    source: str
    task: str
    fn: Callable[..., Any]

    @property
    def inputs(self) -> tuple[Input, ...]:
        """The inputs its builder declares, or its task implies; () when unknown."""
        declared = declared_input(self.fn)
        if declared:
            return (("input", *declared),)
        return _TASK_INPUTS.get(self.task, ())

    def build(self, args: dict[str, Any], device: torch.device | str) -> nn.Module:
        """Calls the builder with its tensors created on `device`.

        On "meta" nothing is allocated (`_Skeleton`): a builder that needs the values of
        tensors it makes (regnet computes its widths with tensors) runs again with the small
        ones real on the CPU, its weights still on the meta device. A torchvision detection
        model's arguments that cost at every Predict are checked first (`_DETECTION_RULES`).
        """
        if self.task == "detection" and self.source == "torchvision":
            check_detection_args(self.name, args)
        kwargs = dict(args)
        if self.source == "torchvision":
            kwargs.setdefault("weights", None)
            if "weights_backbone" in inspect.signature(self.fn).parameters:
                kwargs.setdefault("weights_backbone", None)
        placements: list[Any] = (
            [_Skeleton(small_on_cpu=False), _Skeleton(small_on_cpu=True)]
            if str(device) == "meta"
            else [torch.device(device)]
        )
        for placement in placements:
            try:
                with placement:
                    model = self.fn(**kwargs)
                break
            except _TooManyTensors:
                raise InvalidArgument(
                    f"architecture {self.name!r} with arguments "
                    f"{json.dumps(args, default=str):.200} makes more than "
                    f"{MAX_BUILD_TENSORS} tensors: refused"
                ) from None
            except Exception as error:
                if is_oom(error):
                    raise
                if placement is not placements[-1]:
                    log.debug("%s cannot be built on the meta device (%s)", self.name, error)
                    continue
                raise InvalidArgument(
                    f"architecture {self.name!r} failed to build with arguments "
                    f"{json.dumps(args, default=str)}: {type(error).__name__}: {error}"
                ) from None
        if not isinstance(model, nn.Module):
            raise InvalidArgument(
                f"architecture {self.name!r} returned a {type(model).__name__}, not an nn.Module"
            )
        return model

    def pretrained(self, weights: str) -> tuple[Any, dict[str, Any]]:
        """torchvision weights enum member `weights` and the builder arguments it implies."""
        if self.source != "torchvision":
            raise InvalidArgument(
                f"pretrained weights are only known for torchvision architectures, "
                f"not {self.name!r} ({self.source})"
            )
        import torchvision.models as tvm

        enum = tvm.get_model_weights(self.name)
        try:
            member = enum[weights]
        except KeyError:
            known = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))
            raise InvalidArgument(
                f"{self.name} has no pretrained weights {weights!r}; known: {known}"
            ) from None
        implied: dict[str, Any] = {}
        if "categories" in member.meta:
            implied["num_classes"] = len(member.meta["categories"])
        if self.name in {"googlenet", "inception_v3"}:
            implied.update(transform_input=True, aux_logits=True, init_weights=False)
        if self.name.startswith("vit_"):
            implied["image_size"] = member.meta["min_size"][0]
        return member, implied

    def skeleton(self, args: dict[str, Any]) -> nn.Module:
        """The module built on the meta device: a copy of a cached one when there is one.

        Building a torchvision model on the meta device takes 30+ ms (resnet50); copying
        a cached skeleton takes a third of that, which is what new versions of an
        architecture that is already hosted pay.
        """
        key = (self.name, json.dumps(args, sort_keys=True, default=repr))
        with _SKELETON_LOCK:
            cached = _SKELETONS.get(key)
            if cached is not None:
                _SKELETONS.move_to_end(key)
        if cached is not None:
            return copy.deepcopy(cached)
        module = self.build(args, "meta")
        if _all_meta(module):
            try:
                template = copy.deepcopy(module)
            except Exception:  # not every module can be copied; then there is no cache
                return module
            with _SKELETON_LOCK:
                _SKELETONS[key] = template
                while len(_SKELETONS) > _SKELETON_CACHE_SIZE:
                    _SKELETONS.popitem(last=False)
        return module

    def parameters(self) -> list[Parameter]:
        """The builder's keyword parameters (and its model class's, behind **kwargs)."""
        found: dict[str, Parameter] = {}
        signature = inspect.signature(self.fn)
        for param in signature.parameters.values():
            if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or param.name in _MANAGED:
                continue
            found[param.name] = _describe(param, param.default is param.empty)
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
        model_class = signature.return_annotation
        if takes_kwargs and inspect.isclass(model_class) and issubclass(model_class, nn.Module):
            for param in inspect.signature(model_class.__init__).parameters.values():
                if param.name == "self" or param.default is param.empty:
                    continue  # the builder fills those in itself
                if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                    found.setdefault(param.name, _describe(param, False))
        return list(found.values())


MAX_BUILD_TENSORS = 20_000
"""Tensors a skeleton may make (the largest torchvision models make under 2,000): a few
bytes of arguments (a block count) must not build a million layers."""
SMALL_TENSOR = 4096
"""Elements of a tensor a builder may make for real while its weights go to the meta device."""
_CONSTRUCTORS = frozenset(_device_constructors())
_FROM_DATA = frozenset({torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor})
_RANGES = frozenset({torch.arange, torch.range, torch.linspace, torch.logspace})


class _TooManyTensors(Exception):
    pass


class _Skeleton(TorchFunctionMode):
    """Builds a module without allocating its weights (on this thread only): the tensors
    factory functions make go to the meta device, as under `torch.device("meta")`; with
    `small_on_cpu`, those of at most SMALL_TENSOR elements (and those made from data) stay
    real on the CPU. More than MAX_BUILD_TENSORS refuse the build."""

    def __init__(self, *, small_on_cpu: bool) -> None:
        super().__init__()
        self.small_on_cpu = small_on_cpu
        self.made = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _CONSTRUCTORS:
            self.made += 1
            if self.made > MAX_BUILD_TENSORS:
                raise _TooManyTensors
            small = func in _FROM_DATA or _elements(func, args, kwargs) <= SMALL_TENSOR
            if kwargs.get("device") is None and not (self.small_on_cpu and small):
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _elements(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """The elements a factory call makes, from its size (infinite when it cannot tell;
    a range's largest bound)."""
    if func in _RANGES:
        bounds = [abs(a) for a in (*args, *kwargs.values()) if isinstance(a, (int, float))]
        return max(bounds, default=math.inf)
    size = kwargs.get("size")
    if size is None:
        shapes = [a for a in args if isinstance(a, (tuple, list, torch.Size))]
        size = shapes[0] if shapes else [a for a in args if type(a) is int]
    try:
        return math.prod(int(d) for d in size) if size else math.inf
    except (TypeError, ValueError):
        return math.inf


_SKELETON_CACHE_SIZE = 16
_SKELETONS: collections.OrderedDict[tuple[str, str], nn.Module] = collections.OrderedDict()
_SKELETON_LOCK = threading.Lock()


def _all_meta(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.is_meta for t in tensors)


def _describe(param: inspect.Parameter, required: bool) -> Parameter:
    default = ""
    if not required:
        try:
            default = json.dumps(param.default)
        except (TypeError, ValueError):
            default = ""
    annotation = "" if param.annotation is param.empty else _annotation(param.annotation)
    return Parameter(param.name, required, default, annotation)


def _annotation(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _torchvision_builders() -> Iterable[Builder]:
    try:
        import torchvision.models as tvm
    except ImportError:  # pragma: no cover - torchvision is a server dependency
        return []
    modules = {
        "classification": tvm,
        "detection": tvm.detection,
        "segmentation": tvm.segmentation,
        "video": tvm.video,
        "optical_flow": tvm.optical_flow,
    }
    return [
        Builder(name, "torchvision", task, tvm.get_model_builder(name))
        for task, module in modules.items()
        for name in tvm.list_models(module=module)
    ]


def load_callable(spec: str) -> Callable[..., Any]:
    """Imports `module:callable` (operator configuration only, never request data)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r} is not MODULE:CALLABLE")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{spec!r}: cannot import {module_name} ({error})") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"{spec!r}: {module_name} has no {attr}") from None
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable")
    return target


MAX_INPUT_RANK = 8


def declared_input(fn: Callable[..., Any]) -> tuple[tuple[int, ...], torch.dtype] | None:
    """The one input a builder of your own declares, if it does: `fn.input_shape` (-1
    first, for the batch, then a size or -1 for each dimension) and `fn.input_dtype` (a
    torch dtype or its name; float32 if not given). With it, a model's outputs are known
    at load and its activations are measured (`activations.py`). ValueError if malformed."""
    shape = getattr(fn, "input_shape", None)
    if shape is None:
        return None
    if (
        not isinstance(shape, (tuple, list))
        or not 1 <= len(shape) <= MAX_INPUT_RANK
        or shape[0] != -1
        or not all(type(d) is int and (d == -1 or d > 0) for d in shape)
    ):
        raise ValueError(
            f"input_shape {shape!r:.80}: up to {MAX_INPUT_RANK} dimensions, -1 (the batch) "
            "then a size or -1 for each"
        )
    dtype = getattr(fn, "input_dtype", torch.float32)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"input_dtype {dtype!r:.80} is not a torch dtype")
    return tuple(shape), dtype


def parse_setting(item: str) -> tuple[str, str]:
    """`NAME=MODULE:CALLABLE` -> (name, spec)."""
    name, sep, spec = item.partition("=")
    if not sep or not name.strip() or not spec.strip():
        raise ValueError(f"architecture setting {item!r} is not NAME=MODULE:CALLABLE")
    return name.strip(), spec.strip()


class ArchitectureCatalog:
    """Every buildable architecture, by name; later sources override earlier ones."""

    def __init__(self, configured: Iterable[str] = ()) -> None:
        self._builders: dict[str, Builder] = {b.name: b for b in _torchvision_builders()}
        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                self._add(Builder(point.name, "entry-point", "custom", point.load()))
            except Exception:
                log.exception(
                    "architecture entry point %s (%s) failed to load", point.name, point.value
                )
        for item in configured:
            name, spec = parse_setting(item)
            self._add(Builder(name, "setting", "custom", load_callable(spec)))

    def _add(self, builder: Builder) -> None:
        try:
            declared_input(builder.fn)
        except ValueError as error:
            raise ValueError(f"architecture {builder.name}: {error}") from None
        if builder.name in self._builders:
            log.warning(
                "architecture %s from %s replaces the one from %s",
                builder.name,
                builder.source,
                self._builders[builder.name].source,
            )
        self._builders[builder.name] = builder

    def get(self, name: str) -> Builder:
        """The builder called `name`; UnknownArchitecture if there is none."""
        try:
            return self._builders[name]
        except KeyError:
            by_lower = {known.lower(): known for known in self._builders}
            close = difflib.get_close_matches(name.lower(), by_lower, n=1, cutoff=0.75)
            hint = f"did you mean {by_lower[close[0]]!r}? " if close else ""
            raise UnknownArchitecture(
                f"unknown architecture {name!r}: {hint}see ListArchitectures for the "
                f"{len(self._builders)} that can be built"
            ) from None

    def all(self) -> list[Builder]:
        """Every builder, sorted by name."""
        return [self._builders[name] for name in sorted(self._builders)]


MAX_JSON_DEPTH = 32
"""How deeply JSON from a request may nest (builder arguments, OIP model configs)."""
MAX_JSON_BYTES = 8 << 20
"""The longest JSON text a request may send in one field (an OIP config with 4 MiB of
labels fits): parsed, a text takes tens of times its bytes (red team 9, L4)."""


def load_json(text: str, what: str, hint: str = "") -> Any:
    """Parses JSON a client sent; whatever it is (not JSON, nested too deeply, a number
    too long to convert), a failure is InvalidArgument naming `what`.

    The nesting limit keeps every later repr and json.dumps of the value safe; the
    length limit, the memory and time parsing takes.
    """
    if len(text) > MAX_JSON_BYTES:
        raise InvalidArgument(
            f"{what} is {len(text)} characters of JSON; the most is {MAX_JSON_BYTES}"
        )
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidArgument(f"{what} nests more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as error:  # JSONDecodeError, or an integer over 4300 digits
        raise InvalidArgument(f"{what} is not JSON ({error}){hint}") from None
    level = [value]
    for _ in range(MAX_JSON_DEPTH + 1):  # one more: it finds none below the limit
        nested = [item for item in level if isinstance(item, (dict, list))]
        if not nested:
            return value
        level = [x for item in nested for x in (item.values() if isinstance(item, dict) else item)]
    raise InvalidArgument(f"{what} nests more than {MAX_JSON_DEPTH} levels deep")


def parse_args(raw: dict[str, str]) -> dict[str, Any]:
    """Decodes builder arguments sent as JSON literals."""
    args = {}
    for key, text in raw.items():
        if not key.isidentifier():
            raise InvalidArgument(f"architecture argument {key!r:.80} is not a keyword name")
        if key in _MANAGED:
            raise InvalidArgument(
                f"architecture argument {key!r} is managed by the server: pass pretrained "
                "weights as LoadModel's weights field (the weights come from a checkpoint)"
            )
        args[key] = load_json(
            text,
            f"architecture argument {key:.80}={text!r:.80}",
            hint=" (strings need quotes: '\"value\"')",
        )
    return args
