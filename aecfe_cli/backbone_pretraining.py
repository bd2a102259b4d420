"""Self-supervised pretraining of the detector's ResNet on the user's own cells, before Mask R-CNN training.

With no weights from outside, the detector's backbone otherwise learns only what separates a white cell
from the slide, and the RoI features AE-CFE encodes carry little of what separates one cell type from
another. Here it first learns to recognise each cell among the others under the stain, lamp, hue, focus and
camera jitter of detector training, at random zooms, turns and with some views in grey (SimCLR, Chen et al.
2020): what survives that jitter is the cell's shape and structure, not its lab's colour.

The cells are the boxes the detector is about to be trained on (pseudo-masks or annotations), so this
costs no extra segmentation; a square window around each is kept decoded, small, in memory.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .annotations import TrainSample
from .colour import stain_jitter, stain_normalised, white_balance_pixels
from .detector_training import clipped_step, warmup_cosine
from .errors import StageError, UserError
from .images import UnreadableImage, load_rgb
from .precision import autocast

VIEW_SIZE = 64  # pixels of each augmented view: about a cell's size at the detector's default 256-px input
WINDOW_SIZE = 96  # pixels a cell's window is kept at, so that zoomed views still have detail to show
WINDOW_MARGIN = 1.5  # window side over the box's longer side: some slide around the cell
ZOOM = (0.55, 1.0)  # share of the window's side a view shows
GREY_PROBABILITY = 0.2
TEMPERATURE = 0.2
LR = 1e-3
PROJECTION = (256, 128)  # hidden and output width of the projection head, dropped after pretraining


def pretrain_backbone(
    body: nn.Module,
    samples: Sequence[TrainSample],
    steps: int,
    batch_size: int,
    device,
    seed: int,
    stain_norm: str = "none",
    white_balance: bool = True,
    on_step: Optional[Callable[[int, int, float], None]] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> dict:
    """Train ``body`` (the ResNet trunk, torchvision's ``IntermediateLayerGetter``) in place for ``steps``
    steps of ``batch_size`` cells, two views each; return a summary for the detector's manifest.

    The contrastive loss (NT-Xent) is computed on a projection of the last stage's pooled output, as
    SimCLR does; AdamW with warm-up and cosine decay and clipped steps, as detector training."""
    if steps < 1 or batch_size < 2:
        raise UserError(f"backbone pretraining needs steps >= 1 and a batch of at least 2 cells (got {steps}, {batch_size})")
    windows = cell_windows(samples, stain_norm)
    if len(windows) < 2:
        raise UserError(f"backbone pretraining found {len(windows)} cell(s) in its {len(samples)} images; "
                        "it needs at least 2: set detect.pretrain_steps: 0 or give more images")
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    body.to(device)
    with torch.no_grad():
        channels = _pooled(body, torch.zeros(1, 3, VIEW_SIZE, VIEW_SIZE, device=device)).shape[1]
    projector = nn.Sequential(nn.Linear(channels, PROJECTION[0]), nn.ReLU(), nn.Linear(*PROJECTION)).to(device)
    parameters = [p for p in (*body.parameters(), *projector.parameters()) if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=LR, weight_decay=1e-4)
    schedule = warmup_cosine(optimiser, steps, warmup=max(1, steps // 10))
    cells = min(batch_size, len(windows))
    losses = []
    started = time.perf_counter()
    body.train()
    for step in range(steps):
        chosen = rng.choice(len(windows), size=cells, replace=False)
        views = torch.stack([augmented_view(windows[i], rng, white_balance) for i in chosen for _ in range(2)])
        with autocast(device, autocast_dtype):
            projected = projector(_pooled(body, views.to(device)))
        losses.append(clipped_step(contrastive_loss(projected.float()), parameters, optimiser, schedule,
                                   "backbone pretraining", step + 1))
        if on_step is not None:
            on_step(step + 1, steps, losses[-1])
    body.eval()
    # chance_loss is the NT-Xent of projections that carry nothing: ln of the 2N - 1 candidates per view.
    return {"steps": steps, "cells": len(windows), "batch_size": cells, "first_loss": round(losses[0], 4),
            "final_loss": round(float(np.mean(losses[-10:])), 4), "chance_loss": round(math.log(2 * cells - 1), 4),
            "seconds": round(time.perf_counter() - started, 1)}


def _pooled(body: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last stage's feature map, averaged over space: (N, channels)."""
    return list(body(images).values())[-1].mean(dim=(2, 3))


def contrastive_loss(projected: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """NT-Xent over 2N projections in which rows 2k and 2k+1 are two views of one cell: each view must
    pick its partner out of the other 2N - 2 views by cosine similarity."""
    if len(projected) < 4 or len(projected) % 2:
        raise StageError(f"contrastive_loss needs pairs of views of at least 2 cells, got {len(projected)} rows")
    unit = F.normalize(projected, dim=1)
    similarity = unit @ unit.T / temperature
    similarity = similarity.masked_fill(torch.eye(len(unit), dtype=torch.bool, device=unit.device), float("-inf"))
    partners = torch.arange(len(unit), device=unit.device) ^ 1
    return F.cross_entropy(similarity, partners)


def cell_windows(samples: Sequence[TrainSample], stain_norm: str) -> list[np.ndarray]:
    """A (WINDOW_SIZE, WINDOW_SIZE, 3) uint8 square around every box of every sample, in the colours the
    detector sees (stain-normalised as ``stain_norm`` says); windows are padded with the image's edge."""
    windows = []
    for sample in samples:
        try:
            image = stain_normalised(load_rgb(sample.image_path), stain_norm, sample.stain)
        except UnreadableImage as exc:
            raise UserError(f"{exc}; remove it from the training data") from None
        picture = Image.fromarray(image)
        fill = tuple(int(v) for v in np.median(image.reshape(-1, 3), axis=0))  # one per image, not per box
        for x0, y0, x1, y1 in np.asarray(sample.boxes, np.float32).reshape(-1, 4):
            half = WINDOW_MARGIN * max(x1 - x0, y1 - y0) / 2
            if half < 2:
                continue
            centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
            extent = (centre_x - half, centre_y - half, centre_x + half, centre_y + half)
            windows.append(np.asarray(picture.transform((WINDOW_SIZE, WINDOW_SIZE), Image.EXTENT, extent,
                                                        Image.BILINEAR, fillcolor=fill)))
    return windows


def augmented_view(window: np.ndarray, rng: np.random.Generator, white_balance: bool = True) -> torch.Tensor:
    """One random (3, VIEW_SIZE, VIEW_SIZE) float view of a cell window: zoom and shift, quarter turns and
    mirror, the detector's stain and optics jitter, sometimes grey, then white-balanced as detector input."""
    side = WINDOW_SIZE * rng.uniform(*ZOOM)
    left, top = rng.uniform(0, WINDOW_SIZE - side, size=2)
    view = np.asarray(Image.fromarray(window).resize((VIEW_SIZE, VIEW_SIZE), Image.BILINEAR,
                                                     box=(left, top, left + side, top + side)))
    view = np.rot90(view, int(rng.integers(4)))
    if rng.integers(2):
        view = view[:, ::-1]
    pixels = stain_jitter(np.ascontiguousarray(view).astype(np.float32) / 255.0, rng)
    if rng.random() < GREY_PROBABILITY:
        pixels = np.repeat(pixels.mean(axis=2, keepdims=True), 3, axis=2)
    if white_balance:
        pixels = white_balance_pixels(pixels)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
