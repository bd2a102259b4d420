"""Stage 1: obtain a white-cell detector, then detect cells and store their features and crops.

Detection is written in resumable chunks (``parts/``): an interrupted run, or several processes each
given ``--shard i/n``, leave finished chunks that a later run keeps; when every chunk is present they
are merged, streaming, into the interface's files. Peak memory is one chunk, whatever the dataset size.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import annotations, backbone_pretraining, colour, precision, pseudo_labels
from . import detector as net
from . import detector_training as training
from .config import DetectConfig
from .datasets import Dataset
from .errors import StageError, UserError
from .images import UnreadableImage, load_rgb
from .io import npy_writer, read_json, read_npy, sha256_file, write_csv, write_json, write_npy
from .reporting import Reporter
from .workdir import fingerprint, invalidate, output_digest, read_manifest, state, write_manifest

# found_by: "detector", or "segmentation" for a cell detect.segment_missed found where the detector found none.
INSTANCE_COLUMNS = ("instance_id", "image", "dataset", "label", "x0", "y0", "x1", "y1", "score", "mask_area", "found_by")
FEATURE_SHAPE = (256, 14, 14)
VIEWS_FILE = "roi_views.npy"  # (N, detect.views, 256, 14, 14): RoI features of colour-augmented views
# Keys that decide how the detector is built and trained; the rest only affect detection.
DETECTOR_KEYS = ("backbone", "min_size", "max_size", "train_images", "pseudo_mask_cut", "train_epochs", "train_steps",
                 "train_batch_size", "train_lr", "stain_norm", "train_precision", "pretrain_steps", "pretrain_batch_size")
DETECTION_KEYS = ("score_threshold", "segment_missed", "crop_size", "crop_shape", "all_cells", "chunk_images", "stain_norm",
                  "precision", "views", "view_turns")
# Images a dataset's stain statistics are measured on: evenly spaced over the dataset, so every process
# of a sharded run measures the same ones; 64 images hold millions of pixels, plenty for 6 numbers.
STAIN_SAMPLE_IMAGES = 64


def _section(cfg: DetectConfig, keys: Sequence[str]) -> dict:
    values = dataclasses.asdict(cfg)
    return {key: values[key] for key in keys}


def detector_fingerprint(cfg: DetectConfig, seed: int) -> str:
    """The datasets a pseudo-mask detector learnt from are recorded but not fingerprinted: detecting a
    second dataset reuses the detector instead of retraining it and making the first one stale."""
    inputs = {}
    for key in ("weights", "init_weights"):
        if getattr(cfg, key):
            inputs[key] = sha256_file(Path(getattr(cfg, key)))
    if cfg.annotations:
        inputs["annotations"] = str(Path(cfg.annotations).resolve())
        inputs["annotation_masks"] = str(cfg.annotation_masks)
    return fingerprint("detector", _section(cfg, DETECTOR_KEYS), seed, inputs, added_later={"pseudo_mask_cut": False})


def detections_fingerprint(dataset: Dataset, detector_manifest: dict, cfg: DetectConfig) -> str:
    inputs = {"images": dataset.fingerprint(), "detector": output_digest(detector_manifest)}
    return fingerprint("detect", _section(cfg, DETECTION_KEYS), None, inputs,
                       added_later={"segment_missed": False, "view_turns": False})


def obtain_detector(
    folder: Path,
    cfg: DetectConfig,
    datasets: Sequence[Dataset],
    device: torch.device,
    seed: int,
    reporter: Reporter,
    force: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """Reuse the detector in ``folder`` when current; else load ``--weights``, train on
    ``--annotations``, or train on label-free pseudo-masks of the datasets' own images."""
    expected = detector_fingerprint(cfg, seed)
    if not force and state(folder, expected) == "done":
        return net.load_detector(folder / "model.pt", device), read_manifest(folder)
    invalidate(folder)
    started = time.perf_counter()
    autocast_dtype = precision.autocast_dtype(cfg.train_precision, device)
    if cfg.weights:
        reporter.info(f"detector: loading weights from {cfg.weights}")
        model = net.load_detector(Path(cfg.weights), device, backbone_hint=cfg.backbone)
        how = {"how": "weights", "weights": str(cfg.weights)}
        losses: list[float] = []
    else:
        if cfg.annotations:
            samples = _annotated_samples(Path(cfg.annotations), cfg.annotation_masks)
            _set_stain(samples, stain_statistics([s.image_path for s in samples], cfg.stain_norm))
            how = {"how": "annotations", "annotations": str(cfg.annotations)}
        else:
            per_dataset = _pseudo_training_images(datasets, cfg.train_images, seed)
            count = sum(len(paths) for paths in per_dataset)
            reporter.info(f"detector: making pseudo-masks from {count} images (stain segmentation, no labels)")
            samples = []
            for dataset, paths in zip(datasets, per_dataset):
                found = pseudo_labels.pseudo_samples(paths, cut=cfg.pseudo_mask_cut)
                _set_stain(found, stain_statistics([r.path for r in dataset.records], cfg.stain_norm))
                samples += found
            how = {"how": "pseudo_masks", "trained_on": [d.name for d in datasets], "images": count}
        if not samples:
            raise UserError("no training images for the detector: no cell was found; pass --annotations or --weights")
        torch.manual_seed(seed)  # the random initial weights are part of what the seed fixes
        if cfg.init_weights:
            model, how["initial_weights"] = net.detector_from_initial_weights(
                Path(cfg.init_weights), min_size=cfg.min_size, max_size=cfg.max_size)
            start = how["initial_weights"]
            unused = start["not_used"]
            reporter.info(f"detector: starting from {cfg.init_weights} ({start['backbone']}, {start['loaded']} "
                          f"tensors loaded, {start['new']} new); not used: "
                          + (f"{len(unused)}: {', '.join(unused[:4])}" + (" ..." if len(unused) > 4 else "")
                             if unused else "none"))
        else:
            model = net.build_detector(cfg.backbone, min_size=cfg.min_size, max_size=cfg.max_size)
        model.to(device)
        if cfg.pretrain_steps:
            with reporter.progress(f"pretraining the detector's backbone on the cells of {len(samples)} images",
                                   cfg.pretrain_steps, unit="step") as bar:
                how["pretraining"] = backbone_pretraining.pretrain_backbone(
                    model.backbone.body, samples, cfg.pretrain_steps, cfg.pretrain_batch_size, device, seed,
                    stain_norm=cfg.stain_norm, white_balance=net.detector_args(model)["white_balance"],
                    on_step=lambda step, total, loss: bar.advance(1, loss=loss), autocast_dtype=autocast_dtype)
        steps = training.training_steps(len(samples), cfg.train_epochs, cfg.train_batch_size, cfg.train_steps)
        with reporter.progress(f"training detector on {len(samples)} images", steps, unit="step") as bar:
            losses = training.train_detector(
                model,
                samples,
                epochs=cfg.train_epochs,
                min_steps=cfg.train_steps,
                stain_norm=cfg.stain_norm,
                batch_size=cfg.train_batch_size,
                lr=cfg.train_lr,
                device=device,
                seed=seed,
                on_step=lambda step, total, terms: bar.advance(1, loss=float(sum(terms.values()))),
                autocast_dtype=autocast_dtype,
            )
        how["samples"] = len(samples)
    net.save_detector(folder / "model.pt", model)
    model_args = net.detector_args(model)
    write_json(folder / "config.json", model_args)
    manifest = write_manifest(
        folder,
        "detector",
        fingerprint_value=expected,
        config=dataclasses.asdict(cfg),
        seed=seed,
        device=str(device),
        inputs={},
        outputs=["model.pt", "config.json"],
        counts={"training_steps": len(losses)},
        timings={"seconds": round(time.perf_counter() - started, 2)},
        extra={"obtained": how, "final_loss": losses[-1] if losses else None,
               "precision": precision.name(autocast_dtype) if losses else None},
    )
    model.eval()
    return model, manifest


def _annotated_samples(path: Path, mask_dir: Optional[str]) -> list:
    if path.is_file() and path.suffix.lower() == ".json":
        return annotations.read_coco(path)
    if (path / "Annotations").is_dir():
        return annotations.read_voc(path, mask_dir=Path(mask_dir) if mask_dir else None)
    if (path / "annotations.json").is_file():
        return annotations.read_coco(path / "annotations.json")
    raise UserError(f"{path}: not a VOC folder (Annotations/) or a COCO JSON file; fix --annotations")


def _pseudo_training_images(datasets: Sequence[Dataset], limit: int, seed: int) -> list[list[Path]]:
    """An even, seeded sample of each dataset, so every lab's stain is seen by the detector."""
    rng = random.Random(seed)
    per_dataset = max(1, limit // max(1, len(datasets)))
    chosen = []
    for dataset in datasets:
        records = list(dataset.records)
        rng.shuffle(records)
        chosen.append([r.path for r in records[:per_dataset]])
    return chosen


def stain_statistics(paths: Sequence[Path], mode: str) -> Optional[np.ndarray]:
    """The (2, 3) CIELAB statistics a dataset is normalised by (``mode`` "dataset"), else None."""
    if mode != "dataset" or not paths:
        return None
    step = max(1, len(paths) // STAIN_SAMPLE_IMAGES)
    images = []
    for path in list(paths)[::step][:STAIN_SAMPLE_IMAGES]:
        try:
            images.append(load_rgb(path))
        except UnreadableImage:
            continue  # counted and reported by detection itself
    return colour.lab_statistics(images) if images else None


def _set_stain(samples: Sequence, statistics: Optional[np.ndarray]) -> None:
    for sample in samples:
        sample.stain = statistics


def coverage_warning(dataset_name: str, counts: dict, max_missing_fraction: float, folder: Path) -> Optional[str]:
    """One line when more than ``max_missing_fraction`` of the readable images have no detection, saying
    what to do; None otherwise. Unreadable images are counted apart and do not count here."""
    readable = counts["images"] - counts["unreadable"]
    missed = counts["no_detection"]
    if readable == 0 or missed / readable <= max_missing_fraction:
        return None
    return (f"detect {dataset_name}: no cell found in {missed} of {readable} images ({missed / readable:.0%}); "
            "the detector needs more to learn from: more images of this lab (several --data train it together), "
            "--weights FILE, --annotations PATH, or a longer training budget (detect.train_* in the config). "
            f"The images are listed under no_detection in {Path(folder) / 'manifest.json'}")


def parse_shard(text: Optional[str]) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text}: expected i/n, for example 0/4") from None
    if not 0 <= index < count:
        raise UserError(f"--shard {text}: i must be in 0..n-1")
    return index, count


def run_detection(
    dataset: Dataset,
    model: torch.nn.Module,
    detector_manifest: dict,
    cfg: DetectConfig,
    folder: Path,
    device: torch.device,
    reporter: Reporter,
    shard: tuple[int, int] = (0, 1),
    strict: bool = False,
    on_ready=None,
) -> Optional[dict]:
    """Detect every image of this shard's chunks. Without a shard, merge the chunks into the final
    files and return the manifest; a shard worker returns None (a later plain run merges).
    ``on_ready`` is called once the chunk folder is set up, before the long work starts."""
    expected = detections_fingerprint(dataset, detector_manifest, cfg)
    invalidate(folder)
    parts = folder / "parts"
    _reset_parts_if_changed(parts, expected)
    if on_ready is not None:
        on_ready()
    chunk = cfg.chunk_images
    chunks = [k for k in range(-(-len(dataset.records) // chunk)) if k % shard[1] == shard[0]]
    todo = [k for k in chunks if not (parts / f"part_{k:05d}.json").is_file()]
    if len(todo) < len(chunks):
        reporter.info(f"{dataset.name}: resuming, {len(chunks) - len(todo)} of {len(chunks)} chunks already done")
    started = time.perf_counter()
    stain = stain_statistics([r.path for r in dataset.records], cfg.stain_norm)
    autocast_dtype = precision.autocast_dtype(cfg.precision, device)  # resolved once: every chunk and the manifest agree
    total = sum(len(dataset.records[k * chunk:(k + 1) * chunk]) for k in todo)
    with reporter.progress(f"detecting {dataset.name}", total, unit="img") as bar:
        for k in todo:
            _detect_chunk(dataset, k, model, cfg, stain, autocast_dtype, parts, device, bar, strict)
    seconds = time.perf_counter() - started
    every = range(-(-len(dataset.records) // chunk))
    if shard != (0, 1):
        reporter.info(f"{dataset.name}: shard {shard[0]}/{shard[1]} done; once every shard is, "
                      f"`aecfe detect --data {dataset.name}` merges them")
        return None
    missing = [k for k in every if not (parts / f"part_{k:05d}.json").is_file()]
    if missing:  # another process removed or never finished them: a plain run does every chunk itself
        raise StageError(f"{parts}: chunks {missing[:5]} are missing after detection; run the command again")
    return _merge(dataset, parts, folder, expected, cfg, stain, autocast_dtype, device, seconds, total)


def _reset_parts_if_changed(parts: Path, expected: str) -> None:
    marker = parts / "fingerprint.txt"
    if marker.is_file() and marker.read_text() == expected:
        return
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    marker.write_text(expected)


def _detect_chunk(dataset, k, model, cfg, stain, autocast_dtype, parts, device, bar, strict) -> None:
    records = dataset.records[k * cfg.chunk_images:(k + 1) * cfg.chunk_images]
    rows, features, crops, views, unreadable, missed = [], [], [], [], [], []
    for start in range(0, len(records), cfg.batch_size):
        batch, images = [], []
        for record in records[start:start + cfg.batch_size]:
            try:
                images.append(colour.stain_normalised(load_rgb(record.path), cfg.stain_norm, stain))
                batch.append(record)
            except UnreadableImage as exc:
                if strict:
                    raise UserError(f"{exc}; remove or fix the file, or run without --strict") from None
                unreadable.append(str(exc))
        results = net.detect(model, images, device, score_threshold=cfg.score_threshold, central_only=not cfg.all_cells,
                             autocast_dtype=autocast_dtype) if images else []
        if cfg.segment_missed and not cfg.all_cells:
            results = _segment_missed(model, images, results, autocast_dtype, device)
        for record, image, kept in zip(batch, images, results):
            if not kept:
                missed.append(record.rel)
            for index, det in enumerate(kept):
                x0, y0, x1, y1 = (round(float(v), 1) for v in det.box)
                rows.append([f"{dataset.name}/{record.rel}#{index}", record.rel, dataset.name, record.label,
                             x0, y0, x1, y1, round(float(det.score), 4), int(det.mask.sum()), det.found_by])
                features.append(det.roi_feature.astype(np.float16))
                crops.append(net.crop_cell(image, det.box, size=cfg.crop_size, shape=cfg.crop_shape))
        if cfg.views:
            views.extend(_view_features(model, [r.rel for r in batch], images, results, cfg.views, autocast_dtype, device,
                                        cfg.view_turns))
        bar.advance(len(records[start:start + cfg.batch_size]))
    write_npy(parts / f"part_{k:05d}_roi.npy", np.stack(features) if features else np.zeros((0, *FEATURE_SHAPE), np.float16))
    if cfg.views:
        write_npy(parts / f"part_{k:05d}_views.npy",
                  np.stack(views) if views else np.zeros((0, cfg.views, *FEATURE_SHAPE), np.float16))
    write_npy(parts / f"part_{k:05d}_crops.npy",
              np.stack(crops) if crops else np.zeros((0, 3, cfg.crop_size, cfg.crop_size), np.uint8))
    # The JSON goes last: a chunk with its JSON present is complete.
    write_json(parts / f"part_{k:05d}.json", {"rows": rows, "unreadable": unreadable, "no_detection": missed})


def _segment_missed(model, images: list[np.ndarray], results: list, autocast_dtype, device) -> list:
    """``results`` with each image the detector found no cell in given the segmented cell nearest its
    centre, where that one is plausible (``pseudo_labels.central_instance``): its box and mask, score 0,
    and the RoI feature taken at its box from the same network, as for any detection. The label-free
    detector misses the cells its pseudo-masks taught it least (BCCD's neutrophils and monocytes), which
    the segmentation, cut to the cell's solid part, still finds."""
    found = {i: pseudo_labels.central_instance(images[i]) for i, kept in enumerate(results) if not kept}
    found = {i: instance for i, instance in found.items() if instance is not None}
    if not found:
        return results
    order = sorted(found)
    features = net.roi_features_at(model, [images[i] for i in order], [found[i][0][None] for i in order], device,
                                   autocast_dtype)
    results = list(results)
    for i, feature in zip(order, features):
        box, mask = found[i]
        results[i] = [net.Detection(box, 0.0, mask, feature, found_by=net.FOUND_BY_SEGMENTATION)]
    return results


def _view_features(model, rels: list[str], images: list[np.ndarray], results: list, count: int, autocast_dtype,
                   device, turns: bool = False) -> list[np.ndarray]:
    """(count, 256, 14, 14) float16 per kept detection, in detection order: RoI features of ``count``
    colour-augmented copies of each image at the boxes found in the original (with ``turns`` each copy and
    its boxes turned by a random symmetry of the square), all copies of the batch in one ``roi_features_at``
    call. Seeded by the image's path, so a view is the same whatever the chunking, sharding or resumption of
    the run."""
    copies, boxes, owners = [], [], []
    for rel, image, kept in zip(rels, images, results):
        if not kept:
            continue
        rng = np.random.default_rng(zlib.crc32(rel.encode("utf-8")))
        found = np.stack([d.box for d in kept])
        for _ in range(count):
            copy = colour.augmented_copy(image, rng)
            if turns:
                copy, turned = turn_image(copy, found, int(rng.integers(8)))
                boxes.append(turned)
            else:
                boxes.append(found)
            copies.append(copy)
        owners.append(len(kept))
    pooled = net.roi_features_at(model, copies, boxes, device, autocast_dtype)
    per_cell, offset = [], 0
    for cells in owners:  # the image's block is (count copies) x (its cells), copy-major
        block = pooled[offset:offset + count * cells].reshape(count, cells, *FEATURE_SHAPE)
        per_cell.extend(block.transpose(1, 0, 2, 3, 4).astype(np.float16))
        offset += count * cells
    return per_cell


def turn_image(image: np.ndarray, boxes: np.ndarray, element: int) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W, 3) image and its (n, 4) x0, y0, x1, y1 boxes under symmetry ``element`` (0-7) of the square,
    as ``autoencoder.dihedral`` counts them: a left-right mirror for 4-7, then ``element % 4`` quarter turns
    anticlockwise (``np.rot90``). A cell's box stays the box of the same cell."""
    # A mirror followed by k anticlockwise turns is -k turns followed by the mirror, rotate_flip's order.
    turns = (-element) % 4 if element >= 4 else element
    image, _, boxes = training.rotate_flip(image, None, np.asarray(boxes, np.float32).reshape(-1, 4), turns,
                                           element >= 4)
    return np.ascontiguousarray(image), boxes


def _merge(dataset, parts, folder, expected, cfg, stain, autocast_dtype, device, seconds, images_done) -> dict:
    metas = [read_json(p) for p in sorted(parts.glob("part_*.json"))]
    roi_parts = sorted(parts.glob("part_*_roi.npy"))
    crop_parts = sorted(parts.glob("part_*_crops.npy"))
    # Chunks written before found_by existed: a run resumed across the upgrade.
    rows = [row + [net.FOUND_BY_DETECTOR] * (len(INSTANCE_COLUMNS) - len(row)) for m in metas for row in m["rows"]]
    total = len(rows)
    _stream_concatenate(roi_parts, folder / "roi_features.npy", (total, *FEATURE_SHAPE), np.float16)
    _stream_concatenate(crop_parts, folder / "crops.npy", (total, 3, cfg.crop_size, cfg.crop_size), np.uint8)
    outputs = ["instances.csv", "roi_features.npy", "crops.npy"]
    if cfg.views:
        _stream_concatenate(sorted(parts.glob("part_*_views.npy")), folder / VIEWS_FILE,
                            (total, cfg.views, *FEATURE_SHAPE), np.float16)
        outputs.append(VIEWS_FILE)
    else:  # a rerun without views must not leave an earlier run's views beside new features
        (folder / VIEWS_FILE).unlink(missing_ok=True)
    write_csv(folder / "instances.csv", INSTANCE_COLUMNS, rows)
    unreadable = [u for m in metas for u in m["unreadable"]]
    missed = [u for m in metas for u in m["no_detection"]]
    segmented = sum(row[-1] == net.FOUND_BY_SEGMENTATION for row in rows)
    counts = {"images": len(dataset.records), "cells": total, "segmented": segmented, "no_detection": len(missed),
              "unreadable": len(unreadable)}
    warning = coverage_warning(dataset.name, counts, cfg.max_missing_fraction, folder)
    manifest = write_manifest(
        folder,
        "detect",
        fingerprint_value=expected,
        config=dataclasses.asdict(cfg),
        seed=None,
        device=str(device),
        inputs={"dataset": dataset.spec(), "images": dataset.fingerprint()},
        outputs=outputs,
        counts=counts,
        timings={"seconds": round(seconds, 2),
                 "images_per_second": round(images_done / seconds, 2) if seconds > 0 and images_done else None},
        extra={"no_detection": missed, "unreadable": unreadable, "skipped": dataset.skipped,
               "stain_norm": cfg.stain_norm, "precision": precision.name(autocast_dtype),
               "lab_statistics": None if stain is None else np.round(stain, 3).tolist(),
               "warnings": [warning] if warning else []},
    )
    shutil.rmtree(parts, ignore_errors=True)
    return manifest


def _stream_concatenate(sources: list[Path], target: Path, shape: tuple, dtype) -> None:
    """Concatenate .npy chunks into one file: peak memory is one chunk, whatever the total."""
    with npy_writer(target, shape, dtype) as append:
        for source in sources:
            append(read_npy(source, mmap=False))
