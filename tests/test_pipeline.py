"""The whole pipeline as a user runs it: artefacts, reuse, staleness, status, determinism."""

import csv
import json
import math
import shutil

import numpy as np
import pytest

from aecfe_cli.morphology import DESCRIPTORS, SIZES
from conftest import copy_project as _copy
from conftest import run_cli

pytestmark = pytest.mark.slow


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _status(cwd):
    result = run_cli("status", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return {(r["stage"], r["dataset"]): r["state"] for r in json.loads(result.stdout)}


def _copy_with_config_edit(project, tmp_path, old, new):
    root = _copy(project, tmp_path)
    config = root / "aecfe.yaml"
    config.write_text(config.read_text().replace(old, new))
    return root


def test_run_writes_consistent_interface_files(finished_project):
    root, result = finished_project
    work = root / "aecfe-work"
    for name in ("lab_a", "lab_b"):
        instances = _rows(work / "detect" / name / "instances.csv")
        roi = np.load(work / "detect" / name / "roi_features.npy", mmap_mode="r")
        crops = np.load(work / "detect" / name / "crops.npy", mmap_mode="r")
        features = np.load(work / "extract" / name / "features.npy")
        ids = _rows(work / "extract" / name / "features.csv")
        assert len(instances) == len(roi) == len(crops) == len(features) == len(ids) > 0
        assert roi.shape[1:] == (256, 14, 14) and crops.shape[1:] == (3, 32, 32) and crops.dtype == np.uint8
        columns = [*(f"f{i}" for i in range(50)), *(f"m_{d}" for d in (*DESCRIPTORS, *SIZES))]  # latent, then morphology
        assert features.shape[1] == len(columns) and features.dtype == np.float32
        assert [r["instance_id"] for r in instances] == [r["instance_id"] for r in ids]
        assert list(ids[0])[4:] == columns
        assert np.allclose(np.array([[float(r[c]) for c in columns] for r in ids]), features)
        manifest = json.loads((work / "detect" / name / "manifest.json").read_text())
        assert manifest["counts"]["images"] == 36 and manifest["outputs"]["roi_features.npy"]["sha256"]
    report = json.loads((work / "evaluate" / "lab_a" / "report.json").read_text())
    assert report["source"] == "lab_a" and "lab_b" in report["targets"]
    assert set(report["baselines"]) == {"raw_pixels", "color_histogram", "stain_normalized_histogram"}
    assert set(report["parts"]) == {"latent", "morphology"}
    for file in ("report.md", "embedding.png", "confusion_lab_b.png", "manifest.json"):
        assert (work / "evaluate" / "lab_a" / file).is_file()
    for file in ("model.pt", "history.csv", "loss.png", "manifest.json"):
        assert (work / "train" / file).is_file()
    assert "balanced" in result.stdout  # the Rich table of results


def test_second_run_reuses_everything_and_says_so(finished_project, tmp_path):
    root = _copy(finished_project[0], tmp_path)
    result = run_cli("run", "--data", "lab_a", "--data", "lab_b", cwd=root)
    assert result.returncode == 0, result.stderr
    for line in ("detect lab_a: up to date", "detect lab_b: up to date", "train (lab_a, lab_b): up to date",
                 "extract lab_a: up to date", "evaluate lab_a: up to date"):
        assert line in result.stderr
    assert "detecting" not in result.stderr and "training" not in result.stderr
    assert "no cell found" not in result.stderr  # every image has its cell: no coverage warning
    assert set(_status(root).values()) == {"done"}


def test_touching_a_train_key_recomputes_train_and_after_only(finished_project, tmp_path):
    root = _copy_with_config_edit(finished_project[0], tmp_path, "epochs: 2", "epochs: 3")
    status = _status(root)
    assert status[("detector", "-")] == "done" and status[("detect", "lab_a")] == "done"
    assert status[("train", "lab_a, lab_b")] == "stale"
    assert status[("extract", "lab_a")] == "stale" and status[("evaluate", "lab_a")] == "stale"
    result = run_cli("run", "--data", "lab_a", "--data", "lab_b", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "detect lab_a: up to date" in result.stderr and "detector" not in result.stderr.replace("detect lab", "")
    assert "train (lab_a, lab_b): out of date, training" in result.stderr
    assert "extract lab_a: out of date" in result.stderr and "continuing from epoch 2" in result.stderr
    assert set(_status(root).values()) == {"done"}


def test_touching_a_detect_key_recomputes_detections_not_the_detector(finished_project, tmp_path):
    root = _copy_with_config_edit(finished_project[0], tmp_path, "crop_size: 32", "crop_size: 40")
    status = _status(root)
    assert status[("detector", "-")] == "done" and status[("detect", "lab_b")] == "stale"
    result = run_cli("detect", "--data", "lab_b", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "detector: up to date" in result.stderr
    assert np.load(root / "aecfe-work" / "detect" / "lab_b" / "crops.npy").shape[2] == 40
    status = _status(root)
    assert status[("detect", "lab_b")] == "done" and status[("detect", "lab_a")] == "stale"


def test_detection_precision_is_a_detection_key_and_training_precision_a_detector_key(finished_project, tmp_path):
    """detect.precision sets how cells are detected only; detect.train_precision how the detector was trained."""
    root = _copy_with_config_edit(finished_project[0], tmp_path, "chunk_images: 8", "chunk_images: 8\n  precision: bf16")
    status = _status(root)
    assert status[("detector", "-")] == "done" and status[("detect", "lab_a")] == "stale"
    root = _copy_with_config_edit(finished_project[0], tmp_path / "again", "train_precision: fp32",
                                  "train_precision: bf16")
    assert _status(root)[("detector", "-")] == "stale"


def test_view_consistency_needs_stored_views_and_then_trains_on_them(finished_project, tmp_path):
    """train.view_weight without detect.views: one line naming the missing file and the fix, exit 2. With
    both, detection (not the detector) runs again and stores one view per cell beside its feature."""
    root = _copy_with_config_edit(finished_project[0], tmp_path, "precision: fp32\nevaluate",
                                  "precision: fp32\n  view_weight: 1.0\nevaluate")
    result = run_cli("train", "--data", "lab_a", "--data", "lab_b", cwd=root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(error) == 1 and "roi_views.npy" in error[0] and "detect.views" in error[0]
    config = root / "aecfe.yaml"
    config.write_text(config.read_text().replace("chunk_images: 8", "chunk_images: 8\n  views: 1"))
    result = run_cli("train", "--data", "lab_a", "--data", "lab_b", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "detector: up to date" in result.stderr
    header = next(line for line in result.stdout.splitlines() if "feature" in line and "total" in line)
    assert "views" in header  # the printed table shows every loss term
    assert "R^2" in header  # and whether the feature reconstruction beats every cell's mean feature
    r2 = json.loads((root / "aecfe-work" / "train" / "manifest.json").read_text())["feature_r2"]
    assert r2 <= 1 and f"{r2:.3f}" in result.stdout
    detect = root / "aecfe-work" / "detect" / "lab_a"
    views = np.load(detect / "roi_views.npy")
    assert views.shape == (len(np.load(detect / "roi_features.npy")), 1, 256, 14, 14)
    history = _rows(root / "aecfe-work" / "train" / "history.csv")
    assert all(float(row["views"]) > 0 for row in history)


def test_backbone_pretraining_is_a_detector_key_and_runs_before_detector_training(finished_project, tmp_path):
    root = _copy_with_config_edit(finished_project[0], tmp_path, "train_lr: 0.001",
                                  "train_lr: 0.001\n  pretrain_steps: 2\n  pretrain_batch_size: 4")
    assert _status(root)[("detector", "-")] == "stale"
    result = run_cli("detect", "--data", "lab_a", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "pretraining the detector's backbone" in result.stderr
    obtained = json.loads((root / "aecfe-work" / "detector" / "manifest.json").read_text())["obtained"]
    assert obtained["pretraining"]["steps"] == 2 and obtained["pretraining"]["batch_size"] == 4
    assert obtained["pretraining"]["chance_loss"] == pytest.approx(math.log(7), abs=1e-3)  # 2 x 4 - 1 candidates
    assert obtained["pretraining"]["seconds"] > 0


def test_evaluate_json_is_the_report_only_of_the_forest_asked_for(finished_project, tmp_path):
    root = _copy(finished_project[0], tmp_path)
    result = run_cli("--quiet", "evaluate", "--source", "lab_b", "--target", "lab_a", "--trees", "7", "--json",
                     cwd=root)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source"] == "lab_b" and set(report["in_domain"]) >= {"accuracy", "balanced_accuracy", "macro_f1"}
    assert report["trees"] == 7
    assert result.stderr == ""


def test_same_seed_gives_identical_features_and_report(finished_project, tmp_path):
    root = _copy(finished_project[0], tmp_path)
    shutil.rmtree(root / "aecfe-work")
    result = run_cli("run", "--data", "lab_a", "--data", "lab_b", cwd=root)
    assert result.returncode == 0, result.stderr
    first, second = finished_project[0] / "aecfe-work", root / "aecfe-work"
    for name in ("lab_a", "lab_b"):
        assert (first / "extract" / name / "features.npy").read_bytes() == \
               (second / "extract" / name / "features.npy").read_bytes()
    assert (first / "evaluate/lab_a/report.json").read_bytes() == (second / "evaluate/lab_a/report.json").read_bytes()


def _snapshot(folder):
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*")}


def test_status_writes_nothing_and_judges_a_workdir_made_without_a_config_by_its_own_settings(finished_project, tmp_path):
    """As right after `aecfe demo`, whose settings come from the command: no ./aecfe.yaml to judge by, and
    the built-in defaults would call every stage stale."""
    from conftest import TINY_CONFIG

    root = _copy(finished_project[0], tmp_path)
    (root / "aecfe.yaml").unlink()
    work = root / "aecfe-work"
    saved_config = (work / "config.yaml").read_bytes()
    before = _snapshot(work)
    assert set(_status(root).values()) == {"done"}
    table = run_cli("status", cwd=root)
    assert table.returncode == 0 and "settings: aecfe-work/config.yaml" in " ".join(table.stdout.split())
    (root / "other.yaml").write_text(TINY_CONFIG.replace("epochs: 2", "epochs: 3"))
    result = run_cli("--config", "other.yaml", "status", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    rows = {(r["stage"], r["dataset"]): r for r in json.loads(result.stdout)}
    assert rows[("train", "lab_a, lab_b")]["state"] == "stale"
    assert rows[("train", "lab_a, lab_b")]["changed"] == ["train.epochs 2 -> 3"]
    assert rows[("extract", "lab_a")]["changed"] == ["train is not up to date"]
    assert rows[("detect", "lab_a")]["state"] == "done" and rows[("detect", "lab_a")]["changed"] == []
    assert _snapshot(work) == before and (work / "config.yaml").read_bytes() == saved_config
