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


def _write_triangle(scratch):
    """A harness's seed-0 workdir under ``scratch`` with the three labs; returns the workdir."""
    rng = np.random.default_rng(0)
    workdir = scratch / "real-0-default-seed0" / "work"
    for name, shift in zip(prototypes.LABS, (0.0, 5.0, -5.0)):
        _write_lab(workdir, name, rng, shift)
    return workdir


def _prototypes_output(scratch, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "label_free_prototypes.py"),
                             "--scratch", str(scratch), "--seeds", "0", *args],
                            capture_output=True, text=True, check=True)
    return result.stdout


@pytest.mark.slow
def test_scores_every_direction_of_the_triangle_per_idea(tmp_path):
    _write_triangle(tmp_path)
    ideas = ["none", "dataset", "source_classes:2", "achromatic", "both/spread:5:0.5", "none/forests:2", "none/trees:300"]
    output = _prototypes_output(tmp_path, "--ideas", ",".join(ideas))
    rows = [line.split("|")[1:-1] for line in output.splitlines() if line.startswith("| 0 |")]
    assert [row[1].strip() for row in rows] == ideas
    for row in rows:
        scores = [float(value) for value in row[3:]]
        assert len(scores) == 7 and all(0.9 <= value <= 1.0 for value in scores)  # f0 holds across labs
        assert scores[-1] == pytest.approx(np.mean(scores[:6]), abs=1e-3)  # no class under 10 cells here


@pytest.mark.slow
def test_contrastive_embedding_gives_every_cell_its_row_and_is_saved_for_reuse(tmp_path):
    from PIL import Image
    from aecfe_cli.detect import INSTANCE_COLUMNS

    workdir = _write_triangle(tmp_path)
    for name in prototypes.LABS:
        image = tmp_path / f"{name}.png"
        pixels = np.full((48, 48, 3), 220, np.uint8)
        pixels[16:32, 16:32] = (90, 40, 140)
        Image.fromarray(pixels).save(image)
        ids = prototypes.load_feature_set(workdir, name).instance_ids
        (workdir / "detect" / name).mkdir(parents=True)
        write_csv(workdir / "detect" / name / "instances.csv", INSTANCE_COLUMNS,
                  ([i, str(image), name, "", 14, 14, 34, 34, 0.9, 400] for i in reversed(ids)))
    output = _prototypes_output(tmp_path, "--ideas", "contrastive_none", "--columns", "none", "--contrastive-steps", "2")
    assert sum(line.startswith("| 0 | contrastive_none |") for line in output.splitlines()) == 1
    with np.load(tmp_path / "real-0-default-seed0" / "contrastive-2.npz") as saved:
        assert {name: saved[name].shape for name in prototypes.LABS} == {
            name: (40, prototypes.CONTRASTIVE_COLUMNS) for name in prototypes.LABS}


def test_a_part_of_a_mean_names_its_own_columns(tmp_path):
    workdir = _write_triangle(tmp_path)
    source, target = (prototypes.load_feature_set(workdir, name) for name in ("pbc", "zheng"))
    _, own = prototypes.target_probabilities("none@morphology", source, target, "all", [])
    _, flagged = prototypes.target_probabilities("none", source, target, "morphology", [])
    _, everything = prototypes.target_probabilities("none", source, target, "all", [])
    assert np.array_equal(own, flagged) and not np.allclose(own, everything)


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


def test_whitening_and_coral_align_means_and_covariances_and_keep_sizes_as_ratios():
    rng = np.random.default_rng(0)
    mixing = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    source = rng.normal(size=(2000, 3)) @ mixing + [5.0, -1.0, np.log(120.0)]
    target = rng.normal(size=(3000, 3)) @ mixing.T * 0.5 + [0.0, 2.0, np.log(60.0)]
    names = np.array(["f0", "m_nucleus_L", "m_cell_size"])
    white_source, white_target = prototypes.normalise("whitened", source, None, target, names)
    for white in (white_source[:, :2], white_target[:, :2]):
        assert np.allclose(white.mean(axis=0), 0.0, atol=1e-5)
        assert np.allclose(np.cov(white.T), np.eye(2), atol=0.02)  # shrinkage leaves it a little under 1
    assert np.median(white_source[:, 2]) == pytest.approx(0.0) and np.median(white_target[:, 2]) == pytest.approx(0.0)
    moved, kept = prototypes.normalise("coral", source, None, target, names)
    assert np.allclose(kept[:, :2], target[:, :2], atol=1e-5)  # as extracted (float32)
    assert np.allclose(moved[:, :2].mean(axis=0), target[:, :2].mean(axis=0), atol=1e-5)
    assert np.allclose(np.cov(moved[:, :2].T), np.cov(target[:, :2].T), atol=0.02)
    side_by_side, _ = prototypes.normalise("both_whitened", source, None, target, names)
    assert side_by_side.shape == (2000, 5) and np.allclose(side_by_side[:, 3:], white_source[:, :2])


def test_importance_resampling_draws_the_target_like_source_cells_more():
    rng = np.random.default_rng(0)
    source = np.concatenate([rng.normal(0, 1, (100, 2)), rng.normal(6, 1, (100, 2))])  # half of it like the target
    target = rng.normal(6, 1, (200, 2))
    picked = prototypes.importance_resampled(source, target, seed=0)
    assert len(picked) == len(source) and (picked >= 100).mean() > 0.8
