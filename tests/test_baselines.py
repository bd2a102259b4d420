"""The label-free baselines: colour conversions, stain normalisation and the descriptors evaluate scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aecfe_cli.baselines import baseline_features, lab_statistics, normalise_stain
from aecfe_cli.colour import lab_to_rgb, rgb_to_lab
from aecfe_cli.errors import UserError
from aecfe_cli.evaluate import run_evaluation
from aecfe_cli.feature_sets import FeatureSet

CLASS_COLOURS = {"monocyte": (120, 70, 150), "lymphocyte_typical": (70, 50, 140), "eosinophil": (190, 90, 80)}


def blob_crops(labels: list[str], seed: int, size: int = 32) -> np.ndarray:
    """Crops of a stained disc (colour and radius by class, jittered) on a pale slide background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    crops = np.empty((len(labels), 3, size, size), np.uint8)
    for index, label in enumerate(labels):
        radius = size * (0.2 + 0.05 * list(CLASS_COLOURS).index(label)) + rng.normal(0, 0.8)
        inside = (yy - size / 2 + rng.normal(0, 1)) ** 2 + (xx - size / 2 + rng.normal(0, 1)) ** 2 < radius**2
        colour = np.array(CLASS_COLOURS[label]) + rng.normal(0, 8, 3)
        image = np.where(inside[..., None], colour, (235, 225, 230)) + rng.normal(0, 3, (size, size, 3))
        crops[index] = np.clip(image, 0, 255).transpose(2, 0, 1)
    return crops


def restain(crops: np.ndarray, scale=(0.85, 0.7, 1.2), shift=(6.0, -5.0, 9.0)) -> np.ndarray:
    """Another lab's colours: a per-channel affine change of the crops' CIELAB values."""
    lab = rgb_to_lab(np.moveaxis(crops, 1, -1)) * np.array(scale, np.float32) + np.array(shift, np.float32)
    return np.moveaxis(lab_to_rgb(lab), -1, 1)


def test_stain_statistics_use_the_stained_pixels_not_the_slide() -> None:
    crops = blob_crops(["monocyte"] * 4, seed=0)
    mean, std = lab_statistics(crops, chunk_size=3)
    disc = rgb_to_lab(np.array(CLASS_COLOURS["monocyte"], np.uint8))
    assert mean == pytest.approx(disc, abs=3.0)  # the disc's colour, not a mix with the background
    assert std[0] < 5.0


def test_a_restained_lab_gets_near_identical_normalised_histograms() -> None:
    labels = [cls for cls in CLASS_COLOURS for _ in range(10)]
    source = blob_crops(labels, seed=0)
    target = restain(source)
    reference = lab_statistics(source)
    plain = [baseline_features(crops, "color_histogram") for crops in (source, target)]
    normalised = [baseline_features(crops, "stain_normalized_histogram", reference=reference) for crops in (source, target)]
    plain_distance = np.abs(plain[0] - plain[1]).sum(axis=1).mean()
    normalised_distance = np.abs(normalised[0] - normalised[1]).sum(axis=1).mean()
    assert plain_distance > 4.0  # of at most 12: six histograms that barely overlap
    assert normalised_distance < 0.15 * plain_distance
    # Normalised onto its own statistics, a lab keeps its colours (up to rounding).
    own = normalise_stain(source, reference, reference).astype(int)
    assert np.abs(own - source).max() <= 2


def test_baseline_features_are_the_same_in_any_chunk_size_and_from_a_memmap(tmp_path: Path) -> None:
    crops = np.random.default_rng(0).integers(0, 256, size=(23, 3, 32, 32), dtype=np.uint8)
    np.save(tmp_path / "crops.npy", crops)
    mapped = np.load(tmp_path / "crops.npy", mmap_mode="r")
    pixels = baseline_features(crops, "raw_pixels")
    assert pixels.shape == (23, 3 * 16 * 16)
    assert np.allclose(pixels, baseline_features(mapped, "raw_pixels", chunk_size=5))
    # Block means of 2x2 pixels, scaled to [0, 1], for the first and the last crop.
    assert pixels[0, 0] == pytest.approx(crops[0, 0, :2, :2].mean() / 255.0)
    assert pixels[-1, -1] == pytest.approx(crops[-1, 2, -2:, -2:].mean() / 255.0)

    histograms = baseline_features(crops, "color_histogram")
    assert histograms.shape == (23, 6 * 16)
    assert np.allclose(histograms, baseline_features(mapped, "color_histogram", chunk_size=4))
    assert np.allclose(histograms.reshape(23, 6, 16).sum(axis=2), 1.0)
    red_counts, _ = np.histogram(crops[-1, 0], bins=16, range=(0, 256))
    assert np.allclose(histograms[-1, :16], red_counts / (32 * 32))

    normalised = baseline_features(crops, "stain_normalized_histogram")
    assert normalised.shape == (23, 6 * 16)
    assert np.allclose(normalised, baseline_features(mapped, "stain_normalized_histogram", chunk_size=4), atol=1e-3)
    with pytest.raises(UserError, match="raw_pixels"):
        baseline_features(crops, "raw_pixel")


def _cells(name: str, crops: np.ndarray, labels: list[str]) -> FeatureSet:
    # Features that carry no class information: only the baselines can learn here.
    features = np.random.default_rng(len(name)).normal(size=(len(labels), 4)).astype(np.float32)
    ids = [f"{name}-{i}" for i in range(len(labels))]
    return FeatureSet(name, features, ids, [f"{i}.png" for i in range(len(labels))], labels, crops)


def test_evaluate_reports_the_stain_normalised_baseline_and_it_survives_a_stain_change(tmp_path: Path) -> None:
    labels = [cls for cls in CLASS_COLOURS for _ in range(30)]
    source = _cells("lab_one", blob_crops(labels, seed=0), labels)
    target = _cells("lab_two", restain(blob_crops(labels, seed=1)), labels)
    report = run_evaluation(source, [target], tmp_path)
    assert set(report["baselines"]) == {"raw_pixels", "color_histogram", "stain_normalized_histogram"}
    normalised = report["baselines"]["stain_normalized_histogram"]
    plain = report["baselines"]["color_histogram"]
    assert normalised["targets"]["lab_two"]["balanced_accuracy"] > 0.9
    assert plain["targets"]["lab_two"]["balanced_accuracy"] < 0.7
    assert "stain_normalized_histogram" in report["domain_mixing"]["methods"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| stain-normalised colour histogram |" in markdown
    assert "best simple method" in markdown


def test_statistics_handed_in_give_the_descriptors_computed_from_the_crops() -> None:
    # evaluate hands the source's statistics in (they are also the reference) to save a pass over its crops.
    crops = np.random.default_rng(0).integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
    reference = lab_statistics(crops[:20])
    computed = baseline_features(crops, "stain_normalized_histogram", reference=reference)
    handed_in = baseline_features(crops, "stain_normalized_histogram", reference=reference,
                                  statistics=lab_statistics(crops))
    assert np.array_equal(computed, handed_in)
    wrong = baseline_features(crops, "stain_normalized_histogram", reference=reference, statistics=reference)
    assert not np.array_equal(computed, wrong)
