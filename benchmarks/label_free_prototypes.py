"""Label-free ideas for the cross-lab classifier, tried on finished feature sets before any is built into aecfe.

Each idea changes only what the classifier sees, so it can be scored on the features that a run of
``benchmarks/accuracy.py --suite real`` left in ``--scratch`` (the workdirs ``real-0-VARIANT-seedN``), in
minutes instead of a pipeline run per idea. The protocol is the evaluate defaults' classifier (random
forest, each source class weighed alike, ``max_shift`` 1.5, 3 rounds of self-training) with one classifier
seed, trained on all of the source's cells (nothing held out, no in-domain score): cheaper than the
harness's, so an idea is compared with the ``none`` row of the same invocation, never with
``docs/accuracy.md``. Ideas (``--ideas``, comma-separated):

* ``none``: the features as extracted.
* ``dataset``: each lab standardised with its own mean and spread (``evaluate.feature_norm: dataset``).
* ``both``: the features as extracted and as ``dataset`` gives them, side by side (``evaluate.feature_norm:
  both``, the default since the nineteenth look).
* ``prior``: the target standardised with its own moments, the source with its class-conditional moments
  reweighted to the target's class prior, estimated from the classifier's mean predicted probabilities on the
  target (3 rounds from equal classes): a lab's moments follow its class mix, not only its stain.
* ``clusters:K``: each lab's moments with each of K k-means clusters of its cells (features standardised
  within the lab) weighing alike, a label-free stand-in for "each class alike".
* ``source_classes:K``: the source's moments with each of its classes alike, the target's with each of K
  clusters alike.
* ``whitened``: each lab ZCA-whitened with its own mean and (Ledoit-Wolf) covariance; ``both_whitened`` the
  features as extracted and whitened, side by side (``both`` with the correlations removed as well).
* ``coral``: the source mapped onto the target's mean and covariance (CORAL), the target as extracted.
* ``ranked``: each column of each lab replaced by its cells' quantile ranks within the lab (quantile
  normalisation: any monotone distortion a stain or a camera puts on a descriptor is undone, not only an
  affine one as ``dataset`` undoes); ``both_ranked`` the features as extracted and ranked, side by side, and
  ``all_ranked`` the default's two copies with the ranked one beside them. Sizes stay ratios to the lab's
  median cell.
* ``achromatic``: the morphology's hue columns left out (CIELAB a and b and their spreads, the stain's
  channel shares and their contrasts); lightness, optical density, shape and nuclear structure kept.
* ``mean:A+B``: the class probabilities of the forests of ideas A and B averaged (a hedge between two
  alignments of the labs, for example ``mean:none+clusters:8``). A part may name the extracted columns its
  forest sees after an ``@`` (overriding ``--columns``): ``mean:both+histograms_none@none`` averages the
  default's forest with one on the stain-normalised histograms alone (late fusion of two views).
* ``virtual_labs:K``: domain randomisation. The source's crops are shown as K other labs might show them
  (one ``colour.stain_jitter`` draw per virtual lab, applied to all its cells, and the virtual lab's own
  stain statistics), described again, and the forest trains on the source and its virtual labs alike. The
  latent of a virtual lab's cell is its original's: the latent comes from the detector's RoI features, which
  would need a detector pass per virtual lab.

* ``histograms_IDEA``: IDEA with the ``stain_normalized_histogram`` baseline's columns appended (each lab's
  crops normalised onto the source's stain statistics, as ``aecfe evaluate`` computes that baseline).
* ``granules_IDEA``: IDEA with four granule descriptors per cell appended (:func:`granule_descriptors`).
* ``sizes_IDEA``: IDEA with four sizes of each cell against its lab's median cell appended (:func:`cell_sizes`).
* ``contrastive_IDEA``: IDEA with a contrastive embedding of each cell appended (:func:`contrastive_embeddings`):
  a ResNet-18 trained from scratch on the cells of all three labs to recognise each cell under stain, lamp,
  focus and camera jitter (aecfe's own backbone pretraining, ``backbone_pretraining.pretrain_backbone``),
  its pooled output reduced to ``CONTRASTIVE_COLUMNS`` principal components over the three labs.
* ``resolution_IDEA``: IDEA after the lab of the pair whose crops span more original pixels has its
  morphology measured again on crops sampled down to the other lab's resolution (:func:`resolution_matched`).
* ``importance_IDEA``: IDEA with the source's cells drawn in proportion to how target-like each is
  (:func:`importance_resampled`: covariate-shift correction by a logistic regression told to tell the labs
  apart), so the forest learns most from the source cells that look like the target's.
* ``IDEA/STEP``: IDEA followed by a label-free step on the forest or its target probabilities:
  ``spread:K:ALPHA`` (label spreading over the target's own neighbours), ``em`` (the target's class prior
  by EM), ``forests:N`` (N self-trained forests averaged), ``trees:N`` (forests of N trees); see
  :func:`after_forest`.

``--columns morphology`` scores the morphology columns alone (``latent`` the latent alone; ``shape`` the
morphology's geometry, ``colour`` the rest of it: see :func:`chosen_columns`). Each row also
gives the mean over the classes of 10 cells or more in the target (``RARE_CLASS_CELLS``), since one cell of
a class (Zheng's single basophil) moves a five-class balanced accuracy by 0.20.

    python benchmarks/label_free_prototypes.py --scratch /tmp/aecfe-accuracy --ideas none,dataset,clusters:8
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aecfe_cli import baselines, colour, morphology  # noqa: E402
from aecfe_cli.classify import DEFAULT_TREES, RARE_CLASS_CELLS, fit_classifier, make_classifier, normalise_features, stable_columns  # noqa: E402
from aecfe_cli.detector import crop_cell  # noqa: E402
from aecfe_cli.io import read_csv  # noqa: E402
from aecfe_cli.feature_sets import MORPHOLOGY_PREFIX, load_feature_set, morphology_columns, size_columns  # noqa: E402

LABS = ("pbc", "zheng", "bccd")
DIRECTIONS = [(source, target) for source in LABS for target in LABS if source != target]
MAX_SHIFT, SELF_TRAINING, CLASS_WEIGHT, CLASSIFIER_SEED = 1.5, 3, "balanced", 0
COLUMN_GROUPS = ("all", "morphology", "latent", "shape", "colour", "none")
HUE_DESCRIPTORS = ("_a", "_b", "_a_spread", "_b_spread", "_density_red", "_density_green", "_density_blue")
PRIOR_ROUNDS = 3
EM_ROUNDS = 20
HISTOGRAM_PREFIX = "histograms_"
GRANULE_PREFIX = "granules_"
RESOLUTION_PREFIX = "resolution_"
CONTRASTIVE_PREFIX = "contrastive_"
SIZE_PREFIX = "sizes_"
IMPORTANCE_PREFIX = "importance_"
IMPORTANCE_CLIP = 10.0  # the largest density ratio a source cell may get, so a few cells cannot stand for all
CONTRASTIVE_BATCH, CONTRASTIVE_COLUMNS = 64, 32
# The margins detector.crop_cell adds around a box (pixels of a 400-px resize of the image), read from it
# so the crop spans below follow the detect stage.
_CROP_DEFAULTS = inspect.signature(crop_cell).parameters
MARGIN, MARGIN_REFERENCE = _CROP_DEFAULTS["margin"].default, _CROP_DEFAULTS["reference"].default
lab_workdirs: dict[str, Path] = {}  # the workdir each lab of the pipeline seed at hand was read from


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/aecfe-accuracy"))
    parser.add_argument("--variant", default="default", help="the harness variant whose workdirs to read")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ideas", default="none,dataset")
    parser.add_argument("--columns", choices=COLUMN_GROUPS, default="all",
                        help="the extracted columns the classifier sees; none: only those an idea appends")
    parser.add_argument("--contrastive-steps", type=int, default=400, help="SimCLR steps of contrastive_ ideas")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    ideas = args.ideas.split(",")
    means = {idea: [] for idea in ideas}
    common_means = {idea: [] for idea in ideas}
    print("| pipeline seed | idea | mean | " + " | ".join(f"{s}->{t}" for s, t in DIRECTIONS)
          + f" | mean over the classes of {RARE_CLASS_CELLS} cells or more |")
    print("|---|---|---|" + "---|" * (len(DIRECTIONS) + 1))
    for seed in (int(s) for s in args.seeds.split(",")):
        workdir = args.scratch / f"real-0-{args.variant}-seed{seed}" / "work"
        labs = {name: load_feature_set(workdir, name) for name in LABS}
        lab_workdirs.update({name: workdir for name in LABS})
        _CACHE.clear()  # each pipeline seed has crops of its own
        _CACHE["pipeline_seed"], _CACHE["contrastive_steps"] = seed, args.contrastive_steps
        virtual = {}
        for idea in ideas:
            scores, common = [], []
            for source, target in DIRECTIONS:
                shown = []
                if idea.startswith("virtual_labs:"):
                    if (idea, source) not in virtual:
                        virtual[idea, source] = virtual_lab_descriptors(labs[source], int(idea.split(":")[1]), seed)
                    shown = virtual[idea, source]
                full, over_common = score(idea, labs[source], labs[target], args.columns, shown)
                scores.append(full)
                common.append(over_common)
            means[idea].append(float(np.mean(scores)))
            common_means[idea].append(float(np.mean(common)))
            print(f"| {seed} | {idea} | {np.mean(scores):.3f} | " + " | ".join(f"{v:.3f}" for v in scores)
                  + f" | {np.mean(common):.3f} |", flush=True)
    print()
    for idea, values in means.items():
        print(f"{idea}: mean {np.mean(values):.3f}, sd {np.std(values, ddof=1) if len(values) > 1 else 0:.3f} "
              f"over pipeline seeds ({', '.join(f'{v:.3f}' for v in values)}); over the classes of "
              f"{RARE_CLASS_CELLS} cells or more {np.mean(common_means[idea]):.3f} "
              f"({', '.join(f'{v:.3f}' for v in common_means[idea])})")


def score(idea: str, source, target, columns: str, virtual: list[np.ndarray]) -> tuple[float, float]:
    """Balanced accuracy on the target's cells of the classes it shares with the source, and over those of
    them with :data:`RARE_CLASS_CELLS` cells or more in the target (as reports give it beside the full one).
    ``mean:A+B``: the class probabilities of the classifiers of ideas A and B averaged."""
    scored = np.isin(target.labels, np.unique(source.labels))
    names, counts = np.unique(target.labels, return_counts=True)
    common = scored & np.isin(target.labels, names[counts >= RARE_CLASS_CELLS])
    parts = idea.removeprefix("mean:").split("+")
    fits = [target_probabilities(part, source, target, columns, virtual) for part in parts]
    classes = fits[0][0]
    assert all(np.array_equal(fitted_classes, classes) for fitted_classes, _ in fits)
    predicted = classes[np.mean([probabilities for _, probabilities in fits], axis=0).argmax(axis=1)]
    return (float(balanced_accuracy_score(target.labels[scored], predicted[scored])),
            float(balanced_accuracy_score(target.labels[common], predicted[common])))


def target_probabilities(idea: str, source, target, columns: str, virtual: list[np.ndarray]):
    """The classes and the (target cells, classes) probabilities of the forest one idea gives, after the
    idea's ``/``-suffix, if any (:func:`after_forest`); an ``@COLUMNS`` suffix overrides ``columns``."""
    idea, _, own_columns = idea.partition("@")
    columns = own_columns or columns
    idea, _, after = idea.partition("/")
    # importance_ wraps any idea, appended columns included, so it is read off first.
    importance = idea.startswith(IMPORTANCE_PREFIX)
    idea = idea.removeprefix(IMPORTANCE_PREFIX)
    appended = [prefix for prefix in APPENDED if idea.startswith(prefix)]
    if idea.startswith(RESOLUTION_PREFIX):
        source, target = resolution_matched(source, target), resolution_matched(target, source)
    for prefix in (*APPENDED, RESOLUTION_PREFIX):
        idea = idea.removeprefix(prefix)
    chosen = chosen_columns(source.columns, columns, achromatic=idea == "achromatic")
    source_x, target_x = source.features[:, chosen].astype(np.float64), target.features[:, chosen].astype(np.float64)
    source_x, target_x = normalise(idea, source_x, source.labels, target_x, np.asarray(source.columns)[chosen])
    for prefix in appended:
        source_x = np.concatenate([source_x, APPENDED[prefix](source, source)], axis=1)
        target_x = np.concatenate([target_x, APPENDED[prefix](target, source)], axis=1)
    keep = stable_columns([source_x, target_x], MAX_SHIFT)
    train_x, train_y = source_x, source.labels
    if virtual:
        is_morphology = crop_descriptor_columns(source.columns)[chosen]
        copies = []
        for descriptors in virtual:
            copy = source_x.copy()
            copy[:, is_morphology] = descriptors[:, chosen[crop_descriptor_columns(source.columns)]]
            copies.append(copy)
        train_x = np.concatenate([source_x, *copies])
        train_y = np.concatenate([source.labels] * (1 + len(copies)))
    if importance:
        picked = importance_resampled(train_x[:, keep], target_x[:, keep], CLASSIFIER_SEED)
        train_x, train_y = train_x[picked], train_y[picked]
    forests = int(after.split(":")[1]) if after.startswith("forests:") else 1
    trees = int(after.split(":")[1]) if after.startswith("trees:") else DEFAULT_TREES
    models = [fit_classifier("random_forest", CLASSIFIER_SEED + index, train_x[:, keep], train_y, target_x[:, keep],
                             SELF_TRAINING, class_weight=CLASS_WEIGHT, trees=trees) for index in range(forests)]
    probabilities = np.mean([model.predict_proba(target_x[:, keep]) for model in models], axis=0)
    return np.asarray(models[0].classes_), after_forest(after, probabilities, target_x[:, keep])


def after_forest(after: str, probabilities: np.ndarray, target_x: np.ndarray) -> np.ndarray:
    """The target's class probabilities after a label-free step that uses the target's own cells.

    ``spread:K:ALPHA``: label spreading (Zhou et al. 2004) over the target's K-nearest-neighbour graph in its
    own standardised features: the forest's probabilities are the seeds, each cell then takes ALPHA of its
    neighbours' (iterated to the fixed point), so cells of one cluster of the target agree (cluster
    assumption). ``em``: the target's class prior estimated by EM (Saerens et al. 2002) from the forest's
    probabilities, which assume equal classes (the forest weighs source classes alike), and the
    probabilities moved to that prior: a class the target lacks loses its share. ``forests:N``: N forests of
    consecutive seeds averaged, each self-trained on its own; ``trees:N``: one forest of N trees instead of
    100 (both done in :func:`target_probabilities`).
    """
    kind, *args = after.split(":") if after else ("",)
    if kind in ("", "forests", "trees"):
        return probabilities
    if kind == "em":
        prior = np.full(probabilities.shape[1], 1.0 / probabilities.shape[1])
        for _ in range(EM_ROUNDS):
            moved = probabilities * prior
            moved /= moved.sum(axis=1, keepdims=True)
            prior = moved.mean(axis=0)
        return moved
    if kind == "spread":
        neighbours, alpha = int(args[0]), float(args[1])
        x = standardise(target_x, *plain_moments(target_x))
        squared = (x**2).sum(axis=1)
        distances = squared[:, None] + squared[None, :] - 2 * x @ x.T
        np.fill_diagonal(distances, np.inf)
        nearest = np.argsort(distances, axis=1)[:, :neighbours]
        weights = np.zeros_like(distances)
        np.put_along_axis(weights, nearest, 1.0, axis=1)
        weights = np.maximum(weights, weights.T)
        degree = weights.sum(axis=1)
        normalised = weights / np.sqrt(np.outer(degree, degree))
        spread = np.linalg.solve(np.eye(len(x)) - alpha * normalised, (1 - alpha) * probabilities)
        return spread / spread.sum(axis=1, keepdims=True)
    raise SystemExit(f"unknown step after the forest '{after}'")


def importance_resampled(source_x: np.ndarray, target_x: np.ndarray, seed: int) -> np.ndarray:
    """Indices of the source's cells drawn (as many as it has, with replacement) in proportion to how
    target-like each is: the density ratio p(target | x) / p(source | x) of a logistic regression told to
    tell the two labs apart on the classifier's columns (covariate-shift correction, Shimodaira 2000), clipped
    to :data:`IMPORTANCE_CLIP` times its median. Drawing instead of weighing leaves the forest's own fit as is."""
    x = np.concatenate([source_x, target_x])
    is_target = np.r_[np.zeros(len(source_x)), np.ones(len(target_x))]
    mean, spread = plain_moments(x)
    domain = LogisticRegression(C=0.1, max_iter=2000).fit(standardise(x, mean, spread), is_target)
    p_target = domain.predict_proba(standardise(source_x, mean, spread))[:, 1]
    ratio = p_target / np.maximum(1 - p_target, 1e-9)
    ratio = np.minimum(ratio, IMPORTANCE_CLIP * np.median(ratio))
    return np.random.default_rng(seed).choice(len(source_x), len(source_x), p=ratio / ratio.sum())


def chosen_columns(names: tuple[str, ...], columns: str, achromatic: bool) -> np.ndarray:
    """The extracted columns of one of :data:`COLUMN_GROUPS`: "shape" is the morphology's geometry (the
    nucleus's share of the cell, the shape indices of nucleus and cell, the nuclear structure), which no stain
    moves; "colour" the rest of the morphology (colour, optical density, stain composition, contrast)."""
    is_morphology = morphology_columns(names)
    is_shape = np.isin(np.asarray(names, dtype=object), [MORPHOLOGY_PREFIX + name for name in morphology.SHAPE_DESCRIPTORS])
    chosen = {"all": np.ones(len(names), bool), "morphology": is_morphology, "latent": ~is_morphology,
              "shape": is_shape, "colour": is_morphology & ~is_shape, "none": np.zeros(len(names), bool)}[columns]
    if achromatic:
        chosen &= ~np.array([n.startswith(MORPHOLOGY_PREFIX) and n.endswith(HUE_DESCRIPTORS) for n in names])
    return chosen


def crop_descriptor_columns(names) -> np.ndarray:
    """The morphology columns measured on the crop (``morphology_of`` gives them): all but the sizes."""
    return morphology_columns(names) & ~size_columns(names)


def normalise(idea: str, source_x: np.ndarray, source_y: np.ndarray, target_x: np.ndarray, names: np.ndarray):
    kind, _, k = idea.partition(":")
    if kind in ("none", "achromatic", "virtual_labs"):
        return source_x, target_x
    if kind in ("dataset", "both"):
        return normalise_features(source_x, kind, names), normalise_features(target_x, kind, names)
    if kind in ("ranked", "both_ranked", "all_ranked"):
        sizes = size_columns(names)
        ranked = [within_lab_ranks(x, sizes) for x in (source_x, target_x)]
        if kind == "ranked":
            return tuple(ranked)
        base = "both" if kind == "all_ranked" else "none"
        return tuple(np.concatenate([normalise_features(x, base, names), r[:, ~sizes]], axis=1)
                     for x, r in zip((source_x, target_x), ranked))
    if kind in ("whitened", "both_whitened", "coral"):
        # The sizes as every feature_norm gives them (ratios to the lab's median cell, not standardised);
        # the other columns aligned by their means and covariances.
        sizes = size_columns(names)
        source_x, target_x = normalise_features(source_x, "none", names), normalise_features(target_x, "none", names)
        if kind == "coral":
            source_x = source_x.astype(np.float64)
            source_x[:, ~sizes] = coral(source_x[:, ~sizes], target_x[:, ~sizes])
            return source_x, target_x
        aligned = [whitened(x[:, ~sizes].astype(np.float64)) for x in (source_x, target_x)]
        if kind == "whitened":
            return (np.concatenate([aligned[0], source_x[:, sizes]], axis=1),
                    np.concatenate([aligned[1], target_x[:, sizes]], axis=1))
        return np.concatenate([source_x, aligned[0]], axis=1), np.concatenate([target_x, aligned[1]], axis=1)
    if kind == "clusters":
        return (standardise(source_x, *group_moments(source_x, clusters(source_x, int(k)))),
                standardise(target_x, *group_moments(target_x, clusters(target_x, int(k)))))
    if kind == "source_classes":
        return (standardise(source_x, *group_moments(source_x, source_y)),
                standardise(target_x, *group_moments(target_x, clusters(target_x, int(k)))))
    if kind == "prior":
        target_x = standardise(target_x, *plain_moments(target_x))
        classes = np.unique(source_y)
        prior = np.ones(len(classes))
        for _ in range(PRIOR_ROUNDS):
            scaled = standardise(source_x, *group_moments(source_x, source_y, prior))
            keep = stable_columns([scaled, target_x], MAX_SHIFT)
            forest = make_classifier("random_forest", CLASSIFIER_SEED, CLASS_WEIGHT).fit(scaled[:, keep], source_y)
            prior = np.maximum(forest.predict_proba(target_x[:, keep]).mean(axis=0), 1e-3)
        return standardise(source_x, *group_moments(source_x, source_y, prior)), target_x
    raise SystemExit(f"unknown idea '{idea}'")


_CACHE: dict = {}  # descriptors computed for the pipeline seed at hand, by what and whose


def stain_normalised_histograms(lab, reference_lab) -> np.ndarray:
    """The ``stain_normalized_histogram`` baseline's descriptors of ``lab``'s crops, normalised onto
    ``reference_lab``'s stain statistics (the source's, as ``aecfe evaluate`` does)."""
    key = ("histograms", lab.name, reference_lab.name)
    if key not in _CACHE:
        _CACHE[key] = baselines.baseline_features(
            np.asarray(lab.crops), "stain_normalized_histogram", reference=stain_statistics(reference_lab),
            statistics=stain_statistics(lab)).astype(np.float64)
    return _CACHE[key]


def stain_statistics(lab) -> np.ndarray:
    """``baselines.lab_statistics`` of the lab's crops, once per pipeline seed (every direction needs them)."""
    key = ("stain", lab.name)
    if key not in _CACHE:
        _CACHE[key] = baselines.lab_statistics(np.asarray(lab.crops))
    return _CACHE[key]


def resolution_matched(lab, other):
    """``lab`` with its morphology measured as ``other``'s camera would resolve it, where ``other`` resolves
    cells more coarsely: each crop is sampled down to the original pixels ``other``'s crops span (the
    labs' medians) and back up to the crop's size, as the detect stage resizes a coarse lab's crops, and
    its morphology descriptors are computed again (with the degraded crops' stain statistics). Thin
    strands between a neutrophil's lobes that one lab resolves and another cannot are then lost in both."""
    factor = crop_span(other) / crop_span(lab)
    if factor >= 1.0:
        return lab
    key = ("resolution", lab.name, round(factor, 3))
    if key not in _CACHE:
        size = lab.crops.shape[-1]
        small = max(8, round(size * factor))
        shown = np.stack([np.asarray(Image.fromarray(np.moveaxis(np.asarray(crop), 0, -1)).resize(
            (small, small), Image.BOX).resize((size, size), Image.BILINEAR)).transpose(2, 0, 1) for crop in lab.crops])
        features = lab.features.copy()
        features[:, crop_descriptor_columns(lab.columns)] = morphology_of(shown)
        _CACHE[key] = features
        print(f"<!-- {lab.name} seen at {factor:.2f} of its resolution ({small} px) -->", flush=True)
    return dataclasses.replace(lab, features=_CACHE[key])


def crop_span(lab) -> float:
    """The median number of original image pixels across one of ``lab``'s crops: its box's longer side
    and the margins ``detector.crop_cell`` adds, which scale with the image's size."""
    key = ("span", lab.name)
    if key not in _CACHE:
        rows = read_csv(Path(lab_workdirs[lab.name]) / "detect" / lab.name / "instances.csv")
        _CACHE[key] = float(np.median([max(window_span(row)) for row in rows]))
        print(f"<!-- {lab.name}: crops span {_CACHE[key]:.0f} original pixels (median) -->", flush=True)
    return _CACHE[key]


def cell_sizes(lab) -> np.ndarray:
    """(N, 4) per cell: how large it is against its own lab's typical cell, as log ratios to the lab's median
    (0 for a cell of the lab's median size), as the twenty-sixth look measured before ``morphology.SIZES``
    (the first two columns) became extracted columns. The detect stage resizes every crop to one size, so the
    features of that time knew the cell's shape but not its size; within a lab the camera's magnification
    is fixed, so a ratio to the lab's median cancels it. Columns: ``morphology.cell_sizes`` (the detector's
    mask and box areas), then the classical segmentation's cell and nucleus areas (pixels of the crop scaled
    back to the original image, ignoring the image's edge), each as the log of its square root."""
    key = ("sizes", lab.name)
    if key not in _CACHE:
        by_id = {row["instance_id"]: row for row in
                 read_csv(Path(lab_workdirs[lab.name]) / "detect" / lab.name / "instances.csv")}
        rows = [by_id[instance_id] for instance_id in lab.instance_ids]
        areas = []
        for row, crop in zip(rows, lab.crops):
            span_x, span_y = window_span(row)
            cell, nucleus = morphology.central_cell(np.moveaxis(np.asarray(crop), 0, -1))
            areas.append(np.array([cell.sum(), nucleus.sum()]) * (span_x * span_y / crop.shape[-1] / crop.shape[-2]))
        sizes = np.concatenate([morphology.cell_sizes(rows), 0.5 * np.log(np.maximum(np.asarray(areas), 1.0))], axis=1)
        _CACHE[key] = sizes - np.median(sizes, axis=0)
    return _CACHE[key]


def window_span(row: dict) -> tuple[float, float]:
    """The width and height in original image pixels of the window a detection's crop is cut from: its box
    and the margins ``detector.crop_cell`` adds, which scale with the image's size (the image's edge ignored)."""
    width, height = image_size(row["image"])
    return (float(row["x1"]) - float(row["x0"]) + sum(MARGIN) * width / MARGIN_REFERENCE,
            float(row["y1"]) - float(row["y0"]) + sum(MARGIN) * height / MARGIN_REFERENCE)


def image_size(path: str) -> tuple[int, int]:
    key = ("image_size", path)
    if key not in _CACHE:
        with Image.open(path) as image:
            _CACHE[key] = image.size
    return _CACHE[key]


def granule_descriptors(lab) -> np.ndarray:
    """(N, 4) per cell: how dense its cytoplasm's densest tenth is, and how much of the cytoplasm is dense,
    both against its own nucleus's median density (eosinophils' granules are nearly as dense as the nucleus,
    neutrophils' faint), and the stain composition (red and blue channels' shares of the optical density) of
    the densest quarter of the cytoplasm minus the nucleus's. All measured against the cell's own nucleus,
    so no lab's stain strength or lamp moves them. Cached per lab for the pipeline seed."""
    key = ("granules", lab.name)
    if key not in _CACHE:
        _CACHE[key] = np.stack([_granules(np.moveaxis(np.asarray(crop), 0, -1)) for crop in lab.crops])
    return _CACHE[key]


def _granules(crop: np.ndarray) -> np.ndarray:
    cell, nucleus = morphology.central_cell(crop)
    cytoplasm = cell & ~nucleus
    if cytoplasm.sum() < morphology.MIN_REGION_PIXELS or nucleus.sum() < morphology.MIN_REGION_PIXELS:
        return np.zeros(4)
    density = colour.optical_density(crop)
    total = density.sum(axis=2)
    share = density / np.maximum(total, 1e-6)[..., None]
    nucleus_density = max(float(np.median(total[nucleus])), 1e-6)
    dense = cytoplasm & (total >= np.percentile(total[cytoplasm], 75))
    composition = share[dense].mean(axis=0) - share[nucleus].mean(axis=0)
    return np.array([np.percentile(total[cytoplasm], 90) / nucleus_density,
                     float(np.mean(total[cytoplasm] > 0.5 * nucleus_density)), composition[0], composition[2]])


def contrastive_embeddings() -> dict[str, np.ndarray]:
    """Per lab of the pipeline seed at hand, (N, CONTRASTIVE_COLUMNS) embeddings of its cells, rows in its
    feature set's order. A ResNet-18 trunk, randomly initialised, is trained by SimCLR on windows around the
    detected boxes of all labs together (label-free and transductive, as the autoencoder's alignment is) for
    ``--contrastive-steps`` steps; each cell's whole window is then embedded (its last stage averaged over
    space, white-balanced as in training) and the embeddings reduced by PCA fitted on all labs' cells.
    Saved as ``contrastive-STEPS.npz`` beside the workdir, so other ideas and invocations reuse them."""
    import torch
    from torchvision.models import resnet18
    from torchvision.models._utils import IntermediateLayerGetter
    from aecfe_cli.annotations import TrainSample
    from aecfe_cli.backbone_pretraining import VIEW_SIZE, cell_windows, pretrain_backbone

    key = ("contrastive",)
    if key in _CACHE:
        return _CACHE[key]
    seed, steps = _CACHE["pipeline_seed"], _CACHE["contrastive_steps"]
    saved = Path(lab_workdirs[LABS[0]]).parent / f"contrastive-{steps}.npz"
    if saved.is_file():
        with np.load(saved) as stored:
            _CACHE[key] = {name: stored[name] for name in LABS}
        return _CACHE[key]
    samples = {}
    for name, workdir in lab_workdirs.items():
        rows = {row["instance_id"]: row for row in read_csv(Path(workdir) / "detect" / name / "instances.csv")}
        ids = load_feature_set(workdir, name).instance_ids
        samples[name] = [TrainSample(Path(rows[i]["image"]), np.array([[float(rows[i][c]) for c in ("x0", "y0", "x1", "y1")]]),
                                     None) for i in ids]
    torch.manual_seed(seed)
    body = IntermediateLayerGetter(resnet18(weights=None), {"layer4": "0"})
    started = time.perf_counter()
    summary = pretrain_backbone(body, [s for lab in samples.values() for s in lab], steps, CONTRASTIVE_BATCH,
                                "cpu", seed)
    print(f"<!-- contrastive pretraining: {summary} -->", flush=True)
    embedded = {}
    with torch.no_grad():
        for name, lab_samples in samples.items():
            windows = cell_windows(lab_samples, "none")
            assert len(windows) == len(lab_samples)
            views = np.stack([np.asarray(Image.fromarray(w).resize((VIEW_SIZE, VIEW_SIZE), Image.BILINEAR)) for w in windows])
            pixels = np.stack([colour.white_balance_pixels(view.astype(np.float32) / 255.0) for view in views])
            batches = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).split(256)
            embedded[name] = torch.cat([list(body(b).values())[-1].mean(dim=(2, 3)) for b in batches]).numpy()
    pooled = np.concatenate(list(embedded.values())).astype(np.float64)
    mean = pooled.mean(axis=0)
    _, _, axes = np.linalg.svd(pooled - mean, full_matrices=False)
    _CACHE[key] = {name: (e - mean) @ axes[:CONTRASTIVE_COLUMNS].T for name, e in embedded.items()}
    np.savez(saved, **_CACHE[key])
    print(f"<!-- contrastive embeddings in {time.perf_counter() - started:.0f} s -->", flush=True)
    return _CACHE[key]


def plain_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), x.std(axis=0)


def group_moments(x: np.ndarray, groups: np.ndarray, weights: np.ndarray | None = None):
    """Mean and spread of ``x`` with each group (in ``np.unique`` order) weighing ``weights`` (default alike)."""
    keys = np.unique(groups)
    weights = np.ones(len(keys)) if weights is None else np.asarray(weights, np.float64)
    weights = weights / weights.sum()
    mean = sum(w * x[groups == g].mean(axis=0) for w, g in zip(weights, keys))
    second = sum(w * (x[groups == g] ** 2).mean(axis=0) for w, g in zip(weights, keys))
    return mean, np.sqrt(np.maximum(second - mean**2, 0.0))


def covariance_power(x: np.ndarray, power: float) -> np.ndarray:
    """The lab's Ledoit-Wolf-shrunk covariance raised to ``power`` (symmetric, by eigendecomposition): shrinkage
    keeps the inverse root finite with fewer cells than columns, as BCCD's few hundred against 80 columns."""
    values, vectors = np.linalg.eigh(LedoitWolf().fit(x).covariance_)
    return (vectors * np.maximum(values, 1e-9) ** power) @ vectors.T


def whitened(x: np.ndarray) -> np.ndarray:
    """ZCA whitening with the lab's own mean and covariance: ``dataset`` standardisation with the columns'
    correlations removed too (a stain that moves several colour columns together is undone as one)."""
    return (x - x.mean(axis=0)) @ covariance_power(x, -0.5)


def coral(source_x: np.ndarray, target_x: np.ndarray) -> np.ndarray:
    """CORAL (Sun, Feng and Saenko 2016): the source whitened, then coloured with the target's covariance and
    moved to its mean, so a forest trained on it splits where the target's cells lie."""
    return whitened(source_x) @ covariance_power(target_x, 0.5) + target_x.mean(axis=0)


def within_lab_ranks(x: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Each column's quantile ranks in (0, 1) among the lab's own cells (ties share their mean rank); the
    ``sizes`` columns as ratios to the lab's median cell instead, as every feature_norm gives them."""
    order = np.argsort(x, axis=0, kind="stable")
    ranks = np.empty_like(x, dtype=np.float64)
    for column in range(x.shape[1]):
        values = x[order[:, column], column]
        # mean position of each run of equal values, so a tie does not depend on the cells' order
        starts = np.r_[0, np.flatnonzero(np.diff(values)) + 1]
        ends = np.r_[starts[1:], len(values)]
        positions = np.repeat((starts + ends - 1) / 2.0, ends - starts)
        ranks[order[:, column], column] = (positions + 0.5) / len(values)
    ranks[:, sizes] = x[:, sizes] - np.median(x[:, sizes], axis=0)
    return ranks


def standardise(x: np.ndarray, mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
    return (x - mean) / np.where(spread > 1e-12, spread, 1.0)


def clusters(x: np.ndarray, k: int) -> np.ndarray:
    return KMeans(k, n_init=10, random_state=0).fit_predict(standardise(x, *plain_moments(x)))


def virtual_lab_descriptors(lab, count: int, seed: int) -> list[np.ndarray]:
    """The morphology descriptors of the lab's crops as each of ``count`` virtual labs would show them."""
    started, described = time.perf_counter(), []
    crops = np.asarray(lab.crops)
    for index in range(count):
        draw = 1000 * seed + index  # the same draw for every cell: one lamp, stain and camera per virtual lab
        shown = np.stack([np.moveaxis(colour.augmented_copy(np.moveaxis(c, 0, -1), np.random.default_rng(draw)), -1, 0)
                          for c in crops])
        described.append(morphology_of(shown))
    print(f"<!-- {lab.name}: {count} virtual labs described in {time.perf_counter() - started:.0f} s -->", flush=True)
    return described


def morphology_of(crops: np.ndarray) -> np.ndarray:
    """The morphology descriptors of (N, 3, S, S) ``crops`` shown as a lab of their own: the stain
    statistics that normalise their colours are these crops' own, as ``aecfe extract`` takes a dataset's."""
    blocks = [crops[i:i + 256] for i in range(0, len(crops), 256)]
    statistics = colour.lab_statistics(np.moveaxis(block, 1, -1) for block in blocks)
    return np.concatenate(list(morphology.describe_crops(blocks, statistics)))



# Ideas that append columns to the extracted ones: prefix -> the columns of (lab, source lab).
APPENDED = {
    HISTOGRAM_PREFIX: stain_normalised_histograms,
    GRANULE_PREFIX: lambda lab, source: granule_descriptors(lab),
    CONTRASTIVE_PREFIX: lambda lab, source: contrastive_embeddings()[lab.name],
    SIZE_PREFIX: lambda lab, source: cell_sizes(lab),
}

if __name__ == "__main__":
    main()
