"""Stage 3: encode every detected cell into a latent feature vector, written beside its ids.

Cells are read from the RoI features on disk, encoded and appended to both outputs one batch at a
time, so peak memory does not grow with the dataset. With ``extract.morphology`` each vector is followed
by the cell's morphology descriptors (``morphology.DESCRIPTORS``, columns ``m_<name>``), measured on its
crop, and its sizes in the image (``morphology.SIZES``, from its detection): the latent columns are ``f0``,
``f1``, ...
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from . import autoencoder as ae
from . import colour, morphology
from .config import ExtractConfig
from .errors import UserError
from .feature_sets import ID_COLUMNS, MORPHOLOGY_PREFIX
from .io import iter_npy_blocks, npy_header, npy_writer, write_csv
from .reporting import Reporter
from .workdir import fingerprint, invalidate, output_digest, write_manifest


def _inputs(detect_manifest: dict, train_manifest: dict) -> dict[str, str]:
    return {"detections": output_digest(detect_manifest), "model": output_digest(train_manifest)}


def extraction_fingerprint(detect_manifest: dict, train_manifest: dict, cfg: ExtractConfig) -> str:
    # The batch size changes speed, not values, so it does not make features stale; a new version of the
    # morphology descriptors does.
    settings = {"morphology": morphology.VERSION if cfg.morphology else False,
                "cut_red_cells": cfg.morphology and cfg.cut_red_cells}
    return fingerprint("extract", settings, None, _inputs(detect_manifest, train_manifest),
                       added_later={"cut_red_cells": False})


def run_extraction(
    name: str,
    detect_dir: Path,
    detect_manifest: dict,
    model: ae.AECFE,
    train_manifest: dict,
    cfg: ExtractConfig,
    folder: Path,
    device: torch.device,
    reporter: Reporter,
) -> dict:
    expected = extraction_fingerprint(detect_manifest, train_manifest, cfg)
    invalidate(folder)
    roi_path, instances_path = Path(detect_dir) / "roi_features.npy", Path(detect_dir) / "instances.csv"
    crops_path = Path(detect_dir) / "crops.npy"
    with open(roi_path, "rb") as handle:
        cells = npy_header(handle)[0][0]
    latent_dim = model.model_args["latent_dim"]
    descriptors = (*morphology.DESCRIPTORS, *morphology.SIZES) if cfg.morphology else ()
    dimensions = latent_dim + len(descriptors)
    header = [*ID_COLUMNS, *(f"f{i}" for i in range(latent_dim)), *(f"{MORPHOLOGY_PREFIX}{name}" for name in descriptors)]
    described = itertools.repeat(None)
    if descriptors and cells:
        with open(crops_path, "rb") as handle:
            if npy_header(handle)[0][0] != cells:
                raise UserError(f"{crops_path} does not hold one crop per cell of {roi_path} ({cells}): "
                                f"re-run `aecfe detect --data {name} --force`")
        # The dataset's own stain statistics, so the colour descriptors of every lab share one reference.
        statistics = colour.lab_statistics(np.moveaxis(b, 1, -1) for b in iter_npy_blocks(crops_path, cfg.batch_size))
        described = morphology.describe_crops(iter_npy_blocks(crops_path, cfg.batch_size), statistics,
                                              cfg.cut_red_cells)
    mismatch = UserError(f"{instances_path} does not list one row per cell of {roi_path} ({cells}): "
                         f"re-run `aecfe detect --data {name} --force`")
    if descriptors:
        with open(instances_path, newline="", encoding="utf-8") as handle:
            missing = set(morphology.SIZE_FIELDS) - set(csv.DictReader(handle).fieldnames or ())
        if missing:
            raise UserError(f"{instances_path} lacks the columns {sorted(missing)} that the cell sizes are read from: "
                            f"re-run `aecfe detect --data {name} --force`")

    def table_rows(instances, append_features, bar):
        """Encode batch by batch: each batch's vectors go to features.npy, its rows to the CSV writer."""
        for block, shapes in zip(iter_npy_blocks(roi_path, cfg.batch_size), described):
            rows = list(itertools.islice(instances, len(block)))
            if len(rows) < len(block):
                raise mismatch
            vectors = model.embed(model.scale(torch.from_numpy(block).to(device).float())).cpu().numpy()
            if shapes is not None:
                vectors = np.concatenate([vectors, shapes, morphology.cell_sizes(rows)], axis=1)
            append_features(vectors)
            for row, vector in zip(rows, vectors):
                # repr-exact float32 text (9 significant digits) so the CSV round-trips the .npy.
                yield [row[c] for c in ID_COLUMNS] + [f"{v:.9g}" for v in vector.tolist()]
            bar.advance(len(vectors))
        if next(instances, None) is not None:
            raise mismatch

    started = time.perf_counter()
    # Cells stream from disk to both outputs one batch at a time: memory does not grow with the dataset.
    # An error anywhere (rows that disagree included) keeps neither output.
    with (
        open(instances_path, newline="", encoding="utf-8") as instances_file,
        npy_writer(folder / "features.npy", (cells, dimensions), np.float32) as append_features,
        reporter.progress(f"extracting {name}", cells, unit="cells") as bar,
        torch.inference_mode(),
    ):
        write_csv(folder / "features.csv", header, table_rows(csv.DictReader(instances_file), append_features, bar))
    seconds = time.perf_counter() - started
    return write_manifest(
        folder,
        "extract",
        fingerprint_value=expected,
        config=dataclasses.asdict(cfg),
        seed=None,
        device=str(device),
        inputs=_inputs(detect_manifest, train_manifest),
        outputs=["features.npy", "features.csv"],
        counts={"cells": cells, "dimensions": dimensions, "latent_dimensions": latent_dim,
                "morphology_dimensions": len(descriptors)},
        timings={"seconds": round(seconds, 2), "cells_per_second": round(cells / seconds, 1) if seconds > 0 else None},
        extra={"dataset": name},
    )


def reconstruction_errors(model: ae.AECFE, detect_dir: Path, batch_size: int, device: torch.device) -> np.ndarray:
    """Per detected cell, the mean squared error of the autoencoder's reconstruction of its scaled RoI
    feature: low for cells like those the autoencoder learned from, high for cells unlike all of them."""
    errors = [np.zeros(0, np.float32)]
    with torch.inference_mode():
        for block in iter_npy_blocks(Path(detect_dir) / "roi_features.npy", batch_size):
            features = model.scale(torch.from_numpy(block).to(device).float())
            reconstructed = model.feature_decoder(model.encode(features))
            errors.append(((reconstructed - features) ** 2).mean(dim=(1, 2, 3)).cpu().numpy())
    return np.concatenate(errors)
