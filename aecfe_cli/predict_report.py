"""What ``predict`` writes for people: differential counts, montages of example cells, GeoJSON for QuPath,
and the rows and lines the command prints."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .classify import rounded
from .io import pyplot, write_csv, write_figure, write_json

if TYPE_CHECKING:
    from .feature_sets import FeatureSet
    from .predict import CellPredictions

MONTAGE_COLUMNS = 8
GEOJSON_FOLDER = "geojson"
REJECTED = "rejected"


# ------------------------------------------------------------------------------------------ differential


def differential_counts(
    images: np.ndarray, predictions: CellPredictions, classes: Sequence[str], images_without_cells: Sequence[str]
) -> tuple[list[dict], dict]:
    """Per image (sorted; images where no cell was detected included, with 0 cells) and for the dataset:
    cells, accepted, rejected, number and percent of each class among the accepted cells, shift figures."""
    members = rows_per_image(images)
    per_image = []
    for name in sorted({*members, *images_without_cells}):
        rows = members.get(name, np.empty(0, dtype=np.int64))
        per_image.append({"image": name, **_count(rows, predictions, classes)})
    return per_image, _count(np.arange(len(predictions.predicted)), predictions, classes)


def rows_per_image(images: np.ndarray) -> dict[str, np.ndarray]:
    """Image name -> the rows of its cells, in one pass (datasets hold many thousands of images)."""
    names, inverse = np.unique(np.asarray(images).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(names)))[:-1]
    return dict(zip(names.tolist(), np.split(order, bounds)))


def _count(rows: np.ndarray, predictions: CellPredictions, classes: Sequence[str]) -> dict:
    rejected = predictions.rejected[rows]
    accepted = predictions.predicted[rows][~rejected]
    n_accepted = len(accepted)
    return {
        "cells": int(len(rows)),
        "accepted": n_accepted,
        "rejected": int(rejected.sum()),
        "classes": {
            cls: {
                "n": int((accepted == cls).sum()),
                "percent": rounded(100.0 * (accepted == cls).sum() / n_accepted) if n_accepted else None,
            }
            for cls in classes
        },
        "median_shift_distance": rounded(np.median(predictions.distance[rows])) if len(rows) else None,
        "median_reconstruction_error": rounded(np.median(predictions.reconstruction[rows])) if len(rows) else None,
        "beyond_training": int(predictions.beyond[rows].sum()),
    }


def write_counts(path: Path, dataset: str, classes: Sequence[str], images: list[dict], totals: dict) -> None:
    """counts.csv: one row per image (``scope`` image) and one for the dataset (``scope`` dataset)."""
    class_columns = [column for cls in classes for column in (f"n_{cls}", f"pct_{cls}")]
    header = ["scope", "dataset", "image", "cells", "accepted", *class_columns, "n_rejected", "pct_rejected",
              "median_shift_distance", "median_reconstruction_error", "n_beyond_training"]

    def row(scope: str, image: str, counts: dict) -> list:
        per_class = [value for cls in classes for value in (counts["classes"][cls]["n"],
                                                             _blank(counts["classes"][cls]["percent"], 2))]
        rejected_percent = 100.0 * counts["rejected"] / counts["cells"] if counts["cells"] else None
        return [scope, dataset, image, counts["cells"], counts["accepted"], *per_class, counts["rejected"],
                _blank(rejected_percent, 2), _blank(counts["median_shift_distance"], 4),
                _blank(counts["median_reconstruction_error"], 6), counts["beyond_training"]]

    rows = [row("image", entry["image"], entry) for entry in images] + [row("dataset", "", totals)]
    write_csv(path, header, rows)


def _blank(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------------ files


def remove_earlier_outputs(folder: Path) -> None:
    """Montages and GeoJSON of an earlier run (other classes, other images) must not sit beside new ones."""
    for old in Path(folder).glob("montage_*.png"):
        old.unlink()
    shutil.rmtree(Path(folder) / GEOJSON_FOLDER, ignore_errors=True)


def file_slug(name: str) -> str:
    """A file-name-safe form of a class or image name (folders become ``__``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "__"))


def write_montages(
    folder: Path,
    cells: FeatureSet,
    predictions: CellPredictions,
    classes: Sequence[str],
    n_cells: int,
    seed: int,
    title: str,
) -> dict[str, str]:
    """``montage_<class>.png`` per predicted class, and ``montage_rejected.png``: a seeded random sample of
    up to ``n_cells`` crops, most confident first, each with its confidence. Returns class -> file."""
    rng = np.random.default_rng(seed)
    groups = [(cls, (predictions.predicted == cls) & ~predictions.rejected) for cls in classes]
    groups.append((REJECTED, predictions.rejected))
    files = {}
    for name, chosen in groups:
        members = np.flatnonzero(chosen)
        if len(members) == 0:
            continue
        sample = rng.choice(members, size=min(n_cells, len(members)), replace=False)
        sample = sample[np.argsort(-predictions.confidence[sample], kind="stable")]
        caption = f"{title}: {name}, {len(members)} cells ({len(sample)} shown at random, confidence above each)"
        files[name] = f"montage_{file_slug(name)}.png"
        _draw_montage(folder / files[name], cells.crops, sample, predictions, caption, name == REJECTED)
    return files


def _draw_montage(path: Path, crops: np.ndarray, rows: np.ndarray, predictions: CellPredictions, caption: str,
                  with_class: bool) -> None:
    plt = pyplot()
    columns = min(MONTAGE_COLUMNS, len(rows))
    lines = -(-len(rows) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(1.3 * columns, 1.45 * lines + 0.4), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, row in zip(axes.ravel(), rows):
        axis.imshow(np.asarray(crops[row]).transpose(1, 2, 0))
        label = f"{predictions.confidence[row]:.2f}"
        axis.set_title(f"{predictions.predicted[row]} {label}" if with_class else label, fontsize=6)
    figure.suptitle(caption, fontsize=7)
    write_figure(path, figure)


def write_geojson(folder: Path, cells: FeatureSet, boxes: list[dict], predictions: CellPredictions) -> list[str]:
    """``geojson/<image>.geojson`` per image: each cell's box as a QuPath detection with its class
    (``rejected`` when below the threshold) and measurements. Coordinates are the image's pixels."""
    files = []
    for image, rows in rows_per_image(cells.images).items():
        features = []
        for row in rows:
            x0, y0, x1, y1 = (float(boxes[row][column]) for column in ("x0", "y0", "x1", "y1"))
            name = REJECTED if predictions.rejected[row] else str(predictions.predicted[row])
            features.append({
                "type": "Feature",
                "id": str(cells.instance_ids[row]),
                "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": name},
                    "measurements": {
                        "confidence": round(float(predictions.confidence[row]), 4),
                        "margin": round(float(predictions.margin[row]), 4),
                        "shift_distance": round(float(predictions.distance[row]), 4),
                        "reconstruction_error": round(float(predictions.reconstruction[row]), 6),
                    },
                    "predicted_class": str(predictions.predicted[row]),
                },
            })
        relative = f"{GEOJSON_FOLDER}/{file_slug(str(Path(image).with_suffix('')))}.geojson"
        write_json(Path(folder) / relative, {"type": "FeatureCollection", "features": features})
        files.append(relative)
    return files


# -------------------------------------------------------------------------------------------- printing


def render_count_rows(summary: dict) -> list[tuple]:
    """(class, cells, percent of accepted) rows of the dataset's differential count, then rejected and total."""
    counts = summary["counts"]
    rows = [(cls, entry["n"], "-" if entry["percent"] is None else f"{entry['percent']:.1f}")
            for cls, entry in counts["classes"].items()]
    rejected_percent = 100.0 * counts["rejected"] / counts["cells"]
    rows.append((f"{REJECTED} (of all cells)", counts["rejected"], f"{rejected_percent:.1f}"))
    rows.append(("cells", counts["cells"], ""))
    return rows


def reject_line(summary: dict) -> str:
    reject = summary["reject"]
    held_out = reject["held_out"]
    rate = f"{summary['reject']['n_rejected']} of {summary['counts']['cells']} cells rejected"
    if reject["by"] == "none":
        return f"{rate} (reject option off: predict.reject_by none)"
    if not reject["reachable"]:
        return (f"{rate}: no confidence threshold reaches {reject['target']:.0%} accuracy on the held-out "
                f"{summary['source']} cells (held-out accuracy {held_out['accuracy']:.0%}); lower predict.reject_target")
    aim = f"{reject['target']:.0%} {'accuracy' if reject['by'] == 'accuracy' else 'coverage'}"
    return (f"{rate} below confidence {reject['threshold']:.3f}, calibrated for {aim} on the held-out "
            f"{summary['source']} cells (there: accuracy {held_out['accuracy_accepted']:.0%} on the "
            f"{held_out['coverage']:.0%} accepted, {held_out['accuracy']:.0%} on all)")


def shift_line(summary: dict) -> str:
    """One line on how far the dataset lies from the source's training cells; a warning when it is far."""
    shift = summary["shift"]
    distance, reconstruction = shift["distance"], shift["reconstruction"]
    figures = (f"{shift['fraction_beyond']:.0%} of {summary['dataset']}'s cells lie beyond {shift['quantile']:.0%} of "
               f"{summary['source']}'s own held-out cells in distance to the {summary['source']} training cells "
               f"or in autoencoder reconstruction error (scores: distance {distance['score']:.2f}, reconstruction "
               f"{reconstruction['score']:.2f}; 1 = like unseen {summary['source']} cells)")
    if not shift["warning"]:
        return f"shift: {figures}"
    advice = "its cells look unlike the training lab's: check the montages and treat the labels with caution"
    if not summary["in_training"]:
        advice += (f"; training the autoencoder with it (aecfe train --data {summary['source']} "
                   f"--data {summary['dataset']}) teaches the autoencoder its cells")
    return f"{summary['dataset']} lies outside what the classifier saw: {figures}; {advice}"
