"""Evaluation stage: how well cell features classify white cells in their own domain and across domains.

Protocol (``shared/docs/method.md``): a classifier (a random forest, as in the paper) is trained on 80 % of
the source dataset; in-domain = the held-out 20 %, cross-domain = 100 % of every target dataset. Only
classes present in both source and target are scored (``shared/docs/labels.md``); source classes a target
lacks are still trained on, so predicting one of them counts as an error, as in the authors' protocol.
The same split and classifier are applied to label-free baselines computed from the cell crops (raw
pixels, colour histograms, stain-normalised colour histograms: ``baselines.py``) so a reader sees what the
learned features add. For every feature space the report also measures how well the datasets mix (lower =
better aligned).

Everything is seeded: the same inputs give a byte-identical ``report.json``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .baselines import BASELINES, baseline_features, fit_projection, lab_statistics
from .classify import (
    agreement_columns,
    cached_plain_fit,
    check_classifier_settings,
    dropped_column_names,
    DEFAULT_TREES,
    fit_classifier,
    kept_columns,
    normalised_column_names,
    normalised_features,
    restrict_view,
    score,
    size_check_columns,
)
from .errors import UserError
from .evaluate_report import plot_confusion, plot_embedding, render_markdown
from .feature_sets import (
    check_same_columns,
    chosen_classes,
    FeatureSet,
    load_split,
    map_labels,
    morphology_columns,
    resolve_labels,
    save_split,
    stratified_split,
)
from .io import write_json, write_text
from .mixing import MIXING_DIRECTION, domain_mixing

SPLIT_FILE = "split.csv"
# When the features hold both, each part is also scored alone, so a reader sees what each contributes.
PARTS = {
    "latent": "the autoencoder's latent columns (f0, f1, ...) alone",
    "morphology": "the morphology descriptor columns (m_...) alone: label-free, no training",
}


# -------------------------------------------------------------------------------------------- evaluation


@dataclass
class _Method:
    """One feature space evaluated under the protocol: AE-CFE or a baseline.

    ``keep``: per target, the columns its classifier uses (``evaluate.max_shift``); a target not named
    here, and the in-domain score, use every column. ``agreement``: the columns of the second view that
    self-training's labels must agree with (:func:`classify.fit_classifier`), or None; ``sizes``: the size
    columns self-training checks against the source's range, or None.
    """

    key: str
    source: np.ndarray
    targets: dict[str, np.ndarray]
    keep: dict[str, np.ndarray] = field(default_factory=dict)
    agreement: np.ndarray | None = None
    sizes: np.ndarray | None = None


def evaluation_settings(cfg) -> dict:
    """:func:`run_evaluation`'s keyword arguments as an ``EvaluateConfig`` sets them (all but the seed)."""
    return {"labels_mode": cfg.labels, "classifier": cfg.classifier, "split_seed": cfg.split_seed,
            "baselines": cfg.baselines, "feature_norm": cfg.feature_norm, "max_shift": cfg.max_shift,
            "self_training": cfg.self_training, "self_training_agreement": cfg.self_training_agreement,
            "self_training_sizes": cfg.self_training_sizes, "class_weight": cfg.class_weight, "trees": cfg.trees,
            "classes": cfg.classes}


def check_settings(cfg) -> None:
    """Fail before any work on an ``EvaluateConfig`` whose classifier settings cannot work
    (:func:`classify.check_classifier_settings`)."""
    check_classifier_settings(cfg.classifier, cfg.class_weight, cfg.trees, cfg.feature_norm, cfg.max_shift,
                              cfg.self_training, cfg.self_training_agreement, cfg.self_training_sizes)


def run_evaluation(
    source: FeatureSet,
    targets: Sequence[FeatureSet],
    out_dir: Path,
    labels_mode: str = "auto",
    classifier: str = "random_forest",
    seed: int = 0,
    split_seed: int = 42,
    baselines: bool = True,
    feature_norm: str = "none",
    max_shift: float | None = None,
    self_training: int = 0,
    class_weight: str = "none",
    trees: int = DEFAULT_TREES,
    self_training_agreement: str = "none",
    self_training_sizes: str = "none",
    classes: Sequence[str] | None = None,
) -> dict:
    """Run the protocol, write report.json/.md, split.csv and the figures into ``out_dir``; return the report.

    report.json: ``source``, ``labels`` (level used), ``labels_requested``, ``classes`` (the source classes the
    classifier is trained on), ``in_domain`` and ``targets`` (metrics as :func:`score`), ``baselines``
    (``{kind: {"description", "dimension", "in_domain", "targets"}}``, empty with ``baselines_note`` when
    skipped), ``parts`` (the same, for the latent and the morphology columns alone when the features hold
    both; else empty), ``domain_mixing``, ``classes_per_target`` (compared and dropped classes), ``cells_per_class``
    (per dataset), ``split``, ``files``, ``classifier``, ``seed``, ``feature_norm`` (how the learned features
    were normalised per dataset before the classifier: :func:`classify.normalise_features`), ``max_shift``
    and ``dropped_columns`` (per target, the learned-feature columns left out of its classifier as shifted
    between the source and that target: :func:`classify.stable_columns`; the parts lose them too). Each
    target's columns depend on the source and that target alone, so its score does not change with the
    other targets of the command, and ``predict`` on the same cells gives the same labels. ``self_training``:
    rounds of label-free adaptation of each target's classifier to that target's cells
    (:func:`classify.fit_classifier`), for every method alike; the in-domain score stays a plain fit.
    ``self_training_agreement``: the second view of AE-CFE's columns whose labels self-training must agree with
    (:func:`classify.agreement_columns`); ``self_training_sizes``: whether that self-training learns only target
    cells within the source's range of sizes (:func:`classify.size_check_columns`). The parts and baselines have
    neither, so they self-train as without them.
    ``class_weight``: how the classifier weighs the source's classes (:func:`classify.make_classifier`), for
    every method alike; ``trees`` the random forest's size, for every method alike.
    ``classes``: the source classes to learn (``evaluate.classes``; None: all). The source's other cells are
    left out before anything is split, normalised or fitted, for every method alike; ``classes_left_out``
    names their classes.
    """
    out_dir = Path(out_dir)
    check_classifier_settings(classifier, class_weight, trees, feature_norm, max_shift, self_training,
                              self_training_agreement, self_training_sizes)
    columns = normalised_column_names(source.columns, feature_norm)
    agreement = agreement_columns(columns, self_training_agreement)
    sizes = size_check_columns(columns, self_training_sizes)
    _check_target_names(source, targets)
    level, source_y, target_ys, classes_per_target = compare_classes(
        source.name, source.labels, {target.name: target.labels for target in targets}, labels_mode, classes)
    chosen = chosen_classes(source.name, source_y, classes, level)
    classes_left_out = sorted(set(source_y[~chosen].tolist()))
    if classes_left_out:
        source, source_y = source.select(chosen), source_y[chosen]
    source_classes = sorted(set(source_y.tolist()))

    train_idx, test_idx, split_info = _source_split(source, source_y, out_dir, split_seed)
    normalised = _Method("aecfe", normalised_features(source, feature_norm),
                         {target.name: normalised_features(target, feature_norm) for target in targets})
    normalised.keep = {name: kept_columns(source, normalised.source, features, max_shift)
                       for name, features in normalised.targets.items()}
    normalised.agreement = agreement
    normalised.sizes = sizes
    methods = [normalised]
    part_methods = _part_methods(normalised, columns, source, targets)
    baseline_methods, baselines_note = [], "skipped: not requested"
    if baselines:
        baseline_methods, baselines_note = _baseline_methods(source, targets, train_idx, seed)
    methods += part_methods + baseline_methods

    results = {}
    for method in methods:
        results[method.key] = _evaluate_method(
            method, source_y, target_ys, classes_per_target, train_idx, test_idx, classifier, seed, self_training,
            class_weight, trees)

    report = {
        "source": source.name,
        "labels": level,
        "labels_requested": labels_mode,
        "classes": source_classes,
        "classes_left_out": classes_left_out,
        "in_domain": results["aecfe"]["in_domain"],
        "targets": results["aecfe"]["targets"],
        "parts": {method.key: _method_entry(method, PARTS, results) for method in part_methods},
        "baselines": {method.key: _method_entry(method, BASELINES, results) for method in baseline_methods},
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
        "feature_norm": feature_norm,
        "max_shift": max_shift,
        "self_training": self_training,
        "self_training_agreement": self_training_agreement,
        "self_training_sizes": self_training_sizes,
        "class_weight": class_weight,
        "trees": trees,
        "dropped_columns": {name: dropped_column_names(columns, keep) for name, keep in normalised.keep.items()},
    }
    if baselines_note:
        report["baselines_note"] = baselines_note

    for target in targets:
        plot_confusion(
            out_dir / confusion_filename(target.name), report["targets"][target.name], source.name, target.name, level
        )
    plot_embedding(out_dir / "embedding.png", [source, *targets], [source_y, *target_ys.values()], seed)
    write_text(out_dir / "report.md", render_markdown(report))
    write_json(out_dir / "report.json", report)
    return report


def confusion_filename(target_name: str) -> str:
    """``confusion_<target>.png``, with characters unsafe in file names replaced."""
    return f"confusion_{re.sub(r'[^A-Za-z0-9._-]+', '_', target_name)}.png"


def _check_target_names(source: FeatureSet, targets: Sequence[FeatureSet]) -> None:
    names = [target.name for target in targets]
    for name in sorted(set(names) & {source.name, *source.datasets()}):
        raise UserError(
            f"target '{name}' is the source: its held-out 20 % is already the in-domain score; pick another --target"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"target {', '.join(repeated)} given more than once")
    slugs = [confusion_filename(name) for name in names]
    if len(set(slugs)) != len(slugs):
        raise UserError(f"targets {', '.join(names)} would share a confusion plot file name; rename one dataset")


def compare_classes(
    source_name: str, source_labels: Sequence[str], target_labels: dict[str, Sequence[str]], labels_mode: str,
    classes: Sequence[str] | None = None,
) -> tuple[str, np.ndarray, dict[str, np.ndarray], dict[str, dict]]:
    """The label level, the source's and each target's classes there, and per target the classes scored:
    those of the target among the source's ``classes`` (``evaluate.classes``; None: all the source's).

    Raises a UserError when the source has fewer than two classes, lacks one of ``classes``, or a target
    shares none with it. The pipeline calls it on the images' labels before detecting anything, so such a
    mistake costs no run; ``run_evaluation`` calls it again on the detected cells.
    """
    level, to_class = resolve_labels(source_labels, list(target_labels.values()), labels_mode)
    source_y = map_labels(np.asarray(source_labels, dtype=str), to_class)
    source_classes = sorted(set(source_y[chosen_classes(source_name, source_y, classes, level)].tolist()))
    if len(source_classes) < 2:
        raise UserError(
            f"source '{source_name}' has a single class ({', '.join(source_classes)}) at the {level} level: "
            "a classifier needs two or more; choose another source or --labels fine"
        )
    target_ys = {name: map_labels(np.asarray(labels, dtype=str), to_class) for name, labels in target_labels.items()}
    classes_per_target = {name: _compare_target(source_name, name, source_classes, y, level)
                          for name, y in target_ys.items()}
    return level, source_y, target_ys, classes_per_target


def _compare_target(
    source_name: str, target_name: str, source_classes: list[str], target_y: np.ndarray, level: str
) -> dict:
    target_classes = sorted(set(target_y.tolist()))
    compared = sorted(set(source_classes) & set(target_classes))
    if not compared:
        hint = "; try --labels coarse" if level == "fine" else ""
        raise UserError(
            f"source '{source_name}' ({', '.join(source_classes)}) and target '{target_name}' "
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
    drawn = stratified_split(source.strata(source_y), split_seed)
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


def _method_entry(method: _Method, descriptions: dict[str, str], results: dict) -> dict:
    return {
        "description": descriptions[method.key],
        "dimension": int(method.source.shape[1]),
        "in_domain": results[method.key]["in_domain"],
        "targets": results[method.key]["targets"],
    }


def _part_methods(
    features: _Method, columns: Sequence[str], source: FeatureSet, targets: Sequence[FeatureSet]
) -> list[_Method]:
    """The latent and the morphology columns of ``features`` (named ``columns``) as methods of their own,
    when it holds both; each keeps, per target, the columns ``features`` keeps. A part every column of which
    is left out for some target is not scored."""
    check_same_columns(source, targets)
    morphology = morphology_columns(columns)
    if not columns or morphology.all() or not morphology.any():
        return []
    parts = []
    for key, part in (("latent", ~morphology), ("morphology", morphology)):
        keep = {name: kept[part] for name, kept in features.keep.items()}
        if all(kept.any() for kept in keep.values()):
            parts.append(_Method(key, features.source[:, part],
                                 {name: f[:, part] for name, f in features.targets.items()}, keep))
    return parts


def _baseline_methods(
    source: FeatureSet, targets: Sequence[FeatureSet], train_idx: np.ndarray, seed: int
) -> tuple[list[_Method], str | None]:
    lacking = [dataset.name for dataset in (source, *targets) if dataset.crops is None]
    if lacking:
        return [], f"skipped: no crops.npy for {', '.join(lacking)} (run `aecfe detect --data NAME`)"
    # Stain normalisation maps every dataset, the source included, onto the source's colour statistics: a
    # pooled source's first dataset's, onto which its other datasets are mapped too.
    first = source.dataset_rows()[0]
    source_statistics = lab_statistics(source.rows_of(source.crops, first))
    methods = []
    for kind in BASELINES:
        reference = source_statistics if kind == "stain_normalized_histogram" else None

        def describe(rows: np.ndarray) -> np.ndarray:
            own = reference if np.array_equal(rows, first) else None  # None: computed from the rows' crops
            return baseline_features(source.rows_of(source.crops, rows), kind, reference=reference, statistics=own)

        source_descriptors = source.per_dataset(describe)
        target_descriptors = {
            target.name: baseline_features(target.crops, kind, reference=reference) for target in targets
        }
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
    self_training: int = 0,
    class_weight: str = "none",
    trees: int = DEFAULT_TREES,
) -> dict:
    every_column = np.ones(method.source.shape[1], bool)
    train_features, train_y = method.source[train_idx], source_y[train_idx]
    plain_fits = {}  # shared by the in-domain score and every target that keeps the same columns

    def plain_fit(columns: np.ndarray):
        return cached_plain_fit(plain_fits, classifier, seed, train_features, train_y, columns, class_weight, trees)

    test_y = source_y[test_idx]
    in_domain = score(test_y, plain_fit(every_column).predict(method.source[test_idx]), sorted(set(test_y.tolist())))
    cross_domain = {}
    for name, features in method.targets.items():
        columns = method.keep.get(name, every_column)
        compared = classes_per_target[name]["compared"]
        scored = np.isin(target_ys[name], compared)
        # Self-training adapts to all of the target's cells, as predict does: which cells belong to the
        # compared classes is known from labels only.
        model = fit_classifier(classifier, seed, train_features[:, columns], train_y, target=features[:, columns],
                               rounds=self_training, plain=plain_fit(columns), class_weight=class_weight,
                               trees=trees, agreement=restrict_view(method.agreement, columns),
                               sizes=restrict_view(method.sizes, columns))
        cross_domain[name] = score(target_ys[name][scored], model.predict(features[scored][:, columns]), compared)
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

