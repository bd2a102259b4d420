"""Prediction stage: label a new lab's cells, with a confidence, a reject option and a shift warning.

The classifier is the one ``evaluate`` scores, refitted from the source's stored features whenever it is
needed: the same classifier, seed, label level rule and seeded 80/20 split, so nothing is ever unpickled and
the labels written here come from the classifier whose accuracy ``report.json`` gives. Refitting takes
seconds (a random forest on a few thousand 50-d vectors).

Reject option: the classifier's probabilities are calibrated on the source's held-out 20 %. With
``reject_by: accuracy`` the confidence threshold is the lowest one at which the held-out cells at or above
it reach ``reject_target`` accuracy; with ``coverage`` it keeps that share of the held-out cells; cells
below it are ``rejected`` rather than silently labelled (their most probable class is still written).

Shift, two measures per cell, each scaled by the source's own held-out cells:

* ``shift_distance``: the mean Euclidean distance to the ``neighbours`` nearest source training cells, in
  the latent features (not the morphology columns) standardised on those cells: how far the cell lies from what the classifier was trained on;
* ``reconstruction_error``: how badly the autoencoder reconstructs the cell's detector feature (mean
  squared error). An encoder maps any input somewhere in its latent, so a cell unlike anything the
  autoencoder learned (another kind of image, a colour no training lab has) can still be encoded next to
  source cells; it is not reconstructed well, which measured on synthetic labs flags such cells where the
  distance alone does not.

A cell is ``beyond_training`` when either lies past the ``shift_quantile`` quantile of the held-out cells'
values (so 5 to 10 % of unseen source cells are), and a dataset is flagged when at least
``shift_warn_fraction`` of its cells are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from .classify import (
    agreement_columns,
    cached_plain_fit,
    dropped_column_names,
    fit_classifier,
    kept_columns,
    normalised_column_names,
    normalised_features,
    restrict_view,
    rounded,
    size_check_columns,
)
from .config import EvaluateConfig, PredictConfig
from .detector import FOUND_BY_DETECTOR
from .errors import UserError
from .evaluate import check_settings as check_evaluate_settings
from .feature_sets import (
    chosen_classes,
    FeatureSet,
    map_labels,
    morphology_columns,
    resolve_labels,
    stratified_split,
)
from .io import read_csv, write_csv, write_json
from .labels import haematology_sorted
from .predict_report import differential_counts, remove_earlier_outputs, write_counts, write_geojson, write_montages

BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass
class SourceClassifier:
    """Everything fitted on the source's training cells that labels and places a new cell."""

    source: str
    classifier: str
    class_weight: str  # evaluate.class_weight
    trees: int  # evaluate.trees
    level: str
    classes: list[str]  # haematology order; the probability columns follow it
    model: BaseEstimator  # fitted on the features as evaluate.feature_norm normalises them, ``columns`` of them
    feature_norm: str
    columns: np.ndarray  # (D,) bool: the columns evaluate.max_shift keeps between the source and the cells
    scaler: StandardScaler
    index: NearestNeighbors
    split: dict  # seed, n_train, n_test
    reject: dict  # by, target, threshold (None: every cell rejected), reachable, held_out
    shift: dict  # neighbours, quantile, warn_fraction, and per measure (distance, reconstruction) its scale
    shift_columns: np.ndarray  # (D,) bool: the feature columns the shift distance is measured in
    self_training: int  # rounds of adaptation to the cells being labelled (0: the plain source fit)
    self_training_agreement: str  # evaluate.self_training_agreement, when it adapted
    self_training_sizes: str  # evaluate.self_training_sizes, when it adapted
    classes_left_out: list[str]  # the source's classes outside evaluate.classes, not learnt


@dataclass
class CellPredictions:
    """One row per cell of a dataset, aligned with its FeatureSet."""

    predicted: np.ndarray  # (N,) str, the most probable class
    probabilities: np.ndarray  # (N, C) in SourceClassifier.classes order
    confidence: np.ndarray  # (N,) the top probability
    margin: np.ndarray  # (N,) top minus second probability
    rejected: np.ndarray  # (N,) bool
    distance: np.ndarray  # (N,) mean distance to the nearest source training cells
    reconstruction: np.ndarray  # (N,) the autoencoder's feature reconstruction error
    beyond: np.ndarray  # (N,) bool, either past the source's held-out quantile


def check_settings(cfg: PredictConfig, evaluate_cfg: EvaluateConfig) -> None:
    """Fail on settings that cannot work, before any work: the classifier's, and one predict cannot use (the
    predict section's own choices are checked when the config is read, config.PredictConfig)."""
    check_evaluate_settings(evaluate_cfg)
    if evaluate_cfg.classifier == "linear_svm":
        raise UserError(
            "evaluate.classifier linear_svm gives no class probabilities, which predict needs for its confidence "
            "and reject option; set evaluate.classifier to random_forest, logistic_regression or knn"
        )


def chosen_source_cells(
    name: str, labels: Sequence[str], evaluate_cfg: EvaluateConfig,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(N,) bool: the cells of the source ``name`` (labelled ``labels``) that predict's classifier learns, those of
    ``evaluate.classes`` (all when null) at the label level of the whole source; every cell's class at that level;
    and the classes left out. A class the source lacks fails."""
    level, to_class = resolve_labels(labels, [], evaluate_cfg.labels)
    classes = map_labels(np.asarray(labels, dtype=str), to_class)
    chosen = chosen_classes(name, classes, evaluate_cfg.classes, level)
    return chosen, classes, sorted(set(classes[~chosen].tolist()))


def learnt_source(
    source: FeatureSet, reconstruction: np.ndarray, evaluate_cfg: EvaluateConfig,
) -> tuple[FeatureSet, np.ndarray, list[str]]:
    """The source cut to the cells its classifier learns (:func:`chosen_source_cells`), as ``evaluate`` cuts it
    before anything is fitted, with their reconstruction errors and the classes left out. A cut source is
    labelled by its classes at the level of the whole source: ``auto`` resolved again on the cut cells could
    pick another level (the only coarse-only names among the classes left out) than ``evaluate`` uses."""
    chosen, classes, left_out = chosen_source_cells(source.name, source.labels, evaluate_cfg)
    if not left_out:
        return source, np.asarray(reconstruction), left_out
    return dataclasses.replace(source.select(chosen), labels=classes[chosen]), np.asarray(reconstruction)[chosen], left_out


def classifier_columns(source: FeatureSet, cells: FeatureSet, evaluate_cfg: EvaluateConfig) -> np.ndarray:
    """(D,) bool: the columns of the classifier that labels ``cells``. Those shifted between the source and
    ``cells`` are left out, as ``evaluate`` leaves them out for a target (``evaluate.max_shift``), so a
    labelled copy of ``cells`` scored by ``evaluate`` gets the same labels."""
    return kept_columns(source, normalised_features(source, evaluate_cfg.feature_norm),
                        normalised_features(cells, evaluate_cfg.feature_norm), evaluate_cfg.max_shift)


def fit_source(
    source: FeatureSet, reconstruction: np.ndarray, columns: np.ndarray, evaluate_cfg: EvaluateConfig,
    cfg: PredictConfig, seed: int, cells: FeatureSet | None = None, plain_fits: dict | None = None,
    classes_left_out: Sequence[str] = (),
) -> SourceClassifier:
    """Fit the classifier on the source's ``columns`` (:func:`classifier_columns`) and training split, and
    calibrate rejection and shift on its held-out cells.

    ``cells``: the unlabelled cells to be labelled, to which ``evaluate.self_training`` adapts the classifier
    as ``evaluate`` adapts it to a target (:func:`classify.fit_classifier`); the calibration is that of the
    adapted classifier on the source's held-out cells. ``plain_fits``: the plain (unadapted) fits of earlier
    calls on the same source, settings and seed, by columns; this call adds its own, so a caller labelling
    several datasets fits the source once per set of columns, not once per dataset.

    ``reconstruction``: the source cells' reconstruction errors (:func:`extract.reconstruction_errors`).
    ``classes_left_out``: the source's classes its caller left out (:func:`learnt_source`), for the summary.

    The label level is ``evaluate.labels`` resolved on the source alone (``auto``: fine unless some source
    cell is labelled only coarsely), the level ``evaluate`` uses against a target labelled as finely.
    """
    check_settings(cfg, evaluate_cfg)
    if len(reconstruction) != len(source.features):
        raise ValueError(f"{len(reconstruction)} reconstruction errors for {len(source.features)} cells of {source.name}")
    level, to_class = resolve_labels(source.labels, [], evaluate_cfg.labels)
    labels = map_labels(source.labels, to_class)
    classes = haematology_sorted(labels.tolist())
    if len(classes) < 2:
        raise UserError(
            f"source '{source.name}' has a single class ({', '.join(classes)}) at the {level} level: predict needs a "
            "labelled source with two or more classes (class folders, or a csv layout with a label column)"
        )
    train_idx, test_idx = stratified_split(source.strata(labels), evaluate_cfg.split_seed)
    if len(test_idx) == 0:
        raise UserError(f"source '{source.name}': no class has two cells, so none can be held out to calibrate on")
    normalised = normalised_features(source, evaluate_cfg.feature_norm)
    classified = normalised[:, columns]
    target = (None if cells is None
              else normalised_features(cells, evaluate_cfg.feature_norm)[:, columns])
    plain = cached_plain_fit({} if plain_fits is None else plain_fits, evaluate_cfg.classifier, seed,
                             normalised[train_idx], labels[train_idx], columns, evaluate_cfg.class_weight,
                             evaluate_cfg.trees)
    names = normalised_column_names(source.columns, evaluate_cfg.feature_norm)
    agreement = agreement_columns(names, evaluate_cfg.self_training_agreement)
    sizes = size_check_columns(names, evaluate_cfg.self_training_sizes)
    model = fit_classifier(evaluate_cfg.classifier, seed, classified[train_idx], labels[train_idx],
                           target=target, rounds=evaluate_cfg.self_training, plain=plain,
                           class_weight=evaluate_cfg.class_weight, trees=evaluate_cfg.trees,
                           agreement=restrict_view(agreement, columns), sizes=restrict_view(sizes, columns))
    shift_columns = latent_columns(source)
    scaler = StandardScaler().fit(source.features[train_idx][:, shift_columns])
    k = min(cfg.neighbours, len(train_idx))
    index = NearestNeighbors(n_neighbors=k).fit(scaler.transform(source.features[train_idx][:, shift_columns]))
    fitted = SourceClassifier(
        source=source.name,
        classifier=evaluate_cfg.classifier,
        class_weight=evaluate_cfg.class_weight,
        trees=evaluate_cfg.trees,
        level=level,
        classes=classes,
        model=model,
        feature_norm=evaluate_cfg.feature_norm,
        columns=columns,
        scaler=scaler,
        index=index,
        split={"seed": evaluate_cfg.split_seed, "n_train": int(len(train_idx)), "n_test": int(len(test_idx))},
        reject={},
        shift={},
        shift_columns=shift_columns,
        self_training=evaluate_cfg.self_training if cells is not None else 0,
        self_training_agreement=evaluate_cfg.self_training_agreement if cells is not None else "none",
        self_training_sizes=evaluate_cfg.self_training_sizes if cells is not None else "none",
        classes_left_out=list(classes_left_out),
    )
    held_out, predicted = _probabilities(fitted, classified[test_idx])
    fitted.reject = calibrate_rejection(held_out.max(axis=1), predicted == labels[test_idx], cfg.reject_by,
                                        cfg.reject_target)
    fitted.shift = {"neighbours": k, "quantile": cfg.shift_quantile, "warn_fraction": cfg.shift_warn_fraction}
    for measure, held_out_values in (("distance", _distances(fitted, source.features[test_idx])),
                                     ("reconstruction", np.asarray(reconstruction)[test_idx])):
        fitted.shift[measure] = {"threshold": rounded(np.quantile(held_out_values, cfg.shift_quantile)),
                                 "held_out_median": rounded(np.median(held_out_values))}
    return fitted


def calibrate_rejection(confidence: np.ndarray, correct: np.ndarray, by: str, target: float) -> dict:
    """The confidence threshold below which a cell is rejected, and what it gives on the calibration cells.

    ``accuracy``: the lowest threshold whose accepted cells (confidence >= threshold) reach ``target``
    accuracy; when even the most confident cells miss it, ``threshold`` is None, ``reachable`` False and
    every cell is rejected. ``coverage``: the threshold keeping at least ``target`` of the cells.
    ``none``: 0, nothing is rejected.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    order = np.argsort(-confidence, kind="stable")
    ranked, ranked_correct = confidence[order], correct[order]
    threshold: float | None = 0.0
    if by == "coverage":
        threshold = float(ranked[max(1, math.ceil(target * len(ranked))) - 1])
    elif by == "accuracy":
        accuracy_above = np.cumsum(ranked_correct) / np.arange(1, len(ranked) + 1)
        # A threshold keeps every cell of equal confidence: only the last of a run of ties is a cut.
        cut = np.append(ranked[1:] != ranked[:-1], True)
        candidates = np.flatnonzero(cut & (accuracy_above >= target))
        threshold = float(ranked[candidates[-1]]) if len(candidates) else None
    threshold = rounded(threshold)
    accepted = ~reject_mask(confidence, threshold)
    return {
        "by": by,
        "target": target if by != "none" else None,
        "threshold": threshold,
        "reachable": threshold is not None,
        "held_out": {
            "n": int(len(confidence)),
            "accuracy": rounded(correct.mean()),
            "coverage": rounded(accepted.mean()),
            "accuracy_accepted": rounded(correct[accepted].mean()) if accepted.any() else None,
        },
    }


def reject_mask(confidence: np.ndarray, threshold: float | None) -> np.ndarray:
    if threshold is None:
        return np.ones(len(confidence), dtype=bool)
    # The threshold is stored rounded; compare at the same precision so a held-out cell at it stays accepted.
    return np.round(np.asarray(confidence, dtype=np.float64), 6) < threshold


def _probabilities(fitted: SourceClassifier, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) class probabilities in ``fitted.classes`` order, and the predicted classes.

    The prediction is taken in the classifier's own class order, as its ``predict`` (and so ``evaluate``)
    breaks ties between equally probable classes.
    """
    raw = fitted.model.predict_proba(features)
    own_order = [str(cls) for cls in fitted.model.classes_]
    return raw[:, [own_order.index(cls) for cls in fitted.classes]], np.array(own_order)[raw.argmax(axis=1)]


def latent_columns(cells: FeatureSet) -> np.ndarray:
    """The columns the shift distance uses: the autoencoder's latent, learned from every lab's cells. The
    morphology columns are left out: every new lab's stain and optics move them
    a little, which would flag whole labs whose cells the classifier handles (measured on synthetic labs)."""
    morphology = morphology_columns(cells.columns)
    if not morphology.any() or morphology.all():
        return np.ones(cells.features.shape[1], bool)
    return ~morphology


def _distances(fitted: SourceClassifier, features: np.ndarray) -> np.ndarray:
    distances, _ = fitted.index.kneighbors(fitted.scaler.transform(features[:, fitted.shift_columns]))
    return distances.mean(axis=1)


def classify(fitted: SourceClassifier, cells: FeatureSet, reconstruction: np.ndarray) -> CellPredictions:
    """Label ``cells``; ``reconstruction`` holds their reconstruction errors, row for row."""
    # evaluate.feature_norm "dataset" standardises a dataset by its own statistics: all of these cells.
    probabilities, predicted = _probabilities(
        fitted, normalised_features(cells, fitted.feature_norm)[:, fitted.columns])
    ranked = np.sort(probabilities, axis=1)
    confidence = ranked[:, -1]
    distance = _distances(fitted, cells.features)
    reconstruction = np.asarray(reconstruction, dtype=np.float64)
    if len(reconstruction) != len(distance):
        raise ValueError(f"{len(reconstruction)} reconstruction errors for {len(distance)} cells of {cells.name}")
    shift = fitted.shift
    return CellPredictions(
        predicted=predicted,
        probabilities=probabilities,
        confidence=confidence,
        margin=confidence - ranked[:, -2],
        rejected=reject_mask(confidence, fitted.reject["threshold"]),
        distance=distance,
        reconstruction=reconstruction,
        beyond=(distance > shift["distance"]["threshold"]) | (reconstruction > shift["reconstruction"]["threshold"]),
    )


def load_boxes(detect_dir: Path, cells: FeatureSet) -> list[dict]:
    """Rows of ``instances.csv`` (box, detection score), checked to be the cells of the features."""
    path = Path(detect_dir) / "instances.csv"
    rerun = f"re-run `aecfe extract --data {cells.name} --force`"
    if not path.is_file():
        raise UserError(f"{path} not found: run `aecfe detect --data {cells.name}`")
    rows = read_csv(path)
    if [row["instance_id"] for row in rows] != cells.instance_ids.tolist():
        raise UserError(f"{path} lists other cells than the extracted features: {rerun}")
    return rows


def write_predictions(path: Path, fitted: SourceClassifier, cells: FeatureSet, boxes: list[dict],
                      predictions: CellPredictions) -> None:
    """predictions.csv: ids, box, label as given, prediction, confidence, margin, probabilities, reject, shift,
    and whether the detector or the segmentation found the cell (detect.segment_missed)."""
    header = ["instance_id", "image", "dataset", "label", *BOX_COLUMNS, "detection_score", "predicted_class",
              "confidence", "margin", *(f"prob_{cls}" for cls in fitted.classes), "rejected", "shift_distance",
              "reconstruction_error", "beyond_training", "found_by"]

    def rows():
        for i, box in enumerate(boxes):
            yield [cells.instance_ids[i], cells.images[i], cells.name, cells.labels[i],
                   *(box[column] for column in BOX_COLUMNS), box["score"], predictions.predicted[i],
                   f"{predictions.confidence[i]:.4f}", f"{predictions.margin[i]:.4f}",
                   *(f"{p:.4f}" for p in predictions.probabilities[i]), bool(predictions.rejected[i]),
                   f"{predictions.distance[i]:.4f}", f"{predictions.reconstruction[i]:.6f}",
                   bool(predictions.beyond[i]), box.get("found_by", FOUND_BY_DETECTOR)]

    write_csv(path, header, rows())


def shift_summary(fitted: SourceClassifier, predictions: CellPredictions) -> dict:
    """Both measures of the dataset against the source's own held-out cells; ``warning`` when it lies far.

    Per measure: ``median``, ``score`` (median over the held-out median: 1 = like unseen source cells) and
    ``fraction_beyond``; ``fraction_beyond`` at the top counts cells beyond on either.
    """
    summary = dict(fitted.shift)
    for measure, values in (("distance", predictions.distance), ("reconstruction", predictions.reconstruction)):
        scale = fitted.shift[measure]
        median = float(np.median(values))
        summary[measure] = {
            **scale,
            "median": rounded(median),
            "score": rounded(median / scale["held_out_median"]) if scale["held_out_median"] else None,
            "fraction_beyond": rounded((values > scale["threshold"]).mean()),
        }
    fraction = float(predictions.beyond.mean())
    summary["fraction_beyond"] = rounded(fraction)
    summary["warning"] = fraction >= fitted.shift["warn_fraction"]
    return summary


def run_prediction(
    fitted: SourceClassifier,
    cells: FeatureSet,
    reconstruction: np.ndarray,
    boxes: list[dict],
    images_without_cells: list[str],
    folder: Path,
    cfg: PredictConfig,
    training_datasets: list[str],
    seed: int,
) -> dict:
    """Label ``cells`` and write predictions.csv, counts.csv, the montages (and GeoJSON) and summary.json.

    Returns the summary: the dataset's differential count, per-image counts, the reject calibration and
    rejection rate, the shift figures, and ``files`` (every file written, relative to ``folder``).
    """
    folder = Path(folder)
    remove_earlier_outputs(folder)
    predictions = classify(fitted, cells, reconstruction)
    write_predictions(folder / "predictions.csv", fitted, cells, boxes, predictions)
    images, totals = differential_counts(cells.images, predictions, fitted.classes, images_without_cells)
    write_counts(folder / "counts.csv", cells.name, fitted.classes, images, totals)
    montages = {}
    if cells.crops is not None:
        montages = write_montages(folder, cells, predictions, fitted.classes, cfg.montage_cells, seed,
                                  f"{fitted.source} -> {cells.name}")
    geojson = write_geojson(folder, cells, boxes, predictions) if cfg.format == "geojson" else []
    n_rejected = int(predictions.rejected.sum())
    summary = {
        "source": fitted.source,
        "dataset": cells.name,
        "in_training": cells.name in training_datasets,
        "training_datasets": list(training_datasets),
        "classifier": fitted.classifier,
        "class_weight": fitted.class_weight,
        "trees": fitted.trees,
        "seed": seed,
        "labels": fitted.level,
        "classes": fitted.classes,
        "classes_left_out": fitted.classes_left_out,
        "dropped_columns": dropped_column_names(normalised_column_names(cells.columns, fitted.feature_norm), fitted.columns),
        "self_training": fitted.self_training,
        "self_training_agreement": fitted.self_training_agreement,
        "self_training_sizes": fitted.self_training_sizes,
        "split": fitted.split,
        "reject": {**fitted.reject, "n_rejected": n_rejected, "rejection_rate": rounded(n_rejected / len(cells.features))},
        "shift": shift_summary(fitted, predictions),
        "counts": totals,
        "images": images,
        "files": {
            "predictions": "predictions.csv",
            "counts": "counts.csv",
            "summary": "summary.json",
            "montages": montages,
            "geojson": geojson,
        },
    }
    write_json(folder / "summary.json", summary)
    return summary


def summary_outputs(summary: dict) -> list[str]:
    """Every file a summary lists, for the manifest (summary.json last: it is written last)."""
    files = summary["files"]
    return [files["predictions"], files["counts"], *files["montages"].values(), *files["geojson"], files["summary"]]
