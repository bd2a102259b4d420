"""Evaluation stage: how well cell features classify white cells in their own domain and across domains.

Protocol (``shared/docs/method.md``): a classifier (a random forest, as in the paper) is trained on 80 % of
the source dataset; in-domain = the held-out 20 %, cross-domain = 100 % of every target dataset. Only
classes present in both source and target are scored (``shared/docs/labels.md``); source classes a target
lacks are still trained on, so predicting one of them counts as an error, as in the authors' protocol.
The same split and classifier are applied to two label-free baselines computed from the cell crops (raw
pixels and colour histograms) so a reader sees what the learned features add. For every feature space the
report also measures how well the datasets mix (lower = better aligned).

Everything is seeded: the same inputs give a byte-identical ``report.json``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.metrics import balanced_accuracy_score, silhouette_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from .errors import UserError
from .io import read_csv, read_npy, write_csv, write_figure, write_json, write_text
from .labels import coarse_of, is_fine, is_known

CLASSIFIERS = ("random_forest", "logistic_regression", "knn", "linear_svm")
LABEL_MODES = ("fine", "coarse", "auto")
BASELINES = {
    "raw_pixels": "crop averaged down to 16x16 pixels, PCA to the AE-CFE dimension (fitted on source training cells)",
    "color_histogram": "16-bin histograms of R, G, B, hue, saturation and value over the crop",
}
METHOD_TITLES = {"aecfe": "AE-CFE", "raw_pixels": "raw pixels + PCA", "color_histogram": "colour histogram"}
MIXING_DIRECTION = (
    "lower is better mixed: a silhouette by dataset near 0 (or below) and a domain-classifier balanced "
    "accuracy near chance mean the datasets overlap in feature space; values near 1 mean they stay apart"
)
# Both mixing scores look at a subsample: their cost grows quadratically with the points.
MAX_MIXING_POINTS = 2000
# t-SNE costs seconds per thousand points and iterations; 1,000 points and 500 iterations show the class
# and dataset structure in a few seconds. Below TSNE_MIN_POINTS it says little beyond PCA.
MAX_EMBEDDING_POINTS = 1000
TSNE_ITERATIONS = 500
TSNE_MIN_POINTS = 500
SPLIT_FILE = "split.csv"
DIGITS = 6


@dataclass
class FeatureSet:
    """The cells of one dataset; row i of every array is the same cell."""

    name: str
    features: np.ndarray  # (N, D) float32
    instance_ids: np.ndarray  # (N,) str
    images: np.ndarray  # (N,) str, relative to the dataset root
    labels: np.ndarray  # (N,) str, the most specific vocabulary name the dataset gives
    crops: np.ndarray | None = None  # (N, 3, S, S) uint8, a memmap is fine

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        self.instance_ids = np.asarray(self.instance_ids).astype(str)
        self.images = np.asarray(self.images).astype(str)
        self.labels = np.asarray(self.labels).astype(str)
        n_cells = len(self.features)
        if self.features.ndim != 2:
            raise UserError(
                f"dataset '{self.name}': features must be a 2-D (cells, dimensions) array, got {self.features.shape}"
            )
        lengths = {"instance_ids": len(self.instance_ids), "images": len(self.images), "labels": len(self.labels)}
        if self.crops is not None:
            lengths["crops"] = len(self.crops)
        wrong = {key: value for key, value in lengths.items() if value != n_cells}
        if wrong:
            raise UserError(
                f"dataset '{self.name}': {n_cells} feature rows but {wrong}; "
                f"re-run `aecfe extract --data {self.name} --force`"
            )


# ----------------------------------------------------------------------------------------------- loading


def load_feature_set(workdir: Path, name: str) -> FeatureSet:
    """Read ``extract/<name>/features.{npy,csv}`` and, when present, ``detect/<name>/crops.npy``."""
    workdir = Path(workdir)
    extract_dir = workdir / "extract" / name
    rerun = f"re-run `aecfe extract --data {name} --force`"
    features_path, table_path = extract_dir / "features.npy", extract_dir / "features.csv"
    for path in (features_path, table_path):
        if not path.is_file():
            raise UserError(f"{path} not found: run `aecfe extract --data {name}` first")
    try:
        features = np.asarray(read_npy(features_path, mmap=False), dtype=np.float32)
    except (ValueError, OSError) as exc:
        raise UserError(f"{features_path} is not a readable feature array ({exc}): {rerun}") from exc
    rows = read_csv(table_path)
    missing = {"instance_id", "image", "label"} - set(rows[0] if rows else ())
    if not rows or missing:
        raise UserError(f"{table_path} has no cells or lacks columns {sorted(missing)}: {rerun}")
    if features.ndim != 2 or len(features) != len(rows):
        raise UserError(
            f"{features_path} holds {features.shape[0] if features.ndim else 0} rows but {table_path} lists "
            f"{len(rows)} cells (files from different runs): {rerun}"
        )
    if not np.isfinite(features).all():
        raise UserError(f"{features_path} contains NaN or infinite values: {rerun}")
    instance_ids = np.array([row["instance_id"] for row in rows], dtype=str)
    if len(np.unique(instance_ids)) != len(instance_ids):
        raise UserError(f"{table_path} repeats instance ids: {rerun}")
    return FeatureSet(
        name=name,
        features=features,
        instance_ids=instance_ids,
        images=np.array([row["image"] for row in rows], dtype=str),
        labels=np.array([row["label"] for row in rows], dtype=str),
        crops=_load_crops(workdir / "detect" / name, instance_ids, name),
    )


def _load_crops(detect_dir: Path, instance_ids: np.ndarray, name: str) -> np.ndarray | None:
    """Crops are optional (only the baselines need them) but must be the same cells as the features."""
    crops_path = detect_dir / "crops.npy"
    if not crops_path.is_file():
        return None
    rerun = f"re-run `aecfe detect --data {name} --force` then `aecfe extract --data {name} --force`"
    try:
        crops = read_npy(crops_path, mmap=True)
    except (ValueError, OSError) as exc:
        raise UserError(f"{crops_path} is not a readable crop array ({exc}): {rerun}") from exc
    if crops.ndim != 4 or crops.shape[1] != 3 or crops.dtype != np.uint8:
        raise UserError(f"{crops_path} must be (N, 3, S, S) uint8, got {crops.shape} {crops.dtype}: {rerun}")
    if len(crops) != len(instance_ids):
        raise UserError(
            f"{crops_path} holds {len(crops)} crops but the features have {len(instance_ids)} cells: {rerun}"
        )
    instances_path = detect_dir / "instances.csv"
    if instances_path.is_file():
        detected_ids = [row["instance_id"] for row in read_csv(instances_path)]
        if detected_ids != instance_ids.tolist():
            raise UserError(f"{instances_path} lists other cells than the extracted features: {rerun}")
    return crops


# ------------------------------------------------------------------------------------ classifiers, labels


def make_classifier(name: str, seed: int) -> BaseEstimator:
    """A fresh, seeded classifier; the linear and neighbour models see standardised features."""
    if name == "random_forest":
        # The paper's forest (method.md); n_jobs does not change the result, only the speed.
        return RandomForestClassifier(n_estimators=100, max_depth=16, random_state=seed, n_jobs=-1)
    if name == "logistic_regression":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    if name == "knn":
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5))
    if name == "linear_svm":
        return make_pipeline(StandardScaler(), LinearSVC(max_iter=10000, random_state=seed))
    raise UserError(
        f"unknown classifier '{name}'{_did_you_mean(name, CLASSIFIERS)}; choose one of {', '.join(CLASSIFIERS)}"
    )


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.4)
    return f" (did you mean '{close[0]}'?)" if close else ""


def resolve_labels(
    source_labels: Sequence[str], target_label_lists: Sequence[Sequence[str]], mode: str
) -> tuple[str, Callable[[str], str]]:
    """Pick the label level and return it with the function mapping a cell's label to its class there.

    ``auto`` is fine unless some cell of the source or a target is labelled only at the coarse level
    (``lymphocyte``, ``ig``, ...). Names outside the vocabulary (``PMB``) are the same class at both levels,
    so they do not force the coarse level on every other cell.
    """
    if mode not in LABEL_MODES:
        raise UserError(
            f"unknown label level '{mode}'{_did_you_mean(mode, LABEL_MODES)}; choose one of {', '.join(LABEL_MODES)}"
        )
    level = mode
    if mode == "auto":
        names = set(np.unique(np.asarray(source_labels).astype(str)))
        for labels in target_label_lists:
            names.update(np.unique(np.asarray(labels).astype(str)))
        level = "coarse" if any(is_known(name) and not is_fine(name) for name in names) else "fine"
    return level, (coarse_of if level == "coarse" else _same_class)


def _same_class(label: str) -> str:
    return label


def _map_labels(labels: np.ndarray, to_class: Callable[[str], str]) -> np.ndarray:
    names, inverse = np.unique(labels, return_inverse=True)
    return np.array([to_class(name) for name in names], dtype=str)[inverse] if len(labels) else labels


# ------------------------------------------------------------------------------------------------- split


def stratified_split(labels: Sequence[str], seed: int, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``test_fraction`` of the cells (at least one, never all) go to test; single cells train."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng(seed)
    test_parts = [np.empty(0, dtype=np.int64)]
    for cls in np.unique(labels):  # sorted, so the draws do not depend on which class comes first
        members = np.flatnonzero(labels == cls)
        if len(members) < 2:
            continue
        n_test = min(len(members) - 1, max(1, int(round(test_fraction * len(members)))))
        test_parts.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def save_split(path: Path, instance_ids: Sequence[str], train_idx: np.ndarray, test_idx: np.ndarray) -> None:
    """Write ``instance_id,split`` (train|test) for every cell so a run can be repeated exactly."""
    assignment = np.full(len(instance_ids), "", dtype=object)
    assignment[train_idx] = "train"
    if (assignment[test_idx] != "").any():
        raise ValueError("a cell is in both the train and the test split")
    assignment[test_idx] = "test"
    if (assignment == "").any():
        raise ValueError("every cell must be in the train or the test split")
    write_csv(Path(path), ("instance_id", "split"), zip(np.asarray(instance_ids).astype(str).tolist(), assignment))


def load_split(path: Path, instance_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The saved split as indices into ``instance_ids``; None when absent or made for other cells."""
    path = Path(path)
    if not path.is_file():
        return None
    rows = read_csv(path)
    if rows and not {"instance_id", "split"} <= set(rows[0]):
        raise UserError(f"{path} must have the columns instance_id,split: fix it or delete it to draw a new split")
    position = {cell: index for index, cell in enumerate(np.asarray(instance_ids).astype(str).tolist())}
    saved_ids = [row["instance_id"] for row in rows]
    if len(saved_ids) != len(position) or set(saved_ids) != set(position):
        return None
    train, test = [], []
    for line, row in enumerate(rows, start=2):
        if row["split"] not in ("train", "test"):
            raise UserError(
                f"{path} line {line}: split '{row['split']}' is not train or test: fix it or delete the file"
            )
        (train if row["split"] == "train" else test).append(position[row["instance_id"]])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


# ------------------------------------------------------------------------------------------------ scores


def score(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict:
    """Metrics over ``classes`` (every true label must be one); a prediction outside them is an error.

    Balanced accuracy and macro-F1 average over the classes that have cells in ``y_true``. The confusion
    matrix is square over ``classes``; predictions outside them are counted in ``predicted_outside_classes``.
    """
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    classes = [str(cls) for cls in classes]
    class_index = {cls: index for index, cls in enumerate(classes)}
    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise ValueError(
            f"need as many predictions as true labels, and at least one (got {len(y_true)}, {len(y_pred)})"
        )
    unknown = set(np.unique(y_true)) - set(classes)
    if unknown:
        raise ValueError(f"true labels outside the scored classes: {sorted(unknown)}")
    true_index = np.array([class_index[label] for label in y_true])
    pred_index = np.array([class_index.get(label, -1) for label in y_pred])
    inside = pred_index >= 0
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (true_index[inside], pred_index[inside]), 1)
    support = np.bincount(true_index, minlength=len(classes))
    correct = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    precision = np.divide(correct, predicted, out=np.zeros(len(classes)), where=predicted > 0)
    recall = np.divide(correct, support, out=np.zeros(len(classes)), where=support > 0)
    f1_denominator = precision + recall
    f1 = np.divide(2 * precision * recall, f1_denominator, out=np.zeros(len(classes)), where=f1_denominator > 0)
    present = support > 0
    return {
        "n": int(len(y_true)),
        "accuracy": _round(correct.sum() / len(y_true)),
        "balanced_accuracy": _round(recall[present].mean()),
        "macro_f1": _round(f1[present].mean()),
        "classes": classes,
        "per_class": {
            cls: {
                "precision": _round(precision[i]),
                "recall": _round(recall[i]),
                "f1": _round(f1[i]),
                "support": int(support[i]),
            }
            for i, cls in enumerate(classes)
        },
        "confusion": confusion.tolist(),
        "predicted_outside_classes": int((~inside).sum()),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), DIGITS)


# --------------------------------------------------------------------------------------------- baselines


def baseline_features(
    crops: np.ndarray, kind: str, *, pixel_size: int = 16, histogram_bins: int = 16, chunk_size: int = 128
) -> np.ndarray:
    """Label-free descriptors of (N, 3, S, S) uint8 crops, computed chunk by chunk (memmap-friendly).

    ``raw_pixels``: the crop block-averaged to ``pixel_size`` squared, in [0, 1], flattened; project it with
    :func:`fit_projection` fitted on the source training cells. ``color_histogram``: per-crop normalised
    histograms of R, G, B, hue, saturation and value.
    """
    if kind not in BASELINES:
        raise UserError(
            f"unknown baseline '{kind}'{_did_you_mean(kind, tuple(BASELINES))}; choose one of {', '.join(BASELINES)}"
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

    else:
        dimension = 6 * histogram_bins

        def describe(chunk: np.ndarray) -> np.ndarray:
            return _colour_histograms(chunk, histogram_bins)

    descriptors = np.empty((len(crops), dimension), dtype=np.float32)
    for start in range(0, len(crops), chunk_size):
        descriptors[start : start + chunk_size] = describe(np.asarray(crops[start : start + chunk_size]))
    return descriptors


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


# ---------------------------------------------------------------------------------------- domain mixing


def domain_mixing(feature_sets: Sequence[np.ndarray], seed: int, max_points: int = MAX_MIXING_POINTS) -> dict:
    """How well datasets overlap in one feature space; lower = better mixed (see ``MIXING_DIRECTION``).

    Each dataset contributes an equal random subsample (``max_points`` in all), standardised together:
    ``silhouette`` is the silhouette score with the dataset as the cluster label, and
    ``domain_classifier_balanced_accuracy`` is the cross-validated balanced accuracy of a 15-nearest-neighbour
    classifier guessing the dataset (``chance`` = 1 / number of datasets): neighbours from one dataset only
    mean the datasets do not mix locally, whatever the global shape.
    """
    chosen = _balanced_indices([len(features) for features in feature_sets], seed, max_points)
    counts = np.array([len(rows) for rows in chosen])
    result = {
        "n_points": int(counts.sum()),
        "silhouette": None,
        "domain_classifier_balanced_accuracy": None,
        "chance": None,
    }
    if len(feature_sets) < 2 or counts.min() < 3:
        return result
    sample = StandardScaler().fit_transform(
        np.concatenate([np.asarray(f[rows], dtype=np.float64) for f, rows in zip(feature_sets, chosen)])
    )
    domains = np.repeat(np.arange(len(feature_sets)), counts)
    result["silhouette"] = _round(silhouette_score(sample, domains))
    folds = StratifiedKFold(n_splits=int(min(5, counts.min())), shuffle=True, random_state=seed)
    guesser = KNeighborsClassifier(n_neighbors=int(min(15, counts.min() - 1)))
    guessed = cross_val_predict(guesser, sample, domains, cv=folds)
    result["domain_classifier_balanced_accuracy"] = _round(balanced_accuracy_score(domains, guessed))
    result["chance"] = _round(1.0 / len(feature_sets))
    return result


def _balanced_indices(sizes: Sequence[int], seed: int, max_points: int) -> list[np.ndarray]:
    """Sorted row indices of an equal-sized random subsample of each dataset, ``max_points`` in all."""
    rng = np.random.default_rng(seed)
    per_set = max(1, max_points // max(1, len(sizes)))
    return [np.sort(rng.choice(size, size=min(size, per_set), replace=False)) for size in sizes]


# -------------------------------------------------------------------------------------------- evaluation


@dataclass
class _Method:
    """One feature space evaluated under the protocol: AE-CFE or a baseline."""

    key: str
    source: np.ndarray
    targets: dict[str, np.ndarray]


def run_evaluation(
    source: FeatureSet,
    targets: Sequence[FeatureSet],
    out_dir: Path,
    labels_mode: str = "auto",
    classifier: str = "random_forest",
    seed: int = 0,
    split_seed: int = 42,
    baselines: bool = True,
) -> dict:
    """Run the protocol, write report.json/.md, split.csv and the figures into ``out_dir``; return the report.

    report.json: ``source``, ``labels`` (level used), ``labels_requested``, ``classes`` (the source classes the
    classifier is trained on), ``in_domain`` and ``targets`` (metrics as :func:`score`), ``baselines``
    (``{kind: {"description", "dimension", "in_domain", "targets"}}``, empty with ``baselines_note`` when
    skipped), ``domain_mixing``, ``classes_per_target`` (compared and dropped classes), ``cells_per_class``
    (per dataset), ``split``, ``files``, ``classifier``, ``seed``.
    """
    out_dir = Path(out_dir)
    make_classifier(classifier, seed)  # fail on a bad name before any work
    _check_target_names(source, targets)
    level, to_class = resolve_labels(source.labels, [target.labels for target in targets], labels_mode)
    source_y = _map_labels(source.labels, to_class)
    target_ys = {target.name: _map_labels(target.labels, to_class) for target in targets}
    source_classes = sorted(set(source_y.tolist()))
    if len(source_classes) < 2:
        raise UserError(
            f"source '{source.name}' has a single class ({', '.join(source_classes)}) at the {level} level: "
            "a classifier needs two or more; choose another source or --labels fine"
        )
    classes_per_target = {
        name: _compare_classes(source, name, source_classes, y, level) for name, y in target_ys.items()
    }

    train_idx, test_idx, split_info = _source_split(source, source_y, out_dir, split_seed)
    methods = [_Method("aecfe", source.features, {target.name: target.features for target in targets})]
    baselines_note = "skipped: not requested"
    if baselines:
        baseline_methods, baselines_note = _baseline_methods(source, targets, train_idx, seed)
        methods.extend(baseline_methods)

    results = {}
    for method in methods:
        results[method.key] = _evaluate_method(
            method, source_y, target_ys, classes_per_target, train_idx, test_idx, classifier, seed
        )

    report = {
        "source": source.name,
        "labels": level,
        "labels_requested": labels_mode,
        "classes": source_classes,
        "in_domain": results["aecfe"]["in_domain"],
        "targets": results["aecfe"]["targets"],
        "baselines": {
            method.key: {
                "description": BASELINES[method.key],
                "dimension": int(method.source.shape[1]),
                "in_domain": results[method.key]["in_domain"],
                "targets": results[method.key]["targets"],
            }
            for method in methods[1:]
        },
        "domain_mixing": _mixing_report(methods, source_y, target_ys, seed),
        "classes_per_target": classes_per_target,
        "cells_per_class": {source.name: _counts(source_y), **{name: _counts(y) for name, y in target_ys.items()}},
        "split": split_info,
        "files": {
            "report": "report.md",
            "split": SPLIT_FILE,
            "embedding": "embedding.png",
            "confusion": {target.name: confusion_filename(target.name) for target in targets},
        },
        "classifier": classifier,
        "seed": seed,
    }
    if baselines_note:
        report["baselines_note"] = baselines_note

    for target in targets:
        _plot_confusion(
            out_dir / confusion_filename(target.name), report["targets"][target.name], source.name, target.name, level
        )
    _plot_embedding(out_dir / "embedding.png", [source, *targets], [source_y, *target_ys.values()], seed)
    write_text(out_dir / "report.md", render_markdown(report))
    write_json(out_dir / "report.json", report)
    return report


def confusion_filename(target_name: str) -> str:
    """``confusion_<target>.png``, with characters unsafe in file names replaced."""
    return f"confusion_{re.sub(r'[^A-Za-z0-9._-]+', '_', target_name)}.png"


def _check_target_names(source: FeatureSet, targets: Sequence[FeatureSet]) -> None:
    names = [target.name for target in targets]
    if source.name in names:
        raise UserError(
            f"target '{source.name}' is the source: its held-out 20 % is already the in-domain score; "
            "pick another --target"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"target {', '.join(repeated)} given more than once")
    slugs = [confusion_filename(name) for name in names]
    if len(set(slugs)) != len(slugs):
        raise UserError(f"targets {', '.join(names)} would share a confusion plot file name; rename one dataset")


def _compare_classes(
    source: FeatureSet, target_name: str, source_classes: list[str], target_y: np.ndarray, level: str
) -> dict:
    target_classes = sorted(set(target_y.tolist()))
    compared = sorted(set(source_classes) & set(target_classes))
    if not compared:
        hint = "; try --labels coarse" if level == "fine" else ""
        raise UserError(
            f"source '{source.name}' ({', '.join(source_classes)}) and target '{target_name}' "
            f"({', '.join(target_classes)}) share no class at the {level} level{hint}"
        )
    scored = np.isin(target_y, compared)
    return {
        "compared": compared,
        "dropped_source_only": sorted(set(source_classes) - set(compared)),
        "dropped_target_only": sorted(set(target_classes) - set(compared)),
        "n_scored": int(scored.sum()),
        "n_unscored": int((~scored).sum()),
    }


def _counts(y: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(y, return_counts=True)
    return {str(name): int(count) for name, count in zip(names, counts)}


def _source_split(
    source: FeatureSet, source_y: np.ndarray, out_dir: Path, split_seed: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reuse ``split.csv`` while it covers exactly the source's cells, else draw and save a new one."""
    split_path = out_dir / SPLIT_FILE
    drawn = stratified_split(source_y, split_seed)
    saved = load_split(split_path, source.instance_ids)
    train_idx, test_idx = drawn if saved is None else saved
    if len(train_idx) == 0 or len(test_idx) == 0:
        origin = "drawn" if saved is None else f"read from {split_path}"
        raise UserError(
            f"source '{source.name}': the split {origin} has {len(train_idx)} training and {len(test_idx)} test cells; "
            "both need cells (a class needs two or more cells to be held out)"
        )
    if saved is None:
        save_split(split_path, source.instance_ids, train_idx, test_idx)
    # A split reused from an earlier run with another seed is reported as such rather than under this seed.
    same_as_seed = np.array_equal(train_idx, drawn[0]) and np.array_equal(test_idx, drawn[1])
    split_info = {
        "file": SPLIT_FILE,
        "seed": split_seed if same_as_seed else None,
        "n_train": int(len(train_idx)),
        "n_test": int(len(test_idx)),
    }
    return train_idx, test_idx, split_info


def _baseline_methods(
    source: FeatureSet, targets: Sequence[FeatureSet], train_idx: np.ndarray, seed: int
) -> tuple[list[_Method], str | None]:
    lacking = [dataset.name for dataset in (source, *targets) if dataset.crops is None]
    if lacking:
        return [], f"skipped: no crops.npy for {', '.join(lacking)} (run `aecfe detect --data NAME`)"
    methods = []
    for kind in BASELINES:
        source_descriptors = baseline_features(source.crops, kind)
        target_descriptors = {target.name: baseline_features(target.crops, kind) for target in targets}
        if kind == "raw_pixels":
            projection = fit_projection(source_descriptors[train_idx], source.features.shape[1], seed)
            source_descriptors = projection.transform(source_descriptors).astype(np.float32)
            target_descriptors = {
                name: projection.transform(d).astype(np.float32) for name, d in target_descriptors.items()
            }
        methods.append(_Method(kind, source_descriptors, target_descriptors))
    return methods, None


def _evaluate_method(
    method: _Method,
    source_y: np.ndarray,
    target_ys: dict[str, np.ndarray],
    classes_per_target: dict[str, dict],
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    classifier: str,
    seed: int,
) -> dict:
    model = make_classifier(classifier, seed)
    model.fit(method.source[train_idx], source_y[train_idx])
    test_y = source_y[test_idx]
    in_domain = score(test_y, model.predict(method.source[test_idx]), sorted(set(test_y.tolist())))
    cross_domain = {}
    for name, features in method.targets.items():
        compared = classes_per_target[name]["compared"]
        scored = np.isin(target_ys[name], compared)
        cross_domain[name] = score(target_ys[name][scored], model.predict(features[scored]), compared)
    return {"in_domain": in_domain, "targets": cross_domain}


def _mixing_report(
    methods: Sequence[_Method], source_y: np.ndarray, target_ys: dict[str, np.ndarray], seed: int
) -> dict:
    """Domain mixing of every method over the cells of the classes every dataset has (so a class only one
    dataset holds does not look like a domain shift), or over all cells when no class is common to all."""
    all_y = [source_y, *target_ys.values()]
    class_sets = [set(y.tolist()) for y in all_y]
    classes = sorted(set.intersection(*class_sets) or set.union(*class_sets))
    masks = [np.isin(y, classes) for y in all_y]
    scores = {}
    for method in methods:
        feature_sets = [method.source, *(method.targets[name] for name in target_ys)]
        scores[method.key] = domain_mixing([features[mask] for features, mask in zip(feature_sets, masks)], seed)
    return {"direction": MIXING_DIRECTION, "classes": classes, "methods": scores}


# --------------------------------------------------------------------------------------------- rendering


def render_summary_rows(report: dict) -> list[tuple]:
    """(method, split, n, accuracy, balanced_accuracy, macro_f1) rows, methods side by side per split."""
    methods = {"AE-CFE": report} | {METHOD_TITLES.get(kind, kind): entry for kind, entry in report["baselines"].items()}
    splits = [("in-domain", None)] + [(name, name) for name in report["targets"]]
    rows = []
    for split_title, target in splits:
        for title, entry in methods.items():
            metrics = entry["in_domain"] if target is None else entry["targets"][target]
            rows.append(
                (
                    title,
                    split_title,
                    metrics["n"],
                    metrics["accuracy"],
                    metrics["balanced_accuracy"],
                    metrics["macro_f1"],
                )
            )
    return rows


def render_markdown(report: dict) -> str:
    """report.md: the summary a person reads first, then classes, per-class results and domain mixing."""
    source, targets = report["source"], list(report["targets"])
    methods = {"aecfe": report} | report["baselines"]
    lines = [f"# Evaluation: trained on {source}", ""]
    lines += [
        f"Classifier `{report['classifier']}` (seed {report['seed']}), {report['labels']} labels "
        f"(asked: {report['labels_requested']}), trained on {report['split']['n_train']} {source} cells; in-domain = "
        f"the held-out {report['split']['n_test']} cells, cross-domain = every target cell of a shared class.",
        "",
        "## Summary",
        "",
        "Each cell: **balanced accuracy** / accuracy / macro-F1, in %, over the classes shared with the source.",
        "",
    ]
    header = [f"{source} in-domain (n={report['in_domain']['n']})"] + [
        f"{name} (n={report['targets'][name]['n']})" for name in targets
    ]
    lines += [_row(["method", *header]), _row(["---"] * (len(header) + 1))]
    for key, entry in methods.items():
        cells = [_triple(entry["in_domain"])] + [_triple(entry["targets"][name]) for name in targets]
        lines.append(_row([METHOD_TITLES.get(key, key), *cells]))
    if report.get("baselines_note"):
        lines += ["", f"Baselines {report['baselines_note']}."]
    lines += ["", *_classes_section(report), "", *_per_class_section(report, methods), "", *_mixing_section(report)]
    lines += [
        "",
        "## Files",
        "",
        f"- `{report['split']['file']}`: the source split, reused while the source cells are unchanged"
        + (
            " (drawn with seed " + str(report["split"]["seed"]) + ")"
            if report["split"]["seed"] is not None
            else " (from an earlier run)"
        )
        + "; delete it to draw a new one.",
        *[
            f"- `{file}`: row-normalised confusion matrix on {name}"
            for name, file in report["files"]["confusion"].items()
        ],
        f"- `{report['files']['embedding']}`: 2-D embedding of the AE-CFE features, by class and by dataset.",
        "",
    ]
    return "\n".join(lines)


def _classes_section(report: dict) -> list[str]:
    datasets = list(report["cells_per_class"])
    all_classes = sorted(set().union(*(counts.keys() for counts in report["cells_per_class"].values())))
    lines = [f"## Classes ({report['labels']} level)", "", f"Trained on: {', '.join(report['classes'])}.", ""]
    for name, info in report["classes_per_target"].items():
        lines.append(
            f"- **{name}**: compared {', '.join(info['compared'])} ({info['n_scored']} cells); "
            f"dropped, source only: {', '.join(info['dropped_source_only']) or 'none'}; "
            f"dropped, target only: {', '.join(info['dropped_target_only']) or 'none'} "
            f"({info['n_unscored']} cells not scored)."
        )
    lines += ["", _row(["class", *datasets]), _row(["---"] * (len(datasets) + 1))]
    for cls in all_classes:
        lines.append(_row([cls, *[str(report["cells_per_class"][name].get(cls, "-")) for name in datasets]]))
    return lines


def _per_class_section(report: dict, methods: dict) -> list[str]:
    baseline_keys = [key for key in methods if key != "aecfe"]
    lines = ["## Per class", "", "AE-CFE precision, recall and F1 in %, with the baselines' recall beside them."]
    splits = [(f"{report['source']} in-domain", None)] + [(name, name) for name in report["targets"]]
    for title, target in splits:
        pick = (lambda entry: entry["in_domain"]) if target is None else (lambda entry, t=target: entry["targets"][t])
        metrics = pick(report)
        header = [
            "class",
            "support",
            "precision",
            "recall",
            "F1",
            *[f"recall, {METHOD_TITLES.get(k, k)}" for k in baseline_keys],
        ]
        lines += ["", f"### {title}", "", _row(header), _row(["---"] * len(header))]
        for cls, values in metrics["per_class"].items():
            baseline_recalls = [_percent(pick(methods[key])["per_class"][cls]["recall"]) for key in baseline_keys]
            lines.append(
                _row(
                    [
                        cls,
                        str(values["support"]),
                        _percent(values["precision"]),
                        _percent(values["recall"]),
                        _percent(values["f1"]),
                        *baseline_recalls,
                    ]
                )
            )
        if metrics["predicted_outside_classes"]:
            outside = metrics["predicted_outside_classes"]
            lines += [
                "",
                f"{outside} {'cell was' if outside == 1 else 'cells were'} predicted as a class not scored here "
                "(counted as errors).",
            ]
    return lines


def _mixing_section(report: dict) -> list[str]:
    mixing = report["domain_mixing"]
    lines = [
        "## Domain mixing",
        "",
        f"{mixing['direction'][0].upper()}{mixing['direction'][1:]}. Cells of: {', '.join(mixing['classes'])}.",
        "",
    ]
    lines += [
        _row(["method", "points", "silhouette by dataset", "domain classifier balanced accuracy", "chance"]),
        _row(["---"] * 5),
    ]
    for key, values in mixing["methods"].items():
        lines.append(
            _row(
                [
                    METHOD_TITLES.get(key, key),
                    str(values["n_points"]),
                    _number(values["silhouette"]),
                    _number(values["domain_classifier_balanced_accuracy"]),
                    _number(values["chance"]),
                ]
            )
        )
    return lines


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _triple(metrics: dict) -> str:
    balanced, accuracy, macro_f1 = (_percent(metrics[key]) for key in ("balanced_accuracy", "accuracy", "macro_f1"))
    return f"**{balanced}** / {accuracy} / {macro_f1}"


# ----------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window (and work without a display)
    import matplotlib.pyplot as plt

    return plt


def _plot_confusion(path: Path, metrics: dict, source_name: str, target_name: str, level: str) -> None:
    """Rows normalised by the true-class count; an extra column holds predictions of unscored classes."""
    plt = _pyplot()
    classes = metrics["classes"]
    confusion = np.array(metrics["confusion"], dtype=np.float64)
    support = np.array([metrics["per_class"][cls]["support"] for cls in classes], dtype=np.float64)
    columns = list(classes)
    if metrics["predicted_outside_classes"]:
        confusion = np.column_stack([confusion, support - confusion.sum(axis=1)])
        columns.append("(unscored class)")
    fractions = confusion / np.maximum(support, 1)[:, None]
    size = 2.5 + 0.55 * len(columns)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    for row in range(fractions.shape[0]):
        for col in range(fractions.shape[1]):
            value = fractions[row, col]
            axes.text(
                col,
                row,
                f"{100 * value:.0f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > 0.6 else "black",
            )
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), [f"{cls} ({int(n)})" for cls, n in zip(classes, support)])
    axes.set_xlabel("predicted")
    axes.set_ylabel(f"true ({level} level, cells)")
    axes.set_title(f"{source_name} -> {target_name}: balanced accuracy {_percent(metrics['balanced_accuracy'])} %")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    write_figure(path, figure)


def _plot_embedding(path: Path, datasets: Sequence[FeatureSet], class_labels: Sequence[np.ndarray], seed: int) -> None:
    """Source and targets in one 2-D map: PCA, then t-SNE when there are enough points to be worth it."""
    plt = _pyplot()
    chosen = _balanced_indices([len(dataset.features) for dataset in datasets], seed, MAX_EMBEDDING_POINTS)
    sample = np.concatenate([dataset.features[rows] for dataset, rows in zip(datasets, chosen)]).astype(np.float64)
    classes = np.concatenate([y[rows] for y, rows in zip(class_labels, chosen)])
    domains = np.repeat(np.arange(len(datasets)), [len(rows) for rows in chosen])
    coordinates, method = _embed(StandardScaler().fit_transform(sample), seed)
    # The gap between the panels leaves room for the first panel's legend.
    figure, (by_class, by_dataset) = plt.subplots(1, 2, figsize=(16, 6.5), gridspec_kw={"wspace": 0.5})
    class_names = np.unique(classes)
    class_colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for index, cls in enumerate(class_names):
        chosen = classes == cls
        by_class.scatter(
            *coordinates[chosen].T,
            s=6,
            alpha=0.7,
            color=class_colours(index % class_colours.N),
            label=f"{cls} ({chosen.sum()})",
        )
    dataset_colours = plt.get_cmap("Set1")
    for index, dataset in enumerate(datasets):
        chosen = domains == index
        by_dataset.scatter(
            *coordinates[chosen].T,
            s=6,
            alpha=0.6,
            color=dataset_colours(index % dataset_colours.N),
            label=f"{dataset.name} ({chosen.sum()})",
        )
    for axes, title in ((by_class, "by class"), (by_dataset, "by dataset")):
        axes.set_title(f"AE-CFE features, {method}, {title}")
        axes.set_xticks([])
        axes.set_yticks([])
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, markerscale=2, frameon=False)
    write_figure(path, figure)


def _embed(sample: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    n_components = min(50, *sample.shape)
    reduced = PCA(n_components=n_components, svd_solver="full", random_state=seed).fit_transform(sample)
    if len(sample) >= TSNE_MIN_POINTS:
        tsne = TSNE(n_components=2, init="pca", max_iter=TSNE_ITERATIONS, random_state=seed)
        return tsne.fit_transform(reduced), "PCA + t-SNE"
    if reduced.shape[1] < 2:  # one feature dimension: draw it against zero
        reduced = np.column_stack([reduced, np.zeros(len(reduced))])
    return reduced[:, :2], "PCA"
