"""How well datasets overlap in one feature space (domain mixing), and the subsampling it shares with plots."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, silhouette_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from .classify import rounded

MIXING_DIRECTION = (
    "lower is better mixed: a silhouette by dataset near 0 (or below) and a domain-classifier balanced "
    "accuracy near chance mean the datasets overlap in feature space; values near 1 mean they stay apart"
)
# Both mixing scores look at a subsample: their cost grows quadratically with the points.
MAX_MIXING_POINTS = 2000


def domain_mixing(feature_sets: Sequence[np.ndarray], seed: int, max_points: int = MAX_MIXING_POINTS) -> dict:
    """How well datasets overlap in one feature space; lower = better mixed (see ``MIXING_DIRECTION``).

    Each dataset contributes an equal random subsample (``max_points`` in all), standardised together:
    ``silhouette`` is the silhouette score with the dataset as the cluster label, and
    ``domain_classifier_balanced_accuracy`` is the cross-validated balanced accuracy of a 15-nearest-neighbour
    classifier guessing the dataset (``chance`` = 1 / number of datasets): neighbours from one dataset only
    mean the datasets do not mix locally, whatever the global shape.
    """
    chosen = balanced_indices([len(features) for features in feature_sets], seed, max_points)
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
    result["silhouette"] = rounded(silhouette_score(sample, domains))
    folds = StratifiedKFold(n_splits=int(min(5, counts.min())), shuffle=True, random_state=seed)
    guesser = KNeighborsClassifier(n_neighbors=int(min(15, counts.min() - 1)))
    guessed = cross_val_predict(guesser, sample, domains, cv=folds)
    result["domain_classifier_balanced_accuracy"] = rounded(balanced_accuracy_score(domains, guessed))
    result["chance"] = rounded(1.0 / len(feature_sets))
    return result


def balanced_indices(sizes: Sequence[int], seed: int, max_points: int) -> list[np.ndarray]:
    """Sorted row indices of an equal-sized random subsample of each dataset, ``max_points`` in all."""
    rng = np.random.default_rng(seed)
    per_set = max(1, max_points // max(1, len(sizes)))
    return [np.sort(rng.choice(size, size=min(size, per_set), replace=False)) for size in sizes]

