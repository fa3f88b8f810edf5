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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from modelhost.server.devices import is_oom
from modelhost.server.errors import InvalidArgument, UnknownArchitecture

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "modelhost.architectures"
# torchvision builder keywords the server sets itself (weights come from checkpoints).
_MANAGED = {"weights", "progress", "weights_backbone"}
_IMAGE = (-1, 3, -1, -1)
_TASK_INPUTS: dict[str, tuple[int, ...] | None] = {
    "classification": _IMAGE,
    "detection": _IMAGE,
    "segmentation": _IMAGE,
    "video": (-1, 3, -1, -1, -1),
    "optical_flow": None,
    "custom": None,
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
    def input_shape(self) -> tuple[int, ...] | None:
        """The input shape the task implies (-1: any size), when it implies one."""
        return _TASK_INPUTS.get(self.task)

    def build(self, args: dict[str, Any], device: torch.device | str) -> nn.Module:
        """Calls the builder with its tensors created on `device`.

        On "meta" nothing is allocated (`_Skeleton`): a builder that needs the values of
        tensors it makes (regnet computes its widths with tensors) runs again with the small
        ones real on the CPU, its weights still on the meta device. A torchvision detection
        model's arguments that cost at every Predict are checked first (`_DETECTION_RULES`).
        """
        if self.task == "detection" and self.source == "torchvision":
            _check_detection_args(self.name, args)
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


MAX_IMAGE_SIDE = 2048
"""Most pixels a side of the images a detection model resizes its inputs to, inside its
forward (`min_size`, `max_size`, `fixed_size`): torchvision's defaults are 800 x 1333 at
most. A Predict's memory grows as its square: at 3500, a 12 KB Predict took 2.3 GB."""
MAX_DETECTIONS = 10_000
"""Most boxes a detection model may propose or keep per image (torchvision's defaults are
1,000 at most)."""
MAX_SIZE_DIVISIBLE = 128
"""Most pixels a detection model may pad its images' sides to a multiple of (torchvision
uses 32; the coarsest FPN level has a stride of 128)."""
MAX_CLASSES = 1_500
"""Most classes a detection model may score (`num_classes`, background included): LVIS's
1,203 fit with room, COCO's 91, Objects365's 365 and Open Images' 600 with plenty. Two-stage
models score and decode proposals x classes boxes and, on the CPU, run NMS once per class
over all of them: 43 s for one 64 x 64 image at 6,000 classes, 0.6 s at 91 (red team round
6, M2); their memory is in the estimate (`DetectionCost`)."""
MAX_KEYPOINTS = 512
"""Most keypoints Keypoint R-CNN may predict (`num_keypoints`): COCO has 17, COCO-WholeBody
133, DeepFashion2 294. Each is a 56 x 56 heatmap per detection, upsampled to the box's size."""


@dataclass(frozen=True)
class _Rule:
    """What an argument a detection model uses at every Predict (not to build layers) may
    be: `length` numbers in a list (0: one number; -1: one, or a non-empty list of them),
    whole from 1 to `most`, or any finite numbers when `most` is None."""

    why: str
    most: int | None = None
    length: int = 0

    def allows(self, value: Any) -> bool:
        if isinstance(value, list):
            fits = len(value) == self.length if self.length > 0 else self.length < 0 and bool(value)
        else:
            fits, value = self.length <= 0, [value]
        return fits and all(self._number(v) for v in value)

    def _number(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.most is None:
            return math.isfinite(value)
        return isinstance(value, int) and 1 <= value <= self.most

    def describe(self) -> str:
        number = "a finite number" if self.most is None else f"a whole number from 1 to {self.most}"
        if self.length > 0:
            return f"a list of {self.length} numbers, each {number}"
        return number + (", or a list of them" if self.length < 0 else "")


_RESIZES = "resizes every image to it inside the model: a Predict's memory grows as its square"
_KEEPS = "proposes or keeps this many boxes per image at every Predict"
_NORMALIZES = "normalizes the 3 color channels of every image with it"
_SCORES = "scores every proposal or anchor for each class at every Predict"
_DETECTION_RULES = {
    "min_size": _Rule(_RESIZES, MAX_IMAGE_SIDE, length=-1),
    "max_size": _Rule(_RESIZES, MAX_IMAGE_SIDE),
    "fixed_size": _Rule(_RESIZES, MAX_IMAGE_SIDE, length=2),
    "size_divisible": _Rule("pads every image to a multiple of it", MAX_SIZE_DIVISIBLE),
    "rpn_pre_nms_top_n_test": _Rule(_KEEPS, MAX_DETECTIONS),
    "rpn_post_nms_top_n_test": _Rule(_KEEPS, MAX_DETECTIONS),
    "box_detections_per_img": _Rule(_KEEPS, MAX_DETECTIONS),
    "detections_per_img": _Rule(_KEEPS, MAX_DETECTIONS),
    "topk_candidates": _Rule(_KEEPS, MAX_DETECTIONS),
    "num_classes": _Rule(_SCORES, MAX_CLASSES),
    "num_keypoints": _Rule("makes a heatmap of each keypoint for every detection", MAX_KEYPOINTS),
    "image_mean": _Rule(_NORMALIZES, length=3),
    "image_std": _Rule(_NORMALIZES, length=3),
}
"""torchvision detection arguments the model uses at every Predict: a build would take
any value, and the first Predict (the load's own output probe) would pay for it."""


def _check_detection_args(name: str, args: dict[str, Any]) -> None:
    """InvalidArgument for the first argument (in `_DETECTION_RULES` order) out of bounds."""
    for key, rule in _DETECTION_RULES.items():
        if key in args and not rule.allows(args[key]):
            raise InvalidArgument(
                f"architecture argument {key}={json.dumps(args[key], default=str):.80} is "
                f"refused: it must be {rule.describe()} ({name} {rule.why})"
            )


PIXEL_BYTES = 512
"""Bytes a detection model's forward takes per pixel of an image as it resizes and pads it
(backbone, feature pyramid, proposals): about 420 for ResNet-50 FPN on the CPU."""
CLASS_PIXEL_BYTES = 6
"""More bytes per pixel and class for a one-stage model, which scores every class at every
anchor (RetinaNet: about 5)."""
PROPOSAL_BYTES = 256 << 10
"""Bytes per region proposal a two-stage model's box head scores (the v2 head: 210 KB)."""
CLASS_PROPOSAL_BYTES = 128
"""More bytes per proposal and class of a two-stage model: its box predictor's scores and
per-class boxes, decoded, clipped and filtered with their labels (measured: 89-112)."""
MASK_BYTES = 3 << 20
"""Bytes per detection of Mask R-CNN's mask head (about 2.6 MB), besides its mask logits
(one map per class, counted from the model) and its pasted mask."""
KEYPOINT_BYTES = 2 << 20
"""Bytes per detection of Keypoint R-CNN's keypoint head (about 1.5 MB), besides its
heatmaps (one per keypoint, counted from the model)."""


@dataclass(frozen=True)
class DetectionCost:
    """The memory a torchvision detection model's forward takes per image, estimated from
    its settings: the image as the model resizes and pads it, its proposals (scored for
    each class), the mask or keypoint head per detection (with its per-class mask logits
    or per-keypoint heatmaps, read from the model's layers), a keypoint model's heatmaps
    upsampled to a box's size (one box at a time: at most the image's), and a mask model's
    masks, pasted at the input's size in float32 (twice: one by one, then stacked). The
    constants are the peak memory of CPU forwards, rounded up (red team round 4, M1;
    round 6, M2)."""

    min_size: int
    max_size: int
    fixed_size: tuple[int, int] | None  # (width, height)
    size_divisible: int
    dense_classes: int  # classes a one-stage model scores at every anchor (two-stage: 0)
    proposals: int
    detections: int
    head_bytes: int  # per detection
    masks: bool
    box_classes: int = 0  # classes a two-stage model scores every proposal for
    keypoints: int = 0  # keypoints a keypoint model upsamples to a box's size

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """An image's size once the model has resized and padded it (as torchvision does)."""
        if self.fixed_size is not None:
            width, height = self.fixed_size
        elif height and width:
            scale = min(self.min_size / min(height, width), self.max_size / max(height, width))
            height, width = math.floor(height * scale), math.floor(width * scale)
        step = self.size_divisible
        return -(-height // step) * step, -(-width // step) * step

    def estimate(self, shape: Sequence[int]) -> int:
        """Bytes, estimated, for a batch of images of `shape` (N, C, H, W); 0 for other shapes."""
        if len(shape) != 4:
            return 0
        rows, _, height, width = shape
        resized = math.prod(self.resized(height, width))
        pixel = PIXEL_BYTES + CLASS_PIXEL_BYTES * self.dense_classes
        pasted = 8 * height * width if self.masks else 0
        proposal = PROPOSAL_BYTES + CLASS_PROPOSAL_BYTES * self.box_classes
        heads = self.proposals * proposal + self.detections * (self.head_bytes + pasted)
        return rows * (resized * (pixel + 4 * self.keypoints) + heads)

    def describe(self, shape: Sequence[int]) -> str:
        """What the estimate for `shape` counts, in words."""
        rows, _, height, width = shape
        resized = "x".join(map(str, self.resized(height, width)))
        proposals = f"{self.proposals} proposals and " if self.proposals else ""
        kind = "masks" if self.masks else "keypoint detections" if self.keypoints else ""
        classes = self.box_classes or self.dense_classes
        counts = f" of {classes} classes" if classes else ""
        counts += f", {self.keypoints} keypoints each" if self.keypoints else ""
        return (
            f"{rows} image{'s' * (rows != 1)} of {height}x{width} (each resized to {resized}, "
            f"{proposals}up to {self.detections} {kind or 'detections'}{counts})"
        )


def detection_cost(module: nn.Module) -> DetectionCost | None:
    """The cost model of a torchvision detection model, however it was built (None for
    other modules, and for one whose parts are not torchvision's)."""
    try:
        from torchvision.models.detection.fcos import FCOS
        from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
        from torchvision.models.detection.retinanet import RetinaNet
        from torchvision.models.detection.ssd import SSD
    except ImportError:  # pragma: no cover - torchvision is a server dependency
        return None
    if not isinstance(module, (GeneralizedRCNN, RetinaNet, FCOS, SSD)):
        return None
    try:
        transform = module.transform
        fixed = transform.fixed_size
        box_classes = keypoints = 0
        if isinstance(module, GeneralizedRCNN):
            heads = module.roi_heads
            masks = bool(heads.has_mask())
            dense_classes, proposals = 0, int(module.rpn._post_nms_top_n["testing"])
            detections = int(heads.detections_per_img)
            box_classes = int(heads.box_predictor.cls_score.out_features)
            head_bytes = 0
            if masks:  # logits [detections, classes, 28, 28], and their sigmoid
                logits = heads.mask_predictor.mask_fcn_logits
                area = _area(heads.mask_roi_pool) * _area(heads.mask_predictor.conv5_mask)
                head_bytes = MASK_BYTES + 8 * int(logits.out_channels) * area
            elif heads.has_keypoint():  # heatmaps [detections, keypoints, 28, 28], then 56 x 56
                scores = heads.keypoint_predictor.kps_score_lowres
                keypoints = int(scores.out_channels)
                low = _area(heads.keypoint_roi_pool) * _area(scores)
                high = low * int(heads.keypoint_predictor.up_scale) ** 2
                head_bytes = KEYPOINT_BYTES + 4 * keypoints * (low + high)
        else:
            scores = module.head.classification_head
            dense_classes = int(getattr(scores, "num_classes", None) or scores.num_columns)  # SSD
            proposals, detections = 0, int(module.detections_per_img)
            head_bytes, masks = 0, False
        return DetectionCost(
            min_size=int(transform.min_size[-1]),  # what eval mode resizes to
            max_size=int(transform.max_size),
            fixed_size=(int(fixed[0]), int(fixed[1])) if fixed else None,
            size_divisible=int(transform.size_divisible),
            dense_classes=dense_classes,
            proposals=proposals,
            detections=detections,
            head_bytes=head_bytes,
            masks=masks,
            box_classes=box_classes,
            keypoints=keypoints,
        )
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        log.warning("%s: not torchvision's parts: no cost estimate", type(module).__name__)
        return None


def _area(layer: nn.Module) -> int:
    """Cells of a RoI pool's output (`output_size`), or the factor by which a transposed
    convolution multiplies its input's (`stride`)."""
    size: Any = getattr(layer, "output_size", None) or layer.stride
    return int(size) ** 2 if isinstance(size, int) else int(size[0]) * int(size[1])


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


def load_json(text: str, what: str, hint: str = "") -> Any:
    """Parses JSON a client sent; whatever it is (not JSON, nested too deeply, a number
    too long to convert), a failure is InvalidArgument naming `what`.

    The nesting limit keeps every later repr and json.dumps of the value safe.
    """
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
