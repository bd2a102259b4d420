"""Detector training: seeded, from random weights, with views and colour augmentation aimed at other labs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .annotations import TrainSample
from .colour import background_colour, stain_jitter, stain_normalised, white_balance_pixels
from .detector import detector_args
from .errors import StageError, UserError
from .images import UnreadableImage, load_rgb
from .precision import autocast
from .pseudo_labels import mask_from_box

SCALE_JITTER = (0.6, 2.5)  # training zoom relative to the detection scale; wide because labs' optics differ
MAX_PIXELS_IN_MEMORY = 2_000_000  # training images are kept decoded at most this large (pixels)


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
    min_steps: int = 0,
    stain_norm: str = "none",
    train_size: Optional[int] = None,
    on_step: Optional[Callable[[int, int, dict], None]] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> list[float]:
    """Train in place for ``training_steps(...)`` steps; return the total loss of every step.

    Each step sees ``train_size`` x ``train_size`` views (default: 3/4 of the model's input size): a window
    around a random cell at the scale ``detect`` will use, zoomed by a log-uniform factor in
    ``SCALE_JITTER``, flipped and rotated by multiples of 90 degrees, with stain strength, lamp colour,
    hue, saturation, focus blur, resolution and noise jitter, then white-balanced like detection input.
    Images are first stain-normalised by ``stain_norm`` (see ``colour.stain_normalised``) with each
    sample's ``stain`` statistics, as ``detect`` normalises its input.
    Crops at detection scale cost less than whole images while the cells keep their detection size.

    AdamW (weight decay 1e-4), linear warm-up then cosine decay, gradients clipped at norm 10: from
    random weights, adaptive steps converge in the few hundred steps a CPU affords; lr ~1e-3 suits it.

    ``autocast_dtype`` (see ``precision.autocast_dtype``) runs the whole forward pass, heads and losses
    included, under autocast, as torchvision's detection references do with ``--amp``; the summed loss,
    weights and optimiser state are float32. On a CPU with AMX it halves the step time.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0 or min_steps < 0:
        raise UserError(f"detector training needs epochs >= 1, batch size >= 1, lr > 0 and steps >= 0 "
                        f"(got {epochs}, {batch_size}, {lr}, {min_steps})")
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
    prepared = [_prepare(sample, args, stain_norm) for sample in samples]
    total_steps = training_steps(len(prepared), epochs, batch_size, min_steps)
    device = torch.device(device)
    model.to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    schedule = warmup_cosine(optimiser, total_steps, warmup=max(1, min(200, total_steps // 5)))
    transform = model.transform
    sizes = (transform.min_size, transform.max_size)
    # The views are already at detection scale: the model's own resize must leave them as they are.
    transform.min_size, transform.max_size = (canvas,), canvas
    losses: list[float] = []
    model.train()
    try:
        while len(losses) < total_steps:
            order = rng.permutation(len(prepared))
            for start in range(0, len(order), batch_size):
                if len(losses) == total_steps:
                    break
                images, targets = [], []
                for index in order[start:start + batch_size]:
                    image, target = _augmented_view(prepared[index], canvas, args["white_balance"], rng)
                    images.append(image.to(device))
                    targets.append({key: value.to(device) for key, value in target.items()})
                with autocast(device, autocast_dtype):
                    terms = model(images, targets)
                loss = sum(term.float() for term in terms.values())
                losses.append(clipped_step(loss, parameters, optimiser, schedule, "detector training", len(losses) + 1))
                if on_step is not None:
                    on_step(len(losses), total_steps, {key: float(value.detach()) for key, value in terms.items()})
    finally:
        transform.min_size, transform.max_size = sizes
        model.eval()
    return losses


def warmup_cosine(optimiser: torch.optim.Optimizer, total_steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from a tenth of the rate (never a full-size first step from random weights), then
    cosine decay to 2 % at ``total_steps``."""
    def factor(step: int) -> float:
        ramp = 0.1 + 0.9 * min(1.0, step / warmup)
        return ramp * max(0.02, 0.5 * (1 + math.cos(math.pi * step / total_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def clipped_step(loss: torch.Tensor, parameters: list, optimiser: torch.optim.Optimizer, schedule,
                 what: str, step: int) -> float:
    """One optimiser step on ``loss`` with gradients clipped at norm 10; a non-finite loss stops ``what``
    with the step it happened at instead of corrupting the weights. Returns the loss as a float."""
    if not torch.isfinite(loss):
        raise StageError(f"{what} diverged at step {step} (loss {float(loss)}); use a lower learning rate")
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 10.0)
    optimiser.step()
    schedule.step()
    return float(loss.detach())


def training_steps(samples: int, epochs: int, batch_size: int, min_steps: int) -> int:
    """``epochs`` passes over ``samples`` images, or ``min_steps`` steps if that is more."""
    return max(epochs * math.ceil(samples / batch_size), min_steps)


def _prepare(sample: TrainSample, args: dict, stain_norm: str) -> _Prepared:
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
        masks = np.stack([mask_from_box(image, box) for box in boxes]) if len(boxes) else \
            np.zeros((0, *image.shape[:2]), bool)
    keep = masks.reshape(len(masks), -1).any(axis=1) if len(masks) else np.zeros(0, bool)
    boxes, masks = boxes[keep], masks[keep]
    # Masks come from the original colours (the segmentation measures stain against the slide); the
    # network sees the normalised ones, as detection will.
    image = stain_normalised(image, stain_norm, sample.stain)
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
    return _Prepared(image, boxes, masks, background_colour(image), detect_scale)


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
    view, masks, boxes = rotate_flip(view, masks, boxes, turns, flip)
    pixels = stain_jitter(view.astype(np.float32) / 255.0, rng)
    if white_balance:
        pixels = white_balance_pixels(pixels)
    image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    target = {
        "boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)).reshape(-1, 4),
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "masks": torch.from_numpy(np.ascontiguousarray(masks)).to(torch.uint8),
    }
    return image, target


def rotate_flip(view: np.ndarray, masks: Optional[np.ndarray], boxes: np.ndarray, turns: int, flip: bool):
    """Rotate an (H, W, ...) image, its (n, H, W) masks (or None) and its (n, 4) x0, y0, x1, y1 boxes by
    ``turns`` x 90 degrees counter-clockwise, then optionally mirror left-right; each box stays its cell's."""
    for _ in range(turns):
        width = view.shape[1]  # the turned image's height
        view = np.rot90(view)
        masks = None if masks is None else np.rot90(masks, axes=(1, 2))
        # (x, y) -> (y, width - x) for a counter-clockwise quarter turn
        boxes = np.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], axis=1)
    if flip:
        width = view.shape[1]
        view = view[:, ::-1]
        masks = None if masks is None else masks[:, :, ::-1]
        boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    return view, masks, boxes.reshape(-1, 4)
