"""Classifiers trained on cell features, and the metrics they are scored with."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from .errors import UserError, check_choice, did_you_mean
from .feature_sets import FeatureSet, morphology_columns, size_columns

CLASSIFIERS = ("random_forest", "logistic_regression", "knn", "linear_svm")
CLASS_WEIGHTS = ("none", "balanced")
DEFAULT_TREES = 100  # the paper's random forest (method.md)
FEATURE_NORMS = ("none", "dataset", "both")
SELF_TRAINING_AGREEMENTS = ("none", "morphology")
SELF_TRAINING_SIZES = ("none", "source_range")
STANDARDISED_SUFFIX = "@dataset"  # names the standardised copy of a column under feature_norm "both"
DIGITS = 6
# A class scored on fewer cells than this is all but a coin: Zheng's one basophil, right or wrong, moves a
# five-class balanced accuracy by 0.20, more than any lever (docs/accuracy_notes.md). Reports name such
# classes and give the balanced accuracy over the others beside the full one, which stays the score.
RARE_CLASS_CELLS = 10
# Fewer cells than this say too little about a dataset's medians and spreads to tell a stain's shift from
# sampling noise (one cell has no spread at all: a single PBC cell against PBC itself "shifted" up to 51
# of 86 columns), so such a dataset takes no part in choosing columns.
MIN_CELLS_FOR_SHIFT = 30
# Self-training labels at most this share of each predicted class of the target (its most confident cells):
# the least confident fifth lies where the source's boundaries cut through the target's clusters and is the
# likeliest to be wrong (docs/accuracy_notes.md, sixth step, for the shares tried).
SELF_TRAINING_SHARE = 0.8
# The size check of self-training keeps a target cell whose sizes lie within the source's cells' from this
# quantile to its complement: the middle 98 %, so a handful of odd source crops do not stretch the range.
SIZE_RANGE_QUANTILE = 0.01


def make_classifier(name: str, seed: int, class_weight: str = "none", trees: int = DEFAULT_TREES) -> BaseEstimator:
    """A fresh, seeded classifier; the linear and neighbour models see standardised features.

    ``class_weight`` "balanced" weighs each class inversely to its number of training cells, so every class
    counts alike whatever the mix the source lab happened to sample (Zheng's cells are 59 % neutrophils):
    a lab's class mix is no prior for another lab's, and balanced accuracy, the score, weighs classes alike.
    ``trees``: the random forest's number of trees (the paper's 100; more lower the variance of its vote).
    """
    check_choice("evaluate.class_weight", class_weight, CLASS_WEIGHTS)
    if isinstance(trees, bool) or not isinstance(trees, int) or trees < 1:
        raise UserError(f"evaluate.trees is {trees!r}: set it to a whole number of trees, 1 or more "
                        "(--trees, or evaluate.trees in the config file)")
    weights = None if class_weight == "none" else class_weight
    if name == "random_forest":
        # The paper's forest (method.md); n_jobs does not change the result, only the speed.
        return RandomForestClassifier(n_estimators=trees, max_depth=16, random_state=seed, n_jobs=-1,
                                      class_weight=weights)
    if name == "logistic_regression":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed,
                                                                  class_weight=weights))
    if name == "knn":
        if weights is not None:
            raise UserError("evaluate.classifier knn cannot weigh classes (it votes among neighbours); "
                            "set evaluate.class_weight: none (--class-weight none), or choose another classifier")
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5))
    if name == "linear_svm":
        return make_pipeline(StandardScaler(), LinearSVC(max_iter=10000, random_state=seed, class_weight=weights))
    raise UserError(
        f"unknown classifier '{name}'{did_you_mean(name, CLASSIFIERS)}; choose one of {', '.join(CLASSIFIERS)}"
    )


def fit_classifier(
    name: str,
    seed: int,
    features: np.ndarray,
    labels: np.ndarray,
    target: np.ndarray | None = None,
    rounds: int = 0,
    plain: BaseEstimator | None = None,
    class_weight: str = "none",
    trees: int = DEFAULT_TREES,
    agreement: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
) -> BaseEstimator:
    """A classifier fitted on ``features`` and ``labels``, then adapted to the unlabelled ``target`` cells
    by ``rounds`` rounds of self-training (0, or no ``target``: the plain fit). ``plain``: that plain fit,
    where the caller has it already (``evaluate`` shares it between the in-domain score and every target).
    ``class_weight``, ``trees``: as :func:`make_classifier`; every refit weighs the source and target cells it is given.

    Each round labels the target with the current model and refits on the source cells plus, per predicted
    class, the target's most confident cells under their predicted label; the share taken grows over the
    rounds to :data:`SELF_TRAINING_SHARE`. The classifier then draws its boundaries where the target's own
    cells are sparse, not only where the source's are: a stain that moves a whole class of the new lab
    towards another class of the source moves the confident core of that class less than its edge. No
    target label is used, so ``predict`` on a new lab adapts exactly as ``evaluate`` does on a labelled one.

    ``agreement``: (D,) bool, a second view of the cells among the columns of ``features`` (the morphology
    descriptors: :func:`agreement_columns`). A plain fit on those columns alone labels the target once,
    and self-training then takes a target cell only where the current model agrees with it, still at most the
    share of each predicted class above. A forest's confident mistakes on a new lab are mostly its own (a
    colour the source never showed); a second view that errs otherwise rarely makes the same one (co-training,
    Blum and Mitchell 1998), so fewer wrong labels are learnt as right. A view of no column, or of every
    column, is no second opinion, and self-training takes the cells as without it.

    ``sizes``: (D,) bool, the cell-size columns of ``features`` (:func:`size_check_columns`). Self-training
    then takes a target cell only where its sizes lie in the source's range (:func:`within_size_range`): a
    new lab holds classes the source never showed (PBC's platelets and erythroblasts against BCCD's four
    white-cell classes), and those cells, most of them smaller than any white cell, would be learnt under a
    source class they resemble in colour (docs/accuracy_notes.md, thirtieth look).
    """
    check_self_training(rounds)
    model = make_classifier(name, seed, class_weight, trees).fit(features, labels) if plain is None else plain
    if target is None or len(target) == 0:
        return model
    second_opinion = None
    in_range = np.ones(len(target), bool)
    if rounds and sizes is not None and sizes.any():
        in_range = within_size_range(features[:, sizes], target[:, sizes])
    if rounds and agreement is not None and 0 < np.count_nonzero(agreement) < len(agreement):
        view = make_classifier(name, seed, class_weight, trees).fit(features[:, agreement], labels)
        second_opinion = np.asarray(view.predict(target[:, agreement]))
    for round_number in range(1, rounds + 1):
        predicted, confidence = _predictions_and_confidence(model, target)
        agreed = in_range if second_opinion is None else in_range & (predicted == second_opinion)
        chosen = self_training_cells(predicted, confidence, SELF_TRAINING_SHARE * round_number / rounds, agreed)
        model = make_classifier(name, seed, class_weight, trees).fit(np.concatenate([features, target[chosen]]),
                                                np.concatenate([np.asarray(labels), predicted[chosen]]))
    return model


def self_training_cells(predicted: np.ndarray, confidence: np.ndarray, share: float, agreed: np.ndarray) -> np.ndarray:
    """Indices of the target cells a round of self-training learns under their predicted class: per predicted
    class, its most confident ``share`` (at least one cell), of which only those ``agreed`` (a second view gave
    the same class, the sizes are in range) are taken; the count is the class's share whether or not all agree."""
    chosen = [np.zeros(0, int)]
    for cls in np.unique(predicted):
        members = np.flatnonzero(predicted == cls)
        count = max(1, int(round(share * len(members))))
        candidates = members[agreed[members]]
        chosen.append(candidates[np.argsort(-confidence[candidates], kind="stable")[:count]])
    return np.concatenate(chosen)


def cached_plain_fit(
    cache: dict, name: str, seed: int, features: np.ndarray, labels: np.ndarray, columns: np.ndarray,
    class_weight: str = "none", trees: int = DEFAULT_TREES,
) -> BaseEstimator:
    """The plain fit of ``features[:, columns]`` (:func:`fit_classifier` without a target), made once per set of
    ``columns``: ``cache`` holds the fits of one source's training cells, classifier, seed and settings by
    their columns, so the in-domain score and every target that keeps the same columns share one forest."""
    key = np.asarray(columns, bool).tobytes()
    if key not in cache:
        cache[key] = fit_classifier(name, seed, features[:, columns], labels, class_weight=class_weight, trees=trees)
    return cache[key]


def agreement_columns(columns: Sequence[str], kind: str) -> np.ndarray | None:
    """(D,) bool over the named ``columns`` of a classifier: the second view whose labels self-training must
    agree with (:func:`fit_classifier`'s ``agreement``; ``evaluate.self_training_agreement``). "morphology":
    the morphology descriptors, measured on each cell's own pixels and read against its own lab (sizes as
    ratios to the lab's median cell, colours on its stain statistics), which across labs classify far better
    alone than the latent does (docs/accuracy_notes.md). None for "none", or columns without names."""
    check_choice("evaluate.self_training_agreement", kind, SELF_TRAINING_AGREEMENTS)
    if kind == "none" or not len(columns):
        return None
    return morphology_columns(columns)


def size_check_columns(columns: Sequence[str], kind: str) -> np.ndarray | None:
    """(D,) bool over the named ``columns`` of a classifier: the cell sizes that self-training checks against
    the source's range (:func:`fit_classifier`'s ``sizes``; ``evaluate.self_training_sizes``). None for
    "none", or where the columns name no size (features extracted without morphology)."""
    check_choice("evaluate.self_training_sizes", kind, SELF_TRAINING_SIZES)
    if kind == "none" or not len(columns):
        return None
    sizes = size_columns(columns)
    return sizes if sizes.any() else None


def restrict_view(view: np.ndarray | None, columns: np.ndarray) -> np.ndarray | None:
    """A (D,) column mask (:func:`agreement_columns`, :func:`size_check_columns`) cut to the classifier's
    ``columns`` (D,) bool, as its features are; None stays None."""
    return None if view is None else view[columns]


def within_size_range(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N,) bool: the ``target`` cells (N, K) whose every size column lies within the range of the ``source``
    cells' (M, K), logs of sizes read against each lab's median cell (:func:`normalise_features`).

    The range is the source's middle 98 % (:data:`SIZE_RANGE_QUANTILE`) about its median, set on the
    target's median and widened, never narrowed, by as much as the target's interquartile range is wider
    than the source's. A lab whose cells vary more in size (smear fields at varying zoom, a wider class mix)
    keeps its ordinary cells: from Zheng's tight sizes alone, a fifth of BCCD's cells fell outside
    (docs/accuracy_notes.md, thirtieth look). A tighter target keeps the source's range, which already holds
    every class the source knows."""
    low, centre, high = np.quantile(source, [SIZE_RANGE_QUANTILE, 0.5, 1 - SIZE_RANGE_QUANTILE], axis=0)
    target_centre = np.median(target, axis=0)
    widen = np.maximum(1.0, _interquartile_range(target) / np.maximum(_interquartile_range(source), 1e-9))
    inside = ((target >= target_centre + (low - centre) * widen)
              & (target <= target_centre + (high - centre) * widen))
    return inside.all(axis=1)


def _interquartile_range(values: np.ndarray) -> np.ndarray:
    return np.subtract(*np.percentile(values, [75, 25], axis=0))


def check_classifier_settings(
    classifier: str, class_weight: str, trees: int, feature_norm: str, max_shift: float | None, self_training: int,
    self_training_agreement: str, self_training_sizes: str,
) -> None:
    """Fail with one line naming the setting on any of ``evaluate``'s classifier settings that cannot work (a
    misspelt choice, knn with class weights, a count below one), before any detection or training: evaluate,
    predict and every command of the CLI check them up front, so a misspelt value costs no run and is not
    saved into the workdir's config for the next command."""
    make_classifier(classifier, 0, class_weight, trees)
    check_choice("evaluate.feature_norm", feature_norm, FEATURE_NORMS)
    _check_max_shift(max_shift)
    check_self_training(self_training)
    check_choice("evaluate.self_training_agreement", self_training_agreement, SELF_TRAINING_AGREEMENTS)
    check_choice("evaluate.self_training_sizes", self_training_sizes, SELF_TRAINING_SIZES)


def check_self_training(rounds: int) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise UserError(f"evaluate.self_training is {rounds!r}: use 0 (off) or a whole number of rounds")


def _predictions_and_confidence(model: BaseEstimator, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and a confidence to rank them by: the class probability, or for a model without
    probabilities (the linear SVM) the decision value of the predicted class."""
    if hasattr(model, "predict_proba"):
        scores = model.predict_proba(features)
    else:
        scores = model.decision_function(features)
        if scores.ndim == 1:  # two classes: one signed margin
            scores = np.stack([-scores, scores], axis=1)
    return np.asarray(model.classes_)[scores.argmax(axis=1)], scores.max(axis=1)


def normalise_features(features: np.ndarray, mode: str, columns: Sequence[str] = ()) -> np.ndarray:
    """``mode`` "dataset": standardise each dimension with this dataset's own mean and standard deviation
    over all its cells (label-free, like AdaBN re-estimating batch statistics in a new domain), so a shift
    or rescaling of the whole lab in feature space does not move its cells across the classifier's
    boundaries. "both": the features as extracted, then their "dataset" form (columns named by
    :func:`normalised_column_names`). Within one lab the two copies of a column differ by an affine map, so
    a forest splits on either alike; across labs its trees then vote over both alignments of the labs. Each
    alone moves one direction of a lab pair up and the other down, since a lab's own moments follow its
    class mix as well as its stain (docs/accuracy_notes.md, seventeenth and eighteenth looks). Call it once
    per dataset; "none" returns the features as they are.

    Whatever the mode, the cell sizes among the named ``columns`` (:func:`feature_sets.size_columns`, logs of
    sizes in image pixels) become differences from this dataset's median, ratios to its typical cell, which
    is what a lab's magnification leaves unchanged; they are not standardised too, since their spread follows
    the lab's class mix, not its optics (twenty-sixth look)."""
    check_choice("evaluate.feature_norm", mode, FEATURE_NORMS)
    sizes = size_columns(columns) if len(columns) else np.zeros(np.shape(features)[1], bool)
    if mode == "none" and not sizes.any():
        return features
    features = np.array(features, np.float64)
    features[:, sizes] -= np.median(features[:, sizes], axis=0)
    if mode == "none":
        return features.astype(np.float32)
    std = features.std(axis=0)
    standardised = (features - features.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
    standardised[:, sizes] = features[:, sizes]
    if mode == "dataset":
        return standardised.astype(np.float32)
    return np.concatenate([features, standardised[:, ~sizes]], axis=1).astype(np.float32)


def normalised_features(cells: FeatureSet, mode: str) -> np.ndarray:
    """:func:`normalise_features` of ``cells``, each dataset they come from read against its own statistics:
    the cells of a source pooled from several labs are normalised lab by lab, as each target is."""
    return cells.per_dataset(lambda rows: normalise_features(cells.rows_of(cells.features, rows), mode, cells.columns))


def kept_columns(source: FeatureSet, source_features: np.ndarray, target_features: np.ndarray,
                 max_shift: float | None) -> np.ndarray:
    """:func:`stable_columns` between the source's normalised features (``source_features``, rows as ``source``)
    and a target's: a source pooled from several labs takes part lab by lab, so a column that moves between
    two of its labs is left out as one that moves between the source and the target."""
    return stable_columns([*(source_features[rows] for rows in source.dataset_rows()), target_features], max_shift)


def normalised_column_names(columns: Sequence[str], mode: str) -> tuple[str, ...]:
    """The names of :func:`normalise_features`' columns for features whose columns are ``columns`` (none
    when the features name none): under "both" each name, then each name but the sizes' with
    :data:`STANDARDISED_SUFFIX`."""
    if mode != "both" or not columns:
        return tuple(columns)
    sizes = size_columns(columns)
    return (*columns, *(f"{column}{STANDARDISED_SUFFIX}" for column, size in zip(columns, sizes) if not size))


def stable_columns(datasets: Sequence[np.ndarray], max_shift: float | None) -> np.ndarray:
    """(D,) bool: the feature columns a classifier may use across these datasets (label-free).

    A column is dropped when its median differs between any two of ``datasets`` (each (N_i, D)) by more
    than ``max_shift`` times their mean interquartile range. What moves a whole lab that far (the stain,
    the lamp, the camera) is not what tells its cell classes apart, and a classifier trained on one lab
    takes any column that separates its classes there: kept, such a column sends another lab's cells to
    the wrong class wholesale (PBC-trained forests called Zheng's neutrophils eosinophils by their
    cytoplasm colour; docs/accuracy.md). Differences in class mix move medians less. ``None`` keeps all,
    and so does a comparison left with fewer than two datasets of ``MIN_CELLS_FOR_SHIFT`` cells or more.
    """
    dimensions = np.asarray(datasets[0]).shape[1]
    _check_max_shift(max_shift)
    datasets = [d for d in datasets if len(d) >= MIN_CELLS_FOR_SHIFT]
    if max_shift is None or len(datasets) < 2:
        return np.ones(dimensions, bool)
    medians = [np.median(d, axis=0) for d in datasets]
    spreads = [_interquartile_range(d) for d in datasets]
    keep = np.ones(dimensions, bool)
    for i in range(len(datasets)):
        for j in range(i + 1, len(datasets)):
            shift = np.abs(medians[i] - medians[j]) / np.maximum((spreads[i] + spreads[j]) / 2, 1e-9)
            keep &= shift <= max_shift
    if not keep.any():
        raise UserError(f"evaluate.max_shift {max_shift} drops every feature column between these datasets; "
                        "raise it, or set it to null to keep them all")
    return keep


def _check_max_shift(max_shift: float | None) -> None:
    if max_shift is not None and max_shift <= 0:
        raise UserError(f"evaluate.max_shift is {max_shift}: use a positive number of interquartile ranges, or null")


def dropped_column_names(columns: Sequence[str], keep: np.ndarray) -> list[str]:
    """Names of the columns ``keep`` leaves out (``column <i>`` where the features name no columns)."""
    return [columns[i] if columns else f"column {i}" for i in np.flatnonzero(~keep)]


def score(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict:
    """Metrics over ``classes`` (every true label must be one); a prediction outside them is an error.

    Balanced accuracy and macro-F1 average over the classes that have cells in ``y_true``. The confusion
    matrix is square over ``classes``; predictions outside them are counted in ``predicted_outside_classes``.
    ``rare_classes``: the classes with cells but fewer than :data:`RARE_CLASS_CELLS`, by number of cells;
    ``balanced_accuracy_common``: balanced accuracy over the other classes (None when none is left).
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
    common = present & (support >= RARE_CLASS_CELLS)
    return {
        "n": int(len(y_true)),
        "accuracy": rounded(correct.sum() / len(y_true)),
        "balanced_accuracy": rounded(recall[present].mean()),
        "macro_f1": rounded(f1[present].mean()),
        "classes": classes,
        "per_class": {
            cls: {
                "precision": rounded(precision[i]),
                "recall": rounded(recall[i]),
                "f1": rounded(f1[i]),
                "support": int(support[i]),
            }
            for i, cls in enumerate(classes)
        },
        "confusion": confusion.tolist(),
        "predicted_outside_classes": int((~inside).sum()),
        "rare_classes": {classes[i]: int(support[i]) for i in np.flatnonzero(present & ~common)},
        "balanced_accuracy_common": rounded(recall[common].mean()) if common.any() else None,
    }


def rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), DIGITS)

