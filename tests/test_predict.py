"""The prediction stage on synthetic Gaussian class clusters: labels, reject option, counts, shift, files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from aecfe_cli import autoencoder as ae
from aecfe_cli.config import EvaluateConfig, PredictConfig
from aecfe_cli.errors import UserError
from aecfe_cli.evaluate import run_evaluation
from aecfe_cli.extract import reconstruction_errors
from aecfe_cli.io import write_npy
from aecfe_cli.feature_sets import FeatureSet
from aecfe_cli.labels import haematology_sorted
from aecfe_cli.predict import calibrate_rejection, classifier_columns, classify, fit_source, run_prediction, summary_outputs
from test_evaluate import FINE_FOUR, make_set


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _boxes(cells: FeatureSet) -> list[dict]:
    """Detector boxes, every tenth the segmentation's stand-in for a missed cell (detect.segment_missed)."""
    return [{"x0": "1.0", "y0": "2.0", "x1": "11.0", "y1": "12.0", "score": "0.0" if i % 10 == 0 else "0.9",
             "found_by": "segmentation" if i % 10 == 0 else "detector"} for i in range(len(cells.instance_ids))]


def _errors(cells: FeatureSet, level: float = 1.0) -> np.ndarray:
    """Reconstruction errors around ``level`` (the source's cells are reconstructed at about 1)."""
    return np.random.default_rng(len(cells.name)).normal(level, 0.1 * level, len(cells.features))


def _fit(source: FeatureSet, cells: FeatureSet, **settings):
    cfg = EvaluateConfig()
    return fit_source(source, _errors(source), classifier_columns(source, cells, cfg), cfg, PredictConfig(**settings),
                      seed=0)


def _predict(source: FeatureSet, cells: FeatureSet, folder: Path, without_cells=(), error_level=1.0, boxes=None,
             **settings):
    cfg = PredictConfig(**settings)
    return run_prediction(_fit(source, cells, **settings), cells, _errors(cells, error_level),
                          _boxes(cells) if boxes is None else boxes, list(without_cells), folder, cfg, [source.name],
                          seed=0)


# ------------------------------------------------------------------------------------------- calibration


def test_accuracy_target_picks_the_lowest_threshold_whose_accepted_cells_reach_it() -> None:
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([True, True, False, True, False])  # accuracy above each cut: 1, 1, .67, .75, .6
    assert calibrate_rejection(confidence, correct, "accuracy", 0.75)["threshold"] == 0.6
    strict = calibrate_rejection(confidence, correct, "accuracy", 0.9)
    assert strict["threshold"] == 0.8
    assert strict["held_out"] == {"n": 5, "accuracy": 0.6, "coverage": 0.4, "accuracy_accepted": 1.0}
    assert calibrate_rejection(confidence, correct, "coverage", 0.5)["threshold"] == 0.7  # 3 of 5 kept
    nothing = calibrate_rejection(confidence, correct, "none", 0.9)
    assert nothing["threshold"] == 0.0 and nothing["held_out"]["coverage"] == 1.0


def test_an_unreachable_accuracy_target_rejects_every_cell() -> None:
    # Two cells tie at the top and one is wrong: no cut keeps 90 % accuracy.
    result = calibrate_rejection(np.array([0.9, 0.9, 0.5]), np.array([True, False, True]), "accuracy", 0.9)
    assert result["reachable"] is False and result["threshold"] is None
    assert result["held_out"]["coverage"] == 0.0 and result["held_out"]["accuracy_accepted"] is None


# ---------------------------------------------------------------------------------------- classification


def test_predictions_are_the_labels_of_the_classifier_evaluate_scores(tmp_path: Path) -> None:
    source = make_set("src", FINE_FOUR, per_class=60, spread=1.2)
    target = make_set("tgt", FINE_FOUR, per_class=50, shift=0.6, seed=1, spread=1.2)
    cfg = EvaluateConfig()
    report = run_evaluation(source, [target], tmp_path / "evaluate", baselines=False, max_shift=cfg.max_shift,
                            class_weight=cfg.class_weight, feature_norm=cfg.feature_norm, trees=cfg.trees)
    assert 0.4 < report["targets"]["tgt"]["accuracy"] < 0.95  # overlapping classes: the check can fail

    fitted = _fit(source, target)
    predicted = classify(fitted, target, _errors(target)).predicted
    assert (predicted == target.labels).mean() == pytest.approx(report["targets"]["tgt"]["accuracy"])
    assert fitted.reject["held_out"]["accuracy"] == pytest.approx(report["in_domain"]["accuracy"])
    assert fitted.split == {"seed": 42, "n_train": report["split"]["n_train"], "n_test": report["split"]["n_test"]}


def test_ambiguous_cells_are_rejected_and_far_or_unlike_cells_raise_the_shift_warning(tmp_path: Path) -> None:
    source = make_set("src", FINE_FOUR, per_class=60)
    like_source = make_set("same", FINE_FOUR, per_class=30, seed=3)
    ambiguous = make_set("between", FINE_FOUR, per_class=30, seed=4)
    # Every cell halfway between two class centres: no class is a confident call.
    partner = np.roll(ambiguous.features.reshape(4, 30, -1), 1, axis=0).reshape(ambiguous.features.shape)
    ambiguous.features = ((ambiguous.features + partner) / 2).astype(np.float32)
    far = make_set("far", FINE_FOUR, per_class=30, seed=5, shift=8.0)

    summaries = {cells.name: _predict(source, cells, tmp_path / cells.name) for cells in (like_source, ambiguous, far)}
    # Encoded among the source cells but badly reconstructed: the autoencoder never learned such cells.
    unlike = make_set("unlike", FINE_FOUR, per_class=30, seed=6)
    summaries["unlike"] = _predict(source, unlike, tmp_path / "unlike", error_level=3.0)
    same, between, away, unknown = (summaries[name] for name in ("same", "between", "far", "unlike"))
    assert same["reject"]["rejection_rate"] < 0.2
    assert between["reject"]["rejection_rate"] > same["reject"]["rejection_rate"] + 0.4
    assert same["shift"]["fraction_beyond"] < 0.2 and same["shift"]["warning"] is False
    assert 0.5 < same["shift"]["distance"]["score"] < 1.5 and 0.5 < same["shift"]["reconstruction"]["score"] < 1.5
    assert away["shift"]["distance"]["fraction_beyond"] > 0.9 and away["shift"]["warning"] is True
    assert away["shift"]["distance"]["score"] > 3
    assert unknown["shift"]["distance"]["fraction_beyond"] < 0.2
    assert unknown["shift"]["reconstruction"]["fraction_beyond"] > 0.9 and unknown["shift"]["warning"] is True
    assert unknown["shift"]["reconstruction"]["score"] > 2


def test_reconstruction_errors_are_the_autoencoders_feature_error_per_cell_in_any_batch_size(tmp_path: Path) -> None:
    import torch

    roi = np.random.default_rng(1).standard_normal((7, 256, 14, 14)).astype(np.float16)
    write_npy(tmp_path / "roi_features.npy", roi)
    torch.manual_seed(0)
    model = ae.AECFE(width=0.25, image_size=32).eval()
    errors = reconstruction_errors(model, tmp_path, batch_size=3, device=torch.device("cpu"))
    with torch.inference_mode():
        scaled = ae.scale_features(torch.from_numpy(roi).float())
        expected = ((model(scaled)[1] - scaled) ** 2).mean(dim=(1, 2, 3)).numpy()
    assert errors.shape == (7,) and np.allclose(errors, expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- files


def test_run_prediction_writes_the_table_the_counts_the_montages_and_the_summary(tmp_path: Path) -> None:
    source = make_set("src", FINE_FOUR, per_class=40)
    cells = make_set("new", FINE_FOUR, per_class=10, seed=2, shift=0.5)
    summary = _predict(source, cells, tmp_path, without_cells=["empty/field.png"], format="geojson", reject_target=0.99)

    classes = haematology_sorted(FINE_FOUR)
    assert summary["classes"] == classes == ["neutrophil_segmented", "lymphocyte_typical", "monocyte", "eosinophil"]
    rows = _rows(tmp_path / "predictions.csv")
    assert len(rows) == 40 and rows[0]["instance_id"] == "new-0000" and rows[0]["dataset"] == "new"
    assert list(rows[0])[:9] == ["instance_id", "image", "dataset", "label", "x0", "y0", "x1", "y1", "detection_score"]
    threshold = summary["reject"]["threshold"]
    for row in rows:
        probabilities = [float(row[f"prob_{cls}"]) for cls in classes]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
        assert float(row["confidence"]) == max(probabilities)
        assert float(row[f"prob_{row['predicted_class']}"]) == max(probabilities)  # a most probable class
        ranked = sorted(probabilities)
        assert float(row["margin"]) == pytest.approx(ranked[-1] - ranked[-2], abs=2e-4)
        assert row["rejected"] == str(float(row["confidence"]) < threshold)
        beyond = (float(row["shift_distance"]) > summary["shift"]["distance"]["threshold"]
                  or float(row["reconstruction_error"]) > summary["shift"]["reconstruction"]["threshold"])
        assert row["beyond_training"] == str(beyond)
    assert [row["found_by"] for row in rows] == [b["found_by"] for b in _boxes(cells)]

    counts = _rows(tmp_path / "counts.csv")
    dataset_row = counts[-1]
    assert dataset_row["scope"] == "dataset" and int(dataset_row["cells"]) == 40
    accepted = [row for row in rows if row["rejected"] == "False"]
    assert int(dataset_row["n_rejected"]) == 40 - len(accepted) == summary["reject"]["n_rejected"]
    for cls in classes:
        n = sum(row["predicted_class"] == cls for row in accepted)
        assert int(dataset_row[f"n_{cls}"]) == n == summary["counts"]["classes"][cls]["n"]
        if accepted:
            assert float(dataset_row[f"pct_{cls}"]) == pytest.approx(100 * n / len(accepted), abs=0.01)
    # make_set names one image per class holding its ten cells, like a field; plus one image without cells.
    images = {row["image"]: row for row in counts if row["scope"] == "image"}
    assert sorted(images) == sorted(["empty/field.png", *(f"{cls}/{i:04d}.png" for i, cls in enumerate(FINE_FOUR))])
    assert images["empty/field.png"]["cells"] == "0" and images["empty/field.png"]["pct_monocyte"] == ""
    monocytes = images["monocyte/0000.png"]
    assert int(monocytes["cells"]) == 10
    in_image = [row for row in rows if row["image"] == "monocyte/0000.png"]
    assert int(monocytes["n_rejected"]) == sum(row["rejected"] == "True" for row in in_image)
    assert int(monocytes["n_monocyte"]) == sum(row["predicted_class"] == "monocyte" and row["rejected"] == "False"
                                               for row in in_image)

    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for name in summary_outputs(summary):
        assert (tmp_path / name).is_file(), name
    for cls, file in summary["files"]["montages"].items():
        assert (tmp_path / file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert cls == "rejected" or summary["counts"]["classes"][cls]["n"] > 0
    geojson = [json.loads((tmp_path / file).read_text()) for file in summary["files"]["geojson"]]
    assert sum(len(collection["features"]) for collection in geojson) == 40
    feature = geojson[0]["features"][0]
    assert feature["geometry"]["coordinates"][0][0] == [1.0, 2.0]
    assert feature["properties"]["classification"]["name"] in [*classes, "rejected"]


def test_cells_detected_before_found_by_existed_are_listed_as_the_detectors(tmp_path: Path) -> None:
    source = make_set("src", FINE_FOUR, per_class=40)
    cells = make_set("new", FINE_FOUR, per_class=5, seed=2)
    older_boxes = [{key: value for key, value in box.items() if key != "found_by"} for box in _boxes(cells)]
    _predict(source, cells, tmp_path, boxes=older_boxes)
    assert {row["found_by"] for row in _rows(tmp_path / "predictions.csv")} == {"detector"}


def test_a_rerun_with_fewer_classes_leaves_no_montage_of_the_earlier_one(tmp_path: Path) -> None:
    source = make_set("src", FINE_FOUR, per_class=40)
    _predict(source, make_set("new", FINE_FOUR, per_class=10, seed=2), tmp_path, format="geojson")
    only_monocytes = make_set("new", ["monocyte"], per_class=10, seed=2)
    summary = _predict(source, only_monocytes, tmp_path, reject_by="none")
    assert sorted(path.name for path in tmp_path.glob("montage_*.png")) == ["montage_monocyte.png"]
    assert summary["files"]["montages"] == {"monocyte": "montage_monocyte.png"}
    assert not (tmp_path / "geojson").exists()


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"reject_by": "acuracy"}, "did you mean 'accuracy'"),
        ({"reject_target": 1.5}, "reject_target is 1.5"),
        ({"shift_quantile": 0.0}, "shift_quantile"),
        ({"neighbours": 0}, "neighbours"),
        ({"format": "json"}, "choose one of csv, geojson"),
    ],
)
def test_impossible_settings_name_the_key(settings: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        source = make_set("src", FINE_FOUR, per_class=10)
        _fit(source, source, **settings)


def test_a_classifier_without_probabilities_and_an_unlabelled_source_are_refused() -> None:
    source = make_set("src", FINE_FOUR, per_class=10)
    with pytest.raises(UserError, match="linear_svm gives no class probabilities"):
        cfg = EvaluateConfig(classifier="linear_svm")
        fit_source(source, _errors(source), classifier_columns(source, source, cfg), cfg, PredictConfig(), seed=0)
    with pytest.raises(UserError, match="knn cannot weigh classes"):
        cfg = EvaluateConfig(classifier="knn", class_weight="balanced")
        fit_source(source, _errors(source), classifier_columns(source, source, cfg), cfg, PredictConfig(), seed=0)
    unlabelled = FeatureSet("flat", source.features, source.instance_ids, source.images, ["unlabelled"] * 40)
    with pytest.raises(UserError, match="source 'flat' has a single class .unlabelled.*labelled source"):
        _fit(unlabelled, source)


def test_haematology_order_puts_mature_cells_first_and_unknown_names_last() -> None:
    assert haematology_sorted(["PMB", "basophil", "blast", "neutrophil", "monocyte", "lymphocyte", "AAA"]) == [
        "neutrophil", "lymphocyte", "monocyte", "basophil", "blast", "AAA", "PMB"]


@pytest.mark.parametrize("feature_norm, kept", [("none", [True, False]), ("both", [True, False, True, True])])
def test_predict_leaves_out_the_columns_evaluate_leaves_out_and_labels_as_it_scores(
    tmp_path: Path, feature_norm: str, kept: list[bool]
) -> None:
    """Under feature_norm "both" the standardised copy of the stained column (m_colour@dataset) stays."""
    from test_evaluate import _stain_and_shape_labs

    source, target = _stain_and_shape_labs()
    cfg = EvaluateConfig(max_shift=1.5, feature_norm=feature_norm)
    report = run_evaluation(source, [target], tmp_path / "evaluate", baselines=False, max_shift=cfg.max_shift,
                            feature_norm=feature_norm, class_weight=cfg.class_weight, trees=cfg.trees)
    fitted = fit_source(source, _errors(source), classifier_columns(source, target, cfg), cfg, PredictConfig(), seed=0)
    assert fitted.columns.tolist() == kept
    predicted = classify(fitted, target, _errors(target)).predicted
    assert (predicted == target.labels).mean() == pytest.approx(report["targets"]["lab_b"]["accuracy"])
    summary = run_prediction(fitted, target, _errors(target), _boxes(target), [], tmp_path / "predict",
                             PredictConfig(), [source.name], seed=0)
    assert summary["dropped_columns"] == ["m_colour"]


def test_predict_adapts_to_the_cells_it_labels_as_evaluate_does(tmp_path: Path) -> None:
    from test_evaluate import _cluster_in_the_margin

    source, target = _cluster_in_the_margin()
    # 100 trees, as run_evaluation's own default: the toy's margin cluster is one a forest of that size gets
    # wrong without adapting (the plain fit below), so the adaptation shows.
    cfg = EvaluateConfig(max_shift=None, self_training=2, trees=100)
    report = run_evaluation(source, [target], tmp_path / "evaluate", baselines=False, max_shift=None, self_training=2,
                            class_weight=cfg.class_weight, trees=cfg.trees)
    columns = classifier_columns(source, target, cfg)
    fitted = fit_source(source, _errors(source), columns, cfg, PredictConfig(), seed=0, cells=target)
    predicted = classify(fitted, target, _errors(target)).predicted
    assert (predicted == target.labels).mean() == pytest.approx(report["targets"]["lab_b"]["accuracy"]) == 1.0
    shared = {}  # as `aecfe predict` labelling several datasets: one plain source fit for them all
    for _ in range(2):
        adapted = fit_source(source, _errors(source), columns, cfg, PredictConfig(), seed=0, cells=target, plain_fits=shared)
        assert np.array_equal(classify(adapted, target, _errors(target)).predicted, predicted)
    assert len(shared) == 1
    plain = fit_source(source, _errors(source), columns, EvaluateConfig(max_shift=None, self_training=0, trees=100), PredictConfig(), seed=0,
                       cells=target)
    assert (classify(plain, target, _errors(target)).predicted == target.labels).mean() < 0.99
    summary = run_prediction(fitted, target, _errors(target), _boxes(target), [], tmp_path / "predict",
                             PredictConfig(), [source.name], seed=0)
    assert summary["self_training"] == 2 and summary["class_weight"] == cfg.class_weight == "balanced"
    assert summary["trees"] == cfg.trees
    with pytest.raises(UserError, match="evaluate.self_training"):
        fit_source(source, _errors(source), columns, EvaluateConfig(self_training=-1), PredictConfig(), seed=0)


def test_a_source_cut_to_the_named_classes_keeps_the_label_level_evaluate_uses(tmp_path) -> None:
    from aecfe_cli.predict import learnt_source

    # Only the immature granulocytes are labelled coarsely: the whole source resolves to the coarse level, the
    # named classes are coarse, and cut to them the source must stay coarse, as evaluate has it.
    source = make_set("src", [*FINE_FOUR, "ig"], per_class=30)
    target = make_set("tgt", FINE_FOUR, per_class=20, shift=0.5, seed=1)
    cfg = EvaluateConfig(classes=["neutrophil", "lymphocyte", "monocyte"], self_training=0)
    cut, errors, left_out = learnt_source(source, _errors(source), cfg)
    assert left_out == ["eosinophil", "ig"] and len(cut.features) == len(errors) == 90
    fitted = fit_source(cut, errors, classifier_columns(cut, target, cfg), cfg, PredictConfig(), seed=0,
                        classes_left_out=left_out)
    report = run_evaluation(source, [target], tmp_path, seed=0, baselines=False, classes=cfg.classes, self_training=0)
    assert fitted.level == report["labels"] == "coarse"
    assert sorted(fitted.classes) == report["classes"] == ["lymphocyte", "monocyte", "neutrophil"]
