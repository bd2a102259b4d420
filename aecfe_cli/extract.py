"""Stage 3: encode every detected cell into a latent feature vector, written beside its ids.

Cells are encoded in batches straight from the memory-mapped RoI features into a memory-mapped
output, so peak memory does not grow with the dataset.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from . import autoencoder as ae
from .config import ExtractConfig
from .io import atomic_path, read_csv, read_npy
from .reporting import Reporter
from .workdir import fingerprint, invalidate, output_digest, write_manifest

ID_COLUMNS = ("instance_id", "image", "dataset", "label")


def _inputs(detect_manifest: dict, train_manifest: dict) -> dict[str, str]:
    return {"detections": output_digest(detect_manifest), "model": output_digest(train_manifest)}


def extraction_fingerprint(detect_manifest: dict, train_manifest: dict, cfg: ExtractConfig) -> str:
    # The batch size changes speed, not values, so it does not make features stale.
    return fingerprint("extract", {}, None, _inputs(detect_manifest, train_manifest))


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
    roi = read_npy(Path(detect_dir) / "roi_features.npy")
    instances = read_csv(Path(detect_dir) / "instances.csv")
    latent_dim = model.model_args["latent_dim"]
    started = time.perf_counter()
    with atomic_path(folder / "features.npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(roi), latent_dim))
        with reporter.progress(f"extracting {name}", len(roi), unit="cells") as bar, torch.inference_mode():
            for start in range(0, len(roi), cfg.batch_size):
                block = torch.from_numpy(np.array(roi[start:start + cfg.batch_size]))
                features = ae.scale_features(block.to(device).float())
                out[start:start + len(block)] = model.encode(features).cpu().numpy()
                bar.advance(len(block))
        out.flush()
        _write_features_csv(folder / "features.csv", instances, out)
        del out
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
        counts={"cells": len(roi), "dimensions": latent_dim},
        timings={"seconds": round(seconds, 2), "cells_per_second": round(len(roi) / seconds, 1) if seconds > 0 else None},
        extra={"dataset": name},
    )


def _write_features_csv(path: Path, instances: list[dict], features: np.ndarray) -> None:
    header = [*ID_COLUMNS, *(f"f{i}" for i in range(features.shape[1]))]
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for row, vector in zip(instances, features):
                # repr-exact float32 text (9 significant digits) so the CSV round-trips the .npy.
                writer.writerow([row[c] for c in ID_COLUMNS] + [f"{v:.9g}" for v in vector.tolist()])
