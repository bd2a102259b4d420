"""benchmarks/label_free_prototypes.py scores its ideas on a harness's workdirs as documented."""

import subprocess
import sys

import numpy as np
import pytest

from aecfe_cli.io import write_csv, write_npy
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import label_free_prototypes as prototypes  # noqa: E402

COLUMNS = ("f0", "f1", "m_nucleus_L", "m_cytoplasm_a")


def test_group_moments_weigh_each_group_alike_whatever_its_size():
    x = np.array([[0.0]] * 90 + [[2.0]] * 10)
    groups = np.array(["a"] * 90 + ["b"] * 10)
    mean, spread = prototypes.group_moments(x, groups)
    assert mean == [1.0] and spread == [1.0]  # the plain moments would be 0.2 and 0.6
    mean, _ = prototypes.group_moments(x, groups, weights=np.array([1.0, 3.0]))
    assert mean == [1.5]


def test_achromatic_leaves_out_hue_descriptors_only():
    chosen = prototypes.chosen_columns(COLUMNS, "all", achromatic=True)
    assert chosen.tolist() == [True, True, True, False]
    assert prototypes.chosen_columns(COLUMNS, "morphology", achromatic=False).tolist() == [False, False, True, True]


def _write_lab(workdir, name, rng, hue_shift):
    """Two classes told apart by f0; the lab's stain moves m_cytoplasm_a."""
    labels = np.array(["lymphocyte", "neutrophil"] * 20)
    features = rng.normal(size=(len(labels), len(COLUMNS))).astype(np.float32)
    features[:, 0] += 4 * (labels == "neutrophil")
    features[:, 3] += hue_shift
    folder = workdir / "extract" / name
    folder.mkdir(parents=True)
    write_npy(folder / "features.npy", features)
    rows = ([f"{name}#{i}", f"{i}.png", name, label, *(f"{v:.9g}" for v in row)]
            for i, (label, row) in enumerate(zip(labels, features)))
    write_csv(folder / "features.csv", ["instance_id", "image", "dataset", "label", *COLUMNS], rows)


@pytest.mark.slow
def test_scores_every_direction_of_the_triangle_per_idea(tmp_path):
    rng = np.random.default_rng(0)
    workdir = tmp_path / "real-0-default-seed0" / "work"
    for name, shift in zip(prototypes.LABS, (0.0, 5.0, -5.0)):
        _write_lab(workdir, name, rng, shift)
    ideas = ["none", "dataset", "source_classes:2", "achromatic", "both/spread:5:0.5", "none/forests:2", "none/trees:300"]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "label_free_prototypes.py"),
                             "--scratch", str(tmp_path), "--seeds", "0", "--ideas", ",".join(ideas)],
                            capture_output=True, text=True, check=True)
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| 0 |")]
    assert [row[1].strip() for row in rows] == ideas
    for row in rows:
        scores = [float(value) for value in row[3:]]
        assert len(scores) == 7 and all(0.9 <= value <= 1.0 for value in scores)  # f0 holds across labs
        assert scores[-1] == pytest.approx(np.mean(scores[:6]), abs=1e-3)  # no class under 10 cells here


def test_em_takes_the_share_of_a_class_the_target_lacks():
    probabilities = np.array([[0.6, 0.3, 0.1]] * 8 + [[0.2, 0.7, 0.1]] * 2)
    moved = prototypes.after_forest("em", probabilities, np.zeros((10, 1)))
    assert np.allclose(moved.sum(axis=1), 1.0)
    assert moved[:, 2].max() < 0.01 and moved[:, 0].mean() > probabilities[:, 0].mean()


def test_spreading_makes_a_cluster_agree_with_its_majority():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (10, 2)), rng.normal(5, 0.1, (10, 2))])
    probabilities = np.array([[0.9, 0.1]] * 9 + [[0.4, 0.6]] + [[0.1, 0.9]] * 10)  # one cell of cluster 1 wrong
    spread = prototypes.after_forest("spread:5:0.8", probabilities, x)
    assert np.allclose(spread.sum(axis=1), 1.0)
    assert (spread.argmax(axis=1) == [0] * 10 + [1] * 10).all()
