"""Boxes and masks: conversions and overlaps shared by training data, detection and benchmarks."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def box_pixels(box, shape) -> tuple[int, int, int, int]:
    height, width = shape[:2]
    x0 = int(np.clip(math.floor(box[0]), 0, width))
    y0 = int(np.clip(math.floor(box[1]), 0, height))
    x1 = int(np.clip(math.ceil(box[2]), x0, width))
    y1 = int(np.clip(math.ceil(box[3]), y0, height))
    return x0, y0, x1, y1


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(shape):
        return mask.copy()
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(resized) > 127


def mask_box(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
