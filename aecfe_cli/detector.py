"""Stage 1 network: a two-class Mask R-CNN (background, white cell), built, saved, loaded and run.

* ``build_detector`` / ``save_detector`` / ``load_detector``: torchvision Mask R-CNN with a ResNet-FPN
  backbone (256-channel P2-P5 + pool), never with pretrained weights. Checkpoints are loaded with
  ``torch.load(weights_only=True)`` only, so a pickled payload is refused before anything runs.
* ``detect``: batched inference that also returns, per cell, the mask-branch RoIAlign output
  (256x14x14 on the final box), the instance feature AE-CFE learns from.
* ``select_central`` and ``crop_cell``: the single-cell conventions of the paper.

Training lives in ``detector_training``, its data in ``annotations`` (VOC, COCO) and ``pseudo_labels``
(label-free stain segmentation). Input colours are white-balanced (the empty-slide background becomes
neutral grey) before the network sees them, in training and detection alike: a yellow or pink lamp is the
largest and least informative difference between laboratories.
"""

from __future__ import annotations

import math
from collections import OrderedDict
import pickle
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .colour import white_balance_pixels
from .config import BACKBONES
from .errors import StageError, UserError
from .io import atomic_path
from .precision import autocast, place

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


def detector_from_initial_weights(path: Path, **build_kw) -> tuple[nn.Module, dict]:
    """A 2-class detector to fine-tune from weights made elsewhere, as torchvision's fine-tuning recipe
    does: every tensor of ``path`` whose name and shape fit is loaded, the class-specific predictor heads
    (e.g. COCO's 91 classes) stay new. ``path`` may hold a torchvision Mask R-CNN or Faster R-CNN state
    dict of any class count, or an ImageNet ResNet (it becomes the FPN's body; its ``fc`` is dropped).
    The backbone depth is taken from the file; BatchNorm statistics in it select ``norm="batch"``.

    Returns the model (train mode) and what happened: backbone, norm, tensors loaded, tensors of the file
    not used (with the reason) and the model's tensors that start from random values.
    """
    path = Path(path)
    state = _bare_state_dict(_read_weights(path), path)
    if not any(key.startswith("backbone.") for key in state):  # a classification ResNet
        state = {f"backbone.body.{key}": value for key, value in state.items() if not key.startswith("fc.")}
    norm = "batch" if any(key.endswith(".running_mean") for key in state) else "group"
    fits = []
    for backbone in BACKBONES:
        args = {**build_kw, "backbone": backbone, "norm": norm}
        expected = _expected_shapes(tuple(sorted(args.items())))
        usable = [k for k, v in state.items() if k in expected and tuple(v.shape) == expected[k]]
        body = [k for k in expected if k.startswith("backbone.body.") and not k.endswith(".num_batches_tracked")]
        fits.append((sum(k in usable for k in body) / len(body), backbone, usable, expected))
    coverage, backbone, usable, expected = max(fits, key=lambda fit: fit[0])
    if coverage < 0.95:
        raise UserError(f"{path}: not a torchvision ResNet or R-CNN state dict: at best {coverage:.0%} of a "
                        f"{backbone} backbone's tensors fit; pass weights of one of {', '.join(BACKBONES)}")
    model = build_detector(**{**build_kw, "backbone": backbone, "norm": norm})
    model.load_state_dict({key: state[key] for key in usable}, strict=False)
    not_used = [f"{key} (file {list(value.shape)}, model {list(expected[key])})" if key in expected
                else f"{key} (not in a {backbone} Mask R-CNN)" for key, value in state.items() if key not in usable]
    loaded = set(usable)
    fresh = [key for key in expected if key not in loaded and not key.endswith(".num_batches_tracked")]
    return model.train(), {"backbone": backbone, "norm": norm, "loaded": len(usable), "not_used": not_used,
                           "new": len(fresh)}


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
# Detection


# Who found a cell (instances.csv's and predictions.csv's found_by). Detections written before that column
# existed were all the detector's, so readers of older files take FOUND_BY_DETECTOR.
FOUND_BY_DETECTOR = "detector"
FOUND_BY_SEGMENTATION = "segmentation"  # a stand-in for a cell the detector missed (detect.segment_missed)


@dataclass
class Detection:
    box: np.ndarray  # (4,) x0, y0, x1, y1 in original image pixels
    score: float
    mask: np.ndarray  # (H, W) bool at the original image size
    roi_feature: np.ndarray  # (256, 14, 14) float32: mask-branch RoIAlign of FPN P2-P5 on the final box
    found_by: str = FOUND_BY_DETECTOR


def detect(model, images: Sequence[np.ndarray], device, score_threshold: float = 0.5,
           central_only: bool = False, autocast_dtype: Optional[torch.dtype] = None) -> list[list[Detection]]:
    """Detect white cells in (H, W, 3) uint8 images; one list of detections per image, by score.

    ``score_threshold`` replaces the model's box score threshold for this call. ``central_only`` keeps
    per image only the detection ``select_central`` would choose, and runs the mask branch for it alone:
    a single-cell dataset needs one cell per image, and with a low threshold the mask branch on every
    box (up to ``box_detections_per_img``) costs several times the rest of the network.

    The forward pass is torchvision's eval path, split between the box and mask branches: the instance
    feature is the mask branch's RoIAlign (``roi_heads.mask_roi_pool``) of the final boxes, in the
    resized image's coordinates.

    ``autocast_dtype`` (see ``precision.autocast_dtype``) runs the backbone, FPN and RPN under autocast,
    the bulk of the FLOPs. The box and mask heads and RoIAlign get float32 features and proposals, so the
    final boxes, scores, masks and stored features are computed in float32 from there.
    """
    from torchvision.models.detection.roi_heads import maskrcnn_inference
    from torchvision.models.detection.transform import resize_boxes

    heads = model.roi_heads
    saved_threshold = heads.score_thresh
    heads.score_thresh = float(score_threshold)
    results: list[list[Detection]] = []
    try:
        with torch.inference_mode():
            for original_sizes, resized, features, proposals in _trunk_batches(model, images, device, autocast_dtype,
                                                                               proposals=True):
                box_features = heads.box_head(heads.box_roi_pool(features, proposals, resized.image_sizes))
                boxes, scores, labels = heads.postprocess_detections(*heads.box_predictor(box_features), proposals,
                                                                     resized.image_sizes)
                if central_only:
                    central = [_central_index(resize_boxes(b, size, original).cpu().numpy(), s.cpu().numpy(), original)
                               for b, s, size, original in zip(boxes, scores, resized.image_sizes, original_sizes)]
                    boxes, scores, labels = ([t[:0] if k is None else t[k:k + 1] for t, k in zip(ts, central)]
                                             for ts in (boxes, scores, labels))
                pooled = heads.mask_roi_pool(features, boxes, resized.image_sizes)
                masks = maskrcnn_inference(heads.mask_predictor(heads.mask_head(pooled)), labels)
                outputs = model.transform.postprocess(
                    [{"boxes": b, "scores": s, "labels": lab, "masks": m} for b, s, lab, m in zip(boxes, scores, labels, masks)],
                    resized.image_sizes, original_sizes)
                pooled = pooled.float().cpu()
                offset = 0
                for output in outputs:
                    count = len(output["boxes"])
                    results.append(_detections(output, pooled[offset:offset + count], score_threshold))
                    offset += count
    finally:
        heads.score_thresh = saved_threshold
    return results


def roi_features_at(model, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], device,
                    autocast_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """The mask-branch RoIAlign features ``detect`` stores, taken at given boxes instead of detected ones:
    ``boxes[i]`` is an (n_i, 4) array in image i's pixels; returns (sum n_i, 256, 14, 14) float32 in that
    order. It runs the backbone alone, so an altered copy of an image (a colour-augmented view) yields
    the feature of the very cell found in the original."""
    from torchvision.models.detection.transform import resize_boxes

    pooled = []
    with torch.inference_mode():
        for start, (original_sizes, resized, features, _) in zip(range(0, len(images), DETECT_BATCH),
                                                                 _trunk_batches(model, images, device, autocast_dtype)):
            scaled = [resize_boxes(torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4), device=resized.tensors.device),
                                   original, size)
                      for b, original, size in zip(boxes[start:start + DETECT_BATCH], original_sizes, resized.image_sizes)]
            pooled.append(model.roi_heads.mask_roi_pool(features, scaled, resized.image_sizes).float().cpu())
    return torch.cat(pooled).numpy() if pooled else np.zeros((0, *FEATURE_SHAPE), np.float32)


def _trunk_batches(model, images: Sequence[np.ndarray], device, autocast_dtype: Optional[torch.dtype],
                   proposals: bool = False):
    """The shared start of ``detect`` and ``roi_features_at``, per batch of ``DETECT_BATCH`` images: their
    original sizes, the resized ImageList, the float32 FPN features and (when asked) the RPN's float32
    proposals. Backbone, FPN and RPN run under autocast; what follows gets float32 inputs."""
    device = torch.device(device)
    place(model, device).eval()
    white_balance = getattr(model, "aecfe_args", {}).get("white_balance", False)
    for start in range(0, len(images), DETECT_BATCH):
        batch = [_as_input(image, white_balance).to(device) for image in images[start:start + DETECT_BATCH]]
        original_sizes = [tuple(tensor.shape[-2:]) for tensor in batch]
        resized, _ = model.transform(batch)
        with autocast(device, autocast_dtype):
            features = model.backbone(resized.tensors)
            found = model.rpn(resized, features)[0] if proposals else None
        features = OrderedDict((level, value.float()) for level, value in features.items())
        yield original_sizes, resized, features, None if found is None else [p.float() for p in found]


def _as_input(image: np.ndarray, white_balance: bool) -> torch.Tensor:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UserError(f"detect expects (H, W, 3) uint8 images, got {image.dtype} {image.shape}")
    pixels = image.astype(np.float32) / 255.0
    if white_balance:
        pixels = white_balance_pixels(pixels)
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
    index = _central_index(np.array([d.box for d in detections]).reshape(-1, 4),
                           np.array([d.score for d in detections]), image_shape)
    return None if index is None else detections[index]


def _central_index(boxes: np.ndarray, scores: np.ndarray, image_shape) -> Optional[int]:
    """Index into (N, 4) ``boxes`` of select_central's choice, None when N is 0."""
    if len(boxes) == 0:
        return None
    centre_y, centre_x = image_shape[0] / 2, image_shape[1] / 2
    distances = np.hypot((boxes[:, 0] + boxes[:, 2]) / 2 - centre_x, (boxes[:, 1] + boxes[:, 3]) / 2 - centre_y)
    return int(np.lexsort((-scores, distances))[0])


def crop_cell(image: np.ndarray, box, size: int = 128, margin=(10, 20), reference: int = 400,
              shape: str = "box") -> np.ndarray:
    """The cell crop the autoencoder reconstructs and the morphology is measured on: (3, size, size) uint8.

    The box grows by ``margin[0]`` pixels before (left, top) and ``margin[1]`` after (right, bottom),
    measured in a ``reference`` x ``reference`` resize of the image as the authors did, so the margin
    scales with the image. ``shape`` "box" (the paper's): that window, clipped to the image, is resized to
    ``size`` x ``size``, so a box wider than tall squeezes the cell sideways and the cell's shape in the
    crop follows how tightly the detector happened to fit it. "square": the window grows along its shorter
    side to a square about its centre and is resized alike in both directions, so the cell keeps its
    shape; where the square leaves the image, the image's edge pixels fill it.
    """
    height, width = image.shape[:2]
    before_x, after_x = margin[0] * width / reference, margin[1] * width / reference
    before_y, after_y = margin[0] * height / reference, margin[1] * height / reference
    left, top, right, bottom = box[0] - before_x, box[1] - before_y, box[2] + after_x, box[3] + after_y
    if shape == "square":
        side = max(right - left, bottom - top)
        centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
        x0, y0 = math.floor(centre_x - side / 2), math.floor(centre_y - side / 2)
        side = max(1, math.ceil(side))
        pad = ((max(0, -y0), max(0, y0 + side - height)), (max(0, -x0), max(0, x0 + side - width)), (0, 0))
        inside = image[max(0, y0):min(height, y0 + side), max(0, x0):min(width, x0 + side)]
        window = np.pad(inside, pad, mode="edge")  # a box lies in its image, so ``inside`` is never empty
    else:
        x0 = int(np.clip(math.floor(left), 0, width - 1))
        y0 = int(np.clip(math.floor(top), 0, height - 1))
        x1 = int(np.clip(math.ceil(right), x0 + 1, width))
        y1 = int(np.clip(math.ceil(bottom), y0 + 1, height))
        window = image[y0:y1, x0:x1]
    crop = Image.fromarray(np.ascontiguousarray(window)).resize((size, size), Image.BILINEAR)
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
