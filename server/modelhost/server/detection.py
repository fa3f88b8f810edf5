"""Torchvision detection models: the bounds on their arguments (each makes every Predict
cost more: the image size the model resizes to, boxes kept, classes, keypoints), and the
estimate of what one Predict costs in memory (`detection_cost`, held to
`--max-detection-bytes` before it runs).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from modelhost.server.errors import InvalidArgument

log = logging.getLogger(__name__)

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


def check_detection_args(name: str, args: dict[str, Any]) -> None:
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
