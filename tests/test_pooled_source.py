"""Several labelled labs as one source (`--source A --source B`): each lab read against its own statistics,
split lab by lab, and named as the pool in the workdir."""

import csv
import json

import numpy as np
import pytest

from aecfe_cli.classify import kept_columns, normalised_features
from aecfe_cli.errors import UserError
from aecfe_cli.evaluate import run_evaluation
from aecfe_cli.feature_sets import FeatureSet, pool
from conftest import copy_project, run_cli

CLASSES = ("lymphocyte_typical", "neutrophil_segmented", "monocyte")


def _lab(name: str, offset: float, seed: int, per_class: int = 20) -> FeatureSet:
    """Three classes apart in column 0; the lab's stain moves every cell by ``offset`` in column 1 alone."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(CLASSES, per_class)
    features = rng.normal(0, 0.3, (len(labels), 3))
    features[:, 0] += np.repeat(np.arange(len(CLASSES)) * 2.0, per_class)
    features[:, 1] += offset
    ids = [f"cell_{index:03d}" for index in range(len(labels))]  # the same ids in every lab
    return FeatureSet(name, features, ids, [f"{i}.png" for i in ids], labels, columns=("f0", "f1", "f2"))


def test_pooled_cells_keep_their_lab_and_unique_ids():
    pooled = pool([_lab("a", 0.0, 0), _lab("b", 5.0, 1, per_class=10)])
    assert pooled.name == "a+b" and len(pooled.features) == 90
    assert len(set(pooled.instance_ids)) == 90 and pooled.instance_ids[60] == "b/cell_000"
    assert [len(rows) for rows in pooled.dataset_rows()] == [60, 30]
    assert pool([_lab("a", 0.0, 0)]).instance_ids[0] == "cell_000"  # one lab is used as it is
    other_columns = _lab("c", 0.0, 2)
    other_columns.columns = ("f0", "f1", "m_area")
    with pytest.raises(UserError, match="different feature columns"):
        pool([_lab("a", 0.0, 0), other_columns])


def test_each_lab_of_a_pool_is_normalised_and_compared_as_a_lab_of_its_own():
    a, b = _lab("a", 0.0, 0), _lab("b", 5.0, 0)  # the same cells under another stain
    pooled = pool([a, b])
    normalised = normalised_features(pooled, "dataset")
    np.testing.assert_allclose(normalised[:60], normalised[60:], atol=1e-5)  # the stain's shift is gone
    np.testing.assert_allclose(normalised[:60], normalised_features(a, "dataset"))
    # As extracted, column 1 moves between the pool's two labs: left out even against a target like lab a.
    kept = kept_columns(pooled, normalised_features(pooled, "none"), normalised_features(a, "none"), 1.5)
    assert kept.tolist() == [True, False, True]


def test_a_pooled_source_is_split_lab_by_lab_and_scored_on_a_third(tmp_path):
    pooled = pool([_lab("a", 0.0, 0), _lab("b", 0.2, 1, per_class=10)])
    report = run_evaluation(pooled, [_lab("c", 0.1, 2)], tmp_path, baselines=False, seed=0)
    assert report["source"] == "a+b" and report["cells_per_class"]["a+b"] == {cls: 30 for cls in CLASSES}
    with open(tmp_path / "split.csv", newline="") as handle:
        held_out = [row["instance_id"] for row in csv.DictReader(handle) if row["split"] == "test"]
    # 20 % of each class of each lab: 4 of every 20, 2 of every 10.
    assert sum(cell.startswith("a/") for cell in held_out) == 12 and sum(cell.startswith("b/") for cell in held_out) == 6
    assert report["targets"]["c"]["balanced_accuracy"] > 0.8  # chance: 0.33
    with pytest.raises(UserError, match="target 'b' is the source"):
        run_evaluation(pooled, [_lab("b", 0.0, 3)], tmp_path / "again", baselines=False)


@pytest.mark.slow
def test_two_labs_train_one_classifier_for_evaluate_predict_and_status(finished_project, tmp_path):
    from aecfe_cli import synth

    root = copy_project(finished_project[0], tmp_path)
    synth.write_cell_dataset(root / "lab_c", "lab_c", per_class=4, seed=1, size=64)
    config = root / "aecfe-work" / "config.yaml"
    result = run_cli("evaluate", "--source", "lab_a", "--source", "lab_b", "--target", "lab_c", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    folder = root / "aecfe-work" / "evaluate" / "lab_a+lab_b"
    assert report["source"] == "lab_a+lab_b" and report == json.loads((folder / "report.json").read_text())
    assert sum(report["cells_per_class"]["lab_a+lab_b"].values()) == 72  # both labs' 36 cells
    assert "lab_c" in report["targets"] and "stain_normalized_histogram" in report["baselines"]
    assert json.loads((folder / "manifest.json").read_text())["sources"] == ["lab_a", "lab_b"]

    status = run_cli("status", cwd=root)
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if "lab_a+lab_b" in line)
    assert "done" in row and "stale" not in row

    predicted = run_cli("predict", "--source", "lab_a", "--source", "lab_b", "--data", "lab_c", "--json", cwd=root)
    assert predicted.returncode == 0, predicted.stderr
    summary = json.loads(predicted.stdout)["lab_c"]
    assert summary["source"] == "lab_a+lab_b"
    with open(root / "aecfe-work" / "predict" / "lab_a+lab_b" / "lab_c" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    scored = [row for row in rows if row["label"] in report["targets"]["lab_c"]["classes"]]
    accuracy = np.mean([row["predicted_class"] == row["label"] for row in scored])
    # predict refits evaluate's classifier: the same labels on the same cells.
    assert accuracy == pytest.approx(report["targets"]["lab_c"]["accuracy"], abs=1e-9)

    saved = config.read_bytes()
    for command, fragment in ((["evaluate", "--source", "lab_a", "--source", "lab_a", "--target", "lab_c"],
                               "--source lab_a given more than once"),
                              (["evaluate", "--source", "lab_a", "--source", "lab_b", "--target", "lab_b"],
                               "--target lab_b is the source"),
                              (["predict", "--source", "lab_a", "--source", "lab_b", "--data", "lab_b"],
                               "--data lab_b is the source")):
        refused = run_cli(*command, cwd=root)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert fragment in refused.stderr.strip().splitlines()[-1]
    assert config.read_bytes() == saved
