"""The cells of one dataset as the classifying stages read them: features beside their ids, labels and crops.

Also the two decisions every classifier run shares: which label level the classes are taken at, and the
seeded stratified split of the source into training and held-out cells.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError, did_you_mean
from .io import read_csv, read_npy, write_csv
from .labels import coarse_of, is_fine, is_known
from .morphology import SIZES

LABEL_MODES = ("fine", "coarse", "auto")
ID_COLUMNS = ("instance_id", "image", "dataset", "label")  # features.csv: these, then the feature columns
POOL_SEPARATOR = "+"  # joins the names of the datasets pooled into one source
MORPHOLOGY_PREFIX = "m_"  # features.csv names morphology columns m_<descriptor>; the latent's are f0, f1, ...


@dataclass
class FeatureSet:
    """The cells of one dataset; row i of every array is the same cell."""

    name: str
    features: np.ndarray  # (N, D) float32
    instance_ids: np.ndarray  # (N,) str
    images: np.ndarray  # (N,) str, relative to the dataset root
    labels: np.ndarray  # (N,) str, the most specific vocabulary name the dataset gives
    crops: np.ndarray | None = None  # (N, 3, S, S) uint8, a memmap is fine
    columns: tuple[str, ...] = ()  # names of the D feature columns (features.csv header), when known
    origins: np.ndarray | None = None  # (N,) str, the dataset of each cell when pooled (:func:`pool`); else None

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        self.instance_ids = np.asarray(self.instance_ids).astype(str)
        self.images = np.asarray(self.images).astype(str)
        self.labels = np.asarray(self.labels).astype(str)
        n_cells = len(self.features)
        if self.origins is not None:
            self.origins = np.asarray(self.origins).astype(str)
        if self.features.ndim != 2:
            raise UserError(
                f"dataset '{self.name}': features must be a 2-D (cells, dimensions) array, got {self.features.shape}"
            )
        lengths = {"instance_ids": len(self.instance_ids), "images": len(self.images), "labels": len(self.labels)}
        if self.origins is not None:
            lengths["origins"] = len(self.origins)
        if self.crops is not None:
            lengths["crops"] = len(self.crops)
        wrong = {key: value for key, value in lengths.items() if value != n_cells}
        if wrong:
            raise UserError(
                f"dataset '{self.name}': {n_cells} feature rows but {wrong}; "
                f"re-run `aecfe extract --data {self.name} --force`"
            )

    def select(self, rows: np.ndarray) -> FeatureSet:
        """The cells ``rows`` (bool mask or indices) of this dataset, every array cut alike."""
        return FeatureSet(self.name, self.features[rows], self.instance_ids[rows], self.images[rows], self.labels[rows],
                          None if self.crops is None else np.asarray(self.crops[rows]), self.columns,
                          None if self.origins is None else self.origins[rows])

    def datasets(self) -> np.ndarray:
        """(N,) str: the dataset each cell comes from."""
        return np.full(len(self.features), self.name) if self.origins is None else self.origins

    def dataset_rows(self) -> list[np.ndarray]:
        """The row indices of each dataset the cells come from, in the order the datasets first appear: one
        entry holding every row, unless the cells were pooled from several datasets (:func:`pool`)."""
        origins = self.datasets()
        names, first = np.unique(origins, return_index=True)
        return [np.flatnonzero(origins == name) for name in names[np.argsort(first)]]

    def strata(self, classes: np.ndarray) -> np.ndarray:
        """(N,) str: what the source's split is stratified by, each cell's class (``classes``) and, for cells
        pooled from several datasets, its dataset too, so each lab gives its share of every class to the
        held-out cells."""
        if len(self.dataset_rows()) < 2:
            return np.asarray(classes).astype(str)
        return np.char.add(np.char.add(self.datasets(), "/"), np.asarray(classes).astype(str))

    @staticmethod
    def rows_of(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``array[rows]`` for rows of :meth:`dataset_rows`; the array itself when they are all of its rows (the
        one dataset of a set not pooled), so the crops of a memmap stay on disk rather than copied into memory."""
        return array if len(rows) == len(array) else array[rows]

    def per_dataset(self, describe: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``describe(rows)`` of each dataset's rows (:meth:`dataset_rows`), assembled in row order: what reads a
        lab against its own statistics (feature and stain normalisation) reads each lab of a pooled source so."""
        pieces = [(rows, np.asarray(describe(rows))) for rows in self.dataset_rows()]
        assembled = np.empty((len(self.features), *pieces[0][1].shape[1:]), pieces[0][1].dtype)
        for rows, piece in pieces:
            assembled[rows] = piece
        return assembled


def check_same_columns(first: FeatureSet, others: Sequence[FeatureSet]) -> None:
    """Fail unless every one of ``others`` has ``first``'s feature columns: one classifier reads them all."""
    for other in others:
        if other.columns != first.columns:
            raise UserError(f"datasets '{first.name}' and '{other.name}' were extracted with different feature "
                            f"columns (extract.morphology?): re-run `aecfe extract --force`")


def pooled_name(parts: Sequence) -> str:
    """The name of a source pooled from ``parts``, datasets or their feature sets (``pbc+zheng``): its evaluate
    and predict folders."""
    return POOL_SEPARATOR.join(part.name for part in parts)


def pool(sets: Sequence[FeatureSet]) -> FeatureSet:
    """The cells of several labelled datasets as one source (``--source A --source B``); each cell keeps its
    dataset in ``origins``, and its instance id is prefixed with it (``A/<id>``), since two datasets may use
    the same ids. One dataset is returned as it is."""
    if len(sets) == 1:
        return sets[0]
    check_same_columns(sets[0], sets[1:])
    crops = None if any(s.crops is None for s in sets) else np.concatenate([np.asarray(s.crops) for s in sets])
    return FeatureSet(
        name=pooled_name(sets),
        features=np.concatenate([s.features for s in sets]),
        instance_ids=np.concatenate([np.char.add(f"{s.name}/", s.instance_ids) for s in sets]),
        images=np.concatenate([s.images for s in sets]),
        labels=np.concatenate([s.labels for s in sets]),
        crops=crops,
        columns=sets[0].columns,
        origins=np.concatenate([s.datasets() for s in sets]),
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
        columns=_feature_columns(rows[0], features.shape[1]),
    )


def morphology_columns(columns: Sequence[str]) -> np.ndarray:
    """(D,) bool: which of the named feature columns are morphology descriptors (the rest: the latent)."""
    return np.array([column.startswith(MORPHOLOGY_PREFIX) for column in columns], bool)


def size_columns(columns: Sequence[str]) -> np.ndarray:
    """(D,) bool: which of the named feature columns are cell sizes in image pixels (``morphology.SIZES``)."""
    return np.isin(np.asarray(columns, dtype=object), [f"{MORPHOLOGY_PREFIX}{name}" for name in SIZES])


def _feature_columns(row: dict, dimensions: int) -> tuple[str, ...]:
    """The feature column names of features.csv, or none when the table does not name every dimension."""
    columns = tuple(column for column in row if column not in ID_COLUMNS)
    return columns if len(columns) == dimensions else ()


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


# ------------------------------------------------------------------------------------------------ labels


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
            f"unknown label level '{mode}'{did_you_mean(mode, LABEL_MODES)}; choose one of {', '.join(LABEL_MODES)}"
        )
    level = mode
    if mode == "auto":
        names = set(np.unique(np.asarray(source_labels).astype(str)))
        for labels in target_label_lists:
            names.update(np.unique(np.asarray(labels).astype(str)))
        level = "coarse" if any(is_known(name) and not is_fine(name) for name in names) else "fine"
    return level, (coarse_of if level == "coarse" else _same_class)


def chosen_classes(name: str, classes: np.ndarray, chosen: Sequence[str] | None, level: str) -> np.ndarray:
    """(N,) bool: the cells of dataset ``name`` whose class (``classes``, at the label ``level``) is one of
    ``chosen`` (``evaluate.classes``), every cell when None or empty. A name the dataset has no cell of, or a
    single name, fails with the dataset's classes and a did-you-mean hint."""
    if not chosen:
        return np.ones(len(classes), bool)
    present = sorted(set(np.asarray(classes).tolist()))
    for cls in chosen:
        if cls not in present:
            raise UserError(f"evaluate.classes names '{cls}'{did_you_mean(cls, present)}, which source '{name}' has "
                            f"no cell of at the {level} level: choose among {', '.join(present)} "
                            "(--classes A,B,..., or --classes all for every class)")
    if len(set(chosen)) < 2:
        raise UserError(f"evaluate.classes names {len(set(chosen))} class: a classifier needs two or more")
    return np.isin(classes, list(chosen))


def _same_class(label: str) -> str:
    return label


def map_labels(labels: np.ndarray, to_class: Callable[[str], str]) -> np.ndarray:
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

