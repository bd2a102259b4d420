"""`aecfe predict` as a user runs it on a trained tiny project: unlabelled folders, shifted labs, bad input."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import copy_project, run_cli

pytestmark = pytest.mark.slow


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _flat_copy(folder, target):
    """Every image of a class-folder dataset in one folder, without its labels (the class stays in the name)."""
    target.mkdir()
    for image in sorted(folder.glob("*/*.png")):
        shutil.copy(image, target / image.name)
    return target


def _one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


@pytest.fixture(scope="module")
def predicted(finished_project, tmp_path_factory):
    """predict lab_a -> an unlabelled copy of lab_b and a folder of images that are not blood cells."""
    root = copy_project(finished_project[0], tmp_path_factory.mktemp("predict"))
    _flat_copy(root / "lab_b", root / "lab_b_unlabelled")
    noise = root / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for index in range(24):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise / f"noise_{index:02d}.png")
    result = run_cli("predict", "--source", "lab_a", "--data", "lab_b_unlabelled", "--data", "noise", "--json",
                     cwd=root)
    assert result.returncode == 0, result.stderr
    return root, result


def test_predictions_on_an_unlabelled_copy_agree_with_evaluate_on_the_labelled_lab(predicted):
    root, result = predicted
    work = root / "aecfe-work"
    summary = json.loads(result.stdout)["lab_b_unlabelled"]
    assert summary["source"] == "lab_a" and summary["in_training"] is False
    rows = _rows(work / "predict" / "lab_a" / "lab_b_unlabelled" / "predictions.csv")
    assert len(rows) == summary["counts"]["cells"] == 36 and {row["label"] for row in rows} == {"unlabelled"}
    truth = [row["image"].split("_", 2)[2].rsplit("_", 1)[0] for row in rows]  # lab_b_<class>_NNNN.png
    accuracy = np.mean([row["predicted_class"] == cls for row, cls in zip(rows, truth)])
    report = json.loads((work / "evaluate" / "lab_a" / "report.json").read_text())
    assert accuracy == pytest.approx(report["targets"]["lab_b"]["accuracy"], abs=1 / 36 + 1e-9)

    counts = _rows(work / "predict" / "lab_a" / "lab_b_unlabelled" / "counts.csv")
    assert [row["scope"] for row in counts] == ["image"] * 36 + ["dataset"]
    manifest = json.loads((work / "predict" / "lab_a" / "lab_b_unlabelled" / "manifest.json").read_text())
    assert manifest["stage"] == "predict" and "summary.json" in manifest["outputs"]
    assert any(name.startswith("montage_") for name in manifest["outputs"])


def test_images_that_are_not_blood_cells_lie_far_and_are_flagged(predicted):
    # The tiny two-epoch model barely tells the synthetic labs apart, so a third lab is measured at demo
    # scale (README); noise must stand out even here.
    root, result = predicted
    summaries = json.loads(result.stdout)
    like_training, noise = summaries["lab_b_unlabelled"]["shift"], summaries["noise"]["shift"]
    assert noise["warning"] is True and summaries["noise"]["in_training"] is False
    assert noise["fraction_beyond"] > like_training["fraction_beyond"] + 0.3, (noise, like_training)
    # Scores are medians over the source's held-out median: 1 = like unseen source cells. The encoder maps
    # noise somewhere among the cells it knows, so its distance need not stand out; the reconstruction error is
    # the measure that must (the module's design, predict.py).
    assert noise["reconstruction"]["score"] > like_training["reconstruction"]["score"] + 0.3, (noise, like_training)
    assert "warning: noise lies outside what the classifier saw" in result.stderr
    assert "aecfe train --data lab_a --data noise" in result.stderr


def test_a_second_run_reuses_the_predictions(predicted, tmp_path):
    root = copy_project(predicted[0], tmp_path)
    again = run_cli("predict", "--source", "lab_a", "--data", "lab_b_unlabelled", cwd=root)
    assert again.returncode == 0, again.stderr
    assert "predict lab_a -> lab_b_unlabelled: up to date, reusing" in again.stderr
    messages = " ".join(again.stderr.split())  # Rich wraps long lines when stderr is not a terminal
    assert "lab_b_unlabelled: not among the datasets the autoencoder was trained on (lab_a, lab_b)" in messages
    assert "differential count" in again.stdout and "rejected" in again.stdout
    # Another forest size is another classifier: predicted again, and the summary says with how many trees.
    smaller = run_cli("predict", "--source", "lab_a", "--data", "lab_b_unlabelled", "--trees", "7", "--json", cwd=root)
    assert smaller.returncode == 0, smaller.stderr
    assert "up to date" not in smaller.stderr and json.loads(smaller.stdout)["lab_b_unlabelled"]["trees"] == 7


def test_smear_fields_get_per_field_counts_and_geojson(finished_project, tmp_path):
    from aecfe_cli import synth

    root = copy_project(finished_project[0], tmp_path)
    synth.write_field_dataset(root / "fields_source", "lab_b", n_fields=3, seed=0, cells_per_field=(2, 3))
    fields = root / "fields"
    shutil.copytree(root / "fields_source" / "images", fields)  # the images only, no masks
    result = run_cli("predict", "--source", "lab_a", "--data", "fields", "--all-cells", "--format", "geojson",
                     "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["fields"]
    assert [entry["image"] for entry in summary["images"]] == ["field_0000.png", "field_0001.png", "field_0002.png"]
    assert sum(entry["cells"] for entry in summary["images"]) == summary["counts"]["cells"]
    assert max(entry["cells"] for entry in summary["images"]) >= 2  # every cell of a field, not the central one
    folder = root / "aecfe-work" / "predict" / "lab_a" / "fields"
    features = [feature for file in summary["files"]["geojson"]
                for feature in json.loads((folder / file).read_text())["features"]]
    assert len(features) == summary["counts"]["cells"]
    assert features[0]["properties"]["objectType"] == "detection"


def test_bad_input_gives_one_line_and_exit_2(finished_project, tmp_path):
    root = copy_project(finished_project[0], tmp_path)
    _one_line_error(run_cli("predict", "--source", "lab_a", "--data", "./no_such_folder", cwd=root), "no_such_folder")
    _one_line_error(run_cli("predict", "--source", "lab_a", "--data", "lab_a", cwd=root), "is the source")
    (root / "empty").mkdir()
    _one_line_error(run_cli("predict", "--source", "lab_a", "--data", "empty", cwd=root), "holds no images")
    broken = root / "broken"
    broken.mkdir()
    for index in range(3):
        (broken / f"scan_{index}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _one_line_error(run_cli("predict", "--source", "lab_a", "--data", "broken", cwd=root),
                    "no cell was detected in any of its 3 images")
    _flat_copy(root / "lab_b", root / "lab_b_flat")
    _one_line_error(run_cli("predict", "--source", "lab_b_flat", "--data", "lab_a", cwd=root),
                    "source 'lab_b_flat' has a single class (unlabelled)")
    _one_line_error(run_cli("predict", "--source", "lab_a", "--data", "lab_b", "--all-cells", cwd=root),
                    "--all-cells: lab_b trained the autoencoder")


def test_classes_named_for_the_new_lab_are_the_only_ones_learnt(finished_project, tmp_path):
    root = copy_project(finished_project[0], tmp_path)
    three = ["neutrophil_segmented", "lymphocyte_typical", "monocyte"]
    result = run_cli("predict", "--source", "lab_a", "--data", "lab_b", "--classes", ",".join(three), "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["lab_b"]
    assert summary["classes"] == three and summary["classes_left_out"] == ["basophil", "eosinophil", "myeloblast"]
    with open(root / "aecfe-work" / "predict" / "lab_a" / "lab_b" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["predicted_class"] for row in rows} <= set(three) and "prob_basophil" not in rows[0]
    report = run_cli("evaluate", "--source", "lab_a", "--target", "lab_b", "--classes", ",".join(three), "--json",
                     cwd=root)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["classes_left_out"] == ["basophil", "eosinophil", "myeloblast"]
    # A class the source lacks fails before any work, naming the source's classes.
    for command in (["predict", "--source", "lab_a", "--data", "lab_b"], ["evaluate", "--source", "lab_a", "--target", "lab_b"]):
        _one_line_error(run_cli(*command, "--classes", "monocyte,neutrophil", "--force", cwd=root),
                        "evaluate.classes names 'neutrophil' (did you mean 'neutrophil_segmented'?)", "lab_a")
    assert json.loads(report.stdout) == json.loads(
        (root / "aecfe-work" / "evaluate" / "lab_a" / "report.json").read_text())  # the refused run wrote nothing
    every = run_cli("evaluate", "--source", "lab_a", "--target", "lab_b", "--classes", "all", "--json", cwd=root)
    assert every.returncode == 0 and json.loads(every.stdout)["classes_left_out"] == [], every.stderr
