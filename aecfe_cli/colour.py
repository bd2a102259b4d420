"""Colour and stain operations on RGB images: what differs most between laboratories.

Every function takes an (H, W, 3) image, uint8 or float in [0, 1]. The detector white-balances its input
(training and detection alike), the label-free segmentation measures optical density against the slide's
own background, and detector training jitters stain and optics to look like other labs.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """Median colour of the brightest 10 % of pixels: the empty slide in any smear or cell crop."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    brightness = pixels.sum(axis=1)
    return np.median(pixels[brightness >= np.percentile(brightness, 90)], axis=0)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    background = background_colour(rgb)
    density = np.clip(-np.log10((rgb.astype(np.float32) + 1) / (background + 1)), 0, 3)
    return ndimage.gaussian_filter(density, (1, 1, 0))


def white_balance_pixels(pixels: np.ndarray) -> np.ndarray:
    """Scale channels so the background (brightest 10 %) becomes neutral at 0.94; gains are bounded so
    an image without visible background is not recoloured wildly."""
    background = background_colour(pixels)
    gains = np.clip(0.94 / np.maximum(background, 1e-3), 0.67, 1.5)
    return np.clip(pixels * gains, 0, 1).astype(np.float32)


def stain_jitter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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
