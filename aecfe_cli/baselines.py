"""Label-free baselines computed from the cell crops, so a reader sees what the learned features add.

Three descriptors, each scored under the same split and classifier as the AE-CFE features:

* ``raw_pixels``: the crop averaged down to 16x16 pixels, then PCA to the feature dimension;
* ``color_histogram``: histograms of R, G, B, hue, saturation and value;
* ``stain_normalized_histogram``: the same histograms after Reinhard stain normalisation, the usual
  simple answer to a change of stain or lamp (Reinhard et al. 2001; Macenko-style methods need a stain
  model). Each dataset's crops go to CIELAB; every channel is standardised with that dataset's own mean
  and standard deviation over its stained pixels (the darker side of each crop's Otsu threshold on
  lightness: white and red cells, not the empty slide, whose share of a crop differs between labs), then
  mapped onto the source's statistics and back to RGB. A lab whose colours differ from the source's by a
  per-channel shift and scale in CIELAB gets the source's colours.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.decomposition import PCA

from .errors import UserError, did_you_mean

BASELINES = {
    "raw_pixels": "crop averaged down to 16x16 pixels, PCA to the AE-CFE dimension (fitted on source training cells)",
    "color_histogram": "16-bin histograms of R, G, B, hue, saturation and value over the crop",
    "stain_normalized_histogram": (
        "the colour histogram after per-dataset Reinhard normalisation: CIELAB channels standardised with the "
        "dataset's mean and std over its stained pixels (darker side of each crop's Otsu threshold on L), "
        "mapped onto the source's"
    ),
}
# sRGB (D65) -> CIE XYZ, and the D65 white point (IEC 61966-2-1; Lindbloom's tables).
_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_LAB_EPSILON = 6.0 / 29.0
# Lightness histogram resolution of the per-crop Otsu threshold (L runs 0..100).
_OTSU_BINS = 64


def baseline_features(
    crops: np.ndarray,
    kind: str,
    *,
    reference: np.ndarray | None = None,
    pixel_size: int = 16,
    histogram_bins: int = 16,
    chunk_size: int = 128,
) -> np.ndarray:
    """Label-free descriptors of (N, 3, S, S) uint8 crops, computed chunk by chunk (memmap-friendly).

    ``raw_pixels``: the crop block-averaged to ``pixel_size`` squared, in [0, 1], flattened; project it with
    :func:`fit_projection` fitted on the source training cells. ``color_histogram``: per-crop normalised
    histograms of R, G, B, hue, saturation and value. ``stain_normalized_histogram``: the same histograms of
    the crops stain-normalised onto ``reference`` (the source's :func:`lab_statistics`; default: these crops'
    own, which changes little).
    """
    if kind not in BASELINES:
        raise UserError(
            f"unknown baseline '{kind}'{did_you_mean(kind, tuple(BASELINES))}; choose one of {', '.join(BASELINES)}"
        )
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be (N, 3, S, S), got {crops.shape}")
    if kind == "raw_pixels":
        if min(crops.shape[2:]) < pixel_size:
            raise UserError(
                f"crops of {crops.shape[2]}x{crops.shape[3]} pixels are smaller than the "
                f"{pixel_size}x{pixel_size} raw-pixel baseline"
            )
        dimension = 3 * pixel_size * pixel_size

        def describe(chunk: np.ndarray) -> np.ndarray:
            return _block_means(chunk, pixel_size)

    elif kind == "color_histogram":
        dimension = 6 * histogram_bins

        def describe(chunk: np.ndarray) -> np.ndarray:
            return _colour_histograms(chunk, histogram_bins)

    else:
        dimension = 6 * histogram_bins
        own = lab_statistics(crops, chunk_size)
        target = own if reference is None else reference

        def describe(chunk: np.ndarray) -> np.ndarray:
            return _colour_histograms(normalise_stain(chunk, own, target), histogram_bins)

    descriptors = np.empty((len(crops), dimension), dtype=np.float32)
    for start, chunk in _chunks(crops, chunk_size):
        descriptors[start : start + len(chunk)] = describe(chunk)
    return descriptors


def _chunks(crops: np.ndarray, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(crops), chunk_size):
        yield start, np.asarray(crops[start : start + chunk_size])


def _block_means(chunk: np.ndarray, size: int) -> np.ndarray:
    """Area-average each crop to size x size (any S >= size, no resampling library needed)."""
    height, width = chunk.shape[2:]
    row_starts = np.linspace(0, height, size + 1).astype(int)[:-1]
    col_starts = np.linspace(0, width, size + 1).astype(int)[:-1]
    sums = np.add.reduceat(np.add.reduceat(chunk.astype(np.float32), row_starts, axis=2), col_starts, axis=3)
    areas = np.outer(np.diff(np.append(row_starts, height)), np.diff(np.append(col_starts, width)))
    return (sums / (areas * 255.0)).reshape(len(chunk), -1)


def _colour_histograms(chunk: np.ndarray, bins: int) -> np.ndarray:
    n_crops = len(chunk)
    rgb = chunk.reshape(n_crops, 3, -1)
    channels = np.concatenate([rgb, _hsv(rgb)], axis=1).astype(np.int32)  # (n, 6, pixels), values 0..255
    bin_index = channels * bins // 256 + (np.arange(n_crops * 6) * bins).reshape(n_crops, 6, 1)
    counts = np.bincount(bin_index.ravel(), minlength=n_crops * 6 * bins).reshape(n_crops, 6 * bins)
    return (counts / rgb.shape[2]).astype(np.float32)


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """(n, 3, pixels) uint8 RGB -> (n, 3, pixels) uint8 HSV, every channel scaled to 0..255."""
    red, green, blue = (rgb[:, channel].astype(np.float32) / 255.0 for channel in range(3))
    value = np.maximum(np.maximum(red, green), blue)
    chroma = value - np.minimum(np.minimum(red, green), blue)
    saturation = np.divide(chroma, value, out=np.zeros_like(value), where=value > 0)
    safe_chroma = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        value == red,
        ((green - blue) / safe_chroma) % 6.0,
        np.where(value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0),
    )
    hue = np.where(chroma > 0, hue / 6.0, 0.0)
    return np.clip(np.stack([hue, saturation, value], axis=1) * 255.0, 0, 255).astype(np.uint8)


def fit_projection(train_descriptors: np.ndarray, n_components: int, seed: int) -> PCA:
    """PCA fitted on the source training cells only, so no test or target cell shapes the baseline."""
    n_components = min(n_components, *train_descriptors.shape)
    return PCA(n_components=n_components, svd_solver="full", random_state=seed).fit(train_descriptors)


# ---------------------------------------------------------------------------------- stain normalisation


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB values 0..255 (any shape ending in 3) -> CIELAB (L 0..100, a, b), D65 white, float32."""
    linear = np.asarray(rgb, dtype=np.float32) / 255.0
    linear = np.where(linear <= 0.04045, linear / 12.92, ((linear + 0.055) / 1.055) ** 2.4)
    xyz = linear @ (_RGB_TO_XYZ / _WHITE_D65[:, None]).T.astype(np.float32)
    f = np.where(xyz > _LAB_EPSILON**3, np.cbrt(xyz), xyz / (3 * _LAB_EPSILON**2) + 4.0 / 29.0)
    return np.stack(
        [116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], axis=-1
    ).astype(np.float32)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (any shape ending in 3) -> sRGB 0..255 as float32; colours outside sRGB are clipped."""
    lab = np.asarray(lab, dtype=np.float32)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    xyz = np.where(f > _LAB_EPSILON, f**3, 3 * _LAB_EPSILON**2 * (f - 4.0 / 29.0)) * _WHITE_D65.astype(np.float32)
    linear = np.clip(xyz @ _XYZ_TO_RGB.T.astype(np.float32), 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return (255.0 * srgb).astype(np.float32)


def lab_statistics(crops: np.ndarray, chunk_size: int = 128) -> np.ndarray:
    """(2, 3) float64: mean and standard deviation of L, a, b over the stained pixels of all ``crops``.

    Stained = at or below each crop's Otsu threshold on lightness; when no crop has any (blank crops), every
    pixel counts.
    """
    total, squares, count = np.zeros(3), np.zeros(3), 0
    every_total, every_squares, every_count = np.zeros(3), np.zeros(3), 0
    for _, chunk in _chunks(crops, chunk_size):
        lab = rgb_to_lab(np.moveaxis(chunk, 1, -1)).reshape(len(chunk), -1, 3).astype(np.float64)
        stained = lab[_stained_pixels(lab[..., 0])]
        total += stained.sum(axis=0)
        squares += (stained**2).sum(axis=0)
        count += len(stained)
        every_total += lab.sum(axis=(0, 1))
        every_squares += (lab**2).sum(axis=(0, 1))
        every_count += lab.shape[0] * lab.shape[1]
    if count == 0:
        total, squares, count = every_total, every_squares, every_count
    if count == 0:
        raise ValueError("no crops to take stain statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return np.stack([mean, std])


def _stained_pixels(lightness: np.ndarray) -> np.ndarray:
    """(n, pixels) L -> boolean mask of the pixels at or below each row's Otsu threshold."""
    n_crops = len(lightness)
    bins = np.clip((lightness * (_OTSU_BINS / 100.0)).astype(np.int64), 0, _OTSU_BINS - 1)
    offsets = (np.arange(n_crops) * _OTSU_BINS)[:, None]
    counts = np.bincount((bins + offsets).ravel(), minlength=n_crops * _OTSU_BINS).reshape(n_crops, _OTSU_BINS)
    share = counts / counts.sum(axis=1, keepdims=True)
    below = np.cumsum(share, axis=1)  # share of pixels at or below each bin
    below_mean = np.cumsum(share * np.arange(_OTSU_BINS), axis=1)
    overall_mean = below_mean[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (overall_mean * below - below_mean) ** 2 / (below * (1.0 - below))
    threshold = np.argmax(np.nan_to_num(between, nan=-1.0, posinf=-1.0), axis=1)
    return bins <= threshold[:, None]


def normalise_stain(chunk: np.ndarray, statistics: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(n, 3, S, S) uint8 crops whose CIELAB channels follow ``statistics`` -> crops following ``reference``."""
    lab = rgb_to_lab(np.moveaxis(chunk, 1, -1))
    mean, std = statistics.astype(np.float32)
    reference_mean, reference_std = reference.astype(np.float32)
    mapped = (lab - mean) / np.maximum(std, 1e-6) * reference_std + reference_mean
    rgb = np.clip(np.rint(lab_to_rgb(mapped)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(rgb, -1, 1))
