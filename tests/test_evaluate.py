"""Tests of the evaluation stage on synthetic Gaussian class clusters (small, so the file runs in seconds)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from aecfe_cli.errors import UserError
from aecfe_cli.classify import CLASSIFIERS, fit_classifier, make_classifier, normalise_features, normalised_column_names, score
from aecfe_cli.evaluate import run_evaluation
from aecfe_cli.evaluate_report import render_summary_rows
from aecfe_cli.feature_sets import FeatureSet, load_feature_set, load_split, resolve_labels, save_split, stratified_split
from aecfe_cli.mixing import domain_mixing
from aecfe_cli.io import write_csv, write_npy

DIMENSION = 8
CROP_SIZE = 16
FINE_FOUR = ["monocyte", "lymphocyte_typical", "neutrophil_segmented", "eosinophil"]


def make_set(
    name: str,
    labels: list[str],
    per_class: int,
    shift: float = 0.0,
    seed: int = 0,
    spread: float = 6.0,
    crops: bool = True,
) -> FeatureSet:
    """Cells of each class around a class centre (the same centres in every dataset), moved by ``shift``
    to mimic a domain shift; crops get a class-specific colour so the baselines can learn too."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(0.0, spread, size=(64, DIMENSION))
    class_index = np.repeat(np.arange(len(labels)), per_class)
    centre_of = [sum(map(ord, label)) % 64 for label in labels]
    features = (
        centres[[centre_of[i] for i in class_index]] + rng.normal(0.0, 1.0, (len(class_index), DIMENSION)) + shift
    )
    colour = 60 + 40 * (np.array([centre_of[i] for i in class_index]) % 5)
    crop_array = np.clip(
        rng.normal(colour[:, None, None, None], 15, (len(class_index), 3, CROP_SIZE, CROP_SIZE)), 0, 255
    ).astype(np.uint8)
    return FeatureSet(
        name=name,
        features=features.astype(np.float32),
        instance_ids=np.array([f"{name}-{i:04d}" for i in range(len(class_index))]),
        images=np.array([f"{labels[i]}/{i:04d}.png" for i in class_index]),
        labels=np.array([labels[i] for i in class_index]),
        crops=crop_array if crops else None,
    )


# --------------------------------------------------------------------------------------------- run_evaluation


def test_run_evaluation_writes_every_artefact_with_the_schema(tmp_path: Path) -> None:
    source = make_set("matek", FINE_FOUR, per_class=60)
    target = make_set("acevedo", FINE_FOUR, per_class=50, shift=1.5, seed=1)
    report = run_evaluation(source, [target], tmp_path)

    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in (
        "source",
        "labels",
        "classes",
        "in_domain",
        "targets",
        "baselines",
        "domain_mixing",
        "classes_per_target",
        "classifier",
        "seed",
    ):
        assert key in on_disk, key
    assert on_disk["source"] == "matek" and on_disk["labels"] == "fine" and on_disk["classifier"] == "random_forest"
    metrics = [on_disk["in_domain"], on_disk["targets"]["acevedo"]]
    metrics += [entry[split] for entry in on_disk["baselines"].values() for split in ("in_domain",)]
    metrics += [entry["targets"]["acevedo"] for entry in on_disk["baselines"].values()]
    assert set(on_disk["baselines"]) == {"raw_pixels", "color_histogram", "stain_normalized_histogram"}
    for entry in metrics:
        for name in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert 0.0 <= entry[name] <= 1.0
        n_classes = len(entry["classes"])
        assert np.array(entry["confusion"]).shape == (n_classes, n_classes)
        assert set(entry["per_class"]) == set(entry["classes"])
    assert on_disk["targets"]["acevedo"]["n"] == 200
    assert on_disk["in_domain"]["n"] == on_disk["split"]["n_test"] == 48
    for method in ("aecfe", "raw_pixels", "color_histogram", "stain_normalized_histogram"):
        assert on_disk["domain_mixing"]["methods"][method]["chance"] == 0.5
    assert "lower is better" in on_disk["domain_mixing"]["direction"]

    markdown = (tmp_path / "report.md").read_text()
    assert "## Summary" in markdown and "AE-CFE" in markdown and "raw pixels + PCA" in markdown
    for figure in ("confusion_acevedo.png", "embedding.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"

    rows = render_summary_rows(report)
    assert len(rows) == 2 * 4  # (in-domain, acevedo) x (AE-CFE, three baselines)
    assert rows[0] == (
        "AE-CFE",
        "in-domain",
        48,
        report["in_domain"]["accuracy"],
        report["in_domain"]["balanced_accuracy"],
        report["in_domain"]["macro_f1"],
    )


def test_well_separated_clusters_score_high_and_shuffled_labels_score_at_chance(tmp_path: Path) -> None:
    source = make_set("src", FINE_FOUR, per_class=80)
    separated = run_evaluation(source, [], tmp_path / "separated", baselines=False)
    assert separated["in_domain"]["accuracy"] > 0.9
    assert separated["in_domain"]["balanced_accuracy"] > 0.9

    shuffled_labels = np.random.default_rng(7).permutation(source.labels)
    shuffled = FeatureSet(source.name, source.features, source.instance_ids, source.images, shuffled_labels)
    at_chance = run_evaluation(shuffled, [], tmp_path / "shuffled", baselines=False)
    # Four balanced classes: chance is 0.25; 64 test cells put 0.45 about four standard deviations above it.
    assert at_chance["in_domain"]["accuracy"] < 0.45
    assert at_chance["in_domain"]["balanced_accuracy"] < 0.45


def test_a_class_only_in_the_source_is_trained_on_but_dropped_from_scoring(tmp_path: Path) -> None:
    source = make_set("src", FINE_FOUR + ["basophil"], per_class=40)
    target = make_set("tgt", FINE_FOUR, per_class=30, seed=1)
    report = run_evaluation(source, [target], tmp_path, baselines=False)

    assert "basophil" in report["classes"]
    compared = report["classes_per_target"]["tgt"]
    assert compared["dropped_source_only"] == ["basophil"]
    assert compared["dropped_target_only"] == []
    assert compared["compared"] == sorted(FINE_FOUR)
    assert report["targets"]["tgt"]["classes"] == sorted(FINE_FOUR)
    assert np.array(report["targets"]["tgt"]["confusion"]).shape == (4, 4)
    assert report["cells_per_class"]["src"]["basophil"] == 40
    assert "basophil" not in report["cells_per_class"]["tgt"]
    assert "dropped, source only: basophil" in (tmp_path / "report.md").read_text()


def test_a_target_class_missing_from_the_source_is_not_scored(tmp_path: Path) -> None:
    source = make_set("src", FINE_FOUR, per_class=30)
    target = make_set("tgt", FINE_FOUR + ["basophil"], per_class=20, seed=1)
    report = run_evaluation(source, [target], tmp_path, baselines=False)
    assert report["classes_per_target"]["tgt"]["dropped_target_only"] == ["basophil"]
    assert report["classes_per_target"]["tgt"]["n_unscored"] == 20
    assert report["targets"]["tgt"]["n"] == 80


def test_auto_falls_back_to_coarse_when_a_target_is_labelled_coarsely(tmp_path: Path) -> None:
    source = make_set(
        "matek", ["neutrophil_segmented", "neutrophil_band", "lymphocyte_typical", "monocyte"], per_class=30
    )
    target = make_set("acevedo", ["neutrophil", "lymphocyte", "monocyte"], per_class=30, seed=1)
    report = run_evaluation(source, [target], tmp_path, baselines=False)
    assert report["labels"] == "coarse"
    assert report["classes"] == ["lymphocyte", "monocyte", "neutrophil"]
    assert report["classes_per_target"]["acevedo"]["compared"] == ["lymphocyte", "monocyte", "neutrophil"]
    assert report["cells_per_class"]["matek"]["neutrophil"] == 60

    # Asked for fine labels, only the class both name at the fine level is compared.
    fine = run_evaluation(source, [target], tmp_path / "fine", labels_mode="fine", baselines=False)
    assert fine["labels"] == "fine"
    assert fine["classes_per_target"]["acevedo"]["compared"] == ["monocyte"]
    assert fine["classes_per_target"]["acevedo"]["dropped_target_only"] == ["lymphocyte", "neutrophil"]


def test_resolve_labels_levels() -> None:
    level, to_class = resolve_labels(["neutrophil_band", "monocyte"], [["neutrophil_segmented"]], "auto")
    assert level == "fine" and to_class("neutrophil_band") == "neutrophil_band"
    # A name outside the vocabulary is the same class at both levels and does not force coarse.
    assert resolve_labels(["monocyte", "PMB"], [["myeloblast"]], "auto")[0] == "fine"
    level, to_class = resolve_labels(["monocyte"], [["ig", "myelocyte"]], "auto")
    assert level == "coarse" and to_class("myelocyte") == "ig" and to_class("PMB") == "PMB"
    assert resolve_labels(["monocyte"], [], "coarse")[0] == "coarse"
    with pytest.raises(UserError, match="coarse"):
        resolve_labels(["monocyte"], [], "corse")


def test_no_shared_class_names_both_datasets_and_their_classes(tmp_path: Path) -> None:
    source = make_set("src", ["monocyte", "basophil"], per_class=20)
    target = make_set("tgt", ["eosinophil", "erythroblast"], per_class=20, seed=1)
    with pytest.raises(UserError) as caught:
        run_evaluation(source, [target], tmp_path, baselines=False)
    message = str(caught.value)
    for word in ("src", "tgt", "monocyte", "basophil", "eosinophil", "erythroblast"):
        assert word in message
    assert not (tmp_path / "report.json").exists()

    fine_source = make_set("src", ["neutrophil_band", "lymphocyte_typical"], per_class=20)
    coarse_target = make_set("tgt", ["neutrophil", "lymphocyte"], per_class=20, seed=1)
    with pytest.raises(UserError, match="src.*tgt.*fine level; try --labels coarse"):
        run_evaluation(fine_source, [coarse_target], tmp_path, labels_mode="fine", baselines=False)


def test_rerun_reuses_the_split_file_and_gives_an_identical_report(tmp_path: Path) -> None:
    source = make_set("src", FINE_FOUR, per_class=40)
    target = make_set("tgt", FINE_FOUR, per_class=25, shift=1.0, seed=1)
    run_evaluation(source, [target], tmp_path)
    first = (tmp_path / "report.json").read_bytes()
    run_evaluation(source, [target], tmp_path)
    assert (tmp_path / "report.json").read_bytes() == first

    # A split of another shape than the seed would draw (half the cells held out) must be the one used.
    half_train, half_test = np.arange(0, 160, 2), np.arange(1, 160, 2)
    save_split(tmp_path / "split.csv", source.instance_ids, half_train, half_test)
    report = run_evaluation(source, [target], tmp_path, baselines=False)
    assert report["in_domain"]["n"] == 80
    assert report["split"] == {"file": "split.csv", "seed": None, "n_train": 80, "n_test": 80}


def test_save_and_load_split_round_trip_and_notice_changed_ids(tmp_path: Path) -> None:
    ids = np.array([f"cell-{i}" for i in range(10)])
    train, test = np.array([0, 1, 2, 4, 5, 6, 8, 9]), np.array([3, 7])
    save_split(tmp_path / "split.csv", ids, train, test)
    loaded_train, loaded_test = load_split(tmp_path / "split.csv", ids)
    assert loaded_train.tolist() == train.tolist() and loaded_test.tolist() == test.tolist()
    # The same cells in another order still map onto their own rows.
    reordered_train, reordered_test = load_split(tmp_path / "split.csv", ids[::-1])
    assert reordered_test.tolist() == [2, 6]
    assert load_split(tmp_path / "split.csv", np.append(ids, "cell-10")) is None
    assert load_split(tmp_path / "split.csv", np.array([f"other-{i}" for i in range(10)])) is None
    assert load_split(tmp_path / "absent.csv", ids) is None


def test_stratified_split_holds_out_a_fifth_of_each_class_and_keeps_single_cells_in_train() -> None:
    labels = np.array(["a"] * 50 + ["b"] * 10 + ["c"] + ["d"] * 2)
    train, test = stratified_split(labels, seed=42)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(63))
    assert (labels[test] == "a").sum() == 10 and (labels[test] == "b").sum() == 2
    assert 60 in train  # the single "c" cell
    assert (labels[test] == "d").sum() == 1  # a fifth of two rounds to none, but every class is tested
    again = stratified_split(labels, seed=42)
    assert again[1].tolist() == test.tolist()
    assert stratified_split(labels, seed=43)[1].tolist() != test.tolist()


# -------------------------------------------------------------------------------------------------- scoring


def test_score_counts_predictions_of_unscored_classes_as_errors() -> None:
    y_true = ["a", "a", "a", "a", "b", "b"]
    y_pred = ["a", "a", "x", "b", "b", "x"]
    result = score(y_true, y_pred, ["a", "b"])
    assert result["n"] == 6
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["balanced_accuracy"] == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert result["confusion"] == [[2, 1], [0, 1]]
    assert result["predicted_outside_classes"] == 2
    assert result["per_class"]["a"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3, abs=1e-6),
        "support": 4,
    }
    assert result["per_class"]["b"]["precision"] == 0.5
    with pytest.raises(ValueError):
        score(["c"], ["c"], ["a", "b"])


def test_score_names_classes_too_small_to_score_and_the_balanced_accuracy_without_them() -> None:
    y_true = ["a"] * 10 + ["b"] * 12 + ["c"]
    y_pred = ["a"] * 10 + ["b"] * 6 + ["a"] * 6 + ["c"]
    result = score(y_true, y_pred, ["a", "b", "c", "d"])
    assert result["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert result["rare_classes"] == {"c": 1}  # d has no cells: not scored, so not rare
    assert result["balanced_accuracy_common"] == pytest.approx((1 + 0.5) / 2)
    assert score(["a"] * 10, ["a"] * 10, ["a"])["rare_classes"] == {}
    assert score(["a", "b"], ["a", "a"], ["a", "b"])["balanced_accuracy_common"] is None


def test_report_says_how_far_a_class_of_a_few_cells_moves_the_score(tmp_path: Path) -> None:
    labels = ["lymphocyte", "monocyte", "neutrophil"]
    source = make_set("src", labels, per_class=20)
    full = make_set("tgt", labels, per_class=20, seed=1)
    keep = np.flatnonzero(full.labels != "neutrophil").tolist() + [int(np.flatnonzero(full.labels == "neutrophil")[0])]
    target = dataclasses.replace(full, features=full.features[keep], instance_ids=full.instance_ids[keep],
                                 images=full.images[keep], labels=full.labels[keep], crops=full.crops[keep])
    report = run_evaluation(source, [target], tmp_path)
    scored = report["targets"]["tgt"]
    assert scored["rare_classes"] == {"neutrophil": 1}
    recalls = [scored["per_class"][cls]["recall"] for cls in ("lymphocyte", "monocyte")]
    assert scored["balanced_accuracy_common"] == pytest.approx(sum(recalls) / 2, abs=1e-5)
    text = (tmp_path / "report.md").read_text()
    assert "- tgt: neutrophil (1 cell) is scored on fewer than 10 cells" in text
    assert "by up to 33.3 points" in text
    assert f"Over the other 2 classes AE-CFE scores {100 * scored['balanced_accuracy_common']:.1f} %" in text
    # the in-domain split holds 4 cells of each class: every one is rare, and the report says how coarse that is
    assert "- src in-domain: every class is scored on fewer than 10 cells (4 each): one cell of the smallest moves " \
           "the balanced accuracy by 8.3 points." in text


# ------------------------------------------------------------------------------------------------ baselines


def test_baselines_are_skipped_with_a_note_when_a_dataset_has_no_crops(tmp_path: Path) -> None:
    source = make_set("src", FINE_FOUR, per_class=20)
    target = make_set("tgt", FINE_FOUR, per_class=20, seed=1, crops=False)
    report = run_evaluation(source, [target], tmp_path)
    assert report["baselines"] == {}
    assert "tgt" in report["baselines_note"]


def test_domain_mixing_is_low_for_one_distribution_and_high_for_separated_ones() -> None:
    rng = np.random.default_rng(0)
    same = domain_mixing([rng.normal(size=(300, 5)), rng.normal(size=(300, 5))], seed=0)
    apart = domain_mixing([rng.normal(size=(300, 5)), rng.normal(size=(300, 5)) + 6.0], seed=0)
    assert same["domain_classifier_balanced_accuracy"] < 0.65 and abs(same["silhouette"]) < 0.1
    assert apart["domain_classifier_balanced_accuracy"] > 0.95 and apart["silhouette"] > 0.5
    assert domain_mixing([rng.normal(size=(5000, 3)), rng.normal(size=(5000, 3))], seed=0)["n_points"] == 2000


# ------------------------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_classifier_learns_separated_clusters(name: str) -> None:
    cells = make_set("src", FINE_FOUR, per_class=30, crops=False)
    model = make_classifier(name, seed=0).fit(cells.features, cells.labels)
    assert (model.predict(cells.features) == cells.labels).mean() > 0.9


def test_unknown_classifier_suggests_the_closest_name() -> None:
    with pytest.raises(UserError, match="did you mean 'random_forest'"):
        make_classifier("random_forrest", seed=0)


# --------------------------------------------------------------------------------------------------- loading


def write_workdir(workdir: Path, cells: FeatureSet, crops: bool = True) -> None:
    extract_dir = workdir / "extract" / cells.name
    write_npy(extract_dir / "features.npy", cells.features)
    header = ["instance_id", "image", "dataset", "label"] + [f"f{i}" for i in range(cells.features.shape[1])]
    rows = [
        [cid, image, cells.name, label, *values.tolist()]
        for cid, image, label, values in zip(cells.instance_ids, cells.images, cells.labels, cells.features)
    ]
    write_csv(extract_dir / "features.csv", header, rows)
    if crops:
        write_npy(workdir / "detect" / cells.name / "crops.npy", cells.crops)


def test_load_feature_set_reads_the_extract_and_detect_files(tmp_path: Path) -> None:
    cells = make_set("matek", FINE_FOUR, per_class=5)
    write_workdir(tmp_path, cells)
    loaded = load_feature_set(tmp_path, "matek")
    assert loaded.name == "matek"
    assert np.array_equal(loaded.features, cells.features)
    assert loaded.labels.tolist() == cells.labels.tolist()
    assert loaded.instance_ids.tolist() == cells.instance_ids.tolist()
    assert isinstance(loaded.crops, np.memmap) and np.array_equal(loaded.crops, cells.crops)

    write_workdir(tmp_path / "no-crops", cells, crops=False)
    assert load_feature_set(tmp_path / "no-crops", "matek").crops is None


def test_load_feature_set_names_the_missing_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        load_feature_set(tmp_path, "acevedo")
    message = str(caught.value)
    assert str(tmp_path / "extract" / "acevedo" / "features.npy") in message
    assert "not found: run `aecfe extract --data acevedo` first" in message


def test_load_feature_set_refuses_files_of_different_lengths(tmp_path: Path) -> None:
    cells = make_set("matek", FINE_FOUR, per_class=5)
    write_workdir(tmp_path, cells)
    write_npy(tmp_path / "extract" / "matek" / "features.npy", cells.features[:-1])
    with pytest.raises(UserError, match="19 rows.*20 cells"):
        load_feature_set(tmp_path, "matek")

    write_workdir(tmp_path, cells)
    write_npy(tmp_path / "detect" / "matek" / "crops.npy", cells.crops[:-2])
    with pytest.raises(UserError, match="crops.npy"):
        load_feature_set(tmp_path, "matek")


def test_per_dataset_feature_norm_undoes_a_whole_lab_shift(tmp_path: Path) -> None:
    """A target lab shifted as a whole in feature space is misclassified as it is; standardised with its
    own statistics (label-free) it lands on the source's classes again."""
    source = make_set("lab_a", FINE_FOUR, per_class=40)
    target = make_set("lab_b", FINE_FOUR, per_class=40, shift=12.0, seed=1)
    plain = run_evaluation(source, [target], tmp_path / "plain", baselines=False)
    normalised = run_evaluation(source, [target], tmp_path / "dataset", baselines=False, feature_norm="dataset")
    assert plain["targets"]["lab_b"]["balanced_accuracy"] < 0.6
    assert normalised["targets"]["lab_b"]["balanced_accuracy"] > 0.9 and normalised["feature_norm"] == "dataset"
    with pytest.raises(UserError, match="feature_norm 'batch'"):
        run_evaluation(source, [target], tmp_path / "bad", baselines=False, feature_norm="batch")


def test_feature_norm_both_keeps_each_column_as_extracted_and_standardised(tmp_path: Path) -> None:
    """Under "both" each column comes twice, as extracted and standardised on its own lab. A whole-lab shift
    moves only the first copies, so max_shift leaves (some of) those out by name and never a standardised
    copy, which carries the classes; the parts (latent, morphology) take both copies of their own columns."""
    source = make_set("lab_a", FINE_FOUR, per_class=40)
    target = make_set("lab_b", FINE_FOUR, per_class=40, shift=12.0, seed=1)
    columns = tuple(f"f{i}" for i in range(DIMENSION // 2)) + tuple(f"m_d{i}" for i in range(DIMENSION - DIMENSION // 2))
    source.columns = target.columns = columns
    report = run_evaluation(source, [target], tmp_path / "both", baselines=False, feature_norm="both", max_shift=1.5)
    assert report["feature_norm"] == "both" and report["targets"]["lab_b"]["balanced_accuracy"] > 0.9
    dropped = report["dropped_columns"]["lab_b"]
    assert dropped and set(dropped) <= set(columns)  # shifted copies as extracted; no standardised copy
    assert report["parts"]["morphology"]["dimension"] == 2 * (DIMENSION - DIMENSION // 2)
    assert report["parts"]["morphology"]["targets"]["lab_b"]["balanced_accuracy"] > 0.9
    assert "`evaluate.feature_norm`" in (tmp_path / "both" / "report.md").read_text()


@pytest.mark.parametrize("mode", ["none", "dataset", "both"])
def test_cell_sizes_become_ratios_to_their_own_labs_median_under_every_feature_norm(mode: str) -> None:
    """Two labs with the same cells, one imaged at twice the magnification: every size of the second is
    log(2) larger. After normalisation the sizes of both labs agree (a ratio to the lab's median cell), they
    are not standardised (a spread follows the class mix, not the optics) and get no standardised copy."""
    columns = ("f0", "m_nucleus_fraction", "m_cell_size", "m_box_size")
    rng = np.random.default_rng(0)
    near = np.column_stack([rng.normal(size=41), rng.uniform(size=41), 0.5 * np.log(rng.uniform(2e3, 9e3, (41, 2)))])
    far = near + [0.0, 0.0, np.log(2.0), np.log(2.0)]
    a, b = (normalise_features(x.astype(np.float32), mode, columns) for x in (near, far))
    names = normalised_column_names(columns, mode)
    assert a.shape == b.shape == (41, len(names))
    sizes = [names.index("m_cell_size"), names.index("m_box_size")]
    assert np.allclose(a[:, sizes], b[:, sizes], atol=1e-5)
    assert np.allclose(np.median(a[:, sizes], axis=0), 0.0, atol=1e-6)
    assert np.allclose(a[:, sizes], near[:, 2:] - np.median(near[:, 2:], axis=0), atol=1e-5)  # not rescaled
    assert names == {"none": columns, "dataset": columns,
                     "both": (*columns, "f0@dataset", "m_nucleus_fraction@dataset")}[mode]
    if mode == "none":
        assert np.array_equal(a[:, :2], near[:, :2].astype(np.float32))


def test_latent_and_morphology_parts_are_scored_alone_when_both_are_present(tmp_path: Path) -> None:
    """Half the columns carry the classes (named as morphology), half are noise (named as the latent): the
    parts show which half classifies; a dataset extracted without morphology is refused by name."""
    source, target = make_set("matek", FINE_FOUR, per_class=10), make_set("acevedo", FINE_FOUR, per_class=10, seed=1)
    noise = np.random.default_rng(5).normal(size=(len(source.features) + len(target.features), DIMENSION))
    columns = tuple(f"f{i}" for i in range(DIMENSION)) + tuple(f"m_d{i}" for i in range(DIMENSION))
    for cells, block in ((source, noise[:len(source.features)]), (target, noise[len(source.features):])):
        cells.features = np.concatenate([block, cells.features], axis=1).astype(np.float32)
        cells.columns = columns
    report = run_evaluation(source, [target], tmp_path / "both", baselines=False)
    parts = report["parts"]
    assert set(parts) == {"latent", "morphology"} and parts["morphology"]["dimension"] == DIMENSION
    assert parts["morphology"]["targets"]["acevedo"]["balanced_accuracy"] > 0.9
    assert parts["latent"]["targets"]["acevedo"]["balanced_accuracy"] < 0.6
    assert "morphology only" in (tmp_path / "both" / "report.md").read_text()

    target.columns = tuple(f"f{i}" for i in range(2 * DIMENSION))
    with pytest.raises(UserError, match="different feature columns"):
        run_evaluation(source, [target], tmp_path / "mixed", baselines=False)
    source.columns = target.columns
    assert run_evaluation(source, [target], tmp_path / "latent", baselines=False)["parts"] == {}


def _stain_and_shape_labs(cells_per_class: int = 150) -> tuple[FeatureSet, FeatureSet]:
    """Two labs, two classes. ``m_shape`` tells the classes apart the same way in both; ``m_colour`` tells
    them apart more cleanly in the source, but the target's stain moves it for every cell, beyond both
    classes' source values."""
    rng = np.random.default_rng(0)
    labels = np.repeat(["lymphocyte", "neutrophil"], cells_per_class)
    cls = (labels == "neutrophil").astype(float)
    sets = []
    for name, stain in (("lab_a", 0.0), ("lab_b", 4.0)):
        shape = 3.0 * cls + rng.normal(0, 1.0, len(cls))
        colour = 2.0 * cls + rng.normal(0, 0.3, len(cls)) + stain
        ids = [f"{name}/{i}" for i in range(len(cls))]
        sets.append(FeatureSet(name=name, features=np.stack([shape, colour], 1), instance_ids=ids, images=ids,
                               labels=labels, columns=("m_shape", "m_colour")))
    return sets[0], sets[1]


def test_columns_shifted_between_labs_are_left_out_and_the_target_is_classified_by_the_rest(tmp_path):
    from aecfe_cli.classify import MIN_CELLS_FOR_SHIFT, stable_columns

    source, target = _stain_and_shape_labs()
    assert stable_columns([source.features, target.features], 1.5).tolist() == [True, False]
    assert stable_columns([source.features, target.features], None).all()
    # A handful of cells (predict on one image) cannot show a stain's shift: every column is kept.
    assert stable_columns([source.features, target.features[:MIN_CELLS_FOR_SHIFT - 1]], 1.5).all()
    assert stable_columns([source.features, target.features[:MIN_CELLS_FOR_SHIFT]], 1.5).tolist() == [True, False]
    with pytest.raises(UserError, match="max_shift"):
        stable_columns([source.features, target.features], 0.0)
    with pytest.raises(UserError, match="every feature column"):
        stable_columns([source.features, target.features + 100.0], 1.5)
    kept = run_evaluation(source, [target], tmp_path / "kept", baselines=False)
    # A second target stained like the source: each target's columns are chosen against the source alone.
    like_source = dataclasses.replace(source, name="lab_c")
    filtered = run_evaluation(source, [target, like_source], tmp_path / "filtered", baselines=False, max_shift=1.5)
    assert kept["dropped_columns"] == {"lab_b": []}
    assert filtered["dropped_columns"] == {"lab_b": ["m_colour"], "lab_c": []}
    # The colour column sends every target cell to one class; without it the shape column carries across.
    assert kept["targets"]["lab_b"]["balanced_accuracy"] < 0.6 < 0.85 < filtered["targets"]["lab_b"]["balanced_accuracy"]
    # lab_c keeps the colour column, so its classifier is the in-domain one, and lab_b's score is its own pair's.
    assert filtered["targets"]["lab_c"]["balanced_accuracy"] > 0.95
    alone = run_evaluation(source, [target], tmp_path / "alone", baselines=False, max_shift=1.5)
    assert alone["targets"]["lab_b"] == filtered["targets"]["lab_b"]
    assert filtered["in_domain"] == kept["in_domain"]
    assert "lab_b: `m_colour`" in (tmp_path / "filtered" / "report.md").read_text()


def _cluster_in_the_margin(seed: int = 0) -> tuple[FeatureSet, FeatureSet]:
    """Two labs, two classes one column apart (and a noise column). In the target, class a is one tight
    cluster that sits in the source's empty margin between the classes, where the forest's trees cut at
    random: the plain forest splits that cluster, a forest adapted to the target's cells keeps it whole."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["lymphocyte", "neutrophil"], 100)
    is_b = labels == "neutrophil"
    sets = []
    for name, a_centre in (("lab_a", 0.0), ("lab_b", 1.5)):
        features = np.stack([np.where(is_b, 4.0, a_centre) + rng.normal(0, 0.3, len(labels)),
                             rng.normal(0, 1, len(labels))], 1).astype(np.float32)
        ids = [f"{name}/{i}" for i in range(len(labels))]
        sets.append(FeatureSet(name=name, features=features, instance_ids=ids, images=ids, labels=labels))
    return sets[0], sets[1]


def test_self_training_adapts_each_target_classifier_to_that_targets_cells(tmp_path):
    source, target = _cluster_in_the_margin()
    plain = run_evaluation(source, [target], tmp_path / "plain", baselines=False)
    adapted = run_evaluation(source, [target], tmp_path / "adapted", baselines=False, self_training=2)
    assert plain["self_training"] == 0 and adapted["self_training"] == 2
    assert plain["targets"]["lab_b"]["accuracy"] < 0.99
    assert adapted["targets"]["lab_b"]["accuracy"] == 1.0
    # The in-domain score is the plain forest's, whatever the setting.
    assert adapted["in_domain"] == plain["in_domain"]
    assert "2 rounds of self-training" in (tmp_path / "adapted" / "report.md").read_text()
    # No rounds, or no target cells: the plain fit, tree for tree.
    rounds_zero = fit_classifier("random_forest", 0, source.features, source.labels, target=target.features, rounds=0)
    no_cells = fit_classifier("random_forest", 0, source.features, source.labels, target=target.features[:0], rounds=2)
    plain_model = make_classifier("random_forest", 0).fit(source.features, source.labels)
    for model in (rounds_zero, no_cells):
        assert np.array_equal(model.predict_proba(target.features), plain_model.predict_proba(target.features))
    # The linear SVM has no probabilities: its decision values rank the cells instead.
    svm = fit_classifier("linear_svm", 0, source.features, source.labels, target=target.features, rounds=2)
    assert set(svm.predict(target.features)) <= {"lymphocyte", "neutrophil"}
    for bad in (-1, 1.5, True):
        with pytest.raises(UserError, match="evaluate.self_training"):
            run_evaluation(source, [target], tmp_path / "bad", baselines=False, self_training=bad)
    assert not (tmp_path / "bad").exists()


def test_self_training_learns_only_the_cells_a_second_view_agrees_on():
    from aecfe_cli.classify import self_training_cells

    predicted = np.array(["a", "a", "a", "a", "b", "b"])
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.95, 0.5])
    everyone = np.ones(6, bool)
    assert self_training_cells(predicted, confidence, 0.5, everyone).tolist() == [0, 1, 4]
    # The most confident cell of a disagrees: the class's count (half of its 4) goes to the next that agree.
    agreed = np.array([False, True, True, True, False, True])
    assert self_training_cells(predicted, confidence, 0.5, agreed).tolist() == [1, 2, 5]
    assert self_training_cells(predicted, confidence, 0.5, np.zeros(6, bool)).tolist() == []


def _colour_against_shape() -> tuple[FeatureSet, FeatureSet]:
    """Three latent columns and one morphology column, all separating the source's two classes. In the
    target a stain has moved every latent column onto the source's neutrophils, while every cell's shape is
    a lymphocyte's: the latent outvotes the shape, so the forest calls every target cell a neutrophil."""
    rng = np.random.default_rng(0)
    labels = np.repeat(["lymphocyte", "neutrophil"], 60)
    centre = np.where(labels == "neutrophil", 4.0, 0.0)[:, None]
    columns = ("f0", "f1", "f2", "m_shape")
    source = centre + rng.normal(0, 0.3, (len(labels), 4))
    target = np.concatenate([np.full((len(labels), 3), 4.0), np.zeros((len(labels), 1))], 1)
    target += rng.normal(0, 0.3, target.shape)
    sets = []
    for name, features in (("lab_a", source), ("lab_b", target)):
        ids = [f"{name}/{i}" for i in range(len(labels))]
        sets.append(FeatureSet(name=name, features=features.astype(np.float32), instance_ids=ids, images=ids,
                               labels=labels, columns=columns))
    return sets[0], sets[1]


def test_an_agreement_view_keeps_labels_it_contradicts_out_of_self_training(tmp_path):
    from aecfe_cli.classify import agreement_columns

    source, target = _colour_against_shape()
    shape = agreement_columns(source.columns, "morphology")
    assert shape.tolist() == [False, False, False, True]
    assert agreement_columns(source.columns, "none") is None
    plain = make_classifier("random_forest", 0).fit(source.features, source.labels)
    view = make_classifier("random_forest", 0).fit(source.features[:, shape], source.labels)
    assert set(plain.predict(target.features)) == {"neutrophil"}  # the premise: the two views disagree on
    assert set(view.predict(target.features[:, shape])) == {"lymphocyte"}  # every target cell
    adapted = fit_classifier("random_forest", 0, source.features, source.labels, target=target.features, rounds=2)
    checked = fit_classifier("random_forest", 0, source.features, source.labels, target=target.features, rounds=2,
                             agreement=shape)
    # Without the check the forest learns its own mistake on every target cell; with it, no target cell is
    # learnt, so the refit is the source's plain fit, tree for tree.
    assert adapted.predict_proba(target.features)[:, 1].min() == 1.0
    assert np.array_equal(checked.predict_proba(target.features), plain.predict_proba(target.features))
    # A view of every column, or of none, is no second opinion: self-training as without it.
    for no_view in (np.ones(4, bool), np.zeros(4, bool)):
        same = fit_classifier("random_forest", 0, source.features, source.labels, target=target.features,
                              rounds=2, agreement=no_view)
        assert np.array_equal(same.predict_proba(target.features), adapted.predict_proba(target.features))
    reports = {kind: run_evaluation(source, [target], tmp_path / kind, baselines=False, self_training=2,
                                    self_training_agreement=kind) for kind in ("none", "morphology")}
    assert reports["morphology"]["self_training_agreement"] == "morphology"
    assert "morphology columns alone agreed" in (tmp_path / "morphology" / "report.md").read_text()
    assert "agreed" not in (tmp_path / "none" / "report.md").read_text()
    # Only AE-CFE's own classifier has a second view: each part alone self-trains as before.
    assert reports["morphology"]["parts"] == reports["none"]["parts"]
    assert reports["morphology"]["in_domain"] == reports["none"]["in_domain"]
    with pytest.raises(UserError, match="did you mean 'morphology'"):
        run_evaluation(source, [target], tmp_path / "typo", baselines=False, self_training_agreement="morphologie")
    assert not (tmp_path / "typo").exists()


def test_the_size_range_follows_a_wider_target_and_never_narrows():
    from aecfe_cli.classify import within_size_range

    rng = np.random.default_rng(0)
    source = rng.normal(0, 0.1, (2000, 2))  # logs of sizes against the lab's median cell
    low, high = np.quantile(source, [0.01, 0.99], axis=0)
    ordinary = np.zeros((1, 2))
    tiny = np.array([[-1.5, -1.5]])  # a platelet against white cells: far smaller in both sizes
    one_size_off = np.array([[0.0, 1.0]])
    edge = np.stack([low * 1.5, high * 1.5])  # past the source's range, within twice it
    tight = rng.normal(0, 0.03, (500, 2))
    kept = within_size_range(source, np.concatenate([ordinary, tiny, one_size_off, edge, tight]))
    # A target tighter than the source keeps the source's whole range: its ordinary cells all, no more.
    assert kept.tolist() == [True, False, False, False, False, *[True] * 500]
    wide = rng.normal(0, 0.2, (500, 2))  # a lab whose cells spread twice as wide: the range widens with it
    kept = within_size_range(source, np.concatenate([edge, tiny, wide]))
    assert kept[:3].tolist() == [True, True, False]
    assert 0.9 < kept[3:].mean() < 1.0


def test_a_size_check_keeps_cells_outside_the_sources_sizes_out_of_self_training(tmp_path, monkeypatch):
    import aecfe_cli.classify as classify

    rng = np.random.default_rng(1)
    labels = np.repeat(["lymphocyte", "neutrophil"], 60)
    columns = ("f0", "m_cell_size", "m_box_size")
    source = np.concatenate([np.where(labels == "neutrophil", 4.0, 0.0)[:, None] + rng.normal(0, 0.3, (120, 1)),
                             rng.normal(0, 0.1, (120, 2))], 1).astype(np.float32)
    # The target's last 20 cells (platelets, a class the source lacks) have a lymphocyte's colour and a
    # fifth of a white cell's size: learnt as lymphocytes, they would teach the forest a wrong lymphocyte.
    platelets = np.concatenate([rng.normal(0, 0.3, (20, 1)), rng.normal(-1.5, 0.1, (20, 2))], 1)
    target = np.concatenate([source, platelets]).astype(np.float32)
    sizes = classify.size_check_columns(columns, "source_range")
    assert sizes.tolist() == [False, True, True]
    assert classify.size_check_columns(columns, "none") is None
    assert classify.size_check_columns(("f0", "m_area"), "source_range") is None  # no size column, no check

    offered = []  # the cells each round of self-training may learn
    choose = classify.self_training_cells
    monkeypatch.setattr(classify, "self_training_cells",
                        lambda predicted, confidence, share, agreed: offered.append(agreed) or choose(
                            predicted, confidence, share, agreed))
    classify.fit_classifier("random_forest", 0, source, labels, target=target, rounds=2)
    assert len(offered) == 2 and all(agreed.all() for agreed in offered)
    offered.clear()
    classify.fit_classifier("random_forest", 0, source, labels, target=target, rounds=2, sizes=sizes)
    assert len(offered) == 2
    assert all(not agreed[120:].any() and agreed[:120].mean() > 0.95 for agreed in offered)

    sets = [FeatureSet(name=name, features=features, instance_ids=ids, images=ids, columns=columns,
                       labels=np.concatenate([labels, np.repeat("platelet", len(features) - 120)]))
            for name, features, ids in (("lab_a", source, [f"a/{i}" for i in range(120)]),
                                        ("lab_b", target, [f"b/{i}" for i in range(140)]))]
    offered.clear()
    report = run_evaluation(sets[0], sets[1:], tmp_path / "checked", baselines=False, self_training=1,
                            self_training_sizes="source_range")
    assert report["self_training_sizes"] == "source_range"
    assert ("learnt a target cell's label only where its sizes lay within the source's range"
            in (tmp_path / "checked" / "report.md").read_text())
    assert not offered[0][120:].any()  # AE-CFE's classifier, the first fitted, learnt no platelet
    assert all(agreed.all() for agreed in offered[1:])  # its parts alone self-train without the check
    with pytest.raises(UserError, match="did you mean 'source_range'"):
        run_evaluation(sets[0], sets[1:], tmp_path / "typo", baselines=False, self_training_sizes="source")
    assert not (tmp_path / "typo").exists()


def test_a_plain_fit_is_made_once_per_set_of_columns_and_fits_those_columns_only():
    from aecfe_cli.classify import cached_plain_fit

    source, _ = _cluster_in_the_margin()
    features = np.concatenate([source.features, -source.features], axis=1)
    cache, first, second = {}, np.array([True, True, False, False]), np.array([False, False, True, True])
    model = cached_plain_fit(cache, "random_forest", 0, features, source.labels, first)
    assert cached_plain_fit(cache, "random_forest", 0, features, source.labels, first.copy()) is model
    other = cached_plain_fit(cache, "random_forest", 0, features, source.labels, second)
    assert other is not model and len(cache) == 2
    assert model.n_features_in_ == 2 and other.n_features_in_ == 2
    alone = make_classifier("random_forest", 0).fit(features[:, second], source.labels)
    assert np.array_equal(other.predict_proba(features[:, second]), alone.predict_proba(features[:, second]))


def _imbalanced_labs() -> tuple[FeatureSet, FeatureSet]:
    """A source lab that sampled 18 lymphocytes for every neutrophil, and a target lab with as many of each.
    Where the source's classes overlap (column value 1), its cells are 60 lymphocytes to 15 neutrophils; the
    target's neutrophils all sit there."""
    def lab(name: str, values_and_labels: list[tuple[float, str, int]]) -> FeatureSet:
        # A second, empty column: the report's 2-D embedding needs two.
        features = np.array([[value, 0.0] for value, _, count in values_and_labels for _ in range(count)], np.float32)
        labels = np.array([label for _, label, count in values_and_labels for _ in range(count)])
        ids = [f"{name}/{i}" for i in range(len(labels))]
        return FeatureSet(name=name, features=features, instance_ids=ids, images=ids, labels=labels)

    source = lab("lab_a", [(0.0, "lymphocyte", 300), (1.0, "lymphocyte", 60), (1.0, "neutrophil", 15),
                           (2.0, "neutrophil", 5)])
    target = lab("lab_b", [(0.0, "lymphocyte", 100), (1.0, "neutrophil", 100)])
    return source, target


def test_balanced_class_weights_keep_a_source_labs_class_mix_out_of_another_labs_labels(tmp_path):
    source, target = _imbalanced_labs()
    reports = {weight: run_evaluation(source, [target], tmp_path / weight, baselines=False, class_weight=weight)
               for weight in ("none", "balanced")}
    # Unweighted, the forest follows the source's mix where the classes overlap: every target neutrophil is
    # called a lymphocyte. Weighted, the 15 neutrophils outweigh the 60 lymphocytes there.
    assert reports["none"]["targets"]["lab_b"]["balanced_accuracy"] == pytest.approx(0.5)
    assert reports["balanced"]["targets"]["lab_b"]["balanced_accuracy"] == pytest.approx(1.0)
    assert reports["balanced"]["class_weight"] == "balanced"
    assert "classes weighted alike" in (tmp_path / "balanced" / "report.md").read_text()
    assert "classes weighted alike" not in (tmp_path / "none" / "report.md").read_text()


def test_a_class_weighting_that_cannot_work_fails_before_any_work(tmp_path):
    source, target = _imbalanced_labs()
    with pytest.raises(UserError, match="did you mean 'balanced'"):
        run_evaluation(source, [target], tmp_path / "typo", baselines=False, class_weight="balance")
    with pytest.raises(UserError, match="knn cannot weigh classes"):
        run_evaluation(source, [target], tmp_path / "knn", baselines=False, classifier="knn", class_weight="balanced")
    assert not (tmp_path / "typo").exists() and not (tmp_path / "knn").exists()


def test_the_forest_has_the_configured_trees_in_every_fit_and_the_report_says_so(tmp_path):
    source, target = _imbalanced_labs()
    model = fit_classifier("random_forest", 0, source.features, source.labels, target=target.features, rounds=2,
                           class_weight="balanced", trees=7)
    assert model.n_estimators == 7 and len(model.estimators_) == 7  # the self-trained refit, not only the first
    report = run_evaluation(source, [target], tmp_path / "seven", baselines=False, class_weight="balanced", trees=7)
    assert report["trees"] == 7
    with pytest.raises(UserError, match="evaluate.trees is 0"):
        run_evaluation(source, [target], tmp_path / "none", baselines=False, trees=0)
    assert not (tmp_path / "none").exists()


def test_a_source_restricted_to_the_classes_a_new_lab_holds_never_predicts_the_others(tmp_path):
    # The new lab holds two of the source's four classes, and its stain moves some of its cells towards the others.
    source = make_set("lab_a", FINE_FOUR, per_class=60, spread=2.0)
    target = make_set("lab_b", ["lymphocyte_typical", "neutrophil_segmented"], per_class=60, shift=1.5, seed=1,
                      spread=2.0)
    every = run_evaluation(source, [target], tmp_path / "every", self_training=1)
    assert every["targets"]["lab_b"]["predicted_outside_classes"] > 0  # the premise
    two = ["lymphocyte_typical", "neutrophil_segmented"]
    chosen = run_evaluation(source, [target], tmp_path / "two", self_training=1, classes=two)
    assert chosen["classes"] == two and chosen["classes_left_out"] == ["eosinophil", "monocyte"]
    assert chosen["in_domain"]["n"] == 24 and chosen["cells_per_class"]["lab_a"] == dict.fromkeys(two, 60)
    assert chosen["targets"]["lab_b"]["balanced_accuracy"] > every["targets"]["lab_b"]["balanced_accuracy"]
    for method in (chosen, *chosen["baselines"].values(), *chosen["parts"].values()):
        assert method["targets"]["lab_b"]["predicted_outside_classes"] == 0
    assert "`evaluate.classes`" in (tmp_path / "two" / "report.md").read_text()
    with pytest.raises(UserError, match="names 'neutrofil_segmented' .did you mean 'neutrophil_segmented'.*lab_a"):
        run_evaluation(source, [target], tmp_path / "typo", classes=["lymphocyte_typical", "neutrofil_segmented"])
    with pytest.raises(UserError, match="names 1 class"):
        run_evaluation(source, [target], tmp_path / "one", classes=["lymphocyte_typical"])
    assert not (tmp_path / "typo").exists() and not (tmp_path / "one").exists()
