"""Stage 1 network: a two-class Mask R-CNN (background, white cell) trained from scratch, and its data.

What lives here:

* ``build_detector`` / ``save_detector`` / ``load_detector``: torchvision Mask R-CNN with a ResNet-FPN
  backbone (256-channel P2-P5 + pool), never with pretrained weights. Checkpoints are loaded with
  ``torch.load(weights_only=True)`` only, so a pickled payload is refused before anything runs.
* Training data: VOC and COCO readers, and ``pseudo_instances``, a classical label-free stain
  segmentation that turns unlabelled single-cell images into training masks.
* ``train_detector``: seeded training with augmentation aimed at other labs (stain, hue, blur, scale).
* ``detect``: batched inference that also returns, per cell, the mask-branch RoIAlign output
  (256x14x14 on the final box), the instance feature AE-CFE learns from.
* ``select_central`` and ``crop_cell``: the single-cell conventions of the paper.

Input colours are white-balanced (the empty-slide background becomes neutral grey) before the network sees
them, in training and detection alike: a yellow or pink lamp is the largest and least informative
difference between laboratories.
"""

from __future__ import annotations

import math
import pickle
import xml.etree.ElementTree as ElementTree
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from .errors import StageError, UserError
from .images import UnreadableImage, load_rgb
from .io import atomic_path, read_json

BACKBONES = ("resnet18_fpn", "resnet34_fpn", "resnet50_fpn", "resnet101_fpn")
CHECKPOINT_FORMAT = "aecfe-detector/1"
NUM_CLASSES = 2  # background, white cell
FEATURE_SHAPE = (256, 14, 14)
NORMS = ("group", "batch")

# Defaults sized for a few cells per image: torchvision's (1000-2000 proposals, 512 sampled RoIs) are
# sized for 80-class street scenes and would make the box and mask heads the bulk of CPU time.
DEFAULT_HEAD_ARGS = {
    "rpn_pre_nms_top_n_train": 600,
    "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 64,
    # At most 8 positive RoIs per image reach the mask head in training (64 x 0.125): with one or two
    # cells per image more positives are near-duplicates that cost mask-head time and teach little.
    "box_positive_fraction": 0.125,
    "box_detections_per_img": 50,
}
# Constructor arguments build_detector accepts and records (besides backbone, sizes and score threshold).
BUILD_ARGS = ("norm", "white_balance", *DEFAULT_HEAD_ARGS, "box_nms_thresh", "rpn_nms_thresh")

DETECT_BATCH = 4  # images per forward pass in detect(): amortises Python overhead, bounds memory
SCALE_JITTER = (0.6, 2.5)  # training zoom relative to the detection scale; wide because labs' optics differ
MAX_PIXELS_IN_MEMORY = 2_000_000  # training images are kept decoded at most this large (pixels)


# ---------------------------------------------------------------------------------------------------
# Building, saving and loading


def build_detector(
    backbone: str = "resnet18_fpn",
    min_size: int = 256,
    max_size: int = 256,
    box_score_thresh: float = 0.5,
    **kw,
):
    """A 2-class torchvision Mask R-CNN with random weights; every layer trainable.

    ``kw`` may set ``norm`` ("group", default, or "batch"), ``white_balance`` (default True) and the
    torchvision head arguments in ``DEFAULT_HEAD_ARGS`` / ``box_nms_thresh`` / ``rpn_nms_thresh``.

    Normalisation: GroupNorm(32) in the ResNet by default. Training from scratch here means batches of
    2-8 small images, where BatchNorm statistics are noisy and differ between training (batch
    statistics) and detection (running averages of the training lab). GroupNorm normalises each image by
    itself, identically in both modes and independent of batch size (Wu & He 2018; He et al. 2019
    train detectors from scratch this way), which also absorbs part of a new lab's contrast shift.
    ``norm="batch"`` (trainable BatchNorm, running statistics at eval) exists to load torchvision
    state dicts, whose ResNets carry BatchNorm buffers. The FPN and heads are torchvision's standard
    ones (no normalisation), so state dicts of torchvision's own Mask R-CNN fit.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    if backbone not in BACKBONES:
        raise UserError(f"unknown detector backbone '{backbone}': choose one of {', '.join(BACKBONES)}")
    unknown = sorted(set(kw) - set(BUILD_ARGS))
    if unknown:
        raise TypeError(f"build_detector got unknown arguments {unknown}; known: {list(BUILD_ARGS)}")
    norm = kw.pop("norm", "group")
    if norm not in NORMS:
        raise UserError(f"unknown detector norm '{norm}': choose one of {', '.join(NORMS)}")
    white_balance = bool(kw.pop("white_balance", True))
    if not (32 <= min_size <= max_size):
        raise UserError(f"detector input size must satisfy 32 <= min_size <= max_size, got {min_size}, {max_size}")
    head_args = {**DEFAULT_HEAD_ARGS, **kw}
    norm_layer = _group_norm if norm == "group" else nn.BatchNorm2d
    body = resnet_fpn_backbone(
        backbone_name=backbone.removesuffix("_fpn"), weights=None, norm_layer=norm_layer, trainable_layers=5
    )
    model = MaskRCNN(
        body,
        num_classes=NUM_CLASSES,
        min_size=min_size,
        max_size=max_size,
        box_score_thresh=box_score_thresh,
        **head_args,
    )
    _init_for_scratch_training(model)
    model.aecfe_args = {
        "backbone": backbone,
        "min_size": int(min_size),
        "max_size": int(max_size),
        "box_score_thresh": float(box_score_thresh),
        "norm": norm,
        "white_balance": white_balance,
        **head_args,
    }
    return model


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


def _init_for_scratch_training(model) -> None:
    """Two initialisations that keep the first steps from random weights stable.

    * The last norm of every residual branch starts at zero, so each block starts as the identity and
      activations do not grow with depth (Goyal et al. 2017, "zero-gamma").
    * The mask logits start near zero (loss ln 2): torchvision's He initialisation gives logits with a
      standard deviation near 10 on unnormalised FPN features, a mask loss near 9, and an early blow-up.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for block in model.backbone.body.modules():
        last_norm = block.bn3 if isinstance(block, Bottleneck) else block.bn2 if isinstance(block, BasicBlock) else None
        if last_norm is not None and last_norm.weight is not None:
            nn.init.zeros_(last_norm.weight)
    logits = model.roi_heads.mask_predictor.mask_fcn_logits
    nn.init.normal_(logits.weight, std=0.001)
    nn.init.zeros_(logits.bias)


def detector_args(model) -> dict:
    """The constructor arguments to rebuild ``model`` (stored in checkpoints and config.json)."""
    args = getattr(model, "aecfe_args", None)
    if args is None:
        raise StageError("this detector was not made by build_detector/load_detector: its arguments are unknown")
    return dict(args)


def save_detector(path: Path, model) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_args": detector_args(model),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def load_detector(path: Path, device, backbone_hint: Optional[str] = None):
    """Load our checkpoint or a bare torchvision Mask R-CNN state dict, ready for ``detect`` (eval mode).

    Only tensors are ever unpickled (``weights_only=True``). For a bare state dict the backbone and norm
    are inferred from its keys and shapes; anything that is not a 2-class Mask R-CNN of one of
    ``BACKBONES`` is refused with a message naming the differing tensors.
    """
    path = Path(path)
    payload = _read_weights(path)
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        args = payload.get("model_args")
        state = payload.get("state_dict")
        if not isinstance(args, dict) or not _is_state_dict(state):
            raise UserError(f"{path}: damaged {CHECKPOINT_FORMAT} checkpoint (model_args or state_dict missing); "
                            "train the detector again")
        args = dict(args)
        try:
            differences = _differences(state, args)
        except TypeError as exc:
            raise UserError(f"{path}: model_args not understood ({exc}); train the detector again") from None
        if differences:
            raise UserError(f"{path}: checkpoint does not match its own model_args: {'; '.join(differences[:6])}")
    else:
        state = _bare_state_dict(payload, path)
        args = _infer_args(state, path, backbone_hint)
    state = _with_batch_counters(state, args)
    try:
        model = build_detector(**args)
    except TypeError as exc:
        raise UserError(f"{path}: model_args not understood ({exc}); train the detector again") from None
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _read_weights(path: Path):
    if not path.is_file():
        raise UserError(f"{path}: no such weights file; check the path given to --weights")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path}: refused: the file holds pickled Python objects, not only tensors, and is never executed "
            f"({reason[:200]}). Save plain weights with torch.save(model.state_dict(), FILE)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a PyTorch weights file ({reason[:200]}); pass a file saved by torch.save") from None


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _bare_state_dict(payload, path: Path) -> dict:
    # Training scripts commonly wrap the weights ({"model": ...}) or save a DataParallel model ("module.").
    if isinstance(payload, dict) and not _is_state_dict(payload):
        for key in ("model", "state_dict", "model_state_dict"):
            if _is_state_dict(payload.get(key)):
                payload = payload[key]
                break
    if not _is_state_dict(payload):
        raise UserError(f"{path}: not a Mask R-CNN state dict (expected a mapping of parameter names to tensors)")
    if all(key.startswith("module.") for key in payload):
        payload = {key.removeprefix("module."): value for key, value in payload.items()}
    return payload


def _infer_args(state: dict, path: Path, backbone_hint: Optional[str]) -> dict:
    norm = "batch" if "backbone.body.bn1.running_mean" in state else "group"
    # White balance is our preprocessing: weights trained elsewhere saw raw colours.
    base = {"norm": norm, "white_balance": False}
    order = list(BACKBONES)
    if backbone_hint in BACKBONES:
        order.remove(backbone_hint)
        order.insert(0, backbone_hint)
    attempts = []
    for backbone in order:
        args = {"backbone": backbone, **base}
        differences = _differences(state, args)
        if not differences:
            return args
        attempts.append((len(differences), backbone, differences))
    count, closest, differences = min(attempts, key=lambda item: item[0])
    raise UserError(
        f"{path}: not a 2-class white-cell Mask R-CNN; closest is {closest} ({count} differences): "
        + "; ".join(differences[:6])
        + ". Pass weights of a torchvision Mask R-CNN with num_classes=2 and a backbone in "
        + ", ".join(BACKBONES)
    )


def _differences(state: dict, args: dict) -> list[str]:
    """Human-readable differences between a state dict and the model ``args`` would build."""
    expected = _expected_shapes(tuple(sorted(args.items())))
    batch_counter = ".num_batches_tracked"
    shape_lines, missing, unexpected = [], [], []
    for key, shape in expected.items():
        if key not in state:
            if not key.endswith(batch_counter):  # FrozenBatchNorm2d files never carry these counters
                missing.append(key)
        elif tuple(state[key].shape) != shape:
            shape_lines.append(f"{key}: file has {list(state[key].shape)}, "
                               f"a {NUM_CLASSES}-class white-cell detector needs {list(shape)}")
    for key in state:
        if key not in expected and not key.endswith(batch_counter):
            unexpected.append(key)
    lines = shape_lines
    mask_keys = [k for k in missing if k.startswith(("roi_heads.mask_head.", "roi_heads.mask_predictor."))]
    if mask_keys and len(mask_keys) == len([k for k in expected if k.startswith(("roi_heads.mask_head.",
                                                                                  "roi_heads.mask_predictor."))]):
        lines.append("the file has no mask head (roi_heads.mask_head.*, roi_heads.mask_predictor.*): "
                     "it is a Faster R-CNN, not a Mask R-CNN")
        missing = [k for k in missing if k not in mask_keys]
    lines += [f"{key}: missing from the file" for key in missing]
    lines += [f"{key}: in the file but not part of a {args['backbone']} Mask R-CNN" for key in unexpected]
    return lines


@lru_cache(maxsize=16)
def _expected_shapes(args_items: tuple) -> dict[str, tuple]:
    # The meta device builds the module tree without allocating or initialising any weights.
    with torch.device("meta"):
        skeleton = build_detector(**dict(args_items))
    return {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}


def _with_batch_counters(state: dict, args: dict) -> dict:
    """BatchNorm counters absent from FrozenBatchNorm2d files are irrelevant at eval: fill them."""
    expected = _expected_shapes(tuple(sorted(args.items())))
    state = {key: value for key, value in state.items() if key in expected}
    for key in expected:
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    return state


# ---------------------------------------------------------------------------------------------------
# Training data


@dataclass
class TrainSample:
    image_path: Path
    boxes: np.ndarray  # (K, 4) float x0, y0, x1, y1 in pixels
    masks: Optional[np.ndarray]  # (K, H, W) bool, or None: masks are then derived from the boxes


def read_voc(
    root: Path,
    split_files: Optional[Sequence[str]] = None,
    mask_dir: Optional[Path] = None,
    class_name: str = "WBC",
) -> list[TrainSample]:
    """Pascal VOC: ``root/Annotations/*.xml`` and ``root/JPEGImages``; ``split_files`` names lists in
    ``root/ImageSets/Main`` (e.g. ["train", "val"]), default every annotation. ``mask_dir`` holds one
    whole-cell mask PNG per image (mask > 64 is cell; BCCD: BloodImage_Mask_NNNNN.png); instances are cut
    from it by their boxes. Fields without a ``class_name`` object are kept as negatives."""
    root = Path(root)
    annotations = root / "Annotations"
    if not annotations.is_dir():
        raise UserError(f"{root}: no Annotations/ folder; pass the root of a Pascal VOC dataset")
    if split_files:
        ids = []
        for name in split_files:
            list_path = root / "ImageSets" / "Main" / (name if name.endswith(".txt") else f"{name}.txt")
            if not list_path.is_file():
                raise UserError(f"{list_path}: split list not found; choose from "
                                f"{sorted(p.stem for p in (root / 'ImageSets' / 'Main').glob('*.txt'))}")
            ids += [line.split()[0] for line in list_path.read_text().splitlines() if line.strip()]
        xml_paths = [annotations / f"{image_id}.xml" for image_id in dict.fromkeys(ids)]
    else:
        xml_paths = sorted(annotations.glob("*.xml"))
    samples = []
    for xml_path in xml_paths:
        image_path, boxes = _parse_voc(xml_path, root, class_name)
        masks = None
        if mask_dir is not None:
            mask_path = _voc_mask_path(Path(mask_dir), xml_path.stem)
            if mask_path is not None:
                masks = _instance_masks_from_semantic(mask_path, boxes, image_path)
        samples.append(TrainSample(image_path, boxes, masks))
    return samples


def _parse_voc(xml_path: Path, root: Path, class_name: str) -> tuple[Path, np.ndarray]:
    if not xml_path.is_file():
        raise UserError(f"{xml_path}: listed in the split but missing; fix the ImageSets list or add the file")
    try:
        tree = ElementTree.parse(xml_path).getroot()
        filename = tree.findtext("filename") or f"{xml_path.stem}.jpg"
        boxes = []
        for obj in tree.iter("object"):
            if (obj.findtext("name") or "").strip().lower() != class_name.lower():
                continue
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise ValueError("object without <bndbox>")
            # VOC pixels are 1-based and inclusive: [xmin - 1, xmax) in 0-based half-open coordinates.
            x0, y0, x1, y1 = (float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            if x1 - (x0 - 1) >= 2 and y1 - (y0 - 1) >= 2:  # degenerate boxes (a point, a line) dropped
                boxes.append([x0 - 1, y0 - 1, x1, y1])
    except (ElementTree.ParseError, ValueError, TypeError) as exc:
        raise UserError(f"{xml_path}: malformed VOC annotation ({exc}); fix or remove the file") from None
    image_path = root / "JPEGImages" / Path(filename).name
    if not image_path.is_file():
        raise UserError(f"{xml_path}: its image {image_path} is missing; restore it or remove the annotation")
    return image_path, np.asarray(boxes, np.float32).reshape(-1, 4)


def _voc_mask_path(mask_dir: Path, stem: str) -> Optional[Path]:
    candidates = [f"{stem}.png", f"{stem}_mask.png"]
    prefix, _, number = stem.rpartition("_")
    if prefix and number.isdigit():
        candidates.append(f"{prefix}_Mask_{number}.png")  # BCCD: BloodImage_00007 -> BloodImage_Mask_00007
    return next((mask_dir / name for name in candidates if (mask_dir / name).is_file()), None)


def _instance_masks_from_semantic(mask_path: Path, boxes: np.ndarray, image_path: Path) -> Optional[np.ndarray]:
    try:
        with Image.open(mask_path) as mask_image:
            semantic = np.asarray(mask_image.convert("L")) > 64
    except (OSError, ValueError) as exc:
        raise UserError(f"{mask_path}: unreadable mask ({exc}); fix or remove it") from None
    image_size = _image_size(image_path)
    if semantic.shape != image_size:
        raise UserError(f"{mask_path}: mask is {semantic.shape[1]}x{semantic.shape[0]} but its image "
                        f"{image_path.name} is {image_size[1]}x{image_size[0]}; masks must match their images")
    masks = np.zeros((len(boxes), *semantic.shape), bool)
    for k, box in enumerate(boxes):
        x0, y0, x1, y1 = _box_pixels(box, semantic.shape)
        masks[k, y0:y1, x0:x1] = semantic[y0:y1, x0:x1]
        if masks[k].sum() < 0.2 * max((x1 - x0) * (y1 - y0), 1):
            return None  # the mask file does not cover this box: derive all masks of the image instead
    return masks


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable image ({exc})") from None


def _box_pixels(box, shape) -> tuple[int, int, int, int]:
    height, width = shape[:2]
    x0 = int(np.clip(math.floor(box[0]), 0, width))
    y0 = int(np.clip(math.floor(box[1]), 0, height))
    x1 = int(np.clip(math.ceil(box[2]), x0, width))
    y1 = int(np.clip(math.ceil(box[3]), y0, height))
    return x0, y0, x1, y1


def read_coco(json_path: Path, category: str = "wbc") -> list[TrainSample]:
    """COCO instances JSON: ``bbox`` plus ``segmentation`` as polygons or RLE (uncompressed or
    compressed; decoded here, no pycocotools). ``file_name`` is relative to the JSON's folder (or its
    ``images/``). Crowd regions are skipped; annotations without segmentation get derived masks."""
    json_path = Path(json_path)
    try:
        data = read_json(json_path)
        categories = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        chosen = {cid for cid, name in categories.items() if name.lower() == category.lower()}
        if not chosen:
            raise UserError(f"{json_path}: no category named '{category}' (categories: "
                            f"{sorted(categories.values())}); pass the white-cell category name")
        by_image: dict[int, list[dict]] = {}
        for annotation in data.get("annotations", []):
            if int(annotation["category_id"]) in chosen and not annotation.get("iscrowd", 0):
                by_image.setdefault(int(annotation["image_id"]), []).append(annotation)
        samples = []
        for image in data["images"]:
            image_path = _coco_image_path(json_path, str(image["file_name"]))
            height, width = int(image["height"]), int(image["width"])
            boxes, masks, complete = [], [], True
            for annotation in by_image.get(int(image["id"]), []):
                x, y, w, h = (float(v) for v in annotation["bbox"])
                if w < 1 or h < 1:
                    continue
                boxes.append([x, y, x + w, y + h])
                segmentation = annotation.get("segmentation")
                if segmentation:
                    masks.append(_decode_segmentation(segmentation, height, width))
                else:
                    complete = False
            box_array = np.asarray(boxes, np.float32).reshape(-1, 4)
            mask_array = np.stack(masks) if masks else np.zeros((0, height, width), bool)
            samples.append(TrainSample(image_path, box_array, mask_array if complete else None))
        return samples
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{json_path}: malformed COCO annotations ({type(exc).__name__}: {exc}); fix the file") from None


def _coco_image_path(json_path: Path, file_name: str) -> Path:
    for base in (json_path.parent, json_path.parent / "images"):
        if (base / file_name).is_file():
            return base / file_name
    raise UserError(f"{json_path}: image '{file_name}' not found beside the JSON or in images/; fix file_name")


def _decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        from PIL import ImageDraw

        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in segmentation:
            points = [(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon) - 1, 2)]
            if len(points) >= 3:
                draw.polygon(points, fill=1, outline=1)
        return np.asarray(canvas, bool)
    rle_height, rle_width = (int(v) for v in segmentation["size"])
    if (rle_height, rle_width) != (height, width):
        raise ValueError(f"RLE size {rle_height}x{rle_width} differs from the image's {height}x{width}")
    counts = segmentation["counts"]
    runs = _decode_rle_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, the image has {height * width}")
    values = np.zeros(len(runs), bool)
    values[1::2] = True  # runs alternate background, cell, background, ... starting with background
    flat = np.repeat(values, runs)
    return flat.reshape((height, width), order="F")  # COCO RLE runs down columns


def _decode_rle_string(counts) -> list[int]:
    """pycocotools' compressed RLE: 5-bit groups, continuation bit 0x20, sign bit 0x10 of the last
    group, and from the third count on each value is a difference to the count two before."""
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            group = ord(text[position]) - 48
            value |= (group & 0x1F) << (5 * shift)
            more = bool(group & 0x20)
            position += 1
            shift += 1
            if not more and group & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError("corrupt compressed RLE (negative run)")
        runs.append(value)
    return runs


# ---------------------------------------------------------------------------------------------------
# Label-free pseudo instances (classical stain segmentation)

# Working resolution of the segmentation: every radius below is relative to it or to the nucleus.
SEGMENT_SIDE = 256
# Nucleus stain score floor, in optical density units (log10): below it no stain is a nucleus.
NUCLEUS_SCORE_FLOOR = 0.08
MIN_NUCLEUS_FRACTION = 0.006  # of the image area: smaller dark blobs are platelets or debris
MIN_SOLIDITY = 0.90  # whole cells are convex-ish; a cell glued to red cells is not
MAX_CELL_TO_NUCLEUS = 8.0  # a "cell" many times its nucleus has leaked into the neighbours
FLOOD_LEVELS = 48


@dataclass
class _Candidate:
    mask: np.ndarray  # at the working resolution
    plausible: bool


def pseudo_instances(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Find white cells without labels; return ``(boxes (K, 4) float32, masks (K, H, W) bool)``.

    1. Background colour = median of the brightest 10 % of pixels; optical density (OD) per channel is
       measured against it, so the lamp colour (yellow, pink, white) cancels.
    2. Nuclear stain score = min(OD_red, 2 OD_red - OD_blue): nuclei absorb red light in every
       Romanowsky variant (MGG, Wright, rapid stains), while red cells, eosin-stained cytoplasm and a
       yellow background absorb blue more than red. Otsu threshold (with a floor), small blobs dropped,
       nuclear lobes within 1.2 nuclear radii grouped into one cell.
    3. Whole cell = non-background pixels (Otsu on total OD) flooded from the nuclei on the distance
       transform, with every red cell as a competing seed, so touching red cells are cut off at the neck.
    4. Only plausible cells are returned: solid (convex hull filled >= 90 %) and not many times larger
       than their nucleus.
    """
    height, width = image.shape[:2]
    candidates = _segment_cells(image)
    masks = [_resize_mask(c.mask, (height, width)) for c in candidates if c.plausible]
    masks = [m for m in masks if m.any()]
    if not masks:
        return np.zeros((0, 4), np.float32), np.zeros((0, height, width), bool)
    stacked = np.stack(masks)
    return np.stack([mask_box(m) for m in stacked]).astype(np.float32), stacked


def pseudo_samples(image_paths: Sequence[Path]) -> list[TrainSample]:
    """Pseudo-instances of each image as training samples. An image is dropped when no cell is found,
    when any candidate is implausible (an unlabelled real cell would teach "background"), or when it
    cannot be read."""
    samples = []
    for path in image_paths:
        try:
            image = load_rgb(Path(path))
        except UnreadableImage:
            continue
        candidates = _segment_cells(image)
        if not candidates or not all(c.plausible for c in candidates):
            continue
        masks = np.stack([_resize_mask(c.mask, image.shape[:2]) for c in candidates])
        if not all(m.any() for m in masks):
            continue
        boxes = np.stack([mask_box(m) for m in masks]).astype(np.float32)
        samples.append(TrainSample(Path(path), boxes, masks))
    return samples


def _segment_cells(image: np.ndarray) -> list[_Candidate]:
    """Cell candidates, with masks at the working resolution (long side <= SEGMENT_SIDE)."""
    small = _downscale(image, SEGMENT_SIDE)
    height, width = small.shape[:2]
    density = _optical_density(small)
    nucleus_score = np.minimum(density[..., 0], 2 * density[..., 0] - density[..., 2])
    nuclei = ndimage.binary_opening(nucleus_score > _nucleus_threshold(nucleus_score), _disk(1))
    total = density.sum(axis=2)
    foreground = (total > _otsu(total[~nuclei])) | nuclei if (~nuclei).any() else nuclei
    foreground = ndimage.binary_opening(foreground, _disk(1))
    foreground = ndimage.binary_fill_holes(ndimage.binary_closing(foreground, _disk(2)))

    labels, count = ndimage.label(nuclei)
    if count == 0:
        return []
    areas = ndimage.sum(nuclei, labels, range(1, count + 1))
    keep = np.concatenate([[False], areas >= MIN_NUCLEUS_FRACTION * height * width])
    nuclei = keep[labels]
    if not nuclei.any():
        return []
    nucleus_radius = math.sqrt(areas.max() / math.pi)
    distance_to_nuclei = ndimage.distance_transform_edt(~nuclei)
    # Lobes of one segmented nucleus lie within about a nuclear radius of each other.
    groups, group_count = ndimage.label(distance_to_nuclei <= 0.6 * nucleus_radius)
    groups = groups * nuclei

    depth = ndimage.distance_transform_edt(foreground)
    peaks = (depth == ndimage.maximum_filter(depth, size=max(3, int(nucleus_radius)))) & (depth > 1)
    # A peak whose inscribed disc reaches the nucleus is the cell's own centre, not a red cell.
    peaks &= distance_to_nuclei > depth + 2
    peak_labels, _ = ndimage.label(peaks)
    seeds = np.where(peak_labels > 0, peak_labels + group_count, 0).astype(np.int32)
    seeds[groups > 0] = groups[groups > 0]
    levels = np.round((1 - depth / max(depth.max(), 1e-6)) * (FLOOD_LEVELS - 1)).astype(np.int32)
    regions = _flood(levels, seeds, foreground)

    candidates = []
    for group in range(1, group_count + 1):
        nucleus = groups == group
        if not nucleus.any():
            continue
        reach = 2.2 * math.sqrt(nucleus.sum() / math.pi)  # cytoplasm never extends further (Zheng masks)
        cell = (regions == group) & foreground & (ndimage.distance_transform_edt(~nucleus) <= reach)
        cell = ndimage.binary_fill_holes(ndimage.binary_opening(cell, _disk(2)) | nucleus)
        cell_labels, pieces = ndimage.label(cell)
        if pieces > 1:
            sizes = ndimage.sum(cell, cell_labels, range(1, pieces + 1))
            cell = cell_labels == int(np.argmax(sizes)) + 1
        plausible = _solidity(cell) >= MIN_SOLIDITY and cell.sum() <= MAX_CELL_TO_NUCLEUS * nucleus.sum()
        candidates.append(_Candidate(cell, plausible))
    return candidates


def _downscale(image: np.ndarray, side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    return image


def _background_colour(rgb: np.ndarray) -> np.ndarray:
    """Median colour of the brightest 10 % of pixels: the empty slide in any smear or cell crop."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    brightness = pixels.sum(axis=1)
    return np.median(pixels[brightness >= np.percentile(brightness, 90)], axis=0)


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    background = _background_colour(rgb)
    density = np.clip(-np.log10((rgb.astype(np.float32) + 1) / (background + 1)), 0, 3)
    return ndimage.gaussian_filter(density, (1, 1, 0))


def _nucleus_threshold(score: np.ndarray) -> float:
    threshold = _otsu(score)
    if threshold < NUCLEUS_SCORE_FLOOR:
        # Otsu split the background from red cells (faint nuclei or none): split what is above the floor.
        above = score[score > NUCLEUS_SCORE_FLOOR]
        threshold = max(NUCLEUS_SCORE_FLOOR, _otsu(above)) if above.size > 20 else NUCLEUS_SCORE_FLOOR
    return threshold


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    values = values.ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    hist, edges = np.histogram(values, bins=bins, range=(low, high))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centres)
    mean_low = sum_low / np.maximum(weight_low, 1e-12)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1e-12)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _disk(radius: float) -> np.ndarray:
    r = max(int(round(radius)), 1)
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def _flood(levels: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seeded watershed by level flooding: at each level, labels grow one pixel per pass into unlabelled
    mask pixels of that level or lower, all labels at once, so ties split evenly."""
    labels = seeds.copy()
    neighbours = np.zeros_like(labels)
    for level in range(int(levels.max()) + 1):
        open_pixels = mask & (levels <= level)
        while True:
            todo = open_pixels & (labels == 0)
            if not todo.any():
                break
            neighbours[:] = 0
            np.maximum(neighbours[1:], labels[:-1], out=neighbours[1:])
            np.maximum(neighbours[:-1], labels[1:], out=neighbours[:-1])
            np.maximum(neighbours[:, 1:], labels[:, :-1], out=neighbours[:, 1:])
            np.maximum(neighbours[:, :-1], labels[:, 1:], out=neighbours[:, :-1])
            grow = todo & (neighbours > 0)
            if not grow.any():
                break
            labels[grow] = neighbours[grow]
    return labels


def _solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area (pixel-centre hull widened by half a pixel all round)."""
    from scipy.spatial import ConvexHull, QhullError

    rows, cols = np.nonzero(mask & ~ndimage.binary_erosion(mask))
    if rows.size < 5:
        return 0.0
    try:
        hull = ConvexHull(np.stack([cols, rows], axis=1).astype(np.float64))
    except QhullError:  # all boundary pixels on a line
        return 0.0
    return float(mask.sum() / (hull.volume + hull.area / 2 + 1))


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(shape):
        return mask.copy()
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(resized) > 127


def mask_box(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def _mask_from_box(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """A whole-cell mask for a box-only annotation: the stain segmentation of the box's surroundings
    when it finds a cell that fills the box, else the ellipse inscribed in the box."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = _box_pixels(box, (height, width))
    mask = np.zeros((height, width), bool)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return mask
    pad_x, pad_y = (x1 - x0) // 4 + 1, (y1 - y0) // 4 + 1
    cx0, cy0 = max(0, x0 - pad_x), max(0, y0 - pad_y)
    cx1, cy1 = min(width, x1 + pad_x), min(height, y1 + pad_y)
    crop = image[cy0:cy1, cx0:cx1]
    candidates = _segment_cells(crop)
    box_in_crop = np.array([x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0], np.float32)
    for candidate in candidates:
        cell = _resize_mask(candidate.mask, crop.shape[:2])
        if cell.any() and candidate.plausible and box_iou(mask_box(cell), box_in_crop) >= 0.7:
            mask[cy0:cy1, cx0:cx1] = cell
            mask[:, :x0] = mask[:, x1:] = False
            mask[:y0] = mask[y1:] = False
            return mask
    rows, cols = np.ogrid[y0:y1, x0:x1]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    mask[y0:y1, x0:x1] = ((cols + 0.5 - cx) / rx) ** 2 + ((rows + 0.5 - cy) / ry) ** 2 <= 1
    return mask


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


# ---------------------------------------------------------------------------------------------------
# Training


@dataclass
class _Prepared:
    """A training image decoded once, with its instances, kept in memory for every epoch."""

    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (K, 4) float32
    masks: np.ndarray  # (K, H, W) bool
    background: np.ndarray  # (3,) fill colour for zoomed-out views
    detect_scale: float  # the factor detect() will resize this image by


def train_detector(
    model,
    samples: Sequence[TrainSample],
    epochs: int,
    batch_size: int,
    lr: float,
    device,
    seed: int,
    train_size: Optional[int] = None,
    on_step: Optional[Callable[[int, int, dict], None]] = None,
) -> list[float]:
    """Train in place; return the total loss of every step.

    Each step sees ``train_size`` x ``train_size`` views (default: 3/4 of the model's input size): a window
    around a random cell at the scale ``detect`` will use, zoomed by a log-uniform factor in
    ``SCALE_JITTER``, flipped and rotated by multiples of 90 degrees, with stain strength, lamp colour,
    hue, saturation, focus blur, resolution and noise jitter, then white-balanced like detection input.
    Crops at detection scale cost less than whole images while the cells keep their detection size.

    AdamW (weight decay 1e-4), linear warm-up then cosine decay, gradients clipped at norm 10: from
    random weights, adaptive steps converge in the few hundred steps a CPU affords; lr ~1e-3 suits it.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise UserError(f"detector training needs epochs >= 1, batch size >= 1 and lr > 0 "
                        f"(got {epochs}, {batch_size}, {lr})")
    if not samples:
        raise UserError("no training samples for the detector")
    args = detector_args(model)
    # Default view: 3/4 of the detection input (192 px for 256), a multiple of 32; views are crops at
    # detection scale, so a smaller view costs only context, not cell detail, and trains ~1.8x faster.
    canvas = int(train_size or max(64, round(0.75 * args["min_size"] / 32) * 32))
    if canvas < 32:
        raise UserError(f"detector train size must be at least 32 pixels, got {canvas}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    prepared = [_prepare(sample, args) for sample in samples]
    steps_per_epoch = math.ceil(len(prepared) / batch_size)
    total_steps = epochs * steps_per_epoch
    device = torch.device(device)
    model.to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    warmup = max(1, min(200, total_steps // 5))

    def lr_factor(step: int) -> float:
        # Linear warm-up from lr/10 (never a full-size first step), then cosine decay to 2 %.
        ramp = 0.1 + 0.9 * min(1.0, step / warmup)
        return ramp * max(0.02, 0.5 * (1 + math.cos(math.pi * step / total_steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    transform = model.transform
    sizes = (transform.min_size, transform.max_size)
    # The views are already at detection scale: the model's own resize must leave them as they are.
    transform.min_size, transform.max_size = (canvas,), canvas
    losses: list[float] = []
    model.train()
    try:
        for _ in range(epochs):
            order = rng.permutation(len(prepared))
            for start in range(0, len(order), batch_size):
                images, targets = [], []
                for index in order[start:start + batch_size]:
                    image, target = _augmented_view(prepared[index], canvas, args["white_balance"], rng)
                    images.append(image.to(device))
                    targets.append({key: value.to(device) for key, value in target.items()})
                terms = model(images, targets)
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    raise StageError(f"detector training diverged at step {len(losses) + 1} "
                                     f"(loss {float(loss)}); use a lower learning rate")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 10.0)
                optimiser.step()
                schedule.step()
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(len(losses), total_steps, {key: float(value.detach()) for key, value in terms.items()})
    finally:
        transform.min_size, transform.max_size = sizes
        model.eval()
    return losses


def _prepare(sample: TrainSample, args: dict) -> _Prepared:
    try:
        image = load_rgb(sample.image_path)
    except UnreadableImage as exc:
        raise UserError(f"{exc}; remove it from the training data") from None
    boxes = np.asarray(sample.boxes, np.float32).reshape(-1, 4)
    if sample.masks is not None:
        masks = np.asarray(sample.masks, bool)
        if masks.shape != (len(boxes), *image.shape[:2]):
            raise UserError(f"{sample.image_path}: {len(boxes)} boxes but masks of shape {masks.shape} "
                            f"for a {image.shape[1]}x{image.shape[0]} image")
    else:
        masks = np.stack([_mask_from_box(image, box) for box in boxes]) if len(boxes) else \
            np.zeros((0, *image.shape[:2]), bool)
    keep = masks.reshape(len(masks), -1).any(axis=1) if len(masks) else np.zeros(0, bool)
    boxes, masks = boxes[keep], masks[keep]
    height, width = image.shape[:2]
    # Huge fields are kept at the largest resolution training can use (the biggest zoom).
    detect_scale = min(args["min_size"] / min(height, width), args["max_size"] / max(height, width))
    keep_scale = min(1.0, detect_scale * SCALE_JITTER[1], math.sqrt(MAX_PIXELS_IN_MEMORY / (height * width)))
    if keep_scale < 1.0:
        size = (max(1, round(width * keep_scale)), max(1, round(height * keep_scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        masks = np.stack([np.asarray(Image.fromarray(m).resize(size, Image.NEAREST)) for m in masks]) \
            if len(masks) else np.zeros((0, size[1], size[0]), bool)
        boxes = boxes * np.float32(keep_scale)
        detect_scale /= keep_scale
    return _Prepared(image, boxes, masks, _background_colour(image), detect_scale)


def _augmented_view(item: _Prepared, canvas: int, white_balance: bool, rng: np.random.Generator):
    """One random training view: (image tensor (3, canvas, canvas) in [0, 1], Mask R-CNN target)."""
    height, width = item.image.shape[:2]
    zoom = item.detect_scale * math.exp(rng.uniform(math.log(SCALE_JITTER[0]), math.log(SCALE_JITTER[1])))
    window = canvas / zoom  # the view's side in image pixels
    if len(item.boxes):
        box = item.boxes[rng.integers(len(item.boxes))]
        centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        # The chosen cell's centre lands in the middle half of the view.
        left = centre_x - window * rng.uniform(0.25, 0.75)
        top = centre_y - window * rng.uniform(0.25, 0.75)
    else:
        left = rng.uniform(min(0.0, width - window), max(0.0, width - window))
        top = rng.uniform(min(0.0, height - window), max(0.0, height - window))
    extent = (left, top, left + window, top + window)
    fill = tuple(int(v) for v in item.background)
    view = np.asarray(Image.fromarray(item.image).transform((canvas, canvas), Image.EXTENT, extent,
                                                            Image.BILINEAR, fillcolor=fill))
    masks = [np.asarray(Image.fromarray(m.astype(np.uint8)).transform((canvas, canvas), Image.EXTENT, extent,
                                                                     Image.NEAREST, fillcolor=0)) > 0
             for m in item.masks]
    boxes = (item.boxes - np.array([left, top, left, top], np.float32)) * np.float32(zoom)
    full_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    boxes = np.clip(boxes, 0, canvas)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # A cell mostly outside the view is not a recognisable cell: drop it rather than teach a sliver.
    keep = [k for k in range(len(boxes)) if areas[k] >= 0.3 * full_areas[k] and min(boxes[k, 2] - boxes[k, 0],
                                                                                   boxes[k, 3] - boxes[k, 1]) >= 4
            and masks[k].any()]
    boxes = boxes[keep]
    masks = np.stack([masks[k] for k in keep]) if keep else np.zeros((0, canvas, canvas), bool)

    turns = int(rng.integers(4))
    flip = bool(rng.integers(2))
    view, masks, boxes = _rotate_flip(view, masks, boxes, turns, flip, canvas)
    pixels = _colour_jitter(view.astype(np.float32) / 255.0, rng)
    if white_balance:
        pixels = _white_balance(pixels)
    image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    target = {
        "boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)).reshape(-1, 4),
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "masks": torch.from_numpy(np.ascontiguousarray(masks)).to(torch.uint8),
    }
    return image, target


def _rotate_flip(view, masks, boxes, turns: int, flip: bool, canvas: int):
    """Rotate by ``turns`` x 90 degrees counter-clockwise, then optionally mirror left-right."""
    for _ in range(turns):
        view = np.rot90(view)
        masks = np.rot90(masks, axes=(1, 2))
        # (x, y) -> (y, canvas - x) for a counter-clockwise quarter turn of a square image
        boxes = np.stack([boxes[:, 1], canvas - boxes[:, 2], boxes[:, 3], canvas - boxes[:, 0]], axis=1)
    if flip:
        view = view[:, ::-1]
        masks = masks[:, :, ::-1]
        boxes = np.stack([canvas - boxes[:, 2], boxes[:, 1], canvas - boxes[:, 0], boxes[:, 3]], axis=1)
    return view, masks, boxes.reshape(-1, 4)


def _colour_jitter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stain and optics variation between labs, on an (H, W, 3) float image in [0, 1]."""
    # Stain amount and colour: scale optical density per channel (Beer-Lambert) and overall.
    density = -np.log(np.clip(pixels, 1 / 255, 1.0))
    density *= np.exp(rng.uniform(-0.25, 0.25, size=3) + rng.uniform(-0.3, 0.3))
    # Stain contrast: a power of the density (about a nucleus-dark 1.0) fades or deepens faint cytoplasm
    # while nuclei stay dark; rapid stains leave neutrophil cytoplasm barely visible (Zheng/Tecom).
    density = np.power(density, rng.uniform(0.7, 1.6))
    pixels = np.exp(-density)
    # Lamp colour and exposure.
    pixels = pixels * rng.uniform(0.8, 1.0, size=3) * rng.uniform(0.9, 1.15)
    # Hue rotation about the grey axis and saturation, in RGB so no colour-space round trip is needed.
    pixels = _rotate_hue(pixels, rng.uniform(-0.5, 0.5), rng.uniform(0.7, 1.3))
    if rng.random() < 0.5:  # focus blur
        pixels = ndimage.gaussian_filter(pixels, (rng.uniform(0.3, 2.0),) * 2 + (0,))
    if rng.random() < 0.3:  # a lower-resolution camera, upscaled
        factor = rng.uniform(1.5, 3.5)
        height, width = pixels.shape[:2]
        small = ndimage.zoom(pixels, (1 / factor, 1 / factor, 1), order=1)
        pixels = ndimage.zoom(small, (height / small.shape[0], width / small.shape[1], 1), order=1)
    if rng.random() < 0.5:
        pixels = pixels + rng.normal(0, rng.uniform(0, 0.02), size=pixels.shape)
    return np.clip(pixels, 0, 1).astype(np.float32)


def _rotate_hue(pixels: np.ndarray, angle: float, saturation: float) -> np.ndarray:
    grey_axis = np.full(3, 1 / math.sqrt(3))
    cos, sin = math.cos(angle), math.sin(angle)
    cross = np.array([[0, -grey_axis[2], grey_axis[1]], [grey_axis[2], 0, -grey_axis[0]],
                      [-grey_axis[1], grey_axis[0], 0]])
    rotation = cos * np.eye(3) + sin * cross + (1 - cos) * np.outer(grey_axis, grey_axis)
    grey = pixels.mean(axis=2, keepdims=True)
    rotated = pixels @ rotation.T
    return grey + (rotated - grey) * saturation


def _white_balance(pixels: np.ndarray) -> np.ndarray:
    """Scale channels so the background (brightest 10 %) becomes neutral at 0.94; gains are bounded so
    an image without visible background is not recoloured wildly."""
    background = _background_colour(pixels)
    gains = np.clip(0.94 / np.maximum(background, 1e-3), 0.67, 1.5)
    return np.clip(pixels * gains, 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Detection


@dataclass
class Detection:
    box: np.ndarray  # (4,) x0, y0, x1, y1 in original image pixels
    score: float
    mask: np.ndarray  # (H, W) bool at the original image size
    roi_feature: np.ndarray  # (256, 14, 14) float32: mask-branch RoIAlign of FPN P2-P5 on the final box


def detect(model, images: Sequence[np.ndarray], device, score_threshold: float = 0.5) -> list[list[Detection]]:
    """Detect white cells in (H, W, 3) uint8 images; one list of detections per image, by score.

    ``score_threshold`` replaces the model's box score threshold for this call. The instance feature is
    captured by a forward hook on ``roi_heads.mask_roi_pool`` during the single forward pass: at eval
    the mask branch pools exactly the final (post-NMS) boxes, in the resized image's coordinates.
    """
    device = torch.device(device)
    model.eval()
    if device.type == "cpu":
        # oneDNN convolutions run ~10 % faster on channels-last weights; the values are unchanged.
        model.to(memory_format=torch.channels_last)
    white_balance = getattr(model, "aecfe_args", {}).get("white_balance", False)
    pooled: list[torch.Tensor] = []
    hook = model.roi_heads.mask_roi_pool.register_forward_hook(
        lambda module, inputs, output: pooled.append(output.detach().float().cpu())
    )
    saved_threshold = model.roi_heads.score_thresh
    model.roi_heads.score_thresh = float(score_threshold)
    results: list[list[Detection]] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), DETECT_BATCH):
                batch = [_as_input(image, white_balance) for image in images[start:start + DETECT_BATCH]]
                pooled.clear()
                outputs = model([tensor.to(device) for tensor in batch])
                features = pooled[0] if pooled else torch.zeros((0, *FEATURE_SHAPE))
                offset = 0
                for output in outputs:
                    count = len(output["boxes"])
                    results.append(_detections(output, features[offset:offset + count], score_threshold))
                    offset += count
    finally:
        model.roi_heads.score_thresh = saved_threshold
        hook.remove()
    return results


def _as_input(image: np.ndarray, white_balance: bool) -> torch.Tensor:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UserError(f"detect expects (H, W, 3) uint8 images, got {image.dtype} {image.shape}")
    pixels = image.astype(np.float32) / 255.0
    if white_balance:
        pixels = _white_balance(pixels)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _detections(output: dict, features: torch.Tensor, score_threshold: float) -> list[Detection]:
    boxes = output["boxes"].float().cpu().numpy()
    scores = output["scores"].float().cpu().numpy()
    masks = (output["masks"][:, 0] >= 0.5).cpu().numpy()
    found = [
        Detection(box=boxes[k].astype(np.float32), score=float(scores[k]), mask=masks[k],
                  roi_feature=features[k].numpy().astype(np.float32))
        for k in range(len(boxes)) if scores[k] >= score_threshold
    ]
    return sorted(found, key=lambda d: -d.score)


def select_central(detections: list[Detection], image_shape) -> Optional[Detection]:
    """The detection whose box centre is nearest the image centre (single-cell datasets hold one cell,
    centred by the acquisition system); ties go to the higher score. None when there is none."""
    if not detections:
        return None
    centre_y, centre_x = image_shape[0] / 2, image_shape[1] / 2

    def distance(d: Detection) -> tuple[float, float]:
        x = (d.box[0] + d.box[2]) / 2
        y = (d.box[1] + d.box[3]) / 2
        return (float(np.hypot(x - centre_x, y - centre_y)), -d.score)

    return min(detections, key=distance)


def crop_cell(image: np.ndarray, box, size: int = 128, margin=(10, 20), reference: int = 400) -> np.ndarray:
    """The cell crop the autoencoder reconstructs: (3, size, size) uint8.

    The box grows by ``margin[0]`` pixels before (left, top) and ``margin[1]`` after (right, bottom),
    measured in a ``reference`` x ``reference`` resize of the image as the authors did, so the margin
    scales with the image; the result is clipped to the image and resized to ``size`` x ``size``.
    """
    height, width = image.shape[:2]
    before_x, after_x = margin[0] * width / reference, margin[1] * width / reference
    before_y, after_y = margin[0] * height / reference, margin[1] * height / reference
    x0 = int(np.clip(math.floor(box[0] - before_x), 0, width - 1))
    y0 = int(np.clip(math.floor(box[1] - before_y), 0, height - 1))
    x1 = int(np.clip(math.ceil(box[2] + after_x), x0 + 1, width))
    y1 = int(np.clip(math.ceil(box[3] + after_y), y0 + 1, height))
    crop = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1])).resize((size, size), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(crop).transpose(2, 0, 1))


def detector_flops(model, image_hw) -> float:
    """Forward FLOPs (2 x multiply-accumulates of every convolution and linear layer, counted by torch's
    FlopCounterMode) for one image of ``image_hw`` pixels carrying one cell: exactly one detection
    reaches the mask branch, as in a single-cell dataset, whatever the weights."""
    from torch.utils.flop_counter import FlopCounterMode

    height, width = (int(v) for v in image_hw)
    heads = model.roi_heads
    saved = (heads.score_thresh, heads.detections_per_img, model.training)
    heads.score_thresh, heads.detections_per_img = 0.0, 1
    parameter = next(model.parameters())
    dummy = torch.rand((3, height, width), generator=torch.Generator().manual_seed(0))
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model([dummy.to(parameter.device, parameter.dtype)])
    finally:
        heads.score_thresh, heads.detections_per_img = saved[0], saved[1]
        model.train(saved[2])
    return float(counter.get_total_flops())
