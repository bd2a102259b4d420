"""Time the evaluation stage's AE-CFE part (random forest) at the size of a real dataset.

Source: 10,000 cells x 50 features in 13 classes of unequal size (like Matek's), each class a Gaussian
cluster; target: 10,000 cells of the same classes moved and stretched (a domain shift). Runs
``run_evaluation`` without baselines into a temporary folder (nothing is written to the repository) and
prints the seconds, with the classifier's fit + predict alone beside them.
Run from the project root: ``python benchmarks/evaluate_speed.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aecfe_cli.classify import make_classifier  # noqa: E402
from aecfe_cli.evaluate import run_evaluation  # noqa: E402
from aecfe_cli.feature_sets import FeatureSet, stratified_split  # noqa: E402
from aecfe_cli.labels import FINE_CLASSES  # noqa: E402

DIMENSION = 50


def class_structured_cells(name: str, n_cells: int, seed: int, shift: float, stretch: float) -> FeatureSet:
    """Overlapping clusters (noise wider than the distance between centres) so the forest has work to do."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0.0, 1.0, size=(len(FINE_CLASSES), DIMENSION))
    class_weights = np.geomspace(1.0, 0.02, len(FINE_CLASSES))
    class_index = rng.choice(len(FINE_CLASSES), size=n_cells, p=class_weights / class_weights.sum())
    features = (centres[class_index] + rng.normal(0.0, 2.5, (n_cells, DIMENSION))) * stretch + shift
    return FeatureSet(
        name=name,
        features=features.astype(np.float32),
        instance_ids=np.array([f"{name}-{i:05d}" for i in range(n_cells)]),
        images=np.array([f"{i:05d}.png" for i in range(n_cells)]),
        labels=np.array(FINE_CLASSES)[class_index],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 cells per dataset instead of 10,000")
    args = parser.parse_args()
    n_cells = 2_000 if args.quick else 10_000
    source = class_structured_cells("source", n_cells, seed=1, shift=0.0, stretch=1.0)
    target = class_structured_cells("target", n_cells, seed=2, shift=0.3, stretch=1.2)

    train_idx, test_idx = stratified_split(source.labels, seed=42)
    started = time.perf_counter()
    forest = make_classifier("random_forest", seed=0).fit(source.features[train_idx], source.labels[train_idx])
    forest.predict(source.features[test_idx])
    forest.predict(target.features)
    classifier_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as out_dir:
        started = time.perf_counter()
        report = run_evaluation(source, [target], Path(out_dir), baselines=False)
        total_seconds = time.perf_counter() - started

    print(f"cells: {n_cells} source + {n_cells} target, {DIMENSION} features, {len(FINE_CLASSES)} classes")
    print(f"random forest fit + predict: {classifier_seconds:.2f} s")
    print(f"run_evaluation (AE-CFE only, report, figures, domain mixing): {total_seconds:.2f} s")
    print(
        f"in-domain accuracy {report['in_domain']['accuracy']:.3f}, "
        f"cross-domain {report['targets']['target']['accuracy']:.3f}"
    )


if __name__ == "__main__":
    main()
