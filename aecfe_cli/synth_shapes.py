"""Stain canvas and shape primitives of the synthetic smears: signed distances in microns, positive inside.

A :class:`Canvas` holds one image's stain concentration maps; shapes are drawn into local patches of it.
``synth_cells`` paints cells with these primitives and ``synth`` turns the stains into a lab's image.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

SdfFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


# (row slice, column slice) of the canvas, x coordinates as a (1, w) row, y coordinates as an (h, 1) column.
Patch = tuple[tuple[slice, slice], np.ndarray, np.ndarray]


class Canvas:
    """Stain concentration maps of one image; shapes are drawn into local patches in micron coordinates."""

    def __init__(self, height: int, width: int, px_per_um: float) -> None:
        self.height, self.width, self.px_per_um = height, width, px_per_um
        self.stains = np.zeros((3, height, width), np.float32)

    def patch(self, centre_px: tuple[float, float], radius_um: float) -> Patch | None:
        """Slices of the canvas around a centre, and pixel-centre coordinates in microns relative to it.

        ``None`` when the patch lies wholly outside the canvas (a red cell beyond the border).
        """
        radius_px = radius_um * self.px_per_um + 2
        cx, cy = float(centre_px[0]), float(centre_px[1])  # Python floats keep the grid float32
        x0, x1 = max(0, math.floor(cx - radius_px)), min(self.width, math.ceil(cx + radius_px))
        y0, y1 = max(0, math.floor(cy - radius_px)), min(self.height, math.ceil(cy + radius_px))
        if x0 >= x1 or y0 >= y1:
            return None
        xs = ((np.arange(x0, x1, dtype=np.float32) + 0.5) - cx) / self.px_per_um
        ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5) - cy) / self.px_per_um
        return (slice(y0, y1), slice(x0, x1)), xs[None, :], ys[:, None]

    def coverage(self, sdf: np.ndarray, softness_px: float = 1.0) -> np.ndarray:
        return coverage(sdf, self.px_per_um, softness_px)


def coverage(sdf: np.ndarray, px_per_um: float, softness_px: float) -> np.ndarray:
    """Anti-aliased 0..1 coverage of a shape: a linear ramp about ``softness_px`` wide across its edge."""
    return np.clip(0.5 + sdf * (px_per_um / softness_px), 0.0, 1.0)


def ellipse_sdf(x, y, cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    u = (x - cx) * cos + (y - cy) * sin
    v = (y - cy) * cos - (x - cx) * sin
    level = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    # First-order distance: level-set offset divided by its gradient length, exact at the boundary.
    gradient = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2) / np.maximum(level, 1e-6)
    return (1.0 - level) / np.maximum(gradient, 1e-6)


def segment_sdf(x, y, start: tuple[float, float], end: tuple[float, float], half_width: float) -> np.ndarray:
    dx, dy = end[0] - start[0], end[1] - start[1]
    t = np.clip(((x - start[0]) * dx + (y - start[1]) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    return half_width - np.hypot(x - start[0] - t * dx, y - start[1] - t * dy)


def smooth_union(a: np.ndarray, b: np.ndarray, blend_um: float) -> np.ndarray:
    """Union that rounds the junction, so nuclear lobes merge into their strands like soft tissue."""
    h = np.clip(0.5 + 0.5 * (a - b) / blend_um, 0.0, 1.0)
    return b + (a - b) * h + blend_um * h * (1.0 - h)


def wave_field(rng: np.random.Generator, wavelength_um: float, amplitude_um: float, n_waves: int = 5) -> SdfFunction:
    """Smooth random field (sum of plane waves) that bends an outline organically; point-evaluable."""
    angles = rng.uniform(0, 2 * math.pi, n_waves)
    frequencies = 2 * math.pi / (wavelength_um * rng.uniform(0.7, 1.4, n_waves))
    phases = rng.uniform(0, 2 * math.pi, n_waves)
    # Python floats keep float32 grids in float32 (NumPy scalars would promote them to float64).
    waves = [
        (float(f * math.cos(a)), float(f * math.sin(a)), float(p)) for f, a, p in zip(frequencies, angles, phases)
    ]
    scale = amplitude_um * math.sqrt(2.0 / n_waves)

    def field(x, y):
        # cos(kx*x + ky*y + p) expanded, so that on a grid (x a row, y a column) the trigonometry is
        # evaluated on the row and column only and the grid costs two products per wave.
        total = 0.0
        for kx, ky, phase in waves:
            along_x, along_y = kx * x, ky * y + phase
            total = total + (np.cos(along_x) * np.cos(along_y) - np.sin(along_x) * np.sin(along_y))
        return scale * total

    return field


class Outline:
    """A roundish cell outline: radius modulated by low harmonics of the polar angle."""

    def __init__(self, rng: np.random.Generator, radius_um: float, irregularity: float, aspect: float = 1.0) -> None:
        self.radius = radius_um
        amplitudes = irregularity * rng.normal(0, 1, 4) / np.arange(2, 6)
        phases = rng.uniform(0, 2 * math.pi, 4)
        # Harmonics k = 2..5 as (a cos(p), a sin(p)), so cos(k theta + p) needs no trigonometry per pixel.
        self.harmonics = [(float(a * math.cos(p)), float(a * math.sin(p))) for a, p in zip(amplitudes, phases)]
        self.aspect, self.angle = aspect, rng.uniform(0, math.pi)
        self.max_radius = radius_um * (1 + float(np.abs(amplitudes).sum())) * max(aspect, 1 / aspect)

    def sdf(self, x, y) -> np.ndarray:
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        u = (x * cos + y * sin) / self.aspect
        v = (y * cos - x * sin) * self.aspect
        distance = np.hypot(u, v)
        cos_1, sin_1 = u / np.maximum(distance, 1e-6), v / np.maximum(distance, 1e-6)
        cos_k, sin_k = cos_1, sin_1
        boundary = 1.0
        for a_cos, a_sin in self.harmonics:
            cos_k, sin_k = cos_k * cos_1 - sin_k * sin_1, sin_k * cos_1 + cos_k * sin_1  # angle-addition
            boundary = boundary + (a_cos * cos_k - a_sin * sin_k)
        return self.radius * boundary - distance


def texture(rng: np.random.Generator, shape: tuple[int, int], feature_px: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise with blobs about ``feature_px`` across (bicubic upsampling)."""
    height, width = shape
    feature_px = max(feature_px, 1.0)
    coarse = rng.standard_normal(
        (max(2, math.ceil(height / feature_px) + 2), max(2, math.ceil(width / feature_px) + 2)), dtype=np.float32
    )
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    return (smooth - smooth.mean()) / max(float(smooth.std()), 1e-6)


def gaussian_blur(array: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array with zero padding (Pillow cannot blur floats)."""
    if sigma_px < 0.3:
        return array
    radius = max(1, math.ceil(2.5 * sigma_px))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma_px) ** 2).astype(np.float32)
    weights /= weights.sum()
    for axis in (0, 1):
        # Zero padding: nothing lies outside the patch, so nothing may be reflected back in.
        padded = np.pad(array, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        length = array.shape[axis]
        array = sum(w * padded.take(np.arange(i, i + length), axis=axis) for i, w in enumerate(weights))
    return array


def granule_map(
    shape: tuple[int, int],
    points_um: np.ndarray,
    origin_um: tuple[float, float],
    px_per_um: float,
    sigma_um: float,
    peaks: np.ndarray,
) -> np.ndarray:
    """Round dots of Gaussian profile: bilinear splats of each granule, then one blur for all of them."""
    height, width = shape
    sigma_px = max(sigma_um * px_per_um, 0.6)
    col = (points_um[:, 0] - origin_um[0]) * px_per_um - 0.5
    row = (points_um[:, 1] - origin_um[1]) * px_per_um - 0.5
    c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
    fc, fr = col - c0, row - r0
    # Weight so each isolated dot peaks at its amplitude after the blur.
    weight = peaks * (2 * math.pi * sigma_px * sigma_px)
    splat = np.zeros((height, width), np.float32)
    for dr, dc, share in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rows, cols = r0 + dr, c0 + dc
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        np.add.at(splat, (rows[inside], cols[inside]), (weight * share)[inside])
    return gaussian_blur(splat, sigma_px)


def points_inside(
    rng: np.random.Generator, count: int, sdf: SdfFunction, radius_um: float, margin_um: float
) -> np.ndarray:
    """Up to ``count`` uniform points in the shape, at least ``margin_um`` from its edge."""
    if count <= 0:
        return np.zeros((0, 2), np.float32)
    candidates = count * 3 + 8
    r = radius_um * np.sqrt(rng.uniform(0, 1, candidates))
    theta = rng.uniform(0, 2 * math.pi, candidates)
    x, y = r * np.cos(theta), r * np.sin(theta)
    keep = sdf(x, y) > margin_um
    return np.stack([x[keep], y[keep]], axis=1)[:count].astype(np.float32)

