"""A detector that finds few cells is said, not silent: a warning after detection, an error with --strict;
detect.segment_missed gives the images it missed their segmented central cell."""

import csv
import json

import numpy as np
import pytest

from aecfe_cli.config import config_from_dict
from aecfe_cli.detect import coverage_warning
from aecfe_cli.errors import UserError
from conftest import run_cli


def _counts(images, missed, unreadable=0):
    return {"images": images, "cells": images - missed - unreadable, "no_detection": missed, "unreadable": unreadable}


def test_the_warning_starts_above_the_threshold_and_says_what_to_do(tmp_path):
    assert coverage_warning("pbc", _counts(100, 5), 0.05, tmp_path) is None  # 5 % is still fine
    warning = coverage_warning("pbc", _counts(48, 42), 0.05, tmp_path)
    assert "no cell found in 42 of 48 images (88%)" in warning
    for advice in ("more images", "--weights", "--annotations", "longer training budget", str(tmp_path / "manifest.json")):
        assert advice in warning
    assert "\n" not in warning


def test_unreadable_images_are_not_counted_as_missed_cells(tmp_path):
    assert coverage_warning("x", _counts(20, 1, unreadable=10), 0.05, tmp_path) is not None  # 1 of 10 readable
    assert coverage_warning("x", _counts(10, 0, unreadable=10), 0.05, tmp_path) is None


def test_the_threshold_must_be_a_fraction():
    assert config_from_dict({"detect": {"max_missing_fraction": 0.2}}, "c.yaml").detect.max_missing_fraction == 0.2
    with pytest.raises(UserError, match=r"c.yaml: detect.max_missing_fraction: expected a fraction from 0 to 1, got 5"):
        config_from_dict({"detect": {"max_missing_fraction": 5}}, "c.yaml")


@pytest.mark.slow
def test_poor_coverage_warns_goes_into_the_manifest_and_strict_fails(tiny_project):
    # A detector trained for 2 steps keeps almost nothing at the usual score threshold: a lab with too few images.
    config = tiny_project / "aecfe.yaml"
    config.write_text(config.read_text().replace("score_threshold: 0.0", "score_threshold: 0.7"))
    result = run_cli("detect", "--data", "lab_a", cwd=tiny_project)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tiny_project / "aecfe-work" / "detect" / "lab_a" / "manifest.json").read_text())
    missed, images = manifest["counts"]["no_detection"], manifest["counts"]["images"]
    assert missed > 0.05 * images
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"no cell found in {missed} of {images} images" in warnings[0]
    assert manifest["warnings"] == [warnings[0].removeprefix("warning: ")]
    strict = run_cli("detect", "--data", "lab_a", "--strict", cwd=tiny_project)  # reuses the detections
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    errors = [line for line in strict.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no cell found" in errors[0] and "--strict" in errors[0]


@pytest.mark.slow
def test_segment_missed_gives_the_images_the_detector_missed_their_central_cell(tiny_project):
    # A detector trained for 2 steps keeps almost nothing at the usual score threshold.
    config = tiny_project / "aecfe.yaml"
    config.write_text(config.read_text().replace("score_threshold: 0.0", "score_threshold: 0.7"))
    assert run_cli("detect", "--data", "lab_a", cwd=tiny_project).returncode == 0
    work = tiny_project / "aecfe-work"
    detector = json.loads((work / "detector" / "manifest.json").read_text())
    before = json.loads((work / "detect" / "lab_a" / "manifest.json").read_text())["counts"]
    config.write_text(config.read_text().replace("score_threshold: 0.7", "score_threshold: 0.7\n  segment_missed: true"))
    result = run_cli("detect", "--data", "lab_a", cwd=tiny_project)
    assert result.returncode == 0, result.stderr
    assert json.loads((work / "detector" / "manifest.json").read_text()) == detector  # detections alone are redone
    manifest = json.loads((work / "detect" / "lab_a" / "manifest.json").read_text())
    counts = manifest["counts"]
    with open(work / "detect" / "lab_a" / "instances.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    segmented = [row for row in rows if row["found_by"] == "segmentation"]
    # Synthetic cells are plain to segment: nearly every missed image gets its cell; the detector's own stay.
    assert counts["segmented"] == len(segmented) >= 0.8 * before["no_detection"] > 0
    assert counts["no_detection"] == before["no_detection"] - len(segmented)
    assert counts["cells"] == len(rows) == before["cells"] + len(segmented)
    assert len(np.load(work / "detect" / "lab_a" / "roi_features.npy", mmap_mode="r")) == len(rows)
    for row in segmented:  # the synthetic cell sits at the centre of its 64-px image
        x0, y0, x1, y1 = (float(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert x0 < 32 < x1 and y0 < 32 < y1 and 10 < x1 - x0 < 60 and float(row["score"]) == 0.0
    assert "of them segmented" in result.stdout
