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


def augmented_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An (H, W, 3) uint8 image as another lab might show it (``stain_jitter``), for view-consistency features."""
    jittered = stain_jitter(image.astype(np.float32) / 255.0, rng)
    return np.round(jittered * 255.0).astype(np.uint8)


def _rotate_hue(pixels: np.ndarray, angle: float, saturation: float) -> np.ndarray:
    grey_axis = np.full(3, 1 / math.sqrt(3))
    cos, sin = math.cos(angle), math.sin(angle)
    cross = np.array([[0, -grey_axis[2], grey_axis[1]], [grey_axis[2], 0, -grey_axis[0]],
                      [-grey_axis[1], grey_axis[0], 0]])
    rotation = cos * np.eye(3) + sin * cross + (1 - cos) * np.outer(grey_axis, grey_axis)
    grey = pixels.mean(axis=2, keepdims=True)
    rotated = pixels @ rotation.T
    return grey + (rotated - grey) * saturation


# ---------------------------------------------------------------------------------------------------
# Stain normalisation (Reinhard et al. 2001): each dataset's CIELAB channel means and standard deviations
# are mapped onto one fixed reference. Romanowsky stains (MGG, Wright, rapid stains) are not H&E, so
# stain-vector methods built for H&E may not fit; LAB statistics make no assumption about the stain.

# The reference: rounded stained-pixel statistics of 40 images of the PBC sample (CellaVision, MGG).
# Any fixed target would do: what matters is that every dataset is mapped onto the same one.
REFERENCE_LAB = np.array([[62.0, 20.0, -6.0], [16.5, 11.0, 19.0]], np.float32)  # rows: mean, std of L, a, b
_D65_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]], np.float32)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ).astype(np.float32)
_LAB_EPSILON = (6 / 29) ** 3


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8, or float in [0, 1]) to CIELAB (D65), float32 (..., 3): L in [0, 100]."""
    pixels = rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float32)
    linear = np.where(pixels <= 0.04045, pixels / 12.92, ((pixels + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _D65_WHITE
    f = np.where(xyz > _LAB_EPSILON, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) to sRGB uint8, clipped to the gamut."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _D65_WHITE
    linear = np.clip(xyz @ _XYZ_TO_RGB.T, 0, 1)
    pixels = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)
    return np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8)


def lab_statistics(images) -> np.ndarray:
    """(2, 3) mean and standard deviation of L, a, b over the stained pixels of ``images``.

    ``images``: an iterable of RGB arrays, each (H, W, 3) or a batch (n, H, W, 3). Stained = at or below
    each image's Otsu threshold on lightness: nuclei, cytoplasm and red cells, not the empty slide, whose
    share of an image differs between labs and would otherwise set the statistics. When no image has any
    (blank images), every pixel counts.
    """
    stained_sums, every_sums = np.zeros((3, 3)), np.zeros((3, 3))  # rows: count, sum, sum of squares
    for batch in images:
        lab = rgb_to_lab(np.asarray(batch)).astype(np.float64)
        lab = lab.reshape(-1 if lab.ndim == 4 else 1, lab.shape[-3] * lab.shape[-2], 3)
        for sums, pixels in ((stained_sums, lab[stained_pixels(lab[..., 0])]), (every_sums, lab.reshape(-1, 3))):
            sums += [np.full(3, len(pixels)), pixels.sum(axis=0), (pixels**2).sum(axis=0)]
    count, total, squares = stained_sums if stained_sums[0, 0] else every_sums
    if not count[0]:
        raise ValueError("lab_statistics needs at least one image")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-6))
    return np.stack([mean, std]).astype(np.float32)


def stained_pixels(lightness: np.ndarray, bins: int = 64) -> np.ndarray:
    """(n, pixels) L -> boolean mask of the pixels at or below each row's Otsu threshold."""
    n_images = len(lightness)
    binned = np.clip((lightness * (bins / 100.0)).astype(np.int64), 0, bins - 1)
    offsets = (np.arange(n_images) * bins)[:, None]
    counts = np.bincount((binned + offsets).ravel(), minlength=n_images * bins).reshape(n_images, bins)
    share = counts / counts.sum(axis=1, keepdims=True)
    below = np.cumsum(share, axis=1)  # share of pixels at or below each bin
    below_mean = np.cumsum(share * np.arange(bins), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (below_mean[:, -1:] * below - below_mean) ** 2 / (below * (1.0 - below))
    threshold = np.argmax(np.nan_to_num(between, nan=-1.0, posinf=-1.0), axis=1)
    return binned <= threshold[:, None]


def normalise_stain(image: np.ndarray, statistics: np.ndarray, reference: np.ndarray = REFERENCE_LAB) -> np.ndarray:
    """Map RGB uint8 pixels (any shape ending in 3) that follow ``statistics`` (e.g. their dataset's) onto
    ``reference``."""
    lab = rgb_to_lab(image)
    mean, std = statistics
    lab = (lab - mean) / np.maximum(std, 1e-3) * reference[1] + reference[0]
    return lab_to_rgb(lab)


def stain_normalised(image: np.ndarray, mode: str, dataset_statistics: np.ndarray | None) -> np.ndarray:
    """``image`` under a ``config.STAIN_NORMS`` mode: as it is, by its dataset's statistics, or by its own."""
    if mode == "none":
        return image
    if mode == "image":
        return normalise_stain(image, lab_statistics([image]))
    if dataset_statistics is None:
        raise ValueError("stain normalisation by dataset needs the dataset's LAB statistics")
    return normalise_stain(image, dataset_statistics)
