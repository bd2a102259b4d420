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

from . import colour
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


def baseline_features(
    crops: np.ndarray,
    kind: str,
    *,
    reference: np.ndarray | None = None,
    statistics: np.ndarray | None = None,
    pixel_size: int = 16,
    histogram_bins: int = 16,
    chunk_size: int = 128,
) -> np.ndarray:
    """Label-free descriptors of (N, 3, S, S) uint8 crops, computed chunk by chunk (memmap-friendly).

    ``raw_pixels``: the crop block-averaged to ``pixel_size`` squared, in [0, 1], flattened; project it with
    :func:`fit_projection` fitted on the source training cells. ``color_histogram``: per-crop normalised
    histograms of R, G, B, hue, saturation and value. ``stain_normalized_histogram``: the same histograms of
    the crops stain-normalised onto ``reference`` (the source's :func:`lab_statistics`; default: these crops'
    own, which changes little). ``statistics``: these crops' own :func:`lab_statistics` where the caller has
    them already (the source's are also the reference), which saves a pass over every crop.
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
        own = lab_statistics(crops, chunk_size) if statistics is None else statistics
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


def lab_statistics(crops: np.ndarray, chunk_size: int = 128) -> np.ndarray:
    """(2, 3): mean and standard deviation of L, a, b over the stained pixels of all (N, 3, S, S) ``crops``."""
    return colour.lab_statistics(np.moveaxis(chunk, 1, -1) for _, chunk in _chunks(crops, chunk_size))


def normalise_stain(chunk: np.ndarray, statistics: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(n, 3, S, S) uint8 crops whose CIELAB channels follow ``statistics`` -> crops following ``reference``."""
    moved = colour.normalise_stain(np.moveaxis(chunk, 1, -1), statistics, reference)
    return np.ascontiguousarray(np.moveaxis(moved, -1, 1))
