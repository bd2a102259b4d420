"""Colour spaces and stain normalisation: the operations that make two labs' images comparable."""

from __future__ import annotations

import numpy as np
import pytest

from aecfe_cli import colour
from aecfe_cli.detect import stain_statistics
from aecfe_cli.errors import UserError


def test_lab_matches_published_values_and_round_trips():
    rgb = np.array([[255, 255, 255], [255, 0, 0], [0, 0, 255], [0, 0, 0]], np.uint8)
    expected = [[100, 0, 0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86], [0, 0, 0]]
    assert np.allclose(colour.rgb_to_lab(rgb), expected, atol=0.02)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    assert np.array_equal(colour.lab_to_rgb(colour.rgb_to_lab(pixels)), pixels)


def _smear(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((64, 64, 3), (225, 205, 215), np.uint8)
    image[20:44, 20:44] = (120, 60, 150)  # a purple nucleus
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def test_a_lab_with_another_stain_is_mapped_onto_the_same_colours():
    """Lab B is lab A with a yellower lamp and weaker stain (an affine change of L, a, b): after
    per-dataset normalisation both labs' images agree, and their statistics equal the reference."""
    lab_a = [_smear(seed) for seed in range(4)]
    lab_b = []
    for image in lab_a:
        lab = colour.rgb_to_lab(image)
        lab = lab * np.array([0.8, 0.6, 0.7]) + np.array([12.0, -3.0, 15.0])
        lab_b.append(colour.lab_to_rgb(lab))
    before = np.abs(lab_a[0].astype(int) - lab_b[0].astype(int)).mean()
    stats_a, stats_b = colour.lab_statistics(lab_a), colour.lab_statistics(lab_b)
    normalised_a = [colour.stain_normalised(image, "dataset", stats_a) for image in lab_a]
    normalised_b = [colour.stain_normalised(image, "dataset", stats_b) for image in lab_b]
    after = np.abs(normalised_a[0].astype(int) - normalised_b[0].astype(int)).mean()
    assert before > 15 and after < 2.5
    assert np.allclose(_stained_statistics(lab_a, normalised_a), colour.REFERENCE_LAB, atol=1.0)


def _stained_statistics(originals, normalised) -> np.ndarray:
    """LAB mean and std of the normalised images over the pixels that were stained before."""
    pixels = []
    for before, after in zip(originals, normalised):
        lightness = colour.rgb_to_lab(before)[..., 0].reshape(1, -1)
        pixels.append(colour.rgb_to_lab(after).reshape(-1, 3)[colour.stained_pixels(lightness)[0]])
    pixels = np.concatenate(pixels)
    return np.stack([pixels.mean(axis=0), pixels.std(axis=0)])


def test_stain_norm_modes(tmp_path):
    image = _smear(0)
    assert colour.stain_normalised(image, "none", None) is image
    by_itself = colour.stain_normalised(image, "image", None)
    assert np.allclose(_stained_statistics([image], [by_itself]), colour.REFERENCE_LAB, atol=1.0)
    assert stain_statistics([tmp_path / "x.png"], "none") is None
